// What CAPS's channel layout costs by itself, without the library: a model of one 64-byte round
// trip of layout 3 between two processes, in plain C, to set beside `patchbay bench`'s pure-spin
// floor. docs/BENCHMARKS.md ("Where the remaining nanoseconds go") explains what it showed.
//
//   cc -O2 -o /tmp/caps-floor-model scripts/caps-floor-model.c
//   /tmp/caps-floor-model 0     # the floor: one word each way, as the bench's pure-spin row
//   /tmp/caps-floor-model 1     # 128-byte ring entries, 64-byte payload inline, nothing else
//   /tmp/caps-floor-model 255   # and every other element of the protocol (the bits below)
//
// Element bits: 2 the client's port lock (a compare-and-swap and an exchange per call), 4 the
// client's fence and sleepers load after moving its reply head, 8 the service polling the reply
// head while it spins and taking its lock for the DISPOSE, 16 the client storing its reply head,
// 32 the service's fence and sleepers load after its reply, 64 the service's claim
// compare-and-swap, 128 the client's fence and sleepers load after its request. Bit 1 alone
// selects the ring; 0 is the floor. The two processes are not pinned:
// run it several times, the vCPUs' placement moves the figures (compare within one run only).
// Medians and p90 of 200,000 round trips after 10,000 of warm-up, timed with clock_gettime, as
// the bench does.
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

enum { rounds = 200000, warmup = 10000, capacity = 1024, entry_size = 128, payload = 64 };

static unsigned elements;

static uint64_t now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static void lock(uint32_t *word) {
    uint32_t expected = 0;
    if (elements & 2) __atomic_compare_exchange_n(word, &expected, 1, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED);
}

static void unlock(uint32_t *word) {
    if (elements & 2) __atomic_exchange_n(word, 0, __ATOMIC_RELEASE);
}

static char *slot(char *ring, uint64_t position) { return ring + (position & (capacity - 1)) * entry_size; }

/// The producer's side of layout 3: payload at 40, id and length, the stamp stored last.
static void push(char *ring, uint64_t position, const char *bytes) {
    char *entry = slot(ring, position);
    memcpy(entry + 40, bytes, payload);
    memcpy(entry + 8, &position, sizeof position);
    uint32_t length = payload;
    memcpy(entry + 24, &length, sizeof length);
    __atomic_store_n((uint64_t *)entry, position + 1, __ATOMIC_RELEASE);
}

static int arrived(char *ring, uint64_t position) {
    return __atomic_load_n((uint64_t *)slot(ring, position), __ATOMIC_ACQUIRE) == position + 1;
}

static int compare(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv) {
    elements = argc > 1 ? (unsigned)strtoul(argv[1], NULL, 0) : 255;
    char *base = mmap(NULL, 1 << 20, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) return 1;
    volatile uint32_t *ping = (void *)base, *pong = (void *)(base + 64);
    volatile uint64_t *reply_head = (void *)(base + 256);
    volatile uint32_t *sleepers = (void *)(base + 512);
    uint64_t *claims = (void *)(base + 2048);
    char *requests = base + 4096, *replies = requests + capacity * entry_size;
    char bytes[payload];
    memset(bytes, 1, sizeof bytes);
    pid_t service = fork();
    if (service == 0) {
        uint32_t port = 0;
        uint64_t seen = 0;
        for (uint64_t p = 0; p < rounds + warmup; p++) {
            if (elements == 0) {
                while (*ping != (uint32_t)(p + 1)) __builtin_ia32_pause();
                *pong = (uint32_t)(p + 1);
                continue;
            }
            while (!arrived(requests, p)) {
                if ((elements & 8) && *reply_head != seen) {  // a DISPOSE to make
                    seen = *reply_head;
                    lock(&port);
                    unlock(&port);
                }
                __builtin_ia32_pause();
            }
            lock(&port);
            if (elements & 64) {
                uint64_t current = claims[p & 7];
                __atomic_compare_exchange_n(&claims[p & 7], &current, p, 0, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED);
            }
            char copy[payload];
            memcpy(copy, slot(requests, p) + 40, payload);
            push(replies, p, copy);
            if (elements & 32) {
                __atomic_thread_fence(__ATOMIC_SEQ_CST);
                (void)*sleepers;
            }
            unlock(&port);
        }
        _exit(0);
    }
    static uint64_t samples[rounds];
    uint32_t port = 0;
    for (uint64_t p = 0; p < rounds + warmup; p++) {
        uint64_t start = now();
        if (elements == 0) {
            *ping = (uint32_t)(p + 1);
            while (*pong != (uint32_t)(p + 1)) __builtin_ia32_pause();
        } else {
            lock(&port);
            push(requests, p, bytes);
            if (elements & 128) {
                __atomic_thread_fence(__ATOMIC_SEQ_CST);
                (void)*sleepers;
            }
            unlock(&port);
            while (!arrived(replies, p)) __builtin_ia32_pause();
            lock(&port);
            memcpy(bytes, slot(replies, p) + 40, payload);
            if (elements & 16) *reply_head = p + 1;
            if (elements & 4) {
                __atomic_thread_fence(__ATOMIC_SEQ_CST);
                (void)*sleepers;
            }
            unlock(&port);
        }
        if (p >= warmup) samples[p - warmup] = now() - start;
    }
    waitpid(service, NULL, 0);
    qsort(samples, rounds, sizeof samples[0], compare);
    printf("elements %3u: median %llu ns, p90 %llu ns\n", elements, (unsigned long long)samples[rounds / 2],
           (unsigned long long)samples[rounds * 9 / 10]);
    return 0;
}
