package import SystemPackage
import Glibc
import Synchronization
import CPatchbayShims

/// An `AF_UNIX` socket of any type (`SOCK_STREAM`, `SOCK_SEQPACKET`, `SOCK_DGRAM`): what
/// `/net/local` sockets are made of.
@frozen
package struct UnixSocket: ~Copyable {
    package enum Kind: CInt, Sendable, CaseIterable {
        case stream = 1  // SOCK_STREAM
        case datagram = 2  // SOCK_DGRAM
        case seqpacket = 5  // SOCK_SEQPACKET
    }

    /// Where a datagram came from (a `sockaddr_un`), to answer it with `send(_:to:)`.
    package struct Address: Sendable, Equatable {
        package var bytes: [UInt8]
        /// The sender's pid and uid as the kernel reported them with its datagram
        /// (`SCM_CREDENTIALS`; 0 and `UInt32.max` when not known).
        package var senderPID: Int32 = 0
        package var senderUID = UInt32.max
        package init(bytes: [UInt8]) { self.bytes = bytes }
        package init(bytes: [UInt8], senderPID: Int32, senderUID: UInt32) {
            self.bytes = bytes
            self.senderPID = senderPID
            self.senderUID = senderUID
        }
        /// The path, or nil for an unnamed or abstract address.
        package var path: String? {
            guard bytes.count > 2, bytes[2] != 0 else { return nil }
            return String(decoding: bytes[2...].prefix { $0 != 0 }, as: UTF8.self)
        }
    }

    package var descriptor: Descriptor

    package init(adopting descriptor: consuming Descriptor) {
        self.descriptor = descriptor
    }

    /// The corresponding C call is `socket(AF_UNIX, kind | SOCK_CLOEXEC)`.
    package init(_ kind: Kind) throws(Errno) {
        let fd = try syscallRetrying { socket(AF_UNIX, kind.rawValue | CInt(SOCK_CLOEXEC.rawValue), 0) }
        descriptor = Descriptor(adopting: fd)
    }

    package var rawValue: CInt { descriptor.rawValue }

    /// The uid of the process at the other end, as the kernel recorded it when that process
    /// connected or listened (`SO_PEERCRED`).
    package borrowing func peerUID() throws(Errno) -> UInt32 {
        var raw = pb_ucred()
        _ = try syscallRetrying { pb_peer_credentials(descriptor.rawValue, &raw) }
        return raw.uid
    }

    package borrowing func bind(path: String) throws(Errno) {
        var address = try UnixAddress(path: path)
        _ = try syscallRetrying { address.withSockaddr { Glibc.bind(descriptor.rawValue, $0, $1) } }
    }

    package borrowing func listen(backlog: CInt) throws(Errno) {
        _ = try syscallRetrying { Glibc.listen(descriptor.rawValue, backlog) }
    }

    /// Connects without ever blocking: the socket is non-blocking for the call only, so a full
    /// backlog is `EAGAIN` instead of a wait. The corresponding C call is `connect`.
    package borrowing func connectWithoutBlocking(path: String) throws(Errno) {
        var address = try UnixAddress(path: path)
        try descriptor.setNonblocking(true)
        defer { try? descriptor.setNonblocking(false) }
        while true {
            if address.withSockaddr({ Glibc.connect(descriptor.rawValue, $0, $1) }) == 0 { return }
            let error = Errno.current
            if error == .socketIsConnected { return }
            if error != .interrupted { throw error }
        }
    }

    /// The credentials the kernel recorded for the other end (`SO_PEERCRED`): on a connected
    /// socket, the process that connected or listened there; on a listening socket, the process
    /// that called `listen`.
    package borrowing func peerCredentials() throws(Errno) -> (pid: Int32, uid: UInt32, gid: UInt32) {
        try Self.peerCredentials(of: descriptor.rawValue)
    }

    /// `peerCredentials` of a socket descriptor owned elsewhere.
    package static func peerCredentials(of fd: CInt) throws(Errno) -> (pid: Int32, uid: UInt32, gid: UInt32) {
        var raw = pb_ucred()
        _ = try syscallRetrying { pb_peer_credentials(fd, &raw) }
        return (raw.pid, raw.uid, raw.gid)
    }

    /// Whether `listen` was called on the socket (`SO_ACCEPTCONN`).
    /// The socket type (`SO_TYPE`: `SOCK_STREAM`, `SOCK_DGRAM`, `SOCK_SEQPACKET`) and family
    /// (`SO_DOMAIN`), to check a descriptor a client handed over.
    package borrowing func typeAndFamily() throws(Errno) -> (type: CInt, family: CInt) {
        var type: CInt = 0
        var family: CInt = 0
        var length = socklen_t(MemoryLayout<CInt>.size)
        _ = try syscallRetrying { getsockopt(descriptor.rawValue, SOL_SOCKET, SO_TYPE, &type, &length) }
        length = socklen_t(MemoryLayout<CInt>.size)
        _ = try syscallRetrying { getsockopt(descriptor.rawValue, SOL_SOCKET, SO_DOMAIN, &family, &length) }
        return (type, family)
    }

    package borrowing func isListening() -> Bool {
        var value: CInt = 0
        var length = socklen_t(MemoryLayout<CInt>.size)
        return getsockopt(descriptor.rawValue, SOL_SOCKET, SO_ACCEPTCONN, &value, &length) == 0 && value != 0
    }

    /// The path of the socket this one is connected to, or nil when it is not connected or the
    /// peer has no path (`getpeername`).
    package borrowing func peerPath() -> String? {
        var storage = sockaddr_un()
        var length = socklen_t(MemoryLayout<sockaddr_un>.size)
        let status = withUnsafeMutablePointer(to: &storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getpeername(descriptor.rawValue, $0, &length) }
        }
        guard status == 0 else { return nil }
        let bytes = withUnsafeBytes(of: storage) { Array($0.prefix(Int(length))) }
        return Address(bytes: bytes).path
    }

    /// Accepts one connection on a listener whose open file description others also hold, never
    /// waiting: `EAGAIN` when none is pending, `ETIMEDOUT` when a holder had switched the listener
    /// to blocking mode (the flag is set again; an accept that blocked all the same is interrupted
    /// after `timeoutMicroseconds`). Close-on-exec.
    package borrowing func acceptWithoutWaiting(timeoutMicroseconds: Int = 200) throws(Errno) -> UnixSocket {
        let fd = pb_accept_bounded(descriptor.rawValue, timeoutMicroseconds)
        guard fd >= 0 else { throw Errno.current }
        return UnixSocket(adopting: Descriptor(adopting: fd))
    }

    /// listen(2) on a socket descriptor owned elsewhere.
    package static func listen(on fd: CInt, backlog: Int32) throws(Errno) {
        _ = try syscallRetrying { Glibc.listen(fd, backlog) }
    }

    /// connect(2) on a socket descriptor owned elsewhere, never waiting for room in the listener's
    /// backlog (`EAGAIN` instead): non-blocking for the call only.
    package static func connectWithoutBlocking(on fd: CInt, path: String) throws(Errno) {
        var address = try UnixAddress(path: path)
        let flags = fcntl(fd, F_GETFL)
        guard flags >= 0 else { throw Errno.current }
        if flags & O_NONBLOCK == 0 { _ = fcntl(fd, F_SETFL, flags | O_NONBLOCK) }
        defer { if flags & O_NONBLOCK == 0 { _ = fcntl(fd, F_SETFL, flags) } }
        while true {
            if address.withSockaddr({ Glibc.connect(fd, $0, $1) }) == 0 { return }
            let error = Errno.current
            if error != .interrupted { throw error }
        }
    }

    /// The path a socket descriptor is bound to, or nil when it is unbound or abstract
    /// (`getsockname`).
    package static func localPath(of fd: CInt) -> String? {
        var storage = sockaddr_un()
        var length = socklen_t(MemoryLayout<sockaddr_un>.size)
        let status = withUnsafeMutablePointer(to: &storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
        }
        guard status == 0 else { return nil }
        let bytes = withUnsafeBytes(of: storage) { Array($0.prefix(Int(length))) }
        return Address(bytes: bytes).path
    }

    /// Accepts one connection (blocking unless the socket is non-blocking), close-on-exec.
    package borrowing func accept() throws(Errno) -> UnixSocket {
        UnixSocket(adopting: Descriptor(adopting: try syscallRetrying { pb_accept4(descriptor.rawValue, 0) }))
    }

    /// Sends one message (one packet on seqpacket and dgram), never raising `SIGPIPE`.
    /// `nonblocking` uses `MSG_DONTWAIT` for this call only.
    package borrowing func send(_ bytes: UnsafeRawBufferPointer, nonblocking: Bool = false) throws(Errno) -> Int {
        try Self.send(on: descriptor.rawValue, bytes, nonblocking: nonblocking)
    }

    /// Sends a datagram to `address`.
    package borrowing func send(_ bytes: UnsafeRawBufferPointer, to address: Address, nonblocking: Bool = false) throws(Errno) -> Int {
        try Self.send(on: descriptor.rawValue, bytes, to: address, nonblocking: nonblocking)
    }

    /// `send` on a socket descriptor owned elsewhere.
    package static func send(on fd: CInt, _ bytes: UnsafeRawBufferPointer, nonblocking: Bool = false) throws(Errno) -> Int {
        let flags = CInt(MSG_NOSIGNAL) | (nonblocking ? CInt(MSG_DONTWAIT) : 0)
        return try syscallRetrying { Glibc.send(fd, bytes.baseAddress, bytes.count, flags) }
    }

    /// Answers the sender of a received datagram: never waits (a receiver whose queue is full
    /// loses the answer: `EAGAIN`), and to a path only through the very socket file found there
    /// with no symbolic link in any component (`ELOOP`), so a sender that binds under a link and
    /// then points the link elsewhere cannot have the answer sent, in this process's name, to
    /// another socket. Abstract and autobound addresses are sent to as they are.
    package static func reply(on fd: CInt, _ bytes: UnsafeRawBufferPointer, to address: Address) throws(Errno) -> Int {
        if replyRefusal(address) != nil { throw .invalidArgument }
        guard let path = address.path else {
            try checkAutoboundSender(address, on: fd)
            return try send(on: fd, bytes, to: address, nonblocking: true)
        }
        let file = path.withCString { pb_open_socket_file($0) }
        guard file >= 0 else { throw Errno.current }
        defer { close(file) }
        // The path is the sender's, in its own mount namespace: here it may name another file
        // (a sender in a namespace of its own binds at the path of any socket of root's, or of
        // this very server's). The file found must be the sender's uid's, as the kernel reported
        // the sender (eighteenth and nineteenth attack rounds).
        var info = stat()
        guard fstat(file, &info) == 0, address.senderUID != UInt32.max, info.st_uid == address.senderUID else {
            throw .permissionDenied
        }
        var target = try UnixAddress(path: "/proc/self/fd/\(file)")
        return try syscallRetrying {
            target.withSockaddr { sendto(fd, bytes.baseAddress, bytes.count, CInt(MSG_NOSIGNAL) | CInt(MSG_DONTWAIT), $0, $1) }
        }
    }

    /// Why a sender's address is not answered (`EINVAL`), or nil. A path that is not absolute is
    /// the sender's own directory's business: resolved in the server's, it names another file,
    /// which a sender could choose (a root-only socket beside a root server's working directory).
    /// An abstract name is looked up in the server's network namespace, whatever namespace the
    /// sender bound it in: a sender in a namespace of its own could name any abstract socket of
    /// the server's (systemd's, a desktop bus's) and have the server send to it. Only an
    /// autobound name (the kernel's choice: five hex digits, which `connect` and `send` of an
    /// unbound datagram socket get) is answered. An unnamed sender cannot be answered at all.
    package static func replyRefusal(_ address: Address) -> String? {
        let bytes = address.bytes
        guard bytes.count > 2 else { return "the sender is unnamed: it cannot be answered" }
        if bytes[2] == 0 {
            let name = bytes[3...]
            let hex = name.allSatisfy { (0x30...0x39).contains($0) || (0x61...0x66).contains($0) }
            return name.count == 5 && hex ? nil
                : "the sender's abstract name is not one the kernel gave it (an autobound one): not answered, as it would be looked up in this process's network namespace"
        }
        guard bytes[2] == UInt8(ascii: "/") else {
            return "the sender's path is relative to its own directory: not answered, as it would name a file relative to this process's"
        }
        return nil
    }

    /// Refuses (`EACCES`) to answer an autobound sender whose name, looked up in `fd`'s network
    /// namespace, may reach a socket that is not the sender's. One of this process's uid must be
    /// in that namespace itself (by the pid the kernel reported): a sender in a namespace of its
    /// own can bind the name of any autobound socket here (they are listed in `/proc/net/unix`;
    /// nineteenth attack round). One of another uid must hold, among its first
    /// `senderDescriptorsSearched` descriptors, the very socket bound at that name in this
    /// namespace (the kernel's socket table names its inode; the sender's `/proc/PID/fd` links
    /// name its sockets'): a socket it made in a namespace of its own, under the name of one of
    /// this uid's, and sends from a process here, passes the first check (twentieth attack
    /// round). Nothing of the sender's is opened, copied or connected to: a copy closed here
    /// would drop this process's POSIX locks on whatever file the sender had swapped in
    /// (twenty-first round), and a probe connected to the name fails for a sender connected to
    /// this server.
    /// Reading the links takes the rights to trace the sender (a root server has them; another
    /// finds the first check refusing as well).
    package static func checkAutoboundSender(_ address: Address, on fd: CInt) throws(Errno) {
        guard address.senderUID != UInt32.max, address.senderPID > 0 else { throw .permissionDenied }
        guard address.senderUID != geteuid() else {
            guard senderSharesNetworkNamespace(address) else { throw .permissionDenied }
            return
        }
        let name = Array(address.bytes.dropFirst(3))
        let key = AutoboundSender(pid: address.senderPID, name: name)
        // Where this sender held it last time: taken as it is for a second after it was last
        // looked at (a lookup by inode walks the namespace's socket table, whose size any user
        // can raise), then looked at again: that socket still bound at the name here, and still
        // the sender's descriptor there (one socket looked up, one link read).
        let now = monotonicNanoseconds()
        if let known = autoboundSenders.withLock({ $0.held[key] }) {
            if now &- known.checked < 1_000_000_000 { return }
            let named = name.withUnsafeBytes { raw in
                pb_socket_has_abstract_name(fd, known.inode, raw.baseAddress?.assumingMemoryBound(to: CChar.self), raw.count)
            }
            if named == 1, pb_process_socket_descriptor(address.senderPID, known.inode, known.descriptor, 0) == known.descriptor {
                autoboundSenders.withLock { $0.remember(key, at: known.descriptor, inode: known.inode, now: now) }
                return
            }
        }
        // Else a search: the namespace's whole socket table, then up to 256 of the sender's
        // links. Rationed per uid and in all, as a sender chooses how many sockets and
        // descriptors there are to read (and, with a user namespace of its own, its uids).
        guard autoboundSenders.withLock({ $0.mayScan(uid: address.senderUID, now: now) }) else {
            throw .resourceTemporarilyUnavailable
        }
        var inode: UInt32 = 0
        let found = name.withUnsafeBytes { raw in
            pb_abstract_socket_inode(fd, raw.baseAddress?.assumingMemoryBound(to: CChar.self), raw.count, &inode)
        }
        guard found == 0 else { throw .permissionDenied }
        let held = pb_process_socket_descriptor(address.senderPID, inode, -1, senderDescriptorsSearched)
        guard held >= 0 else { throw .permissionDenied }
        autoboundSenders.withLock { $0.remember(key, at: held, inode: inode, now: now) }
    }

    /// How many of another uid's sender's descriptors are searched for its socket.
    package static let senderDescriptorsSearched: CInt = 256
    /// How many such searches one uid's senders may cost this process per second, and all uids'.
    package static let senderSearchesPerSecond = 64
    package static let allSendersSearchesPerSecond = 256

    private struct AutoboundSender: Hashable {
        var pid: CInt
        var name: [UInt8]
    }

    /// Where senders of other uids held their sockets (at most 1,024 kept), and this second's
    /// searches, by uid (at most 1,024 uids; past that, only the total counts) and in all.
    private struct AutoboundSenders {
        var held: [AutoboundSender: (descriptor: CInt, inode: UInt32, checked: UInt64)] = [:]
        var second: UInt64 = 0
        var searches: [UInt32: Int] = [:]
        var total = 0

        mutating func mayScan(uid: UInt32, now: UInt64) -> Bool {
            let current = now / 1_000_000_000
            if current != second {
                second = current
                searches.removeAll(keepingCapacity: true)
                total = 0
            }
            let count = searches[uid] ?? 0
            guard total < UnixSocket.allSendersSearchesPerSecond, count < UnixSocket.senderSearchesPerSecond else { return false }
            total += 1
            if searches.count < 1024 || searches[uid] != nil { searches[uid] = count + 1 }
            return true
        }

        mutating func remember(_ sender: AutoboundSender, at descriptor: CInt, inode: UInt32, now: UInt64) {
            if held.count >= 1024, held[sender] == nil { held.removeAll(keepingCapacity: true) }
            held[sender] = (descriptor, inode, now)
        }
    }

    private static let autoboundSenders = Mutex(AutoboundSenders())

    /// Whether an autobound sender is in this process's network namespace, where its abstract
    /// name is looked up: one in a namespace of its own can bind the name of any autobound socket
    /// here (they are listed in `/proc/net/unix`). By the pid the kernel reported with its
    /// datagram (a sender no longer there, or in a pid namespace this one cannot see, is not).
    package static func senderSharesNetworkNamespace(_ address: Address) -> Bool {
        guard address.senderPID > 0 else { return false }
        func namespace(_ path: String) -> String? {
            var link = [CChar](repeating: 0, count: 64)
            let count = readlink(path, &link, link.count - 1)
            return count > 0 ? String(decoding: link.prefix(count).map { UInt8(bitPattern: $0) }, as: UTF8.self) : nil
        }
        guard let own = namespace("/proc/self/ns/net"), let sender = namespace("/proc/\(address.senderPID)/ns/net") else { return false }
        return own == sender
    }

    /// `sendto` on a socket descriptor owned elsewhere.
    package static func send(on fd: CInt, _ bytes: UnsafeRawBufferPointer, to address: Address, nonblocking: Bool = false)
        throws(Errno) -> Int
    {
        let flags = CInt(MSG_NOSIGNAL) | (nonblocking ? CInt(MSG_DONTWAIT) : 0)
        return try syscallRetrying {
            address.bytes.withUnsafeBytes { raw in
                sendto(fd, bytes.baseAddress, bytes.count, flags,
                       raw.baseAddress!.assumingMemoryBound(to: sockaddr.self), socklen_t(raw.count))
            }
        }
    }

    /// What one receive got.
    package struct Received: Sendable {
        /// Bytes copied into the buffer.
        package var count: Int
        /// The whole message's length: larger than `count` when a packet was cut short.
        package var messageLength: Int
        /// The packet did not fit and its tail was discarded (seqpacket and dgram).
        package var truncated: Bool { messageLength > count }
        package var sender: Address?
        /// The peer has shut down and everything it sent has been read (stream and seqpacket).
        package var isEndOfFile = false
    }

    /// Receives one message (one packet on seqpacket and dgram). `count == 0` on a stream or
    /// seqpacket socket with no truncation means end of file... or a zero-length packet, which
    /// seqpacket also allows; `messageLength` cannot tell them apart either, as in the kernel.
    package borrowing func receive(into buffer: UnsafeMutableRawBufferPointer, nonblocking: Bool = false,
                                  wantSender: Bool = false) throws(Errno) -> Received {
        try Self.receive(on: descriptor.rawValue, into: buffer, nonblocking: nonblocking, wantSender: wantSender)
    }

    /// `recvmsg` on a socket descriptor owned elsewhere. Descriptors the peer sent with the data
    /// (this API takes none) are closed on a closing thread of that socket's own, never here: a
    /// plain `recv` has the kernel close them in this thread, where a lingering TCP socket's
    /// close would wait up to its linger time.
    package static func receive(on fd: CInt, into buffer: UnsafeMutableRawBufferPointer, nonblocking: Bool = false,
                               wantSender: Bool = false) throws(Errno) -> Received {
        // A peer whose descriptors wait to be closed past the bound (one of their closes does not
        // finish) gets nothing more read: the socket is shut for reading, and this fails, rather
        // than pile them up in this process.
        let owner = 1 << 62 | UInt64(UInt32(bitPattern: fd))
        if PeerDescriptors.pastBound(of: owner) {
            shutdown(fd, CInt(SHUT_RD))
            throw .noBufferSpace
        }
        // MSG_TRUNC makes recvmsg return the real length of a packet that did not fit.
        let flags = CInt(MSG_TRUNC) | (nonblocking ? CInt(MSG_DONTWAIT) : 0)
        var storage = sockaddr_un()
        var length = CUnsignedInt(MemoryLayout<sockaddr_un>.size)
        var senderPID: CInt = 0
        var senderUID = UInt32.max
        let total = try withUnsafeTemporaryAllocation(of: CInt.self, capacity: maximumDescriptorsReceived) { fds throws(Errno) -> Int in
            var count: CInt = 0
            var received: CInt = 0
            let total = withUnsafeMutableBytes(of: &storage) { name in
                pb_recv_message(fd, buffer.baseAddress, buffer.count, flags, wantSender ? name.baseAddress : nil, &length,
                                fds.baseAddress, CInt(fds.count), &count, &received, &senderPID, &senderUID)
            }
            for index in 0..<Int(count) { PeerDescriptors.close(fds[index], of: owner) }
            guard total >= 0 else { throw Errno.current }
            return total
        }
        let sender = wantSender
            ? withUnsafeBytes(of: &storage) { Address(bytes: Array($0.prefix(Int(length))), senderPID: senderPID, senderUID: senderUID) }
            : nil
        return Received(count: min(total, buffer.count), messageLength: total, sender: sender)
    }

    /// After a seqpacket `recv` returned 0 bytes: was it end of file, or a zero-length packet?
    /// The kernel answers both with 0. End of file needs the peer to have shut down, and nothing
    /// left to read after it (a peek returns 0 again). The one case this cannot tell, as no
    /// seqpacket reader can, is an empty packet that was the very last thing the peer sent.
    package static func zeroLengthReadIsEndOfFile(_ fd: CInt) -> Bool {
        guard peerHasShutDown(fd) else { return false }
        var byte: UInt8 = 0
        return recv(fd, &byte, 1, CInt(MSG_PEEK) | CInt(MSG_DONTWAIT)) == 0
    }

    /// Whether the peer has shut down its writing side (or closed): `poll` reports `POLLRDHUP`.
    package static func peerHasShutDown(_ fd: CInt) -> Bool {
        var poller = pollfd(fd: fd, events: Int16(0x2000), revents: 0)  // POLLRDHUP
        guard poll(&poller, 1, 0) > 0 else { return false }
        return poller.revents & Int16(0x2000 | 0x10) != 0  // POLLRDHUP | POLLHUP
    }

    /// Whether the connection is shut both ways (`POLLHUP`): for a connected local socket, its
    /// peer has closed (or shut down both directions), or this end was shut down both ways.
    package static func hasHungUp(_ fd: CInt) -> Bool {
        var poller = pollfd(fd: fd, events: 0, revents: 0)
        guard poll(&poller, 1, 0) > 0 else { return false }
        return poller.revents & Int16(0x10) != 0  // POLLHUP
    }

    /// Sets `SO_PASSCRED`, which makes Linux give an unbound socket an autobound (abstract)
    /// address when it connects or sends, so a datagram peer can answer it.
    package borrowing func enableCredentialPassing() throws(Errno) {
        var one: CInt = 1
        _ = try syscallRetrying {
            setsockopt(descriptor.rawValue, SOL_SOCKET, SO_PASSCRED, &one, socklen_t(MemoryLayout<CInt>.size))
        }
    }

    /// `shutdown(SHUT_WR)`: the peer reads end of file after the queued data.
    package borrowing func shutdownWriting() throws(Errno) {
        try Self.shutdownWriting(on: descriptor.rawValue)
    }

    package static func shutdownWriting(on fd: CInt) throws(Errno) {
        _ = try syscallRetrying { Glibc.shutdown(fd, CInt(SHUT_WR)) }
    }
}
