// The C++ twin of consumer.c: the installed header and library used from
// C++11, built with nothing but `pkg-config --cflags --libs libperl`.
#include <libperl/libperl.h>

#include <cstdio>

int main()
{
    perl_model_config config;
    perl_model *model = nullptr;

    std::printf("libperl %s (header %s, C++)\n", perl_version(), LIBPERL_VERSION_STRING);
    if (perl_version_number() != static_cast<unsigned>(LIBPERL_VERSION_NUMBER)) {
        std::fprintf(stderr, "consumer.cpp: library version %u, header %d\n",
                     perl_version_number(), LIBPERL_VERSION_NUMBER);
        return 1;
    }

    perl_model_config_init(&config);
    int rc = perl_model_create_random(&model, &config, 42);
    if (rc != LIBPERL_OK || model == nullptr) {
        std::fprintf(stderr, "consumer.cpp: perl_model_create_random: %s: %s\n",
                     perl_status_str(rc), perl_last_error());
        return 1;
    }
    std::printf("random model: %zu parameters\n", perl_model_num_params(model));
    perl_model_free(model);
    return 0;
}
