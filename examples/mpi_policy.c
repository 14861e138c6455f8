/*
 * mpi_policy — data-parallel RL across MPI ranks with libperl.
 *
 *   make mpi                                   (needs mpicc: apt-get install openmpi-bin libopenmpi-dev)
 *   mpirun -np 4 build/examples/mpi_policy --steps 10 --out build/mpi_policy
 *
 * Every rank holds the whole (small) model and a replica of the policy
 * adapter, and works on its own share of each global batch:
 *
 *   1. every rank builds the same random base model (same seed) — a real run
 *      would perl_model_load the same checkpoint — and a policy adapter;
 *   2. rank 0's adapter parameters are broadcast (perl_lora_params gives the
 *      one contiguous block), so all replicas start identical;
 *   3. each step, each rank samples responses to its own prompts
 *      (perl_generate), scores them with the reward model (perl_reward_score)
 *      and calls perl_policy_step on its rows;
 *   4. inside the step, the gradient hook (perl_lora_set_grad_hook) runs
 *      between backward and AdamW: it all-reduces the flat gradient
 *      (MPI_Allreduce SUM, then divides by the number of ranks), so every
 *      rank applies the same clipped AdamW update to the same parameters;
 *   5. rank 0 saves the checkpoint (perl_policy_save).
 *
 * Why the mean of the ranks' gradients is the full-batch gradient: the
 * trainer uses RLOO with whole groups on each rank (baselines never look
 * across ranks) and LIBPERL_NORM_SEQUENCE (loss = mean over sequences of the
 * per-sequence token mean), and every rank has the same number of sequences,
 * so mean_r(mean over rank r's sequences) = mean over all sequences.  With
 * LIBPERL_NORM_TOKEN the ranks would need equal response-token counts.
 * Batch-global statistics are avoided: no advantage whitening, no adaptive
 * KL coefficient, no REINFORCE moving baseline (each would be computed from
 * the local batch only).  docs/distributed.md explains this in full.
 *
 * --emulate-ranks K runs in one process over the same global batch (K
 * chunks of prompts sampled with the per-rank seeds, one perl_policy_step on
 * all of them): tests/test_mpi.sh checks that its checkpoint equals the one
 * of `mpirun -np K` to float tolerance (--compare DIR_A DIR_B).
 */
#define _POSIX_C_SOURCE 200809L

#include <libperl/libperl.h>
#include <mpi.h>

#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define VOCAB 64
#define MAX_PROMPT 6

typedef struct options {
    int steps, prompts_per_rank, group, max_new_tokens, emulate_ranks, threads;
    uint64_t seed;
    float lr, adam_eps, clip;
    const char *out, *reward_dir, *compare_a, *compare_b;
    double tol;
} options;

static int rank_id, n_ranks = 1;

#define LOG0(...)                                 \
    do {                                          \
        if (rank_id == 0) {                       \
            printf(__VA_ARGS__);                  \
            fflush(stdout);                       \
        }                                         \
    } while (0)

static int fail(const char *what, int rc)
{
    fprintf(stderr, "mpi_policy[rank %d]: %s: %s: %s\n", rank_id, what, perl_status_str(rc), perl_last_error());
    /* The other ranks may be waiting in a collective call: end them all. */
    if (n_ranks > 1) MPI_Abort(MPI_COMM_WORLD, 1);
    return 1;
}

/* ---- the gradient hook: the whole data-parallel part ---------------------- */

typedef struct allreduce_ctx {
    MPI_Comm comm;
    int size;
    unsigned long long bytes; /* all-reduced by this rank since the last reset */
} allreduce_ctx;

/* grads += other ranks' grads, then /= size: every rank ends with the mean. */
static int allreduce_mean(float *grads, size_t count, void *user)
{
    allreduce_ctx *ctx = user;
    size_t done = 0;
    while (done < count) { /* MPI counts are int: large adapters go in chunks */
        int n = count - done > (size_t)INT_MAX ? INT_MAX : (int)(count - done);
        if (MPI_Allreduce(MPI_IN_PLACE, grads + done, n, MPI_FLOAT, MPI_SUM, ctx->comm) != MPI_SUCCESS)
            return 1; /* libperl aborts the step with LIBPERL_ERR_CALLBACK, parameters unchanged */
        done += (size_t)n;
    }
    const float inv = 1.0f / (float)ctx->size;
    for (size_t i = 0; i < count; i++) grads[i] *= inv;
    ctx->bytes += (unsigned long long)count * sizeof(float);
    return 0;
}

/* ---- data: prompts are a function of (seed, step, global prompt index) ---- */

static uint64_t mix(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

/* Fills `rows` prompt rows for the prompts [first, first + n) of a step, each
 * repeated `group` times (an RLOO group). */
static void make_prompts(const options *o, int step, int first, int n, int32_t *tokens, int32_t *lengths)
{
    for (int p = 0; p < n; p++) {
        const uint64_t h0 = mix(o->seed ^ mix((uint64_t)step * 1000003u + (uint64_t)(first + p)));
        const int len = 2 + (int)(h0 % (MAX_PROMPT - 1));
        for (int g = 0; g < o->group; g++) { /* the same prompt for every member of the group */
            const int row = p * o->group + g;
            uint64_t h = h0;
            lengths[row] = len;
            for (int t = 0; t < MAX_PROMPT; t++) {
                h = mix(h);
                tokens[row * MAX_PROMPT + t] = t == 0 ? 1 : (t < len ? 3 + (int32_t)(h % (VOCAB - 3)) : 0);
            }
        }
    }
}

/* ---- setup shared by every mode ------------------------------------------- */

typedef struct world {
    perl_model *model;
    perl_lora *policy, *rm_lora;
    perl_reward *reward;
    perl_policy_trainer *trainer;
} world;

static void world_free(world *w)
{
    perl_policy_free(w->trainer);
    perl_reward_free(w->reward);
    perl_lora_free(w->rm_lora);
    perl_lora_free(w->policy);
    perl_model_free(w->model);
    memset(w, 0, sizeof *w);
}

static int model_create(const options *o, perl_model **out)
{
    perl_model_config cfg;
    perl_model_config_init(&cfg);
    cfg.dim = 64;
    cfg.hidden_dim = 128;
    cfg.n_layers = 2;
    cfg.n_heads = 4;
    cfg.n_kv_heads = 2;
    cfg.vocab_size = VOCAB;
    cfg.max_seq_len = 64;
    int rc = perl_model_create_random(out, &cfg, o->seed); /* the same seed on every rank */
    return rc ? fail("perl_model_create_random", rc) : 0;
}

static int world_create(const options *o, world *w, uint64_t adapter_seed)
{
    int rc;
    memset(w, 0, sizeof *w);
    if (model_create(o, &w->model)) return 1;

    perl_lora_options lo;
    perl_lora_options_init(&lo);
    lo.rank = 4;
    lo.alpha = 8.0f;
    lo.target_modules = LIBPERL_TARGET_ATTENTION;
    lo.seed = adapter_seed;
    if ((rc = perl_lora_create(&w->policy, w->model, &lo))) return fail("perl_lora_create", rc);
    perl_optim_options oo;
    perl_optim_options_init(&oo);
    oo.lr = o->lr;
    oo.eps = o->adam_eps;
    oo.max_grad_norm = o->clip;
    if ((rc = perl_lora_set_optimizer(w->policy, &oo))) return fail("perl_lora_set_optimizer", rc);

    /* The reward model: a trained one from --reward DIR, else a random LoRA +
     * head (the same on every rank: fixed seeds). */
    perl_reward_options ro;
    perl_reward_options_init(&ro);
    ro.seed = 7;
    if (o->reward_dir) {
        if ((rc = perl_reward_load(&w->reward, &w->rm_lora, w->model, o->reward_dir, &ro)))
            return fail("perl_reward_load", rc);
    } else {
        perl_lora_options rl;
        perl_lora_options_init(&rl);
        rl.rank = 4;
        rl.seed = 99;
        rl.init = LIBPERL_LORA_INIT_GAUSSIAN;
        if ((rc = perl_lora_create(&w->rm_lora, w->model, &rl))) return fail("perl_lora_create (reward)", rc);
        if ((rc = perl_reward_create(&w->reward, w->model, w->rm_lora, &ro))) return fail("perl_reward_create", rc);
    }

    perl_policy_options po;
    perl_policy_options_init(&po);
    po.algorithm = LIBPERL_PG_RLOO;        /* leave-one-out baselines inside each group */
    po.group_size = o->group;              /* groups never straddle ranks */
    po.loss_norm = LIBPERL_NORM_SEQUENCE;  /* per-sequence means: rank means average exactly */
    po.kl_coef = 0.05f;
    po.kl_target = 0.0f;                   /* a fixed KL coefficient (adaptive = batch-global) */
    po.whiten_advantages = 0;              /* batch-global statistics stay off */
    if ((rc = perl_policy_create(&w->trainer, w->model, w->policy, NULL, &po))) return fail("perl_policy_create", rc);
    return 0;
}

/* Samples and scores one chunk of rows (one rank's share): responses, their
 * lengths and rewards go to the given offsets of the step's arrays. */
static int sample_and_score(const options *o, world *w, int step, int chunk, int32_t *prompt_tokens,
                            int32_t *prompt_lengths, int32_t *responses, int32_t *response_lengths, float *rewards)
{
    const int rows = o->prompts_per_rank * o->group, m = o->max_new_tokens;
    make_prompts(o, step, chunk * o->prompts_per_rank, o->prompts_per_rank, prompt_tokens, prompt_lengths);

    perl_batch prompts;
    perl_batch_init(&prompts);
    prompts.batch_size = rows;
    prompts.seq_len = MAX_PROMPT;
    prompts.tokens = prompt_tokens;
    prompts.lengths = prompt_lengths;
    perl_generate_options go;
    perl_generate_options_init(&go);
    go.max_new_tokens = m;
    go.temperature = 1.0f;
    go.seed = o->seed * 7919u + (uint64_t)step * 1000u + (uint64_t)chunk; /* per rank, per step */
    int rc = perl_generate(w->model, w->policy, &prompts, &go, responses, response_lengths, NULL);
    if (rc) return fail("perl_generate", rc);

    /* reward model input: prompt ++ response, right-padded */
    const int width = MAX_PROMPT + m;
    int32_t *full = calloc((size_t)rows * width, sizeof *full), *full_len = calloc((size_t)rows, sizeof *full_len);
    if (!full || !full_len) {
        free(full);
        free(full_len);
        fprintf(stderr, "mpi_policy: out of memory\n");
        return 1;
    }
    for (int r = 0; r < rows; r++) {
        int pl = prompt_lengths[r], rl = response_lengths[r];
        memcpy(full + (size_t)r * width, prompt_tokens + (size_t)r * MAX_PROMPT, (size_t)pl * sizeof *full);
        memcpy(full + (size_t)r * width + pl, responses + (size_t)r * m, (size_t)rl * sizeof *full);
        full_len[r] = pl + rl;
    }
    perl_batch scored;
    perl_batch_init(&scored);
    scored.batch_size = rows;
    scored.seq_len = width;
    scored.tokens = full;
    scored.lengths = full_len;
    rc = perl_reward_score(w->reward, &scored, rewards);
    free(full);
    free(full_len);
    return rc ? fail("perl_reward_score", rc) : 0;
}

/* ---- training: n_chunks chunks per process (1 under MPI, K when emulating) -- */

static int train(const options *o, int n_chunks, int first_chunk, allreduce_ctx *ctx)
{
    world w;
    const int rows_per_chunk = o->prompts_per_rank * o->group, m = o->max_new_tokens;
    const int rows = rows_per_chunk * n_chunks;
    int status = 1;
    /* Each rank's own adapter seed, to show that the broadcast makes them equal. */
    if (world_create(o, &w, 1000u + (uint64_t)rank_id)) goto out;

    float *params, *grads;
    size_t count;
    int rc = perl_lora_params(w.policy, &params, &grads, &count);
    if (rc) {
        fail("perl_lora_params", rc);
        goto out;
    }
    if (ctx) {
        if (count > (size_t)INT_MAX) {
            fprintf(stderr, "mpi_policy: adapter too large for one broadcast\n");
            goto out;
        }
        MPI_Bcast(params, (int)count, MPI_FLOAT, 0, MPI_COMM_WORLD); /* rank 0's initial weights everywhere */
        if ((rc = perl_lora_set_grad_hook(w.policy, allreduce_mean, ctx))) {
            fail("perl_lora_set_grad_hook", rc);
            goto out;
        }
    }
    LOG0("mpi_policy: %d rank(s) x %d chunk(s), %d rows per chunk (%d prompts x group %d), adapter %zu params\n",
         n_ranks, n_chunks, rows_per_chunk, o->prompts_per_rank, o->group, count);

    int32_t *pt = calloc((size_t)rows * MAX_PROMPT, sizeof *pt), *pl = calloc((size_t)rows, sizeof *pl);
    int32_t *resp = calloc((size_t)rows * m, sizeof *resp), *rl = calloc((size_t)rows, sizeof *rl);
    float *rewards = calloc((size_t)rows, sizeof *rewards);
    if (!pt || !pl || !resp || !rl || !rewards) {
        fprintf(stderr, "mpi_policy: out of memory\n");
        goto free_batch;
    }
    for (int step = 1; step <= o->steps; step++) {
        for (int c = 0; c < n_chunks; c++) {
            size_t r0 = (size_t)c * rows_per_chunk;
            if (sample_and_score(o, &w, step, first_chunk + c, pt + r0 * MAX_PROMPT, pl + r0, resp + r0 * m, rl + r0,
                                 rewards + r0))
                goto free_batch;
        }
        perl_batch prompts;
        perl_batch_init(&prompts);
        prompts.batch_size = rows;
        prompts.seq_len = MAX_PROMPT;
        prompts.tokens = pt;
        prompts.lengths = pl;
        perl_policy_stats st;
        perl_policy_stats_init(&st);
        if (ctx) ctx->bytes = 0;
        if ((rc = perl_policy_step(w.trainer, &prompts, resp, rl, m, rewards, NULL, &st))) {
            fail("perl_policy_step", rc);
            goto free_batch;
        }
        /* Statistics are per rank: average the interesting ones for the log. */
        double local[3] = {st.mean_reward, st.kl, st.loss}, global[3];
        if (ctx) MPI_Allreduce(local, global, 3, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
        else memcpy(global, local, sizeof local);
        double div = ctx ? (double)n_ranks : 1.0;
        LOG0("step %3d  reward %+.4f  kl %+.5f  loss %+.5f  grad norm %.4f  all-reduced %llu bytes/rank\n", step,
             global[0] / div, global[1] / div, global[2] / div, (double)st.grad_norm, ctx ? ctx->bytes : 0ull);
    }

    if (ctx) {
        /* Every replica must hold the same parameters: compare with rank 0's. */
        float *ref = malloc(count * sizeof *ref);
        if (!ref) goto free_batch;
        memcpy(ref, params, count * sizeof *ref);
        MPI_Bcast(ref, (int)count, MPI_FLOAT, 0, MPI_COMM_WORLD);
        double worst = 0.0, all;
        for (size_t i = 0; i < count; i++) worst = fmax(worst, fabs((double)ref[i] - (double)params[i]));
        free(ref);
        MPI_Allreduce(&worst, &all, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
        LOG0("replicas agree: max |param - rank 0 param| = %.3g\n", all);
        if (all != 0.0) {
            LOG0("mpi_policy: replicas diverged\n");
            goto free_batch;
        }
    }
    if (o->out && rank_id == 0) {
        if ((rc = perl_policy_save(w.trainer, o->out))) {
            fail("perl_policy_save", rc);
            goto free_batch;
        }
        printf("rank 0 saved the checkpoint to %s\n", o->out);
    }
    status = 0;
free_batch:
    free(pt);
    free(pl);
    free(resp);
    free(rl);
    free(rewards);
out:
    world_free(&w);
    return status;
}

/* ---- --compare: two checkpoints' policy adapters, element by element ------- */

static int compare(const options *o)
{
    perl_model *model = NULL;
    perl_lora *a = NULL, *b = NULL;
    char pa[4096], pb[4096];
    int status = 1, rc;
    snprintf(pa, sizeof pa, "%s/adapter", o->compare_a);
    snprintf(pb, sizeof pb, "%s/adapter", o->compare_b);
    if (model_create(o, &model)) return 1;
    if ((rc = perl_lora_load(&a, model, pa))) fail(pa, rc);
    else if ((rc = perl_lora_load(&b, model, pb))) fail(pb, rc);
    else {
        float *x, *y, *gx, *gy;
        size_t nx, ny;
        perl_lora_params(a, &x, &gx, &nx);
        perl_lora_params(b, &y, &gy, &ny);
        if (nx != ny) {
            fprintf(stderr, "mpi_policy --compare: %zu vs %zu parameters\n", nx, ny);
        } else {
            double worst = 0.0, scale = 0.0;
            size_t at = 0;
            for (size_t i = 0; i < nx; i++) {
                double d = fabs((double)x[i] - (double)y[i]);
                scale = fmax(scale, fabs((double)y[i]));
                if (d > worst) worst = d, at = i;
            }
            printf("compare: %zu parameters, max |a - b| = %.3g (at %zu), max |b| = %.3g, tolerance %.3g\n", nx,
                   worst, at, scale, o->tol);
            status = worst <= o->tol ? 0 : 1;
            if (status) printf("compare: FAIL: the checkpoints differ\n");
        }
    }
    perl_lora_free(a);
    perl_lora_free(b);
    perl_model_free(model);
    return status;
}

static void usage(FILE *f)
{
    fprintf(f,
            "usage: mpirun -np N mpi_policy [--steps N] [--prompts-per-rank P] [--group G] [--max-new-tokens M]\n"
            "                   [--lr LR] [--adam-eps E] [--clip C] [--seed S] [--threads T] [--reward DIR]\n"
            "                   [--out DIR]\n"
            "       mpi_policy --emulate-ranks K [same options]   one process, the global batch of K ranks\n"
            "       mpi_policy --compare DIR_A DIR_B [--tol T]    compare two checkpoints' adapters\n");
}

int main(int argc, char **argv)
{
    options o = {.steps = 3, .prompts_per_rank = 2, .group = 2, .max_new_tokens = 6, .emulate_ranks = 0,
                 .threads = 1, .seed = 1234, .lr = 1e-2f, .adam_eps = 1e-8f, .clip = 1.0f, .tol = 1e-5};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
#define ARG(name) (strcmp(a, name) == 0 && v && ++i)
        if (ARG("--steps")) o.steps = atoi(v);
        else if (ARG("--prompts-per-rank")) o.prompts_per_rank = atoi(v);
        else if (ARG("--group")) o.group = atoi(v);
        else if (ARG("--max-new-tokens")) o.max_new_tokens = atoi(v);
        else if (ARG("--emulate-ranks")) o.emulate_ranks = atoi(v);
        else if (ARG("--threads")) o.threads = atoi(v);
        else if (ARG("--seed")) o.seed = strtoull(v, NULL, 10);
        else if (ARG("--lr")) o.lr = strtof(v, NULL);
        else if (ARG("--adam-eps")) o.adam_eps = strtof(v, NULL);
        else if (ARG("--clip")) o.clip = strtof(v, NULL);
        else if (ARG("--tol")) o.tol = strtod(v, NULL);
        else if (ARG("--reward")) o.reward_dir = v;
        else if (ARG("--out")) o.out = v;
        else if (strcmp(a, "--compare") == 0 && i + 2 < argc) {
            o.compare_a = argv[++i];
            o.compare_b = argv[++i];
        } else if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            usage(stdout);
            return 0;
        } else {
            usage(stderr);
            return 2;
        }
#undef ARG
    }
    if (o.steps < 1 || o.prompts_per_rank < 1 || o.group < 2 || o.max_new_tokens < 1 || o.emulate_ranks < 0 ||
        o.max_new_tokens + MAX_PROMPT > 64) {
        fprintf(stderr, "mpi_policy: bad option value (group >= 2, prompt + response <= 64)\n");
        return 2;
    }
    perl_set_num_threads(o.threads); /* ranks share the host's cores */
    if (o.compare_a) return compare(&o);

    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank_id);
    MPI_Comm_size(MPI_COMM_WORLD, &n_ranks);
    int status;
    if (o.emulate_ranks > 0) {
        if (n_ranks != 1) {
            LOG0("mpi_policy: --emulate-ranks runs in a single process\n");
            status = 2;
        } else {
            status = train(&o, o.emulate_ranks, 0, NULL);
        }
    } else {
        allreduce_ctx ctx = {MPI_COMM_WORLD, n_ranks, 0};
        status = train(&o, 1, rank_id, &ctx);
        int any;
        MPI_Allreduce(&status, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
        status = any;
    }
    MPI_Finalize();
    return status;
}
