/*
 * The C library's own tests: every function of patchbay.h against a real broker (the one
 * PATCHBAY_SOCKET names), with the errno paths of the Swift tests that apply to C.
 *
 *   test_patchbay all              run every test; prints "ok N" and exits 0, or the first
 *                                  failure (file:line, the call, its result and reason) and 1
 *   test_patchbay service NAME     a CAPS service: answers each REQUEST with "c:" + its bytes,
 *                                  printing "request ID PID UID GID" and "dispose ID"; exits after
 *                                  the first DISPOSE
 *   test_patchbay call NAME DATA   a CAPS client: prints the reply to DATA
 *   test_patchbay share PATH       shares PATH opened read-only, prints the key, waits for stdin EOF
 *   test_patchbay dgram-echo NAME  a datagram server on NAME: answers each packet with "c:" + its
 *                                  bytes (pb_net_recv, pb_net_reply) until a packet "quit"
 *
 * Compiled with -std=c11 -Wall -Wextra -Werror; the header is also checked as C++.
 */
#define _GNU_SOURCE
#include <patchbay.h>

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static int checks;

#define CHECK(condition) do { \
        checks++; \
        if (!(condition)) { \
            fprintf(stderr, "%s:%d: failed: %s (last reason: %s)\n", __FILE__, __LINE__, #condition, pb_last_reason()); \
            exit(1); \
        } \
    } while (0)

/* A call that must succeed (>= 0). */
#define OK(call) do { long long result_ = (long long)(call); checks++; \
        if (result_ < 0) { \
            fprintf(stderr, "%s:%d: %s = %lld (%s): %s\n", __FILE__, __LINE__, #call, result_, strerror((int)-result_), pb_last_reason()); \
            exit(1); \
        } \
    } while (0)

/* A call that must fail with -expected and leave a reason. */
#define FAILS(call, expected) do { long long result_ = (long long)(call); checks++; \
        if (result_ != -(expected) || pb_last_reason()[0] == '\0') { \
            fprintf(stderr, "%s:%d: %s = %lld, expected -%s (%d); reason: %s\n", __FILE__, __LINE__, #call, result_, #expected, \
                    (expected), pb_last_reason()); \
            exit(1); \
        } \
    } while (0)

static char unique[64];

/* A name of this run's own, so tests can run again on the same broker. */
static const char *named(const char *prefix, char *buffer, size_t size) {
    snprintf(buffer, size, "%s%s", prefix, unique);
    return buffer;
}

/* ---- broker ---- */

static void test_broker(void) {
    pb_broker *broker = NULL;
    FAILS(pb_broker_open_at(&broker, "/nonexistent/patchbay.sock"), ENOENT);
    CHECK(broker == NULL);
    CHECK(strstr(pb_last_reason(), "/nonexistent/patchbay.sock") != NULL);
    FAILS(pb_broker_open_at(&broker, ""), EINVAL);                /* not the default broker */
    CHECK(broker == NULL);
    FAILS(pb_broker_open(NULL), EINVAL);
    OK(pb_broker_open(&broker));
    CHECK(broker != NULL);
    pb_broker_close(broker);
    pb_broker_close(NULL);
}

/* ---- keys ---- */

static void test_keys(pb_broker *broker) {
    int pipe_ends[2];
    CHECK(pipe(pipe_ends) == 0);
    char key[PB_KEY_TEXT_SIZE];
    OK(pb_share(broker, pipe_ends[1], 30000, key));
    CHECK(strlen(key) == 22);
    close(pipe_ends[1]);   /* the key holds the write end now */
    int claimed = pb_claim(broker, key);
    OK(claimed);
    CHECK(fcntl(claimed, F_GETFD) & FD_CLOEXEC);
    CHECK(write(claimed, "through", 7) == 7);
    close(claimed);
    char bytes[16] = {0};
    CHECK(read(pipe_ends[0], bytes, sizeof bytes) == 7 && memcmp(bytes, "through", 7) == 0);
    CHECK(read(pipe_ends[0], bytes, sizeof bytes) == 0);   /* every write end is closed */
    close(pipe_ends[0]);

    FAILS(pb_claim(broker, key), ENOENT);                          /* one time */
    FAILS(pb_claim(broker, "AAAAAAAAAAAAAAAAAAAAAA"), ENOENT);     /* unknown */
    FAILS(pb_claim(broker, "not a key"), EINVAL);
    FAILS(pb_claim(broker, NULL), EINVAL);
    FAILS(pb_share(broker, 0, 0, key), EINVAL);                    /* timeout 0 */
    FAILS(pb_share(broker, 0, -2, key), EINVAL);
    FAILS(pb_share(NULL, 0, 1000, key), EINVAL);
    FAILS(pb_share(broker, 987, 1000, key), EBADF);                /* not open */

    /* For one claimer: this process (by pid), a uid that is not ours; who and ids checked. */
    int restricted = open("/dev/null", O_RDONLY | O_CLOEXEC);
    OK(restricted);
    OK(pb_share_for(broker, restricted, 30000, PB_CLAIMABLE_BY_PID, getpid(), key));
    int mine = pb_claim(broker, key);
    OK(mine);
    close(mine);
    OK(pb_share_for(broker, restricted, 30000, PB_CLAIMABLE_BY_UID, (int64_t)getuid() + 4242, key));
    FAILS(pb_claim(broker, key), ENOENT);                          /* not for this uid */
    FAILS(pb_share_for(broker, restricted, 30000, 9, 0, key), EINVAL);
    FAILS(pb_share_for(broker, restricted, 30000, PB_CLAIMABLE_BY_GID, -1, key), EINVAL);
    FAILS(pb_share_for(broker, restricted, 30000, PB_CLAIMABLE_BY_UID, 4294967295LL, key), EINVAL);  /* (uid_t)-1 */
    FAILS(pb_share_for(broker, restricted, 30000, PB_CLAIMABLE_BY_PID, 2147483647, key), ESRCH);
    {
        /* A child that exited and is not reaped yet (a zombie) is not running either. */
        pid_t child = fork();
        if (child == 0) _exit(0);
        CHECK(child > 0);
        siginfo_t info;
        CHECK(waitid(P_PID, (id_t)child, &info, WEXITED | WNOWAIT) == 0);   /* exited, kept unreaped */
        FAILS(pb_share_for(broker, restricted, 30000, PB_CLAIMABLE_BY_PID, child, key), ESRCH);
        CHECK(waitpid(child, NULL, 0) == child);
    }
    close(restricted);

    /* Never expires; expires. */
    int file = open("/dev/null", O_RDONLY | O_CLOEXEC);
    OK(pb_share(broker, file, PB_TIMEOUT_NEVER, key));
    int again = pb_claim(broker, key);
    OK(again);
    close(again);
    OK(pb_share(broker, file, 1, key));
    struct timespec pause = {0, 20 * 1000 * 1000};
    int late = 0;
    for (int attempt = 0; attempt < 100 && (late = pb_claim(broker, key)) >= 0; attempt++) {
        close(late);
        nanosleep(&pause, NULL);
    }
    FAILS(late, ENOENT);
    close(file);
}

/* ---- shared memory ---- */

static void test_named(pb_broker *broker) {
    char name[96], other[96];
    named("/c-shm-", name, sizeof name);
    named("/c-shm-other-", other, sizeof other);
    int fd = pb_shm_open(broker, name, O_RDWR | O_CREAT | O_EXCL, 0600);
    OK(fd);
    CHECK(fcntl(fd, F_GETFD) & FD_CLOEXEC);
    struct stat info;
    CHECK(fstat(fd, &info) == 0 && info.st_size == 0);
    FAILS(pb_shm_open(broker, name, O_RDWR | O_CREAT | O_EXCL, 0600), EEXIST);
    FAILS(pb_shm_open(broker, name, O_WRONLY, 0), EINVAL);
    /* Bytes that are not UTF-8 are refused, never replaced (which would make "/n\xff" and
     * "/n\xfe" one name). */
    FAILS(pb_shm_open(broker, "/n\xff", O_RDWR | O_CREAT | O_EXCL, 0600), EINVAL);
    FAILS(pb_shm_unlink(broker, "/n\x80"), EINVAL);
    FAILS(pb_shm_open(broker, "no-slash", O_RDWR | O_CREAT, 0600), EINVAL);
    char long_name[1100];
    long_name[0] = '/';
    memset(long_name + 1, 'x', sizeof long_name - 2);
    long_name[sizeof long_name - 1] = '\0';
    FAILS(pb_shm_open(broker, long_name, O_RDWR | O_CREAT, 0600), ENAMETOOLONG);
    FAILS(pb_shm_open(broker, "/c-absent", O_RDWR, 0), ENOENT);
    /* FreeBSD's order: the access mode and the flags come before the name; a name that cannot
     * be read is EFAULT, as FreeBSD's bad-pointer cases. */
    FAILS(pb_shm_open(broker, long_name, O_WRONLY, 0), EINVAL);
    FAILS(pb_shm_open(broker, long_name, O_RDWR | O_APPEND, 0), EINVAL);
    FAILS(pb_shm_open(broker, NULL, O_RDONLY, 0), EFAULT);
    FAILS(pb_shm_unlink(broker, NULL), EFAULT);
    FAILS(pb_shm_unlink(broker, PB_SHM_ANON), EFAULT);
    FAILS(pb_shm_rename(broker, NULL, name, 0), EFAULT);
    FAILS(pb_shm_rename(broker, name, NULL, 0), EFAULT);
    /* A pointer to memory that cannot be read (FreeBSD's open_bad_path_pointer and
     * unlink_bad_path_pointer use 1024): EFAULT, not a crash. */
    FAILS(pb_shm_open(broker, (const char *)1024, O_RDONLY, 0777), EFAULT);
    FAILS(pb_shm_unlink(broker, (const char *)1024), EFAULT);
    FAILS(pb_shm_rename(broker, (const char *)1024, name, 0), EFAULT);
    FAILS(pb_shm_rename(broker, name, (const char *)1024, 0), EFAULT);
    {
        /* Two pages of bytes with no NUL, then a page that cannot be read: a shm name is
         * ENAMETOOLONG at 1024 bytes (FreeBSD's copy-in), any other string EFAULT. */
        char *pages = mmap(NULL, 3 * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        CHECK(pages != MAP_FAILED);
        CHECK(munmap(pages + 2 * 4096, 4096) == 0);
        memset(pages, 'x', 2 * 4096);
        pages[0] = '/';
        FAILS(pb_shm_open(broker, pages, O_RDONLY, 0), ENAMETOOLONG);
        pb_caps_client *unreadable = NULL;
        FAILS(pb_caps_client_open(broker, pages, 0, &unreadable), EFAULT);
        munmap(pages, 2 * 4096);
    }
    {
        /* FreeBSD's order: a bad `from` is reported before a `to` that is too long. */
        char long_name[1100];
        long_name[0] = '/';
        memset(long_name + 1, 'n', sizeof long_name - 2);
        long_name[sizeof long_name - 1] = 0;
        FAILS(pb_shm_rename(broker, "no-slash", long_name, 0), EINVAL);
        FAILS(pb_shm_rename(broker, "", long_name, 0), EINVAL);
        FAILS(pb_shm_rename(broker, name, long_name, 0), ENAMETOOLONG);
    }

    /* Named objects map as mmap does: ftruncate first, then what one writes another reads. */
    CHECK(ftruncate(fd, 8192) == 0);
    void *address = NULL;
    OK(pb_shm_map(fd, 8192, PROT_READ | PROT_WRITE, &address));
    memcpy(address, "named bytes", 11);
    int reader = pb_shm_open(broker, name, O_RDONLY, 0);
    OK(reader);
    void *view = NULL;
    FAILS(pb_shm_map(reader, 8192, PROT_READ | PROT_WRITE, &view), EACCES);
    OK(pb_shm_map(reader, 8192, PROT_READ, &view));
    CHECK(memcmp(view, "named bytes", 11) == 0);
    munmap(view, 8192);
    munmap(address, 8192);
    close(reader);

    /* Truncate at open. */
    int truncated = pb_shm_open(broker, name, O_RDWR | O_TRUNC, 0);
    OK(truncated);
    CHECK(fstat(truncated, &info) == 0 && info.st_size == 0);
    close(truncated);

    /* Rename. */
    int second = pb_shm_open(broker, other, O_RDWR | O_CREAT | O_EXCL, 0600);
    OK(second);
    close(second);
    FAILS(pb_shm_rename(broker, name, other, PB_SHM_RENAME_NOREPLACE), EEXIST);
    FAILS(pb_shm_rename(broker, name, other, PB_SHM_RENAME_NOREPLACE | PB_SHM_RENAME_EXCHANGE), EINVAL);
    FAILS(pb_shm_rename(broker, name, other, 4), EINVAL);
    /* Renaming from or to anonymous makes no sense (FreeBSD: EINVAL, before the names). */
    FAILS(pb_shm_rename(broker, PB_SHM_ANON, other, 0), EINVAL);
    FAILS(pb_shm_rename(broker, name, PB_SHM_ANON, 0), EINVAL);
    FAILS(pb_shm_rename(broker, PB_SHM_ANON, NULL, 0), EINVAL);
    OK(pb_shm_rename(broker, name, other, PB_SHM_RENAME_EXCHANGE));
    OK(pb_shm_rename(broker, other, name, 0));   /* replaces */
    FAILS(pb_shm_rename(broker, other, name, 0), ENOENT);
    OK(pb_shm_unlink(broker, name));
    FAILS(pb_shm_unlink(broker, name), ENOENT);
    FAILS(pb_shm_open(broker, name, O_RDWR, 0), ENOENT);
    /* The descriptor and its object outlive the name. */
    CHECK(fstat(fd, &info) == 0);
    close(fd);
}

static void test_anonymous(void) {
    FAILS(pb_shm_anonymous(8), EINVAL);
    int fd = pb_shm_anonymous(PB_SHM_SEALABLE);
    OK(fd);
    CHECK(fcntl(fd, F_GETFD) & FD_CLOEXEC);
    void *address = NULL;
    FAILS(pb_shm_map(fd, 0, PROT_READ | PROT_WRITE, &address), EINVAL);
    FAILS(pb_shm_map(fd, 4096, PROT_WRITE, &address), EINVAL);
    FAILS(pb_shm_map(fd, 4096, PROT_READ, NULL), EINVAL);
    /* A first mapping the kernel cannot make fixes nothing: the object keeps size 0. */
    FAILS(pb_shm_map(fd, (size_t)1 << 62, PROT_READ | PROT_WRITE, &address), ENOMEM);
    struct stat unsized;
    CHECK(fstat(fd, &unsized) == 0 && unsized.st_size == 0);
    long page = sysconf(_SC_PAGESIZE);
    OK(pb_shm_map(fd, 100, PROT_READ | PROT_WRITE, &address));   /* first mapping: fixes the size */
    struct stat info;
    CHECK(fstat(fd, &info) == 0 && info.st_size == page);
    memcpy(address, "first", 5);
    void *again = NULL;
    FAILS(pb_shm_map(fd, 2 * page, PROT_READ, &again), EINVAL);    /* past the end */
    OK(pb_shm_map(fd, page, PROT_READ, &again));
    CHECK(memcmp(again, "first", 5) == 0);
    munmap(again, page);
    munmap(address, page);
    /* Sealable: F_ADD_SEALS works on it. */
    CHECK(fcntl(fd, F_ADD_SEALS, F_SEAL_GROW) == 0);
    close(fd);
    FAILS(pb_shm_map(-1, 4096, PROT_READ, &address), EBADF);
}

/* FreeBSD's SHM_ANON through pb_shm_open: a new anonymous object, read-write only, no broker. */
/* With no free descriptor, calls whose answer is a descriptor fail with -EMFILE (not -EPROTO), and
 * pb_shm_open with O_CREAT creates nothing, as shm_open(3). */
static void test_no_free_descriptor(pb_broker *broker) {
    char name[96];
    named("/c-emfile-", name, sizeof name);
    struct rlimit saved;
    CHECK(getrlimit(RLIMIT_NOFILE, &saved) == 0);
    /* Every descriptor below a low soft limit taken. */
    int fillers[256];
    int filled = 0;
    int probe = open("/dev/null", O_RDONLY | O_CLOEXEC);
    CHECK(probe >= 0);
    struct rlimit low = { (rlim_t)probe + 64, saved.rlim_max };
    close(probe);
    CHECK(setrlimit(RLIMIT_NOFILE, &low) == 0);
    int fd;
    while (filled < 256 && (fd = open("/dev/null", O_RDONLY | O_CLOEXEC)) >= 0) fillers[filled++] = fd;
    CHECK(filled < 256);
    FAILS(pb_shm_open(broker, name, O_RDWR | O_CREAT | O_EXCL, 0600), EMFILE);
    pb_socket *socket = NULL;
    FAILS(pb_net_open(broker, "seqpacket", 0, &socket), EMFILE);
    for (int i = 0; i < filled; i++) close(fillers[i]);
    CHECK(setrlimit(RLIMIT_NOFILE, &saved) == 0);
    /* Nothing was created: the exclusive create works now. */
    int made = pb_shm_open(broker, name, O_RDWR | O_CREAT | O_EXCL, 0600);
    OK(made);
    close(made);
    OK(pb_shm_unlink(broker, name));
}

static void test_shm_anon(void) {
    FAILS(pb_shm_open(NULL, PB_SHM_ANON, O_RDONLY, 0777), EINVAL);
    FAILS(pb_shm_open(NULL, PB_SHM_ANON, O_WRONLY, 0777), EINVAL);
    FAILS(pb_shm_open(NULL, PB_SHM_ANON, O_RDWR | O_APPEND, 0777), EINVAL);
    int fd = pb_shm_open(NULL, PB_SHM_ANON, O_RDWR, 0777);
    OK(fd);
    CHECK(fcntl(fd, F_GETFD) & FD_CLOEXEC);
    CHECK((fcntl(fd, F_GETFL) & O_ACCMODE) == O_RDWR);
    struct stat info;
    CHECK(fstat(fd, &info) == 0 && info.st_size == 0);
    /* Not sealable (as pb_shm_anonymous(0)); the first mapping fixes its size. */
    CHECK(fcntl(fd, F_ADD_SEALS, F_SEAL_GROW) == -1);
    long page = sysconf(_SC_PAGESIZE);
    void *address = NULL;
    OK(pb_shm_map(fd, 10, PROT_READ | PROT_WRITE, &address));
    CHECK(fstat(fd, &info) == 0 && info.st_size == page);
    memcpy(address, "anon", 4);
    CHECK(pread(fd, (char[4]){0}, 4, 0) == 4);
    munmap(address, page);
    /* Each open is a new object. */
    int other = pb_shm_open(NULL, PB_SHM_ANON, O_RDWR | O_CREAT | O_EXCL, 0600);
    OK(other);
    struct stat second;
    CHECK(fstat(other, &second) == 0 && second.st_ino != info.st_ino && second.st_size == 0);
    close(other);
    close(fd);
}

/* ---- /net ---- */

static void test_net(pb_broker *broker) {
    char name[96];
    named("c-net-", name, sizeof name);
    pb_socket *listener = NULL, *client = NULL, *server = NULL, *fresh = NULL;
    FAILS(pb_net_open(broker, "datagram", 0, &fresh), EINVAL);
    FAILS(pb_net_open(broker, "stream", 8, &fresh), EINVAL);
    OK(pb_net_listen(broker, name, "seqpacket", &listener));
    CHECK(pb_net_id(listener) > 0);
    FAILS(pb_net_listen(broker, name, "seqpacket", &fresh), EADDRINUSE);
    FAILS(pb_net_connect(broker, "c-nobody-there", "seqpacket", &fresh), ENOENT);
    FAILS(pb_net_data(listener), ENOTCONN);
    FAILS(pb_net_fd(NULL), EINVAL);
    {
        /* A fork child's accept on its parent's listener: -ECONNRESET (SEMANTICS §6), not a
         * listener bound again as after a broker restart. */
        pid_t child = fork();
        if (child == 0) {
            pb_socket *taken = NULL;
            int result = pb_net_accept(listener, PB_NET_NONBLOCK, &taken);
            _exit(result == -ECONNRESET ? 0 : 100 + (result < 0 ? -result : 0));
        }
        CHECK(child > 0);
        int status = 0;
        CHECK(waitpid(child, &status, 0) == child);
        CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    }
    /* A listener's kernel descriptor polls readable when a connection waits: an event loop's
     * way to accept without a thread blocked in pb_net_accept. */
    int listening = pb_net_fd(listener);
    OK(listening);
    struct pollfd waiting = { .fd = listening, .events = POLLIN };
    CHECK(poll(&waiting, 1, 0) == 0);

    OK(pb_net_connect(broker, name, "seqpacket", &client));
    CHECK(poll(&waiting, 1, 10000) == 1 && (waiting.revents & POLLIN));
    OK(pb_net_accept(listener, PB_NET_NONBLOCK, &server));   /* the connection waits in the backlog */
    CHECK(poll(&waiting, 1, 0) == 0);
    CHECK(pb_net_fd(server) == pb_net_data(server));
    CHECK(pb_net_id(server) != pb_net_id(listener));
    int a = pb_net_data(client), b = pb_net_data(server);
    OK(a);
    OK(b);
    CHECK(send(a, "ping", 4, 0) == 4);
    char bytes[16];
    CHECK(recv(b, bytes, sizeof bytes, 0) == 4 && memcmp(bytes, "ping", 4) == 0);
    CHECK(send(b, "pong!", 5, 0) == 5);
    CHECK(recv(a, bytes, sizeof bytes, 0) == 5 && memcmp(bytes, "pong!", 5) == 0);
    /* The peer sees this process, not the broker. */
    struct ucred peer;
    socklen_t length = sizeof peer;
    CHECK(getsockopt(b, SOL_SOCKET, SO_PEERCRED, &peer, &length) == 0 && peer.pid == getpid());
    FAILS(pb_net_accept(listener, PB_NET_NONBLOCK, &fresh), EAGAIN);
    FAILS(pb_net_accept(client, 0, &fresh), EINVAL);   /* not listening */
    pb_net_close(server);
    CHECK(recv(a, bytes, sizeof bytes, 0) == 0);       /* end of file */
    pb_net_close(client);

    /* Opened PB_NET_NONBLOCK: the data descriptor does not wait either. */
    pb_socket *quick = NULL, *quick_server = NULL;
    OK(pb_net_open(broker, "seqpacket", PB_NET_NONBLOCK, &quick));
    char connect_line[128];
    snprintf(connect_line, sizeof connect_line, "connect %s", name);
    OK(pb_net_ctl(quick, connect_line));
    OK(pb_net_accept(listener, 0, &quick_server));
    int quick_data = pb_net_data(quick);
    OK(quick_data);
    CHECK(fcntl(quick_data, F_GETFL) & O_NONBLOCK);
    CHECK(recv(quick_data, bytes, sizeof bytes, 0) == -1 && errno == EAGAIN);
    pb_net_close(quick_server);
    pb_net_close(quick);

    /* ctl by hand. */
    OK(pb_net_open(broker, "stream", 0, &fresh));
    FAILS(pb_net_ctl(fresh, "frobnicate"), EINVAL);
    FAILS(pb_net_ctl(fresh, "listen"), EINVAL);        /* NEW cannot listen */
    FAILS(pb_net_ctl(fresh, "connect c-nobody-there"), ENOENT);
    pb_net_close(fresh);
    pb_net_close(listener);
    pb_net_close(NULL);
    /* The name is free again at once: a bind of a name whose holder's handles are all closed
     * closes that socket first (before, 49 binds in 50 made right after the close failed). */
    for (int round = 0; round < 20; round++) {
        OK(pb_net_listen(broker, name, "stream", &listener));
        pb_net_close(listener);
        OK(pb_net_open(broker, "stream", 0, &fresh));
        char bind_again[128];
        snprintf(bind_again, sizeof bind_again, "bind %s", name);
        OK(pb_net_ctl(fresh, bind_again));
        pb_net_close(fresh);
    }
}

/* ---- datagrams: pb_net_recv and pb_net_reply ---- */

static void on_signal(int signal) { (void)signal; }

struct interrupted {
    pb_socket *server;
    volatile int started;
    volatile long long result;
};

static void *receive_until_interrupted(void *argument) {
    struct interrupted *waiting = argument;
    char byte;
    waiting->started = 1;
    waiting->result = pb_net_recv(waiting->server, &byte, 1, NULL, NULL);
    return NULL;
}

static void test_dgram(pb_broker *broker) {
    char name[96], bind_line[128];
    named("c-dg-", name, sizeof name);
    snprintf(bind_line, sizeof bind_line, "bind %s", name);
    pb_socket *server = NULL, *client = NULL, *unbound = NULL, *quick = NULL;
    char bytes[64];
    struct sockaddr_un from;
    socklen_t from_length = sizeof from;
    OK(pb_net_open(broker, "dgram", 0, &unbound));
    FAILS(pb_net_recv(unbound, bytes, sizeof bytes, NULL, NULL), ENOTCONN);
    pb_net_close(unbound);
    FAILS(pb_net_recv(NULL, bytes, sizeof bytes, NULL, NULL), EINVAL);

    OK(pb_net_open(broker, "dgram", 0, &server));
    OK(pb_net_ctl(server, bind_line));
    FAILS(pb_net_recv(server, NULL, 4, NULL, NULL), EINVAL);
    FAILS(pb_net_recv(server, bytes, sizeof bytes, &from, NULL), EINVAL);
    OK(pb_net_connect(broker, name, "dgram", &client));
    int data = pb_net_data(client);
    OK(data);

    /* The sender's address comes back, and the answer goes there. */
    CHECK(send(data, "ping", 4, 0) == 4);
    CHECK(pb_net_recv(server, bytes, sizeof bytes, &from, &from_length) == 4 && memcmp(bytes, "ping", 4) == 0);
    CHECK(from_length > sizeof(sa_family_t) && from.sun_family == AF_UNIX);
    CHECK(pb_net_reply(server, "pong!", 5, &from, from_length) == 5);
    CHECK(recv(data, bytes, sizeof bytes, 0) == 5 && memcmp(bytes, "pong!", 5) == 0);
    FAILS(pb_net_reply(server, "x", 1, NULL, 0), EINVAL);
    FAILS(pb_net_reply(server, "x", 1, &from, 1), EINVAL);
    FAILS(pb_net_reply(server, "x", 1, &from, sizeof from + 1), EINVAL);
    struct sockaddr_un other = from;
    other.sun_family = AF_INET;
    FAILS(pb_net_reply(server, "x", 1, &other, from_length), EAFNOSUPPORT);
    /* An address no datagram came from: only a sender is answered. */
    struct sockaddr_un gone = { .sun_family = AF_UNIX };
    snprintf(gone.sun_path, sizeof gone.sun_path, "/tmp/c-dg-gone-%s", unique);
    FAILS(pb_net_reply(server, "x", 1, &gone, sizeof gone), EINVAL);

    /* A packet longer than the buffer: its whole length, the rest discarded. */
    CHECK(send(data, "0123456789", 10, 0) == 10);
    CHECK(pb_net_recv(server, bytes, 4, NULL, NULL) == 10 && memcmp(bytes, "0123", 4) == 0);
    CHECK(send(data, "", 0, 0) == 0);
    CHECK(pb_net_recv(server, bytes, sizeof bytes, NULL, NULL) == 0);

    /* Descriptors sent along are closed by the library, not left in this process: the pipe's
     * reader sees end of file once the last copy of its write end (the one received) is closed. */
    int pipe_ends[2];
    CHECK(pipe2(pipe_ends, O_CLOEXEC) == 0);
    char control[CMSG_SPACE(sizeof(int))];
    memset(control, 0, sizeof control);
    struct iovec part = { .iov_base = "fd", .iov_len = 2 };
    struct msghdr message = { .msg_iov = &part, .msg_iovlen = 1, .msg_control = control, .msg_controllen = sizeof control };
    struct cmsghdr *header = CMSG_FIRSTHDR(&message);
    header->cmsg_level = SOL_SOCKET;
    header->cmsg_type = SCM_RIGHTS;
    header->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(header), &pipe_ends[1], sizeof(int));
    /* A datagram socket takes none by default (SO_PASSRIGHTS off, Linux 6.16): the sender's
     * sendmsg is EPERM. Turned back on, on the server's own descriptor, they come. */
    int pass_rights = 83;   /* SO_PASSRIGHTS */
    int on = 1;
    errno = 0;
    ssize_t refused = sendmsg(data, &message, 0);
    CHECK(refused == -1 ? errno == EPERM : refused == 2);
    if (refused == -1) {
        CHECK(setsockopt(pb_net_fd(server), SOL_SOCKET, pass_rights, &on, sizeof on) == 0);
        CHECK(sendmsg(data, &message, 0) == 2);
    }
    close(pipe_ends[1]);
    CHECK(pb_net_recv(server, bytes, sizeof bytes, NULL, NULL) == 2 && memcmp(bytes, "fd", 2) == 0);
    CHECK(read(pipe_ends[0], bytes, 1) == 0);
    close(pipe_ends[0]);

    /* A signal handled while it waits ends the wait, as it ends recv(2). */
    struct sigaction action = { .sa_handler = on_signal }, previous;
    sigemptyset(&action.sa_mask);
    CHECK(sigaction(SIGUSR1, &action, &previous) == 0);
    struct interrupted waiting = { .server = server, .started = 0, .result = 1 };
    pthread_t thread;
    CHECK(pthread_create(&thread, NULL, receive_until_interrupted, &waiting) == 0);
    while (!waiting.started) sched_yield();
    /* Until the thread is in its wait, a signal may land before it: send until it returns. */
    for (int tries = 0; tries < 5000 && waiting.result == 1; tries++) {
        pthread_kill(thread, SIGUSR1);
        struct timespec pause = { 0, 1000000 };
        nanosleep(&pause, NULL);
    }
    CHECK(pthread_join(thread, NULL) == 0);
    CHECK(waiting.result == -EINTR);
    CHECK(sigaction(SIGUSR1, &previous, NULL) == 0);

    /* Non-blocking: nothing queued is -EAGAIN. */
    char quick_line[128];
    snprintf(quick_line, sizeof quick_line, "bind %s-nb", name);
    OK(pb_net_open(broker, "dgram", PB_NET_NONBLOCK, &quick));
    OK(pb_net_ctl(quick, quick_line));
    FAILS(pb_net_recv(quick, bytes, sizeof bytes, NULL, NULL), EAGAIN);
    pb_net_close(quick);
    pb_net_close(client);
    pb_net_close(server);
}

/* test_patchbay dgram-echo NAME: binds NAME, prints "ready", then answers each packet with "c:" +
 * its bytes through pb_net_recv and pb_net_reply, until a packet "quit". */
static int run_dgram_echo(const char *name) {
    pb_broker *broker;
    pb_socket *server;
    char line[160];
    snprintf(line, sizeof line, "bind %s", name);
    if (pb_broker_open(&broker) < 0 || pb_net_open(broker, "dgram", 0, &server) < 0 || pb_net_ctl(server, line) < 0) {
        fprintf(stderr, "dgram-echo: %s\n", pb_last_reason());
        return 1;
    }
    printf("ready\n");
    fflush(stdout);
    char packet[256], answer[260];
    for (;;) {
        struct sockaddr_un from;
        socklen_t from_length = sizeof from;
        ssize_t length = pb_net_recv(server, packet, sizeof packet, &from, &from_length);
        if (length == -EINTR) continue;
        if (length < 0) {
            fprintf(stderr, "dgram-echo: pb_net_recv: %s\n", pb_last_reason());
            return 1;
        }
        size_t copied = (size_t)length < sizeof packet ? (size_t)length : sizeof packet;
        if (copied == 4 && memcmp(packet, "quit", 4) == 0) break;
        memcpy(answer, "c:", 2);
        memcpy(answer + 2, packet, copied);
        if (pb_net_reply(server, answer, copied + 2, &from, from_length) < 0)
            fprintf(stderr, "dgram-echo: pb_net_reply: %s\n", pb_last_reason());
    }
    pb_net_close(server);
    pb_broker_close(broker);
    return 0;
}

/* ---- CAPS ---- */

struct served {
    pb_caps_service *service;
    int requests;
};

/* Answers requests with "c:" + their bytes until a DISPOSE for each. */
static void *serve(void *argument) {
    struct served *served = argument;
    char buffer[256], answer[260];
    struct pb_caps_message m;
    int disposes = 0;
    while (disposes < served->requests) {
        int length = pb_caps_wait(served->service, &m, buffer, sizeof buffer);
        if (length < 0) break;
        if (m.kind == PB_CAPS_REQUEST) {
            /* A request longer than the buffer was only partly copied (and stays queued). */
            size_t copied = (size_t)length < sizeof buffer ? (size_t)length : sizeof buffer;
            memcpy(answer, "c:", 2);
            memcpy(answer + 2, buffer, copied);
            if (pb_caps_reply(served->service, m.id, answer, copied + 2) < 0) break;
        } else if (m.kind == PB_CAPS_DISPOSE) {
            disposes++;
        }
    }
    return NULL;
}

/* Echoes one request in place (of any size: one larger than the arena travels as a memfd of its
 * own), then takes its DISPOSE. */
struct echoed {
    pb_caps_service *service;
    int replied;
    int kinds[2];
};

static int echo_in_place(const struct pb_caps_message *m, const void *data, size_t length, void *context) {
    struct echoed *echoed = context;
    if (m->kind == PB_CAPS_REQUEST) {
        echoed->replied = pb_caps_reply(echoed->service, m->id, data, length);
        /* A reply that could not be sent must still end the call, or the test would hang. */
        if (echoed->replied < 0) pb_caps_reply_error(echoed->service, m->id, -echoed->replied);
    }
    return m->kind;
}

static void *echo_once(void *argument) {
    struct echoed *echoed = argument;
    echoed->kinds[0] = pb_caps_receive(echoed->service, echo_in_place, echoed);
    echoed->kinds[1] = pb_caps_receive(echoed->service, echo_in_place, echoed);
    return NULL;
}

static int read_in_place(const struct pb_caps_message *m, const void *data, size_t length, void *context) {
    memcpy(context, data, length);
    return (int)m->kind * 1000 + (int)length;
}

static void fill_in_place(void *buffer, size_t length, void *context) {
    memcpy(buffer, context, length);
}

static void *cancel_later(void *argument) {
    pb_caps_service_cancel(argument);
    return NULL;
}

static void test_caps(pb_broker *broker) {
    char name[96];
    named("c_caps_", name, sizeof name);
    pb_caps_service *service = NULL;
    pb_caps_client *client = NULL;
    FAILS(pb_caps_service_open(broker, "bad name!", PB_CAPS_USER, &service), EINVAL);
    FAILS(pb_caps_service_open(broker, name, 64, &service), EINVAL);
    FAILS(pb_caps_client_open(broker, name, 0, &client), ENOENT);
    /* The GROUP class: registered under the caller's effective gid, so its members (the caller
     * too) may connect. */
    char grouped[96];
    named("c_group_", grouped, sizeof grouped);
    pb_caps_service *group_service = NULL;
    pb_caps_client *member = NULL;
    OK(pb_caps_service_open(broker, grouped, PB_CAPS_GROUP, &group_service));
    OK(pb_caps_client_open(broker, grouped, 0, &member));
    pb_caps_client_close(member);
    pb_caps_service_close(group_service);

    /* Every argument of DragonFly's calls: the registration's uid and gid, the client's classes. */
    char keyed[96];
    named("c_keyed_", keyed, sizeof keyed);
    pb_caps_service *keyed_service = NULL;
    pb_caps_client *keyed_client = NULL;
    FAILS(pb_caps_service_register(broker, keyed, 4294967295LL, PB_CAPS_ANY, PB_CAPS_USER, &keyed_service), EINVAL);
    FAILS(pb_caps_service_register(broker, keyed, -2, PB_CAPS_ANY, PB_CAPS_USER, &keyed_service), EINVAL);
    FAILS(pb_caps_service_register(broker, keyed, geteuid(), 1LL << 32, PB_CAPS_USER, &keyed_service), EINVAL);
    OK(pb_caps_service_register(broker, keyed, geteuid(), getegid(), PB_CAPS_USER | PB_CAPS_GROUP, &keyed_service));
    FAILS(pb_caps_client_connect(broker, keyed, geteuid(), PB_CAPS_ANY, 8, 0, &keyed_client), EINVAL);
    FAILS(pb_caps_client_connect(broker, keyed, geteuid(), PB_CAPS_ANY, 0, 2, &keyed_client), EINVAL);
    FAILS(pb_caps_client_connect(broker, keyed, (int64_t)geteuid() + 1, PB_CAPS_ANY, 0, 0, &keyed_client), ENOENT);
    FAILS(pb_caps_client_connect(broker, keyed, PB_CAPS_ANY, (int64_t)getegid() + 1, 0, 0, &keyed_client), ENOENT);
    /* (The service there is this uid's: the reason does not blame its uid.) */
    CHECK(strstr(pb_last_reason(), "name that uid") == NULL && strstr(pb_last_reason(), "matching uid -1, gid") != NULL);
    FAILS(pb_caps_client_connect(broker, keyed, geteuid(), getegid(), PB_CAPS_WORLD, 0, &keyed_client), EACCES);
    OK(pb_caps_client_connect(broker, keyed, geteuid(), getegid(), PB_CAPS_GROUP, 0, &keyed_client));
    pb_caps_client_close(keyed_client);
    OK(pb_caps_client_connect(broker, keyed, PB_CAPS_ANY, PB_CAPS_ANY, PB_CAPS_USER, 0, &keyed_client));
    pb_caps_client_close(keyed_client);
    pb_caps_service_close(keyed_service);

    OK(pb_caps_service_open(broker, name, PB_CAPS_USER, &service));
    OK(pb_caps_client_open(broker, name, 0, &client));

    /* One thread: put, wait, reply, wait_reply, DISPOSE; credentials from the kernel. */
    uint64_t id = 0;
    OK(pb_caps_put(client, "hello", 5, &id));
    struct pb_caps_message m;
    char buffer[64];
    char tiny[2];
    /* A buffer too small: its worth copied, the full length returned, the message still queued. */
    CHECK(pb_caps_wait(service, &m, tiny, sizeof tiny) == 5 && memcmp(tiny, "he", 2) == 0);
    CHECK(m.length == 5 && m.kind == PB_CAPS_REQUEST);
    int length = pb_caps_wait(service, &m, buffer, sizeof buffer);
    CHECK(length == 5 && memcmp(buffer, "hello", 5) == 0);
    CHECK(m.id == id && m.kind == PB_CAPS_REQUEST && m.length == 5);
    CHECK(m.pid == getpid() && m.uid == getuid() && m.euid == geteuid() && m.gid == getegid());
    FAILS(pb_caps_reply(service, id + 1000, "x", 1), EINVAL);
    FAILS(pb_caps_reply_error(service, id, 100000), EINVAL);      /* not an errno */
    FAILS(pb_caps_set_generation(service, UINT64_MAX), EINVAL);   /* the next could not pass it */
    OK(pb_caps_reply(service, id, "world", 5));
    FAILS(pb_caps_reply(service, id, "again", 5), EINVAL);
    length = pb_caps_wait_reply(client, &m, buffer, sizeof buffer);
    CHECK(length == 5 && memcmp(buffer, "world", 5) == 0 && m.id == id && m.kind == PB_CAPS_REPLY);
    length = pb_caps_wait(service, &m, buffer, sizeof buffer);
    CHECK(length == 0 && m.kind == PB_CAPS_DISPOSE && m.id == id);
    FAILS(pb_caps_get(service, &m, buffer, sizeof buffer), EAGAIN);

    /* Zero-copy both ways. */
    OK(pb_caps_put_in_place(client, 6, fill_in_place, "inside", &id));
    char seen[64] = {0};
    CHECK(pb_caps_receive(service, read_in_place, seen) == PB_CAPS_REQUEST * 1000 + 6 && memcmp(seen, "inside", 6) == 0);
    OK(pb_caps_reply_in_place(service, id, 7, fill_in_place, "outside"));
    CHECK(pb_caps_receive_reply(client, read_in_place, seen) == PB_CAPS_REPLY * 1000 + 7 && memcmp(seen, "outside", 7) == 0);
    length = pb_caps_wait(service, &m, buffer, sizeof buffer);
    CHECK(m.kind == PB_CAPS_DISPOSE && m.id == id);

    /* An error reply: the client's call sees the errno. */
    OK(pb_caps_put(client, "?", 1, &id));
    CHECK(pb_caps_wait(service, &m, buffer, sizeof buffer) == 1);
    FAILS(pb_caps_reply_error(service, id, 0), EINVAL);
    OK(pb_caps_reply_error(service, id, EPERM));
    FAILS(pb_caps_wait_reply(client, &m, buffer, sizeof buffer), EPERM);
    /* Consumed, it is disposed of like a reply (already: pb_caps_get, so a wrong library fails
     * here rather than hangs). */
    CHECK(pb_caps_get(service, &m, buffer, sizeof buffer) == 0 && m.kind == PB_CAPS_DISPOSE && m.id == id);

    /* Abort: unread, the request is returned; read, the service is told and its reply discarded. */
    OK(pb_caps_put(client, "unread", 6, &id));
    CHECK(pb_caps_abort(client, id) == PB_CAPS_ABORT_RETURNED);
    FAILS(pb_caps_abort(client, id), EINVAL);
    FAILS(pb_caps_get(service, &m, buffer, sizeof buffer), EAGAIN);
    OK(pb_caps_put(client, "read", 4, &id));
    CHECK(pb_caps_get(service, &m, buffer, sizeof buffer) == 4 && m.id == id);
    CHECK(pb_caps_abort(client, id) == PB_CAPS_ABORT_AT_SERVICE);
    CHECK(pb_caps_get(service, &m, buffer, sizeof buffer) == 0 && m.kind == PB_CAPS_ABORTED && m.id == id);
    OK(pb_caps_reply(service, id, "late", 4));
    FAILS(pb_caps_client_get(client, &m, buffer, sizeof buffer), EAGAIN);   /* discarded, no DISPOSE */
    FAILS(pb_caps_get(service, &m, buffer, sizeof buffer), EAGAIN);

    /* Generations: the service sets, its clients read. */
    uint64_t generation = 0;
    OK(pb_caps_set_generation(service, 42));
    OK(pb_caps_generation(client, &generation));
    CHECK(generation == 42);
    FAILS(pb_caps_generation(client, NULL), EINVAL);

    /* The descriptors are readable when something waits, including what was queued before they
     * were first asked for; drained, they are not. */
    OK(pb_caps_put(client, "poll", 4, &id));
    int fd = pb_caps_service_fd(service);
    OK(fd);
    struct pollfd ready = {fd, POLLIN, 0};
    CHECK(poll(&ready, 1, 10000) == 1);
    CHECK(pb_caps_get(service, &m, buffer, sizeof buffer) == 4 && m.id == id);
    FAILS(pb_caps_get(service, &m, buffer, sizeof buffer), EAGAIN);
    CHECK(poll(&ready, 1, 0) == 0);
    OK(pb_caps_reply(service, id, "", 0));
    FAILS(pb_caps_client_get(NULL, &m, buffer, sizeof buffer), EINVAL);
    int client_fd = pb_caps_client_fd(client);
    OK(client_fd);
    struct pollfd answered = {client_fd, POLLIN, 0};
    CHECK(poll(&answered, 1, 10000) == 1);
    CHECK(pb_caps_client_get(client, &m, buffer, sizeof buffer) == 0 && m.id == id && m.kind == PB_CAPS_REPLY);
    FAILS(pb_caps_client_get(client, &m, buffer, sizeof buffer), EAGAIN);
    CHECK(poll(&answered, 1, 0) == 0);
    CHECK(pb_caps_wait(service, &m, buffer, sizeof buffer) == 0 && m.kind == PB_CAPS_DISPOSE && m.id == id);

    /* pb_caps_call with a service thread; a reply longer than the buffer is EMSGSIZE. */
    pthread_t thread;
    struct served served = {service, 3};
    CHECK(pthread_create(&thread, NULL, serve, &served) == 0);
    ssize_t answer = pb_caps_call(client, "abc", 3, buffer, sizeof buffer);
    CHECK(answer == 5 && memcmp(buffer, "c:abc", 5) == 0);
    answer = pb_caps_call(client, "", 0, buffer, sizeof buffer);
    CHECK(answer == 2 && memcmp(buffer, "c:", 2) == 0);
    FAILS(pb_caps_call(client, "long", 4, tiny, sizeof tiny), EMSGSIZE);
    CHECK(pthread_join(thread, NULL) == 0);

    /* 17 MB each way, more than the channel's 16 MiB arena: a memfd attached to each message. */
    size_t huge = 17000000;
    unsigned char *big = malloc(huge), *back = malloc(huge);
    CHECK(big != NULL && back != NULL);
    for (size_t i = 0; i < huge; i++) big[i] = (unsigned char)(i * 7 + 3);
    struct echoed echoed = {service, -1, {0, 0}};
    CHECK(pthread_create(&thread, NULL, echo_once, &echoed) == 0);
    answer = pb_caps_call(client, big, huge, back, huge);
    if (answer < 0) fprintf(stderr, "17 MB call: %s\n", pb_last_reason());
    CHECK(answer == (ssize_t)huge && memcmp(big, back, huge) == 0);
    if (answer != (ssize_t)huge) pb_caps_service_cancel(service);  /* the thread must not wait on */
    CHECK(pthread_join(thread, NULL) == 0);
    CHECK(echoed.replied == 0 && echoed.kinds[0] == PB_CAPS_REQUEST && echoed.kinds[1] == PB_CAPS_DISPOSE);
    free(big);
    free(back);

    /* Cancel a blocked wait from another thread. */
    CHECK(pthread_create(&thread, NULL, cancel_later, service) == 0);
    FAILS(pb_caps_wait(service, &m, buffer, sizeof buffer), ECANCELED);
    CHECK(pthread_join(thread, NULL) == 0);

    /* Exclusive registration; connection notices. */
    pb_caps_service *second = NULL;
    FAILS(pb_caps_service_open(broker, name, PB_CAPS_USER | PB_CAPS_EXCLUSIVE, &second), EEXIST);
    char noticed[96];
    named("c_notify_", noticed, sizeof noticed);
    OK(pb_caps_service_open(broker, noticed, PB_CAPS_NOTIFY, &second));
    pb_caps_client *visitor = NULL;
    OK(pb_caps_client_open(broker, noticed, 0, &visitor));
    CHECK(pb_caps_wait(second, &m, buffer, sizeof buffer) == 0 && m.kind == PB_CAPS_CONNECTED && m.pid == getpid());
    /* A notice's id is the client's channel id, the high half of its messages' ids. */
    uint64_t channel = m.id, visit = 0;
    CHECK(channel != 0);
    OK(pb_caps_put(visitor, "v", 1, &visit));
    CHECK(visit >> 32 == channel);
    CHECK(pb_caps_wait(second, &m, buffer, sizeof buffer) == 1 && m.kind == PB_CAPS_REQUEST && m.id == visit);
    OK(pb_caps_reply(second, visit, "w", 1));
    pb_caps_client_close(visitor);
    /* The unread reply comes back as a DISPOSE, then the departure. */
    CHECK(pb_caps_wait(second, &m, buffer, sizeof buffer) == 0 && m.kind == PB_CAPS_DISPOSE && m.id == visit);
    CHECK(pb_caps_wait(second, &m, buffer, sizeof buffer) == 0 && m.kind == PB_CAPS_DISCONNECTED && m.pid == getpid()
          && m.id == channel);
    pb_caps_service_close(second);

    /* The service goes with a request unanswered: it comes back as a 0-byte reply, then
     * -ENOTCONN; a call says the service went away. */
    OK(pb_caps_put(client, "left", 4, &id));
    CHECK(pb_caps_wait(service, &m, buffer, sizeof buffer) == 4 && m.id == id);
    pb_caps_service_close(service);
    CHECK(pb_caps_wait_reply(client, &m, buffer, sizeof buffer) == 0 && m.kind == PB_CAPS_REPLY && m.id == id && m.length == 0);
    FAILS(pb_caps_wait_reply(client, &m, buffer, sizeof buffer), ENOTCONN);
    CHECK(pb_caps_call(client, "x", 1, buffer, sizeof buffer) < 0);
    pb_caps_client_close(client);
    pb_caps_client_close(NULL);
    pb_caps_service_close(NULL);
}

/* ---- the other modes ---- */

/* A service under name that answers one request with "c:" and its bytes, and stops at its
 * DISPOSE. keyed: registered with pb_caps_service_register(uid, gid, access), else
 * pb_caps_service_open(PB_CAPS_USER). A failure to register prints "error ERRNO". */
static int run_service(const char *name, int keyed, int64_t uid, int64_t gid, unsigned access) {
    pb_broker *broker;
    pb_caps_service *service;
    if (pb_broker_open(&broker) < 0) {
        fprintf(stderr, "service: %s\n", pb_last_reason());
        return 1;
    }
    int opened = keyed ? pb_caps_service_register(broker, name, uid, gid, access, &service)
                       : pb_caps_service_open(broker, name, PB_CAPS_USER, &service);
    if (opened < 0) {
        printf("error %d\n", -opened);
        fprintf(stderr, "service: %s\n", pb_last_reason());
        return 1;
    }
    printf("ready\n");
    fflush(stdout);
    char buffer[4096], answer[4100];
    struct pb_caps_message m;
    for (;;) {
        int length = pb_caps_wait(service, &m, buffer, sizeof buffer);
        if (length < 0) {
            fprintf(stderr, "service: %s\n", pb_last_reason());
            return 1;
        }
        if (m.kind == PB_CAPS_REQUEST) {
            printf("request %llu %d %u %u\n", (unsigned long long)m.id, (int)m.pid, (unsigned)m.uid, (unsigned)m.gid);
            fflush(stdout);
            size_t copied = (size_t)length < sizeof buffer ? (size_t)length : sizeof buffer;
            memcpy(answer, "c:", 2);
            memcpy(answer + 2, buffer, copied);
            pb_caps_reply(service, m.id, answer, copied + 2);
        } else if (m.kind == PB_CAPS_DISPOSE) {
            printf("dispose %llu\n", (unsigned long long)m.id);
            fflush(stdout);
            break;
        }
    }
    pb_caps_service_close(service);
    pb_broker_close(broker);
    return 0;
}

/* One call to name, printing the reply. keyed: connected with pb_caps_client_connect(uid, gid,
 * access) at once, else pb_caps_client_open waiting for the service. A failure to connect prints
 * "error ERRNO". */
static int run_call(const char *name, const char *data, int keyed, int64_t uid, int64_t gid, unsigned access) {
    pb_broker *broker;
    pb_caps_client *client;
    if (pb_broker_open(&broker) < 0) {
        fprintf(stderr, "call: %s\n", pb_last_reason());
        return 1;
    }
    int opened = keyed ? pb_caps_client_connect(broker, name, uid, gid, access, 0, &client)
                       : pb_caps_client_open(broker, name, PB_CAPS_WAIT_FOR_SERVICE, &client);
    if (opened < 0) {
        printf("error %d\n", -opened);
        fprintf(stderr, "call: %s\n", pb_last_reason());
        return 1;
    }
    char reply[4096];
    ssize_t length = pb_caps_call(client, data, strlen(data), reply, sizeof reply);
    if (length < 0) {
        fprintf(stderr, "call: %s: %s\n", strerror((int)-length), pb_last_reason());
        return 1;
    }
    printf("%.*s\n", (int)length, reply);
    pb_caps_client_close(client);
    pb_broker_close(broker);
    return 0;
}

static int run_share(const char *path) {
    pb_broker *broker;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    char key[PB_KEY_TEXT_SIZE];
    if (fd < 0 || pb_broker_open(&broker) < 0 || pb_share(broker, fd, 60000, key) < 0) {
        fprintf(stderr, "share: %s\n", pb_last_reason());
        return 1;
    }
    close(fd);
    printf("%s\n", key);
    fflush(stdout);
    char byte;
    while (read(0, &byte, 1) > 0) {}
    pb_broker_close(broker);
    return 0;
}

/* ---- closing a service while another thread waits on it ---- */

struct closing_wait {
    pb_caps_service *service;
    volatile int tid;   /* set by the waiter, read by the main thread (only as "not yet 0") */
    int result;
};

static void *wait_to_be_closed(void *argument) {
    struct closing_wait *w = argument;
    __atomic_store_n(&w->tid, (int)syscall(SYS_gettid), __ATOMIC_RELEASE);
    struct pb_caps_message m;
    char buffer[8];
    w->result = pb_caps_wait(w->service, &m, buffer, sizeof buffer);
    return NULL;
}

/* Whether thread tid of this process is asleep (state S in /proc). */
static int thread_sleeps(int tid) {
    char path[64], text[512];
    snprintf(path, sizeof path, "/proc/self/task/%d/stat", tid);
    FILE *file = fopen(path, "r");
    if (!file) return 0;
    size_t n = fread(text, 1, sizeof text - 1, file);
    fclose(file);
    text[n] = 0;
    const char *end = strrchr(text, ')');
    return end && end[1] == ' ' && end[2] == 'S';
}

static void test_close_cancels_wait(pb_broker *broker) {
    char name[96];
    named("c_closing_", name, sizeof name);
    pb_caps_service *service = NULL;
    OK(pb_caps_service_open(broker, name, PB_CAPS_USER, &service));
    /* Three threads wait: the close cancels every one of them. */
    enum { WAITERS = 3 };
    struct closing_wait w[WAITERS];
    pthread_t threads[WAITERS];
    for (int k = 0; k < WAITERS; k++) {
        w[k] = (struct closing_wait){ service, 0, 1 };
        CHECK(pthread_create(&threads[k], NULL, wait_to_be_closed, &w[k]) == 0);
    }
    /* Until each waiter sleeps in pb_caps_wait (its state in /proc), for at most 10 s. */
    for (int k = 0; k < WAITERS; k++) {
        int asleep = 0;
        for (int i = 0; i < 10000 && !asleep; i++) {
            int tid = __atomic_load_n(&w[k].tid, __ATOMIC_ACQUIRE);
            if (tid != 0 && thread_sleeps(tid)) asleep = 1; else usleep(1000);
        }
        CHECK(asleep);
    }
    pb_caps_service_close(service);                 /* cancels the waits, then closes */
    for (int k = 0; k < WAITERS; k++) {
        struct timespec deadline;
        clock_gettime(CLOCK_REALTIME, &deadline);
        deadline.tv_sec += 10;
        int joined = pthread_timedjoin_np(threads[k], NULL, &deadline);
        CHECK(joined == 0);
        if (joined != 0) return;                    /* a waiter still blocked: reported */
        CHECK(w[k].result == -ECANCELED);
    }
    /* The service is gone: its name is free once the broker has seen its port close. */
    int gone = 0;
    for (int i = 0; i < 5000 && !gone; i++) {
        pb_caps_client *client = NULL;
        int result = pb_caps_client_open(broker, name, 0, &client);
        if (result == -ENOENT) gone = 1;
        else { pb_caps_client_close(client); usleep(1000); }
    }
    CHECK(gone);
}

int main(int argc, char **argv) {
    if (argc == 2 && strcmp(argv[1], "all") == 0) {
        snprintf(unique, sizeof unique, "%d", (int)getpid());
        test_broker();
        pb_broker *broker;
        OK(pb_broker_open(&broker));
        test_keys(broker);
        test_named(broker);
        test_anonymous();
        test_shm_anon();
        test_no_free_descriptor(broker);
        test_net(broker);
        test_dgram(broker);
        test_caps(broker);
        test_close_cancels_wait(broker);
        pb_broker_close(broker);
        printf("ok %d\n", checks);
        return 0;
    }
    if (argc == 3 && strcmp(argv[1], "service") == 0) return run_service(argv[2], 0, 0, 0, 0);
    if (argc == 6 && strcmp(argv[1], "register") == 0)
        return run_service(argv[2], 1, strtoll(argv[3], NULL, 10), strtoll(argv[4], NULL, 10), (unsigned)strtoul(argv[5], NULL, 10));
    if (argc == 4 && strcmp(argv[1], "call") == 0) return run_call(argv[2], argv[3], 0, 0, 0, 0);
    if (argc == 7 && strcmp(argv[1], "connect") == 0)
        return run_call(argv[2], argv[6], 1, strtoll(argv[3], NULL, 10), strtoll(argv[4], NULL, 10), (unsigned)strtoul(argv[5], NULL, 10));
    if (argc == 3 && strcmp(argv[1], "share") == 0) return run_share(argv[2]);
    if (argc == 3 && strcmp(argv[1], "dgram-echo") == 0) return run_dgram_echo(argv[2]);
    fprintf(stderr, "usage: test_patchbay all | service NAME | register NAME UID GID ACCESS | call NAME DATA"
                    " | connect NAME UID GID ACCESS DATA | share PATH | dgram-echo NAME\n");
    return 2;
}
