@_exported public import PatchbaySystem
@_exported public import PatchbayProtocol
@_exported public import SystemPackage
import Glibc
import Synchronization

/// A connection to a Patchbay broker: the handle every Patchbay operation goes through.
///
/// `Broker()` connects to `PATCHBAY_SOCKET` if set, else to the per-user broker, which it starts
/// itself when none answers (race-free: concurrent starters serialise on a lock file and all end
/// up on the one broker that won). One `Broker` may be shared by many threads; their requests are
/// serialised on its one connection.
public final class Broker: Sendable {
    /// The socket this connection is attached to.
    public let socketPath: String
    let connection: Mutex<Connection>

    /// Connects to `socketPath`, or with nil to the default broker (see the type's summary).
    /// `autostart` applies only to the per-user default path.
    public init(socketPath: String? = nil, autostart: Bool = true) throws(PatchbayError) {
        let explicit = socketPath ?? getenv("PATCHBAY_SOCKET").map { String(cString: $0) }
        let path: String
        let socket: SeqpacketSocket
        if let explicit, !explicit.isEmpty {
            path = explicit
            socket = try Autostart.connect(path: path)
        } else {
            path = Autostart.defaultUserSocketPath()
            let allowed = autostart && getenv("PATCHBAY_AUTOSTART").map { String(cString: $0) } != "0"
            socket = allowed ? try Autostart.connectOrStart(path: path) : try Autostart.connect(path: path)
        }
        self.socketPath = path
        connection = Mutex(Connection(socket: socket))
    }

    /// The broker's pid, version, uptime, clients and object counts per uid.
    public func status() throws(PatchbayError) -> StatusReport {
        let response = try call(.status)
        guard case .status(let report) = response.reply else { throw unexpected(response.reply) }
        return report
    }

    // MARK: Plumbing

    func call(_ request: Request, descriptors: [CInt] = []) throws(PatchbayError) -> Response {
        try connection.withLock { (connection) throws(PatchbayError) -> Response in
            try connection.call(request, descriptors: descriptors)
        }
    }

    func unexpected(_ reply: Reply) -> PatchbayError {
        PatchbayError(.protocolError, "unexpected reply \(reply.opcode) from the broker")
    }
}
