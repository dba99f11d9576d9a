// A connected socket's data: its kernel socket, read and written directly (no broker involved).

import Glibc
import PatchbaySystem
import SystemPackage

extension Socket {

    /// The kernel socket's descriptor (for poll, epoll, or plain read/write), -1 before `data`
    /// is open. Owned by this `Socket`.
    public var dataDescriptor: CInt { dataFD }

    /// The kernel socket itself, from the factory open on (owned by this `Socket`): `listen` and
    /// `connect` are made on it by this process, and socket options set on it (`SO_SNDBUF`,
    /// `SO_PASSCRED`, ...) apply to the connection. The broker holds the same open file
    /// description: it never waits on it, whatever flags are set here.
    public var kernelDescriptor: CInt { kernelFD }

    /// Sends one message (one packet on seqpacket and dgram). Never raises SIGPIPE.
    ///
    /// - Throws: `ENOTCONN` before connect, `EPIPE` when the peer is gone, `EAGAIN` when
    ///   non-blocking and the socket is full.
    @discardableResult
    public func send(_ bytes: UnsafeRawBufferPointer) throws(PatchbayError) -> Int {
        let fd = try dataDescriptorOrFail()
        do {
            return try UnixSocket.send(on: fd, bytes, nonblocking: nonblocking)
        } catch {
            throw PatchbayError(error, Self.dataReason(error, sending: true))
        }
    }

    /// Sends one message from an array; see `send(_:)`.
    @discardableResult
    public func send(_ bytes: [UInt8]) throws(PatchbayError) -> Int {
        try bytes.withUnsafeBytes { raw in
            Result { () throws(PatchbayError) -> Int in try send(raw) }
        }.get()
    }

    /// Answers the sender of a datagram this socket received (`Received.sender`), as a server
    /// should: never waiting (a sender that does not read loses the answer: `EAGAIN`), and to a
    /// path only through the very socket file found there with no symbolic link on the way
    /// (`ELOOP`). With `send(to:)` a sender that bound its socket under a link, then pointed the
    /// link at another socket, would have the answer sent there, under this process's name.
    /// `EINVAL`, nothing sent: a sender bound at a relative path (resolved here it would name
    /// another file), under an abstract name the kernel did not choose (looked up in this
    /// process's network namespace, not the sender's), unnamed, or not among the last 64 senders
    /// this socket received from (an address made up rather than received). `EACCES`, nothing
    /// sent: the socket file at the sender's path is not the sender's uid's (a sender in a mount
    /// namespace of its own can bind at the path of any socket file, this server's own included),
    /// an autobound sender of this process's uid is not in its network namespace, or one of
    /// another uid does not hold, among its first 256 descriptors, the very socket bound at its
    /// name in this socket's network namespace (a socket made in a namespace of its own, under
    /// the name of one of this namespace's, can be handed to a process here to send from), may
    /// not be traced by this process, or is gone. `EAGAIN`, nothing sent: the receiver's queue
    /// is full, or the sender's uid's senders have had their 64 searches this second, or all
    /// uids' 256 (each reads the namespace's socket table and up to 256 of a sender's
    /// `/proc/PID/fd` links, so their number is rationed).
    @discardableResult
    public func reply(_ bytes: [UInt8], to sender: Address) throws(PatchbayError) -> Int {
        try bytes.withUnsafeBytes { raw in
            Result { () throws(PatchbayError) -> Int in try reply(raw, to: sender) }
        }.get()
    }

    /// `reply(_:to:)` from memory the caller holds.
    @discardableResult
    public func reply(_ bytes: UnsafeRawBufferPointer, to sender: Address) throws(PatchbayError) -> Int {
        let fd = try dataDescriptorOrFail()
        if let refusal = UnixSocket.replyRefusal(sender.system) { throw PatchbayError(.invalidArgument, refusal) }
        // What the kernel said of the sender: on the address a receive made, else from the last
        // senders this socket received from (an address C or Python hands back).
        var target = sender.system
        if target.senderUID == UInt32.max {
            guard let known = core.recentSenders.withLock({ $0.first { $0.bytes == target.bytes } }) else {
                throw PatchbayError(.invalidArgument, "\(sender.path ?? "that address") is not among the last \(SocketCore.recentSendersKept) senders this socket received from: only a sender is answered")
            }
            target = known
        }
        do { return try UnixSocket.reply(on: fd, bytes, to: target) } catch {
            let reason = switch error {
            case .permissionDenied where target.path != nil:
                "the socket file at \(target.path ?? "") is not the sender's (uid \(target.senderUID)): not answered, as a sender in a mount namespace of its own can bind at the path of any socket file"
            case .permissionDenied:
                target.senderUID == geteuid()
                    ? "the sender is not in this process's network namespace (or is gone): its autobound name would be looked up here"
                    : "the sender (uid \(target.senderUID)) does not hold the socket bound at its autobound name here (or may not be traced by this process, or is gone): not answered, as a socket made in another network namespace under the name of one of this one's can be sent from here"
            case .resourceTemporarilyUnavailable where target.path == nil && target.senderUID != geteuid():
                "not answered now: the receiver's queue is full, or uid \(target.senderUID)'s senders have had their \(UnixSocket.senderSearchesPerSecond) searches for their sockets this second (or all uids' \(UnixSocket.allSendersSearchesPerSecond))"
            default:
                "cannot answer \(sender.path ?? "the sender"): \(error.name)"
            }
            throw PatchbayError(error, reason)
        }
    }

    /// Sends a datagram to `address` (a name's path, or the address a received one came from:
    /// a server answering a sender it does not trust uses `reply(_:to:)`).
    @discardableResult
    public func send(_ bytes: [UInt8], to address: Address) throws(PatchbayError) -> Int {
        let fd = try dataDescriptorOrFail()
        let result = bytes.withUnsafeBytes { raw in
            Result { () throws(Errno) -> Int in try UnixSocket.send(on: fd, raw, to: address.system, nonblocking: nonblocking) }
        }
        do { return try result.get() } catch { throw PatchbayError(error, Self.dataReason(error, sending: true)) }
    }

    /// Receives one message into `buffer` (at most one packet on seqpacket and dgram; a packet
    /// longer than the buffer is cut and `truncated` says so). `isEndOfFile` tells end of file
    /// from a zero-length packet (on seqpacket, a 0-byte read is end of file only once the peer has
    /// shut down and nothing is left; an empty packet that was the very last thing the peer sent
    /// reads as end of file, as in any seqpacket reader).
    public func receive(into buffer: UnsafeMutableRawBufferPointer, wantSender: Bool = false)
        throws(PatchbayError) -> Received
    {
        try receive(into: buffer, wantSender: wantSender, interruptible: false)
    }

    /// `receive(into:wantSender:)`; `interruptible`: a signal handled while a bound datagram
    /// socket waits ends the wait with `EINTR`, as it ends a `recv(2)` (C's `pb_net_recv`, and
    /// Python, which must run its signal handlers), instead of waiting on.
    package func receive(into buffer: UnsafeMutableRawBufferPointer, wantSender: Bool, interruptible: Bool)
        throws(PatchbayError) -> Received
    {
        let fd = try dataDescriptorOrFail()
        do {
            let system: UnixSocket.Received
            if kind == .dgram && !nonblocking && core.bound != nil {
                system = try receiveWatchingTheBroker(on: fd, into: buffer, wantSender: wantSender, interruptible: interruptible)
            } else {
                system = try UnixSocket.receive(on: fd, into: buffer, nonblocking: nonblocking, wantSender: wantSender)
            }
            var received = Received(count: system.count, messageLength: system.messageLength,
                                    sender: system.sender.map(Address.init))
            if let sender = system.sender, kind == .dgram, sender.bytes.count > 2 { core.noteSender(sender) }
            if received.messageLength == 0 {
                switch kind {
                case .stream: received.isEndOfFile = true
                case .seqpacket: received.isEndOfFile = UnixSocket.zeroLengthReadIsEndOfFile(fd)
                case .dgram: break
                }
            }
            return received
        } catch {
            throw PatchbayError(error, Self.dataReason(error, sending: false))
        }
    }

    /// Receives one message as bytes; nil at end of file.
    public func receive(maximumLength: Int = 65536) throws(PatchbayError) -> (bytes: [UInt8], truncated: Bool)? {
        var buffer = [UInt8](repeating: 0, count: maximumLength)
        let received = try buffer.withUnsafeMutableBytes { raw in
            Result { () throws(PatchbayError) -> Received in try receive(into: raw) }
        }.get()
        if received.isEndOfFile { return nil }
        return (Array(buffer[0..<received.count]), received.truncated)
    }

    /// Stops sending: the peer reads what is queued, then end of file.
    public func shutdownWriting() throws(PatchbayError) {
        let fd = try dataDescriptorOrFail()
        do { try UnixSocket.shutdownWriting(on: fd) } catch { throw PatchbayError(error, "shutdown failed") }
    }

    /// A blocking receive on a bound datagram socket. A datagram server makes no broker call
    /// while it only receives, so nothing else would tell it that the broker went away, and a
    /// broker started again would not know its name (`net ls`, a `connect` through the broker's
    /// checks) while its socket file kept receiving. So while it waits, it watches its handle as
    /// well, whose broker end closes with the broker; once that happens it asks the broker
    /// that comes back to take the socket back under its name (`netAdopt`): at once, then after
    /// 0.1 s, 0.2 s, ... at most every 5 s, one connection attempt each (which fails at once
    /// while no broker listens, or starts the per-user broker where the library may), receiving
    /// in between. A refusal (the name bound there by another socket, not the caller's, or a
    /// broker that does not take datagram sockets back) ends the watch; the socket receives on.
    private func receiveWatchingTheBroker(on fd: CInt, into buffer: UnsafeMutableRawBufferPointer,
                                          wantSender: Bool, interruptible: Bool) throws(Errno) -> UnixSocket.Received {
        while true {
            do {
                return try UnixSocket.receive(on: fd, into: buffer, nonblocking: true, wantSender: wantSender)
            } catch .resourceTemporarilyUnavailable where !Self.isNonblocking(fd) {
                if !awaitDatagram(on: fd) && interruptible { throw .interrupted }
            }
        }
    }

    private static func isNonblocking(_ fd: CInt) -> Bool {
        let flags = fcntl(fd, F_GETFL)
        return flags >= 0 && flags & O_NONBLOCK != 0
    }

    /// Waits until `fd` is readable (or in error), minding the broker meanwhile (above): false
    /// when a signal handler ran instead.
    private func awaitDatagram(on fd: CInt) -> Bool {
        // A fork child's copy is its parent's socket: not its to have taken back.
        let ownSocket = !broker.madeBeforeFork(core.brokerGeneration)
        while true {
            let (handle, retryAt) = core.datagramWatch.withLock { watch -> (CInt, UInt64?) in
                switch watch {
                case .watching: (ownSocket ? core.handle.rawValue : -1, nil)
                case .takingBack(let at, _): (-1, at)
                case .done: (-1, nil)
                }
            }
            var timeout: CInt = -1
            if let retryAt {
                let now = monotonicNanoseconds()
                timeout = retryAt <= now ? 0 : CInt(min((retryAt - now + 999_999) / 1_000_000, 5_000))
            }
            // POLLRDHUP alone on the handle: it has the socket's id to read, which is no news.
            var polled = [pollfd(fd: fd, events: Int16(POLLIN), revents: 0),
                          pollfd(fd: handle, events: Int16(0x2000), revents: 0)]  // POLLRDHUP
            let ready = poll(&polled, 2, timeout)
            if ready < 0 { return errno != EINTR }  // (the receive then reports the socket's state)
            if polled[0].revents != 0 { return true }
            if handle >= 0 && polled[1].revents != 0 {
                core.datagramWatch.withLock { watch in
                    if case .watching = watch { watch = .takingBack(at: 0, delay: 100_000_000) }
                }
            }
            if retryAt != nil || (handle >= 0 && polled[1].revents != 0) { takeBack() }
        }
    }

    /// One attempt, if one is due, at having the broker that replaced the one gone take this
    /// datagram socket back under its name.
    private func takeBack() {
        core.datagramWatch.withLock { watch in
            guard case .takingBack(let at, let delay) = watch, monotonicNanoseconds() >= at,
                  let bound = core.bound else { return }
            do throws(PatchbayError) {
                var response = try broker.callConnectingOnce(
                    .net(.adopt(family: family.rawValue, type: kind.rawValue, name: bound.name)), descriptors: [kernelFD])
                guard case .net(.adopt(let newID)) = response.reply, let handle = response.takeDescriptor() else {
                    watch = .done
                    return
                }
                core.id = newID
                core.handle = Descriptor(handle)
                core.brokerGeneration = broker.reconnections
                watch = .watching
            } catch {
                switch error.errno {
                case .addressInUse, .permissionDenied, .invalidArgument, .protocolError:
                    watch = .done
                default:
                    watch = .takingBack(at: monotonicNanoseconds() &+ delay, delay: min(delay * 2, 5_000_000_000))
                }
            }
        }
    }

    private func dataDescriptorOrFail() throws(PatchbayError) -> CInt {
        guard dataFD >= 0 else {
            throw PatchbayError(.socketNotConnected, "socket \(id) is not connected (no data handle)")
        }
        return dataFD
    }

    private static func dataReason(_ error: Errno, sending: Bool) -> String {
        switch error {
        case .brokenPipe: "the peer has closed the connection"
        case .socketNotConnected: "the socket is not connected"
        case .resourceTemporarilyUnavailable: sending ? "the socket is full (non-blocking)" : "nothing to read (non-blocking)"
        case .connectionReset: "the peer reset the connection"
        case .connectionRefused: "nobody is listening at the destination"
        default: sending ? "send failed" : "receive failed"
        }
    }
}

extension Socket {
    /// Where a datagram came from (a `sockaddr_un`), to answer it with `send(_:to:)`.
    public struct Address: Sendable, Equatable {
        let system: UnixSocket.Address

        /// The raw `sockaddr_un` bytes.
        public var bytes: [UInt8] { system.bytes }

        /// An address from raw `sockaddr_un` bytes (C's and Python's answers to a sender).
        package init(bytes: [UInt8]) { system = UnixSocket.Address(bytes: bytes) }

        init(_ system: UnixSocket.Address) { self.system = system }

        /// The path, or nil for an unnamed or abstract address.
        public var path: String? { system.path }
    }

    /// What one `receive` got.
    public struct Received: Sendable {
        /// Bytes copied into the buffer.
        public var count: Int
        /// The whole message's length: larger than `count` when a packet was cut short.
        public var messageLength: Int
        /// The packet did not fit and its tail was discarded (seqpacket and dgram).
        public var truncated: Bool { messageLength > count }
        /// The sender's address, when asked for (`wantSender`).
        public var sender: Address?
        /// The peer has shut down and everything it sent has been read (stream and seqpacket).
        public var isEndOfFile = false
    }
}

/// What a bound datagram socket knows of its broker (`Socket.awaitDatagram`).
enum DatagramWatch {
    /// Its handle is watched: its broker end closes if the broker goes away.
    case watching
    /// The broker went away: the next attempt at being taken back is due at `at` (monotonic
    /// nanoseconds), the one after `delay` later.
    case takingBack(at: UInt64, delay: UInt64)
    /// Given up (refused for good).
    case done
}
