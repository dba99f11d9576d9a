// The table of connected clients: admission (per-user broker, client limits), every reply and
// event on its way out, and the end of a session, which each subsystem hears through its hook.

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
    private(set) var clientsPerUser: [UInt32: Int] = [:]
    private var nextSessionID: UInt64 = 1
    private let loop: EventLoop
    private let configuration: BrokerConfiguration
    private let brokerUID = geteuid()
    private let logger: Logger
    /// The subsystems, told of every closed session.
    var closedHooks: [any SessionClosedHook] = []

    init(loop: EventLoop, configuration: BrokerConfiguration, logger: Logger) {
        self.loop = loop
        self.configuration = configuration
        self.logger = logger
    }

    var count: Int { sessions.count }

    subscript(id: UInt64) -> Session? { sessions[id] }

    // MARK: Admission

    /// Why a new connection from `credentials` is refused, or nil to admit it.
    func admissionRefusal(for credentials: PeerCredentials) -> ErrorReply? {
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

    /// Admits a connection that passed `admissionRefusal`.
    func admit(_ socket: consuming SeqpacketSocket, credentials: PeerCredentials) {
        let id = nextSessionID
        nextSessionID += 1
        let fd = socket.rawValue
        let session = Session(id: id, socket: socket, credentials: credentials)
        do {
            try loop.register(fd, as: .session(id), events: [.readable])
        } catch {
            logger.warning("cannot watch client", metadata: ["errno": "\(error.name)"])
            return
        }
        sessions[id] = session
        clientsPerUser[credentials.uid, default: 0] += 1
        logger.debug("client connected", metadata: [
            "session": "\(id)", "pid": "\(credentials.pid)", "uid": "\(credentials.uid)",
        ])
    }

    // MARK: Sending

    /// Sends `bytes` (and a copy of each attachment) to `session`, queueing while its socket is
    /// full. Returns false if the session was closed instead.
    @discardableResult
    func send(_ bytes: [UInt8], attaching attachments: [CInt] = [], to session: Session) -> Bool {
        switch session.send(bytes, attaching: attachments, queueLimit: configuration.maximumQueuedRepliesPerClient) {
        case .sent:
            return true
        case .queued:
            watchWritable(session, true)
            return true
        case .failed(let reason):
            close(session.id, reason: reason)
            return false
        }
    }

    /// Answers a request.
    @discardableResult
    func reply(_ reply: Reply, attaching attachments: [CInt] = [], to context: RequestContext) -> Bool {
        send(reply.encode(requestID: context.requestID), attaching: attachments, to: context.session)
    }

    /// Answers a request with an error.
    func fail(_ error: RequestError, _ context: RequestContext) {
        fail(ErrorReply(error), rawOpcode: context.opcode.rawValue, requestID: context.requestID, to: context.session)
    }

    /// Answers a parked request with an error, if its session is still here.
    func fail(_ error: RequestError, _ parked: ParkedRequest) {
        guard let session = sessions[parked.session] else { return }
        fail(ErrorReply(error), rawOpcode: parked.opcode.rawValue, requestID: parked.requestID, to: session)
    }

    func fail(_ error: ErrorReply, rawOpcode: UInt16, requestID: UInt64, to session: Session) {
        send(error.encode(rawOpcode: rawOpcode, requestID: requestID), to: session)
    }

    /// The session's socket drained (or failed): send what waits.
    func writable(_ session: Session) {
        switch session.flush() {
        case .drained: watchWritable(session, false)
        case .pending: break
        case .failed(let reason): close(session.id, reason: reason)
        }
    }

    private func watchWritable(_ session: Session, _ on: Bool) {
        guard session.wantsWritable != on else { return }
        session.wantsWritable = on
        try? loop.modify(session.socket.rawValue, events: on ? [.readable, .writable] : [.readable])
    }

    // MARK: Closing

    /// Ends a session: it leaves the table and the loop, and every subsystem hears of it.
    func close(_ id: UInt64, reason: String) {
        guard let session = sessions.removeValue(forKey: id) else { return }
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
