// A session is one connected client: its socket, who the kernel says it is, and the replies its
// socket could not take yet. Like swift-nio's PendingWritesManager, the queue is the session's
// own; the table of sessions (Sessions.swift) decides what to do when it overflows.

import DequeModule
import Glibc
import PatchbayProtocol
import PatchbaySystem
import SystemPackage

/// A descriptor kept alive while a reply that carries it waits in a send queue, charged to the
/// session's uid. It is a copy of a client's file, so its close goes through the `DeferredCloser`.
final class DescriptorBox {
    let rawValue: CInt
    private let charge: DescriptorCharge

    init(_ descriptor: consuming Descriptor, charge: DescriptorCharge) {
        rawValue = descriptor.release()
        self.charge = charge
    }

    deinit { DeferredCloser.shared.close(raw: rawValue, of: charge.uid) }
}

/// One frame waiting for the client's socket to drain.
struct OutgoingFrame {
    var bytes: [UInt8]
    var attachments: [DescriptorBox]
    /// What the frame announces, so a later frame can withdraw it (a CAPS connection notice whose
    /// client already left).
    var tag: UInt64?
}

/// One connected client.
final class Session {
    let id: UInt64
    let socket: SeqpacketSocket
    let credentials: PeerCredentials
    /// The descriptor the connection itself costs, charged to its uid while it lives.
    let charge: DescriptorCharge
    /// Frames the socket could not take yet, oldest first. Each leaves (with its descriptors) as
    /// soon as it is sent.
    private var outgoing = Deque<OutgoingFrame>()
    private(set) var queuedBytes = 0
    private(set) var queuedDescriptors = 0
    /// Whether the loop watches the socket for writability (only while frames are queued).
    var wantsWritable = false
    /// Since when the broker has stopped reading this client because its queue is full (monotonic
    /// nanoseconds), or nil while it reads.
    var readingPausedSince: UInt64?
    /// Out of the loop until its uid's next turn share (`SessionTable.deferReading`).
    var readingDeferred = false
    /// The client's command name: read when the connection was accepted, else (the process had
    /// exited by then) once a monitor first needs it.
    var command: String?

    init(id: UInt64, socket: consuming SeqpacketSocket, credentials: PeerCredentials, charge: DescriptorCharge) {
        self.id = id
        self.socket = socket
        self.credentials = credentials
        self.charge = charge
        command = credentials.command
    }

    /// The connection's last close happens on the uid's closing thread: descriptors the client
    /// sent that were never read are freed with it. It is shut down first, here, so the client
    /// learns of the hang-up at once even while that thread is busy (shutting down a local
    /// socket frees nothing in its queue, so it cannot wait).
    deinit {
        shutdown(socket.rawValue, CInt(SHUT_RDWR))
        DeferredCloser.shared.closeLast(of: socket.rawValue, for: credentials.uid)
    }

    var queuedFrames: Int { outgoing.count }

    /// Whether the queue has reached the bounds past which the broker reads no more requests.
    func isBackedUp(_ limits: QueueLimits) -> Bool {
        queuedBytes >= limits.bytes || queuedDescriptors >= limits.descriptors || outgoing.count >= limits.pauseFrames
    }

    enum SendOutcome: Equatable {
        case sent
        /// The socket is full; the frame waits in the queue (with copies of its descriptors).
        case queued
        /// The copies of the descriptors could not be charged to the session's uid.
        case refused(String)
        /// The session cannot go on; the reason is for the log.
        case failed(String)
    }

    /// Sends now if the socket takes it, else queues. A queued frame holds a duplicate of each
    /// attachment, charged to `payer` (the session's own uid unless someone else caused the frame),
    /// so it does not depend on the original staying open. Only the frame count has a hard limit here: the byte and descriptor bounds stop the
    /// broker reading requests (see `isBackedUp`), they never drop a reply.
    func send(_ bytes: [UInt8], attaching attachments: [CInt], tag: UInt64? = nil, limits: QueueLimits,
              budget: DescriptorBudget, payer: UInt32? = nil, pastFrameLimit: Bool = false) -> SendOutcome
    {
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
        // Events other clients cause stop at the frame limit (refused: the other client is told),
        // never closing this session for what others did. Only events bounded by other means
        // (departures: one per channel this session was told of) may queue past it.
        guard outgoing.count < limits.frames || pastFrameLimit else {
            return .refused("the client has \(outgoing.count) messages queued, unread")
        }
        var boxes: [DescriptorBox] = []
        for attachment in attachments {
            let charge: DescriptorCharge
            do {
                charge = try DescriptorCharge(1, to: payer ?? credentials.uid, in: budget, for: "a reply waiting to be read")
            } catch {
                return .refused(error.reason)
            }
            do {
                boxes.append(DescriptorBox(try duplicateDescriptor(attachment), charge: charge))
            } catch {
                return .failed("cannot queue a descriptor: \(error.name)")
            }
        }
        outgoing.append(OutgoingFrame(bytes: bytes, attachments: boxes, tag: tag))
        queuedBytes += bytes.count
        queuedDescriptors += boxes.count
        return .queued
    }

    /// Drops a queued frame announced with `tag`, if it is still waiting. Returns whether it was.
    func withdraw(tag: UInt64) -> Bool {
        guard let index = outgoing.firstIndex(where: { $0.tag == tag }) else { return false }
        let frame = outgoing.remove(at: index)
        queuedBytes -= frame.bytes.count
        queuedDescriptors -= frame.attachments.count
        return true
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
            queuedBytes -= frame.bytes.count
            queuedDescriptors -= frame.attachments.count
        }
        return .drained
    }
}

/// How much may wait for one client before the broker stops reading it, and the hard limit.
struct QueueLimits {
    /// Queued bytes at which reading pauses.
    var bytes: Int
    /// Queued descriptors at which reading pauses.
    var descriptors: Int
    /// Queued frames at which reading pauses.
    var pauseFrames: Int
    /// Queued frames at which the client is disconnected (only broker-initiated events can get
    /// there, since requests stop being read long before).
    var frames: Int
}

/// Where a request came from and what it was, so its answer finds its way back.
struct RequestContext {
    let session: Session
    let requestID: UInt64
    let opcode: Opcode
    /// When the broker took the request up (monotonic nanoseconds).
    let now: UInt64
    /// The process that sent this very frame, as the kernel recorded it (`SCM_CREDENTIALS`; 0 when
    /// unknown): the connection's `caller` made the connection, and another process may hold it
    /// since (a child it forked, one it passed the socket to).
    var sender: pid_t = 0
    /// What the request concerns, for monitors (set only while someone watches).
    var object = ""
    /// The uids owning that object (a key's sharer, a name's owner, a service's): their monitors
    /// see the request too (set only while someone watches).
    var owners: [UInt32] = []
    /// More about the object (a claimed key's file and age), once the handler knows it.
    var detail = ""

    var caller: PeerCredentials { session.credentials }
    /// The request as one to finish later (parked until an accept or a service arrives).
    var parked: ParkedRequest {
        ParkedRequest(session: session.id, requestID: requestID, opcode: opcode, object: object, owners: owners,
                      detail: detail, start: now)
    }
}

/// A request answered later: by session id, since the session may be gone by then.
struct ParkedRequest: Equatable {
    let session: UInt64
    let requestID: UInt64
    let opcode: Opcode
    /// For monitors: what it concerns, whose it is, and when the broker took it up.
    var object = ""
    var owners: [UInt32] = []
    var detail = ""
    var start: UInt64 = 0
}
