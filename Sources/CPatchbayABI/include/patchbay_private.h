/* Private to libpatchbay (not installed): how the Swift side sets pb_last_reason's sentence. */
#ifndef PATCHBAY_PRIVATE_H
#define PATCHBAY_PRIVATE_H
void pb__set_reason(const char *text);
/* Whether a caller's string can be read: its length when a NUL comes within `limit` bytes (at most
 * INT_MAX), read 4096 at a time, -ENAMETOOLONG when `limit` readable bytes hold none, -EFAULT when the memory cannot be read
 * before a NUL, -ENOSYS when this cannot be told (process_vm_readv refused). */
int pb__probe_string(const void *pointer, unsigned long limit);
#endif
