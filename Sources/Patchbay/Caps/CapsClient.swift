// A CAPS client port: put requests, receive replies, directly over the channel's shared memory
// (the story of CAPS is on top of CapsPort.swift).

import Dispatch
import Glibc
import PatchbayProtocol
import PatchbaySystem
public import SystemPackage
import Synchronization

/// What `CapsClient.get` and `wait` return: a REPLY (clients only ever see replies).
public struct CapsReply: Sendable {
    /// The id of the request this answers.
    public var messageID: UInt64
    /// The reply's full length. When larger than the buffer given, only the buffer's worth was
    /// copied and the reply is still queued (receive again with a bigger buffer).
    public var length: Int
    /// Whether the reply was consumed (the buffer was large enough).
    public var consumed: Bool
    /// A 0-byte reply made by Patchbay because the service went away before answering.
    public var serviceClosed: Bool
    /// Set when the service answered with an error instead of bytes: `ENOBUFS`, this connection
    /// had more requests there than its in-flight limit (never through this library, which stops
    /// at the limit at `put`); `EBADMSG`, the payload was not one it could read safely; or any
    /// errno the service chose (`CapsService.reply(to:error:)`). The reply is then 0 bytes, and
    /// `call` throws this errno.
    public var error: Errno?
    /// Descriptors the service attached (take them, or they close with the reply).
    public var descriptors: CapsDescriptors?
    /// The request was a `call`'s (noted for a reply whose record is gone when it is shown: an
    /// error reply, or one made up for the service's departure).
    var madeByCall = false
}

/// How an `abort` ended.
public enum CapsAbortOutcome: Sendable, Equatable {
    /// The service had not read the request: it is gone, as if never sent.
    case returned
    /// The service already had it: it is told, and its reply will be discarded.
    case atService
}

/// Options of `CapsClient` and `CapsService`: access classes (SEMANTICS.md §5).
public struct CapsAccess: OptionSet, Sendable {
    /// The wire's access class bits.
    public let rawValue: UInt32
    /// Access classes from their wire bits.
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    /// The service's uid is the client's effective uid.
    public static let user = CapsAccess(rawValue: CapsFlags.user.rawValue)
    /// The client belongs to the service's gid.
    public static let group = CapsAccess(rawValue: CapsFlags.group.rawValue)
    /// Anyone.
    public static let world = CapsAccess(rawValue: CapsFlags.world.rawValue)
}

/// Cancels a `CapsClient` connection that waits for its service, from another thread.
public final class CapsConnectAttempt: Sendable {
    private let socket = Mutex<CInt>(-1)
    private let cancelled = Atomic<Bool>(false)

    /// An attempt to pass to `CapsClient(_:name:...attempt:)`.
    public init() {}

    /// Makes the connection waiting with this attempt fail with `ECANCELED`.
    public func cancel() {
        cancelled.store(true, ordering: .sequentiallyConsistent)
        socket.withLock { fd in if fd >= 0 { _ = shutdown(fd, CInt(SHUT_RDWR)) } }
    }

    var isCancelled: Bool { cancelled.load(ordering: .sequentiallyConsistent) }

    func attach(_ fd: CInt) {
        socket.withLock { $0 = fd }
        if isCancelled { _ = shutdown(fd, CInt(SHUT_RDWR)) }
    }

    func detach() { socket.withLock { $0 = -1 } }
}

/// A CAPS client port: puts REQUESTs on its own channel to one service and receives the REPLYs,
/// in the shared memory both processes map. Thread-safe: calls are serialised on the port, and
/// waiting never holds it.
public final class CapsClient: @unchecked Sendable {
    /// The service's name.
    public let name: String
    /// The channel's id: the high half of every message id on it.
    public let channelID: UInt64
    /// The most requests in flight at once (the service's limit).
    public let maximumInFlight: Int
    /// Off only in the project's own test peer, to play a client that ignores the limit (the
    /// service enforces it too, and that is what such a test checks).
    package var enforcesInFlightLimit = true

    private let connection: Mutex<Connection>  // kept open: its closing is how the broker learns we are gone
    private let channel: CapsChannel
    private let status: PatchbaySystem.Mapping
    private let serviceWake: PatchbaySystem.Descriptor
    private let clientWake: PatchbaySystem.Descriptor
    private let direct: PatchbaySystem.Descriptor
    private let core = CapsPortCore(anew: "connect again")
    /// The service, as the owner of descriptors it sends (`PeerDescriptors`): this channel.
    private var servicePeer: UInt64 { 1 << 63 | channelID }
    private let cancelled = Atomic<Bool>(false)

    @exclusivity(unchecked) private var allocator: ArenaAllocator
    @exclusivity(unchecked) private var sequence: UInt32 = 0
    /// Requests whose reply has not been consumed: arena offset (-1: attached), length, and
    /// whether the service was told of an abort (`abortedAtService`).
    private let requests = MessageTable(capacity: CapsLayout.ringCapacity)
    private static let abortedAtService: UInt32 = 1
    /// Made by `call`, whose thread waits for the reply (its limit in `replyLimit`).
    private static let madeByCall: UInt32 = 2
    /// Made by a `call` that gave up waiting (cancelled): its reply is disposed of unread when it
    /// comes, by whichever reader meets it.
    private static let abandonedByCall: UInt32 = 4
    /// Requests whose reply is disposed of unread.
    private static let unread: UInt32 = abortedAtService | abandonedByCall
    /// Replies to `put`s that a `call` read on its way to its own: shown first to `get`, `wait`
    /// and `waitReply`, in the order they came, with their bytes copied, `keptReplyBytes` in all.
    @exclusivity(unchecked) private var keptReplies: [(reply: CapsReply, bytes: [UInt8])] = []
    @exclusivity(unchecked) private var keptReplyBytes = 0
    @exclusivity(unchecked) private var closedReplies: [UInt64]?
    /// Replies that a `call` in one thread received for a `call` in another.
    @exclusivity(unchecked) private var otherCalls: [UInt64: Result<[UInt8], PatchbayError>] = [:]
    /// How many replies `otherCalls` holds: looked at first, so a `call` with nothing kept for it
    /// does not touch the dictionary (reading it counts a reference to its storage).
    @exclusivity(unchecked) private var otherCallsKept = 0
    /// Requests made by `call` still in flight: while there are none, no reply needs setting
    /// aside for a call (`setAsideCallReplies`).
    @exclusivity(unchecked) private var callsInFlight = 0
    /// Bumped whenever one thread keeps a reply for another, so sleepers look again.
    private let stashEpoch = Atomic<UInt32>(0)
    /// This port woke the service since a wait last looked (see `PeerActivity.woken`).
    private let wokeService = Atomic<Bool>(false)
    @exclusivity(unchecked) private var watching = false
    /// While watching: what `eventDescriptor` returns, an epoll set of the wake socket and
    /// `backlogEvent`, which announces replies that arrived before watching began.
    @exclusivity(unchecked) private var watchSet: WatchSet?

    private final class WatchSet {
        let epoll: Epoll
        let backlog: EventCounter
        init(epoll: consuming Epoll, backlog: consuming EventCounter) {
            self.epoll = epoll
            self.backlog = backlog
        }
    }
    /// Where the async `call` runs its blocking work, one call at a time.
    let callQueue: DispatchQueue

    /// Connects to the newest service `name` that matches `uid` and `gid` (-1: any) and admits
    /// this process through one of `access`'s classes.
    ///
    /// - Throws: `EINVAL`/`ENAMETOOLONG` (name), `ENOENT` (no such service, unless
    ///   `waitForService`), `EACCES`, `ECANCELED` (the attempt was cancelled).
    public init(_ broker: Broker, name: String, uid: Int32 = -1, gid: Int32 = -1, access: CapsAccess = [.user, .group, .world],
                waitForService: Bool = false, attempt: CapsConnectAttempt? = nil) throws(PatchbayError) {
        self.name = name
        var port = Connection(socket: try Autostart.connect(path: broker.socketPath))
        // Its closing is how the broker learns the client is gone: a fork child must not keep it.
        port.releaseInForkChildren()
        attempt?.attach(port.socket.rawValue)
        defer { attempt?.detach() }
        var response: Response
        do {
            response = try port.call(.caps(.client(name: name, uid: uid, gid: gid,
                                                   flags: CapsFlags(rawValue: access.rawValue)
                                                       .union(waitForService ? .waitForService : []))))
        } catch {
            if attempt?.isCancelled == true { throw PatchbayError(.canceled, "waiting for service \(name) was cancelled") }
            throw error
        }
        guard !response.descriptorLost else {
            throw PatchbayError(.tooManyOpenFiles, "no free descriptors in this process for the channel's five (its memory, status page, wake and direct sockets)")
        }
        guard case .caps(.client(let channelID, _, let maximumInFlight, let arenaSize)) = response.reply, response.descriptors.count == 5,
              let memory = response.takeDescriptor(), let statusPage = response.takeDescriptor(),
              let serviceWake = response.takeDescriptor(), let clientWake = response.takeDescriptor(),
              let direct = response.takeDescriptor()
        else { throw PatchbayError(.protocolError, "the broker's CAPS connect reply is malformed") }
        self.channelID = channelID
        self.maximumInFlight = Int(maximumInFlight)
        channel = try CapsChannel(memory, arenaSize: Int(arenaSize))
        do {
            status = try PatchbaySystem.Mapping(statusPage, length: CapsLayout.statusSize, writable: false)
        } catch {
            throw PatchbayError(error, "cannot map the service's status page")
        }
        self.serviceWake = serviceWake
        self.clientWake = clientWake
        self.direct = direct
        allocator = ArenaAllocator(size: channel.arenaSize)
        callQueue = DispatchQueue(label: "patchbay.caps.client.\(channelID)")
        connection = Mutex(port)
        SharedWord.store(channel.word32(CapsLayout.clientRunningOffset), 1)
    }

    /// The service can queue descriptors into each of these local sockets: their last closes
    /// happen on its closing thread, never on a thread of this program's.
    /// (Not in a fork child: the sockets are the parent's too, and shutting them down would end
    /// the parent's port; the child's close is not the last one anyway.)
    deinit {
        guard !core.isInherited else { return }
        for socket in [direct.rawValue, serviceWake.rawValue, clientWake.rawValue] {
            PeerDescriptors.closeLast(of: socket, for: servicePeer)
        }
    }

    // MARK: Requests

    /// Sends `bytes` as a REQUEST, with `descriptors` (still owned by the caller) attached, and
    /// returns its message id.
    ///
    /// - Throws: `ENOTCONN` (service gone, or this port was inherited across fork), `ENOBUFS`
    ///   (the in-flight limit is reached).
    @discardableResult
    public func put(_ bytes: [UInt8], descriptors: [CInt] = []) throws(PatchbayError) -> UInt64 {
        try put(length: bytes.count, descriptors: descriptors) { buffer in
            bytes.withUnsafeBytes { buffer.copyMemory(from: $0) }
        }
    }

    /// Sends a REQUEST of `length` bytes that `fill` writes in place, in the shared memory the
    /// service will read it from: no copy. A request larger than the channel's payload space gets
    /// its own shared memory object, attached.
    @discardableResult
    public func put(length: Int, descriptors: [CInt] = [], fill: (UnsafeMutableRawBufferPointer) -> Void)
        throws(PatchbayError) -> UInt64
    {
        try put(length: length, descriptors: descriptors, callLimit: nil, fill: fill)
    }

    /// `put`; with `callLimit`, the request is a `call`'s, whose reply is read by its thread and
    /// is at most that long.
    @inline(__always)
    private func put(length: Int, descriptors: [CInt], callLimit: Int?, fill: (UnsafeMutableRawBufferPointer) -> Void)
        throws(PatchbayError) -> UInt64
    {
        try core.checkInherited()
        return try core.lock.locked { () throws(PatchbayError) -> UInt64 in
            try checkUsable()
            guard length >= 0, length <= Int(UInt32.max) else {
                throw PatchbayError(.messageTooLong, "a message is at most 4 GiB")
            }
            guard requests.count < maximumInFlight || !enforcesInFlightLimit else {
                throw PatchbayError(.noBufferSpace, "\(requests.count) requests are in flight, the limit of this service")
            }
            sequence &+= 1
            let messageID = capsMessageID(channel: channelID, sequence: sequence)
            let offset = try CapsPortCore.publish(on: channel, .request, allocator: &allocator, direct: direct.rawValue,
                                                  messageID: messageID, length: length, descriptors: descriptors,
                                                  what: "payload", fill: fill)
            requests.insert(MessageRecord(id: messageID, offset: offset, length: length, state: callLimit == nil ? 0 : Self.madeByCall,
                                          replyLimit: UInt32(clamping: callLimit ?? 0)))
            if callLimit != nil { callsInFlight += 1 }
            wakeService()
            return messageID
        }
    }

    /// Puts a REQUEST whose "attached payload" is `object`, whatever it is, as a hostile client
    /// writing its ring by other means could: only for the project's test peer, to check that a
    /// service refuses what it cannot read safely.
    package func putForgedAttachment(_ object: CInt, length: Int) throws(PatchbayError) -> UInt64 {
        try core.lock.locked { () throws(PatchbayError) -> UInt64 in
            try checkUsable()
            sequence &+= 1
            let messageID = capsMessageID(channel: channelID, sequence: sequence)
            try sendAttachments(direct.rawValue, messageID: messageID, descriptors: [object])
            guard channel.push(.request, CapsEntry(messageID: messageID, offset: 0, length: UInt32(length), kind: .request,
                                                   flags: CapsEntryFlags.attachedPayload)) else {
                throw PatchbayError(.noBufferSpace, "the request ring is full")
            }
            requests.insert(MessageRecord(id: messageID, offset: -1, length: length, state: 0))
            wakeService()
            return messageID
        }
    }

    /// Sends `descriptors` under a new message id of this channel and writes that id over the
    /// oldest request still in the ring, as a hostile client can (the service may have read the
    /// entry short and kept what came with it under the old id): only for the project's tests.
    /// Returns the new id, nil if no request waits in the ring.
    package func rewriteWaitingRequest(sending descriptors: [CInt]) throws(PatchbayError) -> UInt64? {
        try core.lock.locked { () throws(PatchbayError) -> UInt64? in
            try checkUsable()
            guard let waiting = channel.pendingRequestSlots().first else { return nil }
            sequence &+= 1
            let messageID = capsMessageID(channel: channelID, sequence: sequence)
            try sendAttachments(direct.rawValue, messageID: messageID, descriptors: descriptors)
            channel.rewriteRequestID(at: waiting.position, to: messageID)
            return messageID
        }
    }

    /// Puts a REQUEST entry that says its payload is inline but is `length` bytes long, as a
    /// hostile client writing its ring by other means could: only for the project's tests, to
    /// check that a service refuses an inline payload longer than an entry holds.
    package func putForgedInline(length: UInt32) throws(PatchbayError) -> UInt64 {
        try putForged(offset: 0, length: length, flags: CapsEntryFlags.inlinePayload)
    }

    /// Puts a REQUEST entry that says its payload is `length` bytes at `offset` of this port's
    /// arena, whatever those are, as a hostile client writing its ring by other means could: only
    /// for the project's tests, to check that a service never reads outside the arena.
    package func putForgedArenaPayload(offset: UInt64, length: UInt32) throws(PatchbayError) -> UInt64 {
        try putForged(offset: offset, length: length, flags: 0)
    }

    /// Puts a REQUEST entry of `length` inline bytes that announces descriptors and sends none, as
    /// a hostile client writing its ring by other means could: only for the project's tests, to
    /// check that a service refuses it rather than deliver it without them.
    package func putForgedAnnouncingDescriptors(length: UInt32) throws(PatchbayError) -> UInt64 {
        try putForged(offset: 0, length: length, flags: CapsEntryFlags.inlinePayload | CapsEntryFlags.descriptors)
    }

    /// Puts a REQUEST entry whose id names the next channel, not this one, as a hostile client
    /// writing its ring by other means could: only for the project's tests (the service drops it
    /// unread and says nothing).
    package func putForgedForeign() throws(PatchbayError) {
        try core.lock.locked { () throws(PatchbayError) in
            try checkUsable()
            sequence &+= 1
            let messageID = capsMessageID(channel: channelID &+ 1, sequence: sequence)
            guard channel.push(.request, CapsEntry(messageID: messageID, offset: 0, length: 0, kind: .request,
                                                   flags: CapsEntryFlags.inlinePayload))
            else {
                throw PatchbayError(.noBufferSpace, "the request ring is full")
            }
        }
    }

    /// A REQUEST entry with whatever payload fields the tests' hostile client chose.
    private func putForged(offset: UInt64, length: UInt32, flags: UInt32) throws(PatchbayError) -> UInt64 {
        try core.lock.locked { () throws(PatchbayError) -> UInt64 in
            try checkUsable()
            sequence &+= 1
            let messageID = capsMessageID(channel: channelID, sequence: sequence)
            guard channel.push(.request, CapsEntry(messageID: messageID, offset: offset, length: length, kind: .request, flags: flags))
            else {
                throw PatchbayError(.noBufferSpace, "the request ring is full")
            }
            requests.insert(MessageRecord(id: messageID, offset: -1, length: Int(length), state: 0))
            wakeService()
            return messageID
        }
    }

    /// Marks a wake-up of the service as already sent, without sending one, as a hostile client
    /// writing its channel header could: only for the project's tests, to check that such a mark
    /// delays this channel's messages alone.
    package func markServiceWakePending() {
        SharedWord.store(channel.word32(CapsLayout.serviceWakePendingOffset), 1)
        SharedWord.store(channel.word32(CapsLayout.serviceFutexPendingOffset), 1)
    }

    /// What a hostile client can do to the service's wake words of its own channel: bumps its
    /// futex word, flips its pending mark and wakes the word. Only for the project's tests, to
    /// check that the service keeps serving its other clients through a storm of these.
    package func scribbleServiceWakeWords(_ round: Int) {
        SharedWord.increment(channel.word32(CapsLayout.serviceWakeWordOffset))
        SharedWord.store(channel.word32(CapsLayout.serviceFutexPendingOffset), UInt32(round & 1))
        Futex.wake(channel.word32(CapsLayout.serviceWakeWordOffset))
    }

    /// Pushes a DISPOSE entry (kind 2) for `messageID` into the request ring, as a client of
    /// layout 2 did and a hostile one can: only for the project's tests (the service drops it).
    package func putForgedDispose(_ messageID: UInt64) throws(PatchbayError) {
        try core.lock.locked { () throws(PatchbayError) in
            guard channel.push(.request, CapsEntry(messageID: messageID, offset: 0, length: 0, kind: .dispose, flags: 0)) else {
                throw PatchbayError(.noBufferSpace, "the request ring is full")
            }
            wakeService()
        }
    }

    /// Sends `descriptors` on the direct socket with no ring entry announcing them, as a hostile
    /// client can: only for the project's tests (the service closes them with the socket).
    package func sendUnannounced(_ descriptors: [CInt]) throws(PatchbayError) {
        try sendAttachments(direct.rawValue, messageID: 0, descriptors: descriptors)
    }

    /// Sends a wake-up carrying `descriptors` on the service's wake socket, as a hostile client
    /// could: only for the project's tests (the kernel refuses it where it can, `WakeSocket.pair`).
    package func wakeServiceCarrying(_ descriptors: [CInt]) -> Errno? {
        var byte: UInt8 = 1
        let sent = withUnsafeBytes(of: &byte) { raw in
            descriptors.withUnsafeBufferPointer { SeqpacketSocket.sendRaw(serviceWake.rawValue, raw, $0, nonblocking: true) }
        }
        return sent == 1 ? nil : Errno.current
    }

    /// Puts an inline REQUEST of `bytes` (at most 88) with `descriptors`, and runs
    /// `beforePublishing` once they are sent and before the entry is published: only for the
    /// project's tests, whose hostile client closes its own copies there, so that the service's
    /// copies are the last whatever the timing (the service takes them only for a published entry).
    package func put(_ bytes: [UInt8], descriptors: [CInt], beforePublishing: () -> Void) throws(PatchbayError) -> UInt64 {
        try core.lock.locked { () throws(PatchbayError) -> UInt64 in
            try checkUsable()
            guard bytes.count <= CapsLayout.inlineCapacity, let slot = channel.reserve(.request) else {
                throw PatchbayError(.noBufferSpace, "the request ring is full, or the request is not inline")
            }
            sequence &+= 1
            let messageID = capsMessageID(channel: channelID, sequence: sequence)
            try sendAttachments(direct.rawValue, messageID: messageID, descriptors: descriptors)
            beforePublishing()
            bytes.withUnsafeBytes { CapsChannel.inlineSpace(slot, length: bytes.count).copyMemory(from: $0) }
            channel.commit(.request, slot, CapsEntry(messageID: messageID, offset: 0, length: UInt32(bytes.count), kind: .request,
                                                     flags: CapsEntryFlags.inlinePayload | CapsEntryFlags.descriptors))
            requests.insert(MessageRecord(id: messageID, offset: -1, length: bytes.count, state: 0))
            wakeService()
            return messageID
        }
    }

    /// Puts a REQUEST (inline, at most 88 bytes) whose entry announces `consumed` as this port's
    /// reply head, as a hostile client can: only for the project's tests.
    package func putForgedConsumed(_ bytes: [UInt8], consumed: UInt32) throws(PatchbayError) -> UInt64 {
        try core.lock.locked { () throws(PatchbayError) -> UInt64 in
            try checkUsable()
            guard bytes.count <= CapsLayout.inlineCapacity, let slot = channel.reserve(.request) else {
                throw PatchbayError(.noBufferSpace, "the request ring is full, or the payload is not inline")
            }
            sequence &+= 1
            let messageID = capsMessageID(channel: channelID, sequence: sequence)
            bytes.withUnsafeBytes { CapsChannel.inlineSpace(slot, length: bytes.count).copyMemory(from: $0) }
            channel.commit(.request, slot, CapsEntry(messageID: messageID, offset: 0, length: UInt32(bytes.count), kind: .request,
                                                     flags: CapsEntryFlags.inlinePayload), forgedConsumed: consumed)
            requests.insert(MessageRecord(id: messageID, offset: -1, length: bytes.count, state: 0))
            wakeService()
            return messageID
        }
    }

    /// Writes `value` into the channel's shared reply head word, as a hostile client can, and
    /// wakes the service: only for the project's tests. This port's own position is private, so
    /// its next consumed reply publishes the true head again.
    package func scribbleReplyHead(_ value: UInt64) {
        core.lock.locked {
            SharedWord.store(channel.word64(CapsLayout.replyHeadOffset), value)
            wakeService()
        }
    }

    /// Writes `value` into the service's words of the channel's header (the request ring's head,
    /// the reply ring's tail), as a hostile client can: only for the project's tests.
    package func scribbleServiceWords(_ value: UInt64) {
        core.lock.locked {
            SharedWord.store(channel.word64(CapsLayout.requestHeadOffset), value)
            SharedWord.store(channel.word64(CapsLayout.replyTailOffset), value)
        }
    }

    /// The service's threads asleep, as its status page says: in epoll (on its wake sockets, or
    /// held for good by a port watched through its descriptor) and on futex words. For tests.
    package var serviceSleepers: (epoll: UInt32, futex: UInt32) {
        (SharedWord.load(status.baseAddress.advanced(by: CapsLayout.statusSleepingOffset).assumingMemoryBound(to: UInt32.self)),
         SharedWord.load(status.baseAddress.advanced(by: CapsLayout.statusFutexSleepingOffset).assumingMemoryBound(to: UInt32.self)))
    }

    /// Takes a message back (DragonFly's `caps_sys_abort`, which DragonFly never implemented).
    ///
    /// - Throws: `EINVAL` when `messageID` is not a request of this port in flight.
    public func abort(_ messageID: UInt64) throws(PatchbayError) -> CapsAbortOutcome {
        try core.lock.locked { () throws(PatchbayError) -> CapsAbortOutcome in
            try checkUsable()
            guard let request = requests.find(messageID), request.state & Self.abortedAtService == 0 else {
                throw PatchbayError(.invalidArgument, "message \(messageID) is not a request in flight on this port")
            }
            // Still in the ring: take it back in place if the service has not taken it first.
            if let slot = channel.pendingRequestSlots().first(where: { $0.messageID == messageID }),
               channel.claimForAbort(slot.position) {
                if request.offset >= 0 { allocator.release(offset: request.offset, length: request.length) }
                requests.remove(messageID)
                if request.state & Self.madeByCall != 0 { callsInFlight -= 1 }
                return .returned
            }
            requests.setState(messageID, request.state | Self.abortedAtService)
            _ = channel.push(.request, CapsEntry(messageID: messageID, offset: 0, length: 0, kind: .abort, flags: 0))
            wakeService()
            return .atService
        }
    }

    // MARK: Replies

    /// The next REPLY, copied into `buffer`. A buffer too small gets the first `buffer.count`
    /// bytes, the full length is returned, and the reply stays queued.
    ///
    /// - Throws: `EAGAIN` when no reply is waiting; `ENOTCONN` when the service is gone and every
    ///   pending request has come back.
    public func get(into buffer: UnsafeMutableRawBufferPointer) throws(PatchbayError) -> CapsReply {
        try core.checkInherited()
        return try core.lock.locked { () throws(PatchbayError) -> CapsReply in
            if watching {
                WakeSocket.drain(clientWake.rawValue, of: servicePeer)
                if let watchSet { _ = try? watchSet.backlog.consume() }
            }
            guard let reply = try nextReply(room: buffer.count, { reply, payload in Self.copy(payload, into: buffer, reply) })
            else { throw PatchbayError(.resourceTemporarilyUnavailable, "no reply is waiting") }
            return reply
        }
    }

    /// Waits for the next REPLY: spins while the service runs on another CPU, else sleeps on a
    /// futex. Cancellable with `cancelWait()` (`ECANCELED`).
    public func wait(into buffer: UnsafeMutableRawBufferPointer) throws(PatchbayError) -> CapsReply {
        try core.checkInherited()
        while true {
            // Sleeping happens outside the lock, so another thread may put meanwhile, or a call
            // keep a reply for this one (`keep`): the epoch, read first, tells.
            let epoch = stashEpoch.load(ordering: .acquiring)
            if let reply = try core.lock.locked({ () throws(PatchbayError) -> CapsReply? in
                try nextReply(room: buffer.count) { reply, payload in Self.copy(payload, into: buffer, reply) }
            }) {
                return reply
            }
            try sleepUntilReply(orUntilEpochChanges: epoch)
        }
    }

    /// Sends a request and waits for its reply, which is returned as bytes (other replies that
    /// arrive first are kept for the threads that wait for them in `call`).
    ///
    /// - Throws: `ECONNRESET` when the service went away before answering (where `wait` shows a
    ///   0-byte reply with `serviceClosed`); the errno of an error reply (`ENOBUFS`, `EBADMSG`,
    ///   or what the service chose); `put`'s errors.
    public func call(_ bytes: [UInt8]) throws(PatchbayError) -> [UInt8] {
        try call(bytes, maxReplyLength: .max)
    }

    /// `call`, copying no reply longer than `maxReplyLength`: for a service not trusted to answer
    /// briefly (a reply is read in place, so one of gigabytes the service never wrote costs this
    /// process nothing unless copied).
    ///
    /// - Throws: `EMSGSIZE` when the reply is longer (it is disposed of, unread); `call`'s errors
    ///   otherwise.
    public func call(_ bytes: [UInt8], maxReplyLength: Int) throws(PatchbayError) -> [UInt8] {
        let id = try put(length: bytes.count, descriptors: [], callLimit: maxReplyLength) { buffer in
            bytes.withUnsafeBytes { buffer.copyMemory(from: $0) }
        }
        return try awaitReply(to: id) { reply in
            guard reply.count <= maxReplyLength else {
                return .failure(PatchbayError(.messageTooLong,
                                              "the reply to request \(id) is \(reply.count) bytes, more than the \(maxReplyLength) allowed; not read"))
            }
            return .success(Array(reply))
        }
    }

    /// `call` into a caller's buffer, for the C library: the reply is copied into `reply` and its
    /// length returned, with no allocation unless another thread's reply must be kept for it.
    ///
    /// - Throws: `EMSGSIZE` when the reply is longer than `reply` (it is disposed of); `call`'s
    ///   errors otherwise.
    package func call(_ request: UnsafeRawBufferPointer, into reply: UnsafeMutableRawBufferPointer) throws(PatchbayError) -> Int {
        let id = try put(length: request.count, descriptors: [], callLimit: reply.count) { buffer in
            if request.count > 0 { buffer.copyMemory(from: request) }
        }
        return try awaitReply(to: id) { bytes in
            guard bytes.count <= reply.count else {
                return .failure(PatchbayError(.messageTooLong, "the reply to request \(id) is \(bytes.count) bytes, more than the \(reply.count) given"))
            }
            if bytes.count > 0 { reply.copyMemory(from: bytes) }
            return .success(bytes.count)
        }
    }

    /// Waits for the reply to request `id` and hands its bytes to `take` (an error reply, or the
    /// service's departure, is thrown instead). Replies to other threads' calls that arrive first
    /// are kept for them, and they are woken to look.
    private func awaitReply<T>(to id: UInt64, _ take: (UnsafeRawBufferPointer) -> Result<T, PatchbayError>) throws(PatchbayError) -> T {
        while true {
            let epoch = stashEpoch.load(ordering: .acquiring)
            var stashedForOthers = false
            let mine = try core.lock.locked { () throws(PatchbayError) -> Result<T, PatchbayError>? in
                // (Its count looked at first: a lookup hashes the id even in an empty dictionary.)
                if otherCallsKept > 0, let kept = otherCalls.removeValue(forKey: id) {
                    otherCallsKept -= 1
                    return kept.flatMap { bytes in bytes.withUnsafeBytes(take) }
                }
                var answer: Result<T, PatchbayError>?
                _ = try nextReply(room: nil, servingKept: false) { reply, payload in
                    if reply.messageID == id {
                        answer = failure(of: reply).map { .failure($0) } ?? take(payload)
                    } else {
                        setAside(reply, payload)
                        stashedForOthers = true
                    }
                }
                return answer
            }
            if stashedForOthers { wakeCallers() }
            if let mine { return try mine.get() }
            if stashEpoch.load(ordering: .acquiring) != epoch { continue }
            do {
                try sleepUntilReply(orUntilEpochChanges: epoch)
            } catch {
                abandon(id)
                throw error
            }
        }
    }

    /// A `call` gives up waiting for the reply to `id`: one already set aside for it is dropped,
    /// one still to come will be disposed of unread, as an aborted request's is (`nextReply`), and
    /// none is made up for it if the service goes (`closedReply`). The request stays in flight
    /// until then.
    private func abandon(_ id: UInt64) {
        core.lock.locked {
            if otherCallsKept > 0, otherCalls.removeValue(forKey: id) != nil {
                otherCallsKept -= 1
            } else if let request = requests.find(id) {
                requests.setState(id, request.state | Self.abandonedByCall)
            }
        }
    }

    /// Replies set aside for calls and not yet taken by them. For tests.
    package var repliesKeptForCalls: Int { core.lock.locked { otherCallsKept } }

    /// The error a reply stands for, if any: an error reply, or the 0-byte reply made up when the
    /// service went away before answering.
    package static func failure(of reply: CapsReply, limit: Int, cutOff: String? = nil) -> PatchbayError? {
        if let errno = reply.error { return serviceError(errno, for: reply.messageID, limit: limit) }
        if reply.serviceClosed, let cutOff {
            return PatchbayError(.connectionReset, "request \(reply.messageID) was not answered: \(cutOff)")
        }
        if reply.serviceClosed {
            return PatchbayError(.connectionReset, "the service went away before answering request \(reply.messageID)")
        }
        return nil
    }

    /// The error a caller sees for an error reply.
    package static func serviceError(_ errno: Errno, for id: UInt64, limit: Int) -> PatchbayError {
        switch errno {
        case .noBufferSpace:
            PatchbayError(errno, "the service refused request \(id) unread: this connection had \(limit) requests in flight there")
        case .badMessage:
            PatchbayError(errno, "the service refused request \(id) unread: its payload was not one it could read safely")
        default:
            PatchbayError(errno, "the service answered request \(id) with an error (\(errno.name)) instead of a reply")
        }
    }

    /// Waits for the next REPLY and lets `body` read it in place, in the shared memory the
    /// service wrote it to; the service is sent DISPOSE when `body` returns.
    ///
    /// - Throws: as `call`, instead of running `body`: the errno of an error reply, `ECONNRESET`
    ///   for a request the service went away without answering (each in `put` order), then
    ///   `ENOTCONN`.
    public func waitReply<R>(_ body: (_ messageID: UInt64, _ bytes: UnsafeRawBufferPointer) -> R) throws(PatchbayError) -> R {
        try core.checkInherited()
        while true {
            let epoch = stashEpoch.load(ordering: .acquiring)  // as in `wait`
            if let result = try core.lock.locked({ () throws(PatchbayError) -> Result<R, PatchbayError>? in
                try nextReply(room: nil, { reply, payload in .success(body(reply.messageID, payload)) },
                              failed: { reply in .failure(self.failure(of: reply)!) })
            }) { return try result.get() }
            try sleepUntilReply(orUntilEpochChanges: epoch)
        }
    }

    /// `waitReply` for a body that returns nothing: not generic, so a caller in another module runs
    /// specialised code (the hot path of a client).
    public func waitReply(_ body: (_ messageID: UInt64, _ bytes: UnsafeRawBufferPointer) -> Void) throws(PatchbayError) {
        try core.checkInherited()
        while true {
            // (The failure path keeps the reply aside: the common one stays a Bool, the cheapest.)
            var refused: CapsReply?
            let epoch = stashEpoch.load(ordering: .acquiring)  // as in `wait`
            if try core.lock.locked({ () throws(PatchbayError) -> Bool in
                try nextReply(room: nil, { reply, payload in body(reply.messageID, payload) },
                              failed: { reply in refused = reply }) != nil
            }) {
                if let refused, let failure = failure(of: refused) { throw failure }
                return
            }
            try sleepUntilReply(orUntilEpochChanges: epoch)
        }
    }

    /// What a reply stands for when it is no answer to give a body: an error reply, or one made
    /// up for a request the service went away without answering.
    @inline(__always)
    private func failure(of reply: CapsReply) -> PatchbayError? {
        guard reply.error != nil || reply.serviceClosed else { return nil }
        return Self.failure(of: reply, limit: maximumInFlight, cutOff: channel.isCutOff ? cutOffReason : nil)
    }

    /// Makes a `wait` blocked in another thread return `ECANCELED`.
    public func cancelWait() {
        cancelled.store(true, ordering: .sequentiallyConsistent)
        SharedWord.increment(channel.word32(CapsLayout.clientWakeOffset))
        Futex.wake(channel.word32(CapsLayout.clientWakeOffset))
    }

    /// The service's generation (its status page, kept current by the service).
    public func generation() throws(PatchbayError) -> UInt64 {
        try core.checkInherited()
        return SharedWord.load(status.baseAddress.advanced(by: CapsLayout.statusGenerationOffset).assumingMemoryBound(to: UInt64.self))
    }

    /// A descriptor that becomes readable when a reply (or the service's departure) arrives, for
    /// epoll loops; then call `get` until it says `EAGAIN`. Owned by the port.
    public var eventDescriptor: CInt {
        core.lock.locked {
            if watching, let watchSet { return watchSet.epoll.descriptorNumber }
            do throws(Errno) {
                let set = try Epoll()
                let backlog = try EventCounter(nonblocking: true)
                try set.add(clientWake.rawValue, events: .readable, token: 1)
                try set.add(backlog.descriptor.rawValue, events: .readable, token: 2)
                watchSet = WatchSet(epoll: set, backlog: backlog)
            } catch {
                // Without the set, the wake socket alone (replies queued before now go unannounced).
                watching = true
                SharedWord.store(channel.word32(CapsLayout.clientWatchingOffset), 1)
                return clientWake.rawValue
            }
            watching = true
            SharedWord.store(channel.word32(CapsLayout.clientWatchingOffset), 1)
            SharedWord.fence()
            // The service signals from now on; what it answered before is announced here, and so
            // are replies to puts a `call` read on its way to its own and kept (`keep`).
            if channel.hasEntries(.reply) || channel.serviceClosed || !keptReplies.isEmpty, let watchSet {
                try? watchSet.backlog.signal()
            }
            return watchSet?.epoll.descriptorNumber ?? clientWake.rawValue
        }
    }

    /// A client port cannot reply: `EINVAL` (SEMANTICS.md §5).
    public func reply(to messageID: UInt64, _ bytes: [UInt8]) throws(PatchbayError) {
        throw PatchbayError(.invalidArgument, "a client port cannot reply")
    }

    /// A client port cannot set a generation: `EINVAL`.
    public func setGeneration(_ generation: UInt64) throws(PatchbayError) {
        throw PatchbayError(.invalidArgument, "only a service port has a generation to set")
    }

    /// Requests in flight (put, reply not yet consumed).
    public var requestsInFlight: Int { core.lock.locked { requests.count } }

    // MARK: Internals

    /// Why this port can say no more: the service went away, or could not take this client.
    private var goneReason: String {
        if channel.isCutOff { return cutOffReason }
        return channel.serviceRefused
            ? "the service \(name) could not take this connection (it is out of descriptors); connect again later"
            : "the service \(name) has gone away"
    }

    private var cutOffReason: String {
        "this client cut the service \(name) off: \(PeerDescriptors.bound) of the descriptors it sent wait to be closed (a close of one of them does not finish)"
    }

    @inline(__always)
    private func checkUsable() throws(PatchbayError) {
        try core.checkInherited()
        if channel.serviceClosed {
            throw PatchbayError(.socketNotConnected, goneReason)
        }
    }

    /// After a push: wakes the service if it sleeps, the way it sleeps (a thread may sleep on the
    /// channels' futex words, another in epoll on the wake sockets), unless a wake-up of that kind
    /// is already on its way to it (one this port sent that the service has not taken since): a
    /// DISPOSE and the next REQUEST then cost one wake-up, not two.
    @inline(__always)
    private func wakeService() {
        SharedWord.fence()
        // Both counts are on one cache line of the status page.
        let sleepers = status.baseAddress.advanced(by: CapsLayout.statusSleepingOffset).assumingMemoryBound(to: UInt32.self)
        let futexSleepers = status.baseAddress.advanced(by: CapsLayout.statusFutexSleepingOffset).assumingMemoryBound(to: UInt32.self)
        if SharedWord.load(futexSleepers) != 0 {
            let pending = channel.word32(CapsLayout.serviceFutexPendingOffset)
            if SharedWord.load(pending) == 0 {
                SharedWord.store(pending, 1)
                let word = channel.word32(CapsLayout.serviceWakeWordOffset)
                SharedWord.increment(word)
                Futex.wake(word, count: 1)
                wokeService.store(true, ordering: .relaxed)
            }
        }
        if SharedWord.load(sleepers) != 0 {
            let pending = channel.word32(CapsLayout.serviceWakePendingOffset)
            if SharedWord.load(pending) == 0 {
                SharedWord.store(pending, 1)
                WakeSocket.wake(serviceWake.rawValue)
                wokeService.store(true, ordering: .relaxed)
            }
        }
    }

    /// Copy mode's delivery: as much of the reply as fits `buffer`.
    @inline(__always)
    private static func copy(_ payload: UnsafeRawBufferPointer, into buffer: UnsafeMutableRawBufferPointer,
                             _ reply: CapsReply) -> CapsReply {
        let copied = min(payload.count, buffer.count)
        if copied > 0 { buffer.baseAddress!.copyMemory(from: payload.baseAddress!, byteCount: copied) }
        return reply
    }

    /// Keeps a reply read on the way to another one: another thread's call's for that call (no
    /// longer than it takes), a put's for `get`, `wait` and `waitReply` (`keep`). The threads
    /// asleep in `call` are then woken (`wakeCallers`) to look.
    private func setAside(_ reply: CapsReply, _ payload: UnsafeRawBufferPointer) {
        guard let limit = callLimit(of: reply) else {
            keep(reply, payload)
            return
        }
        let kept: Result<[UInt8], PatchbayError> = failure(of: reply).map { .failure($0) }
            ?? (payload.count <= limit ? .success(Array(payload))
                : .failure(PatchbayError(.messageTooLong, "the reply to request \(reply.messageID) is \(payload.count) bytes, more than the \(limit) allowed; not read")))
        if otherCalls.updateValue(kept, forKey: reply.messageID) == nil { otherCallsKept += 1 }
    }

    /// Wakes the threads asleep in `call`, so that the one a reply was set aside for finds it.
    private func wakeCallers() {
        stashEpoch.add(1, ordering: .releasing)
        SharedWord.increment(channel.word32(CapsLayout.clientWakeOffset))
        Futex.wake(channel.word32(CapsLayout.clientWakeOffset))
    }

    /// Takes the replies to calls at the head of the reply ring off it and keeps them for their
    /// calls: `get`, `wait` and `waitReply` show only replies to puts (a call waiting in another
    /// thread would otherwise wait for ever for the reply they showed).
    private func setAsideCallReplies() throws(PatchbayError) {
        var setAsideAny = false
        while let (entry, _) = channel.peek(.reply), let record = requests.find(entry.messageID),
              record.state & Self.madeByCall != 0 {
            _ = try nextReply(room: nil, servingKept: false) { reply, payload in setAside(reply, payload) }
            setAsideAny = true
        }
        if setAsideAny { wakeCallers() }
    }

    /// The reply limit of the `call` that `reply` answers; nil for a `put`'s reply.
    private func callLimit(of reply: CapsReply) -> Int? {
        if reply.madeByCall { return .max }  // an error reply or a departure: no bytes to bound
        guard let record = requests.find(reply.messageID), record.state & Self.madeByCall != 0 else { return nil }
        return Int(record.replyLimit)
    }

    /// Keeps a `put`'s reply that a `call` read on its way to its own, for `get`, `wait` and
    /// `waitReply`. Its bytes are copied, up to the channel's payload space for all kept replies
    /// together: past that (a service answering puts with attached gigabytes while a call waits),
    /// the reply is kept as `EMSGSIZE` instead, its bytes not read.
    private func keep(_ reply: CapsReply, _ payload: UnsafeRawBufferPointer) {
        // A reader waiting through `eventDescriptor` is told (the ring no longer shows it).
        if let watchSet { try? watchSet.backlog.signal() }
        var kept = reply
        kept.descriptors = nil
        if reply.error == nil && !reply.serviceClosed && keptReplyBytes + payload.count > channel.arenaSize {
            kept.error = .messageTooLong
            kept.length = 0
            keptReplies.append((kept, []))
            return
        }
        keptReplyBytes += payload.count
        keptReplies.append((kept, Array(payload)))
    }

    /// The first kept reply (`keep`), shown as `nextReply` shows one; nil when none is kept.
    private func nextKeptReply<R>(room: Int?, _ deliver: (CapsReply, UnsafeRawBufferPointer) -> R,
                                  failed refusal: (CapsReply) -> R) -> R? {
        guard let (reply, bytes) = keptReplies.first else { return nil }
        if reply.error != nil || reply.serviceClosed {
            keptReplies.removeFirst()
            return refusal(reply)
        }
        if let room, room < bytes.count {
            var shown = reply
            shown.consumed = false
            return bytes.withUnsafeBytes { deliver(shown, $0) }
        }
        keptReplies.removeFirst()
        keptReplyBytes -= bytes.count
        return bytes.withUnsafeBytes { deliver(reply, $0) }
    }

    /// The next REPLY, shown to `deliver` in place (discarded replies are skipped); nil when none
    /// is waiting. The one reading path of both modes: in place (`room` nil) the reply is consumed
    /// after `deliver`, and the descriptors it carried are closed unless `deliver` took them; in
    /// copy mode (`room`: the caller's buffer size) a reply longer than the room stays queued,
    /// with its descriptors, and `deliver` sees `consumed` false.
    private func nextReply<R>(room: Int?, servingKept: Bool = true, _ deliver: (CapsReply, UnsafeRawBufferPointer) -> R)
        throws(PatchbayError) -> R?
    {
        try nextReply(room: room, servingKept: servingKept, deliver,
                      failed: { reply in deliver(reply, UnsafeRawBufferPointer(start: nil, count: 0)) })
    }

    /// `nextReply`, with error replies and the ones made up for the service's departure shown to
    /// `failed` instead of `deliver`.
    private func nextReply<R>(room: Int?, servingKept: Bool = true, _ deliver: (CapsReply, UnsafeRawBufferPointer) -> R,
                              failed refusal: (CapsReply) -> R) throws(PatchbayError) -> R? {
        // Replies a call read past come first, in the order they came (a call skips them), then
        // the ring's, past those to calls (`servingKept` is a reader other than `call`).
        if servingKept {
            if !keptReplies.isEmpty, let kept = nextKeptReply(room: room, deliver, failed: refusal) { return kept }
            if callsInFlight > 0, channel.hasEntries(.reply) { try setAsideCallReplies() }
            if !keptReplies.isEmpty, let kept = nextKeptReply(room: room, deliver, failed: refusal) { return kept }
        }
        if channel.isCutOff { return try nextMadeUpReply(room: room, servingKept: servingKept, deliver, failed: refusal) }
        // The common reply in one pass: nothing attached, inline or in the arena, to a request of
        // this port's that was not aborted. Anything else goes the general way below.
        if let entry = channel.entryAtHead(.reply), let bytes = channel.plainPayload(entry, .reply, arena: channel.replyArena),
           room.map({ $0 >= entry.length }) ?? true,
           let request = requests.find(entry.messageID), request.state & Self.unread == 0 {
            let result = deliver(CapsReply(messageID: entry.messageID, length: entry.length, consumed: true, serviceClosed: false,
                                           descriptors: nil), bytes)
            finish(entry.messageID, request, dispose: true)
            return result
        }
        // At most a ring's worth of entries passed over per call (a service can write replies to
        // nothing as fast as they are dropped: a non-blocking `get` must still return, and a
        // wait looks again).
        var passedOver = 0
        while let (entry, _) = channel.peek(.reply) {
            passedOver += 1
            if passedOver > CapsLayout.ringCapacity { return nil }
            let request = requests.find(entry.messageID)
            if entry.kind == .discardedReply || (request.map { $0.state & Self.unread != 0 } ?? false) {
                core.stash.discard(entry, from: direct.rawValue, peer: servicePeer)
                finish(entry.messageID, request, dispose: entry.kind != .discardedReply)
                continue
            }
            if request == nil {
                // A reply to no request of this port's (the service wrote the ring as it liked):
                // dropped unread, so nothing is kept for it, with what it carried.
                core.stash.discard(entry, from: direct.rawValue, peer: servicePeer)
                channel.advance(.reply)
                continue
            }
            if entry.kind == .errorReply {
                finish(entry.messageID, request, dispose: true)
                var refused = CapsReply(messageID: entry.messageID, length: 0, consumed: true, serviceClosed: false, descriptors: nil,
                                        madeByCall: (request?.state ?? 0) & Self.madeByCall != 0)
                // An errno is 1 to 4095 (PROTOCOL §7); anything else the service wrote is EIO, never
                // a number a caller could take for a length or a success.
                refused.error = (1...4095).contains(entry.flags) ? Errno(rawValue: CInt(entry.flags)) : .ioError
                return refusal(refused)
            }
            if entry.flags & (CapsEntryFlags.attachedPayload | CapsEntryFlags.descriptors) != 0, PeerDescriptors.pastBound(of: servicePeer) {
                // The service's descriptors wait to be closed past the bound (a close of one of
                // them does not finish): taking more would pile them up in this process. The
                // service is cut off instead: what is in flight comes back as if it had gone.
                channel.cutOff()
                shutdown(direct.rawValue, CInt(SHUT_RD))
                return try nextReply(room: room, servingKept: servingKept, deliver, failed: refusal)
            }
            if let bytes = CapsPortCore.plainPayload(entry, in: channel, arena: channel.replyArena), room.map({ $0 >= bytes.count }) ?? true {
                // The common cases, with nothing to keep alive: as below, without a payload value.
                let result = deliver(CapsReply(messageID: entry.messageID, length: bytes.count, consumed: true, serviceClosed: false,
                                               descriptors: nil), bytes)
                finish(entry.messageID, request, dispose: true)
                return result
            }
            guard let payload = try core.payload(of: entry, in: channel, arena: channel.replyArena, direct: direct.rawValue, peer: servicePeer) else {
                // A reply the service could not have written honestly: dropped, never read.
                finish(entry.messageID, request, dispose: true)
                continue
            }
            let length = Int(entry.length)
            if let room, room < length {
                // Too small: the reply stays queued, and so do its descriptors.
                if let attachments = payload.attachments { core.stash.keep(attachments, for: entry.messageID) }
                let result = deliver(CapsReply(messageID: entry.messageID, length: length, consumed: false, serviceClosed: false,
                                               descriptors: nil), payload.bytes)
                _ = consume payload
                return result
            }
            let result = deliver(CapsReply(messageID: entry.messageID, length: length, consumed: true, serviceClosed: false,
                                           descriptors: payload.carried()), payload.bytes)
            _ = consume payload
            finish(entry.messageID, request, dispose: true)
            return result
        }
        // The service may have replied just before going away: those replies come first.
        if channel.serviceClosed && !channel.isCutOff && channel.hasEntries(.reply) { return try nextReply(room: room, servingKept: servingKept, deliver, failed: refusal) }
        return try nextMadeUpReply(room: room, servingKept: servingKept, deliver, failed: refusal)
    }

    /// The next reply made up for a request the service will not answer (it went away, or was
    /// cut off), shown to `refusal`; one to another thread's call is that call's to report, and
    /// is set aside for it when a reader other than `call` comes to it (`servingKept`).
    private func nextMadeUpReply<R>(room: Int?, servingKept: Bool, _ deliver: (CapsReply, UnsafeRawBufferPointer) -> R,
                                    failed refusal: (CapsReply) -> R) throws(PatchbayError) -> R? {
        guard let closed = try closedReply() else { return nil }
        guard servingKept && closed.madeByCall else { return refusal(closed) }
        setAside(closed, UnsafeRawBufferPointer(start: nil, count: 0))
        wakeCallers()
        return try nextReply(room: room, servingKept: servingKept, deliver, failed: refusal)
    }

    /// Consumes a reply entry: frees the request's space (`request`: its record, looked up once).
    /// Moving the reply head is the DISPOSE of a REPLY (layout 3): the service makes one of it,
    /// and is woken for it if it sleeps (`dispose`: the entry was a REPLY).
    @inline(__always)
    private func finish(_ messageID: UInt64, _ request: MessageRecord?, dispose: Bool) {
        channel.advance(.reply)
        // Descriptors kept for a reply read short (copy mode) go with it, whatever the service
        // then rewrote its entry into.
        core.stash.discardKept(messageID)
        if let request {
            if request.offset >= 0 { allocator.release(offset: request.offset, length: request.length) }
            requests.remove(messageID)
            if request.state & Self.madeByCall != 0 { callsInFlight -= 1 }
        }
        guard dispose, !channel.serviceClosed else { return }
        wakeService()
    }

    /// After the service went away: each unanswered request comes back as a 0-byte REPLY, then
    /// ENOTCONN.
    private func closedReply() throws(PatchbayError) -> CapsReply? {
        guard channel.serviceClosed else { return nil }
        if closedReplies == nil {
            // Calls that gave up waiting get none: their requests go now.
            for abandoned in requests.all() where abandoned.state & Self.abandonedByCall != 0 {
                requests.remove(abandoned.id)
                if abandoned.offset >= 0 { allocator.release(offset: abandoned.offset, length: abandoned.length) }
                callsInFlight -= 1
            }
            // In the order they were put: message ids grow with the sequence.
            closedReplies = requests.all().filter { $0.state & Self.unread == 0 }.map(\.id).sorted()
        }
        guard let messageID = closedReplies?.first else {
            throw PatchbayError(.socketNotConnected, goneReason)
        }
        closedReplies?.removeFirst()
        let request = requests.remove(messageID)
        if let request, request.offset >= 0 {
            allocator.release(offset: request.offset, length: request.length)
        }
        if let request, request.state & Self.madeByCall != 0 { callsInFlight -= 1 }
        return CapsReply(messageID: messageID, length: 0, consumed: true, serviceClosed: true, descriptors: nil,
                         madeByCall: (request?.state ?? 0) & Self.madeByCall != 0)
    }

    /// Spin-then-sleep until a reply (or the service's departure, or with `epoch` a reply kept
    /// for another thread's `call`): spins while the service runs on another CPU, then sleeps on
    /// the channel's futex.
    private func sleepUntilReply(orUntilEpochChanges epoch: UInt32? = nil) throws(PatchbayError) {
        let statusBase = status.baseAddress
        let service = PeerActivity(
            running: statusBase.advanced(by: CapsLayout.statusRunningOffset).assumingMemoryBound(to: UInt32.self),
            cpu: statusBase.advanced(by: CapsLayout.statusCPUOffset).assumingMemoryBound(to: UInt32.self),
            woken: tookServiceWake())
        // Captured by reference (the closure does not escape): no count is taken per wait.
        let ready = {
            self.channel.hasEntries(.reply) || self.channel.serviceClosed
                || (epoch != nil && self.stashEpoch.load(ordering: .acquiring) != epoch)
        }
        try CapsPortCore.wait(publishingCPUIn: channel.word32(CapsLayout.clientCPUOffset), peer: service, until: ready) {
            () throws(PatchbayError) in try sleepOnFutex(until: ready)
        }
    }

    /// Whether this port woke the service since a wait last asked, forgetting it (no locked
    /// instruction when it did not, the case of every wait between spinning peers).
    @inline(__always)
    private func tookServiceWake() -> Bool {
        guard wokeService.load(ordering: .relaxed) else { return false }
        wokeService.store(false, ordering: .relaxed)
        return true
    }

    /// The sleeping half of the wait: on the channel's wake word, which the service bumps.
    private func sleepOnFutex(until ready: () -> Bool) throws(PatchbayError) {
        let wakeWord = channel.word32(CapsLayout.clientWakeOffset)
        let sleeping = channel.word32(CapsLayout.clientSleepingOffset)
        let running = channel.word32(CapsLayout.clientRunningOffset)
        // `sleeping` counts sleepers (several threads may wait on one port); the service wakes
        // everyone when it is not zero.
        SharedWord.increment(sleeping)
        defer {
            SharedWord.decrement(sleeping)
            SharedWord.store(running, 1)
        }
        while true {
            // The wake word is read before the cancel flag, so a cancel between the two still
            // changes the word and the futex returns at once.
            let seen = SharedWord.load(wakeWord)
            if cancelled.exchange(false, ordering: .sequentiallyConsistent) {
                throw PatchbayError(.canceled, "the wait was cancelled")
            }
            SharedWord.fence()
            if ready() { return }
            SharedWord.store(running, 0)
            do {
                try Futex.wait(wakeWord, expected: seen)
            } catch {
                throw PatchbayError(error, "futex wait failed")
            }
            SharedWord.store(running, 1)
            if ready() { return }
        }
    }
}
