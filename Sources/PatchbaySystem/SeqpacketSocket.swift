package import SystemPackage
import Glibc
package import CPatchbayShims

/// The most descriptors one message carries, in either direction.
package let maximumDescriptorsPerMessage = 16

/// The most descriptors one message can bring (the kernel's `SCM_MAX_FD`). A receive takes them
/// all, so that none is closed inside `recvmsg` by the kernel, in the receiving thread; what a
/// message brings beyond `maximumDescriptorsPerMessage` is refused by the caller, who decides
/// where it is closed.
package let maximumDescriptorsReceived = 253

/// Descriptors received with a message. Each one is owned here and closed when this value ends,
/// unless it was taken out first, so a rejected request can never leak what it carried.
package struct ReceivedDescriptors: ~Copyable {
    private var raw: [CInt]

    init(_ raw: [CInt]) { self.raw = raw }

    /// How many descriptors are still held.
    package var count: Int { raw.count }
    /// The first descriptor's number, still owned here (to look at it, not to keep it).
    package var first: CInt? { raw.first }

    /// Takes the first descriptor still held, if any.
    package mutating func takeFirst() -> Descriptor? {
        guard !raw.isEmpty else { return nil }
        return Descriptor(adopting: raw.removeFirst())
    }

    deinit {
        for fd in raw { _ = Glibc.close(fd) }
    }
}

/// What `receive` got: a datagram's length plus the truncation flags the kernel reported.
@frozen
package struct ReceivedMessage: ~Copyable {
    /// Bytes copied into the buffer.
    package var length: Int
    /// The message was longer than the buffer (`MSG_TRUNC`); the rest is lost.
    package var truncated: Bool
    /// Descriptors were dropped (`MSG_CTRUNC`): the receiver was out of descriptors (`EMFILE`) or
    /// the sender sent more than fit.
    package var descriptorsTruncated: Bool
    package var descriptors: ReceivedDescriptors
    /// The process that sent this very message, as the kernel recorded it when it was sent
    /// (`SCM_CREDENTIALS`); 0 unless the socket has `SO_PASSCRED` (`enableSenderCredentials`).
    /// Unlike the connection's credentials, a process that inherited the connection, or was
    /// given it, is told from the one that made it.
    package var senderPID: pid_t = 0
}

/// Kernel-verified identity of the process at the other end of a Unix socket.
package struct PeerCredentials: Sendable, Hashable {
    package var pid: pid_t
    package var uid: UInt32
    package var gid: UInt32
    /// Supplementary groups (`SO_PEERGROUPS`), as captured when the connection was made.
    package var groups: [UInt32]
    /// When the process that connected started (`processStartTime`), read through a pidfd of
    /// that very process (`SO_PEERPIDFD`) when the connection was accepted; nil if it had exited
    /// by then. With `pid`, it tells that process from a later one given the same pid.
    package var startTime: UInt64?
    /// `pidfdInode` of that pidfd (Linux 6.9 on): tells apart processes started in the same tick.
    package var processInode: UInt64?
    /// Its command name (`comm`), read with the start time: what monitors show, even once the
    /// process has exited.
    package var command: String?

    package init(pid: pid_t, uid: UInt32, gid: UInt32, groups: [UInt32], startTime: UInt64? = nil, processInode: UInt64? = nil,
                 command: String? = nil) {
        self.pid = pid
        self.uid = uid
        self.gid = gid
        self.groups = groups
        self.startTime = startTime
        self.processInode = processInode
        self.command = command
    }

    /// Whether the process that connected is `process`, still running: same pid, same start, and
    /// where pidfds have inodes of their own, the same process inode.
    package func isProcess(_ process: ProcessHandle) -> Bool {
        pid == process.pid && startTime != nil && startTime == process.startTime && processInode == process.inode
            && !process.hasExited
    }

    /// Whether the peer belongs to `group`, as primary or supplementary group.
    package func isMember(of group: UInt32) -> Bool {
        gid == group || groups.contains(group)
    }
}

/// An `AF_UNIX` socket of type `SOCK_SEQPACKET`: reliable, ordered, message boundaries kept,
/// descriptors carried with `SCM_RIGHTS`.
@frozen
package struct SeqpacketSocket: ~Copyable {
    package var descriptor: Descriptor

    package init(adopting descriptor: consuming Descriptor) {
        self.descriptor = descriptor
    }

    /// A new unbound socket. The corresponding C call is `socket(AF_UNIX, SOCK_SEQPACKET)`.
    package init(nonblocking: Bool = false) throws(Errno) {
        var type = CInt(SOCK_SEQPACKET.rawValue) | CInt(SOCK_CLOEXEC.rawValue)
        if nonblocking { type |= CInt(SOCK_NONBLOCK.rawValue) }
        let fd = try syscallRetrying { socket(AF_UNIX, type, 0) }
        descriptor = Descriptor(adopting: fd)
    }

    /// A connected pair. The corresponding C call is `socketpair`.
    package static func pair() throws(Errno) -> SocketPair {
        var fds: [CInt] = [-1, -1]
        let type = CInt(SOCK_SEQPACKET.rawValue) | CInt(SOCK_CLOEXEC.rawValue)
        _ = try syscallRetrying { socketpair(AF_UNIX, type, 0, &fds) }
        return SocketPair(
            first: SeqpacketSocket(adopting: Descriptor(adopting: fds[0])),
            second: SeqpacketSocket(adopting: Descriptor(adopting: fds[1])))
    }

    package var rawValue: CInt { descriptor.rawValue }

    /// Binds to a filesystem path. The corresponding C call is `bind`.
    package borrowing func bind(path: String) throws(Errno) {
        var address = try UnixAddress(path: path)
        _ = try syscallRetrying {
            address.withSockaddr { Glibc.bind(descriptor.rawValue, $0, $1) }
        }
    }

    /// The corresponding C call is `listen`.
    package borrowing func listen(backlog: CInt) throws(Errno) {
        _ = try syscallRetrying { Glibc.listen(descriptor.rawValue, backlog) }
    }

    /// Connects to a listening socket at `path`. The corresponding C call is `connect`.
    package borrowing func connect(path: String) throws(Errno) {
        var address = try UnixAddress(path: path)
        // An AF_UNIX connect interrupted while waiting for backlog room leaves the socket
        // unconnected, so it is simply retried; EISCONN means an earlier attempt got through.
        while true {
            if address.withSockaddr({ Glibc.connect(descriptor.rawValue, $0, $1) }) == 0 { return }
            let error = Errno.current
            if error == .socketIsConnected { return }
            if error != .interrupted { throw error }
        }
    }

    /// Accepts one connection, close-on-exec. `EAGAIN` when none waits on a non-blocking socket.
    /// The corresponding C call is `accept4`.
    package borrowing func accept(nonblocking: Bool) throws(Errno) -> SeqpacketSocket {
        let fd = try syscallRetrying { pb_accept4(descriptor.rawValue, nonblocking ? 1 : 0) }
        return SeqpacketSocket(adopting: Descriptor(adopting: fd))
    }

    /// Sends one message with `descriptors` attached (`SCM_RIGHTS`), never raising `SIGPIPE`.
    /// The corresponding C call is `sendmsg`.
    package borrowing func send(
        _ bytes: UnsafeRawBufferPointer, descriptors: [CInt] = [], nonblocking: Bool = false
    ) throws(Errno) -> Int {
        let sent = descriptors.withUnsafeBufferPointer { fds in
            pb_send_with_fds(descriptor.rawValue, bytes.baseAddress, bytes.count,
                             fds.baseAddress, CInt(fds.count), nonblocking ? 1 : 0)
        }
        if sent < 0 { throw Errno.current }
        return sent
    }

    /// Sends a whole byte array as one message; see `send(_:descriptors:nonblocking:)`.
    package borrowing func send(
        _ bytes: [UInt8], descriptors: [CInt] = [], nonblocking: Bool = false
    ) throws(Errno) {
        _ = try bytes.withUnsafeBytes { raw in
            Result { () throws(Errno) -> Int in try send(raw, descriptors: descriptors, nonblocking: nonblocking) }
        }.get()
    }

    /// Receives one message and every descriptor sent with it (`MSG_CMSG_CLOEXEC`). A length of 0
    /// with no descriptors means the peer closed. The corresponding C call is `recvmsg`.
    package borrowing func receive(
        into buffer: UnsafeMutableRawBufferPointer, nonblocking: Bool = false
    ) throws(Errno) -> ReceivedMessage {
        var fds = [CInt](repeating: -1, count: maximumDescriptorsReceived)
        var fdCount: CInt = 0
        var flags: CInt = 0
        var sender: CInt = 0
        let length = fds.withUnsafeMutableBufferPointer { fdBuffer in
            pb_recv_message(descriptor.rawValue, buffer.baseAddress, buffer.count, nonblocking ? CInt(MSG_DONTWAIT) : 0, nil, nil,
                            fdBuffer.baseAddress, CInt(fdBuffer.count), &fdCount, &flags, &sender, nil)
        }
        if length < 0 { throw Errno.current }
        return ReceivedMessage(
            length: length,
            truncated: flags & pb_msg_trunc() != 0,
            descriptorsTruncated: flags & pb_msg_ctrunc() != 0,
            descriptors: ReceivedDescriptors(Array(fds[0..<Int(fdCount)])),
            senderPID: sender)
    }

    /// Sets `SO_PASSCRED`: from now on each message received says which process sent it
    /// (`ReceivedMessage.senderPID`). (On a connected socket, which has an address already, it
    /// binds nothing.)
    package borrowing func enableSenderCredentials() throws(Errno) {
        var one: CInt = 1
        guard setsockopt(descriptor.rawValue, SOL_SOCKET, SO_PASSCRED, &one, socklen_t(MemoryLayout<CInt>.size)) == 0 else {
            throw Errno.current
        }
    }

    /// The peer's pid, uid, gid and supplementary groups, from the kernel
    /// (`SO_PEERCRED` and `SO_PEERGROUPS`).
    package borrowing func peerCredentials() throws(Errno) -> PeerCredentials {
        var raw = pb_ucred()
        _ = try syscallRetrying { pb_peer_credentials(descriptor.rawValue, &raw) }
        // NGROUPS_MAX is 65536; 1024 covers every real system and bounds memory per session.
        let capacity = 1024
        var groups = [UInt32](repeating: 0, count: capacity)
        let total = try syscallRetrying {
            groups.withUnsafeMutableBufferPointer { pb_peer_groups(descriptor.rawValue, $0.baseAddress, CInt(capacity)) }
        }
        let (stat, inode) = peerProcess(pid: raw.pid)
        return PeerCredentials(pid: raw.pid, uid: raw.uid, gid: raw.gid,
                               groups: Array(groups[0..<min(Int(total), capacity)]),
                               startTime: stat?.startTime, processInode: inode, command: stat?.command)
    }

    /// The connecting process's start time and pidfd inode, through a pidfd the kernel took of it
    /// at `connect` (`SO_PEERPIDFD`, Linux 6.5), or else one opened now by its pid (a narrow race:
    /// the process gone and its pid reused between `connect` and now).
    private borrowing func peerProcess(pid: pid_t) -> ((command: String, startTime: UInt64)?, UInt64?) {
        var pidfd: CInt = -1
        var length = socklen_t(MemoryLayout<CInt>.size)
        if getsockopt(descriptor.rawValue, SOL_SOCKET, 77 /* SO_PEERPIDFD */, &pidfd, &length) != 0 || pidfd < 0 {
            pidfd = pb_pidfd_open(pid)
        }
        guard pidfd >= 0 else { return (nil, nil) }
        defer { Glibc.close(pidfd) }
        return (verifiedProcessStat(pid: pid, pidfd: pidfd), pidfdInode(pidfd))
    }

    /// The socket type (`SO_TYPE`), to check an inherited descriptor is what we expect.
    package borrowing func socketType() throws(Errno) -> CInt {
        var type: CInt = 0
        var length = socklen_t(MemoryLayout<CInt>.size)
        _ = try syscallRetrying { getsockopt(descriptor.rawValue, SOL_SOCKET, SO_TYPE, &type, &length) }
        return type
    }

    /// Whether the socket is listening (`SO_ACCEPTCONN`).
    package borrowing func isListening() throws(Errno) -> Bool {
        var value: CInt = 0
        var length = socklen_t(MemoryLayout<CInt>.size)
        _ = try syscallRetrying { getsockopt(descriptor.rawValue, SOL_SOCKET, SO_ACCEPTCONN, &value, &length) }
        return value != 0
    }
}

extension SeqpacketSocket {
    /// `sendmsg` of one buffer and descriptors on a socket owned elsewhere; -1 with errno set.
    package static func sendRaw(_ fd: CInt, _ bytes: UnsafeRawBufferPointer, _ descriptors: UnsafeBufferPointer<CInt>,
                               nonblocking: Bool = false) -> Int {
        pb_send_with_fds(fd, bytes.baseAddress, bytes.count, descriptors.baseAddress, CInt(descriptors.count), nonblocking ? 1 : 0)
    }

    /// `sendRaw` with up to 253 descriptors in one message, past the protocol's 16: only for the
    /// project's tests and test peer, which send what a hostile peer could.
    package static func sendRights(_ fd: CInt, _ bytes: UnsafeRawBufferPointer, _ descriptors: UnsafeBufferPointer<CInt>,
                                   nonblocking: Bool = false) -> Int {
        pb_send_rights(fd, bytes.baseAddress, bytes.count, descriptors.baseAddress, CInt(descriptors.count), nonblocking ? 1 : 0)
    }

    /// `recvmsg` on a socket owned elsewhere: the length and the raw descriptors received (the
    /// caller owns them), and whether the message was longer than `buffer` (`MSG_TRUNC`: the rest
    /// is lost); nil with errno set.
    package static func receiveRaw(_ fd: CInt, _ buffer: UnsafeMutableRawBufferPointer, nonblocking: Bool = false)
        -> (length: Int, descriptors: [CInt], truncated: Bool)?
    {
        var fds = [CInt](repeating: -1, count: maximumDescriptorsReceived)
        var count: CInt = 0
        var flags: CInt = 0
        let length = fds.withUnsafeMutableBufferPointer { pointer in
            pb_recv_with_fds(fd, buffer.baseAddress, buffer.count, pointer.baseAddress, CInt(pointer.count), &count, &flags,
                             nonblocking ? 1 : 0)
        }
        guard length >= 0 else { return nil }
        return (length, Array(fds[0..<Int(count)]), flags & CInt(MSG_TRUNC) != 0)
    }
}

/// Two connected sockets from `socketpair`.
@frozen
package struct SocketPair: ~Copyable {
    package var first: SeqpacketSocket
    package var second: SeqpacketSocket
}

/// A `sockaddr_un`, with the path length checked (`ENAMETOOLONG`).
struct UnixAddress {
    var storage = sockaddr_un()

    init(path: String) throws(Errno) {
        storage.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        let capacity = MemoryLayout.size(ofValue: storage.sun_path)
        guard !bytes.isEmpty, !bytes.contains(0) else { throw Errno.invalidArgument }
        guard bytes.count < capacity else { throw Errno.fileNameTooLong }
        withUnsafeMutableBytes(of: &storage.sun_path) { raw in
            raw.copyBytes(from: bytes)
        }
    }

    mutating func withSockaddr<R>(_ body: (UnsafePointer<sockaddr>, socklen_t) -> R) -> R {
        withUnsafePointer(to: &storage) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                body($0, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
    }
}
