/*
 * An installed-library consumer, built by `make check-install` with nothing
 * but `pkg-config --cflags --libs libperl`: prints the version, then creates
 * and frees a small random model.  Exit status 0 on success.
 */
#include <libperl/libperl.h>

#include <stdio.h>

int main(void)
{
    perl_model_config config;
    perl_model *model = NULL;
    int rc;

    printf("libperl %s (header %s)\n", perl_version(), LIBPERL_VERSION_STRING);
    if (perl_version_number() != (unsigned)LIBPERL_VERSION_NUMBER) {
        fprintf(stderr, "consumer: library version %u, header %d\n", perl_version_number(),
                LIBPERL_VERSION_NUMBER);
        return 1;
    }

    perl_model_config_init(&config);
    rc = perl_model_create_random(&model, &config, 42);
    if (rc != LIBPERL_OK || model == NULL) {
        fprintf(stderr, "consumer: perl_model_create_random: %s: %s\n", perl_status_str(rc),
                perl_last_error());
        return 1;
    }
    printf("random model: %zu parameters\n", perl_model_num_params(model));
    perl_model_free(model);
    perl_model_free(NULL); /* free accepts NULL */
    return 0;
}
