// The calling thread's last failure sentence (pb_last_reason), kept in C: a thread-local buffer
// the Swift side writes through pb__set_reason.
#include <string.h>
#include "patchbay.h"

static __thread char reason[512];

const char *pb_last_reason(void) {
    return reason;
}

// Private to the library (not in patchbay.h): the Swift side's way to set the sentence.
void pb__set_reason(const char *text) {
    size_t length = strlen(text);
    if (length >= sizeof reason) length = sizeof reason - 1;
    memcpy(reason, text, length);
    reason[length] = '\0';
}
