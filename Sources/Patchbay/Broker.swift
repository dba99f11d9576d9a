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
    /// How this broker (and the service ports and listeners made through it) reconnect when the
    /// broker goes away and comes back (Reconnect.swift).
    public let reconnectPolicy: ReconnectPolicy
    /// Whether a reconnection may start the per-user broker, as the first connection could.
    let autostarts: Bool
    /// Whether `socketPath` is the per-user default (not one the caller named): checked at every
    /// connection (`Autostart.connectToOwn`), started or not.
    private let isOwnDefault: Bool
    private let reconnectionCount = Atomic<UInt64>(0)
    /// The `reconnections` count this process's own connection began at, in a fork child (0 in
    /// the process that made the `Broker`): what was made before it is the parent's.
    private let forkedAtCount = Atomic<UInt64>(0)
    let connection: Mutex<Connection>
    /// Named objects this broker opened, to open again without it while nothing changed
    /// (SharedMemory/Reopen.swift).
    let namedObjects = NamedObjectCache()
    /// Where the async calls block, one at a time, as the connection serialises them anyway.
    private let queue = DispatchQueue(label: "patchbay.broker")

    /// The socket a `Broker()` would use: $PATCHBAY_SOCKET, else the per-user default.
    public static var defaultSocketPath: String {
        if let explicit = trustedEnvironmentValue("PATCHBAY_SOCKET"), !explicit.isEmpty { return explicit }
        return Autostart.defaultUserSocketPath()
    }

    /// The broker executable autostart would run: $PATCHBAY_DAEMON, else `patchbayd` (or
    /// `patchbay`) beside the running program, else `patchbayd` on PATH; nil when none is found.
    public static var daemonExecutable: String? { Autostart.daemonExecutable() }

    /// Connects to `socketPath`, or with nil to the default broker (see the type's summary).
    /// `autostart` applies only to the per-user default path. `reconnect` says how a lost
    /// connection is made again (Reconnect.swift): by default 8 attempts over about 3.5 s.
    public init(socketPath: String? = nil, autostart: Bool = true, reconnect: ReconnectPolicy = .standard) throws(PatchbayError) {
        let explicit = socketPath ?? trustedEnvironmentValue("PATCHBAY_SOCKET")
        let path: String
        var allowed = false
        var isDefault = false
        if let explicit, !explicit.isEmpty {
            path = explicit
        } else {
            path = Autostart.defaultUserSocketPath()
            isDefault = true
            // Never from a process with borrowed privileges (a set-user-ID program): the broker
            // would run with its real ids too, and whoever started it could stop it.
            allowed = autostart && !runsWithBorrowedPrivileges && trustedEnvironmentValue("PATCHBAY_AUTOSTART") != "0"
        }
        self.socketPath = path
        autostarts = allowed
        // Also when named explicitly (the CLI's `status`, `metrics` and `monitor` name it, as
        // `pb_broker_open_at` may): this uid's per-user path is checked however it was reached.
        isOwnDefault = isDefault || path == Autostart.defaultUserSocketPath()
        let socket = try Self.connect(path, autostarts: allowed, isOwnDefault: isOwnDefault)
        reconnectPolicy = reconnect
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

    /// How many times this broker's connection was made again after the broker went away.
    public var reconnections: UInt64 { reconnectionCount.load(ordering: .acquiring) }

    /// Whether an object made at reconnection count `generation` was made by the parent of this
    /// fork child (before its own connection), not by this process.
    package func madeBeforeFork(_ generation: UInt64) -> Bool {
        generation < forkedAtCount.load(ordering: .acquiring)
    }

    /// Sends `request` and waits for its reply. A connection found gone before the request left
    /// is made again (per `reconnectPolicy`) and the request sent on the new one; a reply lost
    /// with the connection is ECONNRESET, never a retry (the broker may have acted on it).
    ///
    /// `within`: the request names an object of the broker as it was at that reconnection count
    /// (a socket id): after a reconnection it is not sent, since the new broker's ids mean other
    /// objects; ECONNRESET says the broker restarted, and the caller finds its object again.
    func call(_ request: Request, descriptors: [CInt] = [], within generation: UInt64? = nil) throws(PatchbayError) -> Response {
        let response = try callKeepingLost(request, descriptors: descriptors, within: generation)
        // The reply's descriptors did not all fit this process's table: what was asked for
        // happened in the broker, but its result cannot be handed over.
        guard !response.descriptorLost else {
            throw PatchbayError(.tooManyOpenFiles, "no free descriptor in this process to receive what the broker sent")
        }
        return response
    }

    private func callKeepingLost(_ request: Request, descriptors: [CInt], within generation: UInt64?) throws(PatchbayError) -> Response {
        try connection.withLock { (connection) throws(PatchbayError) -> Response in
            let reconnects = reconnectPolicy.reconnects
            try makeOwn(&connection)
            try check(generation)
            do throws(PatchbayError) {
                return try connection.call(request, descriptors: descriptors)
            } catch {
                guard connection.isBroken, reconnects else { throw error }
                guard connection.lastRequestUnsent else {
                    throw PatchbayError(error.errno, "the broker went away before it answered, so this may not have happened; "
                                            + "the next call connects again")
                }
                try reconnect(&connection)
                try check(generation)
                return try connection.call(request, descriptors: descriptors)
            }
        }
    }

    /// `call` for an errand that must not wait for a broker to come back (a datagram server
    /// asking to be taken back: it goes on receiving meanwhile): a connection found gone is made
    /// again with one attempt, never per `reconnectPolicy`'s retries. Fails with the transport's
    /// errno when no broker answers.
    func callConnectingOnce(_ request: Request, descriptors: [CInt]) throws(PatchbayError) -> Response {
        let response = try connection.withLock { (connection) throws(PatchbayError) -> Response in
            if connection.isInherited || connection.isBroken {
                try makeOwnConnectingOnce(&connection)
            }
            do throws(PatchbayError) {
                return try connection.call(request, descriptors: descriptors)
            } catch {
                guard connection.isBroken, connection.lastRequestUnsent else { throw error }
                try makeOwnConnectingOnce(&connection)
                return try connection.call(request, descriptors: descriptors)
            }
        }
        guard !response.descriptorLost else {
            throw PatchbayError(.tooManyOpenFiles, "no free descriptor in this process to receive what the broker sent")
        }
        return response
    }

    /// `makeOwn` with one attempt at a new connection.
    private func makeOwnConnectingOnce(_ connection: inout Connection) throws(PatchbayError) {
        let inherited = connection.isInherited
        connection = try connectServing()
        let now = reconnectionCount.add(1, ordering: .releasing).newValue
        if inherited { forkedAtCount.store(now, ordering: .releasing) }
    }

    /// Before a request is sent on `connection` (its lock held): a fork child makes a connection
    /// of its own, since the broker takes a connection's frames only from the process that made
    /// it (the parent keeps the old one: the child's copy of the socket is closed, which the
    /// parent does not notice); a broken one is made again, per `reconnectPolicy`.
    func makeOwn(_ connection: inout Connection) throws(PatchbayError) {
        if connection.isInherited {
            connection = try connectServing()
            let now = reconnectionCount.add(1, ordering: .releasing).newValue
            forkedAtCount.store(now, ordering: .releasing)
        }
        if connection.isBroken && reconnectPolicy.reconnects { try reconnect(&connection) }
    }

    private func check(_ generation: UInt64?) throws(PatchbayError) {
        if let generation, generation != reconnections {
            throw PatchbayError(.connectionReset, "the connection to the broker was made again (the broker restarted, or this "
                                    + "process is a fork child): what this names belonged to the connection before")
        }
    }

    /// A new connection to the same broker, after the old one broke.
    private func reconnect(_ connection: inout Connection) throws(PatchbayError) {
        connection = try reconnectPolicy.retry(what: "the broker at \(socketPath)") { () throws(PatchbayError) -> Connection in
            try connectServing()
        }
        reconnectionCount.add(1, ordering: .releasing)
    }

    /// One attempt at a fresh connection of the caller's own to the same broker (a service
    /// port's), starting the per-user broker if this one may.
    func connectOnce() throws(PatchbayError) -> SeqpacketSocket {
        try Self.connect(socketPath, autostarts: autostarts, isOwnDefault: isOwnDefault)
    }

    /// A connection to `path`: the per-user default is checked (its directory this uid's and
    /// private, its broker running as this uid) whether or not it may be started; a path the
    /// caller named is used as given.
    private static func connect(_ path: String, autostarts: Bool, isOwnDefault: Bool) throws(PatchbayError) -> SeqpacketSocket {
        if autostarts { return try Autostart.connectOrStart(path: path) }
        return isOwnDefault ? try Autostart.connectToOwn(path: path) : try Autostart.connect(path: path)
    }

    /// One attempt at a new connection that answers: a broker being killed can still complete a
    /// connect (its listening socket closes last), so a round trip (`status`) proves it serves.
    private func connectServing() throws(PatchbayError) -> Connection {
        var connection = Connection(socket: try connectOnce())
        _ = try connection.call(.status)
        return connection
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

extension Broker {
    /// The broker's metrics in the Prometheus text exposition format: counters since it started
    /// (requests by subsystem, operation and outcome; keys shared, claimed, expired), gauges
    /// (clients, keys outstanding, objects, sockets, services, channels, descriptors, memory,
    /// per-uid rows) and a histogram of its time per request. On a system broker a non-root
    /// caller gets the per-uid rows of its own uid only.
    public func metrics() throws(PatchbayError) -> String {
        let response = try call(.metrics)
        guard case .metrics(let text) = response.reply else { throw unexpected(response.reply) }
        return text
    }
}
