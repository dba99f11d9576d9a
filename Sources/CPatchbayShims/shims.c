// Out-of-line GNU helpers; compiled with _GNU_SOURCE (see Package.swift).
#include "CPatchbayShims.h"

#include <errno.h>
#include <stddef.h>
#include <sys/un.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/auxv.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/statfs.h>
#include <sys/sysmacros.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <linux/sock_diag.h>
#include <linux/unix_diag.h>
#include <sys/uio.h>
#include <linux/magic.h>
#include <sys/wait.h>
#include <sched.h>
#include <time.h>
#include <unistd.h>

int pb_memfd_create(const char *name, unsigned int flags) { return memfd_create(name, flags); }
unsigned int pb_mfd_cloexec(void) { return MFD_CLOEXEC; }
unsigned int pb_mfd_allow_sealing(void) { return MFD_ALLOW_SEALING; }

int pb_add_seals(int fd, unsigned int seals) { return fcntl(fd, F_ADD_SEALS, seals); }
int pb_get_seals(int fd) { return fcntl(fd, F_GET_SEALS); }
unsigned int pb_seal_seal(void) { return F_SEAL_SEAL; }
unsigned int pb_seal_shrink(void) { return F_SEAL_SHRINK; }
unsigned int pb_seal_grow(void) { return F_SEAL_GROW; }
unsigned int pb_seal_write(void) { return F_SEAL_WRITE; }
unsigned int pb_seal_future_write(void) { return F_SEAL_FUTURE_WRITE; }

int pb_eventfd(unsigned int initval, int nonblock) {
    return eventfd(initval, EFD_CLOEXEC | (nonblock ? EFD_NONBLOCK : 0));
}

int pb_futex_wait(uint32_t *word, uint32_t expected, int64_t timeout_ns) {
    struct timespec ts;
    struct timespec *tsp = NULL;
    if (timeout_ns >= 0) {
        ts.tv_sec = timeout_ns / 1000000000;
        ts.tv_nsec = timeout_ns % 1000000000;
        tsp = &ts;
    }
    return (int)syscall(SYS_futex, word, FUTEX_WAIT, expected, tsp, NULL, 0);
}

void pb_lock_wait(struct pb_lock *lock) {
    // Held only for bookkeeping, never while sleeping: a short spin usually sees it free.
    for (int round = 0; round < 100; round++) {
        uint32_t expected = 0;
        if (__atomic_load_n(&lock->state, __ATOMIC_RELAXED) == 0
            && __atomic_compare_exchange_n(&lock->state, &expected, 1, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED)) {
            return;
        }
        pb_cpu_relax();
    }
    // Marked "sleepers" from here on, so the holder's release wakes one of them.
    while (__atomic_exchange_n(&lock->state, 2, __ATOMIC_ACQUIRE) != 0) {
        syscall(SYS_futex, &lock->state, FUTEX_WAIT_PRIVATE, 2, NULL, NULL, 0);
    }
}

void pb_lock_wake(struct pb_lock *lock) {
    syscall(SYS_futex, &lock->state, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
}

int pb_futex_wake(uint32_t *word, int count) {
    return (int)syscall(SYS_futex, word, FUTEX_WAKE, count, NULL, NULL, 0);
}

#ifndef __NR_futex_waitv
#define __NR_futex_waitv 449  // the same number on every architecture (the generic table)
#endif

int pb_futex_waitv(struct pb_futex_waiter *waiters, unsigned int count) {
    _Static_assert(sizeof(struct pb_futex_waiter) == 24, "struct futex_waitv is 24 bytes");
    return (int)syscall(__NR_futex_waitv, waiters, count, 0, NULL, 0);
}

int pb_accept4(int fd, int nonblock) {
    return accept4(fd, NULL, NULL, SOCK_CLOEXEC | (nonblock ? SOCK_NONBLOCK : 0));
}

// A bounded accept. O_NONBLOCK lives in the open file description, which a client holding a copy
// of the listener can clear at any moment, so the flag alone cannot keep the broker from waiting.
// A flag found cleared is reported (ETIMEDOUT) without accepting; a flag cleared between that
// check and the accept is caught by a periodic per-thread timer aimed at this thread
// (SIGEV_THREAD_ID) whose handler is installed without SA_RESTART, so the accept ends in EINTR,
// reported the same.
static void pb_interrupt_only(int signo) { (void)signo; }

static _Thread_local timer_t pb_accept_timer;
static _Thread_local int pb_accept_timer_made;

static int pb_accept_interrupt_signal(void) { return SIGRTMIN + 6; }

int pb_accept_bounded(int fd, long timeout_us) {
    if (!pb_accept_timer_made) {
        struct sigaction action;
        memset(&action, 0, sizeof action);
        action.sa_handler = pb_interrupt_only;
        sigemptyset(&action.sa_mask);
        if (sigaction(pb_accept_interrupt_signal(), &action, NULL) != 0) return -1;
        struct sigevent event;
        memset(&event, 0, sizeof event);
        event.sigev_notify = SIGEV_THREAD_ID;
        event.sigev_signo = pb_accept_interrupt_signal();
        event._sigev_un._tid = (pid_t)syscall(SYS_gettid);
        if (timer_create(CLOCK_MONOTONIC, &event, &pb_accept_timer) != 0) return -1;
        pb_accept_timer_made = 1;
    }
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0) return -1;
    if (!(flags & O_NONBLOCK)) {
        (void)fcntl(fd, F_SETFL, flags | O_NONBLOCK);
        errno = ETIMEDOUT;
        return -1;
    }
    // Periodic: should this thread lose the CPU between arming and accept4 and the first shot be
    // spent before the call, the next one still interrupts it.
    struct timespec period = {.tv_sec = timeout_us / 1000000, .tv_nsec = (timeout_us % 1000000) * 1000L};
    struct itimerspec arm = {.it_interval = period, .it_value = period};
    struct itimerspec disarm = {0};
    if (timer_settime(pb_accept_timer, 0, &arm, NULL) != 0) return -1;
    int accepted = accept4(fd, NULL, NULL, SOCK_CLOEXEC);
    int saved = errno;
    (void)timer_settime(pb_accept_timer, 0, &disarm, NULL);
    if (accepted < 0 && saved == EINTR) saved = ETIMEDOUT;
    errno = saved;
    return accepted;
}

int pb_getrandom(void *buffer, size_t length) {
    size_t done = 0;
    while (done < length) {
        ssize_t n = getrandom((char *)buffer + done, length - done, 0);
        if (n < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        done += (size_t)n;
    }
    return 0;
}

int pb_peer_credentials(int fd, pb_ucred *out) {
    struct ucred cred;
    socklen_t len = sizeof cred;
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0) return -1;
    out->pid = cred.pid;
    out->uid = cred.uid;
    out->gid = cred.gid;
    return 0;
}

int pb_peer_groups(int fd, uint32_t *groups, int capacity) {
    gid_t buffer[1024];
    socklen_t len = sizeof buffer;
    if (getsockopt(fd, SOL_SOCKET, SO_PEERGROUPS, buffer, &len) < 0) {
        if (errno != ERANGE) return -1;
        // More than 1024 groups: ask again with room for all of them, fill what the caller can take.
        int total = (int)(len / sizeof(gid_t));
        gid_t *big = malloc(len);
        if (big == NULL) return -1;
        if (getsockopt(fd, SOL_SOCKET, SO_PEERGROUPS, big, &len) < 0) { free(big); return -1; }
        total = (int)(len / sizeof(gid_t));
        for (int i = 0; i < total && i < capacity; i++) groups[i] = big[i];
        free(big);
        return total;
    }
    int total = (int)(len / sizeof(gid_t));
    for (int i = 0; i < total && i < capacity; i++) groups[i] = buffer[i];
    return total;
}

#define PB_MAX_FDS 16

/* Room for every descriptor one message can carry (the kernel's SCM_MAX_FD). */
#define PB_MAX_RECV_FDS 253

ssize_t pb_send_rights(int socket, const void *buffer, size_t length, const int *fds, int fd_count, int dontwait) {
    if (fd_count < 0 || fd_count > PB_MAX_RECV_FDS) { errno = EINVAL; return -1; }
    struct iovec iov = { .iov_base = (void *)buffer, .iov_len = length };
    union {
        char bytes[CMSG_SPACE(sizeof(int) * PB_MAX_RECV_FDS)];
        struct cmsghdr align;
    } control;
    struct msghdr msg;
    memset(&msg, 0, sizeof msg);
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    if (fd_count > 0) {
        memset(&control, 0, sizeof control);
        msg.msg_control = control.bytes;
        msg.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)fd_count);
        struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
        cmsg->cmsg_level = SOL_SOCKET;
        cmsg->cmsg_type = SCM_RIGHTS;
        cmsg->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)fd_count);
        memcpy(CMSG_DATA(cmsg), fds, sizeof(int) * (size_t)fd_count);
    }
    ssize_t n;
    do {
        n = sendmsg(socket, &msg, MSG_NOSIGNAL | (dontwait ? MSG_DONTWAIT : 0));
    } while (n < 0 && errno == EINTR);
    return n;
}

ssize_t pb_send_with_fds(int socket, const void *buffer, size_t length, const int *fds, int fd_count, int dontwait) {
    if (fd_count > PB_MAX_FDS) { errno = EINVAL; return -1; }
    return pb_send_rights(socket, buffer, length, fds, fd_count, dontwait);
}

/* The control buffer has room for everything one message can carry: descriptors that do not fit
 * are closed by the kernel inside recvmsg, in this thread, and the last close of a file its
 * sender chose can block (a TCP socket with SO_LINGER): never here. */
ssize_t pb_recv_message(int socket, void *buffer, size_t length, int flags, void *name, unsigned *name_length,
                        int *fds, int fd_capacity, int *fd_count, int *flags_out, int *sender_pid,
                        unsigned *sender_uid) {
    struct iovec iov = { .iov_base = buffer, .iov_len = length };
    // Room for the sender's credentials too (SO_PASSCRED): they come first, and without room for
    // them the descriptors after them would be cut off, closed by the kernel in this thread.
    union {
        char bytes[CMSG_SPACE(sizeof(struct ucred)) + CMSG_SPACE(sizeof(int) * PB_MAX_RECV_FDS)];
        struct cmsghdr align;
    } control;
    struct msghdr msg;
    memset(&msg, 0, sizeof msg);
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.bytes;
    msg.msg_controllen = sizeof control.bytes;
    if (name != NULL) {
        msg.msg_name = name;
        msg.msg_namelen = *name_length;
    }
    *fd_count = 0;
    *flags_out = 0;
    if (sender_pid != NULL) *sender_pid = 0;
    if (sender_uid != NULL) *sender_uid = (unsigned)-1;
    ssize_t n;
    do {
        n = recvmsg(socket, &msg, flags | MSG_CMSG_CLOEXEC);
    } while (n < 0 && errno == EINTR);
    if (n < 0) return n;
    if (name != NULL) *name_length = msg.msg_namelen;
    *flags_out = msg.msg_flags;
    // Adopt every descriptor that arrived, in every SCM_RIGHTS message: CMSG_SPACE rounds up, so
    // a buffer sized for N can carry more, and the peer decides what it sends.
    for (struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg); cmsg != NULL; cmsg = CMSG_NXTHDR(&msg, cmsg)) {
        if (cmsg->cmsg_level != SOL_SOCKET) continue;
        if (cmsg->cmsg_type == SCM_CREDENTIALS && cmsg->cmsg_len >= CMSG_LEN(sizeof(struct ucred))) {
            struct ucred credentials;
            memcpy(&credentials, CMSG_DATA(cmsg), sizeof credentials);
            if (sender_pid != NULL) *sender_pid = credentials.pid;
            if (sender_uid != NULL) *sender_uid = credentials.uid;
            continue;
        }
        if (cmsg->cmsg_type != SCM_RIGHTS) continue;
        size_t count = (cmsg->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        int *incoming = (int *)CMSG_DATA(cmsg);
        for (size_t i = 0; i < count; i++) {
            int fd;
            memcpy(&fd, incoming + i, sizeof fd);
            if (*fd_count < fd_capacity) {
                fds[(*fd_count)++] = fd;
            } else {
                close(fd);
                *flags_out |= MSG_CTRUNC;
            }
        }
    }
    return n;
}

ssize_t pb_recv_with_fds(int socket, void *buffer, size_t length, int *fds, int fd_capacity,
                         int *fd_count, int *flags_out, int dontwait) {
    return pb_recv_message(socket, buffer, length, dontwait ? MSG_DONTWAIT : 0, NULL, NULL, fds, fd_capacity, fd_count,
                           flags_out, NULL, NULL);
}

int pb_queue_holds_no_descriptors(int socket, int limit) {
    // From now on nothing more can be queued: a peer's send sees this end shut for reading (the
    // kernel checks it under the lock it queues under) and fails with EPIPE. SO_PASSRIGHTS off
    // too where the kernel has it (6.16), for good measure.
    int off = 0, on = 1, type = 0;
    socklen_t length = sizeof type;
    if (getsockopt(socket, SOL_SOCKET, SO_TYPE, &type, &length) != 0) return 0;
    if (shutdown(socket, SHUT_RD) != 0) return 0;
    (void)setsockopt(socket, SOL_SOCKET, 83 /* SO_PASSRIGHTS */, &off, sizeof off);
    // Every message comes with the sender's credentials, so one of 0 bytes is told from the end.
    if (setsockopt(socket, SOL_SOCKET, SO_PASSCRED, &on, sizeof on) != 0) return 0;
    for (int taken = 0; taken < limit; taken++) {
        char byte;
        struct iovec iov = { .iov_base = &byte, .iov_len = 1 };
        union {
            char bytes[CMSG_SPACE(sizeof(struct ucred)) + CMSG_SPACE(sizeof(int) * PB_MAX_RECV_FDS)];
            struct cmsghdr align;
        } control;
        struct msghdr msg;
        memset(&msg, 0, sizeof msg);
        msg.msg_iov = &iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.bytes;
        msg.msg_controllen = sizeof control.bytes;
        ssize_t n;
        do {
            n = recvmsg(socket, &msg, MSG_PEEK | MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
        } while (n < 0 && errno == EINTR);
        if (n < 0) return errno == EAGAIN || errno == EWOULDBLOCK;
        int message = 0, rights = (msg.msg_flags & MSG_CTRUNC) != 0;
        for (struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg); cmsg != NULL; cmsg = CMSG_NXTHDR(&msg, cmsg)) {
            if (cmsg->cmsg_level != SOL_SOCKET) continue;
            if (cmsg->cmsg_type == SCM_CREDENTIALS) message = 1;
            if (cmsg->cmsg_type != SCM_RIGHTS) continue;
            rights = 1;
            // Peeked: copies of files the queued message still holds, so never their last close.
            size_t count = (cmsg->cmsg_len - CMSG_LEN(0)) / sizeof(int);
            int *incoming = (int *)CMSG_DATA(cmsg);
            for (size_t i = 0; i < count; i++) {
                int fd;
                memcpy(&fd, incoming + i, sizeof fd);
                close(fd);
            }
        }
        if (rights) return 0;
        // The end: the peer is gone and nothing is queued. (A stream socket has no messages of 0
        // bytes, and Linux hands the credentials even with its end of file.)
        if (n == 0 && (!message || type == SOCK_STREAM)) return 1;
        // A message without descriptors: taken off the queue (it has none for the kernel to close).
        do {
            n = recv(socket, &byte, 1, MSG_DONTWAIT);
        } while (n < 0 && errno == EINTR);
        if (n < 0) return errno == EAGAIN || errno == EWOULDBLOCK;
    }
    return 0;
}

// What `pb_empty_and_close` does with a descriptor it took out of a queue.
enum { PB_HAND_ON, PB_CLOSE_NOW, PB_EMPTY_FIRST };

// Whether the last close of `fd` is made without waiting: files of kinds and filesystems that have
// no flush to a server or device to drain (sockets once their lingering is turned off), local
// sockets to be emptied first, and anything else (a FUSE or NFS file, a terminal) handed on.
static int pb_disposal(int fd) {
    struct stat info;
    if (fstat(fd, &info) != 0) return PB_HAND_ON;
    if (S_ISSOCK(info.st_mode)) {
        int domain = 0;
        socklen_t length = sizeof domain;
        if (getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &length) != 0) return PB_HAND_ON;
        if (domain == AF_UNIX) return PB_EMPTY_FIRST;
        struct linger now = { .l_onoff = 0, .l_linger = 0 };
        return setsockopt(fd, SOL_SOCKET, SO_LINGER, &now, sizeof now) == 0 ? PB_CLOSE_NOW : PB_HAND_ON;
    }
    if (S_ISCHR(info.st_mode)) return major(info.st_rdev) == 1 ? PB_CLOSE_NOW : PB_HAND_ON;  // null, zero, random...
    if (S_ISBLK(info.st_mode)) return PB_HAND_ON;
    struct statfs where;
    if (fstatfs(fd, &where) != 0) return PB_HAND_ON;
    switch ((unsigned long)where.f_type) {
    case PIPEFS_MAGIC: case ANON_INODE_FS_MAGIC: case TMPFS_MAGIC: case HUGETLBFS_MAGIC:
    case PROC_SUPER_MAGIC: case SYSFS_MAGIC: case EXT4_SUPER_MAGIC: case XFS_SUPER_MAGIC:
    case BTRFS_SUPER_MAGIC: case CGROUP2_SUPER_MAGIC: case NSFS_MAGIC: case 0x50494446 /* pidfs */:
    case OVERLAYFS_SUPER_MAGIC:
        return PB_CLOSE_NOW;
    default:
        return PB_HAND_ON;
    }
}

int pb_empty_and_close(int socket, int budget, int *left, int left_capacity) {
    if (budget < 0 || left_capacity < budget + PB_MAX_RECV_FDS + 1) { errno = EINVAL; return -1; }
    // Anything but a local socket (a TCP connection a /net listener refused) holds no descriptors:
    // closed at once, its lingering off and its bytes unread, or handed on.
    switch (pb_disposal(socket)) {
    case PB_CLOSE_NOW: close(socket); return 0;
    case PB_HAND_ON: left[0] = socket; return 1;
    default: break;
    }
    // Every descriptor this takes counts against `budget`, so the stack holds at most that many
    // and one message's worth past it.
    int *stack = malloc(sizeof(int) * (size_t)(budget + PB_MAX_RECV_FDS + 1));
    char *data = malloc(65536);
    if (stack == NULL || data == NULL) {
        free(stack);
        free(data);
        left[0] = socket;
        return 1;
    }
    int top = 0, kept = 0, taken = 0;
    stack[top++] = socket;
    while (top > 0) {
        int fd = stack[--top];
        int on = 1, emptied = 0;
        // Nothing can be queued from now on (a sender sees this end shut for reading); every message
        // comes with credentials, so one of 0 bytes is told from the end.
        if (taken < budget && shutdown(fd, SHUT_RD) == 0 &&
            setsockopt(fd, SOL_SOCKET, SO_PASSCRED, &on, sizeof on) == 0) {
            int listening = 0;
            socklen_t length = sizeof listening;
            if (getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &length) == 0 && listening) {
                // A listener's queue holds connections, each with a queue of its own.
                int connection;
                while (taken < budget && (connection = accept4(fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK)) >= 0) {
                    taken++;
                    stack[top++] = connection;
                }
                // Shut for reading, an empty listener's accept says EINVAL at once (it never waits).
                emptied = taken < budget && (errno == EINVAL || errno == EAGAIN || errno == EWOULDBLOCK);
            } else {
                int type = 0;
                length = sizeof type;
                (void)getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &length);
                for (int messages = 0; messages < 1024; messages++) {
                    if (taken >= budget) {
                        // Nothing more is taken: empty only if nothing is left (a peek, without
                        // room for descriptors, takes no copy of any).
                        char byte;
                        ssize_t n;
                        int flags = 0;
                        do {
                            struct iovec iov = { .iov_base = &byte, .iov_len = 1 };
                            struct msghdr msg;
                            memset(&msg, 0, sizeof msg);
                            msg.msg_iov = &iov;
                            msg.msg_iovlen = 1;
                            n = recvmsg(fd, &msg, MSG_PEEK | MSG_DONTWAIT);
                            flags = msg.msg_flags;
                        } while (n < 0 && errno == EINTR);
                        emptied = n < 0 ? (errno == EAGAIN || errno == EWOULDBLOCK)
                                        : n == 0 && (type == SOCK_STREAM || (flags & MSG_CTRUNC) == 0);
                        break;
                    }
                    struct iovec iov = { .iov_base = data, .iov_len = 65536 };
                    union {
                        char bytes[CMSG_SPACE(sizeof(struct ucred)) + CMSG_SPACE(sizeof(int) * PB_MAX_RECV_FDS)];
                        struct cmsghdr align;
                    } control;
                    struct msghdr msg;
                    memset(&msg, 0, sizeof msg);
                    msg.msg_iov = &iov;
                    msg.msg_iovlen = 1;
                    msg.msg_control = control.bytes;
                    msg.msg_controllen = sizeof control.bytes;
                    ssize_t n;
                    do {
                        n = recvmsg(fd, &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
                    } while (n < 0 && errno == EINTR);
                    if (n < 0) {
                        emptied = errno == EAGAIN || errno == EWOULDBLOCK;
                        break;
                    }
                    int message = 0;
                    for (struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg); cmsg != NULL; cmsg = CMSG_NXTHDR(&msg, cmsg)) {
                        if (cmsg->cmsg_level != SOL_SOCKET) continue;
                        if (cmsg->cmsg_type == SCM_CREDENTIALS) message = 1;
                        if (cmsg->cmsg_type != SCM_RIGHTS) continue;
                        message = 1;
                        size_t count = (cmsg->cmsg_len - CMSG_LEN(0)) / sizeof(int);
                        int *incoming = (int *)CMSG_DATA(cmsg);
                        for (size_t i = 0; i < count; i++) {
                            int received;
                            memcpy(&received, incoming + i, sizeof received);
                            taken++;
                            switch (pb_disposal(received)) {
                            case PB_CLOSE_NOW: close(received); break;
                            case PB_EMPTY_FIRST: stack[top++] = received; break;
                            default: left[kept++] = received; break;
                            }
                        }
                    }
                    // The end: the peer is gone and nothing is queued. (A stream's read of 0 bytes
                    // comes with credentials too; a message of 0 bytes is a datagram's.)
                    if (n == 0 && (!message || type == SOCK_STREAM)) {
                        emptied = 1;
                        break;
                    }
                }
            }
        }
        if (emptied) {
            close(fd);
        } else {
            left[kept++] = fd;
        }
    }
    free(stack);
    free(data);
    return kept;
}

int pb_o_tmpfile(void) { return O_TMPFILE; }

int pb_interrupt_signal(void) { return SIGRTMIN + 3; }

static void pb_interrupted(int signo) { (void)signo; }

int pb_install_interrupt_handler(int signo) {
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_handler = pb_interrupted;
    action.sa_flags = SA_RESTART;
    sigemptyset(&action.sa_mask);
    return sigaction(signo, &action, NULL);
}

int pb_interrupt_thread(pthread_t thread, int signo) { return pthread_kill(thread, signo); }

int pb_block_all_signals(void) {
    sigset_t all;
    sigfillset(&all);
    return pthread_sigmask(SIG_BLOCK, &all, NULL);
}

int pb_msg_trunc(void) { return MSG_TRUNC; }
int pb_msg_ctrunc(void) { return MSG_CTRUNC; }

int pb_termination_signalfd(void) {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGHUP);
    if (pthread_sigmask(SIG_BLOCK, &set, NULL) != 0) return -1;
    return signalfd(-1, &set, SFD_CLOEXEC | SFD_NONBLOCK);
}

int pb_read_signalfd(int fd) {
    struct signalfd_siginfo info;
    ssize_t n;
    do {
        n = read(fd, &info, sizeof info);
    } while (n < 0 && errno == EINTR);
    if (n != (ssize_t)sizeof info) return -1;
    return (int)info.ssi_signo;
}

int pb_wifexited(int status) { return WIFEXITED(status); }
int pb_wexitstatus(int status) { return WEXITSTATUS(status); }
int pb_wifsignaled(int status) { return WIFSIGNALED(status); }
int pb_wtermsig(int status) { return WTERMSIG(status); }

int pb_spawn_addclosefrom(void *actions, int from) {
    return posix_spawn_file_actions_addclosefrom_np((posix_spawn_file_actions_t *)actions, from);
}

int pb_become_only(unsigned uid, unsigned gid) {
    if (setresgid(gid, gid, gid) != 0) return -1;
    return setresuid(uid, uid, uid);
}

int pb_secure_execution(void) {
    return getauxval(AT_SECURE) != 0;
}

int pb_spawnattr_init_clean(void *attr, int new_session) {
    posix_spawnattr_t *a = (posix_spawnattr_t *)attr;
    int rc = posix_spawnattr_init(a);
    if (rc != 0) { errno = rc; return -1; }
    sigset_t none, defaults;
    sigemptyset(&none);
    sigemptyset(&defaults);
    sigaddset(&defaults, SIGPIPE);
    sigaddset(&defaults, SIGTERM);
    sigaddset(&defaults, SIGINT);
    sigaddset(&defaults, SIGHUP);
    posix_spawnattr_setsigmask(a, &none);
    posix_spawnattr_setsigdefault(a, &defaults);
    short flags = POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF;
    if (new_session) flags |= POSIX_SPAWN_SETSID;
    rc = posix_spawnattr_setflags(a, flags);
    if (rc != 0) { posix_spawnattr_destroy(a); errno = rc; return -1; }
    return 0;
}

int pb_lock_file(int fd, int wait) {
    struct flock lock;
    memset(&lock, 0, sizeof lock);
    lock.l_type = F_WRLCK;
    lock.l_whence = SEEK_SET;
    int rc;
    do {
        rc = fcntl(fd, wait ? F_SETLKW : F_SETLK, &lock);
    } while (rc < 0 && errno == EINTR);
    return rc;
}

int pb_unlock_file(int fd) {
    struct flock lock;
    memset(&lock, 0, sizeof lock);
    lock.l_type = F_UNLCK;
    lock.l_whence = SEEK_SET;
    return fcntl(fd, F_SETLK, &lock);
}

static int64_t pb_nanoseconds(struct statx_timestamp t) {
    return (int64_t)t.tv_sec * 1000000000 + (int64_t)t.tv_nsec;
}

static int pb_statx_into(int dirfd, const char *path, int flags, pb_file_status *out) {
    struct statx info;
    if (statx(dirfd, path, flags, STATX_BASIC_STATS | STATX_BTIME, &info) < 0) return -1;
    out->size = info.stx_size;
    out->blocks = info.stx_blocks;
    out->mode = info.stx_mode;
    out->uid = info.stx_uid;
    out->gid = info.stx_gid;
    out->nlink = info.stx_nlink;
    out->inode = info.stx_ino;
    out->device = ((uint64_t)info.stx_dev_major << 32) | info.stx_dev_minor;
    out->access_ns = pb_nanoseconds(info.stx_atime);
    out->modify_ns = pb_nanoseconds(info.stx_mtime);
    out->change_ns = pb_nanoseconds(info.stx_ctime);
    out->birth_ns = (info.stx_mask & STATX_BTIME) ? pb_nanoseconds(info.stx_btime) : 0;
    return 0;
}

int pb_rename_noreplace(const char *from, const char *to) {
    return renameat2(AT_FDCWD, from, AT_FDCWD, to, RENAME_NOREPLACE);
}

int pb_rename_exchange(const char *from, const char *to) {
    return renameat2(AT_FDCWD, from, AT_FDCWD, to, RENAME_EXCHANGE);
}

int pb_fstatx(int fd, pb_file_status *out) { return pb_statx_into(fd, "", AT_EMPTY_PATH, out); }

int pb_statx_at(int dirfd, const char *name, pb_file_status *out) {
    return pb_statx_into(dirfd, name, AT_SYMLINK_NOFOLLOW, out);
}

int pb_file_type(int fd, uint32_t *mode) {
    struct statx info;
    // DONT_SYNC: a remote or FUSE file system answers from its cache instead of asking a server
    // that might never reply; the type of an open file cannot change anyway.
    if (statx(fd, "", AT_EMPTY_PATH | AT_STATX_DONT_SYNC, STATX_TYPE, &info) < 0) return -1;
    *mode = info.stx_mode;
    return 0;
}

int pb_current_cpu(void) { return sched_getcpu(); }

int pb_pin_to_cpu(int cpu) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    return sched_setaffinity(0, sizeof set, &set);
}

int pb_cpu_count(void) { return (int)sysconf(_SC_NPROCESSORS_ONLN); }

uint64_t pb_fork_generation_value = 0;
static pthread_once_t fork_once = PTHREAD_ONCE_INIT;

/* Descriptors a fork child must not hold (pb_fork_release_add): taken under a lock that fork
 * itself holds across the fork, so the child's copy of the list is whole. */
static pthread_mutex_t fork_release_lock = PTHREAD_MUTEX_INITIALIZER;
static int *fork_release_fds;
static size_t fork_release_count;
static size_t fork_release_capacity;

static void fork_prepare(void) { pthread_mutex_lock(&fork_release_lock); }
static void fork_parent(void) { pthread_mutex_unlock(&fork_release_lock); }
static void fork_child(void) {
    __atomic_fetch_add(&pb_fork_generation_value, 1, __ATOMIC_SEQ_CST);
    if (fork_release_count > 0) {
        /* The child's numbers stay open (its inherited objects close them later) but on
         * /dev/null: the parent's sockets are no longer held here. */
        int null = open("/dev/null", O_RDWR | O_CLOEXEC);
        if (null >= 0) {
            for (size_t i = 0; i < fork_release_count; i++) dup3(null, fork_release_fds[i], O_CLOEXEC);
            close(null);
        }
    }
    pthread_mutex_unlock(&fork_release_lock);
}
static void fork_install(void) { pthread_atfork(fork_prepare, fork_parent, fork_child); }

int pb_fork_release_add(int fd) {
    pthread_once(&fork_once, fork_install);
    pthread_mutex_lock(&fork_release_lock);
    if (fork_release_count == fork_release_capacity) {
        size_t capacity = fork_release_capacity ? fork_release_capacity * 2 : 16;
        int *grown = realloc(fork_release_fds, capacity * sizeof(int));
        if (grown == NULL) {
            pthread_mutex_unlock(&fork_release_lock);
            return -1;
        }
        fork_release_fds = grown;
        fork_release_capacity = capacity;
    }
    fork_release_fds[fork_release_count++] = fd;
    pthread_mutex_unlock(&fork_release_lock);
    return 0;
}

void pb_fork_release_remove(int fd) {
    pthread_mutex_lock(&fork_release_lock);
    for (size_t i = 0; i < fork_release_count; i++) {
        if (fork_release_fds[i] == fd) {
            fork_release_fds[i] = fork_release_fds[--fork_release_count];
            break;
        }
    }
    pthread_mutex_unlock(&fork_release_lock);
}
uint64_t pb_fork_generation(void) {
    pthread_once(&fork_once, fork_install);
    return __atomic_load_n(&pb_fork_generation_value, __ATOMIC_ACQUIRE);
}

int pb_file_identity(int fd, uint64_t *device, uint64_t *inode) {
    struct statx info;
    if (statx(fd, "", AT_EMPTY_PATH | AT_STATX_DONT_SYNC, STATX_INO, &info) < 0) return -1;
    *device = ((uint64_t)info.stx_dev_major << 32) | info.stx_dev_minor;
    *inode = info.stx_ino;
    return 0;
}

int pb_same_open_file(int fd1, int fd2) {
    pid_t self = getpid();
    return (int)syscall(SYS_kcmp, self, self, 0 /* KCMP_FILE */, fd1, fd2);
}

int pb_pipe_cloexec(int fds[2]) { return pipe2(fds, O_CLOEXEC); }

int pb_clear_cloexec(int fd) {
    int flags = fcntl(fd, F_GETFD);
    if (flags < 0) return -1;
    return fcntl(fd, F_SETFD, flags & ~FD_CLOEXEC);
}

int pb_set_nonblocking(int fd, int on) {
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0) return -1;
    return fcntl(fd, F_SETFL, on ? (flags | O_NONBLOCK) : (flags & ~O_NONBLOCK));
}

int pb_epoll_create(void) { return epoll_create1(EPOLL_CLOEXEC); }

int pb_epoll_ctl(int epfd, int op, int fd, uint32_t events, uint64_t data) {
    struct epoll_event ev;
    memset(&ev, 0, sizeof ev);
    ev.events = events;
    ev.data.u64 = data;
    return epoll_ctl(epfd, op, fd, &ev);
}

int pb_epoll_wait(int epfd, uint32_t *events, uint64_t *data, int capacity, int timeout_ms) {
    struct epoll_event buffer[64];
    if (capacity > 64) capacity = 64;
    int n = epoll_wait(epfd, buffer, capacity, timeout_ms);
    for (int i = 0; i < n; i++) {
        events[i] = buffer[i].events;
        data[i] = buffer[i].data.u64;
    }
    return n;
}

int pb_pidfd_open(int pid) {
    return (int)syscall(SYS_pidfd_open, pid, 0);
}

int pb_pidfd_exited(int pidfd) {
    struct pollfd entry = { .fd = pidfd, .events = POLLIN };
    int ready = poll(&entry, 1, 0);
    if (ready < 0) return -1;
    return ready > 0 ? 1 : 0;
}



/* One sock_diag query of the local sockets of this thread's network namespace, with the `show`
 * attributes (UDIAG_SHOW_*): every socket (`inode` 0, a dump) or the one of inode `inode`. `each`
 * sees each socket's message and the length of its attributes. With `same_namespace_as` >= 0, the
 * namespace must be that socket's (SO_NETNS_COOKIE): EXDEV otherwise. 0, or -1 with errno (no
 * sock_diag for AF_UNIX, ENOENT no socket of that inode, a netlink error). */
static int unix_diag_query(uint32_t inode, unsigned show, int same_namespace_as,
                           void (*each)(const struct unix_diag_msg *, int, void *), void *context) {
    int fd = socket(AF_NETLINK, SOCK_DGRAM | SOCK_CLOEXEC, NETLINK_SOCK_DIAG);
    if (fd < 0) return -1;
    int saved;
    if (same_namespace_as >= 0) {
        uint64_t ours = 0, theirs = 0;
        socklen_t size = sizeof ours, their_size = sizeof theirs;
        if (getsockopt(fd, SOL_SOCKET, SO_NETNS_COOKIE, &ours, &size) != 0 ||
            getsockopt(same_namespace_as, SOL_SOCKET, SO_NETNS_COOKIE, &theirs, &their_size) != 0) {
            saved = errno;
            close(fd);
            errno = saved;
            return -1;
        }
        if (ours != theirs) {
            close(fd);
            errno = EXDEV;
            return -1;
        }
    }
    struct timeval timeout = { .tv_sec = 5, .tv_usec = 0 };
    (void)setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
    struct {
        struct nlmsghdr header;
        struct unix_diag_req request;
    } query;
    memset(&query, 0, sizeof query);
    query.header.nlmsg_len = sizeof query;
    query.header.nlmsg_type = SOCK_DIAG_BY_FAMILY;
    query.header.nlmsg_flags = NLM_F_REQUEST | (inode == 0 ? NLM_F_DUMP : 0);
    query.request.sdiag_family = AF_UNIX;
    query.request.udiag_states = ~0u;
    query.request.udiag_ino = inode;
    query.request.udiag_show = show;
    if (inode != 0) query.request.udiag_cookie[0] = query.request.udiag_cookie[1] = ~0u;  // by inode alone
    ssize_t sent;
    do {
        sent = send(fd, &query, sizeof query, 0);
    } while (sent < 0 && errno == EINTR);
    if (sent != (ssize_t)sizeof query) {
        saved = sent < 0 ? errno : EPROTO;
        close(fd);
        errno = saved;
        return -1;
    }
    static _Thread_local char buffer[32768] __attribute__((aligned(NLMSG_ALIGNTO)));
    for (;;) {
        ssize_t n;
        do {
            n = recv(fd, buffer, sizeof buffer, 0);
        } while (n < 0 && errno == EINTR);
        if (n <= 0) {
            saved = n == 0 ? EPROTO : errno;
            close(fd);
            errno = saved;
            return -1;
        }
        int length = (int)n;
        for (struct nlmsghdr *header = (struct nlmsghdr *)buffer; NLMSG_OK(header, length); header = NLMSG_NEXT(header, length)) {
            if (header->nlmsg_type == NLMSG_DONE) {
                close(fd);
                return 0;
            }
            if (header->nlmsg_type == NLMSG_ERROR) {
                const struct nlmsgerr *error = NLMSG_DATA(header);
                int code = header->nlmsg_len >= NLMSG_LENGTH(sizeof *error) && error->error < 0 ? -error->error : EPROTO;
                close(fd);
                errno = code;
                return -1;
            }
            if (header->nlmsg_type != SOCK_DIAG_BY_FAMILY || header->nlmsg_len < NLMSG_LENGTH(sizeof(struct unix_diag_msg))) continue;
            const struct unix_diag_msg *message = NLMSG_DATA(header);
            each(message, (int)(header->nlmsg_len - NLMSG_LENGTH(sizeof *message)), context);
            if (inode != 0) {  // one socket: no NLMSG_DONE follows
                close(fd);
                return 0;
            }
        }
    }
}

struct abstract_name {
    const char *name;
    size_t length;
    int found;
    uint32_t inode;
};

static void match_abstract_name(const struct unix_diag_msg *message, int left, void *context) {
    struct abstract_name *search = context;
    for (const struct rtattr *attribute = (const struct rtattr *)(message + 1); RTA_OK(attribute, left);
         attribute = RTA_NEXT(attribute, left)) {
        if (attribute->rta_type != UNIX_DIAG_NAME) continue;
        // An abstract name comes with its leading NUL.
        const char *bytes = RTA_DATA(attribute);
        if (RTA_PAYLOAD(attribute) == search->length + 1 && bytes[0] == 0 && memcmp(bytes + 1, search->name, search->length) == 0) {
            search->found = 1;
            search->inode = message->udiag_ino;
        }
    }
}

/* The inode of the local socket bound at the abstract name `name` (`length` bytes after the leading
 * NUL) in the network namespace of `server`, the one `sendto` there reaches, from the kernel's
 * socket table (sock_diag, every socket of the namespace with its name; nothing is sent to, or
 * connected to, anyone). 0 with `*inode`, or -1 with errno: ENOENT nothing bound there; EXDEV this
 * thread is in another network namespace than `server`; ENOPROTOOPT no SO_NETNS_COOKIE (before
 * Linux 5.14). */
int pb_abstract_socket_inode(int server, const char *name, size_t length, uint32_t *inode) {
    struct abstract_name search = { name, length, 0, 0 };
    if (unix_diag_query(0, UDIAG_SHOW_NAME, server, match_abstract_name, &search) != 0) return -1;
    if (!search.found) {
        errno = ENOENT;
        return -1;
    }
    *inode = search.inode;
    return 0;
}

/* Whether the local socket of inode `inode` is in `server`'s network namespace and bound at the
 * abstract name `name` (`length` bytes after the leading NUL): 1 yes, 0 no (gone, elsewhere, or
 * another name), -1 with errno (as pb_abstract_socket_inode). One socket looked up by its inode. */
int pb_socket_has_abstract_name(int server, uint32_t inode, const char *name, size_t length) {
    struct abstract_name search = { name, length, 0, 0 };
    if (unix_diag_query(inode, UDIAG_SHOW_NAME, server, match_abstract_name, &search) != 0) return errno == ENOENT ? 0 : -1;
    return search.found && search.inode == inode;
}

/* Whether descriptor `fd` of process `pid` is the socket of inode `inode` (its /proc/PID/fd link
 * reads `socket:[INODE]`; nothing is opened or copied). */
static int descriptor_is_socket(int pid, int fd, uint32_t inode) {
    char path[64], link[64], expected[32];
    int expected_length = snprintf(expected, sizeof expected, "socket:[%u]", inode);
    snprintf(path, sizeof path, "/proc/%d/fd/%d", pid, fd);
    ssize_t count = readlink(path, link, sizeof link);
    if (count < 0) return errno == ENOENT ? 0 : -1;
    return count == expected_length && memcmp(link, expected, (size_t)count) == 0;
}

/* Which of process `pid`'s descriptors below `limit` is the socket of inode `inode`, `hint` looked
 * at first, whatever `limit` (-1: none): the descriptor, or -1 (none, or it cannot be looked at: ptrace rules, gone).
 * Each descriptor looked at costs a readlink of /proc/PID/fd/N (a few microseconds). */
int pb_process_socket_descriptor(int pid, uint32_t inode, int hint, int limit) {
    if (hint >= 0 && descriptor_is_socket(pid, hint, inode) == 1) return hint;
    for (int fd = 0; fd < limit; fd++) {
        if (fd == hint) continue;
        int is = descriptor_is_socket(pid, fd, inode);
        if (is == 1) return fd;
        if (is < 0) return -1;
    }
    return -1;
}

struct bound_files {
    const uint64_t *devices, *inodes;
    int count;
    unsigned char *bound;
};

static void mark_bound_files(const struct unix_diag_msg *message, int left, void *context) {
    struct bound_files *files = context;
    for (const struct rtattr *attribute = (const struct rtattr *)(message + 1); RTA_OK(attribute, left);
         attribute = RTA_NEXT(attribute, left)) {
        if (attribute->rta_type != UNIX_DIAG_VFS || RTA_PAYLOAD(attribute) < sizeof(struct unix_diag_vfs)) continue;
        struct unix_diag_vfs vfs;
        memcpy(&vfs, RTA_DATA(attribute), sizeof vfs);
        // The kernel's device number (major << 20 | minor), and the inode's low 32 bits.
        unsigned int major_number = vfs.udiag_vfs_dev >> 20, minor_number = vfs.udiag_vfs_dev & 0xfffff;
        for (int i = 0; i < files->count; i++) {
            if (major(files->devices[i]) == major_number && minor(files->devices[i]) == minor_number &&
                (uint32_t)files->inodes[i] == vfs.udiag_vfs_ino)
                files->bound[i] = 1;
        }
    }
}

/* Which files a local socket is bound to, from the kernel's socket table (sock_diag, the
 * UNIX_DIAG_VFS attribute: the device and inode of the socket file a bound socket made). A path
 * string proves nothing: anyone can bind a socket to the same path string in a mount namespace of
 * its own, or keep a socket whose file was since unlinked and made again. */
int pb_unix_sockets_bound_to(const uint64_t *devices, const uint64_t *inodes, int count, unsigned char *bound) {
    memset(bound, 0, (size_t)count);
    struct bound_files files = { devices, inodes, count, bound };
    return unix_diag_query(0, UDIAG_SHOW_VFS, -1, mark_bound_files, &files);
}

/* An O_PATH descriptor of the socket file at `path`, found without following any symbolic link in
 * any component (openat2's RESOLVE_NO_SYMLINKS: ELOOP if there is one), or -1 with errno
 * (ENOTSOCK if the file is no socket). Sending to "/proc/self/fd/N" then reaches exactly that
 * file, whatever is renamed in its place meanwhile. */
int pb_open_socket_file(const char *path) {
    struct {
        uint64_t flags, mode, resolve;
    } how = { .flags = O_PATH | O_CLOEXEC, .mode = 0, .resolve = 0x04 /* RESOLVE_NO_SYMLINKS */ };
    int fd;
    do {
        fd = (int)syscall(437 /* openat2, every architecture */, AT_FDCWD, path, &how, sizeof how);
    } while (fd < 0 && errno == EINTR);
    if (fd < 0) return -1;
    struct stat info;
    if (fstat(fd, &info) != 0 || !S_ISSOCK(info.st_mode)) {
        close(fd);
        errno = ENOTSOCK;
        return -1;
    }
    return fd;
}
