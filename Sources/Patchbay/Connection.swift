import CPatchbayShims
import Glibc
import PatchbayProtocol
import PatchbaySystem
import SystemPackage

/// A reply, with the descriptors it carried.
struct Response: ~Copyable {
    var reply: Reply
    var descriptors: ReceivedDescriptors
    /// The kernel dropped an attached descriptor (`MSG_CTRUNC`): we had no free slot.
    var descriptorLost: Bool

    /// The first descriptor, if any.
    mutating func takeDescriptor() -> PatchbaySystem.Descriptor? { descriptors.takeFirst() }
}

/// One control connection to the broker: request ids, frames, and the descriptors riding along.
/// Not thread-safe by itself; `Broker` serialises access.
struct Connection: ~Copyable {
    let socket: SeqpacketSocket
    private var nextRequestID: UInt64 = 1
    private let buffer: UnsafeMutableRawBufferPointer
    /// The connection is gone (the broker closed it or died): nothing more can be said on it.
    private(set) var isBroken = false
    /// When broken: the last request never left this process (safe to send again elsewhere).
    private(set) var lastRequestUnsent = false
    /// The process's fork generation when this connection was made.
    private let createdIn = forkGeneration()

    /// Released in fork children (`releaseInForkChildren`).
    private var releasedInForkChildren = false

    init(socket: consuming SeqpacketSocket) {
        self.socket = socket
        buffer = .allocate(byteCount: maximumFrameSize, alignment: 16)
    }

    /// Makes fork children let go of this connection's socket (it refers to /dev/null there), for
    /// a connection whose closing tells the broker its owner is gone: a CAPS port's. Without it a
    /// child that does not exec would keep a closed or dead service registered (its clients
    /// waiting for answers that cannot come), or a closed client's requests undisposed, for as
    /// long as it lives. The child's own copies of the port answer ENOTCONN either way.
    mutating func releaseInForkChildren() {
        guard !releasedInForkChildren else { return }
        releasedInForkChildren = pb_fork_release_add(socket.rawValue) == 0
    }

    /// Whether this process is a `fork` child of the one that made the connection: the socket is
    /// the parent's too, and a request sent on it could be answered to either process.
    var isInherited: Bool { forkGenerationSeen() != createdIn }

    deinit {
        // Before the socket closes: a later descriptor given its number must not be released.
        if releasedInForkChildren { pb_fork_release_remove(socket.rawValue) }
        buffer.deallocate()
    }

    /// Sends a request that gets no reply.
    mutating func post(_ request: Request) throws(PatchbayError) {
        let id = nextRequestID
        nextRequestID &+= 1
        do {
            try socket.send(request.encode(requestID: id))
        } catch {
            noteFailure(error, unsent: true)
            throw Self.transportError(error)
        }
    }

    /// Sends `request` with `descriptors` attached and waits for its reply.
    mutating func call(_ request: Request, descriptors: [CInt] = []) throws(PatchbayError) -> Response {
        let id = nextRequestID
        nextRequestID &+= 1
        do {
            try socket.send(request.encode(requestID: id), descriptors: descriptors)
        } catch {
            // A broker that refused this connection sent why before closing; that frame is
            // still queued here, and says more than EPIPE.
            if let refusal = pendingRefusal() { throw refusal }
            noteFailure(error, unsent: true)
            throw Self.transportError(error)
        }
        while true {
            var message: ReceivedMessage
            do {
                message = try socket.receive(into: buffer)
            } catch {
                // The kernel reports the broker's close (ECONNRESET) before frames still queued;
                // reading that error clears it, so a refusal sent before the close is still there.
                if error == .connectionReset, let refusal = pendingRefusal() { throw refusal }
                noteFailure(error, unsent: false)
                throw Self.transportError(error)
            }
            if message.length == 0 && message.descriptors.count == 0 {
                noteFailure(.connectionReset, unsent: false)
                throw PatchbayError(.connectionReset, "the broker closed the connection")
            }
            if message.truncated {
                throw PatchbayError(.protocolError, "the broker sent a frame larger than \(maximumFrameSize) bytes")
            }
            let frame: Frame
            do {
                frame = try Frame.decode(Array(UnsafeRawBufferPointer(rebasing: buffer[0..<message.length]))[...])
            } catch {
                throw PatchbayError(.protocolError, "the broker sent a bad frame: \(error.reason)")
            }
            if frame.kind == .error, frame.requestID == 0 || frame.requestID == id {
                // Request id 0 is about the connection itself (for example: this uid is refused).
                let reply = (try? ErrorReply.decode(frame))
                    ?? ErrorReply(errno: EPROTO, reason: "the broker sent an unreadable error")
                throw PatchbayError(reply)
            }
            // A frame for an earlier request nobody waits for any more: drop it (and its fds).
            guard frame.requestID == id else { continue }
            let reply: Reply
            do {
                reply = try Reply.decode(frame)
            } catch {
                throw PatchbayError(.protocolError, "the broker sent a bad reply: \(error.reason)")
            }
            guard reply.opcode == request.opcode else {
                throw PatchbayError(.protocolError, "the broker answered \(request.opcode) with \(reply.opcode)")
            }
            return Response(reply: reply, descriptors: message.descriptors, descriptorLost: message.descriptorsTruncated)
        }
    }

    /// Records a transport failure: the connection is done for.
    private mutating func noteFailure(_ error: Errno, unsent: Bool) {
        guard ReconnectPolicy.isTransport(error) else { return }
        isBroken = true
        lastRequestUnsent = unsent
    }

    /// A connection-level error frame (request id 0) waiting in the receive queue, if any.
    private func pendingRefusal() -> PatchbayError? {
        guard let message = try? socket.receive(into: buffer, nonblocking: true), message.length >= frameHeaderSize,
              let frame = try? Frame.decode(Array(UnsafeRawBufferPointer(rebasing: buffer[0..<message.length]))[...]),
              frame.kind == .error, frame.requestID == 0, let reply = try? ErrorReply.decode(frame)
        else { return nil }
        return PatchbayError(reply)
    }

    static func transportError(_ error: Errno) -> PatchbayError {
        switch error {
        case .brokenPipe, .connectionReset, .socketNotConnected:
            PatchbayError(error, "the connection to the broker is gone (was it restarted?); reconnect")
        default:
            PatchbayError(error, "talking to the broker failed")
        }
    }
}
