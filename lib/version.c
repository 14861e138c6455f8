/* Run-time version, so hosts can detect a header/library mismatch. */
#include "internal.h"

const char *perl_version(void) { return LIBPERL_VERSION_STRING; }

unsigned perl_version_number(void) { return LIBPERL_VERSION_NUMBER; }
