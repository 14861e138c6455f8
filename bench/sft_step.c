/*
 * One SFT training step (perl_lora_sft_step: zero_grad + forward + LM-head
 * loss + backward + AdamW) on a random Llama: tokens/s, model FLOP/s and peak
 * RSS.  One configuration per process (peak RSS is per process); one JSON
 * object per line on stdout.
 *
 *   sft_step [--mode lora|full] [--recompute 0|1] [--rank R] [--batch B] [--seq T]
 *            [--threads N] [--warmup W] [--reps R] [--phases] [--model random768|stories260K]
 *
 * random768: dim 768, 12 layers, 12 heads, 4 kv heads, hidden 2048, vocab
 * 32000, untied lm_head (Llama-2 style).  LoRA: r=8, alpha=16, q,k,v,o
 * (perl_lora_options defaults).  Full: LIBPERL_MODE_FULL with
 * train_embeddings = 1, so every parameter trains (as torch's full
 * fine-tuning does).  AdamW: perl_optim_options defaults (lr 1e-4, betas
 * 0.9/0.999, eps 1e-8, weight decay 0, clip 1.0).
 *
 * --phases additionally times (min(reps, 3) times, after the step measurement,
 * so the reported peak RSS is the step's): perl_lora_zero_grad, perl_lora_sft_backward
 * (forward + head + backward), perl_lora_optimizer_step, and two inference
 * passes with the adapter: perl_model_forward(hidden only) and
 * perl_model_token_logprobs (forward + LM head, no gradients).
 */
#define _POSIX_C_SOURCE 200809L
#define _DEFAULT_SOURCE

#include <libperl/libperl.h>

#define BENCH_NAME "sft_step"
#include "bench_util.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

static void usage(void) {
    fprintf(stderr, "usage: sft_step [--mode lora|full] [--recompute 0|1] [--rank R] [--batch B] [--seq T]\n"
                    "                [--threads N] [--warmup W] [--reps R] [--phases] [--model random768|stories260K]\n");
    exit(2);
}

/* Model FLOPs of one step (GEMMs and attention; elementwise work not counted). */
typedef struct step_flops {
    double forward, backward, recompute, lm_head_fwd;
} step_flops;

static step_flops count_flops(const perl_model_config *c, int full, int train_emb, int rank, uint32_t targets,
                              int batch_size, int seq_len) {
    int head_dim = c->head_dim ? c->head_dim : c->dim / c->n_heads;
    double N = (double)batch_size * seq_len, S = (double)batch_size * (seq_len - 1);
    double dim = c->dim, hid = c->hidden_dim, qd = (double)c->n_heads * head_dim;
    double kvd = (double)c->n_kv_heads * head_dim, L = c->n_layers, V = c->vocab_size;
    double in[7] = {dim, dim, dim, qd, dim, dim, hid}, out[7] = {qd, kvd, kvd, dim, hid, hid, dim};
    double dense = 0.0, lora = 0.0;
    for (int p = 0; p < 7; p++) {
        dense += 2.0 * N * in[p] * out[p];
        if (!full && (targets & (1u << p))) lora += 2.0 * N * rank * (in[p] + out[p]);
    }
    dense *= L, lora *= L;
    /* causal attention: QK^T and PV, 2 * D flops each per (query, key <= query) pair */
    double attn = L * 4.0 * head_dim * c->n_heads * batch_size * seq_len * (seq_len + 1.0) / 2.0;
    double lm = 2.0 * S * dim * V;
    step_flops f;
    f.forward = dense + lora + attn + lm;
    f.lm_head_fwd = lm;
    /* backward: dx of every projection (+ dW in full mode), LoRA dA/dB/du/dx (2x its forward),
     * attention 2x forward, LM head dh (+ dW when the head trains) */
    f.backward = dense * (full ? 2.0 : 1.0) + 2.0 * lora + 2.0 * attn + lm * (full && train_emb ? 2.0 : 1.0);
    f.recompute = dense + lora + attn;
    return f;
}

int main(int argc, char **argv) {
    const char *mode_name = "lora", *model_name = "random768";
    int recompute = 0, rank = 8, batch_size = 4, seq_len = 256, threads = 1, warmup = 1, reps = 5, phases = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--phases")) {
            phases = 1;
            continue;
        }
        if (i + 1 >= argc) usage();
        if (!strcmp(a, "--mode")) mode_name = argv[++i];
        else if (!strcmp(a, "--recompute")) recompute = atoi(argv[++i]);
        else if (!strcmp(a, "--rank")) rank = atoi(argv[++i]);
        else if (!strcmp(a, "--batch")) batch_size = atoi(argv[++i]);
        else if (!strcmp(a, "--seq")) seq_len = atoi(argv[++i]);
        else if (!strcmp(a, "--threads")) threads = atoi(argv[++i]);
        else if (!strcmp(a, "--warmup")) warmup = atoi(argv[++i]);
        else if (!strcmp(a, "--reps")) reps = atoi(argv[++i]);
        else if (!strcmp(a, "--model")) model_name = argv[++i];
        else usage();
    }
    int full = !strcmp(mode_name, "full");
    if (!full && strcmp(mode_name, "lora")) usage();
    if (reps < 1 || warmup < 0 || batch_size < 1 || seq_len < 2) usage();

    int rc = perl_set_num_threads(threads);
    if (rc) bench_die("perl_set_num_threads", rc);
    double t_setup = now_s();
    perl_model *model = NULL;
    if (!strcmp(model_name, "random768")) {
        perl_model_config cfg;
        perl_model_config_init(&cfg);
        cfg.dim = 768;
        cfg.hidden_dim = 2048;
        cfg.n_layers = 12;
        cfg.n_heads = 12;
        cfg.n_kv_heads = 4;
        cfg.vocab_size = 32000;
        cfg.max_seq_len = seq_len > 256 ? seq_len : 256;
        cfg.tied_embeddings = 0;
        if ((rc = perl_model_create_random(&model, &cfg, 1234))) bench_die("perl_model_create_random", rc);
    } else if (!strcmp(model_name, "stories260K")) {
        const char *dir = getenv("PERL_SHARED_DIR");
        char path[4096];
        snprintf(path, sizeof path, "%s/models/stories260K.bin", dir && *dir ? dir : "../shared");
        if ((rc = perl_model_load(&model, path))) bench_die("perl_model_load", rc);
    } else {
        usage();
    }
    perl_model_config cfg;
    perl_model_config_init(&cfg);
    if ((rc = perl_model_get_config(model, &cfg))) bench_die("perl_model_get_config", rc);

    perl_lora_options opts;
    perl_lora_options_init(&opts);
    opts.mode = full ? LIBPERL_MODE_FULL : LIBPERL_MODE_LORA;
    opts.rank = rank;
    opts.alpha = 2.0f * rank;
    opts.train_embeddings = full ? 1 : 0;
    perl_lora *lora = NULL;
    if ((rc = perl_lora_create(&lora, model, &opts))) bench_die("perl_lora_create", rc);
    if ((rc = perl_lora_set_recompute(lora, recompute))) bench_die("perl_lora_set_recompute", rc);
    perl_optim_options optim;
    perl_optim_options_init(&optim);
    if ((rc = perl_lora_set_optimizer(lora, &optim))) bench_die("perl_lora_set_optimizer", rc);
    double setup_s = now_s() - t_setup;

    size_t n_tok = (size_t)batch_size * seq_len;
    int32_t *tokens = malloc(n_tok * sizeof *tokens);
    if (!tokens) bench_die("malloc", LIBPERL_ERR_OUT_OF_MEMORY);
    uint64_t s = 0x9E3779B97F4A7C15ull;
    for (size_t i = 0; i < n_tok; i++) {
        s ^= s << 13, s ^= s >> 7, s ^= s << 17; /* xorshift64 */
        tokens[i] = (int32_t)(s % (uint64_t)cfg.vocab_size);
    }
    perl_batch batch;
    perl_batch_init(&batch);
    batch.batch_size = batch_size;
    batch.seq_len = seq_len;
    batch.tokens = tokens;

    perl_step_stats st;
    perl_step_stats_init(&st);
    double *times = malloc((size_t)reps * sizeof *times);
    float first_loss = 0.0f;
    double load_before = loadavg1(), cpu_timed = 0.0, wall_timed = 0.0, busy_timed = 0.0;
    for (int i = 0; i < warmup + reps; i++) {
        double b0 = machine_busy_s(), c0 = cpu_s(), t0 = now_s();
        if ((rc = perl_lora_sft_step(lora, &batch, NULL, &st))) bench_die("perl_lora_sft_step", rc);
        double t1 = now_s(), c1 = cpu_s(), b1 = machine_busy_s();
        if (i == 0) first_loss = st.loss;
        if (i >= warmup) {
            times[i - warmup] = t1 - t0;
            cpu_timed += c1 - c0;
            wall_timed += t1 - t0;
            busy_timed += b1 - b0;
        }
    }
    /* cores used by other processes while this one was timed: the machine is shared */
    double other_cpu = (busy_timed - cpu_timed) / wall_timed;
    if (other_cpu < 0.0) other_cpu = 0.0;
    double peak_step = peak_rss_mb();
    double med = median(times, reps), min_s = times[0];
    for (int i = 1; i < reps; i++)
        if (times[i] < min_s) min_s = times[i];

    step_flops f = count_flops(&cfg, full, opts.train_embeddings, rank, opts.target_modules, batch_size, seq_len);
    double model_flops = f.forward + f.backward;
    double hw_flops = model_flops + (recompute ? f.recompute : 0.0);
    double n_targets = (double)batch_size * (seq_len - 1);

    printf("{\"bench\": \"sft_step\", \"impl\": \"libperl\", \"name\": \"sft_%s%s\", \"model\": \"%s\", "
           "\"mode\": \"%s\", \"recompute\": %d, \"batch\": %d, \"seq_len\": %d, \"threads\": %d, "
           "\"shape\": {\"dim\": %d, \"hidden_dim\": %d, \"n_layers\": %d, \"n_heads\": %d, \"n_kv_heads\": %d, "
           "\"vocab_size\": %d, \"params\": %zu}, \"trainable_params\": %zu, "
           "\"warmup\": %d, \"reps\": %d, \"median_s\": %.6f, \"min_s\": %.6f, \"tokens_per_s\": %.1f, "
           "\"flops\": %.4e, \"hw_flops\": %.4e, \"forward_flops\": %.4e, \"gflops_per_s\": %.2f, "
           "\"peak_rss_mb\": %.1f, \"setup_s\": %.2f, \"cpu_util\": %.3f, \"other_cpu\": %.3f, \"online_cpus\": %ld, "
           "\"loadavg_before\": %.2f, "
           "\"first_loss\": %.5f, \"last_loss\": %.5f, "
           "\"config\": {\"api\": \"perl_lora_sft_step\", \"lora\": \"r=%d alpha=%g targets=0x%x dropout=%g\", "
           "\"train_embeddings\": %d, \"optimizer\": \"AdamW lr=%g betas=(%g,%g) eps=%g wd=%g clip=%g\", "
           "\"loss_mask\": \"NULL (all %d next tokens)\", \"dtype\": \"f32\", \"tied_embeddings\": %d, "
           "\"version\": \"%s\"}}\n",
           mode_name, recompute ? "_recompute" : "", model_name, mode_name, recompute, batch_size, seq_len, threads,
           cfg.dim, cfg.hidden_dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.vocab_size,
           perl_model_num_params(model), perl_lora_num_params(lora), warmup, reps, med, min_s,
           (double)n_tok / med, model_flops, hw_flops, f.forward, model_flops / med * 1e-9, peak_step, setup_s,
           cpu_timed / (wall_timed * threads), other_cpu, sysconf(_SC_NPROCESSORS_ONLN), load_before, first_loss, st.loss, rank, opts.alpha,
           opts.target_modules, opts.dropout, opts.train_embeddings, optim.lr, optim.beta1, optim.beta2, optim.eps,
           optim.weight_decay, optim.max_grad_norm, (int)n_targets, cfg.tied_embeddings, perl_version());
    fflush(stdout);

    if (phases) {
        enum { ZERO, BACKWARD, OPTIM, FWD_HIDDEN, FWD_LOGPROBS, N_PHASES };
        const char *names[N_PHASES] = {"zero_grad", "sft_backward", "optimizer_step", "forward_hidden",
                                       "token_logprobs"};
        double *pt[N_PHASES];
        float *hidden = malloc(n_tok * (size_t)cfg.dim * sizeof(float));
        float *logp = malloc(n_tok * sizeof(float));
        for (int p = 0; p < N_PHASES; p++) pt[p] = malloc((size_t)reps * sizeof(double));
        int phase_reps = reps < 3 ? reps : 3;
        for (int i = 0; i < phase_reps; i++) { /* the step loop above was the warm-up */
            double t[N_PHASES + 1];
            t[0] = now_s();
            if ((rc = perl_lora_zero_grad(lora))) bench_die("perl_lora_zero_grad", rc);
            t[1] = now_s();
            if ((rc = perl_lora_sft_backward(lora, &batch, NULL, &st))) bench_die("perl_lora_sft_backward", rc);
            t[2] = now_s();
            if ((rc = perl_lora_optimizer_step(lora, &st))) bench_die("perl_lora_optimizer_step", rc);
            t[3] = now_s();
            if ((rc = perl_model_forward(model, lora, &batch, NULL, hidden))) bench_die("perl_model_forward", rc);
            t[4] = now_s();
            if ((rc = perl_model_token_logprobs(model, lora, &batch, logp))) bench_die("perl_model_token_logprobs", rc);
            t[5] = now_s();
            for (int p = 0; p < N_PHASES; p++) pt[p][i] = t[p + 1] - t[p];
        }
        printf("{\"bench\": \"sft_phases\", \"impl\": \"libperl\", \"name\": \"sft_%s%s\", \"model\": \"%s\", "
               "\"mode\": \"%s\", \"recompute\": %d, \"batch\": %d, \"seq_len\": %d, \"threads\": %d, \"reps\": %d, "
               "\"step_median_s\": %.6f",
               mode_name, recompute ? "_recompute" : "", model_name, mode_name, recompute, batch_size, seq_len,
               threads, phase_reps, med);
        for (int p = 0; p < N_PHASES; p++) printf(", \"%s_s\": %.6f", names[p], median(pt[p], phase_reps));
        printf(", \"forward_flops\": %.4e, \"backward_flops\": %.4e, \"lm_head_fwd_flops\": %.4e, "
               "\"peak_rss_mb\": %.1f}\n",
               f.forward, f.backward + (recompute ? f.recompute : 0.0), f.lm_head_fwd, peak_rss_mb());
        for (int p = 0; p < N_PHASES; p++) free(pt[p]);
        free(hidden);
        free(logp);
    }
    free(times);
    free(tokens);
    perl_lora_free(lora);
    perl_model_free(model);
    return 0;
}
