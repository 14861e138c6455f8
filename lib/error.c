/* Status strings and the per-thread last-error message. */
#include "internal.h"

#include <stdio.h>

static _Thread_local char last_error[512];

const char *perl_status_str(int status) {
    switch (status) {
    case LIBPERL_OK: return "ok";
    case LIBPERL_ERR_INVALID_ARGUMENT: return "invalid argument";
    case LIBPERL_ERR_OUT_OF_MEMORY: return "out of memory";
    case LIBPERL_ERR_IO: return "input/output error";
    case LIBPERL_ERR_FORMAT: return "malformed or corrupt file";
    case LIBPERL_ERR_UNSUPPORTED: return "unsupported feature";
    case LIBPERL_ERR_SHAPE: return "shape or configuration mismatch";
    case LIBPERL_ERR_RANGE: return "value out of range";
    case LIBPERL_ERR_NUMERIC: return "non-finite value (NaN or Inf)";
    case LIBPERL_ERR_STATE: return "invalid state for this call";
    case LIBPERL_ERR_CALLBACK: return "host callback failed";
    case LIBPERL_ERR_INTERNAL: return "internal error";
    default: return "unknown status";
    }
}

const char *perl_last_error(void) { return last_error; }

void perl_clear_error(void) { last_error[0] = '\0'; }

int perl_fail(int status, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error, sizeof last_error, fmt, ap);
    va_end(ap);
    return status;
}
