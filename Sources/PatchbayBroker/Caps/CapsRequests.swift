// CAPS: the requests. A service registers on a connection of its own (its port); a client
// connects, at once or parked here until a matching service registers (`waitForService`); the
// broker builds the channel (CapsRegistry.swift) and hands it to both, the service first, in a
// `capsConnected` event. When a port's connection closes, the other side of each of its channels
// hears of it.
//
// Errors: EINVAL, ENAMETOOLONG, EPERM, EEXIST, ENOENT, EACCES, EDQUOT, EOPNOTSUPP (the broker
// never writes a generation), as SEMANTICS.md §5 says.

import Glibc
import PatchbayProtocol
import PatchbaySystem

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
    }

    private var waiting: [WaitingClient] = []

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
                sessions.reply(.caps(.service(serviceID: service.id, generation: registry.initialGeneration(of: name))),
                               attaching: [service.notices.rawValue], to: context)
                retryWaitingClients(for: name)
            } catch {
                sessions.fail(error, context)
            }

        case .client(let name, let uid, let gid, let flags):
            do {
                if let connection = try registry.connect(name: name, uid: uid, gid: gid, flags: flags,
                                                         session: context.session.id, caller: context.caller) {
                    deliver(connection, to: context.session, as: context.parked)
                } else if waiting.contains(where: { $0.request.session == context.session.id }) {
                    sessions.fail(RequestError(errno: .invalidArgument, reason: "this connection already waits for a service"),
                                  context)
                } else {
                    waiting.append(WaitingClient(request: context.parked, name: name, uid: uid, gid: gid, flags: flags))
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
                credentials: CapsCredentials(pid: credentials.pid, uid: realUserID(of: credentials.pid) ?? credentials.uid,
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

    /// Clients waiting for `name` try again now that a service registered.
    private func retryWaitingClients(for name: String) {
        let ready = waiting.filter { $0.name == name }
        waiting.removeAll { $0.name == name }
        for entry in ready {
            guard let session = sessions[entry.request.session] else { continue }
            do {
                if let connection = try registry.connect(name: entry.name, uid: entry.uid, gid: entry.gid, flags: entry.flags,
                                                         session: session.id, caller: session.credentials) {
                    deliver(connection, to: session, as: entry.request)
                } else {
                    waiting.append(entry)
                }
            } catch {
                sessions.fail(error, entry.request)
            }
        }
    }

    /// A port's connection closed: its parked connect is dropped, and the service of each of its
    /// channels hears that the client left.
    func sessionClosed(_ session: Session) {
        waiting.removeAll { $0.request.session == session.id }
        notifyDeparture(registry.sessionClosed(session.id))
    }
}
