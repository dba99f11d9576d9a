// Sockets through /net (SEMANTICS.md §4): the state machine from its table, data on real kernel
// sockets across unrelated processes, lifetime, and interop with programs that know nothing of
// Patchbay.
import Glibc
import Patchbay
import PatchbayProtocol
import PatchbaySystem
import SystemPackage
import Synchronization
import Testing

/// Waits (bounded) until `name` is bound and LISTENING, e.g. by a child `patchbay net listen`.
func waitUntilListening(_ broker: Broker, _ name: String) throws -> NetSocketInfo {
    let deadline = monotonicNanoseconds() + 10_000_000_000
    while monotonicNanoseconds() < deadline {
        if let socket = try broker.listSockets().first(where: { $0.name == name && $0.state == "LISTENING" }) {
            return socket
        }
        usleep(2_000)
    }
    throw PatchbayError(.timedOut, "\(name) never started listening")
}

/// Whether this process may make a network namespace (`unshare --net`, as root with
/// CAP_SYS_ADMIN) and run python3 in it.
let networkNamespacesAvailable: Bool = {
    guard geteuid() == 0, access("/usr/bin/unshare", X_OK) == 0, access("/usr/bin/python3", X_OK) == 0 else { return false }
    return (try? run("/usr/bin/unshare", ["--net", "/usr/bin/python3", "-c", "pass"]))?.termination == .exited(0)
}()

@Suite("/net sockets")
struct NetTests {
    @Test("every transition the table allows succeeds, every other one is EINVAL", arguments: Socket.Kind.allCases.filter { $0 != .dgram })
    func stateMachineFromTheTable(_ kind: Socket.Kind) throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        let target = try Socket.listen(client, name: "target", type: kind, backlog: 64)
        var counter = 0
        /// A fresh socket driven into `state` by real commands (nil if the state is not reachable
        /// from outside: CONNECTING is momentary, CLOSING and CLOSED have no handle left).
        func socket(in state: NetSocketState) throws -> Socket? {
            counter += 1
            var socket = try Socket.open(client, type: kind)
            switch state {
            case .new: break
            case .bound: try socket.bind("s\(counter)")
            case .listening: try socket.control("bind s\(counter) && listen")
            case .connected: try socket.connect(to: "target")
            case .connecting, .closing, .closed: return nil
            }
            #expect(try socket.state() == state)
            return socket
        }
        for state in NetSocketState.allCases {
            for command in NetCommand.allCases {
                guard var socket = try socket(in: state) else { continue }
                counter += 1
                let line = switch command {
                case .bind: "bind n\(counter)"
                case .listen: "listen"
                case .connect: "connect target"
                }
                let allowed = state.canTransition(to: command.target)
                do {
                    try socket.control(line)
                    #expect(allowed, "\(line) from \(state) succeeded but the table forbids it")
                    let expected: NetSocketState = command == .connect ? .connected : command.target
                    #expect(try socket.state() == expected)
                } catch {
                    #expect(!allowed, "\(line) from \(state) failed: \(error)")
                    #expect(error.errno == .invalidArgument, "\(line) from \(state): \(error)")
                    #expect(try socket.state() == state, "a refused transition changed the state")
                }
            }
        }
        // A forbidden connect is EINVAL whatever its name: one bound by nothing, or by a socket
        // of another type, does not let the kernel's ENOENT or EPROTOTYPE come out first.
        var datagram = try Socket.open(client, type: .dgram)
        try datagram.bind("dgname")
        for state in [NetSocketState.listening, .connected] {
            for name in ["nothere", "dgname"] {
                guard var socket = try socket(in: state) else { continue }
                #expect(throws: PatchbayError.self, "connect \(name) from \(state)") { try socket.connect(to: name) }
                do { try socket.connect(to: name) } catch {
                    #expect(error.errno == .invalidArgument, "connect \(name) from \(state): \(error)")
                }
                #expect(try socket.state() == state)
            }
        }
        // Accepted connections are born CONNECTED, and the listener stays LISTENING.
        let accepted = try target.accept(nonblocking: true)
        #expect(try accepted.state() == .connected)
        #expect(try target.state() == .listening)
        // The table itself, as SEMANTICS.md §4 writes it.
        #expect(!NetSocketState.new.canTransition(to: .new))
        #expect(NetSocketState.bound.canTransition(to: .connected))
        #expect(NetSocketState.connected.canTransition(to: .closing))
        #expect(!NetSocketState.connected.canTransition(to: .closed))
        #expect(NetSocketState.closing.canTransition(to: .closed))
    }

    @Test("ctl: chains, precise EINVAL reasons, EADDRINUSE, ECONNREFUSED, ENOENT")
    func controlCommands() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        var socket = try Socket.open(client, type: .seqpacket)
        for (line, fragment) in [("frobnicate", "unknown command \"frobnicate\""), ("bind", "bind takes a name"),
                                 ("bind a b", "the mode must be octal"), ("bind a 01777", "the mode must be octal"),
                                 ("bind a 9", "the mode must be octal"), ("bind a 0600 x", "bind takes a name"), ("bind ../etc", "is not a local name"),
                                 ("bind " + String(repeating: "x", count: 65), "is not a local name"),
                                 ("bind ..", "is not a local name"), ("bind ok &&", "empty command"),
                                 ("connect", "connect takes one name")] {
            do {
                try socket.control(line)
                Issue.record("\(line) succeeded")
            } catch {
                #expect(error.errno == .invalidArgument && error.reason.contains(fragment), "\(line): \(error)")
            }
        }
        #expect(try socket.state() == .new)
        // A malformed line changes nothing...
        for backlog in ["0", "+5", "-1", "2147483648", "٣"] {
            do {
                try socket.control("bind first && listen \(backlog)")
                Issue.record("listen \(backlog) succeeded")
            } catch {
                #expect(error.errno == .invalidArgument && error.reason.contains("backlog"), "\(backlog): \(error)")
            }
        }
        #expect(try socket.state() == .new)
        // ...while a well-formed chain runs command by command and stops at the first failure.
        do {
            try socket.control("bind first && connect first")
            Issue.record("connecting a bound socket to itself succeeded")
        } catch {
            #expect(error.errno == .connectionRefused)
        }
        #expect(try socket.state() == .bound)
        try socket.control("listen 5")
        #expect(try socket.state() == .listening)
        var twin = try Socket.open(client, type: .seqpacket)
        expectErrno(.addressInUse) { () throws(PatchbayError) in try twin.bind("first") }
        var quiet = try Socket.open(client, type: .seqpacket)
        try quiet.bind("quiet")
        var caller = try Socket.open(client, type: .seqpacket)
        let refused = expectErrno(.connectionRefused) { () throws(PatchbayError) in try caller.connect(to: "quiet") }
        #expect(refused?.reason.contains("nobody is listening") == true)
        #expect(try caller.state() == .new)  // CONNECTING fell back
        expectErrno(.noSuchFileOrDirectory) { () throws(PatchbayError) in try caller.connect(to: "nobody-here") }
        #expect(try client.listSockets().filter { !$0.name.isEmpty }.map(\.name).sorted() == ["first", "quiet"])
        // A datagram socket does not listen: the kernel's EOPNOTSUPP, as SEMANTICS.md's table says.
        var datagram = try Socket.open(client, type: .dgram)
        try datagram.bind("datagram")
        let notListening = expectErrno(.notSupported) { () throws(PatchbayError) in try datagram.control("listen") }
        #expect(notListening?.reason.contains("datagram sockets do not listen") == true)
        #expect(try datagram.state() == .bound)
    }

    @Test("a live socket file the kernel's socket table does not show (bound from another network namespace) is never taken for stale: a bind of its name is EADDRINUSE until that socket closes",
          .enabled(if: networkNamespacesAvailable, "needs root, unshare and python3 to make a network namespace"))
    func liveFileTheTableMissesStays() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        let path = try client.localSocketPath("ghost")
        // sock_diag lists the sockets of the broker's network namespace only, as its dump can
        // miss one of them under churn: the connect probe is what finds this one alive.
        let ghost = try Child("/usr/bin/unshare", ["--net", "/usr/bin/python3", "-c", """
            import socket, sys
            s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            s.bind(sys.argv[1])
            print("bound", flush=True)
            sys.stdin.read()
            """, path])
        defer { ghost.kill(SIGKILL); _ = try? ghost.wait() }
        #expect(try ghost.readLine() == "bound")
        var socket = try Socket.open(client, type: .dgram)
        expectErrno(.addressInUse) { () throws(PatchbayError) in try socket.bind("ghost") }
        #expect(access(path, F_OK) == 0)
        // Gone: the file is stale now, and the bind takes it.
        ghost.closeInput()
        #expect(try ghost.wait() == .exited(0))
        try socket.bind("ghost")
        #expect(try socket.state() == .bound)
    }

    @Test("an accept with no room for the connection's two descriptors (0 or 1 spare) is EMFILE and leaves the connection queued: the next accept gets it, with what it sent")
    func acceptWithoutRoomKeepsTheConnection() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        for spare in 0..<2 {
            let name = "full\(spare)"
            let peer = try Child(testPeer, ["net-accept-with-full-table", name, "\(spare)"], environment: broker.environment)
            #expect(try peer.readLine() == "listening")
            let connection = try Socket.connect(client, to: name)
            #expect(try connection.send(Array("first".utf8)) == 5)
            try peer.writeLine("go")
            #expect(try peer.readLine() == "EMFILE", "\(spare) spare")
            #expect(try peer.readLine() == "retry: first", "\(spare) spare")
            #expect(try peer.wait() == .exited(0))
        }
    }

    @Test("listen, connect, accept and data across two unrelated processes", arguments: Socket.Kind.allCases)
    func acrossProcesses(_ kind: Socket.Kind) throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        let server = try Child(patchbayCLI, ["net", "listen", "echo", "--type", kind.rawValue, "--echo"],
                               environment: broker.environment)
        if kind == .dgram {
            let deadline = monotonicNanoseconds() + 10_000_000_000
            while try !client.listSockets().contains(where: { $0.name == "echo" && $0.state == "BOUND" }),
                  monotonicNanoseconds() < deadline { usleep(2_000) }
        } else {
            _ = try waitUntilListening(client, "echo")
        }
        let socket = try Socket.connect(client, to: "echo", type: kind)
        for message in ["first", "second message", String(repeating: "z", count: 3000)] {
            try socket.send(Array(message.utf8))
            var echoed: [UInt8] = []
            while echoed.count < message.utf8.count {  // a stream may deliver in pieces
                guard let part = try socket.receive() else { break }
                echoed += part.bytes
            }
            #expect(String(decoding: echoed, as: UTF8.self) == message)
        }
        server.kill(SIGTERM)
        _ = try server.wait()
    }

    @Test("seqpacket keeps boundaries, reports truncation, carries zero-length packets; nonblock is EAGAIN")
    func seqpacketSemantics() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        let listener = try Socket.listen(client, name: "packets", nonblocking: true)
        expectErrno(.resourceTemporarilyUnavailable) { () throws(PatchbayError) in _ = try listener.accept() }
        let sender = try Socket.connect(client, to: "packets")
        let receiver = try listener.accept(nonblocking: true)
        expectErrno(.resourceTemporarilyUnavailable) { () throws(PatchbayError) in _ = try receiver.receive() }
        try sender.send(Array("one".utf8))
        try sender.send([])
        try sender.send(Array("a longer packet".utf8))
        try sender.send(Array("three".utf8))
        #expect(try receiver.receive()?.bytes == Array("one".utf8))
        let empty = try #require(try receiver.receive())
        #expect(empty.bytes.isEmpty && !empty.truncated)
        var small = [UInt8](repeating: 0, count: 4)
        let cut = try small.withUnsafeMutableBytes { raw in
            Result { () throws(PatchbayError) -> Socket.Received in try receiver.receive(into: raw) }
        }.get()
        #expect(cut.count == 4 && cut.messageLength == 15 && cut.truncated)
        #expect(small == Array("a lo".utf8))
        // The rest of a truncated packet is gone; the next read is the next packet.
        #expect(try receiver.receive()?.bytes == Array("three".utf8))
        expectErrno(.resourceTemporarilyUnavailable) { () throws(PatchbayError) in _ = try receiver.receive() }
    }

    @Test("writing to a socket's handle, even an empty packet, never closes it; only the last close does")
    func handleWritesDoNotClose() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        let socket = try Socket.open(client, type: .seqpacket)
        for _ in 0..<200 {
            #expect(Glibc.send(socket.handle.rawValue, nil, 0, 0) == 0)
            #expect([UInt8](repeating: 7, count: 32).withUnsafeBytes { Glibc.send(socket.handle.rawValue, $0.baseAddress, $0.count, 0) } == 32)
        }
        // The broker drains the handle on its own wake-ups; once nothing sent is left unread
        // (SIOCOUTQ) it has seen every packet, and the socket must still be there.
        let deadline = monotonicNanoseconds() + 30_000_000_000
        var queued: CInt = 1
        while monotonicNanoseconds() < deadline {
            guard ioctl(socket.handle.rawValue, UInt(TIOCOUTQ), &queued) == 0, queued > 0 else { break }
            usleep(1_000)
        }
        #expect(queued == 0)
        #expect(try client.listSockets().map(\.id) == [socket.id])
        _ = consume socket
        while try !client.listSockets().isEmpty, monotonicNanoseconds() < deadline { usleep(1_000) }
        #expect(try client.listSockets().isEmpty)
    }

    @Test("the broker never listens or connects for a client: both ends' SO_PEERCRED name the client; ctl only confirms the client's own calls")
    func identityIsTheClients() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        var listener = try Socket.open(client, type: .seqpacket)
        var caller = try Socket.open(client, type: .seqpacket)
        // A client speaking the protocol that says "listen" or "connect" without making the call
        // itself is refused: the broker makes neither call for it.
        let raw = try RawClient(path: broker.socketPath)
        func control(_ id: UInt64, _ line: String) throws -> ErrorReply? {
            let answer = try raw.exchange(Request.net(.control(socket: id, command: line)).encode(requestID: 7))
            guard answer.frame.kind == .error else { return nil }
            return try ErrorReply.decode(answer.frame)
        }
        #expect(try control(listener.id, "bind identity 0600") == nil)
        let notListening = try control(listener.id, "listen")
        #expect(notListening?.errno == EINVAL && notListening?.reason.contains("call listen(2)") == true,
                "\(String(describing: notListening))")
        #expect(try listener.state() == .bound)
        try listener.listen()
        #expect(try listener.state() == .listening)
        let notConnected = try control(caller.id, "connect identity")
        #expect(notConnected?.errno == ENOTCONN && notConnected?.reason.contains("call connect(2)") == true,
                "\(String(describing: notConnected))")
        #expect(try caller.state() == .new)
        try caller.connect(to: "identity")
        let accepted = try listener.accept()
        // The connection was made by this process, and so was the listen: the broker (another
        // process) appears on neither side.
        let seenByListener = try UnixSocket.peerCredentials(of: accepted.dataDescriptor)
        let seenByCaller = try UnixSocket.peerCredentials(of: caller.dataDescriptor)
        #expect(seenByListener.pid == getpid() && seenByCaller.pid == getpid())
        #expect(seenByListener.pid != broker.pid && seenByCaller.pid != broker.pid)
        // The socket file is the binder's, with the mode it asked for.
        var info = stat()
        #expect(lstat(try client.localSocketPath("identity"), &info) == 0)
        #expect(info.st_uid == getuid() && info.st_mode & 0o777 == 0o600)
    }

    @Test("connect NAME is refused (EINVAL) when the kernel socket reached another listener at NAME's path: the peer must be NAME's own listener, by the kernel's word")
    func connectToAnImpostorIsRefused() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        let listener = try Socket.listen(client, name: "real")
        let path = try run(patchbayCLI, ["net", "path", "real"], environment: broker.environment).standardOutput
            .trimmingCharacters(in: .whitespacesAndNewlines)
        #expect(path.hasSuffix("/real"))
        // Another process's listener takes the path (as one in namespaces of its own would).
        #expect(unlink(path) == 0)
        let impostor = try Child("/usr/bin/python3", ["-c", """
            import socket
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.bind(\(String(reflecting: path)))
            s.listen(8)
            print("ready", flush=True)
            input()
            """])
        defer { impostor.closeInput(); _ = try? impostor.wait() }
        #expect(try impostor.readLine() == "ready")
        var socket = try Socket.open(client, type: .seqpacket)
        let refused = expectErrno(.invalidArgument) { () throws(PatchbayError) in try socket.connect(to: "real") }
        #expect(refused?.reason.contains("another listener") == true, "\(String(describing: refused))")
        _ = consume listener
    }

    @Test("a listener's holder that switches it to blocking mode cannot make the broker wait in accept")
    func blockingListenerCannotStallTheBroker() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        let other = try broker.connect()
        let listener = try Socket.listen(client, name: "tampered", nonblocking: true)
        let fd = listener.kernelDescriptor
        // Cleared before the accept: refused, and the flag is set again for the next one.
        _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK)
        let refused = expectErrno(.invalidArgument) { () throws(PatchbayError) in _ = try listener.accept() }
        #expect(refused?.reason.contains("blocking mode") == true, "\(String(describing: refused))")
        #expect(fcntl(fd, F_GETFL) & O_NONBLOCK != 0)
        expectErrno(.resourceTemporarilyUnavailable) { () throws(PatchbayError) in _ = try listener.accept() }
        // Cleared over and over while accepts arrive: each one ends (EAGAIN or EINVAL) and the
        // broker keeps serving everyone else.
        let stop = Atomic<Bool>(false)
        let stopped = try Pipe()
        let signal = stopped.writeEnd.rawValue
        startThread {
            while !stop.load(ordering: .relaxed) {
                _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK)
                _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
            }
            var byte: UInt8 = 1
            _ = Glibc.write(signal, &byte, 1)
        }
        for _ in 0..<2_000 {
            do {
                _ = try listener.accept()
                Issue.record("an accept succeeded with nothing pending")
            } catch {
                #expect(error.errno == .resourceTemporarilyUnavailable || error.errno == .invalidArgument, "\(error)")
            }
        }
        stop.store(true, ordering: .relaxed)
        var byte: UInt8 = 0
        _ = try withUnsafeMutableBytes(of: &byte) { raw in Result { () throws(Errno) -> Int in try stopped.readEnd.read(into: raw) } }.get()
        #expect(try other.status().clients >= 2)
    }

    @Test("listings page past 512 sockets: every socket is listed, and the state of the 600th is found")
    func listingPages() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        var sockets: [HeldSocket] = []
        for _ in 0..<600 { sockets.append(HeldSocket(try Socket.open(client, type: .seqpacket))) }
        let listed = try client.listSockets()
        #expect(listed.count == 600)
        #expect(listed.map(\.id) == sockets.map { $0.socket.id })
        #expect(try sockets[599].socket.state() == .new)
        #expect(try client.listSockets(after: sockets[599].socket.id).isEmpty)
    }

    @Test("data before connect is ENOTCONN, at the library and at the broker")
    func notConnected() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        var socket = try Socket.open(client, type: .stream)
        expectErrno(.socketNotConnected) { () throws(PatchbayError) in try socket.send(Array("x".utf8)) }
        expectErrno(.socketNotConnected) { () throws(PatchbayError) in try socket.openData() }
        try socket.bind("unconnected")
        expectErrno(.socketNotConnected) { () throws(PatchbayError) in try socket.openData() }
        var datagram = try Socket.open(client, type: .dgram)
        try datagram.bind("bound-datagram")
        try datagram.openData()  // a bound datagram socket can receive
    }

    @Test("peer close: queued data first, then end of file; writing to a closed peer is EPIPE, not SIGPIPE")
    func peerClose() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        for kind in [Socket.Kind.seqpacket, .stream] {
            let listener = try Socket.listen(client, name: "close-\(kind.rawValue)", type: kind)
            /// Connects, sends two messages and closes the sending side by dropping it.
            func sendAndClose() throws -> Socket {
                let sender = try Socket.connect(client, to: "close-\(kind.rawValue)", type: kind)
                let accepted = try listener.accept()
                try sender.send(Array("queued one".utf8))
                try sender.send(Array("queued two".utf8))
                return accepted  // the sender's Socket goes away here: handle and data close
            }
            let receiver = try sendAndClose()
            var received: [UInt8] = []
            while let part = try receiver.receive() { received += part.bytes }
            #expect(String(decoding: received, as: UTF8.self) == "queued onequeued two")
            #expect(try receiver.receive() == nil)
            let error = expectErrno(.brokenPipe) { () throws(PatchbayError) in try receiver.send(Array("anyone?".utf8)) }
            #expect(error?.reason.contains("peer") == true)
        }
    }

    @Test("an owner killed with SIGKILL: name freed, peer sees EOF, broker descriptors back to baseline")
    func ownerKilled() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        _ = try client.status()
        let baseline = try broker.descriptorCount()
        let server = try Child(patchbayCLI, ["net", "listen", "doomed", "--echo"], environment: broker.environment)
        _ = try waitUntilListening(client, "doomed")
        do {
            let socket = try Socket.connect(client, to: "doomed")
            try socket.send(Array("ping".utf8))
            #expect(try socket.receive()?.bytes == Array("ping".utf8))
            server.kill(SIGKILL)
            #expect(try server.wait() == .signaled(SIGKILL))
            #expect(try socket.receive() == nil)  // EOF, not a hang
            // The name is free again.
            let deadline = monotonicNanoseconds() + 30_000_000_000
            while try client.listSockets().contains(where: { $0.name == "doomed" }), monotonicNanoseconds() < deadline {
                usleep(2_000)
            }
            _ = try Socket.listen(client, name: "doomed")
        }
        #expect(try broker.waitForDescriptorCount(baseline) == baseline)
        #expect(try client.listSockets().isEmpty)
        #expect(try client.status().sockets == 0)
    }

    @Test("an accept waiting on a listener that closes gets ECONNABORTED")
    func acceptAborted() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        let server = try Child(patchbayCLI, ["net", "listen", "short-lived", "--exec", "/bin/cat"],
                               environment: broker.environment)
        let listener = try waitUntilListening(client, "short-lived")
        let outcome = Mutex<Errno?>(nil)
        let done = try Pipe()
        let signal = done.writeEnd.rawValue
        let waiter = try broker.connect()
        startThread {
            do {
                _ = try Socket.accept(waiter, socket: listener.id, type: .seqpacket)
            } catch let error as PatchbayError {
                outcome.withLock { $0 = error.errno }
            } catch {}
            var byte: UInt8 = 1
            _ = Glibc.write(signal, &byte, 1)
        }
        // Kill the listener only once the broker shows both accepts waiting (the server's own and
        // ours), so ours is really parked.
        let deadline = monotonicNanoseconds() + 10_000_000_000
        while try client.listSockets().first(where: { $0.id == listener.id })?.waitingAccepts ?? 0 < 2,
              monotonicNanoseconds() < deadline { usleep(2_000) }
        server.kill(SIGKILL)
        _ = try server.wait()
        var byte: UInt8 = 0
        _ = try withUnsafeMutableBytes(of: &byte) { raw in
            Result { () throws(Errno) -> Int in try done.readEnd.read(into: raw) }
        }.get()
        #expect(outcome.withLock { $0 } == .connectionAbort)
    }

    @Test("a listener closed after the connection of its last waiting accept left is no longer watched: every later connection gets in")
    func listenerClosedAfterItsWaiterLeft() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        func waitingAccepts(_ id: UInt64) throws -> UInt32 {
            try client.listSockets().first(where: { $0.id == id })?.waitingAccepts ?? 0
        }
        func waitFor(_ what: String, _ condition: () throws -> Bool) throws {
            #expect(try eventually(condition), "timed out waiting for \(what)")
        }
        do {
            let listener = try Socket.listen(client, name: "left-behind")
            let id = listener.id
            do {
                // A blocking accept, parked; then its connection goes away with it parked.
                let waiter = try RawClient(path: broker.socketPath)
                try waiter.socket.send(Request.namespace(.open(path: "/net/local/\(id)/accept", flags: [])).encode(requestID: 1))
                try waitFor("the accept to be parked") { try waitingAccepts(id) == 1 }
            }
            try waitFor("the waiter's accept to be forgotten") { try waitingAccepts(id) == 0 }
            _ = consume listener  // its handle and kernel socket close here
        }
        try waitFor("the listener to close") { try client.status().sockets == 0 }
        // The listener's descriptor number is free in the broker again; the connections made now
        // take it and the numbers around it.
        try expectEveryConnectionAdmitted(broker)
    }

    @Test("a connection waits in one accept at a time: a second blocking accept on it is EINVAL at once, another connection's waits")
    func oneWaitingAcceptPerConnection() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        let listener = try Socket.listen(client, name: "one-wait")
        func accept(_ requestID: UInt64) -> [UInt8] {
            Request.namespace(.open(path: "/net/local/\(listener.id)/accept", flags: [])).encode(requestID: requestID)
        }
        func waitForWaiting(_ count: UInt32) throws {
            #expect(try eventually { try client.listSockets().first(where: { $0.id == listener.id })?.waitingAccepts == count },
                    "never \(count) waiting")
        }
        let first = try RawClient(path: broker.socketPath)
        // A broker that parked the second accept would never answer it: fail, not hang.
        var timeout = timeval(tv_sec: 10, tv_usec: 0)
        #expect(setsockopt(first.socket.rawValue, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size)) == 0)
        try first.socket.send(accept(1))
        try waitForWaiting(1)
        // A second one on the same connection is answered at once, not kept (what a client could
        // make the broker hold in waiting accepts is one per connection).
        for requestID: UInt64 in 2...50 {
            let (answered, refused) = try first.error(for: accept(requestID))
            #expect(answered == requestID && refused.errno == EINVAL && refused.reason.contains("already waits in an accept"),
                    "\(refused)")
        }
        let second = try RawClient(path: broker.socketPath)
        try second.socket.send(accept(1))
        try waitForWaiting(2)
        // A connection arrives: the first waiter gets it, and may then wait again.
        let caller = try Socket.connect(client, to: "one-wait")
        let message = try first.socket.receive(into: first.buffer)
        let frame = try Frame.decode(Array(first.buffer[0..<message.length])[...])
        #expect(frame.kind == .reply && frame.requestID == 1 && message.descriptors.count == 2)
        try waitForWaiting(1)
        try first.socket.send(accept(51))
        try waitForWaiting(2)
        _ = consume caller
    }

    // That the close happens on a closing thread, not in the receiving one, is what
    // TwoUserLingerTests.lingeringWithNetDataDoesNotHangReceiver shows (a close that would wait);
    // this test shows only that none is left open (a plain recv would pass it too).
    @Test("a /net socket takes no descriptors (EPERM at the sender: a close of one in the receiving process would drop its POSIX locks on the file); where the kernel cannot refuse them (played by turning SO_PASSRIGHTS back on), those a peer sends with data are taken off the socket and closed: the receiver keeps none", arguments: [Socket.Kind.seqpacket, .stream])
    func receivedDescriptorsAreClosedElsewhere(_ kind: Socket.Kind) throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        let listener = try Socket.listen(client, name: "fd-sender-\(kind)", type: kind)
        let sender = try Socket.connect(client, to: "fd-sender-\(kind)", type: kind)
        let receiver = try listener.accept()
        var ends: [CInt] = [-1, -1]
        #expect(pipe(&ends) == 0)
        defer { close(ends[1]) }
        var bytes: [UInt8] = Array("with a descriptor".utf8)
        func send() -> Int {
            bytes.withUnsafeMutableBytes { raw in
                [ends[0]].withUnsafeBufferPointer { SeqpacketSocket.sendRaw(sender.dataDescriptor, UnsafeRawBufferPointer(raw), $0) }
            }
        }
        // Both ends refuse them, the accepted one from its first byte (inherited from the listener).
        if try kernelRefusesDescriptors() {
            #expect(send() == -1 && errno == EPERM)
            var reply: [UInt8] = [1]
            let toSender = reply.withUnsafeMutableBytes { raw in
                [ends[0]].withUnsafeBufferPointer { SeqpacketSocket.sendRaw(receiver.dataDescriptor, UnsafeRawBufferPointer(raw), $0) }
            }
            #expect(toSender == -1 && errno == EPERM)
            WakeSocket.acceptDescriptors(receiver.dataDescriptor)
        }
        let sent = send()
        #expect(sent == bytes.count)
        guard sent == bytes.count else { return }
        close(ends[0])  // the read end now lives only in the receiver's queue
        let received = try receiver.receive()
        #expect(received?.bytes == bytes)
        // Taken and closed: nothing in this process holds the pipe's read end any more.
        var writer = pollfd(fd: ends[1], events: Int16(POLLOUT), revents: 0)
        let deadline = monotonicNanoseconds() + 10_000_000_000
        while poll(&writer, 1, 0) >= 0, writer.revents & Int16(POLLERR) == 0, monotonicNanoseconds() < deadline { usleep(1_000) }
        #expect(writer.revents & Int16(POLLERR) != 0)
    }

    @Test("a namespace path longer than any in the namespace is ENAMETOOLONG before it is parsed; addrs shows a name bound after the last open")
    func longPathAndFreshAddresses() throws {
        let broker = try TestBroker()
        let raw = try RawClient(path: broker.socketPath)
        let long = "/net/local/" + String(repeating: "x", count: 60_000) + "/accept"
        let (_, refused) = try raw.error(for: Request.namespace(.open(path: long, flags: [])).encode(requestID: 1))
        #expect(refused.errno == ENAMETOOLONG && refused.reason.contains("at most 1024 bytes"), "\(refused)")
        // The address list is rebuilt only when a name changed, and is then current.
        let client = try broker.connect()
        func addresses() throws -> [String] {
            let list = try client.openAddressList()
            return String(decoding: try list.readToEnd(), as: UTF8.self).split(separator: "\n").map(String.init)
        }
        _ = try addresses()
        let first = try Socket.listen(client, name: "addr-one")
        #expect(try addresses().contains("addr-one"))
        let second = try Socket.listen(client, name: "addr-two")
        #expect(try addresses().filter { $0.hasPrefix("addr-") } == ["addr-one", "addr-two"])
        _ = consume first
        #expect(try eventually { try !addresses().contains("addr-one") })
        _ = consume second
    }

    @Test("a listen refused on a socket listening already (EINVAL) leaves its backlog as it was")
    func refusedListenKeepsBacklog() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        var listener = try Socket.listen(client, name: "small-backlog", backlog: 1)
        expectErrno(.invalidArgument) { () throws(PatchbayError) in try listener.listen() }
        // A backlog of 1 holds two connections waiting (Linux's rule), and refuses a third.
        let first = try Socket.connect(client, to: "small-backlog")
        let second = try Socket.connect(client, to: "small-backlog")
        expectErrno(.resourceTemporarilyUnavailable) { () throws(PatchbayError) in _ = try Socket.connect(client, to: "small-backlog") }
        _ = consume first
        _ = consume second
        _ = consume listener
    }

    @Test("interop: Python connects to a Patchbay listener by its path; Patchbay connects to a Python listener")
    func interop() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        let server = try Child(patchbayCLI, ["net", "listen", "for-python", "--echo"], environment: broker.environment)
        _ = try waitUntilListening(client, "for-python")
        let path = try client.localSocketPath("for-python")
        let cli = try run(patchbayCLI, ["net", "path", "for-python"], environment: broker.environment)
        #expect(cli.standardOutput == path + "\n")
        let python = try run("/usr/bin/env", ["python3", "-c", """
            import socket, sys
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.connect(sys.argv[1])
            s.send(b"from python")
            sys.stdout.write(s.recv(100).decode())
            """, path])
        #expect(python.standardOutput == "from python", "\(python.standardError)")
        server.kill(SIGTERM)
        _ = try server.wait()

        // A listener Patchbay did not create, in the broker's net directory.
        let foreignPath = broker.directory + "/net/foreign"
        let foreign = try Child("/usr/bin/env", ["python3", "-c", """
            import socket, sys
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.bind(sys.argv[1]); s.listen(1)
            print("ready", flush=True)
            c, _ = s.accept()
            c.send(c.recv(100).upper())
            """, foreignPath])
        #expect(try foreign.readLine() == "ready")
        let socket = try Socket.connect(client, to: "foreign")
        try socket.send(Array("hello python".utf8))
        #expect(try socket.receive()?.bytes == Array("HELLO PYTHON".utf8))
        #expect(try foreign.wait() == .exited(0))
    }

    @Test("interop: socat talks to a Patchbay stream listener by its path",
          .enabled(if: access("/usr/bin/socat", X_OK) == 0, "socat is not installed (.ci/run installs it)"))
    func socat() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        let server = try Child(patchbayCLI, ["net", "listen", "for-socat", "--type", "stream", "--echo"],
                               environment: broker.environment)
        _ = try waitUntilListening(client, "for-socat")
        let path = try client.localSocketPath("for-socat")
        let reply = try run("/usr/bin/socat", ["-t", "5", "-", "UNIX-CONNECT:" + path], input: "through socat\n")
        #expect(reply.standardOutput == "through socat\n", "\(reply.standardError)")
        server.kill(SIGTERM)
        _ = try server.wait()
    }

    @Test("addrs: opens while the names are the same share one snapshot, each at offset 0; a uid's new snapshots are rate-limited (32, then 8 a second), past which it gets the last one")
    func addressSnapshotsAreShared() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        func inode(_ file: borrowing Patchbay.Descriptor) -> UInt64 {
            var info = stat()
            return fstat(file.rawValue, &info) == 0 ? UInt64(info.st_ino) : 0
        }
        do {
            let listener = try Socket.listen(client, name: "shared.name")
            let first = try client.openAddressList()
            let second = try client.openAddressList()
            #expect(inode(first) != 0 && inode(first) == inode(second))
            #expect(try first.readToEnd() == Array("shared.name\n".utf8))
            #expect(try second.readToEnd() == Array("shared.name\n".utf8), "its own offset, at 0")
            // Sealed: reopened for writing through /proc, it can be neither written nor resized.
            let writable = open("/proc/self/fd/\(first.rawValue)", O_RDWR)
            if writable >= 0 {
                #expect(pwrite(writable, "FORGED", 6, 0) == -1 && errno == EPERM)
                #expect(ftruncate(writable, 1 << 20) == -1 && errno == EPERM)
                close(writable)
            }
            #expect(try client.openAddressList().readToEnd() == Array("shared.name\n".utf8))
            _ = consume listener
        }
        // Every open after a change of the names would otherwise be a copy of its own.
        let start = monotonicNanoseconds()
        var inodes = Set<UInt64>()
        for index in 0..<100 {
            let listener = try Socket.listen(client, name: "churn.\(index)")
            inodes.insert(inode(try client.openAddressList()))
            _ = consume listener
        }
        let seconds = Double(monotonicNanoseconds() - start) / 1e9
        #expect(inodes.count > 1)
        #expect(Double(inodes.count) <= 32 + 8 * seconds.rounded(.up) + 2, "\(inodes.count) snapshots in \(seconds) s")
    }

    @Test("the CLI: net connect relays lines as packets; ls, addrs and path")
    func commandLine() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        let server = try Child(patchbayCLI, ["net", "listen", "upper", "--type", "stream", "--exec", "/usr/bin/tr", "a-z", "A-Z"],
                               environment: broker.environment)
        let echo = try Child(patchbayCLI, ["net", "listen", "echo", "--echo"], environment: broker.environment)
        _ = try waitUntilListening(client, "upper")
        _ = try waitUntilListening(client, "echo")
        let shouted = try run(patchbayCLI, ["net", "connect", "upper", "--type", "stream"], environment: broker.environment,
                              input: "quiet words\n")
        #expect(shouted.standardOutput == "QUIET WORDS\n", "\(shouted.standardError)")
        // The program ran through the listener's starter, started before any connection.
        #expect(childProcesses(of: server.pid).contains { processCommandLine(of: $0).contains("exec-starter /usr/bin/tr a-z A-Z") })
        let echoed = try run(patchbayCLI, ["net", "connect", "echo"], environment: broker.environment,
                             input: "one\ntwo\n\nthree\n")
        #expect(echoed.standardOutput == "one\ntwo\n\nthree\n", "\(echoed.standardError)")
        let listing = try run(patchbayCLI, ["net", "ls", "--json"], environment: broker.environment).standardOutput
        #expect(listing.contains("\"name\": \"upper\"") && listing.contains("\"state\": \"LISTENING\""))
        #expect(listing.contains("\"owner_pid\": \(server.pid)"))
        #expect(try run(patchbayCLI, ["net", "addrs"], environment: broker.environment).standardOutput == "echo\nupper\n")
        let missing = try run(patchbayCLI, ["net", "connect", "nobody"], environment: broker.environment)
        #expect(missing.standardError.hasPrefix("patchbay: net connect: ENOENT: "))
        let badName = try run(patchbayCLI, ["net", "path", "../x"], environment: broker.environment)
        #expect(badName.standardError.hasPrefix("patchbay: net path: EINVAL: "))
        server.kill(SIGTERM)
        echo.kill(SIGTERM)
        _ = try server.wait()
        _ = try echo.wait()
    }

    @Test("a datagram server answers only senders it can name (an absolute path, an autobound name): a relative path or an abstract name the sender chose is EINVAL, nothing sent; descriptors sent to it are refused (EPERM)",
          .enabled(if: access("/usr/bin/python3", X_OK) == 0, "needs python3"))
    func datagramServerAnswersOnlyWhatItCanName() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        var server = try Socket.open(client, type: .dgram)
        try server.bind("answers")
        try server.openData()
        let directory = makeTemporaryDirectory()
        defer { removeTree(directory) }
        // The senders, each from a socket of its own: bound at a relative path (relative to the
        // sender's own directory: resolved in the server's, it would name another file), under an
        // abstract name it chose (resolved in the server's network namespace), autobound, and at
        // an absolute path; then a packet carrying a descriptor.
        let senders = try Child("/usr/bin/python3", ["-c", """
            import os, socket, sys
            server, home = sys.argv[1], sys.argv[2]
            os.chdir(home)
            def sender(address):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                s.bind(address)
                s.settimeout(10)
                return s
            relative, chosen, automatic, absolute = sender("rel.sock"), sender("\\0patchbay-test-chosen-%d" % os.getpid()), sender(""), sender(os.path.join(home, "abs.sock"))
            for s, text in ((relative, b"relative"), (chosen, b"chosen"), (automatic, b"automatic"), (absolute, b"absolute")):
                s.sendto(text, server)
            for s in (automatic, absolute):
                print(s.recv(64).decode(), flush=True)
            r, w = os.pipe()
            try:
                absolute.sendmsg([b"fd"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, w.to_bytes(4, sys.byteorder))], 0, server)
                print("descriptor sent", flush=True)
            except PermissionError:
                print("EPERM", flush=True)
            """, try client.localSocketPath("answers"), directory])
        defer { senders.kill(SIGKILL); _ = try? senders.wait() }
        var outcomes: [String: String] = [:]
        for _ in 0..<4 {
            var buffer = [UInt8](repeating: 0, count: 64)
            let received = try buffer.withUnsafeMutableBytes { raw in try server.receive(into: raw, wantSender: true) }
            let text = String(decoding: buffer[0..<received.count], as: UTF8.self)
            do {
                try server.reply(Array("answer:\(text)".utf8), to: try #require(received.sender))
                outcomes[text] = "answered"
            } catch let error as PatchbayError {
                outcomes[text] = error.errno.name
            }
        }
        #expect(outcomes == ["relative": "EINVAL", "chosen": "EINVAL", "automatic": "answered", "absolute": "answered"], "\(outcomes)")
        #expect(try senders.readLine() == "answer:automatic")
        #expect(try senders.readLine() == "answer:absolute")
        let probe = try UnixSocket(.datagram)
        if WakeSocket.refuseDescriptors(probe.rawValue) {
            #expect(try senders.readLine() == "EPERM")
        } else {
            #expect(try senders.readLine() == "descriptor sent")
        }
        #expect(try senders.wait() == .exited(0))
    }


    @Test("a datagram server's search of another uid's senders for their sockets is rationed per uid: another uid's 200 senders that never hold their socket where it is looked for cost at most 64 searches a second, the rest refused at once (EAGAIN)",
          .enabled(if: geteuid() == 0 && access("/usr/bin/setpriv", X_OK) == 0 && access("/usr/bin/python3", X_OK) == 0, "needs root, setpriv and python3"))
    func autoboundSenderSearchesAreRationed() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        var server = try Socket.open(client, type: .dgram)
        try server.bind("rationed", mode: 0o666)
        try server.openData()
        chmod(broker.directory, 0o755)
        chmod(broker.directory + "/net", 0o755)
        // Each sender's socket sits past the descriptors searched (fd 300 and up). (A uid of its
        // own, 65533: the rationing is per process and per uid, and other tests' nobody senders
        // in this process must keep theirs.)
        let senders = try Child("/usr/bin/setpriv", ["--reuid=65533", "--regid=65533", "--clear-groups", "/usr/bin/python3", "-c", """
            import os, resource, socket, sys
            resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))
            for i in range(200):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                os.dup2(s.fileno(), 300 + i)
                s.close()
                s = socket.socket(fileno=300 + i)
                s.bind("")
                s.sendto(b"far", sys.argv[1])
                s.detach()
            print("sent", flush=True)
            sys.stdin.readline()
            """, try client.localSocketPath("rationed")])
        defer { senders.kill(SIGKILL); _ = try? senders.wait() }
        // (They send as this reads: a datagram socket's queue holds few.)
        var outcomes: [String: Int] = [:]
        for _ in 0..<200 {
            var buffer = [UInt8](repeating: 0, count: 16)
            let received = try buffer.withUnsafeMutableBytes { raw in try server.receive(into: raw, wantSender: true) }
            do {
                try server.reply(Array("no".utf8), to: try #require(received.sender))
                outcomes["answered", default: 0] += 1
            } catch let error as PatchbayError {
                outcomes[error.errno.name, default: 0] += 1
            }
        }
        // 200 searches of 256 descriptors each take well under the 3 seconds that would allow
        // 192 of them; those past a second's 64 are refused without one.
        #expect(outcomes["answered"] == nil && (outcomes["EACCES"] ?? 0) >= 32 && (outcomes["EAGAIN"] ?? 0) >= 8, "\(outcomes)")
        #expect(try senders.readLine() == "sent")
        try senders.writeLine("done")
        #expect(try senders.wait() == .exited(0))
    }

    @Test("a datagram server's answer does not follow a sender into its own namespaces: nobody bound, in a mount namespace of its own, at the path of root's socket, or root's autobound name in a network namespace of its own (sent from there, or from nobody's process here) is refused (EACCES), and root's socket gets nothing; nobody's own autobound sockets are answered, connected to the server or not",
          .enabled(if: networkNamespacesAvailable && access("/usr/bin/setpriv", X_OK) == 0, "needs root, unshare, setpriv and python3"))
    func datagramAnswersStayInTheServersNamespaces() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        var server = try Socket.open(client, type: .dgram)
        try server.bind("ns-answers", mode: 0o666)
        try server.openData()
        let serverPath = try client.localSocketPath("ns-answers")
        chmod(broker.directory, 0o755)
        chmod(broker.directory + "/net", 0o755)
        // Root's victims: a socket in a directory only root may enter, and an autobound one.
        let closed = makeTemporaryDirectory()
        defer { removeTree(closed) }
        chmod(closed, 0o700)
        let victim = try UnixSocket(.datagram)
        try victim.bind(path: closed + "/victim.sock")
        let autobound = try UnixSocket(.datagram)
        var family = sa_family_t(AF_UNIX)
        _ = withUnsafePointer(to: &family) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.bind(autobound.rawValue, $0, 2) } }
        var name = sockaddr_un()
        var length = socklen_t(MemoryLayout<sockaddr_un>.size)
        _ = withUnsafeMutablePointer(to: &name) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(autobound.rawValue, $0, &length) } }
        let abstract = withUnsafeBytes(of: &name.sun_path) { Array($0.prefix(Int(length) - 2)) }
        #expect(abstract.count == 6 && abstract[0] == 0)
        let abstractName = String(decoding: abstract.dropFirst(), as: UTF8.self)
        // nobody, in a mount namespace where a tmpfs hides root's directory, binds at the
        // victim's path; root, in a network namespace of its own, binds the autobound name
        // (`@name`: an abstract one).
        let script = """
            import socket, sys
            s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            s.bind(b"\\0" + sys.argv[2][1:].encode() if sys.argv[2].startswith("@") else sys.argv[2])
            s.sendto(b"to the victim", sys.argv[1])
            """
        let mounted = try run("/usr/bin/unshare", ["--mount", "--propagation", "private", "/bin/sh", "-c",
                                                   "mount -t tmpfs -o mode=1777 none \"$1\" && exec /usr/bin/setpriv --reuid=65534 --regid=65534 --clear-groups /usr/bin/python3 -c \"$2\" \"$3\" \"$4\"",
                                                   "sh", closed, script, serverPath, closed + "/victim.sock"])
        #expect(mounted.termination == .exited(0), "\(mounted.standardError)")
        // The sender stays until answered: one gone is refused for that alone (as this test's
        // senders all were until a later session).
        let staying = script + "\nprint('sent', flush=True)\nsys.stdin.readline()\n"
        let namespaced = try Child("/usr/bin/unshare", ["--net", "/usr/bin/python3", "-c", staying, serverPath, "@" + abstractName])
        #expect(try namespaced.readLine() == "sent")
        // The same name's socket, made in a network namespace of its own, handed to a process
        // of nobody's in the server's namespace, which sends from it: the sender's process is
        // where it should be, but the socket at its name here is root's. (nobody does all of it
        // alone in a user namespace of its own; root makes the socket here so that the test
        // needs none.)
        let handed = """
            import ctypes, os, socket, sys
            libc = ctypes.CDLL(None, use_errno=True)
            home = os.open("/proc/self/ns/net", os.O_RDONLY)
            assert libc.unshare(0x40000000) == 0
            s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            s.bind(b"\\0" + sys.argv[2].encode())
            assert libc.setns(home, 0x40000000) == 0
            os.set_inheritable(s.fileno(), True)
            os.execv("/usr/bin/setpriv", ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c",
                     "import socket, sys; socket.socket(fileno=int(sys.argv[1])).sendto(b'to the victim', sys.argv[2]); "
                     "print('sent', flush=True); sys.stdin.readline()",
                     str(s.fileno()), sys.argv[1]])
            """
        let passed = try Child("/usr/bin/python3", ["-c", handed, serverPath, abstractName])
        #expect(try passed.readLine() == "sent")
        // And nobody's own autobound sockets, here, one sending with sendto, one connected to the
        // server (as `net connect --type dgram` is): answered.
        let honest = try Child("/usr/bin/setpriv", ["--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c", """
            import socket, sys
            loose = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            loose.bind("")
            loose.sendto(b"honest", sys.argv[1])
            tied = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            tied.bind("")
            tied.connect(sys.argv[1])
            tied.send(b"honest too")
            print("sent", flush=True)
            for s in (loose, tied):
                s.settimeout(10)
                print(s.recv(64).decode(), flush=True)
            """, serverPath])
        #expect(try honest.readLine() == "sent")
        var outcomes: [String] = []
        for _ in 0..<5 {
            var buffer = [UInt8](repeating: 0, count: 64)
            let received = try buffer.withUnsafeMutableBytes { raw in try server.receive(into: raw, wantSender: true) }
            do {
                try server.reply(Array("as root".utf8), to: try #require(received.sender))
                outcomes.append("answered")
            } catch let error as PatchbayError {
                outcomes.append(error.errno.name)
            }
        }
        #expect(outcomes == ["EACCES", "EACCES", "EACCES", "answered", "answered"], "\(outcomes)")
        #expect(try honest.readLine() == "as root")
        #expect(try honest.readLine() == "as root")
        #expect(try honest.wait() == .exited(0))
        for sender in [namespaced, passed] {
            try sender.writeLine("done")
            #expect(try sender.wait() == .exited(0))
        }
        for socket in [victim.rawValue, autobound.rawValue] {
            var byte: UInt8 = 0
            #expect(recv(socket, &byte, 1, CInt(MSG_DONTWAIT)) == -1 && errno == EAGAIN)
        }
    }

}
