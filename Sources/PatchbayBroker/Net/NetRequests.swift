// /net: the requests. Opening a factory makes a socket, `ctl` lines drive its state machine
// (NetSockets.swift), `data` hands out the kernel socket, `accept` one connection: at once, or
// parked here until the listener is readable. The broker watches each socket's handle: when the
// last client copy is closed, the socket closes and its parked accepts end in ECONNABORTED.
//
// Errors: ENOENT, EACCES, EINVAL, ENOTCONN, EAGAIN (nonblocking accept), ECONNABORTED, EDQUOT,
// EADDRINUSE, ECONNREFUSED, as SEMANTICS.md §4 says.

import Glibc
import PatchbayProtocol
import PatchbaySystem
import SystemPackage

final class NetRequests: SessionClosedHook {
    let table: NetTable
    private let sessions: SessionTable
    private let loop: EventLoop

    /// Sockets a listing shows, so a reply stays inside one frame.
    static let listLimit = 512

    /// The last `addrs` snapshot and the text it holds. Opens while the names are the same get it
    /// again (each its own read-only open file description, at offset 0): a snapshot is memory
    /// the broker made, and a client holding thousands of opens must not hold thousands of copies.
    private var snapshot: AddressSnapshot?
    /// New snapshots a uid may have built (a burst, then 8 a second): one whose opens alternate
    /// with changes to the names would otherwise pin a new copy each time. Past it, it gets the
    /// last one built, which may not show its latest change yet.
    private let snapshotBuilds = UidTokenBucket(burst: 32, refillPerSecond: 8)
    /// Where a snapshot a uid builds is written (`SharedMemoryStore.scratchFile`): a file in
    /// that uid's own tmpfs, so the copies it keeps pinned count against its own quota. Nil (or
    /// nil from it): a memfd, the broker's memory.
    var scratchFile: ((UInt32) throws(RequestError) -> Descriptor?)?

    init(table: NetTable, sessions: SessionTable, loop: EventLoop) {
        self.table = table
        self.sessions = sessions
        self.loop = loop
        table.closeHungUp = { [unowned self] id in handleReadable(id, events: .hangup) }
    }

    func handle(_ request: Request.Net, descriptors: inout ReceivedDescriptors, _ context: RequestContext) {
        switch request {
        case .adopt(let familyName, let typeName, let name):
            guard let listener = descriptors.takeFirst() else { return }
            // Anything but a local socket is the client's choice of file, whose last close may
            // block (a lingering TCP socket): refused, and closed off the loop.
            guard Self.isLocalSocket(listener.rawValue) else {
                DeferredCloser.shared.close(listener, of: context.caller.uid)
                sessions.fail(RequestError(errno: .invalidArgument, reason: "the descriptor is not a local socket"), context)
                return
            }
            do throws(RequestError) {
                guard let type = NetSocketType(rawValue: typeName) else {
                    throw RequestError(errno: .invalidArgument, reason: "\"\(typeName.prefix(40))\" is not a socket type: seqpacket, stream or dgram")
                }
                let opened = try table.adopt(UnixSocket(adopting: listener), family: try family(familyName), type: type, name: name,
                                             caller: context.caller)
                watchHandle(opened.socket)
                sessions.reply(.net(.adopt(id: opened.socket.id)), attaching: [opened.clientHandle.rawValue], to: context)
            } catch {
                sessions.fail(error, context)
            }
        case .control(let id, let command):
            do {
                try table.control(id, command, caller: context.caller)
                sessions.reply(.net(.control), to: context)
            } catch {
                sessions.fail(error, context)
            }
        case .list(let after):
            sessions.reply(.net(.list(table.list(after: after, limit: Self.listLimit))), to: context)
        case .path(let name):
            do {
                try table.local.validate(Substring(name))
                sessions.reply(.net(.path(table.local.path(of: Substring(name)))), to: context)
            } catch {
                sessions.fail(error, context)
            }
        }
    }

    // MARK: Opening /net paths

    func open(_ target: NamespacePath, nonblock: Bool, _ context: RequestContext) throws(RequestError) {
        let caller = context.caller
        switch target {
        case .netFactory(let familyName, let type):
            // The handle, then the kernel socket: the client calls listen(2) and connect(2) on it
            // itself, so the kernel records the client's credentials, never the broker's.
            deliver(try table.create(family: try family(familyName), type: type, caller: caller), as: .socket, to: context.parked)
        case .netData(let familyName, let id):
            _ = try family(familyName)
            let data = try table.openData(id, caller: caller)
            sessions.reply(.namespace(.open(objectKind: OpenedObjectKind.socketData.rawValue, id: id)),
                           attaching: [data.rawValue], to: context)
        case .netAddresses(let familyName):
            _ = try family(familyName)
            let snapshot = try addressList(for: caller.uid)
            sessions.reply(.namespace(.open(objectKind: OpenedObjectKind.addressList.rawValue, id: 0)),
                           attaching: [snapshot.rawValue], to: context)
        case .netAccept(let familyName, let id):
            _ = try family(familyName)
            if let opened = try table.acceptNow(id, caller: caller) {
                deliver(opened, as: .acceptedSocket, to: context.parked)
                return
            }
            guard !nonblock else {
                throw RequestError(errno: .resourceTemporarilyUnavailable, reason: "no connection is waiting on socket \(id)")
            }
            // Blocking accept: park the request; the listener's readiness completes it.
            let listener = try table.lookup(id, caller: caller)
            guard !table.waitsInAccept(context.session.id) else {
                throw RequestError(errno: .invalidArgument,
                                   reason: "this connection already waits in an accept; a connection waits in one at a time")
            }
            table.park(context.parked, on: listener)
            watchListener(listener, true)
        case .anonymousSharedMemory:
            preconditionFailure("the namespace routes /dev/shmem/new to shared memory")
        }
    }

    private func family(_ name: String) throws(RequestError) -> any NetFamily {
        guard let family = table.families[name] else {
            throw RequestError(errno: .noSuchFileOrDirectory, reason: "there is no /net/\(name.prefix(40)) family; the families are local")
        }
        return family
    }

    /// `addrs`: the bound names, one per line, in a read-only memfd (a snapshot), shared with
    /// every open made while the names are the same.
    private func addressList(for uid: UInt32) throws(RequestError) -> Descriptor {
        let now = monotonicNanoseconds()
        do throws(Errno) {
            // The names unchanged since the snapshot, or no new one allowed yet: no walk of the
            // table at all (a walk and a sort of every socket per open, 1 work unit, was a way to
            // spend the loop's time).
            if let snapshot, snapshot.version == table.namesVersion || !snapshotBuilds.hasToken(uid: uid, now: now) {
                return try snapshot.memory.reopenReadOnly()
            }
            let text = table.list().filter { !$0.name.isEmpty }.map { $0.name + "\n" }.sorted().joined()
            if let snapshot, snapshot.text == text {
                snapshot.version = table.namesVersion
                return try snapshot.memory.reopenReadOnly()
            }
            snapshotBuilds.spendToken(uid: uid, now: now)
            let memory: Descriptor
            do throws(Errno) {
                memory = try buildSnapshot(text, for: uid)
            } catch {
                // The uid's own quota is full (the copies it keeps): it gets the last snapshot.
                guard let snapshot else { throw error }
                return try snapshot.memory.reopenReadOnly()
            }
            let opened = try memory.reopenReadOnly()
            snapshot = AddressSnapshot(text: text, version: table.namesVersion, memory: memory)
            return opened
        } catch {
            throw RequestError(errno: error, reason: "cannot build the address list")
        }
    }

    /// A file holding `text` that no client can write: in `uid`'s own tmpfs where there is one
    /// (mode 0444, owned by the broker: a client's reopen for writing through /proc is refused),
    /// else a sealed memfd (whose mode would allow that reopen).
    private func buildSnapshot(_ text: String, for uid: UInt32) throws(Errno) -> Descriptor {
        let scratch: Descriptor?
        do {
            scratch = try scratchFile?(uid) ?? nil
        } catch {
            throw error.errno
        }
        if let scratch {
            do {
                try scratch.writeAll(Array(text.utf8))
            } catch {
                throw error == .noSpace ? .diskQuotaExceeded : error
            }
            return scratch
        }
        let memory = try makeMemoryFile(name: "patchbay-net-addrs", sealable: true)
        try memory.writeAll(Array(text.utf8))
        try memory.addSeals([.write, .shrink, .grow, .seal])
        return memory
    }

    /// Hands a new socket or an accepted connection (its handle, then its kernel socket) to the
    /// client. Should the reply not get out, the client's handle closes here and the broker's end
    /// sees the hang-up: the socket closes like any other.
    private func deliver(_ opened: consuming NetOpened, as kind: OpenedObjectKind, to request: ParkedRequest) {
        watchHandle(opened.socket)
        if opened.socket.accountedUID != opened.socket.ownerUID { watchMaker(opened.socket) }
        // Borrow, not bind: `if let` would move the data descriptor out and close it too early.
        var fds = [opened.clientHandle.rawValue]
        if let data = opened.data?.rawValue { fds.append(data) }
        sessions.reply(.namespace(.open(objectKind: kind.rawValue, id: opened.socket.id)), attaching: fds, to: request)
    }

    // MARK: Readiness

    private func watchHandle(_ socket: NetSocket) {
        try? loop.register(socket.handle.rawValue, as: .netHandle(socket: socket.id), events: [.readable, .readHangup])
    }

    /// Watches an accepted connection another uid made for the hang-up of that uid's end: no
    /// readiness asked for (the client reads its data from the same socket), so only a hang-up or
    /// an error is reported, once (edge-triggered). At once if it has hung up already.
    private func watchMaker(_ socket: NetSocket) {
        try? loop.register(socket.kernel.rawValue, as: .netMaker(socket: socket.id), events: [.edgeTriggered])
    }

    /// An accepted connection's kernel socket reported a hang-up or an error: once the connection
    /// is shut both ways (its maker closed its end, say), the broker lets it go, as when its last
    /// handle closes. The acceptor keeps the kernel socket it was given with the accept, and reads
    /// what the maker sent, then end of file; its handle reads the hang-up. So nobody pays for a
    /// connection that only the acceptor's process holds: not the maker, whose quota an acceptor
    /// keeping it would otherwise hold for as long as it liked, and not the acceptor, onto whose
    /// quota a maker connecting and closing in a loop would otherwise push them.
    func makerMayBeGone(_ id: UInt64) {
        guard let socket = table.sockets[id], UnixSocket.hasHungUp(socket.kernel.rawValue) else { return }
        release(socket, reason: "hung up: its maker's end is gone")
    }

    private func watchListener(_ socket: NetSocket, _ on: Bool) {
        if on {
            try? loop.register(socket.kernel.rawValue, as: .netListener(socket: socket.id), events: [.readable])
        } else {
            loop.unregister(socket.kernel.rawValue)
        }
    }

    /// Whether `fd` is an `AF_UNIX` socket.
    private static func isLocalSocket(_ fd: CInt) -> Bool {
        var domain: CInt = 0
        var length = socklen_t(MemoryLayout<CInt>.size)
        return getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &length) == 0 && domain == AF_UNIX
    }

    /// A handle end is readable: junk a client wrote (discarded), a holder shutting its writing
    /// down, or the hang-up of the last copy.
    func handleReadable(_ id: UInt64, events: Epoll.Events) {
        guard let socket = table.sockets[id] else { return }
        // Only the hang-up closes the socket: a zero-length packet also reads as 0 bytes. Junk is
        // drained a bounded amount per wake-up, so a client writing without end cannot hold the
        // loop; descriptors sent with it (on a kernel that cannot refuse them) are closed on the
        // uid's closing thread.
        guard events.contains(.hangup) || events.contains(.error) else {
            let uid = socket.accountedUID
            socket.handle.discardPendingPackets(maximumPackets: 64) { DeferredCloser.shared.close(raw: $0, of: uid) }
            if events.contains(.readHangup) {
                // A holder shut its writing down (`shutdown(SHUT_WR)`): the end reads end of file
                // from now on, and would be readable for good. Only the hang-up is watched now
                // (always reported); what was written before the shutdown was read above, and
                // nothing can be written after it.
                try? loop.modify(socket.handle.rawValue, events: [])
            }
            return
        }
        release(socket, reason: nil)
    }

    /// Closes `socket` in the table (its handle's last copy closed, or, with `reason`, the broker
    /// let it go): its watches end, monitors hear of it, its waiting accepts fail.
    private func release(_ socket: NetSocket, reason: String?) {
        let id = socket.id
        // Both of its descriptors close with it, so neither may stay watched: a number left in
        // the loop would be taken for the next descriptor given that number (whose registration
        // then fails). The listener may be watched without waiting accepts (the last one's
        // session left just now), so it is not asked.
        loop.unregister(socket.handle.rawValue)
        watchListener(socket, false)
        if !sessions.monitors.isEmpty {
            // No request: the last handle closed (its owner closed it, or died), or the broker let
            // the socket go (`reason`).
            let (state, name, owner) = (socket.state, socket.name, socket.ownerUID)
            sessions.announce(.net, pid: socket.ownerPID, uid: owner, object: "socket \(id)", audience: [owner, socket.accountedUID]) {
                MonitorEvent(time: 0, subsystem: "", operation: "netClose", pid: socket.ownerPID, uid: owner, command: "",
                             object: "socket \(id)", outcome: "ok", elapsed: 0, lost: 0,
                             detail: "was \(state.rawValue)" + (name.map { ", named \($0)" } ?? "") + (reason.map { "; \($0)" } ?? ""))
            }
        }
        for waiting in table.close(id) {
            sessions.fail(RequestError(errno: .connectionAbort, reason: "socket \(id) stopped listening"), waiting)
        }
    }

    /// A listener with parked accepts is readable: complete them in order.
    func listenerReadable(_ id: UInt64) {
        guard let listener = table.sockets[id] else { return }
        // At most this long per wake-up: the listener stays ready, and the rest is taken in the
        // next turn, after other clients' requests (connections made and closed in a loop cost
        // the loop no more).
        let started = monotonicNanoseconds()
        while let waiting = listener.waitingAccepts.first {
            if monotonicNanoseconds() &- started >= Self.acceptNanosecondsPerWakeup { return }
            guard let session = sessions[waiting.session] else {
                table.dropFirstWait(of: listener)
                continue
            }
            do {
                guard let opened = try table.acceptPending(listener, owner: session.credentials) else { break }
                table.dropFirstWait(of: listener)
                deliver(opened, as: .acceptedSocket, to: waiting)
            } catch {
                table.dropFirstWait(of: listener)
                sessions.fail(error, waiting)
            }
        }
        if listener.waitingAccepts.isEmpty { watchListener(listener, false) }
    }

    static let acceptNanosecondsPerWakeup: UInt64 = 250_000

    /// A departed session's parked accepts are forgotten, and a listener left with none is no
    /// longer watched.
    func sessionClosed(_ session: Session) {
        if let listener = table.forgetWaits(of: session.id) { watchListener(listener, false) }
    }
}

/// An `addrs` snapshot: the text, and the memfd holding it, writable here only.
private final class AddressSnapshot {
    let text: String
    /// The table's `namesVersion` the text was last found to match.
    var version: UInt64
    let memory: Descriptor

    init(text: String, version: UInt64, memory: consuming Descriptor) {
        self.text = text
        self.version = version
        self.memory = memory
    }
}
