// The client library's handle on a broker, and the broker-wide request (`status`).
//
// The library mirrors the broker: each subsystem lives in its folder (`Keys/`, `SharedMemory/`,
// `Net/`, `Caps/`) as extensions of `Broker` and the types it hands out. Every public call throws
// `PatchbayError`; every descriptor it hands out is an owned `Descriptor`.

public import PatchbayProtocol
import Dispatch
import Glibc
import PatchbaySystem
import Synchronization

/// What `Broker.status()` returns: the broker's identity and each uid's share of its objects.
public typealias StatusReport = PatchbayProtocol.StatusReport

/// One uid's row of a `StatusReport`.
public typealias UserUsage = PatchbayProtocol.UserUsage

/// A connection to a Patchbay broker: the handle every Patchbay operation goes through.
///
/// `Broker()` connects to `PATCHBAY_SOCKET` if set, else to the per-user broker, which it starts
/// itself when none answers (race-free: concurrent starters serialise on a lock file and all end
/// up on the one broker that won). One `Broker` may be shared by many threads; their requests are
/// serialised on its one connection.
///
/// Every call has an `async` twin for callers in Swift concurrency: it runs the blocking call on
/// this broker's own dispatch queue (never on the concurrency pool) and resumes the task with the
/// outcome. A task cancelled meanwhile still gets the outcome: a request sent is never abandoned
/// half-way.
public final class Broker: Sendable {
    /// The socket this connection is attached to.
    public let socketPath: String
    let connection: Mutex<Connection>
    /// Where the async calls block, one at a time, as the connection serialises them anyway.
    private let queue = DispatchQueue(label: "patchbay.broker")

    /// The socket a `Broker()` would use: $PATCHBAY_SOCKET, else the per-user default.
    public static var defaultSocketPath: String {
        if let explicit = getenv("PATCHBAY_SOCKET").map({ String(cString: $0) }), !explicit.isEmpty { return explicit }
        return Autostart.defaultUserSocketPath()
    }

    /// The broker executable autostart would run: $PATCHBAY_DAEMON, else `patchbayd` (or
    /// `patchbay`) beside the running program, else `patchbayd` on PATH; nil when none is found.
    public static var daemonExecutable: String? { Autostart.daemonExecutable() }

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

    /// `status()` without blocking a Swift concurrency thread.
    public func status() async throws(PatchbayError) -> StatusReport {
        try await offThePool { [self] () throws(PatchbayError) in try status() }
    }

    // MARK: Plumbing

    /// Runs a blocking call on this broker's queue and resumes the calling task with its outcome.
    func offThePool<T: ~Copyable>(_ body: @escaping @Sendable () throws(PatchbayError) -> T) async throws(PatchbayError) -> T {
        let handoff = Handoff<T>()
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            queue.async {
                do throws(PatchbayError) { handoff.value = try body() } catch { handoff.error = error }
                continuation.resume()
            }
        }
        if let error = handoff.error { throw error }
        return handoff.value.take()!
    }

    func call(_ request: Request, descriptors: [CInt] = []) throws(PatchbayError) -> Response {
        try connection.withLock { (connection) throws(PatchbayError) -> Response in
            try connection.call(request, descriptors: descriptors)
        }
    }

    func unexpected(_ reply: Reply) -> PatchbayError {
        PatchbayError(.protocolError, "unexpected reply \(reply.opcode) from the broker")
    }
}

/// One outcome handed from the queue that produced it to the task that awaits it (written before
/// the continuation resumes, read after: never at the same time).
private final class Handoff<T: ~Copyable>: @unchecked Sendable {
    var value: T?
    var error: PatchbayError?
}
