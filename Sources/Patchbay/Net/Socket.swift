// Sockets through /net (PatchworkOS), as a Swift value.
//
// The model: `Socket.open` opens a factory (`/net/local/seqpacket`, ...) and gets a handle and an
// id; `control("bind x && listen")` writes the socket's ctl file; `accept()` opens its accept
// file; once connected, the socket's data file is the kernel socket itself, so sending and
// receiving cost what the kernel costs, and `dataDescriptor` goes straight into poll or epoll.
// The socket lives while its handle does: dropping the `Socket` (or dying) closes it, releases its
// name, and lets the peer read end of file.

public import PatchbayProtocol
import Glibc
import PatchbaySystem

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

    /// The socket's id: its directory is `/net/<family>/<id>/`.
    public let id: UInt64
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
    public let handle: Descriptor
    /// The kernel socket once `data` is open, else -1.
    var dataFD: CInt = -1

    init(broker: Broker, id: UInt64, family: Family, kind: Kind, nonblocking: Bool, handle: consuming PatchbaySystem.Descriptor,
         data: consuming PatchbaySystem.Descriptor?) {
        self.broker = broker
        self.id = id
        self.family = family
        self.kind = kind
        self.nonblocking = nonblocking
        self.handle = Descriptor(handle)
        if let data { dataFD = data.release() }
    }

    deinit {
        if dataFD >= 0 { Glibc.close(dataFD) }
    }

    // MARK: The model

    /// Opens `/net/<family>/<kind>`: a new socket in state NEW.
    public static func open(_ broker: Broker, family: Family = .local, type kind: Kind, nonblocking: Bool = false)
        throws(PatchbayError) -> Socket
    {
        var response = try broker.call(.namespace(.open(path: "/net/\(family.rawValue)/\(kind.rawValue)",
                                                         flags: nonblocking ? .nonblock : [])))
        guard case .namespace(.open(let objectKind, let id)) = response.reply, objectKind == OpenedObjectKind.socket.rawValue,
              let handle = response.takeDescriptor()
        else { throw PatchbayError(.protocolError, "the broker's socket reply is malformed") }
        return Socket(broker: broker, id: id, family: family, kind: kind, nonblocking: nonblocking, handle: handle, data: nil)
    }

    /// Writes a command line to the socket's ctl file: `bind <name>`, `listen [backlog]`,
    /// `connect <name>`, chained with `&&`. A connected socket gets its data handle at once.
    ///
    /// - Throws: `EINVAL` (unknown command, bad argument, a transition the state machine does not
    ///   allow), `EADDRINUSE`, `ECONNREFUSED` (bound but not listening), `ENOENT` (no such name).
    public mutating func control(_ command: String) throws(PatchbayError) {
        if let data = try Self.control(broker, family: family, socket: id, command, wantData: dataFD < 0) { adoptData(data) }
    }

    /// The broker's part of `control`: the command, then (with `wantData`) the data handle of a
    /// socket the command connected. Returns that handle, owned by the caller.
    private static func control(_ broker: Broker, family: Family, socket id: UInt64, _ command: String, wantData: Bool)
        throws(PatchbayError) -> CInt?
    {
        _ = try broker.call(.net(.control(socket: id, command: command)))
        guard wantData, (try? state(broker, socket: id)) == .connected else { return nil }
        return try openData(broker, family: family, socket: id)
    }

    /// `control("bind <name>")`.
    public mutating func bind(_ name: String) throws(PatchbayError) { try control("bind \(name)") }

    /// `control("listen [backlog]")`.
    public mutating func listen(backlog: Int? = nil) throws(PatchbayError) {
        try control(backlog.map { "listen \($0)" } ?? "listen")
    }

    /// `control("connect <name>")`; the data handle opens at once.
    public mutating func connect(to name: String) throws(PatchbayError) { try control("connect \(name)") }

    /// Opens the socket's data file: the kernel socket. Done for you when a socket connects or is
    /// accepted; needed by hand for a bound datagram socket.
    ///
    /// - Throws: `ENOTCONN` before the socket is connected (or bound, for datagrams).
    public mutating func openData() throws(PatchbayError) {
        adoptData(try Self.openData(broker, family: family, socket: id))
    }

    private static func openData(_ broker: Broker, family: Family, socket id: UInt64) throws(PatchbayError) -> CInt {
        var response = try broker.call(.namespace(.open(path: "/net/\(family.rawValue)/\(id)/data", flags: [])))
        guard case .namespace(.open) = response.reply, let data = response.takeDescriptor() else {
            throw PatchbayError(.protocolError, "the broker's data reply carried no descriptor")
        }
        return data.release()
    }

    private mutating func adoptData(_ data: CInt) {
        if dataFD >= 0 { Glibc.close(dataFD) }
        dataFD = data
    }

    /// Opens the socket's accept file: waits for one connection (or `EAGAIN` when non-blocking
    /// and none is pending) and returns it as a socket with its own id, connected.
    ///
    /// - Throws: `EINVAL` unless listening, `EAGAIN`, `ECONNABORTED` when the listener closes
    ///   while this waits.
    public func accept(nonblocking: Bool? = nil) throws(PatchbayError) -> Socket {
        try Socket.accept(broker, socket: id, family: family, type: kind, nonblocking: nonblocking ?? self.nonblocking)
    }

    /// Opens `/net/<family>/<id>/accept` of any socket of this uid by its id (the file view: the
    /// socket need not be one this process opened).
    public static func accept(_ broker: Broker, socket id: UInt64, family: Family = .local, type kind: Kind,
                              nonblocking: Bool = false) throws(PatchbayError) -> Socket {
        var response = try broker.call(.namespace(.open(path: "/net/\(family.rawValue)/\(id)/accept",
                                                         flags: nonblocking ? .nonblock : [])))
        guard case .namespace(.open(let objectKind, let newID)) = response.reply,
              objectKind == OpenedObjectKind.acceptedSocket.rawValue,
              let newHandle = response.takeDescriptor(), let data = response.takeDescriptor()
        else { throw PatchbayError(.protocolError, "the broker's accept reply is malformed") }
        return Socket(broker: broker, id: newID, family: family, kind: kind, nonblocking: nonblocking,
                      handle: newHandle, data: data)
    }

    /// The socket's state as the broker knows it.
    public func state() throws(PatchbayError) -> NetSocketState {
        try Self.state(broker, socket: id)
    }

    private static func state(_ broker: Broker, socket id: UInt64) throws(PatchbayError) -> NetSocketState {
        guard let info = try broker.listSockets().first(where: { $0.id == id }),
              let state = NetSocketState(rawValue: info.state)
        else { throw PatchbayError(.noSuchFileOrDirectory, "socket \(id) no longer exists") }
        return state
    }

    // MARK: Conveniences

    /// A listening socket bound to `name`.
    public static func listen(_ broker: Broker, name: String, type kind: Kind = .seqpacket, backlog: Int? = nil,
                              nonblocking: Bool = false) throws(PatchbayError) -> Socket {
        var socket = try open(broker, type: kind, nonblocking: nonblocking)
        try socket.control("bind \(name) && " + (backlog.map { "listen \($0)" } ?? "listen"))
        return socket
    }

    /// A socket connected to `name`, data handle open.
    public static func connect(_ broker: Broker, to name: String, type kind: Kind = .seqpacket,
                               nonblocking: Bool = false) throws(PatchbayError) -> Socket {
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
        let (broker, family, id, wantData) = (broker, family, id, dataFD < 0)
        if let data = try await broker.offThePool({ () throws(PatchbayError) in
            try Self.control(broker, family: family, socket: id, command, wantData: wantData)
        }) {
            adoptData(data)
        }
    }

    /// `bind` without blocking a Swift concurrency thread.
    public mutating func bind(_ name: String) async throws(PatchbayError) { try await control("bind \(name)") }

    /// `listen` without blocking a Swift concurrency thread.
    public mutating func listen(backlog: Int? = nil) async throws(PatchbayError) {
        try await control(backlog.map { "listen \($0)" } ?? "listen")
    }

    /// `connect(to:)` without blocking a Swift concurrency thread.
    public mutating func connect(to name: String) async throws(PatchbayError) { try await control("connect \(name)") }

    /// `openData` without blocking a Swift concurrency thread.
    public mutating func openData() async throws(PatchbayError) {
        let (broker, family, id) = (broker, family, id)
        adoptData(try await broker.offThePool { () throws(PatchbayError) in try Self.openData(broker, family: family, socket: id) })
    }

    /// `accept` without blocking a Swift concurrency thread: the wait for a connection happens on
    /// the broker's queue (and, like the blocking call, holds the broker's connection meanwhile).
    public func accept(nonblocking: Bool? = nil) async throws(PatchbayError) -> Socket {
        try await Socket.accept(broker, socket: id, family: family, type: kind, nonblocking: nonblocking ?? self.nonblocking)
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
                              nonblocking: Bool = false) async throws(PatchbayError) -> Socket {
        try await broker.offThePool { () throws(PatchbayError) in
            try listen(broker, name: name, type: kind, backlog: backlog, nonblocking: nonblocking)
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
