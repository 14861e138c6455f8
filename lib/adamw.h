/* AdamW (decoupled weight decay, bias correction), as torch.optim.AdamW. */
#ifndef LIBPERL_ADAMW_H
#define LIBPERL_ADAMW_H

#include "internal.h"

/* One update of n parameters; step is 1-based (the step being taken). */
void adamw_update(float *params, const float *grads, float *m, float *v, size_t n, float lr, float beta1,
                  float beta2, float eps, float weight_decay, int64_t step);

/* Global L2 norm of g[n], accumulated in double in a fixed order. */
double grad_global_norm(const float *g, size_t n);

/* Learning rate at 0-based step `step` for a schedule. */
float lr_schedule(const perl_optim_options *o, int64_t step);

#endif /* LIBPERL_ADAMW_H */
