// Sockets through /net (PatchworkOS): factories, socket ids, ctl commands, data and accept, on
// real kernel sockets.
//
// What it is. `/net/<family>/` holds factory files named after socket types (`seqpacket`,
// `stream`, `dgram`). Opening one creates a kernel socket in the broker and gives the client a
// *handle*: one end of a socket pair whose other end the broker watches. Reading the handle
// returns the socket's decimal id; the socket's files are `/net/<family>/<id>/ctl` (commands,
// `NetControl` requests here), `data` (opening it hands the client the kernel socket itself, so
// poll/epoll work and data costs what the kernel costs) and `accept` (opening it on a listening
// socket accepts one connection and hands over its handle and kernel socket).
//
// Lifetime. A socket lives while any copy of its handle is open: when the last one closes (the
// owner closed it, or died), the broker sees the hang-up, moves the socket to CLOSED (through
// CLOSING if it was connected), closes its own copy of the kernel socket and releases its name.
// Peers then read end of file once every data handle is closed too.
//
// Names. Families map names to addresses; `local` names (`[A-Za-z0-9._-]{1,64}`) are real
// AF_UNIX socket files in the broker's net directory, so programs that know nothing of Patchbay
// (socat, Python) can connect to a Patchbay listener, and `connect` reaches listeners Patchbay did
// not create.
//
// Errors. Unknown command or bad argument: EINVAL naming the problem. A transition the state
// machine does not allow (NetStateMachine.swift): EINVAL. Name taken: EADDRINUSE. Bound but not
// listening: ECONNREFUSED. data before connect: ENOTCONN. accept with nothing pending and
// nonblock: EAGAIN; listener closed while waiting: ECONNABORTED. Another uid's socket: EACCES.

import Glibc
import Logging
import OrderedCollections
import PatchbayProtocol
import PatchbaySystem
import SystemPackage

/// A socket family: a directory under /net and a way to turn names into kernel addresses. Only
/// `local` exists now; `inet` would map names to host:port and use TCP/UDP sockets.
protocol NetFamily {
    var name: String { get }
    func validate(_ address: Substring) throws(RequestError)
    func path(of address: Substring) -> String
}

struct LocalFamily: NetFamily {
    let name = "local"
    let directory: String

    func validate(_ address: Substring) throws(RequestError) {
        guard isValidLocalSocketName(address) else {
            throw RequestError(errno: .invalidArgument,
                               reason: "\"\(address.prefix(80))\" is not a local name: use 1 to 64 of A-Z a-z 0-9 . _ - (not . or ..)")
        }
    }

    func path(of address: Substring) -> String { directory + "/" + address }
}

enum NetSocketType: String, CaseIterable {
    case seqpacket, stream, dgram

    var kernelKind: UnixSocket.Kind {
        switch self {
        case .seqpacket: .seqpacket
        case .stream: .stream
        case .dgram: .datagram
        }
    }
}

/// One socket of the table.
final class NetSocket {
    let id: UInt64
    let type: NetSocketType
    let family: any NetFamily
    let ownerPID: Int32
    let ownerUID: UInt32
    private(set) var state: NetSocketState
    /// The bound name and the identity of the socket file made for it.
    var name: String?
    var boundFile: (device: UInt64, inode: UInt64)?
    /// The broker's copy of the kernel socket.
    let kernel: UnixSocket
    /// The broker's end of the handle pair; its hang-up means every handle is closed.
    let handle: Descriptor
    /// Blocking accepts parked until a connection arrives, oldest first.
    var waitingAccepts: [ParkedRequest] = []
    /// The uid the socket counts against (quota and descriptors): its owner's, except for an
    /// accepted connection, which counts against whoever connected (and leaves the table once
    /// that end hangs up: `NetRequests.makerMayBeGone`).
    let accountedUID: UInt32
    /// The two descriptors the broker holds for it (kernel socket and handle end).
    private let charge: DescriptorCharge?
    /// A connection the owner's own quota could not take: kept for its next accept, so a refused
    /// accept loses nothing.
    var heldConnection: UnixSocket?

    init(id: UInt64, type: NetSocketType, family: any NetFamily, owner: PeerCredentials, state: NetSocketState,
         kernel: consuming UnixSocket, handle: consuming Descriptor, accountedUID: UInt32, charge: DescriptorCharge?) {
        self.accountedUID = accountedUID
        self.charge = charge
        self.id = id
        self.type = type
        self.family = family
        self.ownerPID = owner.pid
        self.ownerUID = owner.uid
        self.state = state
        self.kernel = kernel
        self.handle = handle
    }

    /// The last closes of the kernel socket, the handle end and a held connection happen on the
    /// accounted uid's closing thread: each may hold descriptors a client sent (on a pending
    /// connection, in the handle's queue), and a lingering TCP socket among them would make the
    /// close wait.
    deinit {
        DeferredCloser.shared.closeLast(of: kernel.rawValue, for: accountedUID)
        DeferredCloser.shared.closeLast(of: handle.rawValue, for: accountedUID)
        if let held = heldConnection?.rawValue { DeferredCloser.shared.closeLast(of: held, for: accountedUID) }
    }

    /// The one way a socket changes state: checked against the table.
    func transition(to next: NetSocketState) throws(RequestError) {
        guard state.canTransition(to: next) else {
            throw RequestError(errno: .invalidArgument,
                               reason: "socket \(id) is \(state.rawValue); it cannot become \(next.rawValue)")
        }
        state = next
    }

    var info: NetSocketInfo {
        NetSocketInfo(id: id, family: family.name, type: type.rawValue, state: state.rawValue, name: name ?? "",
                      ownerPID: ownerPID, ownerUID: ownerUID, waitingAccepts: UInt32(waitingAccepts.count))
    }
}

/// A socket just made, with the descriptors for the client.
struct NetOpened: ~Copyable {
    var socket: NetSocket
    var clientHandle: Descriptor
    var data: Descriptor?
}

final class NetTable {
    /// In id order (ids only grow), so a listing is a prefix, not a sort.
    private(set) var sockets: OrderedDictionary<UInt64, NetSocket> = [:]
    /// Closes a socket whose every handle is closed as the loop does on reading the hang-up
    /// (set by `NetRequests`): `nameIsFree` calls it for a name whose holder is gone.
    var closeHungUp: (UInt64) -> Void = { _ in }
    /// The listener each session's parked accept waits on, so a departed session's wait is found
    /// without a walk of every socket. A connection waits in one accept at a time, so what a
    /// client can make the broker hold in parked accepts is bounded by its connections.
    private var acceptWaits: [UInt64: UInt64] = [:]
    private var names: [String: UInt64] = [:] {
        didSet { namesVersion &+= 1 }  // (no `oldValue`: the change stays in place)
    }
    /// Moves whenever a name is bound or let go: an `addrs` snapshot of the same version is current.
    private(set) var namesVersion: UInt64 = 0
    private var nextID: UInt64 = 1
    let local: LocalFamily
    private let mode: BrokerConfiguration.Mode
    /// Open sockets per owner uid, against `maximumSocketsPerUser` (EDQUOT).
    private var socketsPerUser: [UInt32: Int] = [:]
    var maximumSocketsPerUser = 4096
    /// Connections a uid other than root may make to `/net` listeners, which the broker accepts
    /// and hands over (each an entry, a handle, a delivery): past the burst and the rate, the
    /// broker closes them unread instead (the connecting side reads end of file).
    var connecting = UidTokenBucket(burst: 4096, refillPerSecond: 2048)
    /// Connections refused for their maker's rate.
    private(set) var refusedForRate: UInt64 = 0
    /// The loop's time spent on connections other uids made to listeners (refusing them, for
    /// their maker's rate or quota, or accepting them), by maker uid, since `takeMakersTime`:
    /// that maker's doing, not the accepting caller's, so the loop charges it to the maker's
    /// share of the turn (`TurnShares`). `makersTimeTotal` is the running sum, for a caller to tell
    /// its own time from it while it accepts.
    private var makersTime: [UInt32: UInt64] = [:]
    private(set) var makersTimeTotal: UInt64 = 0
    /// Where the descriptors of every socket are charged (nil: not charged, in unit tests).
    var budget: DescriptorBudget?
    /// Names reserved for their owners (system broker).
    var policy = Policy.none
    private var logger: Logger

    init(directory: String, mode: BrokerConfiguration.Mode, logger: Logger) throws(BrokerStartError) {
        self.local = LocalFamily(directory: directory)
        self.mode = mode
        self.logger = logger
        do {
            try prepareDirectory(directory, mode: mode == .system ? 0o755 : 0o700, owner: geteuid(),
                                 private: mode == .user, allowRootOwner: true)
        } catch {
            throw BrokerStartError(errno: error.errno, reason: error.reason)
        }
        removeStaleSocketFiles()
    }

    var families: [String: any NetFamily] { [local.name: local] }

    // MARK: Opening

    /// A factory open: a new socket in state NEW, owned by `caller`.
    func create(family: any NetFamily, type: NetSocketType, caller: PeerCredentials) throws(RequestError) -> NetOpened {
        try checkQuota(of: caller.uid)
        do {
            let kernel = try UnixSocket(type.kernelKind)
            // Unbound datagram senders get an autobound address, so a datagram peer can answer.
            if type == .dgram { try kernel.enableCredentialPassing() }
            // A `/net` socket takes no descriptors (`SO_PASSRIGHTS` off, Linux 6.16: a peer's
            // `SCM_RIGHTS` is `EPERM`; a listener's connections have it off from their first
            // byte, as they inherit it): the library never hands any to its program, and those
            // that came were closed in the receiving process, which drops its POSIX locks on
            // the file (a lock file's descriptor sent to root's listener freed root's lock:
            // twenty-first attack round), and could pile up in a datagram server until the
            // library shut it for reading, which stopped root's datagram servers, name and all,
            // with one packet of 64 (eighteenth round). A program that wants them turns it back
            // on, on its own descriptor.
            WakeSocket.refuseDescriptors(kernel.rawValue)
            let data = try duplicateDescriptor(kernel.rawValue)
            return try adopt(kernel, data: data, type: type, family: family, caller: caller, state: .new, accountedUID: caller.uid)
        } catch let error as RequestError {
            throw error
        } catch {
            throw RequestError(errno: (error as? Errno) ?? .ioError, reason: "cannot create a socket")
        }
    }

    /// Puts `kernel` (with `data`, a copy of it for the client, if any) in the table. Refused,
    /// both are closed on `accountedUID`'s closing thread, the copy first: a socket a peer made
    /// (an accepted connection) may hold what that peer queued, whose last close could wait.
    private func adopt(_ kernel: consuming UnixSocket, data: consuming Descriptor?, type: NetSocketType, family: any NetFamily,
                       caller: PeerCredentials, state: NetSocketState, accountedUID: UInt32) throws(RequestError)
        -> NetOpened
    {
        let charge: DescriptorCharge?
        let pair: SocketPair
        do throws(RequestError) {
            charge = try budget.map { (budget) throws(RequestError) in
                try DescriptorCharge(2, to: accountedUID, in: budget, for: "another socket")
            }
            do {
                pair = try SeqpacketSocket.pair()
            } catch {
                throw RequestError(errno: error, reason: "cannot create the socket's handle")
            }
        } catch {
            if let data = data.take() { DeferredCloser.shared.close(data, of: accountedUID) }
            DeferredCloser.shared.close(kernel.descriptor, of: accountedUID)
            throw error
        }
        let id = nextID
        nextID += 1
        let brokerEnd = pair.first
        let clientEnd = pair.second
        // What a client writes to its handle is read and thrown away; it may not carry
        // descriptors (Linux 6.16: `EPERM` for the sender), whose last close, if the broker's
        // thread made it, could wait (a lingering TCP socket's, for as long as its sender likes).
        WakeSocket.refuseDescriptors(brokerEnd.descriptor.rawValue)
        // Reading the handle returns the socket's id, as in PatchworkOS.
        _ = try? brokerEnd.send(Array("\(id)\n".utf8), nonblocking: true)
        do { try brokerEnd.descriptor.setNonblocking(true) } catch {}
        let socket = NetSocket(id: id, type: type, family: family, owner: caller, state: state,
                               kernel: kernel, handle: brokerEnd.descriptor, accountedUID: accountedUID, charge: charge)
        sockets[id] = socket
        socketsPerUser[accountedUID, default: 0] += 1
        return NetOpened(socket: socket, clientHandle: clientEnd.descriptor, data: data)
    }

    /// `data`: the kernel socket, once connected (or bound, for datagrams).
    func openData(_ id: UInt64, caller: PeerCredentials) throws(RequestError) -> Descriptor {
        let socket = try lookup(id, caller: caller)
        let ready = socket.state == .connected || (socket.type == .dgram && socket.state == .bound)
        guard ready else {
            throw RequestError(errno: .socketNotConnected,
                               reason: "socket \(id) is \(socket.state.rawValue); data needs a connected socket")
        }
        do {
            return try duplicateDescriptor(socket.kernel.rawValue)
        } catch {
            throw RequestError(errno: error, reason: "cannot hand out the kernel socket")
        }
    }

    /// `accept`: one connection now, or nil when none is pending (the caller parks or says EAGAIN).
    func acceptNow(_ id: UInt64, caller: PeerCredentials) throws(RequestError) -> NetOpened? {
        let socket = try lookup(id, caller: caller)
        guard socket.state == .listening, socket.state.canTransition(to: .connected) else {
            throw RequestError(errno: .invalidArgument,
                               reason: "socket \(id) is \(socket.state.rawValue); accept needs a LISTENING socket")
        }
        return try acceptPending(socket, owner: caller)
    }

    /// Accepts one pending connection on a listener, as a new CONNECTED socket owned by `owner`
    /// and counted against the uid that connected (`SO_PEERCRED`), so connections another uid makes
    /// never spend the listener owner's quota. A connection its maker's quota or descriptor share
    /// cannot take is closed (its maker sees the connection reset) and the next one tried, up to
    /// a bounded number per call. Nil when none is pending.
    func acceptPending(_ listener: NetSocket, owner: PeerCredentials) throws(RequestError) -> NetOpened? {
        for _ in 0..<Self.refusedConnectionsPerAccept {
            let began = monotonicNanoseconds()
            let connection: UnixSocket
            if let held = listener.heldConnection.take() {
                connection = held
            } else {
                do {
                    connection = try listener.kernel.acceptWithoutWaiting()
                } catch {
                    if error == .resourceTemporarilyUnavailable { return nil }
                    if error == .timedOut {
                        throw RequestError(errno: .invalidArgument,
                                           reason: "socket \(listener.id)'s kernel socket was switched to blocking mode by one of its holders; the broker accepts only on a non-blocking listener (try again)")
                    }
                    throw RequestError(errno: error, reason: "accept failed")
                }
            }
            let maker = (try? connection.peerUID()) ?? owner.uid
            if maker != 0 && !connecting.take(uid: maker, now: began) {
                refusedForRate &+= 1
                DeferredCloser.shared.closeRefused(connection.descriptor.release(), of: UInt64(maker))
                chargeMaker(maker, since: began)
                continue
            }
            if let refusal = quotaRefusal(of: maker, sockets: 1) {
                if maker == owner.uid {
                    // The owner's own connection: the accept fails, the connection waits for the next.
                    listener.heldConnection = consume connection
                    throw refusal
                }
                // Another uid's, over its quota: refused. Never read, it may hold what its maker
                // queued, whose last close could wait: not closed here on the loop unless empty.
                logger.debug("connection refused: its maker is over quota", metadata: [
                    "listener": "\(listener.id)", "uid": "\(maker)", "reason": "\(refusal.reason)",
                ])
                DeferredCloser.shared.closeRefused(connection.descriptor.release(), of: UInt64(maker))
                chargeMaker(maker, since: began)
                continue
            }
            let data: Descriptor
            do {
                data = try duplicateDescriptor(connection.rawValue)
            } catch {
                DeferredCloser.shared.close(connection.descriptor, of: maker)
                throw RequestError(errno: error, reason: "cannot hand out the accepted socket")
            }
            let opened = try adopt(connection, data: data, type: listener.type, family: listener.family, caller: owner,
                                   state: .connected, accountedUID: maker)
            logger.debug("accepted", metadata: ["listener": "\(listener.id)", "socket": "\(opened.socket.id)"])
            // Accepting another uid's connection is that uid's doing too, like refusing one.
            if maker != owner.uid { chargeMaker(maker, since: began) }
            return opened
        }
        return nil
    }

    private func chargeMaker(_ maker: UInt32, since began: UInt64) {
        let spent = monotonicNanoseconds() &- began
        makersTime[maker, default: 0] &+= spent
        makersTimeTotal &+= spent
    }

    /// The time spent on each maker's connections since the last call (`makersTime`).
    func takeMakersTime() -> [UInt32: UInt64] {
        guard !makersTime.isEmpty else { return [:] }
        defer { makersTime.removeAll(keepingCapacity: true) }
        return makersTime
    }

    /// Connections over their maker's quota dropped per accept before giving the loop back.
    static let refusedConnectionsPerAccept = 64

    // MARK: Adopting a listener

    /// A listener, or a bound datagram socket, that outlived the broker that made it (the client
    /// kept its kernel socket; the broker restarted without keeping it): registered again under
    /// `name`, LISTENING (or BOUND), with a new id and handle. Checked so that nobody adopts what
    /// is not theirs: a socket of the family and type given, a listener put in listening mode by
    /// the caller's uid (SO_PEERCRED), bound to exactly `name`'s path in the broker's directory,
    /// where the socket file is the caller's (the broker gave it to the binder); and the name
    /// free in this broker.
    func adopt(_ kernel: consuming UnixSocket, family: any NetFamily, type: NetSocketType, name: String,
               caller: PeerCredentials) throws(RequestError) -> NetOpened {
        do throws(RequestError) {
            try checkAdoptable(kernel, family: family, type: type, name: name, caller: caller)
        } catch {
            // The client's socket: whatever waits in it (a listener's backlog of connections and
            // what they queued) is freed by its last close, off the loop.
            DeferredCloser.shared.close(kernel.descriptor, of: caller.uid)
            throw error
        }
        let path = family.path(of: Substring(name))
        // Only a listener's: the broker accepts on it. A datagram socket's file description is
        // the one its server receives on, which must stay as its server made it.
        if type != .dgram { try? kernel.descriptor.setNonblocking(true) }
        // (As at a factory open: a socket taken back takes no descriptors either.)
        WakeSocket.refuseDescriptors(kernel.rawValue)
        let opened = try adopt(kernel, data: nil, type: type, family: family, caller: caller,
                               state: type == .dgram ? .bound : .listening, accountedUID: caller.uid)
        opened.socket.name = name
        opened.socket.boundFile = fileIdentity(atPath: path)
        names[name] = opened.socket.id
        logger.info(type == .dgram ? "datagram socket adopted" : "listener adopted",
                    metadata: ["socket": "\(opened.socket.id)", "name": "\(name)", "uid": "\(caller.uid)"])
        return opened
    }

    /// Whether `kernel` may be adopted as `name`'s listener by `caller`.
    private func checkAdoptable(_ kernel: borrowing UnixSocket, family: any NetFamily, type: NetSocketType, name: String,
                                caller: PeerCredentials) throws(RequestError) {
        try family.validate(Substring(name))
        try policy.checkTake(.net, Substring(name), by: caller)
        guard nameIsFree(name) else {
            throw RequestError(errno: .addressInUse, reason: "the name \(name) is already bound")
        }
        try checkQuota(of: caller.uid)
        let path = family.path(of: Substring(name))
        guard let kinds = try? kernel.typeAndFamily(), kinds.family == AF_UNIX, kinds.type == type.kernelKind.rawValue else {
            throw RequestError(errno: .invalidArgument, reason: "the descriptor is not a local \(type.rawValue) socket")
        }
        guard type == .dgram || kernel.isListening() else {
            throw RequestError(errno: .invalidArgument, reason: "the descriptor is not a listening socket")
        }
        guard UnixSocket.localPath(of: kernel.rawValue) == path else {
            throw RequestError(errno: .invalidArgument, reason: "the socket is not bound to \(name) in this broker's directory")
        }
        // A listener's kernel record says who called listen(2); a datagram socket has none (it
        // has no peer), and the file alone, which only this directory's broker makes and gives
        // its binder, says whose the name is.
        let owned = type == .dgram || (try? kernel.peerCredentials())?.uid == caller.uid
        guard owned, socketFileOwner(atPath: path) == caller.uid else {
            throw RequestError(errno: .permissionDenied,
                               reason: type == .dgram ? "the datagram socket on \(name) is not uid \(caller.uid)'s"
                                                      : "the listener on \(name) is not uid \(caller.uid)'s")
        }
    }

    // MARK: ctl

    /// Runs a command line: commands joined by `&&` (NetControlLine). The whole line is checked
    /// first (unknown words, arguments, reserved names: EINVAL or EACCES, nothing applied); then
    /// the commands run in order, each only if the previous one succeeded, as in a shell.
    ///
    /// The broker never calls `listen` or `connect` itself: the kernel records the credentials of
    /// whoever does, and every peer would see the broker's. The client makes those calls on the
    /// kernel socket it got with the socket's handle; `listen` and `connect` here check that it
    /// did and move the state.
    func control(_ id: UInt64, _ line: String, caller: PeerCredentials) throws(RequestError) {
        let socket = try lookup(id, caller: caller)
        let steps: [NetControlStep]
        do {
            steps = try NetControlLine.parse(line)
        } catch {
            throw RequestError(errno: .invalidArgument, reason: error.reason)
        }
        for case .bind(let name, _) in steps { try policy.checkTake(.net, Substring(name), by: caller) }
        for step in steps {
            switch step {
            case .bind(let name, let mode): try bind(socket, name, mode: mode, caller: caller)
            case .listen: try confirmListening(socket, caller: caller)
            case .connect(let name): try confirmConnected(socket, to: name)
            }
        }
    }

    /// Whether `name` is free, after closing the socket that holds it if every handle of that
    /// socket is closed already and only the loop has not read the hang-up yet: a client that
    /// closes its socket and at once binds the name again finds it free (SEMANTICS.md §4: the
    /// name is released when the last handle closes).
    private func nameIsFree(_ name: String) -> Bool {
        guard let id = names[name] else { return true }
        if let holder = sockets[id], holder.handle.isHungUp() { closeHungUp(id) }
        return names[name] == nil
    }

    private func bind(_ socket: NetSocket, _ name: String, mode requested: UInt32?, caller: PeerCredentials) throws(RequestError) {
        guard socket.state.canTransition(to: .bound) else { try socket.transition(to: .bound); return }
        guard nameIsFree(name) else {
            throw RequestError(errno: .addressInUse, reason: "the name \(name) is already bound")
        }
        let path = socket.family.path(of: Substring(name))
        do {
            do {
                try socket.kernel.bind(path: path)
            } catch .addressInUse where removeIfStale(path) {
                // A file no socket is bound to, which no socket of this broker's holds (the name
                // is free here): left by a socket that outlived the last broker and closed since.
                logger.notice("removed a stale socket file", metadata: ["name": "\(name)"])
                try socket.kernel.bind(path: path)
            }
        } catch {
            let reason = error == .addressInUse
                ? "the name \(name) is taken (a socket file exists at \(path))"
                : "cannot bind \(name): \(error.name)"
            throw RequestError(errno: error, reason: reason)
        }
        // The file is the binder's, with the mode it asked for: whoever connects to the name
        // directly (connect(2), socat) passes the kernel's own permission check on it.
        let mode = requested ?? (self.mode == .system ? 0o666 : 0o600)
        do {
            try changeOwner(atPath: path, uid: caller.uid, gid: caller.gid)
            try changeMode(atPath: path, to: mode)
        } catch {
            try? removeFile(atPath: path)
            throw RequestError(errno: error, reason: "cannot give the socket file of \(name) its owner and mode")
        }
        try socket.transition(to: .bound)
        socket.name = name
        socket.boundFile = fileIdentity(atPath: path)
        names[name] = socket.id
    }

    /// `listen`: the client called listen(2) on the kernel socket; the kernel recorded its
    /// credentials there, and they must be the caller's uid.
    private func confirmListening(_ socket: NetSocket, caller: PeerCredentials) throws(RequestError) {
        guard socket.state.canTransition(to: .listening) else { try socket.transition(to: .listening); return }
        guard socket.kernel.isListening() else {
            throw RequestError(errno: .invalidArgument,
                               reason: "socket \(socket.id) is not listening: call listen(2) on its kernel socket (the second descriptor of its factory open) first")
        }
        guard let listener = try? socket.kernel.peerCredentials(), listener.uid == caller.uid else {
            throw RequestError(errno: .permissionDenied, reason: "socket \(socket.id) was put in listening mode by another uid")
        }
        // Only the broker accepts through the accept file, and it must never wait there.
        try? socket.kernel.descriptor.setNonblocking(true)
        try socket.transition(to: .listening)
    }

    /// `connect NAME`: the client called connect(2) on the kernel socket to NAME's socket file.
    private func confirmConnected(_ socket: NetSocket, to name: String) throws(RequestError) {
        guard socket.state.canTransition(to: .connecting) else { try socket.transition(to: .connecting); return }
        let path = socket.family.path(of: Substring(name))
        guard let peer = socket.kernel.peerPath() else {
            throw RequestError(errno: .socketNotConnected,
                               reason: "socket \(socket.id) is not connected: call connect(2) on its kernel socket to \(path) first")
        }
        guard peer == path else {
            throw RequestError(errno: .invalidArgument, reason: "socket \(socket.id) is connected to \(peer), not to \(name)")
        }
        // A path is only a string: whoever can put another socket file there, or mount over the
        // directory in namespaces of its own, has the same one. The peer must be the name's own
        // listener, as the kernel tells it: the pid and uid that called listen(2) on each.
        // (With no socket of this broker's at the name, a listener of another program made there
        // is reached, as a path is.) Credentials the kernel will not tell are no proof.
        if let listenerID = names[name], let listener = sockets[listenerID], listenerID != socket.id {
            guard let expected = try? listener.kernel.peerCredentials(), let actual = try? socket.kernel.peerCredentials() else {
                throw RequestError(errno: .invalidArgument, reason: "cannot tell whether socket \(socket.id) is connected to \(name)'s listener")
            }
            guard expected.pid == actual.pid && expected.uid == actual.uid else {
                throw RequestError(errno: .invalidArgument,
                                   reason: "socket \(socket.id) is connected to another listener at \(path) (pid \(actual.pid), uid \(actual.uid)), not to \(name)'s")
            }
        }
        try socket.transition(to: .connecting)
        try socket.transition(to: .connected)
    }

    // MARK: Closing

    /// Closes a socket whose every handle is gone: CONNECTED → CLOSING → CLOSED, or straight to
    /// CLOSED; releases its name. Returns the accepts that were waiting on it (for ECONNABORTED).
    func close(_ id: UInt64) -> [ParkedRequest] {
        guard let socket = sockets.removeValue(forKey: id) else { return [] }
        for waiting in socket.waitingAccepts { acceptWaits[waiting.session] = nil }
        let owned = (socketsPerUser[socket.accountedUID] ?? 1) - 1
        socketsPerUser[socket.accountedUID] = owned > 0 ? owned : nil
        if socket.state == .connected { try? socket.transition(to: .closing) }
        if socket.state == .connecting { try? socket.transition(to: .new) }
        try? socket.transition(to: .closed)
        if let name = socket.name {
            names[name] = nil
            let path = socket.family.path(of: Substring(name))
            if let own = socket.boundFile, let current = fileIdentity(atPath: path), current == own { try? removeFile(atPath: path) }
        }
        logger.debug("socket closed", metadata: ["socket": "\(id)", "state": "\(socket.state.rawValue)"])
        return socket.waitingAccepts
    }

    /// Forgets the accept a departed session was waiting in; returns its listener if that left it
    /// with none (which the caller stops watching: its descriptor may close before it is readable
    /// again).
    func forgetWaits(of session: UInt64) -> NetSocket? {
        guard let id = acceptWaits.removeValue(forKey: session), let socket = sockets[id] else { return nil }
        socket.waitingAccepts.removeAll { $0.session == session }
        return socket.waitingAccepts.isEmpty ? socket : nil
    }

    /// Whether `session` waits in an accept now.
    func waitsInAccept(_ session: UInt64) -> Bool {
        acceptWaits[session] != nil
    }

    /// Parks an accept on `listener` (its session waits in no other: `waitsInAccept`).
    func park(_ request: ParkedRequest, on listener: NetSocket) {
        listener.waitingAccepts.append(request)
        acceptWaits[request.session] = listener.id
    }

    /// Ends the first accept waiting on `listener` (answered, failed, or its session gone).
    func dropFirstWait(of listener: NetSocket) {
        let waiting = listener.waitingAccepts.removeFirst()
        acceptWaits[waiting.session] = nil
    }

    func list() -> [NetSocketInfo] {
        list(limit: sockets.count)
    }

    /// The first `limit` sockets by id.
    func list(limit: Int) -> [NetSocketInfo] {
        list(after: 0, limit: limit)
    }

    /// The first `limit` sockets whose id is above `after`: ids only grow, so the table is in id
    /// order and the start is found by binary search.
    func list(after: UInt64, limit: Int) -> [NetSocketInfo] {
        let ids = sockets.keys
        var low = 0
        var high = ids.count
        while low < high {
            let middle = (low + high) / 2
            if ids[middle] <= after { low = middle + 1 } else { high = middle }
        }
        return sockets.values[low...].prefix(limit).map(\.info)
    }

    func countByOwner() -> [UInt32: Int] { socketsPerUser }

    private func checkQuota(of uid: UInt32) throws(RequestError) {
        if let refusal = quotaRefusal(of: uid, sockets: 1) { throw refusal }
    }

    /// Why `uid` may not have `count` more sockets (its socket quota, or its descriptor share), or nil.
    private func quotaRefusal(of uid: UInt32, sockets count: Int) -> RequestError? {
        let owned = socketsPerUser[uid] ?? 0
        guard owned + count <= maximumSocketsPerUser else {
            return RequestError(errno: .diskQuotaExceeded, reason: "uid \(uid) already holds \(owned) sockets, the limit")
        }
        if let budget, !budget.fits(2 * count, for: uid) {
            return RequestError(errno: .diskQuotaExceeded,
                                reason: "uid \(uid) already holds \(budget.held[uid] ?? 0) of its \(budget.share(of: uid)) descriptors in the broker")
        }
        return nil
    }

    // MARK: Helpers

    func lookup(_ id: UInt64, caller: PeerCredentials) throws(RequestError) -> NetSocket {
        guard let socket = sockets[id] else {
            throw RequestError(errno: .noSuchFileOrDirectory, reason: "there is no socket \(id)")
        }
        guard socket.ownerUID == caller.uid else {
            throw RequestError(errno: .permissionDenied, reason: "socket \(id) belongs to uid \(socket.ownerUID)")
        }
        return socket
    }

    /// Socket files left by a broker that died: no socket is bound to them any more, so they
    /// would make every bind of their name fail. A file a socket is still bound to (a listener
    /// that outlived the broker before, in a client's hands) stays.
    private func removeStaleSocketFiles() {
        var files: [(name: String, path: String, identity: (device: UInt64, inode: UInt64))] = []
        if let directory = opendir(local.directory) {
            defer { closedir(directory) }
            while let entry = readdir(directory) {
                let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
                guard isValidLocalSocketName(name) else { continue }
                let path = local.path(of: Substring(name))
                guard isSocketFile(atPath: path) == true, let identity = fileIdentity(atPath: path) else { continue }
                files.append((name, path, identity))
            }
        }
        guard !files.isEmpty else { return }
        for (file, live) in zip(files, liveness(of: files.map { ($0.path, $0.identity) })) where !live {
            try? removeFile(atPath: file.path)
            logger.notice("removed a stale socket file", metadata: ["name": "\(file.name)"])
        }
    }

    /// Whether some socket is still bound to each of these very files, from the kernel's socket
    /// table: not a path string (/proc/net/unix), which any user can make a socket of its own
    /// show (bound in a mount namespace of its own, or kept after its file was unlinked and made
    /// again). Not a probe connection either, which a listener would accept as one from root.
    ///
    /// The table alone is no proof that a file is dead: it comes as a dump in parts, and the
    /// kernel resumes each part at a position in a hash slot, so sockets unbound in that slot
    /// meanwhile (which anyone can make happen, with sockets of its own hashed there) shift a
    /// live one past the resumption point and out of the dump (the sixteenth attack round had
    /// the broker remove root's live datagram name that way, then bound it itself). So a file
    /// the table does not show bound is removed only if a datagram socket's `connect(2)` to it
    /// is refused too (`dead`), which goes by the file's inode to the very socket bound there.
    private func liveness(of files: [(path: String, identity: (device: UInt64, inode: UInt64))]) -> [Bool] {
        let told: [Bool]
        if let bound = unixSocketsBound(to: files.map(\.identity)) {
            told = bound
        } else {
            logger.warning("the kernel's socket table (sock_diag) cannot be read; stale socket files are told by a probe alone")
            told = files.map { _ in false }
        }
        return zip(files, told).map { file, bound in bound || !Self.dead(file.path) }
    }

    /// Removes the socket file at `path` if no socket is bound to it any more: one a socket that
    /// outlived an earlier broker bound (a datagram server, or a listener, never taken back by
    /// this broker), whose socket has closed since this broker started. True if it was removed.
    /// The probe alone decides here, without the socket table: a dump of every local socket in
    /// the namespace, which a client's refused binds, one after another, would make the loop
    /// read each time, proves nothing the probe does not.
    private func removeIfStale(_ path: String) -> Bool {
        guard isSocketFile(atPath: path) == true, Self.dead(path) else { return false }
        do { try removeFile(atPath: path) } catch { return false }
        return true
    }

    /// Whether no socket is bound to the socket file at `path`: a datagram socket's `connect(2)`
    /// to it is refused (`ECONNREFUSED`). A datagram socket bound there connects, and any other
    /// type answers `EPROTOTYPE` before any connection is made, so nothing listening there ever
    /// sees a connection from the broker; anything else (the file changed meanwhile) counts as
    /// alive.
    static func dead(_ path: String) -> Bool {
        guard let probe = try? UnixSocket(.datagram) else { return false }
        do {
            try probe.connectWithoutBlocking(path: path)
            return false
        } catch {
            return error == .connectionRefused
        }
    }
}
