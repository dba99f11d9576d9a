// Sockets through /net (PatchworkOS), as a Swift value.
//
// The model: `Socket.open` opens a factory (`/net/local/seqpacket`, ...) and gets a handle, an id
// and the kernel socket; `control("bind x && listen")` writes the socket's ctl file; `accept()`
// opens its accept file; once connected, the kernel socket is the data path, so sending and
// receiving cost what the kernel costs, and `dataDescriptor` goes straight into poll or epoll.
//
// Identity. `listen` and `connect` are made here, by this process, on the kernel socket, and only
// then confirmed to the broker: the kernel records the credentials of whoever calls them, so a
// peer's SO_PEERCRED names this process, never the broker.
// The socket lives while its handle does: dropping the `Socket` (or dying) closes it, releases its
// name, and lets the peer read end of file.

public import PatchbayProtocol
import Glibc
import PatchbaySystem
import Synchronization

/// The states of a `/net` socket (SEMANTICS.md §4): `NEW`, `BOUND`, `LISTENING`, `CONNECTING`,
/// `CONNECTED`, `CLOSING`, `CLOSED`.
public typealias NetSocketState = PatchbayProtocol.NetSocketState

/// A `/net` socket: a handle (the socket lives while it is open anywhere), a state driven by
/// `ctl` commands, and once connected the kernel socket itself for data.
public struct Socket: ~Copyable {
    /// The address family: `/net/<family>/`.
    public enum Family: String, Sendable, CaseIterable {
        /// `AF_UNIX`: names are socket files in the broker's `net/` directory.
        case local
    }

    /// The socket type.
    public enum Kind: String, Sendable, CaseIterable {
        case seqpacket, stream, dgram
    }

    /// The socket's id: its directory is `/net/<family>/<id>/`. A listener that bound its name
    /// again after a broker restart has a new id.
    public var id: UInt64 { core.id }
    /// `/net/<family>/`.
    public let family: Family
    /// seqpacket, stream or dgram.
    public let kind: Kind
    /// Data calls on this handle never wait (`EAGAIN` instead); accept with nothing pending is
    /// `EAGAIN`.
    public let nonblocking: Bool
    let broker: Broker
    /// The socket's handle. The socket lives while a copy of it is open anywhere; reading it
    /// returns the id.
    public var handle: Descriptor { _read { yield core.handle } }
    /// What a broker restart can replace: id, handle, kernel socket.
    let core: SocketCore
    /// The kernel socket (from the factory open or the accept), or -1 for none.
    var kernelFD: CInt {
        get { core.kernelFD }
        nonmutating set { core.kernelFD = newValue }
    }
    /// Whether the kernel socket carries data yet: connected, accepted, or a bound datagram socket
    /// whose data file was opened. Before that, data calls are `ENOTCONN`.
    var dataIsOpen: Bool {
        get { core.dataIsOpen }
        nonmutating set { core.dataIsOpen = newValue }
    }

    /// The kernel socket once data flows, else -1.
    var dataFD: CInt { dataIsOpen ? kernelFD : -1 }

    init(broker: Broker, id: UInt64, family: Family, kind: Kind, nonblocking: Bool, handle: consuming PatchbaySystem.Descriptor,
         kernel: consuming PatchbaySystem.Descriptor?, dataIsOpen: Bool) {
        self.broker = broker
        self.family = family
        self.kind = kind
        self.nonblocking = nonblocking
        var kernelFD: CInt = -1
        if let kernel { kernelFD = kernel.release() }
        core = SocketCore(id: id, handle: Descriptor(handle), kernelFD: kernelFD, dataIsOpen: dataIsOpen && kernelFD >= 0,
                          brokerGeneration: broker.reconnections)
    }

    // MARK: The model

    /// Opens `/net/<family>/<kind>`: a new socket in state NEW.
    public static func open(_ broker: Broker, family: Family = .local, type kind: Kind, nonblocking: Bool = false)
        throws(PatchbayError) -> Socket
    {
        var response = try broker.call(.namespace(.open(path: "/net/\(family.rawValue)/\(kind.rawValue)",
                                                         flags: nonblocking ? .nonblock : [])))
        guard case .namespace(.open(let objectKind, let id)) = response.reply, objectKind == OpenedObjectKind.socket.rawValue,
              let handle = response.takeDescriptor(), let kernel = response.takeDescriptor()
        else { throw PatchbayError(.protocolError, "the broker's socket reply is malformed") }
        return Socket(broker: broker, id: id, family: family, kind: kind, nonblocking: nonblocking, handle: handle,
                      kernel: kernel, dataIsOpen: false)
    }

    /// Writes a command line to the socket's ctl file: `bind <name> [mode]`, `listen [backlog]`,
    /// `connect <name>`, chained with `&&`. The whole line is checked first; then each command
    /// runs in order, stopping at the first failure. `listen` and `connect` are made by this
    /// process on the kernel socket, then confirmed to the broker; a connected socket's data flows
    /// at once.
    ///
    /// - Throws: `EINVAL` (unknown command, bad argument, a transition the state machine does not
    ///   allow), `EADDRINUSE`, `ECONNREFUSED` (bound but not listening), `ENOENT` (no such name),
    ///   `EACCES` (the name's socket file does not let this user connect, or a reserved name),
    ///   `EAGAIN` (the listener's backlog is full).
    public mutating func control(_ command: String) throws(PatchbayError) {
        if try Self.control(broker, socket: id, kernel: kernelFD, command, within: core.brokerGeneration) { dataIsOpen = true }
        noteListening(command)
    }

    /// `control` on a socket held where it cannot be mutated (the C library's handle): the data
    /// state lives in the socket's core, so nothing is lost.
    package func control(line command: String) throws(PatchbayError) {
        if try Self.control(broker, socket: id, kernel: kernelFD, command, within: core.brokerGeneration) { dataIsOpen = true }
        noteListening(command)
    }

    /// Remembers a name bound and listened on (or bound, for datagrams), to have it taken back,
    /// or bind it again, after a broker restart.
    private func noteListening(_ line: String) {
        core.noteListening(line)
    }

    /// `control`, on a socket known by its id and kernel socket. Returns whether a command
    /// connected the socket.
    private static func control(_ broker: Broker, socket id: UInt64, kernel: CInt, _ line: String,
                                within generation: UInt64?) throws(PatchbayError) -> Bool {
        let steps: [NetControlStep]
        do {
            steps = try NetControlLine.parse(line)
        } catch {
            throw PatchbayError(.invalidArgument, error.reason)
        }
        var connected = false
        for step in steps {
            switch step {
            case .bind:
                break
            case .listen(let backlog):
                try listen(kernel, socket: id, backlog: backlog ?? NetControlLine.defaultBacklog)
            case .connect(let name):
                try connect(kernel, socket: id, to: name, path: try broker.localSocketPath(name))
                connected = true
            }
            _ = try broker.call(.net(.control(socket: id, command: step.line)), within: generation)
        }
        return connected
    }

    /// listen(2) on the kernel socket, which must be bound first (an unbound one would be given an
    /// abstract address by the kernel).
    private static func listen(_ kernel: CInt, socket id: UInt64, backlog: Int32) throws(PatchbayError) {
        guard UnixSocket.localPath(of: kernel) != nil else {
            throw PatchbayError(.invalidArgument, "socket \(id) is not bound; bind it before it listens")
        }
        // Listening already: the broker refuses the command (a state cannot go to itself), and a
        // listen(2) here would have changed the backlog first.
        var listening: CInt = 0
        var length = socklen_t(MemoryLayout<CInt>.size)
        if getsockopt(kernel, SOL_SOCKET, SO_ACCEPTCONN, &listening, &length) == 0, listening != 0 { return }
        do {
            try UnixSocket.listen(on: kernel, backlog: backlog)
        } catch {
            throw PatchbayError(error, error == .notSupportedOnSocket ? "datagram sockets do not listen" : "listen failed")
        }
    }

    /// connect(2) on the kernel socket, without waiting for room in the listener's backlog.
    private static func connect(_ kernel: CInt, socket id: UInt64, to name: String, path: String) throws(PatchbayError) {
        // The state machine first (SEMANTICS §4): a listening or connected socket cannot connect,
        // whatever the name, so the kernel's answer about the name (ENOENT, EPROTOTYPE, ...)
        // must not come out before the broker's EINVAL.
        var listening: CInt = 0
        var length = socklen_t(MemoryLayout<CInt>.size)
        if getsockopt(kernel, SOL_SOCKET, SO_ACCEPTCONN, &listening, &length) == 0, listening != 0 {
            throw PatchbayError(.invalidArgument, "socket \(id) is listening; only a NEW or BOUND socket connects")
        }
        var peer = sockaddr_storage()
        var peerLength = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let connected = withUnsafeMutablePointer(to: &peer) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getpeername(kernel, $0, &peerLength) }
        }
        if connected == 0 {
            throw PatchbayError(.invalidArgument, "socket \(id) is connected already; only a NEW or BOUND socket connects")
        }
        do {
            try UnixSocket.connectWithoutBlocking(on: kernel, path: path)
        } catch {
            let reason = switch error {
            case .connectionRefused: "\(name) is bound but nobody is listening there"
            case .noSuchFileOrDirectory: "nothing is bound to the name \(name)"
            case .resourceTemporarilyUnavailable: "\(name)'s backlog is full; try again"
            case .protocolWrongTypeForSocket: "\(name) is a socket of another type"
            case .permissionDenied: "the socket file of \(name) does not let this user connect"
            case .socketIsConnected, .invalidArgument: "socket \(id) is already connected or listening"
            default: "cannot connect to \(name): \(error.name)"
            }
            throw PatchbayError(error == .socketIsConnected ? .invalidArgument : error, reason)
        }
    }

    /// `control("bind <name>")`.
    public mutating func bind(_ name: String) throws(PatchbayError) {
        try Self.checkName(name)
        try control("bind \(name)")
    }

    /// `control("bind <name> <mode>")`: the name's socket file gets `mode` (octal permission
    /// bits, e.g. `0o660`) and belongs to this user.
    public mutating func bind(_ name: String, mode: UInt32) throws(PatchbayError) {
        try Self.checkName(name)
        guard mode <= 0o777 else { throw PatchbayError(.invalidArgument, "the mode must be permission bits from 0 to 0777") }
        try control(NetControlStep.bind(name: name, mode: mode).line)
    }

    /// A name checked before it goes into a command line, so `"a && listen"` is a bad name, not
    /// a second command.
    static func checkName(_ name: String) throws(PatchbayError) {
        guard isValidLocalSocketName(name) else {
            throw PatchbayError(.invalidArgument,
                                "\"\(name.prefix(80))\" is not a local name: use 1 to 64 of A-Z a-z 0-9 . _ - (not . or ..)")
        }
    }

    /// `control("listen [backlog]")`.
    public mutating func listen(backlog: Int? = nil) throws(PatchbayError) {
        try control(backlog.map { "listen \($0)" } ?? "listen")
    }

    /// `control("connect <name>")`: this process connects; data flows at once.
    public mutating func connect(to name: String) throws(PatchbayError) {
        try Self.checkName(name)
        try control("connect \(name)")
    }

    /// Opens the socket's data file: the kernel socket. Done for you when a socket connects or is
    /// accepted; needed by hand for a bound datagram socket.
    ///
    /// - Throws: `ENOTCONN` before the socket is connected (or bound, for datagrams).
    public mutating func openData() throws(PatchbayError) {
        adoptData(try Self.openData(broker, family: family, socket: id, within: core.brokerGeneration))
    }

    /// `openData` on a socket held where it cannot be mutated (the C library's handle).
    package func openDataInPlace() throws(PatchbayError) {
        adoptData(try Self.openData(broker, family: family, socket: id, within: core.brokerGeneration))
    }

    /// The kernel socket as the data path: `data`'s descriptor (the same socket) replaces it.
    private func adoptData(_ data: CInt) {
        if kernelFD >= 0 { Glibc.close(kernelFD) }
        kernelFD = data
        dataIsOpen = true
    }

    private static func openData(_ broker: Broker, family: Family, socket id: UInt64, within generation: UInt64?) throws(PatchbayError) -> CInt {
        var response = try broker.call(.namespace(.open(path: "/net/\(family.rawValue)/\(id)/data", flags: [])), within: generation)
        guard case .namespace(.open) = response.reply, let data = response.takeDescriptor() else {
            throw PatchbayError(.protocolError, "the broker's data reply carried no descriptor")
        }
        return data.release()
    }

    /// Opens the socket's accept file: waits for one connection (or `EAGAIN` when non-blocking
    /// and none is pending) and returns it as a socket with its own id, connected.
    ///
    /// - Throws: `EINVAL` unless listening, `EAGAIN`, `ECONNABORTED` when the listener closes
    ///   while this waits.
    ///
    /// After a broker restart, a listener bound by name (`Socket.listen`, or `bind` and `listen`
    /// on this socket) binds its name again before it accepts: the same socket if the broker
    /// kept it (`--fd-store`), else a new one, with a new id, in place of this one. Connections
    /// already accepted are not touched. An accept waiting when the broker went away waits again
    /// once it is back (per the broker's `reconnectPolicy`).
    public func accept(nonblocking: Bool? = nil) throws(PatchbayError) -> Socket {
        try Self.accept(broker, core: core, family: family, type: kind, nonblocking: nonblocking ?? self.nonblocking)
    }

    /// `accept()` on the socket `core` holds, binding its name again first if it must.
    private static func accept(_ broker: Broker, core: SocketCore, family: Family, type kind: Kind,
                               nonblocking: Bool) throws(PatchbayError) -> Socket {
        if broker.madeBeforeFork(core.brokerGeneration) {
            // The parent's listener (SEMANTICS §6): not this process's to bind again.
            throw PatchbayError(.connectionReset, "socket \(core.id) was made by the parent process before fork; "
                                    + "a fork child's sockets are its own")
        }
        // As many restarts as come while it waits: each one's accept, lost with its broker, is
        // made again once the listener is back (taking back failing ends it, as does a broker
        // that does not come back within the policy). Only the first was, and a listener that
        // had ridden out one restart ended at the next.
        while true {
            do throws(PatchbayError) {
                if core.listening != nil && core.brokerGeneration != broker.reconnections {
                    try listenAgain(broker, core: core, family: family, type: kind, nonblocking: nonblocking)
                }
                return try Socket.accept(broker, socket: core.id, family: family, type: kind, nonblocking: nonblocking,
                                         within: core.brokerGeneration)
            } catch {
                guard core.listening != nil, !broker.madeBeforeFork(core.brokerGeneration), broker.reconnectPolicy.reconnects,
                      ReconnectPolicy.isTransport(error.errno) else { throw error }
                try listenAgain(broker, core: core, family: family, type: kind, nonblocking: nonblocking)
            }
        }
    }

    /// A listener whose broker restarted: keeps its socket if the broker restored it, else binds
    /// and listens on a new one under the same name and puts it in this one's place.
    private static func listenAgain(_ broker: Broker, core: SocketCore, family: Family, type kind: Kind,
                                    nonblocking: Bool) throws(PatchbayError) {
        guard let listening = core.listening else { return }
        let id = core.id
        // This call connects again if it must (and throws if the broker does not come back).
        let found = try broker.listSockets(after: id &- 1).first
        let generation = broker.reconnections
        if let found, found.id == id, found.name == listening.name, found.state == NetSocketState.listening.rawValue,
           found.ownerPID == getpid() {
            core.brokerGeneration = generation
            return
        }
        // The kernel socket is still bound and listening (connections may wait in its backlog):
        // the new broker takes it back if its socket file is still there and still ours.
        do throws(PatchbayError) {
            var response = try broker.call(.net(.adopt(family: family.rawValue, type: kind.rawValue, name: listening.name)),
                                           descriptors: [core.kernelFD])
            guard case .net(.adopt(let newID)) = response.reply, let handle = response.takeDescriptor() else {
                throw PatchbayError(.protocolError, "the broker's adopt reply is malformed")
            }
            core.id = newID
            core.handle = Descriptor(handle)
            core.brokerGeneration = generation
            return
        } catch {
            // Taken by someone else meanwhile, or the broker's answer is lost: say so. Anything
            // else (the file is gone, an older broker): bind the name on a new socket.
            if error.errno == .addressInUse || ReconnectPolicy.isTransport(error.errno) || error.errno == .protocolError {
                throw PatchbayError(error.errno, "the broker restarted and \(listening.name) could not be taken back: \(error.reason)")
            }
        }
        var fresh = try Socket.open(broker, family: family, type: kind, nonblocking: nonblocking)
        let bind = NetControlStep.bind(name: listening.name, mode: listening.mode).line
        do throws(PatchbayError) {
            try fresh.control(bind + " && " + (listening.backlog.map { "listen \($0)" } ?? "listen"))
        } catch {
            throw PatchbayError(error.errno, "the broker restarted and \(listening.name) could not be bound again: \(error.reason)")
        }
        core.replace(with: fresh.core)
        core.brokerGeneration = generation
    }

    /// Opens `/net/<family>/<id>/accept` of any socket of this uid by its id (the file view: the
    /// socket need not be one this process opened).
    public static func accept(_ broker: Broker, socket id: UInt64, family: Family = .local, type kind: Kind,
                              nonblocking: Bool = false) throws(PatchbayError) -> Socket {
        try accept(broker, socket: id, family: family, type: kind, nonblocking: nonblocking, within: nil)
    }

    private static func accept(_ broker: Broker, socket id: UInt64, family: Family, type kind: Kind,
                               nonblocking: Bool, within generation: UInt64?) throws(PatchbayError) -> Socket {
        // The broker takes the connection off the listener's queue to send it: with no room here
        // for its two descriptors (its handle and kernel socket) it would be lost on the way. So
        // an accept is refused first, as accept(2) is, and the connection stays queued.
        do {
            try checkDescriptorRoom(2)
        } catch {
            throw PatchbayError(error, "no free descriptors in this process for a connection's two; it stays queued")
        }
        var response = try broker.call(.namespace(.open(path: "/net/\(family.rawValue)/\(id)/accept",
                                                         flags: nonblocking ? .nonblock : [])), within: generation)
        guard case .namespace(.open(let objectKind, let newID)) = response.reply,
              objectKind == OpenedObjectKind.acceptedSocket.rawValue,
              let newHandle = response.takeDescriptor(), let data = response.takeDescriptor()
        else { throw PatchbayError(.protocolError, "the broker's accept reply is malformed") }
        return Socket(broker: broker, id: newID, family: family, kind: kind, nonblocking: nonblocking,
                      handle: newHandle, kernel: data, dataIsOpen: true)
    }

    /// The socket's state as the broker knows it.
    ///
    /// - Throws: `ENOENT` when the broker no longer has it.
    public func state() throws(PatchbayError) -> NetSocketState {
        try Self.state(broker, socket: id)
    }

    private static func state(_ broker: Broker, socket id: UInt64) throws(PatchbayError) -> NetSocketState {
        guard let info = try broker.listSockets(after: id &- 1).first, info.id == id,
              let state = NetSocketState(rawValue: info.state)
        else { throw PatchbayError(.noSuchFileOrDirectory, "socket \(id) no longer exists") }
        return state
    }

    // MARK: Conveniences

    /// A listening socket bound to `name`; its socket file gets `mode` (octal permission bits)
    /// when given, else the broker's default (0666 on a system broker, 0600 on a per-user one).
    public static func listen(_ broker: Broker, name: String, type kind: Kind = .seqpacket, backlog: Int? = nil,
                              mode: UInt32? = nil, nonblocking: Bool = false) throws(PatchbayError) -> Socket {
        try checkName(name)
        if let mode, mode > 0o777 { throw PatchbayError(.invalidArgument, "the mode must be permission bits from 0 to 0777") }
        var socket = try open(broker, type: kind, nonblocking: nonblocking)
        let bind = NetControlStep.bind(name: name, mode: mode).line
        try socket.control(bind + " && " + (backlog.map { "listen \($0)" } ?? "listen"))
        return socket
    }

    /// A socket connected to `name`, data handle open.
    public static func connect(_ broker: Broker, to name: String, type kind: Kind = .seqpacket,
                               nonblocking: Bool = false) throws(PatchbayError) -> Socket {
        try checkName(name)
        var socket = try open(broker, type: kind, nonblocking: nonblocking)
        try socket.connect(to: name)
        return socket
    }

    // MARK: Async

    /// `open` without blocking a Swift concurrency thread.
    public static func open(_ broker: Broker, family: Family = .local, type kind: Kind, nonblocking: Bool = false)
        async throws(PatchbayError) -> Socket
    {
        try await broker.offThePool { () throws(PatchbayError) in
            try open(broker, family: family, type: kind, nonblocking: nonblocking)
        }
    }

    /// `control` without blocking a Swift concurrency thread.
    public mutating func control(_ command: String) async throws(PatchbayError) {
        let (broker, id, kernel, generation) = (broker, id, kernelFD, core.brokerGeneration)
        if try await broker.offThePool({ () throws(PatchbayError) in
            try Self.control(broker, socket: id, kernel: kernel, command, within: generation)
        }) {
            dataIsOpen = true
        }
        noteListening(command)
    }

    /// `bind` without blocking a Swift concurrency thread.
    public mutating func bind(_ name: String) async throws(PatchbayError) {
        try Self.checkName(name)
        try await control("bind \(name)")
    }

    /// `listen` without blocking a Swift concurrency thread.
    public mutating func listen(backlog: Int? = nil) async throws(PatchbayError) {
        try await control(backlog.map { "listen \($0)" } ?? "listen")
    }

    /// `connect(to:)` without blocking a Swift concurrency thread.
    public mutating func connect(to name: String) async throws(PatchbayError) {
        try Self.checkName(name)
        try await control("connect \(name)")
    }

    /// `openData` without blocking a Swift concurrency thread.
    public mutating func openData() async throws(PatchbayError) {
        let (broker, family, id, generation) = (broker, family, id, core.brokerGeneration)
        adoptData(try await broker.offThePool { () throws(PatchbayError) in
            try Self.openData(broker, family: family, socket: id, within: generation)
        })
    }

    /// `accept` without blocking a Swift concurrency thread: the wait for a connection happens on
    /// the broker's queue (and, like the blocking call, holds the broker's connection meanwhile).
    public func accept(nonblocking: Bool? = nil) async throws(PatchbayError) -> Socket {
        let (broker, core, family, kind, nonblocking) = (broker, core, family, kind, nonblocking ?? self.nonblocking)
        return try await broker.offThePool { () throws(PatchbayError) in
            try Self.accept(broker, core: core, family: family, type: kind, nonblocking: nonblocking)
        }
    }

    /// `accept(_:socket:...)` without blocking a Swift concurrency thread.
    public static func accept(_ broker: Broker, socket id: UInt64, family: Family = .local, type kind: Kind,
                              nonblocking: Bool = false) async throws(PatchbayError) -> Socket {
        try await broker.offThePool { () throws(PatchbayError) in
            try accept(broker, socket: id, family: family, type: kind, nonblocking: nonblocking)
        }
    }

    /// `state` without blocking a Swift concurrency thread.
    public func state() async throws(PatchbayError) -> NetSocketState {
        let (broker, id) = (broker, id)
        return try await broker.offThePool { () throws(PatchbayError) in try Self.state(broker, socket: id) }
    }

    /// `listen(_:name:...)` without blocking a Swift concurrency thread.
    public static func listen(_ broker: Broker, name: String, type kind: Kind = .seqpacket, backlog: Int? = nil,
                              mode: UInt32? = nil, nonblocking: Bool = false) async throws(PatchbayError) -> Socket {
        try await broker.offThePool { () throws(PatchbayError) in
            try listen(broker, name: name, type: kind, backlog: backlog, mode: mode, nonblocking: nonblocking)
        }
    }

    /// `connect(_:to:...)` without blocking a Swift concurrency thread.
    public static func connect(_ broker: Broker, to name: String, type kind: Kind = .seqpacket,
                               nonblocking: Bool = false) async throws(PatchbayError) -> Socket {
        try await broker.offThePool { () throws(PatchbayError) in
            try connect(broker, to: name, type: kind, nonblocking: nonblocking)
        }
    }
}

/// The parts of a `Socket` that a broker restart can replace, owned by the one `Socket`.
final class SocketCore: @unchecked Sendable {
    var id: UInt64
    var handle: Descriptor
    var kernelFD: CInt
    var dataIsOpen: Bool
    /// The name bound and its mode, once `bind` succeeded.
    var bound: (name: String, mode: UInt32?)?
    /// A listener bound by name: what to do again after a broker restart.
    var listening: (name: String, mode: UInt32?, backlog: Int32?)?
    /// The broker's reconnection count when this socket was last known to the broker.
    var brokerGeneration: UInt64
    /// A bound datagram socket's watch over its broker (`Socket.awaitDatagram`).
    let datagramWatch = Mutex(DatagramWatch.watching)
    /// The last senders a datagram socket received from, most recent first, with what the kernel
    /// said of each (`SCM_CREDENTIALS`): an address C or Python hands back to answer is found here.
    let recentSenders = Mutex<[UnixSocket.Address]>([])
    static let recentSendersKept = 64

    func noteSender(_ sender: UnixSocket.Address) {
        recentSenders.withLock { senders in
            senders.removeAll { $0.bytes == sender.bytes }
            senders.insert(sender, at: 0)
            if senders.count > Self.recentSendersKept { senders.removeLast() }
        }
    }

    init(id: UInt64, handle: consuming Descriptor, kernelFD: CInt, dataIsOpen: Bool, brokerGeneration: UInt64) {
        self.id = id
        self.handle = handle
        self.kernelFD = kernelFD
        self.dataIsOpen = dataIsOpen
        self.brokerGeneration = brokerGeneration
    }

    /// Remembers a name bound and listened on by `line`.
    func noteListening(_ line: String) {
        guard let steps = try? NetControlLine.parse(line) else { return }
        for step in steps {
            switch step {
            case .bind(let name, let mode): bound = (name, mode)
            case .listen(let backlog): listening = bound.map { ($0.name, $0.mode, backlog) }
            case .connect: break
            }
        }
    }

    /// Takes `other`'s socket; `other` gets this one's, and closes it when it goes.
    func replace(with other: SocketCore) {
        swap(&id, &other.id)
        swap(&handle, &other.handle)
        swap(&kernelFD, &other.kernelFD)
        swap(&dataIsOpen, &other.dataIsOpen)
    }

    deinit {
        if kernelFD >= 0 { Glibc.close(kernelFD) }
    }
}
