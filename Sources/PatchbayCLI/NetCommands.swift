import ArgumentParser
import Glibc
import Patchbay
import PatchbaySystem
import SystemPackage
import Synchronization

/// `patchbay net ...`: sockets through /net.
struct NetCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "net",
        abstract: "Sockets through /net: listen, connect, list, and where a name lives.",
        subcommands: [Listen.self, Connect.self, List.self, Addresses.self, Path.self]
    )

    struct Listen: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Bind NAME, listen, and serve every connection.",
            discussion: """
                --echo sends every packet (or byte chunk) back; --exec runs COMMAND for each \
                connection with the connection as its stdin and stdout, and its peer as the kernel \
                recorded it at connect(2) in PATCHBAY_NET_PEER_PID, PATCHBAY_NET_PEER_UID and \
                PATCHBAY_NET_PEER_GID. For dgram, --echo answers \
                each datagram to its sender. Runs until interrupted.
                """)

        @Argument(help: "The local name to bind.")
        var name: String

        @Option(parsing: .unconditional, help: "seqpacket, stream or dgram.")
        var type: Socket.Kind = .seqpacket

        @Option(parsing: .unconditional, help: ArgumentHelp("Permission bits of the name's socket file, in octal (default 0666 on a system broker, 0600 on a per-user one).",
                                   valueName: "octal"))
        var mode: String?

        @Flag(help: "Send everything back.")
        var echo = false

        @Option(parsing: .unconditional, help: "Connections served at once; more wait in the backlog until one ends. Lowered to what the descriptor limit allows (two descriptors a connection, three with --exec), saying so.")
        var maxConnections = 1024

        @Option(parsing: .unconditional, help: "The listen backlog: connections the kernel queues before connect fails with EAGAIN (the kernel caps it at net.core.somaxconn).")
        var backlog = 4096

        @Option(parsing: .unconditional, help: "Connections served at once from one uid other than this server's (default: a quarter of --max-connections, as lowered); more from it are closed at once.")
        var maxConnectionsPerUid: Int?

        @Option(parsing: .remaining, help: "Run this command per connection (stdin/stdout = the connection).")
        var exec: [String] = []

        func validate() throws {
            guard maxConnections > 0 else { throw ValidationError("--max-connections must be positive") }
            guard backlog > 0 else { throw ValidationError("--backlog must be positive") }
            if let maxConnectionsPerUid, maxConnectionsPerUid <= 0 { throw ValidationError("--max-connections-per-uid must be positive") }
            if let mode, NetCommand.parsedMode(mode) == nil { throw ValidationError("--mode takes octal permission bits from 0 to 0777, not \"\(mode)\"") }
            guard echo != !exec.isEmpty else { throw ValidationError("give exactly one of --echo and --exec COMMAND") }
            guard !(type == .dgram && !exec.isEmpty) else { throw ValidationError("--exec needs connections; dgram has none") }
        }

        func run() throws {
            let command = "net listen"
            // A program that cannot run is found now, not at the first connection.
            let program = exec.first.map { resolveProgram($0, for: command) }
            // A peer that goes away while a reply is written must not kill the listener.
            signal(SIGPIPE, SIG_IGN)
            // The programs are started by a process started now, before any connection is taken
            // (ExecStarter says why).
            let starter = program.map { startExecStarter($0, arguments: Array(exec.dropFirst()), for: command) }
            // A server outlives broker restarts: it binds its name again when the broker is back.
            let broker = connectBroker(for: command, reconnect: .forever)
            if type == .dgram {
                if let error = serveDatagrams(broker) { fail(command, error) }
                return
            }
            // Each connection holds two descriptors here (three with --exec, with its program's
            // pipe): the soft limit, often 1024, would be reached by one user's few hundred
            // connections. Past what the table holds, connections are lost at accept whoever
            // makes them, so the bound comes from it too, and the share of one uid from that
            // bound: one uid's connections can then never take every descriptor (the sixteenth
            // attack round locked root out of a listener limited to 40 with 16 connections).
            let limit = raiseDescriptorLimit()
            let room = max((limit - 32) / (exec.isEmpty ? 2 : 3), 1)
            let total = min(maxConnections, room)
            if total < maxConnections {
                writeStandardError("patchbay: net listen: serving at most \(total) connections at once, not \(maxConnections): this process may open \(limit) descriptors\n")
            }
            let slots = ConnectionSlots(total: total, perUID: maxConnectionsPerUid ?? max(total / 4, 1))
            let listener = attempt(command) { () throws(PatchbayError) -> Socket in
                try Socket.listen(broker, name: name, type: type, backlog: backlog, mode: mode.flatMap(NetCommand.parsedMode))
            }
            var reconnections = broker.reconnections
            var refused = 0
            var lost = 0
            var reserve = DescriptorReserve()
            reserve.take()
            while true {
                // Full: the next connection waits in the backlog until one ends.
                slots.waitForRoom()
                let connection: Socket
                do {
                    connection = try listener.accept()
                } catch {
                    if error.errno == .interrupted { continue }
                    // No room for the connection's descriptors: it stays queued (the library
                    // checks before taking it), where its client would wait unanswered. It is
                    // taken with the two descriptors kept for this and closed at once, so its
                    // client reads end of file; the server goes on, and takes the next once a
                    // connection ends, or in 100 ms.
                    if error.errno == .tooManyOpenFiles || error.errno == .tooManyOpenFilesInSystem {
                        lost += 1
                        reserve.release()
                        _ = try? listener.accept(nonblocking: true)
                        reserve.take()
                        if lost == 1 || lost % 100 == 0 {
                            writeStandardError("patchbay: net listen: \(lost) connection(s) closed unserved so far: \(error.reason); serving the \(slots.count) open ones\n")
                        }
                        slots.waitForRelease(nanoseconds: 100_000_000)
                        continue
                    }
                    fail(command, error)
                }
                if broker.reconnections != reconnections {
                    reconnections = broker.reconnections
                    writeStandardError("patchbay: net listen: the broker restarted; \(name) is listening again (socket \(listener.id))\n")
                }
                // Who connected, as the kernel recorded it at connect.
                let uid = (try? UnixSocket.peerCredentials(of: connection.dataDescriptor).uid) ?? UInt32.max
                guard slots.take(for: uid) else {
                    refused += 1
                    if refused == 1 || refused % 1000 == 0 {
                        writeStandardError("patchbay: net listen: uid \(uid) already has \(slots.perUID) connections served, its most (--max-connections-per-uid): its new ones are closed (\(refused) so far, all uids)\n")
                    }
                    continue
                }
                let box = ConnectionBox(connection)
                if echo {
                    startThread { box.echo(); slots.release(for: uid) }
                } else if let starter {
                    startThread { box.run(starter); slots.release(for: uid) }
                }
            }
        }

        /// Binds a datagram socket and answers every datagram to its sender; returns only on error.
        private func serveDatagrams(_ broker: Broker) -> PatchbayError? {
            do {
                var socket = try Socket.open(broker, type: .dgram)
                if let mode = mode.flatMap(NetCommand.parsedMode) { try socket.bind(name, mode: mode) } else { try socket.bind(name) }
                try socket.openData()
                var buffer = [UInt8](repeating: 0, count: 65536)
                var id = socket.id
                while true {
                    // (A broker that goes away and comes back takes the socket back by itself
                    // while this waits: Socket.receive.)
                    let received = try buffer.withUnsafeMutableBytes { raw in
                        Result { () throws(PatchbayError) -> Socket.Received in try socket.receive(into: raw, wantSender: true) }
                    }.get()
                    if socket.id != id {
                        id = socket.id
                        writeStandardError("patchbay: net listen: the broker restarted; \(name) is bound again (socket \(id))\n")
                    }
                    if let sender = received.sender {
                        // Never waiting for a sender that does not read, and never through a link
                        // the sender may have pointed elsewhere since (`reply`).
                        _ = try? socket.reply(Array(buffer[0..<received.count]), to: sender)
                    }
                }
            } catch {
                return error
            }
        }
    }

    /// Octal permission bits, 0 to 0777.
    static func parsedMode(_ text: String) -> UInt32? {
        guard (1...4).contains(text.utf8.count), text.utf8.allSatisfy({ $0 >= 0x30 && $0 <= 0x37 }),
              let value = UInt32(text, radix: 8), value <= 0o777 else { return nil }
        return value
    }

    struct Connect: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Connect to NAME and relay stdin to it and it to stdout.",
            discussion: "For seqpacket and dgram, each input line is one packet and each packet is printed as one line.")

        @Argument(help: "The local name to connect to.")
        var name: String

        @Option(parsing: .unconditional, help: "seqpacket, stream or dgram (default: the type of the socket bound to NAME).")
        var type: Socket.Kind?

        func run() throws {
            let command = "net connect"
            let broker = connectBroker(for: command)
            let socket = attempt(command) { () throws(PatchbayError) -> Socket in
                if let type { return try Socket.connect(broker, to: name, type: type) }
                // The listener's type, found by trying: the kernel says EPROTOTYPE for a wrong one.
                for kind in [Socket.Kind.seqpacket, .stream, .dgram] {
                    do throws(PatchbayError) {
                        return try Socket.connect(broker, to: name, type: kind)
                    } catch {
                        if error.errno != .protocolWrongTypeForSocket || kind == .dgram { throw error }
                    }
                }
                preconditionFailure("unreachable: the last kind rethrows")
            }
            let kind = socket.kind
            let box = ConnectionBox(socket)
            let packets = kind != .stream
            let finished = Mutex(false)
            let inputFailure = Mutex<PatchbayError?>(nil)
            // stdin → socket on a thread of its own; socket → stdout here.
            startThread {
                if let error = box.relayInput(packets: packets, done: { finished.withLock { $0 = true } }) {
                    inputFailure.withLock { $0 = error }
                }
            }
            let outcome = box.relayOutput(packets: packets, datagrams: kind == .dgram, inputDone: { finished.withLock { $0 } })
            // The connection ending before the input did is a failure: the peer went away.
            switch outcome {
            case .failed(let error):
                fail(command, error.errno, "the connection failed: \(error.reason)")
            case .endOfFile where !finished.withLock({ $0 }):
                fail(command, .connectionReset, "\(name) closed the connection before all input was sent")
            case .endOfFile, .quiet:
                break
            }
            if let error = inputFailure.withLock({ $0 }) { fail(command, error.errno, "sending failed: \(error.reason)") }
        }
    }

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "ls", abstract: "List sockets.")

        @Flag(help: "Print JSON.")
        var json = false

        func run() throws {
            let broker = connectBroker(for: "net ls")
            let sockets = attempt("net ls") { () throws(PatchbayError) in try broker.listSockets() }
            if json {
                writeStandardOutput(JSON.array(sockets.map { socket in
                    JSON.object([
                        ("id", "\(socket.id)"), ("family", JSON.string(socket.family)), ("type", JSON.string(socket.type)),
                        ("state", JSON.string(socket.state)), ("name", JSON.string(socket.name)),
                        ("owner_pid", "\(socket.ownerPID)"), ("owner_uid", "\(socket.ownerUID)"),
                    ])
                }) + "\n")
                return
            }
            var out = "ID      FAMILY  TYPE       STATE       OWNER   NAME\n"
            for socket in sockets {
                out += "\(socket.id)".padding(8) + socket.family.padding(8) + socket.type.padding(11)
                    + socket.state.padding(12) + "\(socket.ownerPID)".padding(8) + socket.name + "\n"
            }
            writeStandardOutput(out)
        }
    }

    struct Addresses: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "addrs", abstract: "List bound local names (/net/local/addrs).")

        @Flag(help: "Print JSON.")
        var json = false

        func run() throws {
            let broker = connectBroker(for: "net addrs")
            let file = attempt("net addrs") { () throws(PatchbayError) -> Patchbay.Descriptor in try broker.openAddressList() }
            guard let text = try? file.readToEnd() else { fail("net addrs", .ioError, "cannot read /net/local/addrs") }
            if json {
                let names = String(decoding: text, as: UTF8.self).split(separator: "\n").map { JSON.string(String($0)) }
                writeStandardOutput(JSON.array(names) + "\n")
                return
            }
            writeStandardOutput(bytes: text)
        }
    }

    struct Path: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Print the AF_UNIX socket file of a local name, for programs that know nothing of Patchbay.")

        @Argument var name: String

        @Flag(help: "Print the path even when nothing is bound to NAME.")
        var unbound = false

        func run() throws {
            let broker = connectBroker(for: "net path")
            let path = attempt("net path") { () throws(PatchbayError) in try broker.localSocketPath(name) }
            if !unbound && isSocketFile(atPath: path) != true {
                fail("net path", .noSuchFileOrDirectory, "nothing is bound to \(name) (--unbound prints its path all the same)")
            }
            writeStandardOutput(path + "\n")
        }
    }
}

extension Socket.Kind: ExpressibleByArgument {}

/// One connection, shared by the threads that serve it; it closes when the last of them lets go.
/// The connections a `net listen` server serves: at most `total` at once, and at most `perUID`
/// from any one uid other than the server's own, so one user cannot take every slot (nor make the
/// server run that many programs for it). The acceptor sleeps on a futex word while full; each
/// connection that ends moves the word and wakes it.
final class ConnectionSlots: @unchecked Sendable {
    let total: Int
    let perUID: Int
    private let ownUID = getuid()
    private let state = Mutex<(open: Int, byUID: [UInt32: Int])>((0, [:]))
    private let released = UnsafeMutablePointer<UInt32>.allocate(capacity: 1)

    init(total: Int, perUID: Int) {
        self.total = total
        self.perUID = perUID
        released.initialize(to: 0)
    }

    deinit { released.deallocate() }

    var count: Int { state.withLock { $0.open } }

    /// Returns once fewer than `total` connections are open.
    func waitForRoom() {
        while true {
            let seen = SharedWord.load(released)
            if state.withLock({ $0.open < total }) { return }
            try? Futex.wait(released, expected: seen)
        }
    }

    /// Returns once a connection ends, or after `nanoseconds`.
    func waitForRelease(nanoseconds: Int64) {
        try? Futex.wait(released, expected: SharedWord.load(released), timeoutNanoseconds: nanoseconds)
    }

    /// Takes a slot for a connection from `uid`, unless that uid already holds its share.
    func take(for uid: UInt32) -> Bool {
        state.withLock { state in
            if uid != ownUID && state.byUID[uid, default: 0] >= perUID { return false }
            state.open += 1
            state.byUID[uid, default: 0] += 1
            return true
        }
    }

    func release(for uid: UInt32) {
        state.withLock { state in
            state.open -= 1
            let left = state.byUID[uid, default: 1] - 1
            state.byUID[uid] = left > 0 ? left : nil
        }
        _ = SharedWord.increment(released)
        Futex.wake(released)
    }
}

/// Raises the soft limit on open descriptors to the hard one (a server's connections each hold
/// some; the soft limit is often 1024 for select()'s sake, which nothing here uses).
@discardableResult
func raiseDescriptorLimit() -> Int {
    var limit = rlimit()
    guard getrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &limit) == 0 else { return 1024 }
    if limit.rlim_cur < limit.rlim_max {
        let soft = limit.rlim_cur
        limit.rlim_cur = limit.rlim_max
        if setrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &limit) != 0 { limit.rlim_cur = soft }
    }
    return Int(min(limit.rlim_cur, 1 << 30))
}

final class ConnectionBox: @unchecked Sendable {
    let socket: Socket

    init(_ socket: consuming Socket) {
        self.socket = socket
    }

    /// Sends every packet (or chunk) back until the peer shuts down.
    func echo() {
        var buffer = [UInt8](repeating: 0, count: 65536)
        while true {
            let received = buffer.withUnsafeMutableBytes { raw in
                Result { () throws(PatchbayError) -> Socket.Received in try socket.receive(into: raw) }
            }
            guard case .success(let got) = received else { return }
            if got.isEndOfFile { return }
            let sent = buffer[0..<got.count].withUnsafeBytes { raw in
                Result { () throws(PatchbayError) -> Int in try socket.send(raw) }
            }
            if case .failure = sent { return }
        }
    }

    /// Runs the starter's program with the connection as stdin and stdout, and waits for it; a
    /// program that fails is logged.
    func run(_ starter: ExecStarter) {
        let fd = socket.dataDescriptor
        // The peer as the kernel recorded it at connect(2), for the program's environment.
        let peer = (try? UnixSocket.peerCredentials(of: fd)).map { ProgramPeer(pid: $0.pid, uid: $0.uid, euid: $0.uid, gid: $0.gid) }
        // Without its starter the listener can serve nothing again: it stops, failing.
        guard let tag = starter.start(stdin: fd, stdout: fd, peer: peer) else {
            fail("net listen", .ioError, "the process that runs \(starter.program) is gone; no connection can be served any more")
        }
        switch starter.wait(tag) {
        case .success(let termination) where termination != .exited(0):
            writeStandardError("patchbay: net listen: \(starter.program) \(termination) for a connection\n")
        case .success:
            break
        case .failure(let failure):
            if starter.isGone { fail("net listen", .ioError, failure.reason) }
            writeStandardError("patchbay: net listen: \(failure.reason)\n")
        }
    }

    /// stdin → socket. Lines become packets when `packets`; at end of input, `done` is called and
    /// writing shuts down. Returns the error that stopped it early, if any.
    func relayInput(packets: Bool, done: () -> Void) -> PatchbayError? {
        var pending: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let count = chunk.withUnsafeMutableBytes { Glibc.read(0, $0.baseAddress, $0.count) }
            if count < 0 && errno == EINTR { continue }
            // A read error is not the end of the input: the command fails at once (the peer
            // would otherwise wait for the rest, and `net connect` with it).
            if count < 0 { fail("net connect", Errno.current, "reading stdin failed") }
            if count == 0 { break }
            do throws(PatchbayError) {
                if !packets {
                    try socket.send(Array(chunk[0..<count]))
                    continue
                }
                pending += chunk[0..<count]
                while let newline = pending.firstIndex(of: UInt8(ascii: "\n")) {
                    try socket.send(Array(pending[..<newline]))
                    pending.removeSubrange(...newline)
                }
            } catch {
                return error
            }
        }
        if packets && !pending.isEmpty {
            do { try socket.send(pending) } catch { return error }
        }
        done()
        if socket.kind != .dgram { try? socket.shutdownWriting() }
        return nil
    }

    /// How the output side of a relay ended.
    enum OutputEnd {
        /// The peer shut down (stream, seqpacket).
        case endOfFile
        /// Datagrams: the input was done and nothing more arrived for half a second.
        case quiet
        case failed(PatchbayError)
    }

    /// socket → stdout until end of file (datagrams, which have none: until input is done and
    /// nothing more arrives for half a second).
    func relayOutput(packets: Bool, datagrams: Bool, inputDone: () -> Bool) -> OutputEnd {
        let fd = socket.dataDescriptor
        var buffer = [UInt8](repeating: 0, count: 65536)
        while true {
            if datagrams {
                var poller = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
                let done = inputDone()
                if poll(&poller, 1, done ? 500 : 100) == 0 {
                    if done { return .quiet } else { continue }
                }
            }
            let received = buffer.withUnsafeMutableBytes { raw in
                Result { () throws(PatchbayError) -> Socket.Received in try socket.receive(into: raw) }
            }
            let got: Socket.Received
            switch received {
            case .success(let value): got = value
            case .failure(let error): return .failed(error)
            }
            if got.isEndOfFile { return .endOfFile }
            writeStandardOutput(bytes: Array(buffer[0..<got.count]) + (packets ? [UInt8(ascii: "\n")] : []))
        }
    }
}

/// The first executable named `name` on PATH.
func searchPath(_ name: String) -> String? {
    let path = getenv("PATH").map { String(cString: $0) } ?? "/usr/bin:/bin"
    return path.split(separator: ":").map { "\($0)/\(name)" }.first { access($0, X_OK) == 0 }
}

/// Two descriptors a server keeps in hand to take a connection it has no room for, only to close
/// it (the connection's handle and kernel socket need two).
struct DescriptorReserve {
    private var held: [CInt] = []

    mutating func take() {
        while held.count < 2 {
            let fd = open("/dev/null", O_RDONLY | O_CLOEXEC)
            guard fd >= 0 else { return }
            held.append(fd)
        }
    }

    mutating func release() {
        for fd in held { close(fd) }
        held = []
    }
}
