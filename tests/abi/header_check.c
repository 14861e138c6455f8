/*
 * `make check-header`: the public header compiled alone, pedantic, as C99,
 * C11 and C++11 (libgit2's tests/headertest).  Nothing but the header may be
 * included here: a header that needs a prior include fails this check.
 */
#include <libperl/libperl.h>
#include <libperl/libperl.h> /* twice: the include guard must hold */

#ifdef __cplusplus
extern "C" {
#endif

int libperl_header_check(void);

int libperl_header_check(void)
{
    perl_model_config config;
    perl_lora_options lora_options;
    perl_optim_options optim_options;
    perl_batch batch;
    perl_step_stats stats;
    perl_status status = LIBPERL_OK;
    perl_grad_hook hook = 0;
    const perl_model *model = 0;
    const perl_lora *lora = 0;

    (void)config;
    (void)lora_options;
    (void)optim_options;
    (void)batch;
    (void)stats;
    (void)hook;
    (void)model;
    (void)lora;
    return (int)status + (int)LIBPERL_VERSION_NUMBER + (int)sizeof(LIBPERL_VERSION_STRING) +
           (int)LIBPERL_TARGET_ALL;
}

#ifdef __cplusplus
}
#endif
