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
                connection with the connection as its stdin and stdout. For dgram, --echo answers \
                each datagram to its sender. Runs until interrupted.
                """)

        @Argument(help: "The local name to bind.")
        var name: String

        @Option(help: "seqpacket, stream or dgram.")
        var type: Socket.Kind = .seqpacket

        @Option(help: ArgumentHelp("Permission bits of the name's socket file, in octal (default 0666 on a system broker, 0600 on a per-user one).",
                                   valueName: "octal"))
        var mode: String?

        @Flag(help: "Send everything back.")
        var echo = false

        @Option(parsing: .remaining, help: "Run this command per connection (stdin/stdout = the connection).")
        var exec: [String] = []

        func validate() throws {
            if let mode, NetCommand.parsedMode(mode) == nil { throw ValidationError("--mode takes octal permission bits from 0 to 0777, not \"\(mode)\"") }
            guard echo != !exec.isEmpty else { throw ValidationError("give exactly one of --echo and --exec COMMAND") }
            guard !(type == .dgram && !exec.isEmpty) else { throw ValidationError("--exec needs connections; dgram has none") }
        }

        func run() throws {
            let command = "net listen"
            let broker = connectBroker(for: command)
            if type == .dgram {
                if let error = serveDatagrams(broker) { fail(command, error) }
                return
            }
            let listener = attempt(command) { () throws(PatchbayError) -> Socket in
                try Socket.listen(broker, name: name, type: type, mode: mode.flatMap(NetCommand.parsedMode))
            }
            while true {
                let connection: Socket
                do {
                    connection = try listener.accept()
                } catch {
                    if error.errno == .interrupted { continue }
                    fail(command, error)
                }
                let box = ConnectionBox(connection)
                if echo {
                    startThread { box.echo() }
                } else {
                    startThread { box.run(exec) }
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
                while true {
                    let received = try buffer.withUnsafeMutableBytes { raw in
                        Result { () throws(PatchbayError) -> Socket.Received in try socket.receive(into: raw, wantSender: true) }
                    }.get()
                    if let sender = received.sender {
                        _ = try? socket.send(Array(buffer[0..<received.count]), to: sender)
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

        @Option(help: "seqpacket, stream or dgram.")
        var type: Socket.Kind = .seqpacket

        func run() throws {
            let command = "net connect"
            let broker = connectBroker(for: command)
            let socket = attempt(command) { () throws(PatchbayError) -> Socket in
                try Socket.connect(broker, to: name, type: type)
            }
            let box = ConnectionBox(socket)
            let packets = type != .stream
            let finished = Mutex(false)
            // stdin → socket on a thread of its own; socket → stdout here.
            startThread {
                box.relayInput(packets: packets)
                finished.withLock { $0 = true }
            }
            box.relayOutput(packets: packets, datagrams: type == .dgram, inputDone: { finished.withLock { $0 } })
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

        func run() throws {
            let broker = connectBroker(for: "net addrs")
            let file = attempt("net addrs") { () throws(PatchbayError) -> Patchbay.Descriptor in try broker.openAddressList() }
            guard let text = try? file.readToEnd() else { fail("net addrs", .ioError, "cannot read /net/local/addrs") }
            writeStandardOutput(bytes: text)
        }
    }

    struct Path: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Print the AF_UNIX socket file of a local name, for programs that know nothing of Patchbay.")

        @Argument var name: String

        func run() throws {
            let broker = connectBroker(for: "net path")
            writeStandardOutput(attempt("net path") { () throws(PatchbayError) in try broker.localSocketPath(name) } + "\n")
        }
    }
}

extension Socket.Kind: ExpressibleByArgument {}

/// One connection, shared by the threads that serve it; it closes when the last of them lets go.
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

    /// Runs `command` with the connection as stdin and stdout, and waits for it.
    func run(_ command: [String]) {
        let path = command[0].contains("/") ? command[0] : (searchPath(command[0]) ?? command[0])
        let fd = socket.dataDescriptor
        guard let pid = try? spawnProcess(path: path, arguments: Array(command.dropFirst()),
                                          environment: currentEnvironment(), descriptors: [0: fd, 1: fd, 2: 2])
        else {
            writeStandardError("patchbay: net listen: ENOENT: cannot run \(command[0])\n")
            return
        }
        _ = try? waitForProcess(pid)
    }

    /// stdin → socket. Lines become packets when `packets`; at end of input, writing shuts down.
    func relayInput(packets: Bool) {
        var pending: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let count = chunk.withUnsafeMutableBytes { Glibc.read(0, $0.baseAddress, $0.count) }
            if count < 0 && errno == EINTR { continue }
            if count <= 0 { break }
            if !packets {
                if (try? socket.send(Array(chunk[0..<count]))) == nil { return }
                continue
            }
            pending += chunk[0..<count]
            while let newline = pending.firstIndex(of: UInt8(ascii: "\n")) {
                if (try? socket.send(Array(pending[..<newline]))) == nil { return }
                pending.removeSubrange(...newline)
            }
        }
        if packets && !pending.isEmpty { _ = try? socket.send(pending) }
        if socket.kind != .dgram { try? socket.shutdownWriting() }
    }

    /// socket → stdout until end of file (datagrams, which have none: until input is done and
    /// nothing more arrives for half a second).
    func relayOutput(packets: Bool, datagrams: Bool, inputDone: () -> Bool) {
        let fd = socket.dataDescriptor
        var buffer = [UInt8](repeating: 0, count: 65536)
        while true {
            if datagrams {
                var poller = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
                let done = inputDone()
                if poll(&poller, 1, done ? 500 : 100) == 0 {
                    if done { return } else { continue }
                }
            }
            let received = buffer.withUnsafeMutableBytes { raw in
                Result { () throws(PatchbayError) -> Socket.Received in try socket.receive(into: raw) }
            }
            guard case .success(let got) = received else { return }
            if got.isEndOfFile { return }
            writeStandardOutput(bytes: Array(buffer[0..<got.count]) + (packets ? [UInt8(ascii: "\n")] : []))
        }
    }
}

/// The first executable named `name` on PATH.
func searchPath(_ name: String) -> String? {
    let path = getenv("PATH").map { String(cString: $0) } ?? "/usr/bin:/bin"
    return path.split(separator: ":").map { "\($0)/\(name)" }.first { access($0, X_OK) == 0 }
}
