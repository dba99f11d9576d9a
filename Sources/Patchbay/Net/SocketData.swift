// A connected socket's data: its kernel socket, read and written directly (no broker involved).

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
    @discardableResult
    public func reply(_ bytes: [UInt8], to sender: Address) throws(PatchbayError) -> Int {
        let fd = try dataDescriptorOrFail()
        let result = bytes.withUnsafeBytes { raw in
            Result { () throws(Errno) -> Int in try UnixSocket.reply(on: fd, raw, to: sender.system) }
        }
        do { return try result.get() } catch { throw PatchbayError(error, "cannot answer \(sender): \(error.name)") }
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
        let fd = try dataDescriptorOrFail()
        do {
            let system = try UnixSocket.receive(on: fd, into: buffer, nonblocking: nonblocking, wantSender: wantSender)
            var received = Received(count: system.count, messageLength: system.messageLength,
                                    sender: system.sender.map(Address.init))
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
