// CAPS: the requests. A service registers on a connection of its own (its port); a client
// connects, at once or parked here until a matching service registers (`waitForService`); the
// broker builds the channel (CapsRegistry.swift) and hands it to both, the service first, in a
// `capsConnected` event. When a port's connection closes, the other side of each of its channels
// hears of it.
//
// Errors: EINVAL, ENAMETOOLONG, EPERM, EEXIST, ENOENT, EACCES, EDQUOT, EOPNOTSUPP (the broker
// never writes a generation), as SEMANTICS.md §5 says.

import Glibc
import DequeModule
import PatchbayProtocol
import PatchbaySystem
import SystemPackage

final class CapsRequests: SessionClosedHook {
    let registry: CapsRegistry
    private let sessions: SessionTable

    /// A client connect parked until a matching service registers.
    private struct WaitingClient {
        var request: ParkedRequest
        var name: String
        var uid: Int32
        var gid: Int32
        var flags: CapsFlags
        /// Its service registered: it waits in `ready` for its turn to be tried again.
        var isReady = false
    }

    /// Parked connects by session id (a connection parks one at most): found and dropped by
    /// session in constant time, so thousands of them cost each park and each close no more
    /// (a walk of the list per park and per close made them quadratic: seventeenth attack round).
    private var waiting: [UInt64: WaitingClient] = [:]
    /// The same by name, in the order they parked (a session that no longer waits for the name is
    /// skipped when met, and the queue compacted once most of it is such): a registration finds
    /// its name's clients without walking every parked connect.
    private var waitingByName: [String: (queue: Deque<UInt64>, live: Int)] = [:]
    /// Parked connects whose service registered, by the client's uid, in the order they parked:
    /// tried again a few per uid per turn of the loop (`connectReady`), not all within the
    /// registration. A uid's 600 parked connects made one registration build 600 channels while
    /// every other client waited, a quarter of a second each time (twentieth attack round).
    private var ready: [UInt32: Deque<UInt64>] = [:]

    /// A service's tap (`caps serve --tap`): a connection of the process that registered it,
    /// whose records of the messages the service sees go to monitors of the service's uid.
    private struct Tap {
        var serviceID: UInt64
        var payloads: Bool
    }

    /// Taps by session id.
    private var taps: [UInt64: Tap] = [:]
    /// Clients of tapped services that have gone, by channel id, with the service they used: a
    /// tap's records reach the broker on the service's connection and may come after the client
    /// left, and are still shown as that client's. The last `departedLimit` only.
    private var departed: [UInt64: (serviceID: UInt64, credentials: PeerCredentials, command: String)] = [:]
    private var departedOrder: Deque<UInt64> = []
    private static let departedLimit = 1024

    /// Services a listing shows, so a reply stays inside one frame.
    static let listLimit = 512

    init(registry: CapsRegistry, sessions: SessionTable) {
        self.registry = registry
        self.sessions = sessions
    }

    func handle(_ request: Request.Caps, descriptors: inout ReceivedDescriptors, _ context: RequestContext) {
        switch request {
        case .service(let name, let uid, let gid, let flags, let maximumInFlight):
            guard let page = descriptors.takeFirst() else { return }
            do {
                let service = try registry.register(
                    name: name, uid: uid, gid: gid, flags: flags, maximumInFlight: maximumInFlight,
                    statusPage: page, session: context.session.id, caller: context.caller)
                sessions.reply(.caps(.service(serviceID: service.id, generation: service.initialGeneration)),
                               attaching: [service.notices.rawValue], to: context)
                markReady(name)
            } catch {
                sessions.fail(error, context)
            }

        case .client(let name, let uid, let gid, let flags):
            do {
                if let connection = try registry.connect(name: name, uid: uid, gid: gid, flags: flags,
                                                         session: context.session.id, caller: context.caller) {
                    deliver(connection, to: context.session, as: context.parked)
                } else if waiting[context.session.id] != nil {
                    sessions.fail(RequestError(errno: .invalidArgument, reason: "this connection already waits for a service"),
                                  context)
                } else {
                    park(WaitingClient(request: context.parked, name: name, uid: uid, gid: gid, flags: flags))
                }
            } catch {
                sessions.fail(error, context)
            }

        case .setGeneration:
            // The status page is sealed against everyone but its service, the broker included.
            sessions.fail(RequestError(errno: .notSupportedOnSocket,
                                       reason: "a service sets its generation by writing its status page"), context)

        case .list:
            sessions.reply(.caps(.list(registry.list(limit: Self.listLimit))), to: context)

        case .tap(let serviceID, let payloads):
            guard let service = registry.services[serviceID] else {
                return sessions.fail(RequestError(errno: .noSuchFileOrDirectory, reason: "no service has id \(serviceID)"), context)
            }
            guard service.owner.pid == context.caller.pid, service.owner.uid == context.caller.uid else {
                return sessions.fail(RequestError(errno: .notPermitted,
                                                  reason: "only the process that registered service \(service.name) (pid \(service.owner.pid)) may tap it"),
                                     context)
            }
            taps[context.session.id] = Tap(serviceID: serviceID, payloads: payloads)
            sessions.reply(.caps(.tap), to: context)

        case .tapRecords(let lost, let records):
            // One-way: never answered. Records from a connection that is no tap, or about another
            // service's channels, are dropped.
            report(records, lost: lost, from: context.session)

        case .refuseClient(let channelID):
            // One-way: a channel that is not this service's own is ignored.
            registry.refuse(channelID: channelID, bySession: context.session.id)

        case .refuseUser(let uid, let refusing):
            // One-way: from a connection that is no service, ignored.
            registry.refuseUser(uid, refusing, bySession: context.session.id)

        case .traffic(let after):
            // Root and the broker's own user see every channel; anyone else (on the system broker)
            // the channels of its own services and its own client connections.
            let caller = context.caller.uid
            let everyone = caller == 0 || caller == geteuid()
            let (page, more) = registry.traffic(after: after, limit: CapsChannelTraffic.pageSize) { channel in
                self.sessions[channel.clientSession]?.credentials
            } visible: { service, client in
                everyone || service.owner.uid == caller || client?.uid == caller
            }
            sessions.reply(.caps(.traffic(page, more: more)), to: context)
        }
    }

    /// Hands a new channel to its service (an event) and its client (the reply). If either cannot
    /// take it (the service's port is not keeping up, or the client's descriptor share is full),
    /// the channel is taken down again and the client told why.
    private func deliver(_ connection: consuming CapsConnection, to client: Session, as request: ParkedRequest) {
        let service = connection.service
        let channelID = connection.channelID
        // The service hears of the channel first: by the time the client has its reply (and may
        // put a request), the service's notice is already queued.
        if let serviceSession = sessions[service.session] {
            let credentials = client.credentials
            let event = Event.caps(.connected(
                channelID: channelID,
                // The real uid of the process that connected, if it is still the one with that
                // pid; otherwise (gone, its pid perhaps someone else's) the effective one.
                credentials: CapsCredentials(pid: credentials.pid,
                                             uid: credentials.startTime.flatMap { verifiedRealUserID(pid: credentials.pid, startTime: $0, inode: credentials.processInode) }
                                                 ?? credentials.uid,
                                             euid: credentials.uid, gid: credentials.gid, groups: credentials.groups),
                arenaSize: UInt32(registry.arenaSize)))
            let delivery = sessions.send(event.encode(),
                                         attaching: [connection.channel.rawValue, connection.serviceWakeReader.rawValue,
                                                     connection.clientWakeWriter.rawValue, connection.serviceEnd.rawValue],
                                         tag: channelID, to: serviceSession, chargedTo: credentials.uid)
            guard delivery == .underway else {
                abandon(client)
                sessions.fail(RequestError(errno: .resourceTemporarilyUnavailable,
                                           reason: "service \(service.name) is not taking new connections as fast as they come; try again"),
                              request)
                return
            }
            registry.channels[channelID]?.announced = true
            service.noteEventQueued()
        }
        let reply = Reply.caps(.client(channelID: channelID, serviceID: service.id,
                                       maximumInFlight: service.maximumInFlight, arenaSize: UInt32(registry.arenaSize)))
        let sent = sessions.reply(reply,
                                  attaching: [connection.channel.rawValue, connection.statusReadOnly.rawValue,
                                              connection.serviceWakeWriter.rawValue, connection.clientWakeReader.rawValue,
                                              connection.clientEnd.rawValue],
                                  to: request)
        if !sent { abandon(client) }
    }

    /// Takes down the channel a client was just given, as if it had left.
    private func abandon(_ client: Session) {
        notifyDeparture(registry.sessionClosed(client.id))
    }

    /// Tells services that clients left. A connection notice the service has not read yet is
    /// withdrawn instead: the service never hears of a channel that came and went, so clients
    /// connecting and leaving fast cannot fill its queue.
    private func notifyDeparture(_ notices: [(serviceSession: UInt64, event: Event)]) {
        for notice in notices {
            guard let service = sessions[notice.serviceSession] else { continue }
            if case .caps(.disconnected(let channelID)) = notice.event, sessions.withdraw(tag: channelID, from: service) { continue }
            // A departure may queue past the frame limit: there is at most one per channel the
            // service was told of, so what it holds is bounded by its live channels.
            sessions.send(notice.event.encode(), to: service, pastFrameLimit: true)
            registry.service(ofSession: notice.serviceSession)?.noteEventQueued()
        }
    }

    private func park(_ entry: WaitingClient) {
        waiting[entry.request.session] = entry
        waitingByName[entry.name, default: ([], 0)].queue.append(entry.request.session)
        waitingByName[entry.name]?.live += 1
    }

    /// A parked connect for `name` stopped waiting (its connection closed): its place in the
    /// name's queue is skipped, and the queue compacted once that is most of it.
    private func stoppedWaiting(_ entry: WaitingClient) {
        guard !entry.isReady, var named = waitingByName.removeValue(forKey: entry.name) else { return }
        named.live -= 1
        guard named.live > 0 else { return }
        if named.queue.count > 2 * named.live + 16 {
            named.queue = Deque(named.queue.filter { waiting[$0].map { $0.name == entry.name && !$0.isReady } ?? false })
        }
        waitingByName[entry.name] = named
    }

    /// A service of `name` registered: the clients parked for it are queued to be tried again, by
    /// uid, in the order they parked (a copy of a few ids each; no channel is built here).
    private func markReady(_ name: String) {
        guard let named = waitingByName.removeValue(forKey: name) else { return }
        for id in named.queue {
            guard var entry = waiting[id], entry.name == name, !entry.isReady, let session = sessions[id] else { continue }
            entry.isReady = true
            waiting[id] = entry
            ready[session.credentials.uid, default: []].append(id)
        }
    }

    /// Parked connects, including those waiting for their turn to be tried again.
    var parkedCount: Int { waiting.count }

    /// Whether parked connects wait to be tried again (the loop does not sleep meanwhile).
    var hasReadyClients: Bool { !ready.isEmpty }

    /// Tries again up to `perUser` of each uid's parked connects whose service registered, oldest
    /// first: each connects, fails (`EACCES`, …) or parks again.
    func connectReady(perUser: Int) {
        guard !ready.isEmpty else { return }
        for uid in Array(ready.keys) {
            guard var queue = ready.removeValue(forKey: uid) else { continue }
            var tried = 0
            while tried < perUser, let id = queue.popFirst() {
                guard var entry = waiting.removeValue(forKey: id), entry.isReady, let session = sessions[id] else { continue }
                tried += 1
                do {
                    if let connection = try registry.connect(name: entry.name, uid: entry.uid, gid: entry.gid, flags: entry.flags,
                                                             session: session.id, caller: session.credentials) {
                        deliver(connection, to: session, as: entry.request)
                    } else {
                        entry.isReady = false
                        park(entry)
                    }
                } catch {
                    sessions.fail(error, entry.request)
                }
            }
            if !queue.isEmpty { ready[uid] = queue }
        }
    }

    /// A port's connection closed: its parked connect is dropped, and the service of each of its
    /// channels hears that the client left.
    func sessionClosed(_ session: Session) {
        if let entry = waiting.removeValue(forKey: session.id) { stoppedWaiting(entry) }
        taps[session.id] = nil
        if !taps.isEmpty, let channel = registry.channel(ofSession: session.id),
           taps.values.contains(where: { $0.serviceID == channel.serviceID }) {
            sessions.noteCommand(of: session)
            departed[channel.id] = (channel.serviceID, session.credentials, session.command ?? "")
            departedOrder.append(channel.id)
            if departedOrder.count > Self.departedLimit, let oldest = departedOrder.popFirst() { departed[oldest] = nil }
        }
        if !sessions.monitors.isEmpty { announceDeparture(of: session) }
        notifyDeparture(registry.sessionClosed(session.id))
    }

    // MARK: Monitors

    /// Tells monitors that a client's channel ended (`capsDisconnect`, seen by the client's and the
    /// service's uids) or that a service's port closed (`capsDeath`, seen by the service's uid).
    private func announceDeparture(of session: Session) {
        let credentials = session.credentials
        if let channel = registry.channel(ofSession: session.id), let service = registry.services[channel.serviceID] {
            let (name, channelID) = (service.name, channel.id)
            sessions.announce(.caps, pid: credentials.pid, uid: credentials.uid, object: name,
                              audience: [credentials.uid, service.owner.uid]) {
                MonitorEvent(time: 0, subsystem: "", operation: "capsDisconnect", pid: credentials.pid, uid: credentials.uid,
                             command: session.command ?? "", object: name, outcome: "ok", elapsed: 0, lost: 0,
                             detail: "channel \(channelID)")
            }
        }
        if let service = registry.service(ofSession: session.id) {
            let (name, clients) = (service.name, service.channels.count)
            sessions.announce(.caps, pid: credentials.pid, uid: credentials.uid, object: name, audience: [service.owner.uid]) {
                MonitorEvent(time: 0, subsystem: "", operation: "capsDeath", pid: credentials.pid, uid: credentials.uid,
                             command: session.command ?? "", object: name, outcome: "ok", elapsed: 0, lost: 0,
                             detail: "service \(service.id), \(clients) client\(clients == 1 ? "" : "s") cut off")
            }
        }
    }

    /// A tap's records, as events for monitors of the service's uid (and root). Who the client is
    /// comes from the channel the message id names (kernel credentials), never from the record.
    private func report(_ records: [CapsTapRecord], lost: UInt32, from session: Session) {
        guard !sessions.monitors.isEmpty, let tap = taps[session.id], let service = registry.services[tap.serviceID] else { return }
        var extra = UInt64(lost)
        for record in records {
            let channelID = record.messageID >> 32
            let credentials: PeerCredentials
            let command: String
            if let channel = registry.channels[channelID], channel.serviceID == service.id, let client = sessions[channel.clientSession] {
                sessions.noteCommand(of: client)
                (credentials, command) = (client.credentials, client.command ?? "")
            } else if let gone = departed[channelID], gone.serviceID == service.id {
                (credentials, command) = (gone.credentials, gone.command)
            } else {
                continue
            }
            let operation: String
            var detail = "message \(record.messageID)"
            switch record.kind {
            case .request: operation = "tapRequest"; detail += ", \(record.length) bytes"
            case .reply: operation = "tapReply"; detail += ", \(record.length) bytes"
            case .errorReply: operation = "tapErrorReply"; detail += ", \(Errno(rawValue: Int32(truncatingIfNeeded: record.length)).name)"
            case .dispose: operation = "tapDispose"
            case .abort: operation = "tapAbort"
            }
            let payload = tap.payloads ? record.payload : []
            sessions.announce(.caps, pid: credentials.pid, uid: credentials.uid, object: service.name,
                              audience: [service.owner.uid], lost: extra) {
                MonitorEvent(time: 0, subsystem: "", operation: operation, pid: credentials.pid, uid: credentials.uid,
                             command: command, object: service.name, outcome: "ok", elapsed: 0, lost: 0,
                             detail: detail, payload: payload)
            }
            extra = 0
        }
    }
}
