// The broker: a user-space kernel for IPC objects. One thread, one epoll loop, non-blocking
// sockets everywhere; the data itself never passes through here, only control requests.
//
// This file is the dispatch a reader takes in at once: the loop routes readiness to its owner
// (EventLoop.swift), new clients are admitted into the session table (Sessions.swift), and each
// decoded request goes to its subsystem's room: Keys/KeyRequests, SharedMemory/
// SharedMemoryRequests, Net/NetRequests, Caps/CapsRequests. Every request is answered from memory
// without blocking: a slow client only fills its own bounded reply queue (and is disconnected
// when that overflows), it never stalls another.

import Glibc
public import Logging
import PatchbayProtocol
import PatchbaySystem
import SystemPackage

public final class BrokerServer {
    private let configuration: BrokerConfiguration
    private var logger: Logger
    private let loop: EventLoop
    private let listener: BrokerListener
    private let signals: TerminationSignals
    /// A descriptor kept in reserve: when accept fails with EMFILE, closing it makes room to
    /// accept and immediately drop the connection, instead of spinning on a listener that stays
    /// readable.
    private var spareDescriptor: Descriptor?
    private var shedConnections = 0
    /// Connections root made on its own socket (`BrokerListener.rootSocket`).
    private var acceptedOnRootSocket: UInt64 = 0
    private let startedAt = monotonicNanoseconds()
    private let sessions: SessionTable
    private let keys: KeyRequests
    private let sharedMemory: SharedMemoryRequests
    private let net: NetRequests
    private let caps: CapsRequests
    private var receiveBuffer: UnsafeMutableRawBufferPointer
    private var running = true

    /// The work done for one client, and the connections accepted, per wake-up: one busy client
    /// or a flood of connections cannot starve the rest. Work is counted in units: one for most
    /// requests, more for those that cost more (`cost(of:)`), so a client flooding listings gets
    /// one page per turn while everyone else gets theirs.
    private static let workPerWakeup = 64
    private static let acceptsPerWakeup = 64
    /// And at most this long accepting per wake-up (the listener stays ready for the next turn),
    /// so connections opened and closed in a loop delay other clients' requests by no more.
    private static let acceptNanosecondsPerWakeup: UInt64 = 250_000
    /// What each uid has had of this turn of the loop (`TurnShares`: 1,024 units or 250 µs).
    /// (Each turn looks at every ready connection: up to `batchesPerTurn` batches of events.)
    private var turn = TurnShares()
    /// The loop's time charged to each uid since the start (its requests, and its connections to
    /// another uid's listener, refused or accepted).
    private var loopNanoseconds: [UInt32: UInt64] = [:]
    private static let batchesPerTurn = 64
    /// A uid's connections put back in the loop per turn, once its share had run out
    /// (`SessionTable.deferReading`): each may read `workPerWakeup` units, so these can use a
    /// whole share of a turn.
    private static let resumedPerTurn = TurnShares.workPerUid / workPerWakeup
    /// Turns of the loop, and the events they handled (`patchbay_loop_turns_total`,
    /// `patchbay_loop_events_total`).
    private var turns: UInt64 = 0
    private var eventsDispatched: UInt64 = 0

    /// Closes a uid may have waiting (its last connection's, a few descriptors no request took)
    /// before its frames are read with care (`serviceSession`): more mean its closes are stuck.
    private static let closesBeforeCaution = 64

    /// What a request costs the loop, in units of an ordinary request.
    private static func cost(of rawOpcode: UInt16) -> Int {
        switch Opcode(rawValue: rawOpcode) {
        case .sharedMemoryList?: SharedMemoryRequests.listPageSize  // a stat per object on the page
        case .netList?, .capsList?, .status?: 8  // a walk of an in-memory table
        case .metrics?: 16  // the status walk, and the text
        case .capsTraffic?: 16  // a sort of the channel ids, and a page of them
        case .capsTapRecord?: 64  // up to 64 records, each an event (and a send) per monitor that sees it: a whole turn
        default: 1
        }
    }

    /// Creates the listening socket (or adopts an inherited one) and everything the loop needs.
    /// Fails with EADDRINUSE when another broker already serves the path.
    public init(configuration: BrokerConfiguration, logger: Logger) throws(BrokerStartError) {
        self.configuration = configuration
        self.logger = logger
        // Every outstanding key and every client holds a descriptor in the broker; the budget
        // shares out what the kernel allows.
        let limit = DescriptorLimit.raiseToMaximum()?.soft ?? 1024
        let budget = DescriptorBudget(limit: limit, privilegedUID: configuration.mode == .system ? 0 : geteuid())
        // Writes to a vanished client must fail with EPIPE, never kill the broker.
        signal(SIGPIPE, SIG_IGN)
        // No close of what a client chose waits longer than this.
        DeferredCloser.shared.interruptCloses(after: configuration.closeTimeout)

        // What the service manager keeps for a restart (keys, uids' tmpfs roots), if it keeps any.
        let keepWithServiceManager = getenv("NOTIFY_SOCKET") != nil
            && (configuration.keepKeysWithServiceManager || ServiceManager.keepsDescriptors)
        // The policy first: a malformed one stops the broker before it has made anything.
        let policy = try configuration.policyDirectory.map { (directory) throws(BrokerStartError) in
            try Policy.load(directory: directory)
        } ?? .none
        // The store comes before the socket, so a store that cannot be used leaves no socket behind.
        var store: SharedMemoryStore?
        listener = try BrokerListener(path: configuration.socketPath, mode: configuration.mode, backlog: configuration.listenBacklog) { (keptOwnerRoots, keptStateRoot) throws(BrokerStartError) in
            // Every uid's objects on a tmpfs of its own, where the broker may mount: the system
            // broker, run as root.
            // The per-user broker at its default path: its socket directory is private, and
            // records where the store went if another user took its default name.
            var storePath = configuration.sharedMemoryDirectory
            if configuration.mode == .user, configuration.socketPath == BrokerConfiguration.defaultSocketPath(mode: .user),
               let slash = configuration.socketPath.lastIndex(of: "/") {
                storePath = try StorePlace.choose(default: storePath, socketDirectory: String(configuration.socketPath[..<slash]),
                                                  logger: logger)
            }
            store = try SharedMemoryStore(path: storePath,
                                          perOwnerStores: configuration.mode == .system && geteuid() == 0,
                                          keptOwnerRoots: keptOwnerRoots, keptStateRoot: keptStateRoot,
                                          keepRootsWithServiceManager: keepWithServiceManager,
                                          logger: logger)
        }
        guard let store else { preconditionFailure("the listener sets the store up before listening") }
        store.maximumObjectsPerUser = configuration.maximumSharedMemoryObjectsPerUser
        store.maximumBytesPerUser = configuration.maximumSharedMemoryBytesPerUser
        let netTable = try NetTable(directory: configuration.netDirectory, mode: configuration.mode, logger: logger)
        netTable.maximumSocketsPerUser = configuration.maximumSocketsPerUser
        netTable.connecting = UidTokenBucket(burst: configuration.netConnectionBurstPerUser,
                                             refillPerSecond: configuration.netConnectionsPerSecondPerUser)
        netTable.budget = budget
        netTable.policy = policy
        store.policy = policy
        let registry = CapsRegistry(logger: logger)
        registry.maximumServicesPerUser = configuration.maximumServicesPerUser
        registry.maximumClientsPerUser = configuration.maximumCapsClientsPerUser
        registry.maximumNamesPerUser = configuration.maximumCapsNamesPerUser
        registry.budget = budget
        registry.policy = policy
        registry.nameGrace = configuration.capsNameGrace
        if store.statePath != store.path { registry.mirrorDirectory = store.path }
        registry.generationsFile = store.statePath + "/caps-generations"
        spareDescriptor = try? openFile("/dev/null", flags: O_RDONLY)
        do {
            loop = try EventLoop(logger: logger)
            signals = try TerminationSignals()
            try loop.register(listener.socket.rawValue, as: .brokerListener, events: .readable)
            if let root = listener.rootSocket { try loop.register(root.socket.rawValue, as: .rootListener, events: .readable) }
            try loop.register(signals.descriptor.rawValue, as: .terminationSignals, events: .readable)
            // Start the closing thread now: after the termination signals are blocked (threads
            // inherit the mask, and a thread with them unblocked would die of SIGTERM), and so
            // that its eventfd is part of the broker's steady state.
            _ = DeferredCloser.shared
        } catch {
            throw BrokerStartError(errno: error, reason: "cannot set up the event loop: \(error.name)")
        }
        sessions = SessionTable(loop: loop, configuration: configuration, budget: budget, logger: logger)
        let keyTable = KeyTable(
            maximumKeysPerUser: configuration.maximumKeysPerUser,
            limiter: UidTokenBucket(burst: configuration.failedClaimBurst,
                                        refillPerSecond: configuration.failedClaimsPerSecond),
            acknowledgementTimeout: configuration.claimAcknowledgementTimeout)
        keyTable.budget = budget
        // Keys kept by the service manager across a restart come back first; new ones go to its
        // store from now on.
        let keepKeys = keepWithServiceManager
        if keepKeys || !listener.inheritedKeyFiles.isEmpty {
            keyTable.fdStore = keepKeys ? KeyFDStore() : nil
            var restored = 0
            for (name, fd) in listener.inheritedKeyFiles {
                guard let key = StoredKey(name: name) else {
                    close(fd)  // not a name this broker writes
                    continue
                }
                if keyTable.restore(key, file: Descriptor(adopting: fd), now: monotonicNanoseconds()) { restored += 1 }
            }
            listener.inheritedKeyFiles = []
            if restored > 0 { logger.info("keys restored from the service manager", metadata: ["keys": "\(restored)"]) }
        }
        keys = KeyRequests(table: keyTable, sessions: sessions)
        sharedMemory = SharedMemoryRequests(store: store, sessions: sessions)
        net = NetRequests(table: netTable, sessions: sessions, loop: loop)
        net.scratchFile = { [unowned store] uid throws(RequestError) in try store.scratchFile(for: uid) }
        caps = CapsRequests(registry: registry, sessions: sessions)
        sessions.closedHooks = [keys, net, caps]
        receiveBuffer = .allocate(byteCount: maximumFrameSize + 1, alignment: 16)
        self.logger[metadataKey: "socket"] = "\(configuration.socketPath)"
    }

    deinit {
        receiveBuffer.deallocate()
    }

    /// Serves until SIGTERM, SIGINT or SIGHUP. `ready` runs once the socket accepts connections.
    public func run(ready: () -> Void = {}) {
        logger.info("broker listening", metadata: [
            "mode": "\(configuration.mode.rawValue)", "pid": "\(getpid())", "version": "\(patchbayVersion)",
        ])
        if let problem = listener.rootSocketProblem {
            logger.warning("no socket of root's own; root connects through the shared one", metadata: ["reason": "\(problem)"])
        }
        ready()
        while running {
            do {
                turn.startTurn()
                turns &+= 1
                // Connections set aside when their uid's share ran out come back a few at a time.
                sessions.resumeDeferred(perUser: Self.resumedPerTurn)
                // So do connects parked for a service that has registered since.
                caps.connectReady(perUser: Self.resumedPerTurn)
                let dispatch = { [unowned self] (owner: Registration, events: Epoll.Events) in
                    eventsDispatched &+= 1
                    switch owner {
                    case .brokerListener: acceptClients(on: listener.socket)
                    case .rootListener: if let root = listener.rootSocket { acceptClients(on: root.socket, rootOnly: true) }
                    case .terminationSignals: handleSignals()
                    case .session(let id): serviceSession(id, events: events)
                    case .netHandle(let id): net.handleReadable(id, events: events)
                    case .netListener(let id):
                        net.listenerReadable(id)
                        for (maker, nanoseconds) in net.table.takeMakersTime() { charge(maker, work: 0, nanoseconds: nanoseconds) }
                    case .netMaker(let id): net.makerMayBeGone(id)
                    }
                }
                var batch = try loop.wait(timeoutMilliseconds: nextTimeoutMilliseconds(), dispatch)
                // A full batch may leave more descriptors ready: all of them are looked at in
                // this turn, so one uid's thousands of busy connections cannot keep another
                // uid's out of it (each uid's work in a turn is bounded: `TurnShares`).
                var batches = 1
                while batch == EventLoop.batchSize && batches < Self.batchesPerTurn {
                    batch = try loop.wait(timeoutMilliseconds: 0, dispatch)
                    batches += 1
                }
            } catch {
                logger.critical("epoll_wait failed", metadata: ["errno": "\(error.name)"])
                break
            }
            let now = monotonicNanoseconds()
            sessions.metrics.expired(keys.expire(now: now))
            sessions.closeStuckSessions(now: now)
            caps.registry.releaseKeptNames(now: now)
        }
        ServiceManager.notify("STOPPING=1")
        // Stop taking connections first, so a client that races the shutdown finds no socket and
        // starts a new broker instead of connecting to one that is going away.
        listener.removeSocketFile()
        loop.unregister(listener.socket.rawValue)
        if let root = listener.rootSocket { loop.unregister(root.socket.rawValue) }
        let clientCount = sessions.count
        sessions.closeAll(reason: "broker stopping")
        caps.registry.saveCopies()
        sharedMemory.store.releaseEmptyOwnerStores()
        sharedMemory.store.removeIfEmpty()
        logger.info("broker stopped", metadata: [
            "clients": "\(clientCount)", "keys_dropped": "\(keys.table.count)",
        ])
    }

    /// The loop sleeps until the next key deadline, stuck-client check or release of the CAPS
    /// names kept across a restart, whichever comes first; not at all while parked connects wait
    /// to be tried again.
    private func nextTimeoutMilliseconds() -> CInt {
        if caps.hasReadyClients { return 0 }
        let now = monotonicNanoseconds()
        let timeouts = [keys.millisecondsUntilNextDeadline(now: now), sessions.millisecondsUntilNextStuckCheck(now: now),
                        caps.registry.millisecondsUntilKeptNamesRelease(now: now)]
        return timeouts.filter { $0 >= 0 }.min() ?? -1
    }

    private func handleSignals() {
        while let number = signals.next() {
            logger.info("stopping on signal", metadata: ["signal": "\(number)"])
            running = false
        }
    }

    // MARK: Clients arriving

    /// Accepts what waits on `socket`, for at most `acceptNanosecondsPerWakeup`. `rootOnly`: the
    /// root socket, whose file mode admits root alone; a connection from any other uid there
    /// (the file's mode changed under the broker) is closed unserved.
    private func acceptClients(on listening: borrowing SeqpacketSocket, rootOnly: Bool = false) {
        // The spare, used up by a shed whose close was deferred, comes back once there is room.
        if spareDescriptor == nil { spareDescriptor = try? openFile("/dev/null", flags: O_RDONLY) }
        let started = monotonicNanoseconds()
        for index in 0..<Self.acceptsPerWakeup {
            let now = monotonicNanoseconds()
            if index > 0 && now &- started >= Self.acceptNanosecondsPerWakeup { return }
            var socket: SeqpacketSocket
            do {
                socket = try listening.accept(nonblocking: true)
            } catch {
                if error == .tooManyOpenFiles || error == .tooManyOpenFilesInSystem {
                    shedConnectionWithoutDescriptors(on: listening)
                } else if error != .resourceTemporarilyUnavailable && error != .connectionAbort {
                    logger.warning("accept failed", metadata: ["errno": "\(error.name)"])
                }
                return
            }
            let uid = try? UnixSocket.peerCredentials(of: socket.rawValue).uid
            if rootOnly {
                guard uid == 0 else {
                    DeferredCloser.shared.closeRefused(socket.descriptor.release(), of: uid.map(UInt64.init) ?? DeferredCloser.unknownPeer)
                    continue
                }
                acceptedOnRootSocket &+= 1
            }
            if let uid {
                guard let admitted = sessions.refuseIfConnectingTooFast(socket, uid: uid, now: now) else { continue }
                socket = admitted
            }
            let credentials: PeerCredentials
            do {
                credentials = try socket.peerCredentials()
            } catch {
                logger.warning("no peer credentials; dropping connection", metadata: ["errno": "\(error.name)"])
                DeferredCloser.shared.closeRefused(socket.descriptor.release(), of: DeferredCloser.unknownPeer)
                continue
            }
            // Each frame says which process sent it (`handle`: a connection is its maker's). The
            // listener has the flag and Linux copies it at accept; set again in case a kernel does
            // not. (Should both fail, frames name no sender: only pid-restricted claims fail.)
            try? socket.enableSenderCredentials()
            if let refusal = sessions.admit(socket, credentials: credentials) {
                logger.debug("connection refused", metadata: [
                    "uid": "\(credentials.uid)", "pid": "\(credentials.pid)", "reason": "\(refusal.reason)",
                ])
            }
        }
    }

    /// Out of descriptors: use the spare to accept one waiting connection and close it at once,
    /// so the listener stops being readable instead of waking the loop forever.
    private func shedConnectionWithoutDescriptors(on listening: borrowing SeqpacketSocket) {
        if shedConnections % 1000 == 0 {
            logger.warning("out of descriptors; refusing connections", metadata: ["refused": "\(shedConnections)"])
        }
        shedConnections += 1
        spareDescriptor = nil
        if let dropped = try? listening.accept(nonblocking: true) {
            let uid = (try? dropped.peerCredentials()).map { UInt64($0.uid) } ?? DeferredCloser.unknownPeer
            DeferredCloser.shared.closeRefused(dropped.descriptor.release(), of: uid)
        }
        spareDescriptor = try? openFile("/dev/null", flags: O_RDONLY)
    }

    // MARK: Requests arriving

    private func serviceSession(_ id: UInt64, events: Epoll.Events) {
        guard let session = sessions[id] else { return }
        if events.contains(.writable) {
            sessions.writable(session)
            guard sessions[id] != nil else { return }
        }
        if events.contains(.readable) || events.contains(.hangup) || events.contains(.error) {
            // Past its uid's work for this turn, a connection is read in the next one (it stays
            // ready); one with only a hang-up or an error to report is still handled now.
            let uid = session.credentials.uid
            let allowance = min(Self.workPerWakeup, turn.workLeft(for: uid))
            guard allowance > 0 || !events.contains(.readable) else {
                // Out of the loop until a later turn: looked at now, it would be looked at in
                // every turn until then.
                sessions.deferReading(session)
                return
            }
            var work = 0
            let started = monotonicNanoseconds()
            // Time the loop spent refusing or accepting other uids' connections to this uid's
            // listener (in its accepts) is theirs: charged to them, not to this uid, whose other
            // connections would otherwise wait turn after turn while another uid connects in a loop.
            let makersBefore = net.table.makersTimeTotal
            defer {
                var own = monotonicNanoseconds() - started
                for (maker, nanoseconds) in net.table.takeMakersTime() {
                    charge(maker, work: 0, nanoseconds: nanoseconds)
                    own -= min(own, nanoseconds)
                }
                charge(uid, work: work, nanoseconds: own)
            }
            while work < max(allowance, 1) {
                guard sessions[id] != nil else { return }
                let now = monotonicNanoseconds()
                // The uid's time for this turn is up: the rest waits for the next (at least one
                // frame was read in this wake-up).
                let own = (now - started) &- min(now - started, net.table.makersTimeTotal &- makersBefore)
                if work > 0 && !turn.hasTime(for: uid, after: own) { return }
                guard sessions.mayRead(session, now: now) else {
                    // Paused with a full queue: a client that hung up will never read it.
                    if events.contains(.hangup) || events.contains(.error) {
                        sessions.close(id, reason: "client closed with replies unread")
                    }
                    return
                }
                // A frame can bring `maximumDescriptorsReceived`. A uid whose descriptors wait
                // to be closed (its closes may not finish) and that has no room left for a frame's
                // worth is cut off before it is read: read first, each of its connections would
                // land that many in the broker, past its share.
                if DeferredCloser.shared.outstanding(of: uid) > Self.closesBeforeCaution
                    && !sessions.budget.fits(min(maximumDescriptorsReceived, sessions.budget.share(of: uid) / 2), for: uid) {
                    sessions.close(id, reason: "its descriptors waiting to be closed leave no room for another frame's")
                    return
                }
                guard let cost = receiveOne(session) else { return }
                work += cost
                // Descriptors a uid sent that wait to be closed count against its share: one
                // whose closes do not finish (a file it chose blocks them) and that keeps sending
                // more is cut off, rather than the broker's table filling up.
                if !sessions.budget.fits(0, for: session.credentials.uid) {
                    sessions.close(id, reason: "its descriptors waiting to be closed exceed its share")
                    return
                }
            }
        }
    }

    /// Charges `uid` for loop time in this turn's shares and in its running total
    /// (`patchbay_user_loop_seconds_total`).
    private func charge(_ uid: UInt32, work: Int, nanoseconds: UInt64) {
        turn.charge(uid, work: work, nanoseconds: nanoseconds)
        loopNanoseconds[uid, default: 0] &+= nanoseconds
    }

    /// Reads and handles one frame and returns what it cost; nil when there is nothing more to
    /// read now.
    private func receiveOne(_ session: Session) -> Int? {
        var message: ReceivedMessage
        do {
            message = try session.socket.receive(into: receiveBuffer, nonblocking: true)
        } catch {
            if error == .resourceTemporarilyUnavailable { return nil }
            sessions.close(session.id, reason: "receive failed: \(error.name)")
            return nil
        }
        // On SOCK_SEQPACKET a zero-length read is the peer's close; an empty frame would be
        // invalid anyway.
        if message.length == 0 && message.descriptors.count == 0 && !message.truncated {
            sessions.close(session.id, reason: "client closed")
            return nil
        }
        let bytes = Array(UnsafeRawBufferPointer(rebasing: receiveBuffer[0..<min(message.length, maximumFrameSize)]))
        handle(bytes[...], truncated: message.truncated || message.length > maximumFrameSize,
               descriptorsTruncated: message.descriptorsTruncated, descriptors: &message.descriptors, sender: message.senderPID,
               session: session)
        // Descriptors a client sent that no request took are closed off the loop (their last
        // close could block).
        while let descriptor = message.descriptors.takeFirst() {
            DeferredCloser.shared.close(descriptor, of: session.credentials.uid)
        }
        // A frame's bytes are read, checked and parsed whatever it asks: one more unit per 4 KiB
        // (a 64 KiB path costs what it takes, not what a status request does).
        return Self.cost(of: Frame.salvageOpcode(bytes[...])) + bytes.count / 4096
    }

    /// Checks a frame's envelope (size, descriptors, header, payload) and dispatches it.
    private func handle(
        _ bytes: ArraySlice<UInt8>, truncated: Bool, descriptorsTruncated: Bool,
        descriptors: inout ReceivedDescriptors, sender: pid_t, session: Session
    ) {
        let requestID = Frame.salvageRequestID(bytes) ?? 0
        // Error replies echo the request's opcode when it is a known one, else 0.
        let rawOpcode = Opcode(rawValue: Frame.salvageOpcode(bytes)).map(\.rawValue) ?? Opcode.connection.rawValue
        let refuse = { (errno: Int32, reason: String) in
            self.sessions.fail(ErrorReply(errno: errno, reason: reason), rawOpcode: rawOpcode, requestID: requestID, to: session)
        }
        // A connection is its maker's: every frame must be sent by the process that made it (the
        // kernel records each frame's sender: SO_PASSCRED). A child that inherited the connection
        // before its parent exec'd a set-uid program, or a process it was passed to, would
        // otherwise act under that process's pid: the pid a CAPS service or a /net listing shows
        // for it, a pid-restricted key. (0: the sender's pid is not known in this namespace.)
        let stranger = sender != 0 && sender != session.credentials.pid
        // Acknowledgements and tap records are one-way. A frame whose header is sound (magic,
        // version, kind request, reserved bits, size) and whose opcode is one-way never gets an
        // answer, which nobody awaits: a bad payload or stray descriptors drop it silently. A
        // frame whose header is not sound gets its error like any other (PROTOCOL.md §7).
        if let opcode = Opcode(rawValue: rawOpcode), opcode.metadata.isRequest, !opcode.expectsReply, !truncated,
           let frame = try? Frame.decode(bytes), frame.kind == .request {
            guard !stranger, !descriptorsTruncated, descriptors.count == 0, let request = try? Request.decode(frame) else { return }
            let context = RequestContext(session: session, requestID: requestID, opcode: frame.opcode, now: monotonicNanoseconds(),
                                         sender: sender)
            switch request {
            case .keys(let acknowledgement): keys.handle(acknowledgement, descriptors: &descriptors, context)
            case .caps(let tapRecords): caps.handle(tapRecords, descriptors: &descriptors, context)
            default: break
            }
            return
        }
        if stranger {
            return refuse(EPERM, "this request was sent by pid \(sender), but the connection was made by pid \(session.credentials.pid): a connection is used by the process that made it (a process that inherits or is given one connects again)")
        }
        if truncated {
            return refuse(EMSGSIZE, "frames are limited to \(maximumFrameSize) bytes")
        }
        if descriptors.count > maximumDescriptorsPerMessage {
            // All of them received (closed off the loop after this), none refused inside recvmsg.
            return refuse(EINVAL, "a request carries at most \(maximumDescriptorsPerMessage) descriptors")
        }
        if descriptorsTruncated {
            // The broker itself is out of descriptors.
            return refuse(EMFILE, "the broker has no free descriptor to receive yours; try again later")
        }
        let frame: Frame
        let request: Request
        do {
            frame = try Frame.decode(bytes)
            request = try Request.decode(frame)
        } catch {
            logger.debug("bad frame", metadata: ["session": "\(session.id)", "reason": "\(error.reason)"])
            sessions.fail(ErrorReply(error), rawOpcode: rawOpcode, requestID: requestID, to: session)
            return
        }
        let expected = frame.opcode.requestDescriptors
        guard descriptors.count == expected else {
            return refuse(EINVAL, expected == 0
                ? "\(frame.opcode) requests carry no descriptors, but \(descriptors.count) arrived"
                : "\(frame.opcode) needs exactly \(expected) descriptor(s), but \(descriptors.count) arrived")
        }
        var context = RequestContext(session: session, requestID: requestID, opcode: frame.opcode, now: monotonicNanoseconds(),
                                     sender: sender)
        if !sessions.monitors.isEmpty {
            (context.object, context.owners, context.detail) = describe(request, descriptors: descriptors)
            // Read while the caller surely runs: it may exit the moment it has its answer.
            sessions.noteCommand(of: session)
        }
        defer { sessions.metrics.observe(nanoseconds: monotonicNanoseconds() - context.now) }
        switch request {
        case .monitor(let filter):
            // Root and the per-user broker's user see every caller; others (on the system broker)
            // their own uid's requests only, through at most `monitorsPerUser` monitors.
            let seesEveryone = context.caller.uid == 0 || configuration.mode == .user
            if !seesEveryone, sessions.monitors[session.id] == nil,
               sessions.monitorCount(of: context.caller.uid) >= SessionTable.monitorsPerUser {
                sessions.fail(RequestError(errno: .diskQuotaExceeded,
                                           reason: "uid \(context.caller.uid) already has \(SessionTable.monitorsPerUser) monitors open, the most a user may have"),
                              context)
                break
            }
            sessions.watch(session, filter: filter, seesEveryone: seesEveryone)
            sessions.reply(.monitor, to: context)
        case .status:
            sessions.reply(.status(statusReport(now: context.now)), to: context)
        case .metrics:
            sessions.reply(.metrics(metricsText(now: context.now, for: context.caller)), to: context)
        case .keys(let request):
            keys.handle(request, descriptors: &descriptors, context)
        case .namespace(.open(let path, let flags)):
            do {
                let (target, nonblock) = try NamespacePath.parse(path, flags: flags)
                if target == .anonymousSharedMemory {
                    try sharedMemory.openAnonymous(flags: flags, context)
                } else {
                    try net.open(target, nonblock: nonblock, context)
                }
            } catch {
                sessions.fail(error, context)
            }
        case .sharedMemory(let request):
            sharedMemory.handle(request, context)
        case .net(let request):
            net.handle(request, descriptors: &descriptors, context)
        case .caps(let request):
            caps.handle(request, descriptors: &descriptors, context)
        }
    }

    // MARK: Monitors

    /// What a request concerns, as a monitor shows it: a name, a socket id and its command, a
    /// service, the kind of file a share hands over; never a key's text. Then the uids that own
    /// that object (their monitors see the request too), and a detail (an open's flags).
    /// A claim's key is described by its handler, once it is known to be the caller's to claim.
    private func describe(_ request: Request, descriptors: borrowing ReceivedDescriptors)
        -> (object: String, owners: [UInt32], detail: String)
    {
        let objects = sharedMemory.store.objects
        func owner(ofObject name: [UInt8]) -> [UInt32] { objects[name].map { [$0.uid] } ?? [] }
        func owner(ofSocket id: UInt64) -> [UInt32] { net.table.sockets[id].map { [$0.ownerUID] } ?? [] }
        func text(_ name: [UInt8]) -> String { String(decoding: name, as: UTF8.self) }
        switch request {
        case .status, .metrics, .monitor: return ("", [], "")
        case .keys(.share):
            guard let fd = descriptors.first else { return ("", [], "") }
            var info = stat()
            guard fstat(fd, &info) == 0 else { return ("", [], "") }
            return (FileKind(mode: info.st_mode).spoken, [], "")
        case .keys(.claim), .keys(.claimAcknowledge): return ("a key", [], "")
        case .namespace(.open(let path, let flags)):
            switch (try? NamespacePath.parse(path, flags: flags))?.0 {
            case .netData(_, let id)?, .netAccept(_, let id)?: return (path, owner(ofSocket: id), "")
            default: return (path, [], "")
            }
        case .sharedMemory(.open(let open)):
            var flags: [String] = [open.access == 0 ? "read-only" : "read-write"]
            if open.flags.contains(.create) { flags.append("create") }
            if open.flags.contains(.exclusive) { flags.append("exclusive") }
            if open.flags.contains(.truncate) { flags.append("truncate") }
            return (text(open.name), owner(ofObject: open.name), flags.joined(separator: " "))
        case .sharedMemory(.unlink(let name)), .sharedMemory(.stat(let name)): return (text(name), owner(ofObject: name), "")
        case .sharedMemory(.rename(let from, let to, _)):
            return (text(from) + " -> " + text(to), owner(ofObject: from) + owner(ofObject: to), "")
        case .sharedMemory(.list), .sharedMemory(.watch): return ("", [], "")
        case .net(.control(let socket, let command)): return ("socket \(socket): \(command)", owner(ofSocket: socket), "")
        case .net(.list): return ("", [], "")
        case .net(.path(let name)), .net(.adopt(_, _, let name)): return (name, [], "")
        case .caps(.service(let name, _, _, _, _)), .caps(.client(let name, _, _, _)): return (name, caps.registry.owners(of: name), "")
        case .caps(.tap(let serviceID, let payloads)):
            guard let service = caps.registry.services[serviceID] else { return ("", [], "service \(serviceID)") }
            return (service.name, [service.owner.uid], payloads ? "headers and payloads" : "headers")
        case .caps(.setGeneration), .caps(.list), .caps(.traffic), .caps(.tapRecords), .caps(.refuseClient), .caps(.refuseUser): return ("", [], "")
        }
    }

    // MARK: Metrics

    /// The exposition text. Per-uid rows: a non-root caller of a system broker sees its own uid
    /// only; root (and the per-user broker's one user) sees every uid, at most 100 (the busiest),
    /// so the text stays inside one frame.
    private func metricsText(now: UInt64, for caller: PeerCredentials) -> String {
        let report = statusReport(now: now)
        let metrics = sessions.metrics
        var out = MetricsText()
        out.metric("patchbay_info", "gauge", "The broker's version and mode (always 1).",
                   [(MetricsText.labels(["version": report.version, "mode": report.mode]), "1")])
        out.metric("patchbay_uptime_seconds", "gauge", "Seconds since the broker started.",
                   [("", MetricsText.number(Double(report.uptimeNanoseconds / 1_000_000) / 1000))])
        let requests = metrics.requests.sorted { ($0.key.opcode, $0.key.errno) < ($1.key.opcode, $1.key.errno) }
        out.metric("patchbay_requests_total", "counter", "Requests answered since start, by subsystem, operation and outcome (ok or the errno).",
                   requests.map { outcome, count in
                       let opcode = Opcode(rawValue: outcome.opcode)
                       let outcomeName = outcome.errno == 0 ? "ok" : Errno(rawValue: outcome.errno).name
                       return (MetricsText.labels(["subsystem": opcode?.subsystem.label ?? "broker",
                                                   "operation": opcode.map { "\($0)" } ?? "unknown", "outcome": outcomeName]),
                               "\(count)")
                   })
        out.metric("patchbay_keys_shared_total", "counter", "Keys handed out since start.", [("", "\(metrics.answered(.share))")])
        out.metric("patchbay_keys_claimed_total", "counter", "Claims answered with a descriptor since start.", [("", "\(metrics.answered(.claim))")])
        out.metric("patchbay_keys_expired_total", "counter", "Keys that expired unclaimed since start.", [("", "\(metrics.keysExpired)")])
        var histogram: [(labels: String, value: String)] = []
        var cumulative: UInt64 = 0
        for (index, bound) in BrokerMetrics.bounds.enumerated() {
            cumulative += metrics.buckets[index]
            histogram.append((MetricsText.labels(["le": "\(bound)"]), "\(cumulative)"))
        }
        histogram.append((MetricsText.labels(["le": "+Inf"]), "\(metrics.durationCount)"))
        out.histogram("patchbay_request_duration_seconds", "The broker's time handling one request (its loop's share).",
                      buckets: histogram, sum: metrics.durationSum, count: metrics.durationCount)
        out.gauge("patchbay_clients", "Connected clients.", report.clients)
        out.gauge("patchbay_keys_outstanding", "Keys shared and not yet claimed or expired.", report.keys)
        out.gauge("patchbay_shm_objects", "Named shared memory objects.", report.sharedMemoryObjects)
        out.gauge("patchbay_sockets", "Open /net sockets.", report.sockets)
        out.gauge("patchbay_caps_services", "Registered CAPS services.", report.users.reduce(0) { $0 + $1.services })
        out.gauge("patchbay_caps_channels", "CAPS client channels.", caps.registry.channels.count)
        out.gauge("patchbay_caps_parked", "CAPS connects parked until a service of their name registers (or waiting for their turn since).",
                  caps.parkedCount)
        out.metric("patchbay_shm_objects_created_total", "counter",
                   "Named shared memory objects created since start (their bytes come later, from the client's ftruncate: see patchbay_user_shm_bytes).",
                   [("", "\(sharedMemory.store.objectsCreated)")])
        // From the budget's books, not a walk of /proc/self/fd (thousands of entries, in the loop).
        let budget = sessions.budget
        out.gauge("patchbay_broker_descriptors", "Descriptors the broker holds for clients (charged to their uids).",
                  budget.held.values.reduce(0, +))
        out.gauge("patchbay_broker_descriptor_limit", "The broker's RLIMIT_NOFILE.", budget.limit)
        out.metric("patchbay_closes_interrupted_total", "counter",
                   "Closes of descriptors clients handed over that waited past --close-timeout and were interrupted.",
                   [("", "\(DeferredCloser.shared.interruptedCloses)")])
        out.metric("patchbay_connections_on_root_socket_total", "counter",
                   "Connections root made on its own socket (the system broker's second one, mode 0600).",
                   [("", "\(acceptedOnRootSocket)")])
        out.metric("patchbay_connections_refused_for_rate_total", "counter",
                   "Connections refused because their uid made them faster than it may: to the broker (--connections-per-second-per-uid), to /net listeners (--net-connections-per-second-per-uid).",
                   [(MetricsText.labels(["to": "broker"]), "\(sessions.refusedForRate)"),
                    (MetricsText.labels(["to": "net"]), "\(net.table.refusedForRate)")])
        if let resident = residentMemoryBytes() {
            out.gauge("patchbay_resident_memory_bytes", "The broker's resident memory.", resident)
        }
        let everyone = caller.uid == 0 || configuration.mode == .user
        let rows = report.users.filter { everyone || $0.uid == caller.uid }.prefix(100)
        let bytes = sharedMemory.store.objects.bytesByOwner
        func perUser(_ name: String, _ help: String, _ value: (UserUsage) -> String) {
            out.metric(name, "gauge", help, rows.map { (MetricsText.labels(["uid": "\($0.uid)"]), value($0)) })
        }
        perUser("patchbay_user_clients", "Connected clients, per uid.") { "\($0.clients)" }
        perUser("patchbay_user_keys", "Outstanding keys, per uid.") { "\($0.keys)" }
        perUser("patchbay_user_shm_objects", "Named shared memory objects, per owner uid.") { "\($0.sharedMemoryObjects)" }
        perUser("patchbay_user_shm_bytes", "Bytes of named shared memory, per owner uid.") { "\(bytes[$0.uid] ?? 0)" }
        perUser("patchbay_user_sockets", "Open /net sockets, per uid.") { "\($0.sockets)" }
        perUser("patchbay_user_caps_services", "Registered CAPS services, per uid.") { "\($0.services)" }
        perUser("patchbay_user_descriptors", "Broker descriptors charged to each uid.") { "\(budget.held[$0.uid] ?? 0)" }
        perUser("patchbay_user_descriptors_closing",
                "Descriptors each uid handed the broker that wait to be closed on its closing thread (they count against its share too).") {
            "\(DeferredCloser.shared.outstanding(of: $0.uid))"
        }
        let charged = loopNanoseconds.filter { everyone || $0.key == caller.uid }.sorted { ($0.value, $1.key) > ($1.value, $0.key) }.prefix(100)
        out.metric("patchbay_loop_turns_total", "counter", "Turns of the broker's loop (a wait for events, and the handling of what it found).",
                   [("", "\(turns)")])
        out.metric("patchbay_loop_events_total", "counter", "Events the broker's loop handled (a connection ready to read or write, a listener, a signal).",
                   [("", "\(eventsDispatched)")])
        out.metric("patchbay_loop_deferred_total", "counter",
                   "Connections taken out of the loop until a later turn because their uid had had its share of one (they come back 16 per uid per turn).",
                   [("", "\(sessions.deferrals)")])
        out.metric("patchbay_user_loop_seconds_total", "counter",
                   "The broker loop's time charged to each uid: reading and answering its requests, and refusing or accepting its connections to another uid's /net listener (the busiest 100).",
                   charged.map { (MetricsText.labels(["uid": "\($0.key)"]), MetricsText.number(Double($0.value) / 1e9)) })
        // CAPS traffic per service, from the channels' ring words (never the messages): the
        // caller's own services only for a non-root caller of a system broker, at most 100 (the
        // busiest).
        let services = caps.registry.messageCounts().filter { everyone || $0.uid == caller.uid }
            .sorted { ($0.toService &+ $0.toClient, $0.name) > ($1.toService &+ $1.toClient, $1.name) }.prefix(100)
        out.metric("patchbay_caps_messages_total", "counter",
                   "CAPS messages since each service registered, as the service counts them in its status page (its clients cannot write it): to_service the REQUESTs and ABORTs it consumed, to_client the replies it published.",
                   services.flatMap { service in
                       ["to_service", "to_client"].map { direction in
                           (MetricsText.labels(["service": service.name, "uid": "\(service.uid)", "direction": direction]),
                            "\(direction == "to_service" ? service.toService : service.toClient)")
                       }
                   })
        return out.text
    }

    // MARK: Status

    private func statusReport(now: UInt64) -> StatusReport {
        var users: [UInt32: UserUsage] = [:]
        func row(_ uid: UInt32, _ update: (inout UserUsage) -> Void) {
            update(&users[uid, default: UserUsage(uid: uid)])
        }
        for (uid, count) in sessions.clientsPerUser { row(uid) { $0.clients = UInt32(count) } }
        for (uid, count) in sharedMemory.store.countByOwner() { row(uid) { $0.sharedMemoryObjects = UInt32(count) } }
        for (uid, count) in caps.registry.countByOwner() { row(uid) { $0.services = UInt32(count) } }
        for (uid, count) in net.table.countByOwner() { row(uid) { $0.sockets = UInt32(count) } }
        let summary = keys.table.summary(now: now)
        for (uid, count) in keys.table.usersWithKeys {
            row(uid) {
                $0.keys = UInt32(count)
                $0.oldestKeyAgeNanoseconds = summary.oldestByUser[uid] ?? 0
            }
        }
        func total(_ usage: UserUsage) -> UInt32 {
            usage.keys + usage.clients + usage.sharedMemoryObjects + usage.sockets + usage.services
        }
        let rows = users.values.sorted { (total($0), $1.uid) > (total($1), $0.uid) }
        return StatusReport(
            pid: getpid(), version: patchbayVersion, mode: configuration.mode.rawValue,
            socketPath: configuration.socketPath, uptimeNanoseconds: now - startedAt, clients: UInt32(sessions.count),
            keysByFileKind: summary.byKind, users: Array(rows.prefix(StatusReport.maximumUsers)))
    }
}

/// Each uid's share of one turn of the loop: 1,024 units of work (`Server.cost(of:)`) or 250 µs,
/// whichever runs out first, for all of its connections together. A uid with thousands of
/// connections full of requests gets this much, then waits for the next turn, while every other
/// uid's requests are taken in this one. Units alone are not enough: they are not all alike in
/// time (a share takes a descriptor in, checks it, makes a key and a deadline, 15–25 µs; a status
/// a few), and a uid pipelining shares on one connection held every other uid's request behind
/// 64 of them (3 ms; 27 ms with eight connections).
struct TurnShares {
    static let workPerUid = 1024
    static let nanosecondsPerUid: UInt64 = 250_000

    private var work: [UInt32: Int] = [:]
    private var time: [UInt32: UInt64] = [:]

    /// A new turn: every uid's share is whole again.
    mutating func startTurn() {
        work.removeAll(keepingCapacity: true)
        time.removeAll(keepingCapacity: true)
    }

    /// The units `uid` may still have in this turn (0 once its time is up too).
    func workLeft(for uid: UInt32) -> Int {
        guard (time[uid] ?? 0) < Self.nanosecondsPerUid else { return 0 }
        return max(Self.workPerUid - (work[uid] ?? 0), 0)
    }

    /// Whether `uid` still has time in this turn with `running` nanoseconds more than it was
    /// charged so far.
    func hasTime(for uid: UInt32, after running: UInt64) -> Bool {
        (time[uid] ?? 0) &+ running < Self.nanosecondsPerUid
    }

    mutating func charge(_ uid: UInt32, work units: Int, nanoseconds: UInt64) {
        work[uid, default: 0] += units
        time[uid, default: 0] &+= nanoseconds
    }
}
