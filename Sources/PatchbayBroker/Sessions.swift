// The table of connected clients: admission (per-user broker, client limits, the descriptor
// budget), every reply and event on its way out with back-pressure, and the end of a session,
// which each subsystem hears through its hook.
//
// Back-pressure: when a client's queue of unread replies reaches its bounds (bytes, descriptors,
// frames), the broker stops reading that client's requests until the queue drains; a client that
// leaves its queue full without reading for `stuckClientTimeout` is disconnected. So no unread
// reply makes the broker grow without bound, and a slow reader only ever waits on itself.

import DequeModule
import Glibc
import Logging
import PatchbayProtocol
import PatchbaySystem
import SystemPackage

/// What a subsystem does when a client's connection ends (its parked requests, claims in
/// flight, CAPS channels). Called once per session, after the session left the table.
protocol SessionClosedHook: AnyObject {
    func sessionClosed(_ session: Session)
}

final class SessionTable {
    private(set) var sessions: [UInt64: Session] = [:]
    /// Every reply and error leaves through here, so here they are counted.
    let metrics = BrokerMetrics()
    private(set) var clientsPerUser: [UInt32: Int] = [:]
    private var nextSessionID: UInt64 = 1
    private let loop: EventLoop
    private let configuration: BrokerConfiguration
    let budget: DescriptorBudget
    let limits: QueueLimits
    private let brokerUID = geteuid()
    private let logger: Logger
    /// Sessions whose reading is paused, and since when; and the same by uid, and in the order
    /// they paused (an entry whose session resumed or paused again since is skipped), so that
    /// neither a drain nor the loop's look at the oldest walks every paused session of every uid.
    private var paused: [UInt64: UInt64] = [:]
    private var pausedByUser: [UInt32: Set<UInt64>] = [:]
    private var pausedOrder = Deque<(id: UInt64, since: UInt64)>()
    /// Sessions out of the loop because their uid had its share of a turn, per uid, oldest first
    /// (`deferReading`); a closed one is skipped when its turn comes.
    private var deferred: [UInt32: Deque<UInt64>] = [:]
    /// Sessions put out of the loop, and back, since the start (`patchbay_loop_deferred_total`).
    private(set) var deferrals: UInt64 = 0
    /// Reply bytes waiting for each uid's clients, all connections together.
    private(set) var queuedBytesByUser: [UInt32: Int] = [:]
    /// The subsystems, told of every closed session.
    var closedHooks: [any SessionClosedHook] = []
    /// New connections per uid (`connectionBurstPerUser`, `connectionsPerSecondPerUser`).
    private let connecting: UidTokenBucket
    /// Connections refused for coming faster than their uid's rate.
    private(set) var refusedForRate: UInt64 = 0

    init(loop: EventLoop, configuration: BrokerConfiguration, budget: DescriptorBudget, logger: Logger) {
        self.loop = loop
        self.configuration = configuration
        self.budget = budget
        self.logger = logger
        connecting = UidTokenBucket(burst: configuration.connectionBurstPerUser,
                                    refillPerSecond: configuration.connectionsPerSecondPerUser)
        limits = QueueLimits(bytes: configuration.maximumQueuedBytesPerClient,
                             descriptors: configuration.maximumQueuedDescriptorsPerClient,
                             pauseFrames: configuration.maximumQueuedFramesPerClient,
                             frames: configuration.maximumQueuedRepliesPerClient)
    }

    var count: Int { sessions.count }

    subscript(id: UInt64) -> Session? { sessions[id] }

    // MARK: Admission

    /// Admits a connection, or tells the client why not (request id 0 addresses the connection)
    /// and closes it. Returns the refusal, for the log.
    func admit(_ socket: consuming SeqpacketSocket, credentials: PeerCredentials) -> ErrorReply? {
        // A refused connection was never read: what its client queued in it (descriptors too,
        // whose last close could wait) is freed by its close, which must not happen here on the
        // loop unless nothing is queued (`closeRefused`).
        if let refusal = admissionRefusal(for: credentials) {
            try? socket.send(refusal.encode(rawOpcode: Opcode.connection.rawValue, requestID: 0), nonblocking: true)
            DeferredCloser.shared.closeRefused(socket, of: credentials.uid)
            return refusal
        }
        let charge: DescriptorCharge
        do {
            charge = try DescriptorCharge(1, to: credentials.uid, in: budget, for: "another connection")
        } catch {
            let refusal = ErrorReply(error)
            try? socket.send(refusal.encode(rawOpcode: Opcode.connection.rawValue, requestID: 0), nonblocking: true)
            DeferredCloser.shared.closeRefused(socket, of: credentials.uid)
            return refusal
        }
        let id = nextSessionID
        nextSessionID += 1
        let fd = socket.rawValue
        let session = Session(id: id, socket: socket, credentials: credentials, charge: charge)
        do {
            try loop.register(fd, as: .session(id), events: [.readable])
        } catch {
            // (The kernel's limit on watches, or its memory.) Refused like any other, with a
            // frame saying so.
            logger.warning("cannot watch client", metadata: ["errno": "\(error.name)"])
            let refusal = ErrorReply(errno: error.rawValue, reason: "the broker cannot watch another connection now (\(error.name)); try again")
            try? session.socket.send(refusal.encode(rawOpcode: Opcode.connection.rawValue, requestID: 0), nonblocking: true)
            return refusal
        }
        sessions[id] = session
        clientsPerUser[credentials.uid, default: 0] += 1
        logger.debug("client connected", metadata: [
            "session": "\(id)", "pid": "\(credentials.pid)", "uid": "\(credentials.uid)",
        ])
        return nil
    }

    /// The first look at a connection just accepted, by its uid alone (one `getsockopt`), before
    /// the broker reads anything about its process: a uid other than root and the per-user
    /// broker's own that connects faster than its rate is refused here, its socket closed (or
    /// emptied off the loop), at a few system calls' cost. Nil: go on to `admit`.
    func refuseIfConnectingTooFast(_ socket: consuming SeqpacketSocket, uid: UInt32, now: UInt64) -> SeqpacketSocket? {
        if uid == 0 || uid == brokerUID || connecting.take(uid: uid, now: now) { return socket }
        refusedForRate &+= 1
        let wait = connecting.millisecondsUntilNextToken(uid: uid, now: now)
        let refusal = ErrorReply(errno: EAGAIN, reason: "uid \(uid) opens connections faster than the broker takes them from one user (\(Int(connecting.refillPerSecond)) a second after a burst of \(Int(connecting.burst))): try again in \(wait) ms")
        try? socket.send(refusal.encode(rawOpcode: Opcode.connection.rawValue, requestID: 0), nonblocking: true)
        DeferredCloser.shared.closeRefused(socket, of: uid)
        return nil
    }

    private func admissionRefusal(for credentials: PeerCredentials) -> ErrorReply? {
        if configuration.mode == .user && credentials.uid != brokerUID {
            return ErrorReply(errno: EACCES,
                              reason: "this is the per-user broker of uid \(brokerUID); uid \(credentials.uid) may not use it")
        }
        if sessions.count >= configuration.maximumClients {
            return ErrorReply(errno: EAGAIN, reason: "the broker already serves \(sessions.count) clients, its limit")
        }
        let mine = clientsPerUser[credentials.uid] ?? 0
        if mine >= configuration.maximumClientsPerUser {
            return ErrorReply(errno: EAGAIN,
                              reason: "uid \(credentials.uid) already has \(mine) connections to the broker, its limit")
        }
        return nil
    }

    // MARK: Sending

    /// How a frame fared on its way out.
    enum Delivery: Equatable {
        /// Sent, or queued for the client's socket to drain.
        case underway
        /// Its descriptors could not be held for the client (its descriptor share is full); nothing
        /// was sent. The sentence says why.
        case refused(String)
        /// The session is closed.
        case closed
    }

    /// Sends `bytes` (and a copy of each attachment) to `session`, queueing while its socket is
    /// full. The copies a queued frame holds are charged to `payer`: the session's uid, unless
    /// another client caused the frame (a CAPS connection notice is its client's doing).
    @discardableResult
    func send(_ bytes: [UInt8], attaching attachments: [CInt] = [], tag: UInt64? = nil, to session: Session,
              chargedTo payer: UInt32? = nil, pastFrameLimit: Bool = false) -> Delivery {
        switch session.send(bytes, attaching: attachments, tag: tag, limits: limits, budget: budget, payer: payer,
                            pastFrameLimit: pastFrameLimit) {
        case .sent:
            return .underway
        case .queued:
            queuedBytesByUser[session.credentials.uid, default: 0] += bytes.count
            watchWritable(session, true)
            return .underway
        case .refused(let reason):
            return .refused(reason)
        case .failed(let reason):
            close(session.id, reason: reason)
            return .closed
        }
    }

    /// Answers a request. A reply whose descriptors cannot be held while it waits is answered with
    /// the EDQUOT error instead. Returns whether the reply itself is on its way.
    @discardableResult
    func reply(_ reply: Reply, attaching attachments: [CInt] = [], to context: RequestContext) -> Bool {
        deliver(reply, attaching: attachments, to: context.session, as: context.parked)
    }

    /// Answers a parked request, if its session is still here. Returns whether the reply is on its way.
    @discardableResult
    func reply(_ reply: Reply, attaching attachments: [CInt] = [], to parked: ParkedRequest) -> Bool {
        guard let session = sessions[parked.session] else { return false }
        return deliver(reply, attaching: attachments, to: session, as: parked)
    }

    private func deliver(_ reply: Reply, attaching attachments: [CInt], to session: Session, as request: ParkedRequest) -> Bool {
        switch send(reply.encode(requestID: request.requestID), attaching: attachments, to: session) {
        case .underway:
            metrics.count(opcode: request.opcode.rawValue, errno: 0)
            if !monitors.isEmpty { announce(request, errno: 0, caller: session) }
            return true
        case .refused(let reason):
            fail(ErrorReply(errno: EDQUOT, reason: reason), rawOpcode: request.opcode.rawValue,
                 requestID: request.requestID, to: session, about: request)
            return false
        case .closed:
            return false
        }
    }

    /// Answers a request with an error.
    func fail(_ error: RequestError, _ context: RequestContext) {
        fail(ErrorReply(error), rawOpcode: context.opcode.rawValue, requestID: context.requestID, to: context.session,
             about: context.parked)
    }

    /// Answers a parked request with an error, if its session is still here.
    func fail(_ error: RequestError, _ parked: ParkedRequest) {
        guard let session = sessions[parked.session] else { return }
        fail(ErrorReply(error), rawOpcode: parked.opcode.rawValue, requestID: parked.requestID, to: session, about: parked)
    }

    /// Answers with an error; `about` (the request as monitors see it) is nil for a frame that
    /// never became a request.
    func fail(_ error: ErrorReply, rawOpcode: UInt16, requestID: UInt64, to session: Session, about request: ParkedRequest? = nil) {
        metrics.count(opcode: rawOpcode, errno: error.errno)
        send(error.encode(rawOpcode: rawOpcode, requestID: requestID), to: session)
        if !monitors.isEmpty {
            let opcode = Opcode(rawValue: rawOpcode) ?? .connection
            announce(request ?? ParkedRequest(session: session.id, requestID: requestID, opcode: opcode), errno: error.errno,
                     caller: session, rawOpcode: rawOpcode)
        }
    }

    // MARK: Monitors

    /// A connection that watches: what it asked to see, whose events it may see, and how many it
    /// missed since its last one.
    final class Monitor {
        let filter: MonitorFilter
        /// Root, or the per-user broker's user: every caller's events; otherwise its own uid's.
        let seesEveryone: Bool
        let uid: UInt32
        var lost: UInt64 = 0

        init(filter: MonitorFilter, seesEveryone: Bool, uid: UInt32) {
            self.filter = filter
            self.seesEveryone = seesEveryone
            self.uid = uid
        }
    }

    /// Watching sessions. Empty, the hooks above cost one check per answer.
    private(set) var monitors: [UInt64: Monitor] = [:]
    /// Bytes a monitor may have queued; past them its events are counted as lost, never queued,
    /// so a monitor that does not read costs the broker nothing more and slows nobody.
    static let monitorQueueLimit = 64 << 10

    /// Monitors a uid other than root may have open on the system broker. Each event goes to
    /// every monitor that may see it, in the loop: without a bound, one user's monitors times its
    /// own events (keys expiring together, say) was loop time and memory everyone paid for.
    static let monitorsPerUser = 8

    /// How many monitors `uid` has open.
    func monitorCount(of uid: UInt32) -> Int {
        monitors.values.reduce(0) { $0 + ($1.uid == uid ? 1 : 0) }
    }

    func watch(_ session: Session, filter: MonitorFilter, seesEveryone: Bool) {
        monitors[session.id] = Monitor(filter: filter, seesEveryone: seesEveryone, uid: session.credentials.uid)
    }

    /// Tells every monitor that may see it of an answer to `caller`: monitors of the caller's uid
    /// and of the object's owners.
    private func announce(_ request: ParkedRequest, errno: Int32, caller: Session, rawOpcode: UInt16? = nil) {
        let opcode = Opcode(rawValue: rawOpcode ?? request.opcode.rawValue)
        let credentials = caller.credentials
        // A connection to a CAPS name that failed reached no service: the name's owners are not
        // told of it (they would learn who tried, from where, and that the name was not theirs
        // to answer). Nor of any other failure but a refusal of access: a request that failed
        // for another reason did nothing to their objects, and would show them the caller's
        // names (a rename of a name that does not exist onto theirs names the caller's source).
        // A refusal (EACCES, EPERM) they see: someone tried their object.
        let owners = errno == 0 || (opcode != .capsClient && (errno == EACCES || errno == EPERM))
        var audience = owners ? request.owners : []
        audience.append(credentials.uid)
        announce(opcode?.subsystem ?? .broker, pid: credentials.pid, uid: credentials.uid, object: request.object,
                 audience: audience, skipping: opcode == .monitor ? caller.id : nil) {
            noteCommand(of: caller)
            return MonitorEvent(
                time: 0, subsystem: "", operation: opcode.map { "\($0)" } ?? "unknown", pid: credentials.pid,
                uid: credentials.uid, command: caller.command ?? "", object: request.object,
                outcome: errno == 0 ? "ok" : Errno(rawValue: errno).name,
                elapsed: request.start == 0 ? 0 : monotonicNanoseconds() &- request.start, lost: 0, detail: request.detail)
        }
    }

    /// Tells every monitor that may see it of an event: monitors that see everyone, and those of
    /// the uids in `audience`, whose filter the event passes. `make` builds the event once, only
    /// if some monitor takes it (its time, subsystem and lost count are filled in here).
    func announce(_ subsystem: Subsystem, pid: Int32, uid: UInt32, object: String, audience: [UInt32],
                  skipping skipped: UInt64? = nil, lost extra: UInt64 = 0, _ make: () -> MonitorEvent) {
        var event: MonitorEvent?
        // The dictionary is a value: the loop walks the monitors as they were, even if a send
        // below closes one (no copy unless that happens).
        for (id, monitor) in monitors {
            guard id != skipped, let target = sessions[id] else { continue }
            let filter = monitor.filter
            guard monitor.seesEveryone || audience.contains(monitor.uid),
                  filter.subsystems == 0 || filter.subsystems & MonitorFilter.bit(of: subsystem) != 0,
                  filter.uid < 0 || filter.uid == Int64(uid),
                  filter.pid == 0 || filter.pid == pid,
                  filter.name.isEmpty || filter.name == object
            else { continue }
            guard target.queuedBytes < Self.monitorQueueLimit else {
                monitor.lost &+= 1
                continue
            }
            if event == nil {
                var made = make()
                // A request's object can be as long as its frame (a ctl line of 64 KiB): cut, so
                // that the event, with everything else in it, fits a frame and reaches monitors.
                made.object = Self.cut(made.object, to: Self.monitorTextLimit)
                made.detail = Self.cut(made.detail, to: Self.monitorTextLimit)
                var now = timespec()
                clock_gettime(CLOCK_REALTIME, &now)
                made.time = UInt64(now.tv_sec) * 1_000_000_000 + UInt64(now.tv_nsec)
                made.subsystem = subsystem.label
                event = made
            }
            guard var outgoing = event else { continue }
            outgoing.lost = monitor.lost &+ extra
            if send(Event.monitor(outgoing).encode(), to: target) == .underway {
                monitor.lost = 0
            } else {
                monitor.lost &+= 1
            }
        }
    }

    /// The most bytes of an event's object and of its detail shown to monitors.
    static let monitorTextLimit = 4096

    /// `text` cut to at most `limit` bytes of UTF-8 (at a character's boundary), "…" marking a cut.
    static func cut(_ text: String, to limit: Int) -> String {
        guard text.utf8.count > limit else { return text }
        var kept = String.UnicodeScalarView()
        var bytes = 0
        for scalar in text.unicodeScalars {
            let size = String(scalar).utf8.count
            guard bytes + size <= limit - 3 else { break }
            kept.append(scalar)
            bytes += size
        }
        return String(kept) + "…"
    }

    /// Reads the session's command name once.
    func noteCommand(of session: Session) {
        if session.command == nil { session.command = commandName(of: session.credentials.pid) }
    }

    /// A process's command name (`/proc/PID/comm`), or "" when it cannot be read.
    private func commandName(of pid: pid_t) -> String {
        guard let file = openProcessFile(pid, "comm"), let bytes = try? file.readToEnd(limit: 64) else {
            return ""
        }
        let text = String(decoding: bytes, as: UTF8.self)
        return text.hasSuffix("\n") ? String(text.dropLast()) : text
    }

    /// Withdraws a frame still queued for `session` under `tag`; whether there was one.
    func withdraw(tag: UInt64, from session: Session) -> Bool {
        let before = session.queuedBytes
        guard session.withdraw(tag: tag) else { return false }
        noteDrained(before - session.queuedBytes, of: session)
        return true
    }

    /// The session's socket drained (or failed): send what waits, and read again once the queue
    /// (and its uid's, all connections together) is back under its bounds.
    func writable(_ session: Session) {
        let before = session.queuedBytes
        let outcome = session.flush()
        noteDrained(before - session.queuedBytes, of: session)
        switch outcome {
        case .drained: watchWritable(session, false)
        case .pending: break
        case .failed(let reason):
            close(session.id, reason: reason)
            return
        }
        resumeReadable(uid: session.credentials.uid)
    }

    private func noteDrained(_ bytes: Int, of session: Session) {
        guard bytes != 0 else { return }
        let remaining = (queuedBytesByUser[session.credentials.uid] ?? 0) - bytes
        queuedBytesByUser[session.credentials.uid] = remaining > 0 ? remaining : nil
    }

    /// Whether `uid`'s clients together have as many reply bytes waiting as they may.
    private func userIsBackedUp(_ uid: UInt32) -> Bool {
        (queuedBytesByUser[uid] ?? 0) >= configuration.maximumQueuedBytesPerUser
    }

    /// Reads again the paused sessions of `uid` whose queues (their own and the uid's) allow it.
    private func resumeReadable(uid: UInt32) {
        guard let ids = pausedByUser[uid], !userIsBackedUp(uid) else { return }
        for id in ids {
            guard let session = sessions[id], !session.isBackedUp(limits) else { continue }
            session.readingPausedSince = nil
            unpause(id, of: uid)
            updateInterest(session)
        }
    }

    private func unpause(_ id: UInt64, of uid: UInt32) {
        guard paused.removeValue(forKey: id) != nil else { return }
        pausedByUser[uid]?.remove(id)
        if pausedByUser[uid]?.isEmpty == true { pausedByUser[uid] = nil }
    }

    /// Whether the broker may read another request from `session` now. When its queue, or all
    /// its uid's queues together, are full it may not: reading pauses until they drain.
    func mayRead(_ session: Session, now: UInt64) -> Bool {
        if session.readingPausedSince != nil { return false }
        guard session.isBackedUp(limits) || userIsBackedUp(session.credentials.uid) else { return true }
        session.readingPausedSince = now
        paused[session.id] = now
        pausedByUser[session.credentials.uid, default: []].insert(session.id)
        pausedOrder.append((session.id, now))
        updateInterest(session)
        return false
    }

    /// Disconnects the clients that left their queue full without reading for too long.
    func closeStuckSessions(now: UInt64) {
        guard !paused.isEmpty else { return }
        // A paused client with replies of its own waiting is stuck; one with none, paused because
        // its uid's clients together hold their most, waits for those to drain (or be cut off).
        // Oldest first: what is left has not been paused that long.
        while let (id, since) = pausedOrder.first, now &- since >= configuration.stuckClientTimeout {
            pausedOrder.removeFirst()
            guard paused[id] == since, let session = sessions[id] else { continue }
            if session.queuedFrames > 0 {
                close(id, reason: "client left \(session.queuedFrames) replies unread")
            } else {
                // Paused for its uid's queues, with none of its own: looked at again a timeout on.
                pausedOrder.append((id, now))
                paused[id] = now
            }
        }
    }

    /// How long the loop may sleep before a paused client's time is up (-1: none paused).
    func millisecondsUntilNextStuckCheck(now: UInt64) -> CInt {
        while let (id, since) = pausedOrder.first, paused[id] != since { pausedOrder.removeFirst() }
        guard let oldest = pausedOrder.first?.since else { return -1 }
        let deadline = oldest &+ configuration.stuckClientTimeout
        if deadline <= now { return 0 }
        return CInt(min((deadline - now) / 1_000_000 + 1, 60_000))
    }

    private func watchWritable(_ session: Session, _ on: Bool) {
        guard session.wantsWritable != on else { return }
        session.wantsWritable = on
        updateInterest(session)
    }

    private func updateInterest(_ session: Session) {
        guard !session.readingDeferred else { return }  // (watched again as it is when resumed)
        try? loop.modify(session.socket.rawValue, events: interest(of: session))
    }

    private func interest(of session: Session) -> Epoll.Events {
        var events: Epoll.Events = session.readingPausedSince == nil ? [.readable] : []
        if session.wantsWritable { events.insert(.writable) }
        return events
    }

    // MARK: A uid's share of the loop

    /// Takes a ready session out of the loop until `resumeDeferred` puts it back: its uid has had
    /// its share of this turn. Left in, it would stay ready (connections are watched
    /// level-triggered), and every turn would look at each of the uid's ready connections only to
    /// find its share spent: a uid with thousands of them, each holding a few requests (or a
    /// hang-up behind them), made every turn cost thousands of events, and every other user's
    /// requests a hundred times slower (seventeenth attack round). Out of the loop, a turn costs
    /// what it reads. (Removed, not modified: a hang-up is reported whatever events are asked for.)
    func deferReading(_ session: Session) {
        guard !session.readingDeferred else { return }
        session.readingDeferred = true
        loop.unregister(session.socket.rawValue)
        deferred[session.credentials.uid, default: []].append(session.id)
        deferrals &+= 1
    }

    /// Puts back in the loop up to `perUser` of each uid's deferred sessions, oldest first, watched
    /// for what they were (the next wait reports the ready ones, in a turn with fresh shares).
    func resumeDeferred(perUser: Int) {
        guard !deferred.isEmpty else { return }
        for uid in Array(deferred.keys) {
            guard var queue = deferred.removeValue(forKey: uid) else { continue }
            var resumed = 0
            while resumed < perUser, let id = queue.popFirst() {
                guard let session = sessions[id], session.readingDeferred else { continue }
                session.readingDeferred = false
                do {
                    try loop.register(session.socket.rawValue, as: .session(id), events: interest(of: session))
                } catch {
                    close(id, reason: "cannot be watched again (\(error.name))")
                    continue
                }
                resumed += 1
            }
            if !queue.isEmpty { deferred[uid] = queue }
        }
    }

    // MARK: Closing

    /// Ends a session: it leaves the table and the loop, and every subsystem hears of it.
    func close(_ id: UInt64, reason: String) {
        guard let session = sessions.removeValue(forKey: id) else { return }
        monitors[id] = nil
        unpause(id, of: session.credentials.uid)
        noteDrained(session.queuedBytes, of: session)
        resumeReadable(uid: session.credentials.uid)
        loop.unregister(session.socket.rawValue)
        let remaining = (clientsPerUser[session.credentials.uid] ?? 1) - 1
        clientsPerUser[session.credentials.uid] = remaining > 0 ? remaining : nil
        for hook in closedHooks { hook.sessionClosed(session) }
        logger.debug("client disconnected", metadata: [
            "session": "\(id)", "pid": "\(session.credentials.pid)", "reason": "\(reason)",
        ])
    }

    func closeAll(reason: String) {
        for id in Array(sessions.keys) { close(id, reason: reason) }
    }
}
