/* Private to libpatchbay (not installed): how the Swift side sets pb_last_reason's sentence. */
#ifndef PATCHBAY_PRIVATE_H
#define PATCHBAY_PRIVATE_H
void pb__set_reason(const char *text);
#endif
