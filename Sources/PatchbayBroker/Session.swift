// A session is one connected client: its socket, who the kernel says it is, and the replies its
// socket could not take yet. Like swift-nio's PendingWritesManager, the queue is the session's
// own; the table of sessions (Sessions.swift) decides what to do when it overflows.

import DequeModule
import PatchbayProtocol
import PatchbaySystem
import SystemPackage

/// A descriptor kept alive while a reply that carries it waits in a send queue. It is a copy of
/// a client's file, so its close goes through the `DeferredCloser`.
final class DescriptorBox {
    let rawValue: CInt
    init(_ descriptor: consuming Descriptor) { rawValue = descriptor.release() }
    deinit { DeferredCloser.shared.close(raw: rawValue) }
}

/// One reply waiting for the client's socket to drain.
struct OutgoingFrame {
    var bytes: [UInt8]
    var attachments: [DescriptorBox]
}

/// One connected client.
final class Session {
    let id: UInt64
    let socket: SeqpacketSocket
    let credentials: PeerCredentials
    /// Replies the socket could not take yet, oldest first. Each leaves (with its descriptor) as
    /// soon as it is sent.
    private var outgoing = Deque<OutgoingFrame>()
    /// Whether the loop watches the socket for writability (only while replies are queued).
    var wantsWritable = false

    init(id: UInt64, socket: consuming SeqpacketSocket, credentials: PeerCredentials) {
        self.id = id
        self.socket = socket
        self.credentials = credentials
    }

    var queuedReplies: Int { outgoing.count }

    enum SendOutcome: Equatable {
        case sent
        /// The socket is full; the frame waits in the queue (with copies of its descriptors).
        case queued
        /// The session cannot go on; the reason is for the log.
        case failed(String)
    }

    /// Sends now if the socket takes it, else queues, up to `queueLimit` frames. A queued
    /// frame holds a duplicate of each attachment, so it does not depend on the original staying
    /// open.
    func send(_ bytes: [UInt8], attaching attachments: [CInt], queueLimit: Int) -> SendOutcome {
        if outgoing.isEmpty {
            do {
                try socket.send(bytes, descriptors: attachments, nonblocking: true)
                return .sent
            } catch {
                if error != .resourceTemporarilyUnavailable && error != .noBufferSpace {
                    return .failed("send failed: \(error.name)")
                }
            }
        }
        guard outgoing.count < queueLimit else { return .failed("client is not reading its replies") }
        var boxes: [DescriptorBox] = []
        for attachment in attachments {
            do {
                boxes.append(DescriptorBox(try duplicateDescriptor(attachment)))
            } catch {
                return .failed("cannot queue a descriptor: \(error.name)")
            }
        }
        outgoing.append(OutgoingFrame(bytes: bytes, attachments: boxes))
        return .queued
    }

    enum FlushOutcome: Equatable {
        case drained
        case pending
        case failed(String)
    }

    /// Sends queued frames until the queue is empty or the socket is full again.
    func flush() -> FlushOutcome {
        while let frame = outgoing.first {
            do {
                try socket.send(frame.bytes, descriptors: frame.attachments.map(\.rawValue), nonblocking: true)
            } catch {
                if error == .resourceTemporarilyUnavailable || error == .noBufferSpace { return .pending }
                return .failed("send failed: \(error.name)")
            }
            outgoing.removeFirst()
        }
        return .drained
    }
}

/// Where a request came from and what it was, so its answer finds its way back.
struct RequestContext {
    let session: Session
    let requestID: UInt64
    let opcode: Opcode
    /// When the broker took the request up (monotonic nanoseconds).
    let now: UInt64

    var caller: PeerCredentials { session.credentials }
    /// The request as one to finish later (parked until an accept or a service arrives).
    var parked: ParkedRequest { ParkedRequest(session: session.id, requestID: requestID, opcode: opcode) }
}

/// A request answered later: by session id, since the session may be gone by then.
struct ParkedRequest: Equatable {
    let session: UInt64
    let requestID: UInt64
    let opcode: Opcode
}
