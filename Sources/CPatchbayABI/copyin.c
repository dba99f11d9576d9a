// Reading a C caller's string the way a kernel copies in a path: a pointer that does not point at
// readable memory is EFAULT, never a crash of the caller (FreeBSD's shm_open(2) and its test suite
// say so). process_vm_readv on this very process reads through the kernel, which reports a fault
// instead of taking it.

#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>
#include "patchbay_private.h"

int pb__probe_string(const void *pointer, unsigned long limit) {
    char buffer[4096];
    if (limit > INT_MAX) limit = INT_MAX;
    unsigned long seen = 0;
    while (seen < limit) {
        unsigned long want = limit - seen < sizeof buffer ? limit - seen : sizeof buffer;
        struct iovec here = { buffer, want };
        struct iovec there = { (char *)pointer + seen, want };
        // Bytes up to the first page that cannot be read (a partial read), or EFAULT for none.
        ssize_t got = process_vm_readv(getpid(), &here, 1, &there, 1, 0);
        if (got < 0) return errno == EFAULT ? -EFAULT : -ENOSYS;
        const char *end = memchr(buffer, 0, (size_t)got);
        if (end != NULL) return (int)(seen + (unsigned long)(end - buffer));
        if ((unsigned long)got < want) return -EFAULT;
        seen += want;
    }
    return -ENAMETOOLONG;
}
