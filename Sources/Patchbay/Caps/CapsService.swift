// A CAPS service port: receive REQUESTs (and DISPOSEs) from every client, reply to them, over
// each client's shared-memory channel (the story of CAPS is on top of CapsPort.swift).

// `public`: a service registers under the caller's effective uid by default (`geteuid()`).
public import Glibc
public import PatchbayProtocol
import CPatchbayShims
import PatchbaySystem
public import SystemPackage
import Synchronization

/// What a service receives.
public enum CapsMessageKind: Sendable, Equatable {
    /// A client's request: reply to it with its message id.
    case request
    /// The client consumed the reply (or went away without doing so): its space is free again.
    case dispose
    /// The client aborted a request the service already had; a reply to it is discarded.
    case aborted
    /// A client connected (only with `notifyConnections`).
    case connected
    /// A client went away (only with `notifyConnections`).
    case disconnected
}

/// A message as the service sees it.
public struct CapsServiceMessage: Sendable {
    /// What arrived.
    public var kind: CapsMessageKind
    /// The id to reply to (0 for connection notices).
    public var messageID: UInt64
    /// The full length. When larger than the buffer given, only the buffer's worth was copied and
    /// the message is still queued.
    public var length: Int
    /// Whether the message was consumed (the buffer was large enough, or it was read in place).
    public var consumed: Bool
    /// The sender, from the kernel (SO_PEERCRED / SO_PEERGROUPS when the client connected).
    public var credentials: CapsCredentials
    /// The client connection the message belongs to.
    public var channelID: UInt64
    /// The payload came in the channel's shared memory (false: in an attached memfd).
    public var inPlace: Bool
    /// Descriptors the client attached (take them, or they close with the message).
    public var descriptors: CapsDescriptors?
}

/// A CAPS service port: registered under a name, it receives the REQUESTs of every client that
/// connects (each on its own channel, taken round-robin) and replies to them. Thread-safe: calls
/// are serialised on the port, and waiting never holds it.
public final class CapsService: @unchecked Sendable {
    /// The name clients connect to.
    public let name: String
    /// The broker's id for this registration (a new one after registering again with a broker
    /// that restarted).
    public var serviceID: UInt64 { core.lock.locked { registeredID } }
    @exclusivity(unchecked) private var registeredID: UInt64

    /// One client connection, as the service keeps it.
    private final class ClientChannel {
        let id: UInt64
        let channel: CapsChannel
        let credentials: CapsCredentials
        let serviceWake: PatchbaySystem.Descriptor
        let clientWake: PatchbaySystem.Descriptor
        let direct: PatchbaySystem.Descriptor
        /// The port woke this client since it last planned a wait (see `PeerActivity.woken`).
        @exclusivity(unchecked) var woken = false
        @exclusivity(unchecked) var allocator: ArenaAllocator
        /// Its requests read and not yet disposed of, by sequence number: `received`,
        /// `receivedAborted` (the client aborted it since), or `replied` (with the reply's arena
        /// offset, -1 when attached, and length). Their number is what the in-flight limit bounds.
        let messages: MessageTable

        init(id: UInt64, channel: CapsChannel, credentials: CapsCredentials, serviceWake: consuming PatchbaySystem.Descriptor,
             clientWake: consuming PatchbaySystem.Descriptor, direct: consuming PatchbaySystem.Descriptor, maximumInFlight: Int) {
            self.id = id
            self.channel = channel
            self.credentials = credentials
            self.serviceWake = serviceWake
            self.clientWake = clientWake
            self.direct = direct
            allocator = ArenaAllocator(size: channel.arenaSize)
            messages = MessageTable(capacity: 2 * maximumInFlight)
        }

        /// The fork generation it was made in: in a fork child the sockets are the parent's too.
        private let createdIn = forkGeneration()

        /// The client can queue descriptors into each of these local sockets: their last closes
        /// happen on its uid's closing thread, never on the port's (not in a fork child, whose
        /// close is not the last, and which must not shut down the parent's sockets).
        deinit {
            guard forkGenerationSeen() == createdIn else { return }
            for socket in [direct.rawValue, serviceWake.rawValue, clientWake.rawValue] {
                PeerDescriptors.closeLast(of: socket, for: UInt64(credentials.uid))
            }
        }
    }

    // A message's state in `ClientChannel.messages`.
    private static let received: UInt32 = 1
    private static let receivedAborted: UInt32 = 2
    private static let replied: UInt32 = 3

    /// Requests refused unread (past the in-flight limit, or with a payload that could not be read
    /// safely), as `refusals` reports them.
    public struct Refusals: Sendable, Equatable {
        /// Refused since the port was registered.
        public var total: Int
        /// The last client refused.
        public var last: CapsCredentials?
        /// Of `total`, those refused for being past their client's in-flight limit (`ENOBUFS`);
        /// the others had a payload this port could not read safely (`EBADMSG`).
        public var pastLimit: Int = 0
    }

    private var connection: Connection
    private let status: PatchbaySystem.Mapping
    /// The status page itself, to register again with.
    private let statusPage: PatchbaySystem.Descriptor
    /// The broker's notices counter (read-only here): the page of the current registration. Pages
    /// of earlier registrations stay mapped (a few KiB per broker restart), so a reader never
    /// touches an unmapped page.
    private var noticePages: [NoticePage] = []
    private let noticesAddress = Atomic<UInt>(0)
    /// What a sleeping thread waits on in epoll: every client's wake socket and `control`.
    private let epoll: Epoll
    /// Everything else that wakes the port: the broker connection, `cancelWait`, a new
    /// registration, the backlog of `eventDescriptor`, the clients' direct sockets while no broker
    /// reports departures. Read without waiting when it is ready.
    private let control: Epoll
    /// Watches `control` for threads that sleep on futex words (started at the first such sleep).
    @exclusivity(unchecked) private var controlWatch: ControlWatch?
    /// `controlWatch`'s word as last seen: `control` is read when it moved.
    @exclusivity(unchecked) private var controlSeen: UInt32 = 0
    private let cancelEvent: EventCounter
    /// Set by `cancelWaits`: every wait, blocked or to come, ends with `ECANCELED` (the cancel
    /// event is then left signalled, so each thread asleep on it wakes).
    private let waitsCancelled = Atomic<Bool>(false)
    /// Made readable by `eventDescriptor` for what was already waiting when watching began (no
    /// client signalled it: nobody was watching yet); drained by `get`.
    private let backlogEvent: EventCounter
    /// Signalled by the thread that registers the service again after the broker went away.
    private let registrationEvent: EventCounter
    /// What a new registration needs: the broker (for its path and reconnect policy) and the
    /// registration's terms.
    private let broker: Broker
    private let terms: Request.Caps
    /// The broker went away and the service is not registered (yet) with its successor.
    @exclusivity(unchecked) private var unregistered = false
    /// Registering again failed for good: `wait` throws this.
    private var registrationFailure: PatchbayError?
    /// How many times the service registered again with a restarted broker.
    public var registrations: Int { core.lock.locked { registrationCount } }
    private var registrationCount = 1
    private let notifyConnections: Bool
    /// How the service is tapped (nil: not), and the tap of the current registration.
    private let tapMode: CapsTapMode?
    @exclusivity(unchecked) private var tap: CapsTap?
    /// Requests a client may have here, read and not yet disposed of, before the next is refused.
    public let maximumInFlight: Int
    private let core = CapsPortCore(anew: "register again")
    @exclusivity(unchecked) private var refused = Refusals(total: 0, last: nil)

    @exclusivity(unchecked) private var clients: [UInt64: ClientChannel] = [:]
    /// Uids whose new connections the broker was asked to refuse (`capsRefuseUser`): their
    /// descriptors wait to be closed here past the bound.
    @exclusivity(unchecked) private var refusedUsers: Set<UInt32> = []
    /// The clients in round-robin order (kept beside `clients` so a scan does no hashing). Not
    /// counted: `clients` owns them. Every reference to a client on the message path is taken
    /// from here or `lastActive` and used borrowed (`Unmanaged.borrowing`): counting it would
    /// cost two atomic operations each time, several times per message.
    @exclusivity(unchecked) private var order: [Unmanaged<ClientChannel>] = []
    /// Their channels, in the same order.
    @exclusivity(unchecked) private var channels: [CapsChannel] = [] {
        didSet { pollSet = PollSet(channels) }
    }
    /// What a waiter polls: the channels, and their probes in memory of the set's own. Made anew
    /// when a client comes or goes; a waiter takes the current one with the lock it held to look
    /// for a message, and polls it without the lock.
    @exclusivity(unchecked) private var pollSet = PollSet([])

    private final class PollSet {
        let channels: [CapsChannel]
        private let probes: UnsafeMutableBufferPointer<CapsChannel.Probe>

        init(_ channels: [CapsChannel]) {
            self.channels = channels
            probes = .allocate(capacity: max(channels.count, 1))
            _ = probes.initialize(from: channels.map(\.probe))
        }

        deinit { probes.deallocate() }

        /// Whether some channel has a request or a DISPOSE to make.
        @inline(__always)
        var hasWork: Bool {
            for index in 0..<channels.count where probes[index].hasWork { return true }
            return false
        }
    }

    /// How a thread that found nothing waits, settled under the lock it looked with.
    private struct WaitPlan {
        let set: PollSet
        /// The last active client, whose CPU decides whether spinning can see its next message
        /// (its channel is in `set`, which keeps it mapped).
        let peer: PeerActivity?
        let onFutexes: Bool
        /// How long a sleep in epoll may last, in milliseconds (-1: until something arrives).
        let lookAgainAfter: CInt
    }

    /// The plan for waiting now (under the lock), unless the service could not register again
    /// after a broker restart: then nothing would ever wake the wait for a new client, and every
    /// wait that finds nothing left from its clients throws that (as `get` does), not only the
    /// first.
    private func waitPlanUnlessFailed() throws(PatchbayError) -> WaitPlan {
        if let registrationFailure { throw registrationFailure }
        return waitPlan()
    }

    /// The plan for waiting now (under the lock).
    private func waitPlan() -> WaitPlan {
        if !refusedUsers.isEmpty { readmitUsers() }
        let peer = lastActive.map { client in
            client._withUnsafeGuaranteedRef { client in
                defer { client.woken = false }
                return PeerActivity(running: client.channel.word32(CapsLayout.clientRunningOffset),
                                    cpu: client.channel.word32(CapsLayout.clientCPUOffset), woken: client.woken)
            }
        }
        // While it refuses a uid, it sleeps in epoll, at most a second at a time, to look again:
        // nothing else would wake it when that uid's closes catch up.
        return WaitPlan(set: pollSet, peer: peer,
                        onFutexes: !watching && channels.count < Futex.waitAnyLimit && ServiceSleep.onFutexes
                            && refusedUsers.isEmpty,
                        lookAgainAfter: refusedUsers.isEmpty ? -1 : 1_000)
    }
    @exclusivity(unchecked) private var cursor = 0
    /// The client whose request was read last: whose CPU a waiter watches, and the first place a
    /// reply looks for its client. Not counted, like `order` (`forget` clears it).
    @exclusivity(unchecked) private var lastActive: Unmanaged<ClientChannel>?
    /// Message-path scopes running now that borrow a client (a receive body may call the port
    /// again, and a client that goes meanwhile must outlive them): clients dropped while it is not
    /// zero wait in `departed` until it is.
    @exclusivity(unchecked) private var borrows = 0
    @exclusivity(unchecked) private var departed: [ClientChannel] = []
    @exclusivity(unchecked) private var synthetic: [CapsServiceMessage] = []
    @exclusivity(unchecked) private var watching = false
    /// The broker's notice counter as last read: the connection is read only when it moved.
    @exclusivity(unchecked) private var noticesSeen: UInt32 = 0

    private static let brokerToken: UInt64 = 1
    private static let cancelToken: UInt64 = 2
    private static let registrationToken: UInt64 = 3
    private static let backlogToken: UInt64 = 4
    /// `control` itself, in `epoll`.
    private static let controlToken: UInt64 = 5
    private static let channelTokens: UInt64 = 1 << 62
    /// A client's direct socket, watched for its hang-up while no broker reports departures.
    private static let departureTokens: UInt64 = 1 << 61

    /// Registers a service. `uid`/`gid` -1: not registered under that key; otherwise a non-root
    /// caller may register only its own effective uid and a group it belongs to.
    ///
    /// `tap`: report every message this port takes or answers to monitors of this uid (and
    /// root), as `patchbay monitor` shows them: headers only, or with each payload's first bytes.
    ///
    /// - Throws: `EINVAL`/`ENAMETOOLONG` (name), `EPERM`, `EEXIST` (`exclusive`).
    public init(_ broker: Broker, name: String, uid: Int32 = Int32(bitPattern: geteuid()), gid: Int32 = -1,
                access: CapsAccess = [.user], exclusive: Bool = false, notifyConnections: Bool = false,
                maximumInFlight: Int = 128, tap: CapsTapMode? = nil) throws(PatchbayError) {
        self.name = name
        self.notifyConnections = notifyConnections
        tapMode = tap
        self.broker = broker
        // As the broker gives it to clients: 0 (or less) means 128, more than 256 is 256.
        self.maximumInFlight = maximumInFlight <= 0 ? 128 : min(maximumInFlight, 256)
        let flags = CapsFlags(rawValue: access.rawValue).union(exclusive ? .exclusive : []).union(notifyConnections ? .notifyConnections : [])
        terms = .service(name: name, uid: uid, gid: gid, flags: flags, maximumInFlight: UInt32(clamping: maximumInFlight))
        // The status page is this port's own: mapped writable here, then sealed so that nobody
        // else (clients reopening it through /proc, the broker) can ever write it.
        let page = try Self.makeStatusPage()
        var registration = try Self.register(terms, socket: try Autostart.connect(path: broker.socketPath),
                                             statusPage: page.descriptor.rawValue)
        registeredID = registration.serviceID
        let generation = registration.generation
        status = page.mapping
        statusPage = page.descriptor
        let port = registration.takePort()
        do {
            epoll = try Epoll()
            control = try Epoll()
            cancelEvent = try EventCounter(nonblocking: true)
            registrationEvent = try EventCounter(nonblocking: true)
            backlogEvent = try EventCounter(nonblocking: true)
            try control.add(port.socket.rawValue, events: .readable, token: Self.brokerToken)
            try control.add(cancelEvent.descriptor.rawValue, events: .readable, token: Self.cancelToken)
            try control.add(registrationEvent.descriptor.rawValue, events: .readable, token: Self.registrationToken)
            try control.add(backlogEvent.descriptor.rawValue, events: .readable, token: Self.backlogToken)
            try epoll.add(control.descriptorNumber, events: .readable, token: Self.controlToken)
        } catch {
            throw PatchbayError(error, "cannot set up the service port")
        }
        noticePages.append(NoticePage(registration.takeNotices()))
        noticesAddress.store(UInt(bitPattern: noticePages[0].mapping.baseAddress), ordering: .releasing)
        connection = port
        if let tap {
            self.tap = try CapsTap(broker, serviceID: registeredID, mode: tap)
        }
        statusWord(CapsLayout.statusRunningOffset).pointee = 1
        statusWord(CapsLayout.statusCPUOffset).pointee = UInt32(bitPattern: currentCPU())
        SharedWord.store(status.baseAddress.advanced(by: CapsLayout.statusGenerationOffset).assumingMemoryBound(to: UInt64.self),
                         generation)
    }

    deinit {
        // An inherited copy going away must not stop the parent's watching thread (the stop
        // event is the same eventfd in both processes).
        if !core.isInherited { controlWatch?.stop() }
    }

    /// One registration's notices page, kept mapped for the port's life.
    private final class NoticePage {
        let mapping: PatchbaySystem.Mapping
        init(_ mapping: consuming PatchbaySystem.Mapping) { self.mapping = mapping }
    }

    /// A registration made: the port connection, the notices page, the id and generation.
    private struct Registration: ~Copyable {
        var port: Connection?
        var notices: PatchbaySystem.Mapping?
        var serviceID: UInt64
        var generation: UInt64

        mutating func takePort() -> Connection {
            guard let port = port.take() else { preconditionFailure("a registration's port is taken once") }
            return port
        }

        mutating func takeNotices() -> PatchbaySystem.Mapping {
            guard let notices = notices.take() else { preconditionFailure("a registration's notices are taken once") }
            return notices
        }
    }

    /// Registers `terms` over a new port connection `socket`, with the status page attached.
    private static func register(_ terms: Request.Caps, socket: consuming SeqpacketSocket, statusPage: CInt)
        throws(PatchbayError) -> Registration
    {
        var port = Connection(socket: socket)
        // Its closing is how the broker learns the service is gone: a fork child must not keep it.
        port.releaseInForkChildren()
        var response = try port.call(.caps(terms), descriptors: [statusPage])
        guard !response.descriptorLost else {
            throw PatchbayError(.tooManyOpenFiles, "no free descriptor in this process for the service's notice page")
        }
        guard case .caps(.service(let serviceID, let generation)) = response.reply, let noticesPage = response.takeDescriptor() else {
            throw PatchbayError(.protocolError, "the broker's CAPS service reply is malformed")
        }
        let notices: PatchbaySystem.Mapping
        do {
            notices = try PatchbaySystem.Mapping(noticesPage, length: 4096, writable: false)
        } catch {
            throw PatchbayError(error, "cannot map the service's notices page")
        }
        return Registration(port: port, notices: notices, serviceID: serviceID, generation: generation)
    }

    // MARK: Riding out a broker restart

    /// The broker went away: the clients' channels keep working (they never needed it), their
    /// departures are now watched here, and a thread of its own registers the service again once
    /// a broker answers on the same path (per the broker's `reconnectPolicy`). Called with the
    /// lock held.
    private func brokerLost() throws(PatchbayError) {
        try? control.remove(connection.socket.rawValue)
        guard broker.reconnectPolicy.reconnects else {
            // For good: every later wait or get that finds nothing says so too.
            let failure = PatchbayError(.connectionReset, "the broker closed this service's connection, and its broker does not reconnect")
            registrationFailure = failure
            throw failure
        }
        guard !unregistered else { return }
        unregistered = true
        for client in clients.values {
            try? control.add(client.direct.rawValue, events: [], token: Self.departureTokens | client.id)
        }
        let (broker, terms, page, name) = (broker, terms, statusPage.rawValue, name)
        startThread { [weak self] in
            do throws(PatchbayError) {
                let registration = try broker.reconnectPolicy.retry(what: "the broker at \(broker.socketPath)") {
                    () throws(PatchbayError) -> Registration in
                    guard self != nil else { throw PatchbayError(.canceled, "the service \(name) was closed") }
                    return try Self.register(terms, socket: try broker.connectOnce(), statusPage: page)
                }
                self?.registered(registration)
            } catch {
                self?.registrationFailed(error)
            }
        }
    }

    /// The new registration, from the registering thread.
    private func registered(_ registration: consuming Registration) {
        var registration = registration
        // The old broker's tap went with it. The new one is asked for before taking the lock (a
        // broker round trip must not hold up the port); a tap that cannot be made is only lost.
        let newTap = tapMode.flatMap { mode in try? CapsTap(broker, serviceID: registration.serviceID, mode: mode) }
        core.lock.locked {
                let port = registration.takePort()
                noticePages.append(NoticePage(registration.takeNotices()))
                noticesAddress.store(UInt(bitPattern: noticePages[noticePages.count - 1].mapping.baseAddress), ordering: .releasing)
                noticesSeen = 0
                refusedUsers = []  // the new broker was never asked
                registeredID = registration.serviceID
                registrationCount += 1
                do throws(Errno) {
                    try control.add(port.socket.rawValue, events: .readable, token: Self.brokerToken)
                } catch {
                    registrationFailure = PatchbayError(error, "cannot watch the new connection to the broker")
                }
                connection = port
                unregistered = false
                tap = newTap
        }
        try? registrationEvent.signal()
    }

    /// Registering again failed for good (the name was taken meanwhile, or no broker came back
    /// within the policy): the next `wait` throws it.
    private func registrationFailed(_ error: PatchbayError) {
        core.lock.locked {
            registrationFailure = PatchbayError(error.errno, "the service \(name) could not register again: \(error.reason)")
        }
        try? registrationEvent.signal()
    }

    /// A status page and its writable mapping, sealed against any other writer.
    private struct StatusPage: ~Copyable {
        var descriptor: PatchbaySystem.Descriptor
        var mapping: PatchbaySystem.Mapping
    }

    private static func makeStatusPage() throws(PatchbayError) -> StatusPage {
        do {
            let memory = try makeMemoryFile(name: "patchbay-caps-status", sealable: true)
            try memory.truncate(to: CapsLayout.statusSize)
            let mapping = try PatchbaySystem.Mapping(memory, length: CapsLayout.statusSize, writable: true)
            // FUTURE_WRITE: the mapping above keeps writing; no new writable mapping or write()
            // is possible for anyone, whatever descriptor they hold.
            try memory.addSeals([.futureWrite, .shrink, .grow, .seal])
            return StatusPage(descriptor: memory, mapping: mapping)
        } catch {
            throw PatchbayError(error, "cannot create the service's status page")
        }
    }

    private func statusWord(_ offset: Int) -> UnsafeMutablePointer<UInt32> {
        status.baseAddress.advanced(by: offset).assumingMemoryBound(to: UInt32.self)
    }

    // MARK: Receiving

    /// The next message (REQUEST, DISPOSE, aborted, or a notice), copied into `buffer`. A buffer
    /// too small for a REQUEST gets the first `buffer.count` bytes and leaves it queued
    /// (`consumed` false).
    ///
    /// - Throws: `EAGAIN` when nothing is waiting.
    public func get(into buffer: UnsafeMutableRawBufferPointer) throws(PatchbayError) -> CapsServiceMessage {
        try core.checkInherited()
        return try core.lock.locked { () throws(PatchbayError) -> CapsServiceMessage in
            if watching {
                drainWakeups()
                _ = try? backlogEvent.consume()
            }
            if let message = try nextMessage(room: buffer.count, { message, payload in Self.copy(payload, into: buffer, message) }) {
                return message
            }
            // Nothing waits. What `control` has (the broker gone, a registration made again or
            // failed, a client departed while no broker runs) makes `eventDescriptor` readable,
            // and an event loop calls only this: it is acted on here, or the loop would spin on a
            // readiness nothing takes, and the service would never register again.
            try handleControl(takingCancels: false)
            if let message = try nextMessage(room: buffer.count, { message, payload in Self.copy(payload, into: buffer, message) }) {
                return message
            }
            if let registrationFailure { throw registrationFailure }
            throw PatchbayError(.resourceTemporarilyUnavailable, "no message is waiting")
        }
    }

    /// Waits for the next message: spins while the last active client runs on another CPU, then
    /// sleeps in epoll. Cancellable with `cancelWait()` (`ECANCELED`).
    public func wait(into buffer: UnsafeMutableRawBufferPointer) throws(PatchbayError) -> CapsServiceMessage {
        try core.checkInherited()
        while true {
            // The lock is held to take a message, never while sleeping, so another thread can
            // reply meanwhile.
            var plan: WaitPlan?
            if let message = try core.lock.locked({ () throws(PatchbayError) -> CapsServiceMessage? in
                let message = try nextMessage(room: buffer.count) { message, payload in Self.copy(payload, into: buffer, message) }
                if message == nil { plan = try waitPlanUnlessFailed() }
                return message
            }) {
                return message
            }
            try sleepUntilWork(plan)
        }
    }

    /// Waits for the next message and lets `body` read its payload in place, in the shared memory
    /// the client wrote it to.
    public func receive<R>(_ body: (CapsServiceMessage, UnsafeRawBufferPointer) -> R) throws(PatchbayError) -> R {
        try core.checkInherited()
        while true {
            var plan: WaitPlan?
            if let result = try core.lock.locked({ () throws(PatchbayError) -> R? in
                let result = try nextMessage(room: nil, body)
                if result == nil { plan = try waitPlanUnlessFailed() }
                return result
            }) {
                return result
            }
            try sleepUntilWork(plan)
        }
    }

    /// `receive` for a body that returns nothing: not generic, so a caller in another module runs
    /// specialised code (the hot path of a service).
    public func receive(_ body: (CapsServiceMessage, UnsafeRawBufferPointer) -> Void) throws(PatchbayError) {
        try core.checkInherited()
        while true {
            // nil: a message was delivered (and no plan was made, so none is released).
            let plan = try core.lock.locked { () throws(PatchbayError) -> WaitPlan? in
                if try nextMessage(room: nil, { message, payload in body(message, payload) }) != nil { return nil }
                return try waitPlanUnlessFailed()
            }
            guard let plan else { return }
            try sleepUntilWork(plan)
        }
    }

    /// Makes every `wait` and `receive` blocked in other threads, and every later one that finds
    /// nothing queued, return `ECANCELED`: only for a port about to be released (C's
    /// `pb_caps_service_close`), since the cancel event then stays signalled (every sleeper
    /// wakes to it, and a futex sleeper's watch thread with it) until the port goes.
    /// (`cancelWait` ends one wait.) Does nothing on a port inherited across `fork`.
    package func cancelWaits() {
        guard !core.isInherited else { return }
        waitsCancelled.store(true, ordering: .releasing)
        try? cancelEvent.signal()
    }

    /// Makes one `wait` blocked in another thread return `ECANCELED` (if none is blocked, the
    /// next one to block returns at once).
    /// Does nothing on a port inherited across `fork` (its event is the parent's too).
    public func cancelWait() {
        guard !core.isInherited else { return }
        try? cancelEvent.signal()
    }

    // MARK: Replying

    /// Replies to a REQUEST with `bytes`.
    ///
    /// - Throws: `EINVAL` for an unknown message id, a message not yet read, a DISPOSE, or a
    ///   request already answered.
    public func reply(to messageID: UInt64, _ bytes: [UInt8], descriptors: [CInt] = []) throws(PatchbayError) {
        try reply(to: messageID, length: bytes.count, descriptors: descriptors) { buffer in
            bytes.withUnsafeBytes { buffer.copyMemory(from: $0) }
        }
    }

    /// Replies with `length` bytes that `fill` writes in place, in the shared memory the client
    /// will read them from. A reply larger than the channel's payload space gets its own shared
    /// memory object, attached.
    public func reply(to messageID: UInt64, length: Int, descriptors: [CInt] = [],
                      fill: (UnsafeMutableRawBufferPointer) -> Void) throws(PatchbayError) {
        try core.checkInherited()
        try core.lock.locked { () throws(PatchbayError) in
            if length >= 0, descriptors.isEmpty, tap == nil, let last = lastActive,
               quickReply(to: messageID, length: length, of: last, fill: fill) {
                return
            }
            guard length >= 0, length <= Int(UInt32.max) else {
                throw PatchbayError(.messageTooLong, "a reply is at most 4 GiB")
            }
            let awaiting = try awaitingReply(messageID)
            let request = awaiting.request
            try borrowing(awaiting.client) { client throws(PatchbayError) in
            if request.state == Self.receivedAborted {
                // The client aborted: the reply only frees the request's space there.
                client.messages.remove(messageID)
                _ = client.channel.push(.reply, CapsEntry(messageID: messageID, offset: 0, length: 0, kind: .discardedReply,
                                                          flags: 0))
                wake(client)
                return
            }
            let offset: Int
            do throws(PatchbayError) {
                if let tap {
                    var head: [UInt8] = []
                    offset = try CapsPortCore.publish(on: client.channel, .reply, allocator: &client.allocator,
                                                      direct: client.direct.rawValue, messageID: messageID, length: length,
                                                      descriptors: descriptors, what: "reply") { buffer in
                        fill(buffer)
                        head = tap.head(of: UnsafeRawBufferPointer(buffer))
                    }
                    tap.record(.reply, messageID, length: length, head: head)
                } else {
                    offset = try CapsPortCore.publish(on: client.channel, .reply, allocator: &client.allocator,
                                                      direct: client.direct.rawValue, messageID: messageID, length: length,
                                                      descriptors: descriptors, what: "reply", fill: fill)
                }
            } catch {
                // Nothing was published: the request can still be answered.
                throw error
            }
            client.messages.remove(messageID)
            client.messages.insert(MessageRecord(id: messageID, offset: offset, length: length, state: Self.replied))
            wake(client)
            }
        }
    }

    /// The common reply in one pass: nothing attached, no tap, inline or in the arena, to a
    /// request of the client served last. False, having done nothing, for anything else (another
    /// client's request, an id not awaiting a reply, a full ring or arena), which the general
    /// path then answers or refuses.
    @inline(__always)
    private func quickReply(to messageID: UInt64, length: Int, of handle: Unmanaged<ClientChannel>,
                            fill: (UnsafeMutableRawBufferPointer) -> Void) -> Bool {
        // (The body throws nothing: `try?` only meets `borrowing`'s signature.)
        (try? borrowing(handle) { client throws(PatchbayError) -> Bool in
            let channel = client.channel
            guard client.id == capsChannel(of: messageID), let request = client.messages.find(messageID),
                  request.state == Self.received, let slot = channel.reserve(.reply)
            else { return false }
            let offset: Int
            if length <= CapsLayout.inlineCapacity {
                offset = -1
                fill(CapsChannel.inlineSpace(slot, length: length))
                channel.commit(.reply, slot, CapsEntry(messageID: messageID, offset: 0, length: UInt32(length), kind: .reply,
                                                       flags: CapsEntryFlags.inlinePayload))
            } else {
                guard length <= channel.arenaSize, let space = client.allocator.allocate(length) else { return false }
                offset = space
                fill(UnsafeMutableRawBufferPointer(start: channel.replyArena.advanced(by: space), count: length))
                channel.commit(.reply, slot, CapsEntry(messageID: messageID, offset: UInt64(space), length: UInt32(length),
                                                       kind: .reply, flags: 0))
            }
            client.messages.replace(MessageRecord(id: messageID, offset: offset, length: length, state: Self.replied))
            wake(client)
            return true
        }) ?? false
    }

    /// Replies to `messageID` with `bytes` inline (at most 88) and `descriptors`, running
    /// `beforePublishing` once they are sent and before the entry is published: only for the
    /// project's tests, whose hostile service closes its own copies there, so that the client's
    /// are the last whatever the timing (the client takes them only for a published entry).
    package func reply(to messageID: UInt64, _ bytes: [UInt8], descriptors: [CInt], beforePublishing: () -> Void) throws(PatchbayError) {
        try core.lock.locked { () throws(PatchbayError) in
            let awaiting = try awaitingReply(messageID)
            try borrowing(awaiting.client) { client throws(PatchbayError) in
                guard bytes.count <= CapsLayout.inlineCapacity, let slot = client.channel.reserve(.reply) else {
                    throw PatchbayError(.noBufferSpace, "the reply ring is full, or the reply is not inline")
                }
                try sendAttachments(client.direct.rawValue, messageID: messageID, descriptors: descriptors)
                beforePublishing()
                bytes.withUnsafeBytes { CapsChannel.inlineSpace(slot, length: bytes.count).copyMemory(from: $0) }
                client.channel.commit(.reply, slot, CapsEntry(messageID: messageID, offset: 0, length: UInt32(bytes.count), kind: .reply,
                                                              flags: CapsEntryFlags.inlinePayload | CapsEntryFlags.descriptors))
                client.messages.remove(messageID)
                client.messages.insert(MessageRecord(id: messageID, offset: -1, length: bytes.count, state: Self.replied))
                wake(client)
            }
        }
    }

    /// Lets the wake sockets of clients that connect from now on take descriptors, as on a
    /// kernel before 6.16 (no `SO_PASSRIGHTS`): only for the project's tests, which show that a
    /// drain then closes what arrives off this port's thread.
    package var wakeSocketsTakeDescriptors: Bool {
        get { core.lock.locked { takesDescriptorsOnWake } }
        set { core.lock.locked { takesDescriptorsOnWake = newValue } }
    }
    @exclusivity(unchecked) private var takesDescriptorsOnWake = false

    /// Pushes a REPLY of `length` inline bytes for `messageID` into the reply ring of channel
    /// `channelID`, whatever that id is, as a hostile service writing the ring by other means
    /// could: only for the project's tests, to check that a client takes no reply to a request
    /// it did not make. False when there is no such channel or its ring is full.
    package func pushForgedReply(onChannel channelID: UInt64, messageID: UInt64, length: UInt32) -> Bool {
        core.lock.locked {
            guard let client = clients[channelID] else { return false }
            let pushed = client.channel.push(.reply, CapsEntry(messageID: messageID, offset: 0, length: length, kind: .reply,
                                                               flags: CapsEntryFlags.inlinePayload))
            wake(client)
            return pushed
        }
    }

    /// Channel `channelID`'s direct socket (this side's end), for a test peer that writes it as a
    /// hostile service could: only for the project's tests.
    package func directSocket(ofChannel channelID: UInt64) -> CInt? {
        core.lock.locked { clients[channelID]?.direct.rawValue }
    }

    /// Pushes an ERROR_REPLY for `messageID` with `flags` as its errno, whatever they are, as a
    /// hostile service writing the ring by other means could: only for the project's tests.
    package func pushForgedErrorReply(onChannel channelID: UInt64, messageID: UInt64, flags: UInt32) -> Bool {
        core.lock.locked {
            guard let client = clients[channelID] else { return false }
            client.messages.remove(messageID)
            let pushed = client.channel.push(.reply, CapsEntry(messageID: messageID, offset: 0, length: 0, kind: .errorReply, flags: flags))
            wake(client)
            return pushed
        }
    }

    /// Answers a REQUEST with an errno instead of bytes, for a request this service could not
    /// answer (its program failed, the request made no sense): the client's `call` throws it,
    /// and `wait`/`get` show it in `CapsReply.error`, so it is never mistaken for an empty reply.
    ///
    /// - Throws: `EINVAL` for an unknown message id, a request not read or already answered, or
    ///   an errno of 0; `ENOBUFS` when the client's reply ring is full (answer again later).
    public func reply(to messageID: UInt64, error: Errno) throws(PatchbayError) {
        try core.checkInherited()
        try core.lock.locked { () throws(PatchbayError) in
            // (Linux's errnos end below 4096; the client's call returns the negative errno.)
            guard error.rawValue > 0, error.rawValue < 4096 else {
                throw PatchbayError(.invalidArgument, "an error reply needs an errno (1 to 4095), not \(error.rawValue)")
            }
            // A request shown in copy mode and left queued (longer than the caller's buffer) is
            // taken now, unread: a service can refuse what it has no room for.
            let awaiting: Awaiting
            do throws(PatchbayError) {
                awaiting = try awaitingReply(messageID)
            } catch {
                guard let queued = takeQueuedRequest(messageID) else { throw error }
                awaiting = queued
            }
            let request = awaiting.request
            try borrowing(awaiting.client) { client throws(PatchbayError) in
            let aborted = request.state == Self.receivedAborted
            guard client.channel.push(.reply, CapsEntry(messageID: messageID, offset: 0, length: 0,
                                                        kind: aborted ? .discardedReply : .errorReply,
                                                        flags: aborted ? 0 : UInt32(bitPattern: error.rawValue))) else {
                throw PatchbayError(.noBufferSpace, "the reply ring of message \(messageID)'s client is full")
            }
            client.messages.remove(messageID)
            if !aborted {
                tap?.record(.errorReply, messageID, length: Int(error.rawValue))
                // DISPOSEd like any REPLY once the client consumes it.
                client.messages.insert(MessageRecord(id: messageID, offset: -1, length: 0, state: Self.replied))
            }
            wake(client)
            }
        }
    }

    /// Sets this port's generation, which clients read with `generation()`.
    public func setGeneration(_ generation: UInt64) throws(PatchbayError) {
        try core.checkInherited()
        // A registration after this one starts one past it: 2^64 - 1 would wrap to 0.
        guard generation < .max else {
            throw PatchbayError(.invalidArgument, "a generation is at most 2^64 - 2 (the next registration starts one past it)")
        }
        SharedWord.store(status.baseAddress.advanced(by: CapsLayout.statusGenerationOffset).assumingMemoryBound(to: UInt64.self),
                         generation)
    }

    /// The generation this port has set.
    public var currentGeneration: UInt64 {
        SharedWord.load(status.baseAddress.advanced(by: CapsLayout.statusGenerationOffset).assumingMemoryBound(to: UInt64.self))
    }

    /// A service port has no service to ask: `EINVAL` (SEMANTICS.md §5).
    public func generation() throws(PatchbayError) -> UInt64 {
        throw PatchbayError(.invalidArgument, "generation() is for client ports; a service sets its own")
    }

    /// A service port cannot put: `EINVAL`.
    public func put(_ bytes: [UInt8]) throws(PatchbayError) -> UInt64 {
        throw PatchbayError(.invalidArgument, "a service port cannot put")
    }

    /// A descriptor that becomes readable when messages wait, for epoll loops; then call `get`
    /// until it says `EAGAIN` (one readiness may stand for several messages).
    public var eventDescriptor: CInt {
        core.lock.locked {
            guard !watching else { return }
            SharedWord.increment(statusWord(CapsLayout.statusSleepingOffset))
            watching = true
            SharedWord.fence()
            // Clients signal from now on; what they queued before is announced here.
            if Self.hasWork(channels) || noticesPending || !synthetic.isEmpty { try? backlogEvent.signal() }
        }
        return epoll.descriptorNumber
    }

    /// Clients connected now.
    public var clientCount: Int { core.lock.locked { clients.count } }

    /// Requests refused unread: their client had `maximumInFlight` requests here already, read
    /// and not disposed of (`ENOBUFS` to it), or the payload was not something this port can read
    /// safely, such as an attachment that is not a memfd sealed against shrinking (`EBADMSG`).
    /// The Patchbay client library does neither; a client writing its ring by other means can.
    /// Poll this to log refusals at the rate you choose (`patchbay caps serve` does, once a
    /// second at most).
    public var refusals: Refusals { core.lock.locked { refused } }

    // MARK: Internals

    /// The client of `messageID` and the request's record, when it is a request read and not yet
    /// answered; `EINVAL` otherwise.
    private func awaitingReply(_ messageID: UInt64) throws(PatchbayError) -> Awaiting {
        let channelID = capsChannel(of: messageID)
        if let last = lastActive,
           let request = last._withUnsafeGuaranteedRef({ client in client.id == channelID ? client.messages.find(messageID) : nil }),
           request.state != Self.replied {
            return Awaiting(client: last, request: request)
        }
        guard let client = clients[channelID], let request = client.messages.find(messageID), request.state != Self.replied else {
            throw PatchbayError(.invalidArgument, "message \(messageID) is not a request read and awaiting a reply")
        }
        return Awaiting(client: Unmanaged.passUnretained(client), request: request)
    }

    /// The REQUEST `messageID` if it is at the head of its client's ring and taken by this port
    /// (shown by a `get` or `wait` whose buffer it did not fit, so it stayed queued): consumed now,
    /// unread, with whatever it carried closed, and recorded as read. Nil for anything else (not
    /// there, or its client took it back first).
    private func takeQueuedRequest(_ messageID: UInt64) -> Awaiting? {
        guard let client = clients[capsChannel(of: messageID)], !client.messages.contains(messageID),
              client.messages.count < maximumInFlight,
              let (entry, position) = client.channel.peek(.request), entry.kind == .request, entry.messageID == messageID,
              client.channel.claimForService(position)
        else {
            // Not the head any more (its client took it back, or rewrote the entry): what was
            // kept for it when it was read short will never be asked for.
            core.stash.discardKept(messageID)
            return nil
        }
        client.channel.advance(.request)
        core.stash.discard(entry, from: client.direct.rawValue, peer: UInt64(client.credentials.uid))
        let record = MessageRecord(id: messageID, offset: -1, length: 0, state: Self.received)
        client.messages.insert(record)
        return Awaiting(client: Unmanaged.passUnretained(client), request: record)
    }

    /// A request awaiting a reply and its client (not counted: see `order`).
    private struct Awaiting {
        let client: Unmanaged<ClientChannel>
        let request: MessageRecord
    }

    private func wake(_ client: ClientChannel) {
        SharedWord.fence()
        let channel = client.channel
        if SharedWord.load(channel.word32(CapsLayout.clientSleepingOffset)) != 0 {
            SharedWord.increment(channel.word32(CapsLayout.clientWakeOffset))
            Futex.wake(channel.word32(CapsLayout.clientWakeOffset))
            client.woken = true
        }
        if SharedWord.load(channel.word32(CapsLayout.clientWatchingOffset)) != 0 {
            WakeSocket.wake(client.clientWake.rawValue)
            client.woken = true
        }
    }

    /// Copy mode's delivery: as much of the message as fits `buffer`.
    @inline(__always)
    private static func copy(_ payload: UnsafeRawBufferPointer, into buffer: UnsafeMutableRawBufferPointer,
                             _ message: CapsServiceMessage) -> CapsServiceMessage {
        var message = message
        let copied = min(message.length, buffer.count)
        if copied > 0, let base = payload.baseAddress { buffer.baseAddress!.copyMemory(from: base, byteCount: copied) }
        message.consumed = copied == message.length
        return message
    }

    /// The next message, shown to `deliver` in place; nil when nothing waits. The one reading path
    /// of both modes: in place (`room` nil) a REQUEST is consumed before `deliver` runs (so it may
    /// reply at once); in copy mode (`room`: the caller's buffer size) a REQUEST longer than the
    /// room stays queued, with its descriptors.
    private func nextMessage<R>(room: Int?, _ deliver: (CapsServiceMessage, UnsafeRawBufferPointer) -> R)
        throws(PatchbayError) -> R?
    {
        if let result = quickMessage(room: room, deliver) { return result }
        // Entries dropped (forged, malformed, refused) are passed over in this loop, the next
        // client in the round-robin order looked at after each: a call per dropped entry let a
        // client that kept its ring full of them just ahead of the service run its stack out
        // (seventeenth attack round). At most a ring's worth per call, so that a `get` finding
        // nothing else still returns; a wait then looks again.
        for _ in 0..<CapsLayout.ringCapacity {
            if noticesPending { processBrokerEvents() }
            if !synthetic.isEmpty { return deliver(synthetic.removeFirst(), UnsafeRawBufferPointer(start: nil, count: 0)) }
            var found = nextEntry()
            if found == nil && noticesPending {
                // Perhaps a client this port has not heard of yet: read the broker's notices, look again.
                processBrokerEvents()
                if !synthetic.isEmpty { return deliver(synthetic.removeFirst(), UnsafeRawBufferPointer(start: nil, count: 0)) }
                found = nextEntry()
            }
            guard let found else { return nil }
            let entry = found.entry
            let consume = room.map { $0 >= Int(entry.length) } ?? true
            if let result = try borrowing(found.client, { client throws(PatchbayError) in
                try take(client, entry, consume: consume, deliver)
            }) {
                return result
            }
        }
        return nil
    }

    /// The common messages in one pass, the way a kernel has a fast path for its common system
    /// call: a DISPOSE made of the reply head of the client next in the round-robin order, or that
    /// client's next REQUEST when its payload is inline or in the arena with nothing attached.
    /// Nil for anything else (broker or connection notices, a tap, a request too long for the
    /// caller's buffer, attached or carrying descriptors, an abort, a forged or unexpected entry,
    /// a client at its in-flight limit, nothing from that client), having done nothing the
    /// general path does not do again (noting the client's reply head and claiming an entry are
    /// idempotent), and that path takes it. Each field is read from the entry once, and the
    /// message is built once, in place.
    @inline(__always)
    private func quickMessage<R>(room: Int?, _ deliver: (CapsServiceMessage, UnsafeRawBufferPointer) -> R) -> R? {
        guard tap == nil, synthetic.isEmpty, !noticesPending else { return nil }
        let count = order.count
        guard count > 0 else { return nil }
        let index = cursor < count ? cursor : 0
        let handle = order[index]
        // (The body throws nothing: `try?` only meets `borrowing`'s signature.)
        return try? borrowing(handle) { client throws(PatchbayError) -> R? in
            let channel = client.channel
            let request = channel.entryAtHead(.request)
            if let request { channel.noteConsumed(request.consumed) }
            if request != nil || channel.hasDisposals, let disposed = channel.nextDisposal(readingHead: request == nil) {
                // A DISPOSE of a REPLY this port sent; anything else goes the general way, which
                // drops it.
                guard Self.dispose(disposed, of: client) else { return nil }
                cursor = index + 1
                lastActive = handle
                return deliver(CapsServiceMessage(kind: .dispose, messageID: disposed, length: 0, consumed: true,
                                                  credentials: client.credentials, channelID: client.id, inPlace: true,
                                                  descriptors: nil),
                               UnsafeRawBufferPointer(start: nil, count: 0))
            }
            guard let request, let bytes = channel.plainPayload(request, .request, arena: channel.requestArena),
                  capsChannel(of: request.messageID) == client.id, room.map({ $0 >= request.length }) ?? true,
                  client.messages.count < maximumInFlight, !client.messages.contains(request.messageID),
                  channel.claimForService(request.position)
            else { return nil }
            client.messages.insert(MessageRecord(id: request.messageID, offset: -1, length: 0, state: Self.received))
            cursor = index + 1
            lastActive = handle
            // (The message is built where it is delivered: built before, it would be copied.)
            guard request.isInline else {
                // In the arena: valid until the client sees the reply, so consumed at once.
                channel.advance(.request)
                return deliver(CapsServiceMessage(kind: .request, messageID: request.messageID, length: request.length,
                                                  consumed: true, credentials: client.credentials, channelID: client.id,
                                                  inPlace: true, descriptors: nil), bytes)
            }
            // Inline: copied first, then consumed (once the head moves past it, the client may
            // reuse the slot).
            return withUnsafeTemporaryAllocation(byteCount: CapsLayout.inlineCapacity, alignment: 8) { buffer in
                let copy = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<bytes.count])
                if bytes.count > 0 { copy.copyMemory(from: bytes) }
                channel.advance(.request)
                return deliver(CapsServiceMessage(kind: .request, messageID: request.messageID, length: request.length,
                                                  consumed: true, credentials: client.credentials, channelID: client.id,
                                                  inPlace: true, descriptors: nil), UnsafeRawBufferPointer(copy))
            }
        }
    }

    /// A DISPOSE made: forgets the REPLY `id` and frees its arena space. False when `id` is not a
    /// REPLY this port sent to `client`, which then makes no DISPOSE.
    @inline(__always)
    private static func dispose(_ id: UInt64, of client: ClientChannel) -> Bool {
        guard let reply = client.messages.find(id), reply.state == replied else { return false }
        client.messages.remove(id)
        if reply.offset >= 0 { client.allocator.release(offset: reply.offset, length: reply.length) }
        return true
    }

    /// Runs `body` with `client` borrowed (see `order`); a client dropped meanwhile is kept until
    /// the outermost such scope ends.
    @inline(__always)
    private func borrowing<R>(_ client: Unmanaged<ClientChannel>, _ body: (ClientChannel) throws(PatchbayError) -> R)
        throws(PatchbayError) -> R
    {
        borrows += 1
        defer {
            borrows -= 1
            if borrows == 0 && !departed.isEmpty { departed.removeAll() }
        }
        return try client.borrowing(body)
    }

    /// An entry `nextEntry` found and its client.
    private struct Found {
        let client: Unmanaged<ClientChannel>
        let entry: CapsEntry
    }

    /// Round-robin over the clients: the next DISPOSE made of some client's reply head, else the
    /// next entry of its request ring (aborted ones skipped).
    private func nextEntry() -> Found? {
        let count = order.count
        guard count > 0 else { return nil }
        var index = cursor < count ? cursor : 0
        for _ in 0..<count {
            let client = order[index]
            index += 1
            if index == count { index = 0 }
            if let entry = client._withUnsafeGuaranteedRef({ Self.nextEntry(of: $0.channel) }) {
                cursor = index
                lastActive = client
                return Found(client: client, entry: entry)
            }
        }
        return nil
    }

    /// One client's next message: a DISPOSE made of its reply head, else the next entry of its
    /// request ring (aborted ones skipped).
    @inline(__always)
    private static func nextEntry(of channel: CapsChannel) -> CapsEntry? {
        while true {
            // The client's reply head comes with each request entry (the line read anyway), and
            // is read from its shared word only when the ring is empty. DISPOSEs of what it
            // consumed before pushing an entry come before that entry.
            let next = channel.peek(.request)
            if let (entry, _) = next { channel.noteConsumed(entry.consumed) }
            if next != nil || channel.hasDisposals, let disposed = channel.nextDisposal(readingHead: next == nil) {
                return CapsEntry(messageID: disposed, offset: 0, length: 0, kind: .dispose, flags: 0)
            }
            guard let (entry, position) = next else { return nil }
            // A DISPOSE entry (layout 2's, not one since) is dropped; a request its client took
            // back is skipped.
            if entry.kind == .dispose || (entry.kind == .request && !channel.claimForService(position)) {
                channel.advance(.request)
                continue
            }
            return entry
        }
    }

    /// Turns an entry into a message, lets `use` read it, and consumes it when `consume` (a
    /// request that did not fit the caller's buffer stays queued).
    /// nil: the entry was malformed (a payload outside the arena, or announced descriptors that
    /// never came) and has been dropped.
    @inline(__always)
    private func take<R>(_ client: ClientChannel, _ entry: CapsEntry, consume: Bool,
                         _ use: (CapsServiceMessage, UnsafeRawBufferPointer) -> R) throws(PatchbayError) -> R? {
        var message = CapsServiceMessage(kind: .request, messageID: entry.messageID, length: Int(entry.length), consumed: true,
                                         credentials: client.credentials, channelID: client.id, inPlace: true, descriptors: nil)
        if entry.kind == .dispose {
            // Made here of the client's reply head, for a REPLY this port sent: never a ring entry.
            guard Self.dispose(entry.messageID, of: client) else { return nil }
            tap?.record(.dispose, entry.messageID, length: 0)
            message.kind = .dispose
            message.length = 0
            return use(message, UnsafeRawBufferPointer(start: nil, count: 0))
        }
        // Ids carry their channel: an entry naming another client's channel is forged.
        guard capsChannel(of: entry.messageID) == client.id else {
            client.channel.advance(.request)
            return nil
        }
        // What was kept for this channel's head under another id: its client rewrote the entry.
        core.stash.discardStale(of: client.id, keeping: entry.messageID)
        switch entry.kind {
        case .request where !client.messages.contains(entry.messageID):
            if entry.flags & (CapsEntryFlags.attachedPayload | CapsEntryFlags.descriptors) != 0,
               Self.pastDescriptorBound(client.credentials.uid) {
                // Its uid's descriptors wait to be closed past the bound (a close of one of them
                // does not finish): reading more would pile them up in this process. The client
                // is cut off instead, its channel's own sockets closed the way `closeLast` does.
                cutOff(client)
                return nil
            }
            if client.messages.count >= maximumInFlight {
                core.stash.discard(entry, from: client.direct.rawValue, peer: UInt64(client.credentials.uid))
                refuse(entry, of: client, with: .noBufferSpace)
                return nil
            }
            if consume, let source = CapsPortCore.plainPayload(entry, in: client.channel, arena: client.channel.requestArena) {
                // The common cases, with nothing to keep alive: as below, without a payload value.
                client.messages.insert(MessageRecord(id: entry.messageID, offset: -1, length: 0, state: Self.received))
                if let tap { tap.record(.request, entry.messageID, length: Int(entry.length), head: tap.head(of: source)) }
                if entry.flags == CapsEntryFlags.inlinePayload { return Self.deliverInline(source, message, advancing: client.channel, use) }
                client.channel.advance(.request)
                return use(message, source)
            }
            guard let payload = try core.payload(of: entry, in: client.channel, arena: client.channel.requestArena,
                                                 direct: client.direct.rawValue, peer: UInt64(client.credentials.uid)) else {
                // A payload outside the arena, an attachment that is not a memfd sealed against
                // shrinking, announced descriptors that never came: never read, and refused.
                refuse(entry, of: client, with: .badMessage)
                return nil
            }
            message.inPlace = !payload.isAttached
            if consume {
                message.descriptors = payload.carried()
                // Recorded before the body runs, so the body may reply at once. A payload in the
                // arena stays valid: the client frees it only when it sees the reply. One inline
                // in the ring entry is copied first (at most `inlineCapacity` bytes, on the
                // stack): once the head moves past it, the client may reuse the slot.
                client.messages.insert(MessageRecord(id: entry.messageID, offset: -1, length: 0, state: Self.received))
                if let tap { tap.record(.request, entry.messageID, length: Int(entry.length), head: tap.head(of: payload.bytes)) }
                guard entry.flags & CapsEntryFlags.inlinePayload != 0 else {
                    client.channel.advance(.request)
                    let result = use(message, payload.bytes)
                    _ = consume payload  // an attached payload stays mapped until here
                    return result
                }
                let source = payload.bytes
                _ = consume payload
                return Self.deliverInline(source, message, advancing: client.channel, use)
            }
            let result = use(message, payload.bytes)
            if let attachments = payload.attachments { core.stash.keep(attachments, for: entry.messageID) }
            _ = consume payload
            return result
        case .abort:
            client.channel.advance(.request)
            core.stash.discardKept(entry.messageID)  // kept for a request read short, now taken back
            guard let request = client.messages.find(entry.messageID), request.state != Self.replied else { return nil }
            client.messages.setState(entry.messageID, Self.receivedAborted)
            tap?.record(.abort, entry.messageID, length: 0)
            message.kind = .aborted
            message.length = 0
            return use(message, UnsafeRawBufferPointer(start: nil, count: 0))
        case .request, .dispose, .reply, .discardedReply, .errorReply:
            // A request id already in use, or a kind a client does not send (layout 3: a DISPOSE
            // is the client's reply head, never an entry): dropped, with anything kept for it.
            client.channel.advance(.request)
            core.stash.discardKept(entry.messageID)
            return nil
        }
    }

    /// Shows `use` an inline request's bytes from a copy on the stack (at most `inlineCapacity`),
    /// consuming the entry first: once the head moves past it, the client may reuse the slot.
    @inline(__always)
    private static func deliverInline<R>(_ source: UnsafeRawBufferPointer, _ message: CapsServiceMessage, advancing channel: CapsChannel,
                                         _ use: (CapsServiceMessage, UnsafeRawBufferPointer) -> R) -> R {
        withUnsafeTemporaryAllocation(byteCount: CapsLayout.inlineCapacity, alignment: 8) { buffer in
            let copy = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<source.count])
            if source.count > 0 { copy.copyMemory(from: source) }
            channel.advance(.request)
            return use(message, UnsafeRawBufferPointer(copy))
        }
    }

    /// A request this port will not read (past the client's in-flight limit: ENOBUFS; a payload it
    /// cannot read safely: EBADMSG): consumed unread (its descriptors closed by the caller) and
    /// answered REFUSED with the errno in its flags, which frees its space at the client. A client
    /// that does not read its replies either finds its reply ring full, and the refusal is
    /// dropped: its space stays taken there, which only that client feels.
    private func refuse(_ entry: CapsEntry, of client: ClientChannel, with errno: Errno) {
        client.channel.advance(.request)
        _ = client.channel.push(.reply, CapsEntry(messageID: entry.messageID, offset: 0, length: 0, kind: .errorReply,
                                                  flags: UInt32(bitPattern: errno.rawValue)))
        wake(client)
        refused.total += 1
        if errno == .noBufferSpace { refused.pastLimit += 1 }
        refused.last = client.credentials
    }

    /// The current notices counter.
    private var noticesWord: UnsafeMutablePointer<UInt32> {
        UnsafeMutablePointer(bitPattern: noticesAddress.load(ordering: .acquiring))!
    }

    /// Whether the broker queued notices since they were last read (one load, no system call).
    private var noticesPending: Bool {
        SharedWord.load(noticesWord) != noticesSeen
    }

    /// Reads the broker's notices: clients connecting (their channels) and going away.
    private func processBrokerEvents() {
        noticesSeen = SharedWord.load(noticesWord)
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 16)
        defer { buffer.deallocate() }
        while true {
            guard var message = try? connection.socket.receive(into: buffer, nonblocking: true) else { return }
            if message.length == 0 && message.descriptors.count == 0 { return }
            guard let frame = try? Frame.decode(Array(buffer[0..<message.length])[...]),
                  let event = try? Event.decode(frame) else { continue }
            switch event {
            case .caps(.connected(let channelID, let credentials, let arenaSize)):
                // A client not taken (its uid's descriptors already wait to be closed past the
                // bound; its descriptors did not all arrive, this process being out of them; or
                // its channel cannot be mapped) is refused: the broker tells it at once, rather
                // than letting it wait for answers that cannot come. Its sockets, which it may
                // have queued descriptors into already, are closed as `closeOwn` does.
                func refuse(_ sockets: [CInt]) {
                    try? connection.post(.caps(.refuseClient(channelID: channelID)))
                    for socket in sockets { PeerDescriptors.closeOwn(socket, of: UInt64(credentials.uid)) }
                }
                let stuck = Self.pastDescriptorBound(credentials.uid)
                guard !stuck, message.descriptors.count == 4 else {
                    if stuck { refuseUser(credentials.uid) }
                    var sockets: [CInt] = []
                    while let socket = message.descriptors.takeFirst() { sockets.append(socket.release()) }
                    refuse(sockets)
                    continue
                }
                let memory = message.descriptors.takeFirst()!, serviceWake = message.descriptors.takeFirst()!
                let clientWake = message.descriptors.takeFirst()!, direct = message.descriptors.takeFirst()!
                guard let channel = try? CapsChannel(memory, arenaSize: Int(arenaSize), tracksDisposals: true) else {
                    refuse([serviceWake.release(), clientWake.release(), direct.release()])
                    continue
                }
                if takesDescriptorsOnWake { WakeSocket.acceptDescriptors(serviceWake.rawValue) }
                channel.tally = status.baseAddress.advanced(by: CapsLayout.statusRequestsTakenOffset).assumingMemoryBound(to: UInt64.self)
                let token = Self.channelTokens | channelID
                try? epoll.add(serviceWake.rawValue, events: .readable, token: token)
                let added = ClientChannel(id: channelID, channel: channel, credentials: credentials, serviceWake: serviceWake,
                                          clientWake: clientWake, direct: direct, maximumInFlight: maximumInFlight)
                if let replaced = clients.updateValue(added, forKey: channelID) { forget(replaced) }
                order.append(Unmanaged.passUnretained(added))
                channels.append(channel)
                if notifyConnections {
                    synthetic.append(CapsServiceMessage(kind: .connected, messageID: 0, length: 0, consumed: true,
                                                        credentials: credentials, channelID: channelID, inPlace: true,
                                                        descriptors: nil))
                }
            case .caps(.disconnected(let channelID)):
                clientGone(channelID)
            case .monitor:
                continue  // a service port never asks to watch
            }
        }
    }

    /// Whether `uid`'s descriptors wait to be closed past `PeerDescriptors.bound`: this port then
    /// takes no more from it.
    static func pastDescriptorBound(_ uid: UInt32) -> Bool {
        PeerDescriptors.pastBound(of: UInt64(uid))
    }

    /// Ends a client's channel from this side: the broker marks it refused (its client learns at
    /// once), and it goes as a departed client does.
    private func cutOff(_ client: ClientChannel) {
        try? connection.post(.caps(.refuseClient(channelID: client.id)))
        refuseUser(client.credentials.uid)
        clientGone(client.id)
    }

    /// Asks the broker to refuse `uid`'s new connections here: each one refused here would still
    /// leave its three sockets to be closed behind the stuck ones, so the count would only slow.
    private func refuseUser(_ uid: UInt32) {
        guard refusedUsers.insert(uid).inserted else { return }
        try? connection.post(.caps(.refuseUser(uid: uid, refusing: true)))
    }

    /// Takes connections again from the refused uids whose closes have caught up.
    private func readmitUsers() {
        for uid in refusedUsers where !Self.pastDescriptorBound(uid) {
            refusedUsers.remove(uid)
            try? connection.post(.caps(.refuseUser(uid: uid, refusing: false)))
        }
    }

    /// A client went away: what it left here becomes DISPOSEs (unread requests, read ones not
    /// replied to, replies it never consumed), then its channel is dropped.
    private func clientGone(_ channelID: UInt64) {
        guard let client = clients.removeValue(forKey: channelID) else { return }
        forget(client)
        try? epoll.remove(client.serviceWake.rawValue)
        try? control.remove(client.direct.rawValue)
        var left: [UInt64] = []
        while let (entry, position) = client.channel.peek(.request) {
            client.channel.advance(.request)
            if entry.kind == .request, !client.channel.isAborted(position) { left.append(entry.messageID) }
        }
        // Replies it consumed before going are among these: still shown, in id order with the rest.
        left.append(contentsOf: client.messages.all().map(\.id))
        core.stash.discardStale(of: channelID, keeping: nil)  // kept under ids it rewrote, too
        for id in left.sorted() {
            core.stash.discard(id)
            synthetic.append(CapsServiceMessage(kind: .dispose, messageID: id, length: 0, consumed: true,
                                                credentials: client.credentials, channelID: channelID, inPlace: true,
                                                descriptors: nil))
        }
        if notifyConnections {
            synthetic.append(CapsServiceMessage(kind: .disconnected, messageID: 0, length: 0, consumed: true,
                                                credentials: client.credentials, channelID: channelID, inPlace: true,
                                                descriptors: nil))
        }
    }

    /// Drops `client` from the round-robin order and the polled channels.
    private func forget(_ client: ClientChannel) {
        let handle = Unmanaged.passUnretained(client).toOpaque()
        order.removeAll { $0.toOpaque() == handle }
        channels.removeAll { $0 === client.channel }
        if lastActive?.toOpaque() == handle { lastActive = nil }
        cursor = 0
        if borrows > 0 { departed.append(client) }
    }

    private static func hasWork(_ channels: [CapsChannel]) -> Bool {
        for channel in channels where channel.hasEntries(.request) || channel.hasDisposals { return true }
        return false
    }

    private func drainWakeups() {
        for client in clients.values { Self.drainWakeups(of: client) }
    }

    /// Takes `client`'s wake-ups: empties its wake socket, then clears its pending mark (so a push
    /// it makes from now on wakes this port again). The rings are looked at after this. In this
    /// order, a mark that is set always has its byte still in the socket, or a look at the rings
    /// to come: a byte written just after the drain stays for the next wait; a mark cleared
    /// before the client looked at it makes the client write again. (Cleared first, a client
    /// could set the mark and have its byte drained at once, and its next push would wake no one.)
    private static func drainWakeups(of client: ClientChannel) {
        WakeSocket.drain(client.serviceWake.rawValue, of: UInt64(client.credentials.uid))
        SharedWord.store(client.channel.word32(CapsLayout.serviceWakePendingOffset), 0)
        SharedWord.fence()
    }

    /// Spin-then-sleep until work arrives: spins while the last active client runs on another
    /// CPU, then sleeps: on the channels' futex words when it can, else in epoll.
    /// `plan`: settled under the lock the caller looked for a message with (nil: settled here).
    private func sleepUntilWork(_ plan: WaitPlan?) throws(PatchbayError) {
        try checkWaitsCancelled()
        // The rings themselves are read lock-free.
        let plan = plan ?? core.lock.locked { waitPlan() }
        let polled = plan.set
        try CapsPortCore.wait(publishingCPUIn: statusWord(CapsLayout.statusCPUOffset), peer: plan.peer,
                              until: { polled.hasWork || noticesPending }) {
            () throws(PatchbayError) in
            if plan.onFutexes, let watch = startControlWatch() {
                try sleepOnFutexes(polled, watch)
            } else {
                try sleepInEpoll(lookingAgainAfter: plan.lookAgainAfter)
            }
        }
        // Woken by another thread's cancellation (it took the control event's news): ends too.
        try checkWaitsCancelled()
    }

    private func checkWaitsCancelled() throws(PatchbayError) {
        if waitsCancelled.load(ordering: .acquiring) {
            throw PatchbayError(.canceled, "the wait was cancelled: the service is closing")
        }
    }

    /// The thread that wakes futex sleepers for what arrives in `control`, started once; nil if
    /// it cannot be (the port sleeps in epoll then).
    private func startControlWatch() -> ControlWatch? {
        core.lock.locked { () -> ControlWatch? in
            if controlWatch == nil { controlWatch = try? ControlWatch(watching: control.descriptorNumber) }
            return controlWatch
        }
    }

    /// The sleeping half of the wait on futex words (PROTOCOL.md §12.8): counts itself in the
    /// status page's futex sleepers, clears each polled channel's pending mark and notes its wake
    /// word, looks at the rings once more, then sleeps in one futex_waitv on those words and the
    /// control watch's. A client that pushes after that look sees the count, bumps its word and
    /// wakes it; one that pushed before is seen by the look.
    private func sleepOnFutexes(_ set: PollSet, _ watch: ControlWatch) throws(PatchbayError) {
        let polled = set.channels
        let sleeping = statusWord(CapsLayout.statusFutexSleepingOffset)
        SharedWord.increment(sleeping)
        SharedWord.fence()
        let result = withUnsafeTemporaryAllocation(of: pb_futex_waiter.self, capacity: polled.count + 1) {
            waiters -> Result<Void, Errno> in
            let controlNow = SharedWord.load(watch.word)
            waiters[0] = Futex.waiter(watch.word, expected: controlNow)
            for (index, channel) in polled.enumerated() {
                // Cleared before the look below: a push it covered is seen there, and a later
                // one sets it again and bumps the word.
                let pending = channel.word32(CapsLayout.serviceFutexPendingOffset)
                if SharedWord.load(pending) != 0 { SharedWord.store(pending, 0) }
                let word = channel.word32(CapsLayout.serviceWakeWordOffset)
                waiters[index + 1] = Futex.waiter(word, expected: SharedWord.load(word))
            }
            SharedWord.fence()
            // (`waitsCancelled` looked at after `controlNow`: a cancellation whose one edge of the
            // watch word another sleeper took is still seen.)
            if set.hasWork || noticesPending || controlNow != core.lock.locked({ controlSeen })
                || waitsCancelled.load(ordering: .acquiring) {
                return .success(())
            }
            SharedWord.store(statusWord(CapsLayout.statusRunningOffset), 0)
            defer { SharedWord.store(statusWord(CapsLayout.statusRunningOffset), 1) }
            return Result { () throws(Errno) in _ = try Futex.waitAny(waiters) }
        }
        SharedWord.decrement(sleeping)
        if case .failure(let error) = result {
            if error == .noFunction { ServiceSleep.onFutexes = false; return }
            throw PatchbayError(error, "futex_waitv failed")
        }
        let controlNow = SharedWord.load(watch.word)
        try core.lock.locked { () throws(PatchbayError) in
            guard controlNow != controlSeen else { return }
            controlSeen = controlNow
            try handleControl()
        }
    }

    /// The sleeping half of the wait in epoll: marks the port asleep (so clients wake its wake
    /// sockets) and sleeps in epoll on them and `control`.
    private func sleepInEpoll(lookingAgainAfter timeout: CInt) throws(PatchbayError) {
        // `sleeping` counts sleeping threads (one port may have several waiters); clients signal
        // while it is not zero. In epoll mode the port holds one count of its own for good.
        let sleeping = statusWord(CapsLayout.statusSleepingOffset)
        SharedWord.increment(sleeping)
        SharedWord.fence()
        // Looked at again after publishing: another thread may have added a channel meanwhile.
        let current = core.lock.locked { () -> [CapsChannel] in channels }
        if Self.hasWork(current) || noticesPending {
            SharedWord.decrement(sleeping)
            return
        }
        SharedWord.store(statusWord(CapsLayout.statusRunningOffset), 0)
        let events: [Epoll.Event]
        do {
            events = try epoll.wait(timeoutMilliseconds: timeout)
        } catch {
            throw PatchbayError(error, "epoll_wait failed")
        }
        SharedWord.store(statusWord(CapsLayout.statusRunningOffset), 1)
        SharedWord.decrement(sleeping)
        try core.lock.locked { () throws(PatchbayError) in try handle(events) }
    }

    /// What woke a thread sleeping in epoll: wake sockets (drained), or `control`.
    private func handle(_ events: [Epoll.Event]) throws(PatchbayError) {
        for event in events {
            if event.token == Self.controlToken {
                try handleControl()
            } else if let client = clients[event.token & ~Self.channelTokens] {
                Self.drainWakeups(of: client)
            }
        }
    }

    /// Reads `control` without waiting and acts on everything there, then throws what should end
    /// the wait (a cancel, a registration that failed, a broker lost for good). Everything is
    /// taken first: a thread sleeping on futex words hears of `control` only when something new
    /// arrives there, so nothing ready may be left behind.
    /// `takingCancels` false (`get`): a cancellation is left for the next wait.
    private func handleControl(takingCancels: Bool = true) throws(PatchbayError) {
        var failure: PatchbayError?
        var events: [Epoll.Event]
        repeat {
            do {
                events = try control.wait(maximum: 64, timeoutMilliseconds: 0)
            } catch {
                throw PatchbayError(error, "epoll_wait failed")
            }
            for event in events {
                switch event.token {
                case Self.brokerToken:
                    processBrokerEvents()
                    if event.events.contains(.hangup) {
                        do throws(PatchbayError) { try brokerLost() } catch { failure = failure ?? error }
                    }
                case Self.cancelToken:
                    guard takingCancels else { continue }
                    // After `cancelWaits` the event stays signalled: every sleeper wakes to it.
                    if !waitsCancelled.load(ordering: .acquiring) { _ = try? cancelEvent.consume() }
                    failure = failure ?? PatchbayError(.canceled, "the wait was cancelled")
                case Self.backlogToken:
                    _ = try? backlogEvent.consume()
                case Self.registrationToken:
                    _ = try? registrationEvent.consume()
                    if let registrationFailure { failure = failure ?? registrationFailure }
                case let token where token & Self.departureTokens != 0:
                    // The client closed its end of the direct socket: it is gone (or closed its port).
                    let id = token & ~Self.departureTokens
                    if let client = clients[id] { try? control.remove(client.direct.rawValue) }
                    clientGone(id)
                default:
                    continue
                }
            }
        } while events.count == 64
        if let failure { throw failure }
    }
}

extension Broker {
    /// Every registered CAPS service.
    public func listServices() throws(PatchbayError) -> [CapsServiceInfo] {
        let response = try call(.caps(.list))
        guard case .caps(.list(let services)) = response.reply else {
            throw PatchbayError(.protocolError, "unexpected reply to a service listing")
        }
        return services
    }

    /// Every CAPS channel this caller may see (all of them for root and the broker's own user;
    /// otherwise those of its own services and its own client connections), in channel id order,
    /// with its ring words: the broker reads them from the channels' headers, never a message.
    public func capsTraffic() throws(PatchbayError) -> [CapsChannelTraffic] {
        var channels: [CapsChannelTraffic] = []
        var after: UInt64 = 0
        while true {
            let response = try call(.caps(.traffic(after: after)))
            guard case .caps(.traffic(let page, let more)) = response.reply else {
                throw PatchbayError(.protocolError, "unexpected reply to a CAPS traffic listing")
            }
            channels += page
            guard more, let last = page.last else { return channels }
            after = last.channelID
        }
    }

    /// `listServices` without blocking a Swift concurrency thread.
    public func listServices() async throws(PatchbayError) -> [CapsServiceInfo] {
        try await offThePool { [self] () throws(PatchbayError) in try listServices() }
    }
}
