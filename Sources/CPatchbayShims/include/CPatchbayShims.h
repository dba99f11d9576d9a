// The few Linux facilities that Swift's Glibc module does not import.
//
// Everything GNU-only lives out of line in shims.c, which is compiled with _GNU_SOURCE; this header
// declares plain C functions with plain C types so that importing it never drags feature macros
// into Swift (which breaks the build with duplicate `fd_set`/`environ` definitions).
#ifndef CPATCHBAY_SHIMS_H
#define CPATCHBAY_SHIMS_H

#include <stdint.h>
#include <stddef.h>
#include <sys/types.h>
#include <pthread.h>

/// Kernel-reported credentials of a socket peer (`struct ucred`).
typedef struct {
    int32_t pid;
    uint32_t uid;
    uint32_t gid;
} pb_ucred;

// Each function returns -1 and leaves errno set on failure, like the syscall it wraps.

int pb_memfd_create(const char *name, unsigned int flags);
unsigned int pb_mfd_cloexec(void);
unsigned int pb_mfd_allow_sealing(void);

int pb_add_seals(int fd, unsigned int seals);
int pb_get_seals(int fd);
unsigned int pb_seal_seal(void);
unsigned int pb_seal_shrink(void);
unsigned int pb_seal_grow(void);
unsigned int pb_seal_write(void);
unsigned int pb_seal_future_write(void);

int pb_eventfd(unsigned int initval, int nonblock);

/// futex(FUTEX_WAIT) on a word that may be shared between processes (no FUTEX_PRIVATE_FLAG).
/// `timeout_ns` < 0 waits forever.
int pb_futex_wait(uint32_t *word, uint32_t expected, int64_t timeout_ns);
/// futex(FUTEX_WAKE); returns the number of waiters woken.
int pb_futex_wake(uint32_t *word, int count);

/// One word of a `pb_futex_waitv` (the kernel's `struct futex_waitv`): the value it must still
/// hold, its address, and `flags` 2 (`FUTEX_32`, shared between processes).
struct pb_futex_waiter {
    uint64_t expected;
    uint64_t address;
    uint32_t flags;
    uint32_t reserved;
};
/// futex_waitv(2) (Linux 5.16) on up to 128 words: sleeps until one of them is woken, and not at
/// all if one no longer holds its expected value (-1, EAGAIN). Returns the index of the word
/// woken; -1 with errno otherwise (ENOSYS: the kernel has no futex_waitv).
int pb_futex_waitv(struct pb_futex_waiter *waiters, unsigned int count);

int pb_accept4(int fd, int nonblock);
/// accept4(SOCK_CLOEXEC) on a listener that should be non-blocking but whose open file description
/// others hold: never waits longer than `timeout_us`. ETIMEDOUT when O_NONBLOCK was found cleared
/// (set again, nothing accepted) or the accept had to be interrupted; EAGAIN when none is pending.
int pb_accept_bounded(int fd, long timeout_us);

int pb_getrandom(void *buffer, size_t length);

int pb_peer_credentials(int fd, pb_ucred *out);
/// SO_PEERGROUPS: fills up to `capacity` gids; returns the total count the kernel reported
/// (which may exceed capacity), or -1.
int pb_peer_groups(int fd, uint32_t *groups, int capacity);

/// sendmsg(2) of one buffer with `fd_count` descriptors in an SCM_RIGHTS message, MSG_NOSIGNAL.
ssize_t pb_send_with_fds(int socket, const void *buffer, size_t length, const int *fds, int fd_count, int dontwait);

/// recvmsg(2) of one buffer with MSG_CMSG_CLOEXEC. Every descriptor that arrives is written to
/// `fds` (up to `fd_capacity`; any beyond that are closed here so none leaks) and counted in
/// `*fd_count`. `*flags_out` receives msg_flags (MSG_TRUNC, MSG_CTRUNC).
ssize_t pb_recv_with_fds(int socket, void *buffer, size_t length, int *fds, int fd_capacity,
                         int *fd_count, int *flags_out, int dontwait);
/// recvmsg(2) for data that may come with descriptors nobody asked for: `flags` are passed on
/// (MSG_TRUNC, MSG_DONTWAIT), MSG_CMSG_CLOEXEC is added, the sender's address goes to `name`
/// (when not NULL; `*name_length` in and out), and every descriptor that arrived is stored in
/// `fds` (up to `fd_capacity`; any beyond are closed here, with MSG_CTRUNC in `*flags_out`, which
/// receives msg_flags), for the caller to close where it chooses. EINTR is retried. With
/// `SO_PASSCRED` on the socket, `*sender_pid` (when not NULL) receives the pid the kernel recorded
/// for the process that sent this very message (`SCM_CREDENTIALS`), else 0.
/// `pb_recv_with_fds` is this with no address and `dontwait` for MSG_DONTWAIT.
ssize_t pb_recv_message(int socket, void *buffer, size_t length, int flags, void *name, unsigned *name_length,
                        int *fds, int fd_capacity, int *fd_count, int *flags_out, int *sender_pid,
                        unsigned *sender_uid);

/// For a local socket this process never read from (a connection refused at once, a connection a
/// listener will not serve), before it is closed here: 1 when its receive queue holds no
/// descriptors and none can be added (it is shut for reading first), so that its close frees no
/// file of a peer's, whose last close could wait; 0 when it may (one is queued, or more than
/// `limit` messages wait). Messages without descriptors are taken off the queue on the way;
/// descriptors seen are peeked copies, closed here.
int pb_queue_holds_no_descriptors(int socket, int limit);

/// Closes the local socket `socket` (which this process owns and never reads from again; any other
/// socket is closed at once, lingering turned off) so that
/// no close here waits on a file a peer chose: the socket is shut for reading, then everything
/// queued in it is taken out, and each descriptor that came with it closed at once if its last
/// close cannot wait (a socket with lingering turned off; a pipe, memfd, eventfd or file on a
/// local filesystem; /dev/null and its kin), and local sockets among them emptied the same way
/// (a listener's pending connections too). At most `budget` descriptors are taken in all. What
/// could not be closed so (a socket not emptied within the budget, a file on FUSE or NFS, a
/// terminal) is left open in `left` (at least `budget` + 254 entries): the return is their number,
/// for the caller to close where a wait holds up no one else; -1 (EINVAL) for a short `left`.
int pb_empty_and_close(int socket, int budget, int *left, int left_capacity);

/// O_TMPFILE (GNU): an unnamed file in a directory's file system.
int pb_o_tmpfile(void);

/// The signal that interrupts a close waiting too long (SIGRTMIN + 3), its handler (which does
/// nothing: a waiting close returns when the signal is delivered; SA_RESTART for everything
/// else), and its delivery to one thread.
int pb_interrupt_signal(void);
int pb_install_interrupt_handler(int signo);
int pb_interrupt_thread(pthread_t thread, int signo);
/// Blocks every signal in the calling thread (one that must never take a process's signals).
int pb_block_all_signals(void);

/// sendmsg(2) of one buffer with up to 253 descriptors (the kernel's most) in one SCM_RIGHTS
/// message, MSG_NOSIGNAL; `pb_send_with_fds` is this for at most 16, the protocol's most.
ssize_t pb_send_rights(int socket, const void *buffer, size_t length, const int *fds, int fd_count, int dontwait);

int pb_msg_trunc(void);
int pb_msg_ctrunc(void);

/// Blocks SIGTERM, SIGINT and SIGHUP in the calling thread and returns a signalfd for them.
int pb_termination_signalfd(void);
/// Reads one pending signal from a signalfd; returns its number, or -1.
int pb_read_signalfd(int fd);

/// The 'W*' wait macros.
int pb_wifexited(int status);
int pb_wexitstatus(int status);
int pb_wifsignaled(int status);
int pb_wtermsig(int status);

/// posix_spawnattr_setflags with POSIX_SPAWN_SETSID | POSIX_SPAWN_SETSIGMASK (empty mask) |
/// POSIX_SPAWN_SETSIGDEF for SIGPIPE/SIGTERM/SIGINT/SIGHUP, so children start with default signals.
int pb_spawnattr_init_clean(void *attr, int new_session);
/// posix_spawn_file_actions_addclosefrom_np: the child closes every descriptor from `from` on.
int pb_spawn_addclosefrom(void *actions, int from);
/// Whether this process was started in secure-execution mode (getauxval(AT_SECURE): a set-user-ID
/// or set-group-ID program, file capabilities, or real and effective ids that differ at exec).
int pb_secure_execution(void);
/// setresgid(gid, gid, gid) then setresuid(uid, uid, uid): 0, or -1 with errno.
int pb_become_only(unsigned uid, unsigned gid);

/// A POSIX (per-process) write lock on the whole file, F_SETLKW when `wait`, else F_SETLK.
int pb_lock_file(int fd, int wait);
int pb_unlock_file(int fd);

/// What statx(2) reports, with times as nanoseconds since the epoch (birth 0 when unknown).
typedef struct {
    uint64_t size;
    uint64_t blocks;
    uint32_t mode;
    uint32_t uid;
    uint32_t gid;
    uint32_t nlink;
    uint64_t inode;
    uint64_t device;
    int64_t access_ns;
    int64_t modify_ns;
    int64_t change_ns;
    int64_t birth_ns;
} pb_file_status;

int pb_fstatx(int fd, pb_file_status *out);

/// renameat2 with RENAME_NOREPLACE (EEXIST when `to` exists) and with RENAME_EXCHANGE (both must
/// exist; each takes the other's place at once); -1 with errno on failure.
int pb_rename_noreplace(const char *from, const char *to);
int pb_rename_exchange(const char *from, const char *to);

/// statx of `name` in directory `dirfd`, not following a symbolic link, without opening it (an
/// open could wait on a lease another process holds on the file); -1 with errno on failure.
int pb_statx_at(int dirfd, const char *name, pb_file_status *out);

/// Device and inode of an open file, with AT_STATX_DONT_SYNC; -1 on failure.
int pb_file_identity(int fd, uint64_t *device, uint64_t *inode);

/// kcmp(KCMP_FILE) on two descriptors of the calling process: 0 when both refer to the same open
/// file description, 1 or 2 when not, -1 with errno (ENOSYS, EPERM) when kcmp is unavailable.
int pb_same_open_file(int fd1, int fd2);

/// The file type bits of an open file (statx STATX_TYPE with AT_STATX_DONT_SYNC).
int pb_file_type(int fd, uint32_t *mode);

/// Atomics on words in memory shared between processes (acquire loads, release stores,
/// sequentially consistent read-modify-writes and fence). Inline: they sit on the hot path of
/// every CAPS message, and these builtins need no feature macros.
static inline uint32_t pb_load_u32(const uint32_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline uint64_t pb_load_u64(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline void pb_store_u32(uint32_t *p, uint32_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline void pb_store_u64(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline uint32_t pb_fetch_add_u32(uint32_t *p, uint32_t v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
static inline int pb_cas_u32(uint32_t *p, uint32_t expected, uint32_t desired) {
    return __atomic_compare_exchange_n(p, &expected, desired, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}
static inline int pb_cas_u64(uint64_t *p, uint64_t expected, uint64_t desired) {
    return __atomic_compare_exchange_n(p, &expected, desired, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}
/// A full fence. On x86-64 a locked add to the stack's red zone orders stores before later loads
/// as `mfence` does for ordinary (write-back) memory, at about half its cost; Linux's own smp_mb()
/// is the same instruction. Elsewhere the compiler's sequentially consistent fence.
static inline void pb_fence(void) {
#if defined(__x86_64__)
    __asm__ __volatile__("lock; addl $0,-4(%%rsp)" ::: "memory", "cc");
#else
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
#endif
}
static inline void pb_cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/// Asks for the cache line at `address` to be brought in for reading, without waiting for it.
static inline void pb_prefetch(const void *address) { __builtin_prefetch(address, 0, 3); }

/// A recursive lock for the threads of one process, for the CAPS ports' state. A pthread
/// recursive mutex costs about 60 instructions a lock and unlock, several times per message;
/// this one takes one compare-and-swap and one exchange when nobody waits, and sleeps on a
/// private futex when somebody does. `state`: 0 free, 1 held, 2 held with sleepers (Drepper's
/// "Futexes Are Tricky", mutex 2). `owner` and `depth` are written only by the holder; another
/// thread reads `owner` only to see that it is not itself.
struct pb_lock {
    uint32_t state;
    uint32_t depth;
    uintptr_t owner;
};
/// The contended halves, out of line.
void pb_lock_wait(struct pb_lock *lock);
void pb_lock_wake(struct pb_lock *lock);
/// Who the calling thread is, for `owner`: its thread pointer, one register read (unique and
/// stable while the thread lives, as `pthread_self()`, which costs a call through the PLT).
static inline uintptr_t pb_thread_identity(void) {
#if defined(__x86_64__) || defined(__aarch64__)
    return (uintptr_t)__builtin_thread_pointer();
#else
    return (uintptr_t)pthread_self();
#endif
}
static inline void pb_lock_acquire(struct pb_lock *lock) {
    uintptr_t self = pb_thread_identity();
    if (__atomic_load_n(&lock->owner, __ATOMIC_RELAXED) == self) {
        lock->depth++;
        return;
    }
    uint32_t expected = 0;
    if (!__atomic_compare_exchange_n(&lock->state, &expected, 1, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED)) {
        pb_lock_wait(lock);
    }
    __atomic_store_n(&lock->owner, self, __ATOMIC_RELAXED);
    lock->depth = 1;
}
static inline void pb_lock_release(struct pb_lock *lock) {
    if (--lock->depth != 0) return;
    __atomic_store_n(&lock->owner, (uintptr_t)0, __ATOMIC_RELAXED);
    if (__atomic_exchange_n(&lock->state, 0, __ATOMIC_RELEASE) == 2) pb_lock_wake(lock);
}

/// Pins the calling thread to one CPU (sched_setaffinity); -1 on failure.
int pb_pin_to_cpu(int cpu);
/// CPUs online.
int pb_cpu_count(void);

/// The CPU the caller runs on (sched_getcpu, through the vDSO where available).
int pb_current_cpu(void);

/// A counter that increases in every child created by fork (installed once with pthread_atfork).
uint64_t pb_fork_generation(void);

/// Registers `fd` as one a fork child must not hold: in every child made by fork from now on,
/// before fork returns there, the number is made to refer to /dev/null (dup3), so the child no
/// longer holds what it referred to, and the number stays valid for the child's code to close.
/// Remove it (pb_fork_release_remove) before closing it. -1 when out of memory.
int pb_fork_release_add(int fd);
void pb_fork_release_remove(int fd);

/// The counter itself, for `pb_fork_generation_seen`.
extern uint64_t pb_fork_generation_value;

/// The counter without the installation check: exact once `pb_fork_generation` has been called
/// (a port calls it when it is made, so every fork after that counts). One load, inlined.
static inline uint64_t pb_fork_generation_seen(void) {
    return __atomic_load_n(&pb_fork_generation_value, __ATOMIC_RELAXED);
}

/* A pidfd for process `pid` (pidfd_open(2), close-on-exec), or -1 with errno set. */
int pb_pidfd_open(int pid);

/* Whether the process behind `pidfd` has exited: 1 yes, 0 no, -1 with errno set. */
int pb_pidfd_exited(int pidfd);

/// pipe2(O_CLOEXEC).
int pb_pipe_cloexec(int fds[2]);

/// Clears FD_CLOEXEC on a descriptor.
int pb_clear_cloexec(int fd);
int pb_set_nonblocking(int fd, int on);

/// epoll wrappers (the struct is packed on x86-64, which Swift imports awkwardly).
int pb_epoll_create(void);
int pb_epoll_ctl(int epfd, int op, int fd, uint32_t events, uint64_t data);
/// Waits for events; writes `(events, data)` pairs into the two arrays.
int pb_epoll_wait(int epfd, uint32_t *events, uint64_t *data, int capacity, int timeout_ms);

/// For each of `count` files (`devices[i]` as `stat` gives `st_dev`, `inodes[i]`), whether a local
/// socket in this network namespace is bound to it (the kernel's socket table, sock_diag's
/// UNIX_DIAG_VFS): `bound[i]` 1 or 0. 0, or -1 with errno (no sock_diag for AF_UNIX).
int pb_unix_sockets_bound_to(const uint64_t *devices, const uint64_t *inodes, int count, unsigned char *bound);

/// The inode of the local socket bound at the abstract name `name` (`length` bytes after the
/// leading NUL) in `server`'s network namespace (the one `sendto` there reaches), from the kernel's
/// socket table (a sock_diag dump; nothing is sent or connected): 0 with `*inode`, or -1 with
/// errno (ENOENT nothing bound there, EXDEV this thread is in another network namespace than
/// `server`, ENOPROTOOPT no SO_NETNS_COOKIE).
int pb_abstract_socket_inode(int server, const char *name, size_t length, uint32_t *inode);
/// Whether the local socket of inode `inode` is in `server`'s network namespace and bound at the
/// abstract name `name`: 1 yes, 0 no, -1 with errno. One socket, looked up by its inode.
int pb_socket_has_abstract_name(int server, uint32_t inode, const char *name, size_t length);
/// Which of process `pid`'s descriptors below `limit` is the socket of inode `inode` (its
/// /proc/PID/fd links; nothing is opened or copied), `hint` looked at first, whatever `limit` (-1: none): the
/// descriptor, or -1 (none, or it cannot be looked at).
int pb_process_socket_descriptor(int pid, uint32_t inode, int hint, int limit);

/// An O_PATH descriptor of the socket file at `path`, no symbolic link followed in any component
/// (ELOOP), ENOTSOCK if it is no socket; -1 with errno.
int pb_open_socket_file(const char *path);

#endif
