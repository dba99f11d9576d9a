// The broker: a user-space kernel for IPC objects. One thread, one epoll loop, non-blocking
// sockets everywhere; the data itself never passes through here, only control requests.
//
// Every request is answered from memory without blocking: a slow client only fills its own
// bounded reply queue (and is disconnected when that overflows), it never stalls another.

import Glibc
public import Logging
import PatchbayProtocol
import PatchbaySystem
public import SystemPackage

/// An error that stops the broker from starting, with a sentence for a person.
public struct BrokerStartError: Error, CustomStringConvertible {
    public var errno: Errno
    public var reason: String
    public var description: String { "\(errno.name): \(reason)" }
}

public final class BrokerServer {
    private let configuration: BrokerConfiguration
    private var logger: Logger
    private let epoll: Epoll
    private let listener: SeqpacketSocket
    private let signals: TerminationSignals
    /// Held for the broker's life so that a second broker on the same path refuses to start.
    private let pathLock: FileLock
    private let socketPath: String
    /// The socket file this broker created (device and inode), removed at exit only if it is
    /// still that file; nil for an inherited socket, which belongs to the service manager.
    private var ownSocketFile: (device: UInt64, inode: UInt64)?
    /// A descriptor kept in reserve: when accept fails with EMFILE, closing it makes room to
    /// accept and immediately drop the connection, instead of spinning on a listener that stays
    /// readable.
    private var spareDescriptor: Descriptor?
    private let startedAt = monotonicNanoseconds()
    private let brokerUID = geteuid()

    private var sessions: [UInt64: Session] = [:]
    private var clientsPerUser: [UInt32: Int] = [:]
    private var shedConnections = 0
    private var nextSessionID: UInt64 = firstSessionToken
    private let keys: KeyTable
    private let sharedMemory: SharedMemoryStore
    private let net: NetTable
    private let caps: CapsRegistry
    private var receiveBuffer: UnsafeMutableRawBufferPointer
    private var running = true

    private static let listenerToken: UInt64 = 1
    private static let signalToken: UInt64 = 2
    private static let firstSessionToken: UInt64 = 16

    /// Creates the listening socket (or adopts an inherited one) and everything the loop needs.
    /// Fails with EADDRINUSE when another broker already serves the path.
    public init(configuration: BrokerConfiguration, logger: Logger) throws(BrokerStartError) {
        self.configuration = configuration
        self.logger = logger
        raiseDescriptorLimit()
        // Writes to a vanished client must fail with EPIPE, never kill the broker.
        signal(SIGPIPE, SIG_IGN)

        let path = configuration.socketPath
        socketPath = path
        let inherited = try Self.inheritedListener()
        if inherited == nil {
            try Self.prepareSocketDirectory(for: path, mode: configuration.mode)
        }
        // Under socket activation too: a broker started by hand on the same path must not steal it.
        pathLock = try Self.lockPath(path)
        // The store comes before the socket, so a store that cannot be used leaves no socket behind.
        sharedMemory = try SharedMemoryStore(path: configuration.sharedMemoryDirectory, logger: logger)
        sharedMemory.maximumObjectsPerUser = configuration.maximumSharedMemoryObjectsPerUser
        sharedMemory.maximumBytesPerUser = configuration.maximumSharedMemoryBytesPerUser
        net = try NetTable(directory: configuration.netDirectory, mode: configuration.mode, logger: logger)
        net.maximumSocketsPerUser = configuration.maximumSocketsPerUser
        caps = CapsRegistry(logger: logger)
        caps.maximumServicesPerUser = configuration.maximumServicesPerUser
        if let inherited {
            listener = SeqpacketSocket(adopting: Descriptor(adopting: inherited))
            ownSocketFile = nil
        } else {
            listener = try Self.listen(on: path, mode: configuration.mode)
            ownSocketFile = Self.identity(of: path)
        }
        spareDescriptor = try? openFile("/dev/null", flags: O_RDONLY)
        do {
            epoll = try Epoll()
            signals = try TerminationSignals()
            try listener.descriptor.setNonblocking(true)
            try epoll.add(listener.rawValue, events: .readable, token: Self.listenerToken)
            try epoll.add(signals.descriptor.rawValue, events: .readable, token: Self.signalToken)
            // Start the closing thread now: after the termination signals are blocked (threads
            // inherit the mask, and a thread with them unblocked would die of SIGTERM), and so
            // that its eventfd is part of the broker's steady state.
            _ = DeferredCloser.shared
        } catch {
            throw BrokerStartError(errno: error, reason: "cannot set up the event loop: \(error.name)")
        }
        keys = KeyTable(
            maximumKeysPerUser: configuration.maximumKeysPerUser,
            limiter: FailedClaimLimiter(burst: configuration.failedClaimBurst,
                                        refillPerSecond: configuration.failedClaimsPerSecond),
            acknowledgementTimeout: configuration.claimAcknowledgementTimeout)
        receiveBuffer = .allocate(byteCount: maximumFrameSize + 1, alignment: 16)
        self.logger[metadataKey: "socket"] = "\(socketPath)"
    }

    deinit {
        receiveBuffer.deallocate()
        removeSocketFile()
    }

    /// Removes the socket file if it is still the one this broker created (a broker started
    /// after ours was stopped by hand may own the path by now).
    private func removeSocketFile() {
        guard let own = ownSocketFile else { return }
        ownSocketFile = nil
        if let current = Self.identity(of: socketPath), current == own {
            unlink(socketPath)
        }
    }

    /// Serves until SIGTERM, SIGINT or SIGHUP. `ready` runs once the socket accepts connections.
    public func run(ready: () -> Void = {}) {
        logger.info("broker listening", metadata: [
            "mode": "\(configuration.mode.rawValue)", "pid": "\(getpid())", "version": "\(patchbayVersion)",
        ])
        ready()
        while running {
            let events: [Epoll.Event]
            do {
                events = try epoll.wait(timeoutMilliseconds: nextTimeoutMilliseconds())
            } catch {
                logger.critical("epoll_wait failed", metadata: ["errno": "\(error.name)"])
                break
            }
            for event in events {
                switch event.token {
                case Self.listenerToken: acceptClients()
                case Self.signalToken: handleSignals()
                case Self.netListenerTokens...: serviceNetListener(event.token & (Self.netHandleTokens - 1))
                case Self.netHandleTokens...: serviceNetHandle(event.token & (Self.netHandleTokens - 1), events: event.events)
                default: serviceSession(event.token, events: event.events)
                }
            }
            keys.expire(now: monotonicNanoseconds())
        }
        // Stop taking connections first, so a client that races the shutdown finds no socket and
        // starts a new broker instead of connecting to one that is going away.
        removeSocketFile()
        try? epoll.remove(listener.rawValue)
        let clientCount = sessions.count
        for id in Array(sessions.keys) { closeSession(id, reason: "broker stopping") }
        logger.info("broker stopped", metadata: [
            "clients": "\(clientCount)", "keys_dropped": "\(keys.count)",
        ])
    }

    // MARK: Event loop pieces

    private func nextTimeoutMilliseconds() -> CInt {
        guard let deadline = keys.nextDeadline else { return -1 }
        let now = monotonicNanoseconds()
        if deadline <= now { return 0 }
        let milliseconds = (deadline - now) / 1_000_000 + 1
        return CInt(min(milliseconds, 60_000))
    }

    private func handleSignals() {
        while let number = signals.next() {
            logger.info("stopping on signal", metadata: ["signal": "\(number)"])
            running = false
        }
    }

    private func acceptClients() {
        // Bounded per wake-up so a flood of connections cannot starve the clients already here.
        for _ in 0..<64 {
            let socket: SeqpacketSocket
            do {
                socket = try listener.accept(nonblocking: true)
            } catch {
                if error == .tooManyOpenFiles || error == .tooManyOpenFilesInSystem {
                    shedConnectionWithoutDescriptors()
                } else if error != .resourceTemporarilyUnavailable && error != .connectionAbort {
                    logger.warning("accept failed", metadata: ["errno": "\(error.name)"])
                }
                return
            }
            let credentials: PeerCredentials
            do {
                credentials = try socket.peerCredentials()
            } catch {
                logger.warning("no peer credentials; dropping connection", metadata: ["errno": "\(error.name)"])
                continue
            }
            if let refusal = admissionRefusal(for: credentials) {
                // Tell the client why before closing; request id 0 addresses the connection.
                let frame = refusal.encode(rawOpcode: Opcode.connection.rawValue, requestID: 0)
                try? socket.send(frame, nonblocking: true)
                logger.debug("connection refused", metadata: [
                    "uid": "\(credentials.uid)", "pid": "\(credentials.pid)", "reason": "\(refusal.reason)",
                ])
                continue
            }
            let id = nextSessionID
            nextSessionID += 1
            let fd = socket.rawValue
            let session = Session(id: id, socket: socket, credentials: credentials)
            do {
                try epoll.add(fd, events: [.readable], token: id)
            } catch {
                logger.warning("cannot watch client", metadata: ["errno": "\(error.name)"])
                continue
            }
            sessions[id] = session
            clientsPerUser[credentials.uid, default: 0] += 1
            logger.debug("client connected", metadata: [
                "session": "\(id)", "pid": "\(credentials.pid)", "uid": "\(credentials.uid)",
            ])
        }
    }

    /// Out of descriptors: use the spare to accept one waiting connection and close it at once,
    /// so the listener stops being readable instead of waking the loop forever.
    private func shedConnectionWithoutDescriptors() {
        if shedConnections % 1000 == 0 {
            logger.warning("out of descriptors; refusing connections", metadata: ["refused": "\(shedConnections)"])
        }
        shedConnections += 1
        spareDescriptor = nil
        if let dropped = try? listener.accept(nonblocking: true) { _ = consume dropped }
        spareDescriptor = try? openFile("/dev/null", flags: O_RDONLY)
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

    private func serviceSession(_ id: UInt64, events: Epoll.Events) {
        guard let session = sessions[id] else { return }
        if events.contains(.writable) {
            flush(session)
            guard sessions[id] != nil else { return }
        }
        if events.contains(.readable) || events.contains(.hangup) || events.contains(.error) {
            // Bounded per wake-up so one busy client cannot starve the rest.
            for _ in 0..<64 {
                guard sessions[id] != nil else { return }
                if !receiveOne(session) { return }
            }
        }
    }

    /// Reads and handles one frame. Returns false when there is nothing more to read now.
    private func receiveOne(_ session: Session) -> Bool {
        var message: ReceivedMessage
        do {
            message = try session.socket.receive(into: receiveBuffer, nonblocking: true)
        } catch {
            if error == .resourceTemporarilyUnavailable { return false }
            closeSession(session.id, reason: "receive failed: \(error.name)")
            return false
        }
        // On SOCK_SEQPACKET a zero-length read is the peer's close; an empty frame would be
        // invalid anyway.
        if message.length == 0 && message.descriptors.count == 0 && !message.truncated {
            closeSession(session.id, reason: "client closed")
            return false
        }
        let bytes = Array(UnsafeRawBufferPointer(rebasing: receiveBuffer[0..<min(message.length, maximumFrameSize)]))
        handle(bytes[...], truncated: message.truncated || message.length > maximumFrameSize,
               descriptorsTruncated: message.descriptorsTruncated, descriptors: &message.descriptors,
               session: session)
        discard(&message.descriptors)
        return true
    }

    private func handle(
        _ bytes: ArraySlice<UInt8>, truncated: Bool, descriptorsTruncated: Bool,
        descriptors: inout ReceivedDescriptors, session: Session
    ) {
        let requestID = Frame.salvageRequestID(bytes) ?? 0
        // Error replies echo the request's opcode when it is a known one, else 0.
        let rawOpcode = Opcode(rawValue: Frame.salvageOpcode(bytes)).map(\.rawValue) ?? Opcode.connection.rawValue
        // Acknowledgements are one-way: even a malformed one gets no answer, which nobody awaits.
        if rawOpcode == Opcode.claimAcknowledge.rawValue {
            if let frame = try? Frame.decode(bytes), !truncated, !descriptorsTruncated, descriptors.count == 0,
               case .keys(.claimAcknowledge(let token, let received))? = try? Request.decode(frame) {
                dispatchAcknowledgement(token, received: received, session: session)
            }
            return
        }
        if truncated {
            sendError(ErrorReply(errno: EMSGSIZE, reason: "frames are limited to \(maximumFrameSize) bytes"),
                      rawOpcode: rawOpcode, requestID: requestID, to: session)
            return
        }
        if descriptorsTruncated {
            // Either the client sent more than fit, or the broker itself is out of descriptors.
            let error = descriptors.count >= maximumDescriptorsPerMessage
                ? ErrorReply(errno: EINVAL, reason: "a request carries at most \(maximumDescriptorsPerMessage) descriptors")
                : ErrorReply(errno: EMFILE, reason: "the broker has no free descriptor to receive yours; try again later")
            sendError(error, rawOpcode: rawOpcode, requestID: requestID, to: session)
            return
        }
        let request: Request
        let frame: Frame
        do {
            frame = try Frame.decode(bytes)
            request = try Request.decode(frame)
        } catch {
            logger.debug("bad frame", metadata: ["session": "\(session.id)", "reason": "\(error.reason)"])
            sendError(ErrorReply(error), rawOpcode: rawOpcode, requestID: requestID, to: session)
            return
        }
        let expected = frame.opcode.requestDescriptors
        guard descriptors.count == expected else {
            let reason = expected == 0
                ? "\(frame.opcode) requests carry no descriptors, but \(descriptors.count) arrived"
                : "\(frame.opcode) needs exactly \(expected) descriptor(s), but \(descriptors.count) arrived"
            sendError(ErrorReply(errno: EINVAL, reason: reason), rawOpcode: rawOpcode, requestID: requestID, to: session)
            return
        }
        dispatch(request, requestID: requestID, descriptors: &descriptors, session: session)
    }

    /// Descriptors a client sent that no request took are closed off the loop (their last close
    /// could block).
    private func discard(_ descriptors: inout ReceivedDescriptors) {
        while let descriptor = descriptors.takeFirst() {
            DeferredCloser.shared.close(descriptor)
        }
    }

    private func dispatch(_ request: Request, requestID: UInt64, descriptors: inout ReceivedDescriptors,
                          session: Session) {
        let now = monotonicNanoseconds()
        switch request {
        case .status:
            send(Reply.status(statusReport(now: now)).encode(requestID: requestID), to: session)

        case .keys(.share(let expiry, let restriction)):
            guard let file = descriptors.takeFirst() else { return }
            do {
                let token = try keys.share(file, expiry: expiry, restriction: restriction,
                                           sharer: session.credentials, now: now)
                send(Reply.keys(.share(token)).encode(requestID: requestID), to: session)
            } catch {
                sendError(ErrorReply(errno: error.errno.rawValue, reason: error.reason),
                          rawOpcode: Opcode.share.rawValue, requestID: requestID, to: session)
            }

        case .keys(.claim(let token)):
            do {
                let entry = try keys.beginClaim(token, by: session.credentials, session: session.id, now: now)
                session.claimsInFlight.insert(token)
                let reply = Reply.keys(.claim(fileKind: entry.fileKind.rawValue)).encode(requestID: requestID)
                if !send(reply, attaching: entry.file, to: session) {
                    // The client is gone or unreachable: the key goes back on the table.
                    session.claimsInFlight.remove(token)
                    keys.finishClaim(token, session: session.id, received: false, now: now)
                }
            } catch {
                sendError(ErrorReply(errno: error.errno.rawValue, reason: error.reason),
                          rawOpcode: Opcode.claim.rawValue, requestID: requestID, to: session)
            }

        case .keys(.claimAcknowledge(let token, let received)):
            dispatchAcknowledgement(token, received: received, session: session)

        case .namespace(.open(let path, let flags)):
            do {
                try open(path, flags: flags, requestID: requestID, session: session)
            } catch {
                sendError(error, .open, requestID, session)
            }

        case .net(.control(let id, let command)):
            do {
                try net.control(id, command, caller: session.credentials)
                send(Reply.net(.control).encode(requestID: requestID), to: session)
            } catch {
                sendError(error, .netControl, requestID, session)
            }

        case .caps(.service(let name, let uid, let gid, let flags, let maximumInFlight)):
            do {
                guard let page = descriptors.takeFirst() else { return }
                let service = try caps.register(name: name, uid: uid, gid: gid, flags: flags, maximumInFlight: maximumInFlight,
                                                statusPage: page, session: session.id, caller: session.credentials)
                send(Reply.caps(.service(serviceID: service.id, generation: caps.initialGeneration(of: name))).encode(requestID: requestID),
                     attaching: service.notices.rawValue, to: session)
                retryWaitingClients(for: name)
            } catch {
                sendError(error, .capsService, requestID, session)
            }

        case .caps(.client(let name, let uid, let gid, let flags)):
            do {
                if let connection = try caps.connect(name: name, uid: uid, gid: gid, flags: flags, session: session.id,
                                                     caller: session.credentials) {
                    deliver(connection, requestID: requestID, to: session)
                } else if caps.waiting.contains(where: { $0.session == session.id }) {
                    sendError(RequestError(errno: .invalidArgument, reason: "this connection already waits for a service"),
                              .capsClient, requestID, session)
                } else {
                    caps.waiting.append((session.id, requestID, name, uid, gid, flags))
                }
            } catch {
                sendError(error, .capsClient, requestID, session)
            }

        case .caps(.setGeneration):
            // The status page is sealed against everyone but its service, the broker included.
            sendError(RequestError(errno: .notSupportedOnSocket,
                                   reason: "a service sets its generation by writing its status page"),
                      .capsSetGeneration, requestID, session)

        case .caps(.list):
            send(Reply.caps(.list(Array(caps.list().prefix(512)))).encode(requestID: requestID), to: session)

        case .net(.list):
            send(Reply.net(.list(Array(net.list().prefix(512)))).encode(requestID: requestID), to: session)

        case .net(.path(let name)):
            do {
                try net.local.validate(Substring(name))
                send(Reply.net(.path(net.local.path(of: Substring(name)))).encode(requestID: requestID), to: session)
            } catch {
                sendError(error, .netPath, requestID, session)
            }

        case .sharedMemory(.open(let request)):
            do {
                let opened = try sharedMemory.open(request, by: session.credentials)
                send(Reply.sharedMemory(.open(opened.info)).encode(requestID: requestID),
                     attaching: opened.handle.rawValue, to: session)
            } catch {
                sendError(error, .sharedMemoryOpen, requestID, session)
            }

        case .sharedMemory(.unlink(let name)):
            do {
                try sharedMemory.unlink(name, by: session.credentials)
                send(Reply.sharedMemory(.unlink).encode(requestID: requestID), to: session)
            } catch {
                sendError(error, .sharedMemoryUnlink, requestID, session)
            }

        case .sharedMemory(.rename(let from, let to, let flags)):
            do {
                try sharedMemory.rename(from: from, to: to, flags: flags, by: session.credentials)
                send(Reply.sharedMemory(.rename).encode(requestID: requestID), to: session)
            } catch {
                sendError(error, .sharedMemoryRename, requestID, session)
            }

        case .sharedMemory(.stat(let name)):
            do {
                send(Reply.sharedMemory(.stat(try sharedMemory.stat(name))).encode(requestID: requestID), to: session)
            } catch {
                sendError(error, .sharedMemoryStat, requestID, session)
            }

        case .sharedMemory(.list(let after)):
            // 48 entries of at most ~1.1 KB each stay inside one frame.
            let (page, more) = sharedMemory.list(after: after, limit: 48)
            send(Reply.sharedMemory(.list(page, more: more)).encode(requestID: requestID), to: session)
        }
    }

    // MARK: CAPS

    /// Hands a new channel to its client (the reply) and its service (an event).
    private func deliver(_ connection: consuming CapsConnection, requestID: UInt64, to client: Session) {
        let service = connection.service
        // The service hears of the channel first: by the time the client has its reply (and may
        // put a request), the service's notice is already queued.
        if let serviceSession = sessions[service.session] {
            let credentials = client.credentials
            let event = Event.caps(.connected(
                channelID: connection.channelID,
                credentials: CapsCredentials(pid: credentials.pid, uid: Self.realUID(of: credentials.pid) ?? credentials.uid,
                                             euid: credentials.uid, gid: credentials.gid, groups: credentials.groups),
                arenaSize: UInt32(caps.arenaSize)))
            send(event.encode(),
                 attaching: [connection.channel.rawValue, connection.serviceWake.rawValue, connection.clientWake.rawValue,
                             connection.serviceEnd.rawValue], to: serviceSession)
            service.noteEventQueued()
        }
        let reply = Reply.caps(.client(channelID: connection.channelID, serviceID: service.id,
                                           maximumInFlight: service.maximumInFlight, arenaSize: UInt32(caps.arenaSize)))
        send(reply.encode(requestID: requestID),
             attaching: [connection.channel.rawValue, connection.statusReadOnly.rawValue, connection.serviceWake.rawValue,
                         connection.clientWake.rawValue, connection.clientEnd.rawValue], to: client)
    }

    /// Clients waiting for `name` try again now that a service registered.
    private func retryWaitingClients(for name: String) {
        let waiting = caps.waiting.filter { $0.name == name }
        caps.waiting.removeAll { $0.name == name }
        for entry in waiting {
            guard let session = sessions[entry.session] else { continue }
            do {
                if let connection = try caps.connect(name: entry.name, uid: entry.uid, gid: entry.gid, flags: entry.flags,
                                                     session: session.id, caller: session.credentials) {
                    deliver(connection, requestID: entry.requestID, to: session)
                } else {
                    caps.waiting.append(entry)
                }
            } catch {
                sendError(error, .capsClient, entry.requestID, session)
            }
        }
    }

    /// The real uid of a process (`/proc/PID/status`), which SO_PEERCRED does not report.
    private static func realUID(of pid: Int32) -> UInt32? {
        guard let status = try? openFile("/proc/\(pid)/status", flags: O_RDONLY),
              let bytes = try? status.readToEnd(limit: 8192) else { return nil }
        for line in String(decoding: bytes, as: UTF8.self).split(separator: "\n") where line.hasPrefix("Uid:") {
            return line.dropFirst(4).split(whereSeparator: { $0 == " " || $0 == "\t" }).first.flatMap { UInt32($0) }
        }
        return nil
    }

    // MARK: The namespace

    private func open(_ path: String, flags: OpenFlags, requestID: UInt64, session: Session) throws(RequestError) {
        let (target, nonblock) = try NamespacePath.parse(path, flags: flags)
        let caller = session.credentials
        switch target {
        case .anonymousSharedMemory:
            let memory = try AnonymousSharedMemory.create(flags: flags)
            send(Reply.namespace(.open(objectKind: OpenedObjectKind.anonymousSharedMemory.rawValue, id: 0)).encode(requestID: requestID),
                 attaching: memory.rawValue, to: session)
        case .netFactory(let familyName, let type):
            let family = try self.family(familyName)
            let opened = try net.create(family: family, type: type, caller: caller)
            watchHandle(opened.socket)
            send(Reply.namespace(.open(objectKind: OpenedObjectKind.socket.rawValue, id: opened.socket.id)).encode(requestID: requestID),
                 attaching: opened.clientHandle.rawValue, to: session)
        case .netData(let familyName, let id):
            _ = try family(familyName)
            let data = try net.openData(id, caller: caller)
            send(Reply.namespace(.open(objectKind: OpenedObjectKind.socketData.rawValue, id: id)).encode(requestID: requestID),
                 attaching: data.rawValue, to: session)
        case .netAddresses(let familyName):
            _ = try family(familyName)
            let text = net.list().filter { !$0.name.isEmpty }.map { $0.name + "\n" }.sorted().joined()
            do {
                let memory = try makeMemoryFile(name: "patchbay-net-addrs", sealable: false)
                try memory.writeAll(Array(text.utf8))
                _ = lseek(memory.rawValue, 0, SEEK_SET)
                let snapshot = try openFile("/proc/self/fd/\(memory.rawValue)", flags: O_RDONLY)
                send(Reply.namespace(.open(objectKind: OpenedObjectKind.addressList.rawValue, id: 0)).encode(requestID: requestID),
                     attaching: snapshot.rawValue, to: session)
            } catch {
                throw RequestError(errno: error, reason: "cannot build the address list")
            }
        case .netAccept(let familyName, let id):
            _ = try family(familyName)
            if let opened = try net.acceptNow(id, caller: caller) {
                deliver(opened, requestID: requestID, to: session)
                return
            }
            guard !nonblock else {
                throw RequestError(errno: .resourceTemporarilyUnavailable, reason: "no connection is waiting on socket \(id)")
            }
            // Blocking accept: park the request; the listener's readiness completes it.
            let listener = try net.lookup(id, caller: caller)
            listener.waitingAccepts.append((session.id, requestID))
            watchListener(listener, true)
        }
    }

    private func family(_ name: String) throws(RequestError) -> any NetFamily {
        guard let family = net.families[name] else {
            throw RequestError(errno: .noSuchFileOrDirectory, reason: "there is no /net/\(name.prefix(40)) family; the families are local")
        }
        return family
    }

    private func deliver(_ opened: consuming NetOpened, requestID: UInt64, to session: Session) {
        watchHandle(opened.socket)
        // Borrow, not bind: `if let` would move the data descriptor out and close it too early.
        var fds = [opened.clientHandle.rawValue]
        if let data = opened.data?.rawValue { fds.append(data) }
        send(Reply.namespace(.open(objectKind: OpenedObjectKind.acceptedSocket.rawValue, id: opened.socket.id)).encode(requestID: requestID),
             attaching: fds, to: session)
    }

    private static let netHandleTokens: UInt64 = 1 << 48
    private static let netListenerTokens: UInt64 = 2 << 48

    private func watchHandle(_ socket: NetSocket) {
        try? epoll.add(socket.handle.rawValue, events: [.readable], token: Self.netHandleTokens | socket.id)
    }

    private func watchListener(_ socket: NetSocket, _ on: Bool) {
        if on {
            // EEXIST when already watched: fine.
            try? epoll.add(socket.kernel.rawValue, events: [.readable], token: Self.netListenerTokens | socket.id)
        } else {
            try? epoll.remove(socket.kernel.rawValue)
        }
    }

    /// A handle end is readable: junk a client wrote (discarded) or the hang-up of the last copy.
    private func serviceNetHandle(_ id: UInt64, events: Epoll.Events) {
        guard let socket = net.sockets[id] else { return }
        // Only the hang-up closes the socket: a zero-length packet also reads as 0 bytes. Junk is
        // drained a bounded amount per wake-up, so a client writing without end cannot hold the loop.
        guard events.contains(.hangup) || events.contains(.error) else {
            var scratch = [UInt8](repeating: 0, count: 64)
            for _ in 0..<64 {
                let count = scratch.withUnsafeMutableBytes { Glibc.recv(socket.handle.rawValue, $0.baseAddress, $0.count, CInt(MSG_DONTWAIT)) }
                if count < 0 { break }
            }
            return
        }
        try? epoll.remove(socket.handle.rawValue)
        if !socket.waitingAccepts.isEmpty { watchListener(socket, false) }
        for waiting in net.close(id) {
            guard let session = sessions[waiting.session] else { continue }
            sendError(RequestError(errno: .connectionAbort, reason: "socket \(id) stopped listening"), .open,
                      waiting.requestID, session)
        }
    }

    /// A listener with waiting accepts is readable: complete them in order.
    private func serviceNetListener(_ id: UInt64) {
        guard let listener = net.sockets[id] else { return }
        while let waiting = listener.waitingAccepts.first {
            guard let session = sessions[waiting.session] else {
                listener.waitingAccepts.removeFirst()
                continue
            }
            do {
                guard let opened = try net.acceptPending(listener, owner: session.credentials) else { break }
                listener.waitingAccepts.removeFirst()
                deliver(opened, requestID: waiting.requestID, to: session)
            } catch {
                listener.waitingAccepts.removeFirst()
                sendError(error, .open, waiting.requestID, session)
            }
        }
        if listener.waitingAccepts.isEmpty { watchListener(listener, false) }
    }

    private func sendError(_ error: RequestError, _ opcode: Opcode, _ requestID: UInt64, _ session: Session) {
        sendError(ErrorReply(errno: error.errno.rawValue, reason: error.reason), rawOpcode: opcode.rawValue,
                  requestID: requestID, to: session)
    }

    private func dispatchAcknowledgement(_ token: KeyToken, received: Bool, session: Session) {
        guard session.claimsInFlight.remove(token) != nil else { return }
        keys.finishClaim(token, session: session.id, received: received, now: monotonicNanoseconds())
    }

    private func statusReport(now: UInt64) -> StatusReport {
        var users: [UInt32: UserUsage] = [:]
        for (uid, count) in clientsPerUser {
            users[uid, default: UserUsage(uid: uid)].clients = UInt32(count)
        }
        let summary = keys.summary(now: now)
        for (uid, count) in sharedMemory.countByOwner() {
            users[uid, default: UserUsage(uid: uid)].sharedMemoryObjects = UInt32(count)
        }
        for (uid, count) in caps.countByOwner() {
            users[uid, default: UserUsage(uid: uid)].services = UInt32(count)
        }
        for (uid, count) in net.countByOwner() {
            users[uid, default: UserUsage(uid: uid)].sockets = UInt32(count)
        }
        for (uid, count) in keys.usersWithKeys {
            users[uid, default: UserUsage(uid: uid)].keys = UInt32(count)
            users[uid, default: UserUsage(uid: uid)].oldestKeyAgeNanoseconds = summary.oldestByUser[uid] ?? 0
        }
        let rows = users.values.sorted {
            ($0.keys + $0.clients + $0.sharedMemoryObjects + $0.sockets + $0.services, $1.uid)
                > ($1.keys + $1.clients + $1.sharedMemoryObjects + $1.sockets + $1.services, $0.uid)
        }
        return StatusReport(
            pid: getpid(), version: patchbayVersion, mode: configuration.mode.rawValue, socketPath: socketPath,
            uptimeNanoseconds: now - startedAt, clients: UInt32(sessions.count),
            keysByFileKind: summary.byKind, users: Array(rows.prefix(StatusReport.maximumUsers)))
    }

    // MARK: Sending

    private func sendError(_ error: ErrorReply, rawOpcode: UInt16, requestID: UInt64, to session: Session) {
        send(error.encode(rawOpcode: rawOpcode, requestID: requestID), to: session)
    }

    /// Sends now if the socket takes it, else queues (with a duplicate of the attachment, so the
    /// queued reply does not depend on the original staying open). Returns false if the session
    /// was closed instead.
    @discardableResult
    private func send(_ bytes: [UInt8], attaching attachment: CInt? = nil, to session: Session) -> Bool {
        send(bytes, attaching: attachment.map { [$0] } ?? [], to: session)
    }

    @discardableResult
    private func send(_ bytes: [UInt8], attaching attachments: [CInt], to session: Session) -> Bool {
        if session.queuedReplies == 0 {
            do {
                try session.socket.send(bytes, descriptors: attachments, nonblocking: true)
                return true
            } catch {
                if error != .resourceTemporarilyUnavailable && error != .noBufferSpace {
                    closeSession(session.id, reason: "send failed: \(error.name)")
                    return false
                }
            }
        }
        guard session.queuedReplies < configuration.maximumQueuedRepliesPerClient else {
            closeSession(session.id, reason: "client is not reading its replies")
            return false
        }
        var boxes: [DescriptorBox] = []
        for attachment in attachments {
            do {
                boxes.append(DescriptorBox(try duplicateDescriptor(attachment)))
            } catch {
                closeSession(session.id, reason: "cannot queue a descriptor: \(error.name)")
                return false
            }
        }
        session.outgoing.append(OutgoingFrame(bytes: bytes, attachments: boxes))
        watchWritable(session, true)
        return true
    }

    private func flush(_ session: Session) {
        while let frame = session.outgoing.first {
            let fds = frame.attachments.map(\.rawValue)
            do {
                try session.socket.send(frame.bytes, descriptors: fds, nonblocking: true)
            } catch {
                if error == .resourceTemporarilyUnavailable || error == .noBufferSpace { return }
                closeSession(session.id, reason: "send failed: \(error.name)")
                return
            }
            session.outgoing.removeFirst()
        }
        watchWritable(session, false)
    }

    private func watchWritable(_ session: Session, _ on: Bool) {
        guard session.wantsWritable != on else { return }
        session.wantsWritable = on
        try? epoll.modify(session.socket.rawValue, events: on ? [.readable, .writable] : [.readable],
                          token: session.id)
    }

    private func closeSession(_ id: UInt64, reason: String) {
        guard let session = sessions.removeValue(forKey: id) else { return }
        try? epoll.remove(session.socket.rawValue)
        net.forgetWaits(of: id)
        for notice in caps.sessionClosed(id) {
            if let service = sessions[notice.serviceSession] {
                send(notice.event.encode(), to: service)
                caps.service(ofSession: notice.serviceSession)?.noteEventQueued()
            }
        }
        let remaining = (clientsPerUser[session.credentials.uid] ?? 1) - 1
        clientsPerUser[session.credentials.uid] = remaining > 0 ? remaining : nil
        let now = monotonicNanoseconds()
        // A claimer that vanished before acknowledging: its keys go back on the table.
        for token in session.claimsInFlight {
            keys.finishClaim(token, session: id, received: false, now: now)
        }
        logger.debug("client disconnected", metadata: [
            "session": "\(id)", "pid": "\(session.credentials.pid)", "reason": "\(reason)",
        ])
    }

    // MARK: Start-up helpers

    /// A listening socket passed by a service manager (`LISTEN_FDS`, `LISTEN_PID`), as fd 3.
    private static func inheritedListener() throws(BrokerStartError) -> CInt? {
        guard let countText = getenv("LISTEN_FDS").map({ String(cString: $0) }),
              let pidText = getenv("LISTEN_PID").map({ String(cString: $0) }),
              let count = Int(countText), let pid = Int32(pidText), pid == getpid()
        else { return nil }
        unsetenv("LISTEN_FDS")
        unsetenv("LISTEN_PID")
        unsetenv("LISTEN_FDNAMES")
        guard count == 1 else {
            throw BrokerStartError(errno: .invalidArgument,
                                   reason: "socket activation passed \(count) sockets; the broker takes exactly one")
        }
        let fd: CInt = 3
        var type: CInt = 0
        var listening: CInt = 0
        var length = socklen_t(MemoryLayout<CInt>.size)
        guard getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &length) == 0,
              type == CInt(SOCK_SEQPACKET.rawValue),
              getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &length) == 0, listening != 0
        else {
            throw BrokerStartError(errno: .invalidArgument,
                                   reason: "the inherited descriptor 3 is not a listening SOCK_SEQPACKET socket")
        }
        _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
        return fd
    }

    /// Makes sure the socket's directory is safe: private and ours for a per-user broker; owned
    /// by root (or us) and not writable by others for the system broker or a chosen path.
    private static func prepareSocketDirectory(for path: String, mode: BrokerConfiguration.Mode) throws(BrokerStartError) {
        guard let slash = path.lastIndex(of: "/"), slash != path.startIndex else { return }
        let directory = String(path[..<slash])
        let isDefaultUserPath = mode == .user && path == BrokerConfiguration.defaultSocketPath(mode: .user)
        do {
            try prepareDirectory(directory, mode: mode == .system ? 0o755 : 0o700, owner: geteuid(),
                                 private: isDefaultUserPath, allowRootOwner: !isDefaultUserPath)
        } catch {
            throw BrokerStartError(errno: error.errno, reason: error.reason)
        }
    }

    /// The lock that makes one broker per socket path. A broker that is just exiting still holds
    /// it for a moment (its socket file already gone, so clients start a new one): the lock is
    /// tried for up to two seconds before the path counts as taken.
    private static func lockPath(_ path: String) throws(BrokerStartError) -> FileLock {
        let deadline = monotonicNanoseconds() + 2_000_000_000
        while true {
            do {
                return try FileLock(path: path + ".lock", wait: false)
            } catch {
                guard error == .resourceTemporarilyUnavailable else {
                    throw BrokerStartError(errno: error, reason: "cannot lock \(path).lock: \(error.name)")
                }
                // A live broker keeps its socket; a departing one has already removed it.
                if access(path, F_OK) == 0 || monotonicNanoseconds() > deadline {
                    throw BrokerStartError(errno: .addressInUse, reason: "another broker is already serving \(path)")
                }
                usleep(10_000)
            }
        }
    }

    /// Binds and listens at `path`. The path lock proves no broker serves it, so a socket file
    /// left there is stale and removed; anything that is not a socket is left alone (EADDRINUSE).
    private static func listen(on path: String, mode: BrokerConfiguration.Mode) throws(BrokerStartError) -> SeqpacketSocket {
        var info = stat()
        if lstat(path, &info) == 0 {
            guard info.st_mode & S_IFMT == S_IFSOCK else {
                throw BrokerStartError(errno: .addressInUse, reason: "\(path) exists and is not a socket; not replacing it")
            }
            unlink(path)
        }
        do {
            return try bindAndListen(path, permissions: mode == .system ? 0o666 : 0o600)
        } catch {
            throw BrokerStartError(errno: error, reason: "cannot listen on \(path): \(error.name)")
        }
    }

    private static func bindAndListen(_ path: String, permissions: mode_t) throws(Errno) -> SeqpacketSocket {
        let socket = try SeqpacketSocket(nonblocking: true)
        try socket.bind(path: path)
        // bind creates the file under the process umask; set the mode explicitly rather than
        // changing the umask, which is process-wide.
        if chmod(path, permissions) != 0 {
            let error = Errno.current
            unlink(path)
            throw error
        }
        try socket.listen(backlog: 4096)
        return socket
    }

    private static func identity(of path: String) -> (device: UInt64, inode: UInt64)? {
        var info = stat()
        guard lstat(path, &info) == 0 else { return nil }
        return (UInt64(info.st_dev), UInt64(info.st_ino))
    }
}

/// Raises the descriptor limit as far as allowed: every outstanding key and every client holds
/// a descriptor in the broker. The soft limit goes to the hard one; a privileged broker (root, or
/// CAP_SYS_RESOURCE) also raises the hard limit, up to the kernel's `nr_open`.
private func raiseDescriptorLimit() {
    var limit = rlimit()
    guard getrlimit(CInt(RLIMIT_NOFILE.rawValue), &limit) == 0 else { return }
    if let file = try? openFile("/proc/sys/fs/nr_open", flags: O_RDONLY), let bytes = try? file.readToEnd(limit: 32),
       let ceiling = rlim_t(String(decoding: bytes, as: UTF8.self).split(separator: "\n").first ?? ""),
       ceiling > limit.rlim_max {
        var raised = rlimit(rlim_cur: ceiling, rlim_max: ceiling)
        if setrlimit(CInt(RLIMIT_NOFILE.rawValue), &raised) == 0 { return }
    }
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max
        _ = setrlimit(CInt(RLIMIT_NOFILE.rawValue), &limit)
    }
}
