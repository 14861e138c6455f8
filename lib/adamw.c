/* AdamW over one flat parameter block, parallel in fixed chunks. */
#include "adamw.h"

#include <math.h>

typedef struct adamw_ctx {
    float *params, *m, *v;
    const float *grads;
    float lr, beta1, beta2, eps, decay, step_size, inv_sqrt_bc2;
} adamw_ctx;

static void adamw_range(void *p, int64_t begin, int64_t end) {
    adamw_ctx *c = p;
    for (int64_t i = begin; i < end; i++) {
        float g = c->grads[i];
        c->params[i] *= c->decay;
        c->m[i] = c->beta1 * c->m[i] + (1.0f - c->beta1) * g;
        c->v[i] = c->beta2 * c->v[i] + (1.0f - c->beta2) * g * g;
        float denom = sqrtf(c->v[i]) * c->inv_sqrt_bc2 + c->eps;
        c->params[i] -= c->step_size * c->m[i] / denom;
    }
}

void adamw_update(float *params, const float *grads, float *m, float *v, size_t n, float lr, float beta1,
                  float beta2, float eps, float weight_decay, int64_t step) {
    double bc1 = 1.0 - pow(beta1, (double)step), bc2 = 1.0 - pow(beta2, (double)step);
    adamw_ctx c = {.params = params, .m = m, .v = v, .grads = grads, .lr = lr, .beta1 = beta1, .beta2 = beta2,
                   .eps = eps, .decay = 1.0f - lr * weight_decay, .step_size = (float)(lr / bc1),
                   .inv_sqrt_bc2 = (float)(1.0 / sqrt(bc2))};
    perl_parallel_for((int64_t)n, 1 << 16, adamw_range, &c);
}

double grad_global_norm(const float *g, size_t n) {
    /* eight independent partial sums so the loop vectorises; fixed order */
    double lane[8] = {0};
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; k++) lane[k] += (double)g[i + k] * g[i + k];
    double total = 0.0;
    for (; i < n; i++) total += (double)g[i] * g[i];
    for (int k = 0; k < 8; k++) total += lane[k];
    return sqrt(total);
}

float lr_schedule(const perl_optim_options *o, int64_t step) {
    if (o->warmup_steps > 0 && step < o->warmup_steps)
        return o->lr * (float)(step + 1) / (float)o->warmup_steps;
    if (o->schedule == LIBPERL_LR_CONSTANT || o->total_steps <= o->warmup_steps) return o->lr;
    double progress = (double)(step - o->warmup_steps) / (double)(o->total_steps - o->warmup_steps);
    if (progress > 1.0) progress = 1.0;
    double shape = o->schedule == LIBPERL_LR_LINEAR ? 1.0 - progress : 0.5 * (1.0 + cos(3.141592653589793 * progress));
    return (float)(o->lr * (o->min_lr_ratio + (1.0 - o->min_lr_ratio) * shape));
}
