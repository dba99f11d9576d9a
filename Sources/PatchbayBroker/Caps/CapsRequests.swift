// CAPS: the requests. A service registers on a connection of its own (its port); a client
// connects, at once or parked here until a matching service registers (`waitForService`); the
// broker builds the channel (CapsRegistry.swift) and hands it to both, the service first, in a
// `capsConnected` event. When a port's connection closes, the other side of each of its channels
// hears of it.
//
// Errors: EINVAL, ENAMETOOLONG, EPERM, EEXIST, ENOENT, EACCES, EDQUOT, EOPNOTSUPP (the broker
// never writes a generation), as SEMANTICS.md §5 says.

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
                    deliver(connection, to: context.session, requestID: context.requestID)
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
            sessions.reply(.caps(.list(Array(registry.list().prefix(Self.listLimit)))), to: context)
        }
    }

    /// Hands a new channel to its client (the reply) and its service (an event).
    private func deliver(_ connection: consuming CapsConnection, to client: Session, requestID: UInt64) {
        let service = connection.service
        // The service hears of the channel first: by the time the client has its reply (and may
        // put a request), the service's notice is already queued.
        if let serviceSession = sessions[service.session] {
            let credentials = client.credentials
            let event = Event.caps(.connected(
                channelID: connection.channelID,
                credentials: CapsCredentials(pid: credentials.pid, uid: realUserID(of: credentials.pid) ?? credentials.uid,
                                             euid: credentials.uid, gid: credentials.gid, groups: credentials.groups),
                arenaSize: UInt32(registry.arenaSize)))
            sessions.send(event.encode(),
                          attaching: [connection.channel.rawValue, connection.serviceWake.rawValue,
                                      connection.clientWake.rawValue, connection.serviceEnd.rawValue],
                          to: serviceSession)
            service.noteEventQueued()
        }
        let reply = Reply.caps(.client(channelID: connection.channelID, serviceID: service.id,
                                       maximumInFlight: service.maximumInFlight, arenaSize: UInt32(registry.arenaSize)))
        sessions.send(reply.encode(requestID: requestID),
                      attaching: [connection.channel.rawValue, connection.statusReadOnly.rawValue,
                                  connection.serviceWake.rawValue, connection.clientWake.rawValue,
                                  connection.clientEnd.rawValue],
                      to: client)
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
                    deliver(connection, to: session, requestID: entry.request.requestID)
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
        for notice in registry.sessionClosed(session.id) {
            guard let service = sessions[notice.serviceSession] else { continue }
            sessions.send(notice.event.encode(), to: service)
            registry.service(ofSession: notice.serviceSession)?.noteEventQueued()
        }
    }
}
