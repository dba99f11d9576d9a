/*
 * patchbay.h: Patchbay from C and C++.
 *
 * The Swift library, exported through a C ABI: keys (hand any descriptor to an unrelated
 * process), shared memory (anonymous and FreeBSD-style named objects), sockets through /net and
 * CAPS services, all through a Patchbay broker (patchbayd). Link with -lpatchbay
 * (pkg-config: patchbay).
 *
 * Conventions (as in sd-bus and liburing):
 *   - Every function that can fail returns >= 0 on success and -errno on failure; errno is not
 *     part of the answer (the system calls made on the way may leave any value in it).
 *     pb_last_reason() gives the calling thread's last failure as a sentence.
 *   - A string argument that points at memory this process cannot read is -EFAULT, as a kernel's
 *     copy-in answers, never a crash (the library reads it through process_vm_readv first, up to
 *     its NUL however far that is). A NULL string is -EINVAL ("the key is NULL"), except a shared
 *     memory name, where FreeBSD answers -EFAULT and so does this library.
 *   - Opaque handles (pb_broker, pb_caps_service, pb_caps_client, pb_socket) are made by an
 *     *_open function and freed by the matching *_close, which accepts NULL.
 *   - Descriptors returned to you are yours (close them); descriptors you pass in stay yours.
 *     Every descriptor the library makes is close-on-exec. A call whose answer is a descriptor
 *     fails with -EMFILE when this process has no free one (pb_shm_open with O_CREAT checks for
 *     one first, so it creates nothing unless another thread takes it meanwhile; pb_net_accept
 *     checks for its two first, so the connection stays queued; opening a CAPS
 *     port, which receives up to five, says -EMFILE too, and the broker forgets the port).
 *   - A pb_broker is thread-safe: calls on it are serialised over its one connection, so a
 *     call that waits (a blocking pb_net_accept on a socket made through it) holds up the
 *     broker's other calls until it returns: give such a wait a pb_broker of its own. A CAPS
 *     port is thread-safe too; a pb_socket is to be used by one thread at a time. Closing a
 *     handle while another thread is in a call on it is not allowed, with one exception:
 *     pb_caps_service_close while other threads are blocked in pb_caps_wait or
 *     pb_caps_receive cancels every one of those waits (-ECANCELED) first.
 *   - After fork, a child that calls through its parent's pb_broker gets a connection of its
 *     own on its first call (the parent keeps the old one). CAPS ports do not follow: a child's
 *     inherited ports answer -ENOTCONN, and hold nothing of the parent's port open, so a port the
 *     parent closes (or a parent that dies) is gone for its peers though the child lives on.
 *   - Strings are NUL-terminated UTF-8.
 *
 * Errors common to every call that talks to the broker: -ECONNREFUSED or -ENOENT (no broker at
 * the socket), -ECONNRESET or -EPIPE (the broker went away and did not come back within the
 * reconnection attempts, about 3.5 s per call; see "Broker restarts" in the README), -EPROTO
 * (the broker sent something unreadable).
 */
#ifndef PATCHBAY_H
#define PATCHBAY_H

#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/un.h>

#ifdef __cplusplus
extern "C" {
#endif

#define PB_VERSION_MAJOR 0
#define PB_VERSION_MINOR 1

/* ---- The broker ------------------------------------------------------------------------- */

typedef struct pb_broker pb_broker;

/* Connects to $PATCHBAY_SOCKET if set, else to this user's broker, starting it when none
 * answers (the installed patchbayd; PATCHBAY_AUTOSTART=0 disables that). *out is set on success.
 * -EACCES: the per-user directory or broker is not this user's. */
int pb_broker_open(pb_broker **out);

/* Connects to the broker listening at socket_path (no autostart). -EINVAL: socket_path is NULL
 * or empty. */
int pb_broker_open_at(pb_broker **out, const char *socket_path);

/* Closes the connection. Ports and sockets opened through it stay valid (each holds what it
 * needs). NULL is ignored. */
void pb_broker_close(pb_broker *broker);

/* The calling thread's last failure as a sentence a person understands ("" if none yet). The
 * string stays valid until the thread's next failing call. Never NULL. */
const char *pb_last_reason(void);

/* ---- Keys: share and claim a descriptor ---------------------------------------------------- */

#define PB_KEY_TEXT_SIZE 23   /* 22 characters of base64url and a NUL */
#define PB_TIMEOUT_NEVER (-1)

/* Puts fd under a new one-time key, valid for timeout_ms milliseconds (PB_TIMEOUT_NEVER: until
 * claimed or the broker stops), and writes the key's text into key. fd stays yours; the key
 * holds the same open file description.
 * -EINVAL: timeout_ms is 0 or below -1. -EBADF: fd is not open. -EDQUOT: too many outstanding
 * keys. */
int pb_share(pb_broker *broker, int fd, int64_t timeout_ms, char key[PB_KEY_TEXT_SIZE]);

/* Claims key: returns a new descriptor (close-on-exec) for the shared open file description.
 * -EINVAL: not a key's text. -ENOENT: unknown, claimed, expired or not for this process (one
 * answer for all). -EMFILE: no free descriptor here; the key stays valid. -EAGAIN: too many
 * failed claims, slowed down.
 * The file is whatever the sharer chose, and your close may be its last one, which can wait as
 * long as the sharer likes: a TCP socket with SO_LINGER, a local socket holding one in its queue
 * (reading it with read(2) drops what the queue carries, in your thread, which waits the same
 * way), a FUSE file. From a key you did not expect, close it on a thread that may wait, or leave
 * it to the process's exit, which never waits on it. */
int pb_claim(pb_broker *broker, const char *key);

#define PB_CLAIMABLE_BY_UID 1   /* pb_share_for: only this uid may claim */
#define PB_CLAIMABLE_BY_GID 2   /* only members of this group (primary or supplementary) */
#define PB_CLAIMABLE_BY_PID 3   /* only this running process (not a later one given its pid) */

/* pb_share for one claimer: who is PB_CLAIMABLE_BY_UID, _GID or _PID, and id the uid, gid or
 * pid. Anyone else's claim gets -ENOENT, as for a wrong key. -EINVAL as pb_share, or an
 * unknown who or an id out of range (including (uid_t)-1 and (gid_t)-1); -ESRCH: no running process has that pid. */
int pb_share_for(pb_broker *broker, int fd, int64_t timeout_ms, int who, int64_t id, char key[PB_KEY_TEXT_SIZE]);

/* ---- Shared memory ------------------------------------------------------------------------ */

/* FreeBSD's SHM_ANON, as a name: pb_shm_open makes a new anonymous object (see below);
 * pb_shm_rename refuses it (-EINVAL). */
#define PB_SHM_ANON ((const char *)1)

/* shm_open(3) with FreeBSD's semantics, in the broker's namespace: name starts with '/', at most
 * 1023 bytes. oflag: O_RDONLY or O_RDWR, with O_CREAT, O_EXCL, O_TRUNC (and O_CLOEXEC, always
 * in effect, as FreeBSD accepts it). New objects have size
 * 0 and mode (mode & ~umask & 0777). Returns a descriptor (close-on-exec). Checked in FreeBSD's
 * order: -EINVAL (write-only access, another flag; then a NULL broker), then the name: -EFAULT (NULL,
 * or memory that cannot be read),
 * -ENAMETOOLONG, -EINVAL (no leading '/', not UTF-8); then -ENOENT, -EEXIST, -EACCES, -EDQUOT.
 * name PB_SHM_ANON: a new anonymous object as pb_shm_anonymous(0) makes, with no broker needed
 * (broker may be NULL); oflag must be O_RDWR (-EINVAL for O_RDONLY, as FreeBSD), O_CREAT,
 * O_EXCL, O_TRUNC and O_CLOEXEC in it are ignored (any other flag is still -EINVAL, as above),
 * and so is mode. */
int pb_shm_open(pb_broker *broker, const char *name, int oflag, mode_t mode);

/* shm_unlink(3): removes the name; descriptors and mappings keep working. -ENOENT, -EACCES;
 * -EFAULT: name is NULL, PB_SHM_ANON or unreadable. */
int pb_shm_unlink(pb_broker *broker, const char *name);

#define PB_SHM_RENAME_NOREPLACE 1   /* fail with -EEXIST if `to` exists */
#define PB_SHM_RENAME_EXCHANGE  2   /* swap the two names atomically */

/* shm_rename(2) (FreeBSD), atomic. flags: 0 (replace `to`), or one of the two above. Checked in
 * FreeBSD's order: -EINVAL (another flag, both flags, from or to PB_SHM_ANON), then the names
 * (each in turn, `from` first: -EFAULT for NULL or unreadable memory, -ENAMETOOLONG, -EINVAL without
 * its leading '/'), then -ENOENT, -EEXIST, -EACCES. */
int pb_shm_rename(pb_broker *broker, const char *from, const char *to, int flags);

#define PB_SHM_SEALABLE 1   /* allow Linux memfd seals (F_ADD_SEALS) on the object */

/* A new anonymous object (a memfd, made in this process: no broker needed), size 0 until its
 * first pb_shm_map or an ftruncate. Returns a descriptor (close-on-exec; share it with pb_share).
 * -EINVAL: unknown flags. */
int pb_shm_anonymous(unsigned flags);

/* mmap(2) of a shared memory object, MAP_SHARED, at offset 0, with the PatchworkOS rule for
 * anonymous objects: the first mapping of an object of size 0 fixes its size (length, rounded up
 * to the page size), decided under a lock so that two processes racing cannot both size it; a
 * later mapping longer than the object is -EINVAL. Named objects map as mmap does (past the size
 * is allowed; touching it is SIGBUS). prot: PROT_READ, or PROT_READ | PROT_WRITE. Unmap with
 * munmap(2). -EACCES: a writable mapping of a read-only descriptor (or of a read-only-claimed
 * one); -EPERM: sealed against writes; -EINVAL: length 0, bad prot; -ENOMEM: the kernel could
 * not map that much (a first mapping that fails leaves the object of size 0); -EAGAIN: the object
 * has no size yet and another process has held its lock for 2 s; -EBADF, -ENODEV:
 * fd is not open, or not something mmap can map. */
int pb_shm_map(int fd, size_t length, int prot, void **address);

/* ---- Sockets through /net ---------------------------------------------------------------- */

/* A /net socket (PatchworkOS): opened from a factory (/net/local/<type>), driven by ctl
 * command lines ("bind NAME [MODE]", "listen [BACKLOG]", "connect NAME", joined with "&&"),
 * with the kernel socket itself as its data path once connected. */
typedef struct pb_socket pb_socket;

#define PB_NET_NONBLOCK 1   /* accept returns -EAGAIN instead of waiting, and pb_net_data's
                               descriptor is O_NONBLOCK (recv/send say EAGAIN) */

/* Opens /net/local/<type>: type is "seqpacket", "stream" or "dgram". A new socket in state NEW.
 * -EINVAL: unknown type or flags. -EDQUOT: too many sockets. */
int pb_net_open(pb_broker *broker, const char *type, unsigned flags, pb_socket **out);

/* Writes a command line to the socket's ctl file. The whole line is checked first, then each
 * command runs in order, stopping at the first failure. -EINVAL (unknown command, bad argument,
 * a transition the state machine does not allow), -EADDRINUSE, -ECONNREFUSED, -ENOENT,
 * -EACCES, -EAGAIN (a full backlog). */
int pb_net_ctl(pb_socket *socket, const char *command);

/* Accepts one connection on a listening socket: waits (unless PB_NET_NONBLOCK was given to
 * pb_net_open, or flags has it), and sets *out to the connected socket.
 * -EINVAL: not listening. -EAGAIN. -ECONNABORTED: the listener closed while this waited.
 * -EMFILE: no room in this process for the connection's two descriptors, checked before it is
 * taken: it stays queued for the next accept (unless another thread takes the room meanwhile). */
int pb_net_accept(pb_socket *listener, unsigned flags, pb_socket **out);

/* The socket's kernel descriptor for data (send/recv/poll/epoll), once connected or accepted
 * (or, for dgram, bound and opened with pb_net_ctl's "bind"). The descriptor belongs to the
 * socket: do not close it. -ENOTCONN before that.
 * A peer can send descriptors with its bytes (SCM_RIGHTS). read() or recv() make the kernel
 * close them in the calling thread, and the last close of one can wait as long as the sender
 * chose (a TCP socket with SO_LINGER). Against a peer you do not trust, receive with recvmsg(),
 * room for 253 descriptors (SCM_MAX_FD) and MSG_CMSG_CLOEXEC, turn a socket's lingering off
 * (SO_LINGER, l_onoff 0) and close what came on a thread that may wait, with a bound on how many
 * wait there, as pb_net_recv, the Swift library and the Python package do. */
int pb_net_data(pb_socket *socket);

/* Receives one message from the socket's data (connected, accepted, or a bound dgram), as
 * recvfrom(2) on pb_net_data's descriptor would, with what a server needs done for it:
 *   - Returns the message's whole length: more than capacity when a seqpacket or dgram packet
 *     was cut (the rest is discarded); 0 at end of file, or for an empty packet (as recv(2)).
 *   - from, if not NULL, receives the sender's address (dgram; *fromlen in: the room at from,
 *     out: the address's whole length, 0 for an unnamed sender), to answer with pb_net_reply.
 *   - A /net socket takes no descriptors at all (SO_PASSRIGHTS off, Linux 6.16: a peer's
 *     SCM_RIGHTS is -EPERM): anyone may send to a bound dgram one, and a close of a descriptor a
 *     peer chose drops this process's POSIX locks on that file. Turn it back on on pb_net_fd's
 *     descriptor to take them (again after a broker restart, whose broker takes the socket back
 *     with it off); they are then received and closed on a thread of the library's,
 *     lingering off (see pb_net_data), never in the caller's thread.
 *   - A blocking receive on a bound dgram socket also minds its broker: after a broker restart
 *     it has the broker that comes back take the socket back under its name (as a listener's
 *     next pb_net_accept does; see "Broker restarts" in the README), receiving in between.
 *     A server that only polls pb_net_data's descriptor is not taken back.
 * -EAGAIN: PB_NET_NONBLOCK and nothing queued. -EINTR: a signal handler ran while a bound dgram
 * socket waited (other waits go on across a signal).
 * -ENOTCONN: not connected (or, for dgram, not bound). -ENOBUFS: 64 descriptors this socket's
 * peers sent wait to be closed (their closes do not finish): the socket is shut for reading. -EINVAL: NULL socket, NULL buffer with a capacity, from without
 * fromlen. Otherwise recvmsg(2)'s errors. */
ssize_t pb_net_recv(pb_socket *socket, void *buffer, size_t capacity, struct sockaddr_un *from, socklen_t *fromlen);

/* Answers the sender of a datagram pb_net_recv received (to, tolen: its from and *fromlen),
 * as a server should: never waiting (a sender that does not read loses the answer: -EAGAIN),
 * and to a path only through the very socket file found there with no symbolic link in any
 * component (-ELOOP): sendto(2) to a path would follow a link the sender bound under and then
 * pointed at another socket, and send the answer there in this process's name. An autobound
 * sender (an abstract name the kernel chose: 5 hex digits) is sent to as it is. Returns the bytes
 * sent. Only one of the last 64 senders this socket received from is answered, with what the
 * kernel said of it (its uid and pid, SO_PASSCRED): -EINVAL, nothing sent, for any other
 * address, a sender bound at a relative path (it would name a file relative to this process's
 * directory), under an abstract name of its own choosing (looked up in this process's network
 * namespace, not the sender's), or unnamed; NULL socket, NULL data with a length, NULL to, tolen
 * not that of a sockaddr_un. -EACCES, nothing sent: the socket file at the sender's path is not
 * the sender's uid's (a sender in a mount namespace of its own can bind at the path of any
 * socket file, this server's own included), an autobound sender of this process's uid is not in
 * its network namespace, or one of another uid does not hold, among its first 256 descriptors,
 * the very socket bound at its name in the socket's network namespace (or may not be traced by
 * this process, or is gone). -EAGAIN, nothing sent: the receiver's queue is full, or the
 * sender's uid's senders have had their 64 searches this second (all uids' 256). -EAFNOSUPPORT:
 * not AF_UNIX;
 * -ECONNREFUSED, -ENOENT: nothing bound there now; otherwise sendto(2)'s errors. */
ssize_t pb_net_reply(pb_socket *socket, const void *data, size_t length, const struct sockaddr_un *to, socklen_t tolen);

/* The socket's kernel descriptor, from pb_net_open on (the one pb_net_data returns once data is
 * open): for poll/epoll and socket options. A listener's is readable when a connection waits,
 * so an event loop polls it and then calls pb_net_accept with PB_NET_NONBLOCK (-EAGAIN if another
 * acceptor took it first). It belongs to the socket: do not close it, and do not accept(2) on it
 * (the connection would have no id). After a broker restart that kept no sockets, a listener gets
 * a new kernel socket at its next pb_net_accept: ask again then. -EINVAL: NULL. */
int pb_net_fd(pb_socket *socket);

/* The socket's id (its directory is /net/local/<id>/). */
uint64_t pb_net_id(const pb_socket *socket);

/* Convenience: open, "bind NAME && listen", for seqpacket or stream (type): -EOPNOTSUPP for
 * dgram (datagram sockets do not listen); otherwise pb_net_open's and pb_net_ctl's errors. */
int pb_net_listen(pb_broker *broker, const char *name, const char *type, pb_socket **out);

/* Convenience: open, "connect NAME". */
int pb_net_connect(pb_broker *broker, const char *name, const char *type, pb_socket **out);

/* Closes the socket (its handle, and its kernel socket here). NULL is ignored. The broker learns
 * of it when it reads the handle's hang-up, on its next turn (well under a millisecond when idle,
 * a few under load): until then the socket still counts against this uid's socket quota, so an
 * open right after closing at the quota may be -EDQUOT for that moment. */
void pb_net_close(pb_socket *socket);

/* ---- CAPS (DragonFly BSD) --------------------------------------------------------------- */

typedef struct pb_caps_service pb_caps_service;
typedef struct pb_caps_client  pb_caps_client;

#define PB_CAPS_USER  1   /* clients of the service's uid may connect */
#define PB_CAPS_GROUP 2   /* clients in the service's group (its registrar's effective gid) may connect */
#define PB_CAPS_WORLD 4   /* anyone may connect */
#define PB_CAPS_NOTIFY 8      /* pb_caps_service_open: also deliver CONNECTED and DISCONNECTED */
#define PB_CAPS_EXCLUSIVE 16  /* pb_caps_service_open: -EEXIST if a live registration has the same
                                 name, uid and gid (another uid or gid may still register the name) */

#define PB_CAPS_WAIT_FOR_SERVICE 1   /* pb_caps_client_open waits until the name is registered */

#define PB_CAPS_ANY (-1)   /* pb_caps_service_register, pb_caps_client_connect: no uid or no gid */

enum pb_caps_kind {
    PB_CAPS_REQUEST = 1,       /* a client's request: answer with pb_caps_reply */
    PB_CAPS_REPLY = 2,         /* the service's answer (a client's message) */
    PB_CAPS_DISPOSE = 3,       /* the client consumed the reply, or went away: its space is free */
    PB_CAPS_ABORTED = 4,       /* the client aborted a request the service had read */
    PB_CAPS_CONNECTED = 5,     /* a client connected (services opened with PB_CAPS_NOTIFY only) */
    PB_CAPS_DISCONNECTED = 6   /* a client went away (idem) */
};

/* A message's header. For a service, the credentials are the client's, from the kernel
 * (SO_PEERCRED when the client connected); uid is the real uid, euid the effective one. For a
 * client (replies), they are 0: the client chose its service by name. */
struct pb_caps_message {
    uint64_t id;       /* the message id: reply with it (CONNECTED, DISCONNECTED: the client's
                          channel id, the high 32 bits of its messages' ids) */
    int kind;          /* enum pb_caps_kind */
    size_t length;     /* the payload's full length */
    pid_t pid;
    uid_t uid;
    uid_t euid;
    gid_t gid;
};

/* Registers a service under name (1 to 63 of [0-9A-Za-z_.]) for the caller's effective uid and,
 * with PB_CAPS_GROUP, its effective gid (the group whose members may connect).
 * access: a mask of PB_CAPS_USER, PB_CAPS_GROUP, PB_CAPS_WORLD (none of the three: PB_CAPS_USER),
 * with PB_CAPS_NOTIFY and PB_CAPS_EXCLUSIVE. -EINVAL (name, unknown bits), -ENAMETOOLONG,
 * -EEXIST (PB_CAPS_EXCLUSIVE and a live registration has this name, uid and gid; or another uid
 * has the name), -EACCES (a name the broker's policy reserves to another user or group),
 * -EDQUOT. */
int pb_caps_service_open(pb_broker *broker, const char *name, unsigned access, pb_caps_service **out);

/* DragonFly's caps_sys_service with every argument: pb_caps_service_open, registered under uid
 * and gid as given (PB_CAPS_ANY: not registered under that key; PB_CAPS_USER admits clients
 * whose effective uid is uid, PB_CAPS_GROUP members of gid, so neither admits anyone through
 * PB_CAPS_ANY). Clients that name a uid or gid find only registrations under it. A caller other
 * than root may give only its own effective uid and a gid it is a member of: -EPERM otherwise.
 * -EINVAL also for an id out of range (0 to 4294967294, or PB_CAPS_ANY). */
int pb_caps_service_register(pb_broker *broker, const char *name, int64_t uid, int64_t gid, unsigned access,
                             pb_caps_service **out);

/* Waits for the next message (REQUEST, DISPOSE, ABORTED, or a notice) and copies its payload
 * into buffer. Returns the payload's full length (capped at INT_MAX; m->length has it whole). When that is more than
 * capacity, only capacity bytes were copied and the message stays queued for a call with a
 * larger buffer (DragonFly's rule). -ECANCELED: pb_caps_service_cancel was called.
 * A broker restart is ridden out: the service registers again by itself (while a thread waits
 * here, or when an event loop calls pb_caps_get), its clients' channels working throughout. If it
 * cannot (the name taken meanwhile, or no broker within the reconnection attempts), every
 * pb_caps_wait, pb_caps_receive and pb_caps_get that finds nothing left from its clients returns
 * -ECONNRESET from then on (the reason says why): close the port and register anew. */
int pb_caps_wait(pb_caps_service *service, struct pb_caps_message *m, void *buffer, size_t capacity);

/* pb_caps_wait without waiting: -EAGAIN when nothing is queued. */
int pb_caps_get(pb_caps_service *service, struct pb_caps_message *m, void *buffer, size_t capacity);

/* Zero-copy receive: waits for the next message and calls read with its header and payload in
 * place, in the shared memory the client wrote it to (valid only during the call). Returns
 * what read returns (which should be >= 0). */
int pb_caps_receive(pb_caps_service *service,
                    int (*read)(const struct pb_caps_message *m, const void *data, size_t length, void *context),
                    void *context);

/* Replies to request id with length bytes of data. -EINVAL: not a request read and awaiting a
 * reply (unknown id, answered already, a DISPOSE); -EMSGSIZE: 4 GiB or more (at most
 * 4 GiB - 1 bytes, a message's length field being 32 bits). */
int pb_caps_reply(pb_caps_service *service, uint64_t id, const void *data, size_t length);

/* Zero-copy reply: fill writes the reply's length bytes in place, in the client's shared memory. */
int pb_caps_reply_in_place(pb_caps_service *service, uint64_t id, size_t length,
                           void (*fill)(void *buffer, size_t length, void *context), void *context);

/* Answers request id with an errno instead of bytes: the client's pb_caps_call returns -error.
 * A request pb_caps_wait showed but left queued (longer than the buffer) may be answered so: it
 * is taken unread, so a service with a fixed buffer refuses what does not fit (say, EMSGSIZE)
 * instead of meeting it again at every wait.
 * -EINVAL: error not an errno (1 to 4095) or id not a pending request; -ENOBUFS: the client's reply ring is full. */
int pb_caps_reply_error(pb_caps_service *service, uint64_t id, int error);

/* Sets this service's generation, which its clients read with pb_caps_generation (a restarted
 * service starts past every generation its name had; see DragonFly's caps_sys_setgen).
 * -EINVAL: UINT64_MAX (the next registration could not start past it). */
int pb_caps_set_generation(pb_caps_service *service, uint64_t generation);

/* A descriptor that is readable when a message may be waiting: for poll/epoll (messages queued
 * before the first call included). When readable, drain with pb_caps_get until -EAGAIN. Belongs
 * to the service: do not close it. */
int pb_caps_service_fd(pb_caps_service *service);

/* Makes one pb_caps_wait (or pb_caps_receive) blocked in another thread return -ECANCELED; if
 * none is blocked, the next one that would block returns -ECANCELED at once. */
void pb_caps_service_cancel(pb_caps_service *service);

/* Unregisters the service; its clients see the service gone. NULL is ignored. */
void pb_caps_service_close(pb_caps_service *service);

/* Connects to the service registered under name (flags: PB_CAPS_WAIT_FOR_SERVICE).
 * -ENOENT: no such service (or none this user may reach). */
int pb_caps_client_open(pb_broker *broker, const char *name, unsigned flags, pb_caps_client **out);

/* DragonFly's caps_sys_client with every argument: connects to the newest service registered
 * under name, uid and gid (PB_CAPS_ANY: any; naming no uid finds only services this user can
 * trust, as pb_caps_client_open: its own uid's, root's, or the name's owners' by the broker's
 * policy; naming one finds that uid's, whoever it is), admitted through a class both sides set:
 * access is a mask of PB_CAPS_USER, PB_CAPS_GROUP, PB_CAPS_WORLD (0: all three, as
 * pb_caps_client_open). flags: PB_CAPS_WAIT_FOR_SERVICE. -ENOENT: no such service; -EACCES: no
 * class both sides set admits this process; -EINVAL: unknown bits, or an id out of range (0 to
 * 4294967294, or PB_CAPS_ANY). */
int pb_caps_client_connect(pb_broker *broker, const char *name, int64_t uid, int64_t gid, unsigned access,
                           unsigned flags, pb_caps_client **out);

/* Sends a request and waits for its reply, which is copied into reply. Returns the reply's
 * length. -EMSGSIZE: the reply was longer than capacity (it is discarded); -ECONNRESET: the
 * service went away first; the errno a service answered with pb_caps_reply_error (anything not
 * 1 to 4095 is -EIO); -ENOBUFS: too many requests in flight. Replies that come first for other
 * threads' calls are kept for them (no longer than each one's capacity: past it they get
 * -EMSGSIZE), and those to pb_caps_put requests for pb_caps_get, pb_caps_wait_reply and
 * pb_caps_receive_reply (copied, up to the channel's 16 MiB of payload space for all kept at
 * once: past it such a reply shows -EMSGSIZE instead of its bytes; descriptors it carried are
 * closed). It waits as long as the service takes: a service that never answers (stopped, or
 * another user's that chooses not to, or one whose reply the library drops as malformed) holds
 * it for ever. With a service not trusted to answer, use pb_caps_put, then poll
 * pb_caps_client_fd with a deadline of your own and pb_caps_client_get, and pb_caps_abort at
 * the deadline. */
ssize_t pb_caps_call(pb_caps_client *client, const void *request, size_t length, void *reply, size_t capacity);

/* Sends a request without waiting; *id is its message id. -EMSGSIZE: 4 GiB or more (as
 * pb_caps_reply); -ENOBUFS: too many requests in flight. */
int pb_caps_put(pb_caps_client *client, const void *data, size_t length, uint64_t *id);

/* Takes request id back. Returns PB_CAPS_ABORT_RETURNED (the service had not read it: it is
 * gone, its reply never comes) or PB_CAPS_ABORT_AT_SERVICE (the service has it and is told; its
 * reply is discarded). -EINVAL: id is not a request of this client in flight. */
#define PB_CAPS_ABORT_RETURNED 0
#define PB_CAPS_ABORT_AT_SERVICE 1
int pb_caps_abort(pb_caps_client *client, uint64_t id);

/* The service's generation (DragonFly's caps_sys_getgen), into *generation: read from the
 * service's status page, which stays mapped, so it answers (the last generation the service
 * set) after the service has gone too, where the other calls say -ENOTCONN. */
int pb_caps_generation(pb_caps_client *client, uint64_t *generation);

/* Zero-copy request: fill writes length bytes in place, in the shared memory the service reads. */
int pb_caps_put_in_place(pb_caps_client *client, size_t length,
                         void (*fill)(void *buffer, size_t length, void *context), void *context, uint64_t *id);

/* Waits for the next reply and copies it into buffer (m->kind is PB_CAPS_REPLY, m->id the
 * request's id). Returns its full length (capped at INT_MAX; m->length has it whole), or the
 * errno the service answered with (negated).
 * More than capacity: as pb_caps_wait (only capacity bytes copied; the reply stays queued).
 * A request the service left unanswered when it went away comes back as a 0-byte reply; once
 * they are all back, -ENOTCONN. */
int pb_caps_wait_reply(pb_caps_client *client, struct pb_caps_message *m, void *buffer, size_t capacity);

/* pb_caps_wait_reply without waiting: -EAGAIN when no reply is queued. */
int pb_caps_client_get(pb_caps_client *client, struct pb_caps_message *m, void *buffer, size_t capacity);

/* Zero-copy: waits for the next reply and calls read with it in place (valid only during the
 * call); the reply is disposed of afterwards. Returns what read returns. An error reply returns
 * its -errno, and a request the service went away without answering -ECONNRESET (then, once
 * none is left, -ENOTCONN), without calling read, as pb_caps_call does. */
int pb_caps_receive_reply(pb_caps_client *client,
                          int (*read)(const struct pb_caps_message *m, const void *data, size_t length, void *context),
                          void *context);

/* A descriptor readable when a reply may be waiting (for poll/epoll), including replies that
 * arrived before the first call; when readable, drain with pb_caps_client_get until -EAGAIN.
 * Belongs to the client: do not close it. */
int pb_caps_client_fd(pb_caps_client *client);

/* Disconnects; the service gets DISPOSEs for what was left. NULL is ignored. */
void pb_caps_client_close(pb_caps_client *client);

#ifdef __cplusplus
}
#endif

#endif /* PATCHBAY_H */
