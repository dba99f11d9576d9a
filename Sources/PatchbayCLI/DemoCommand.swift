import ArgumentParser
import Glibc
import Patchbay
import PatchbayProtocol
import PatchbaySystem
import SystemPackage

/// `patchbay demo`: a guided tour, across real processes, of what Patchbay does today.
struct DemoCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "demo",
        abstract: "A guided tour of Patchbay across real processes, with timings.",
        discussion: "Runs its own broker on a private socket and removes everything it made when done."
    )

    func run() throws {
        do {
            try Tour().run()
        } catch let error as PatchbayError {
            fail("demo", error)
        }
    }
}

/// The tour itself; each step spawns real processes and prints what happened and how long it took.
private final class Tour {
    let executable = currentExecutablePath() ?? CommandLine.arguments[0]
    var directory = ""
    var socketPath = ""
    var brokerPID: pid_t = 0

    func run() throws {
        directory = try makeDirectory()
        defer { cleanUp() }
        socketPath = directory + "/patchbay.sock"

        heading("Patchbay \(patchbayVersion): IPC from PatchworkOS, FreeBSD and DragonFly BSD, on Linux")
        say("Every step below runs real processes; the broker only brokers, the data never passes through it.")

        // 1. The broker.
        var started = monotonicNanoseconds()
        brokerPID = try startBroker()
        step(1, "start a private broker (pid \(brokerPID)) on \(socketPath)", since: started)
        say("   (without PATCHBAY_SOCKET, the library starts the per-user broker by itself on first use)")
        let broker = try Broker(socketPath: socketPath)

        // 2. share in one process, claim in another.
        let file = directory + "/greeting.txt"
        try writeText(file, "Hello from a file nobody passed on the command line.\n")
        started = monotonicNanoseconds()
        let shared = try runChild(["share", file])
        let key = shared.output.trimmedLine
        step(2, "process \(shared.pid) opened greeting.txt, shared it and exited; key \(key)", since: started)
        started = monotonicNanoseconds()
        let claimed = try runChild(["claim", key])
        step(3, "unrelated process \(claimed.pid) claimed the key and read the file:", since: started)
        say("   > " + claimed.output.trimmedLine)
        let again = try runChild(["claim", key])
        step(4, "a second claim of the same key fails: keys are one-time", since: nil)
        say("   > " + again.error.trimmedLine)

        // 3. Any descriptor: a pipe, written by another process.
        let pipe = try Pipe()
        started = monotonicNanoseconds()
        let pipeKey = try broker.share(rawDescriptor: pipe.writeEnd.rawValue, timeout: .after(.seconds(10)))
        let writer = try runChild(["claim", pipeKey.text, "--", "/bin/sh", "-c",
                                   "echo \"a pipe end, written by pid $$ through fd $PATCHBAY_FD\" >&3"])
        let pipeReadEnd = pipe.readEnd
        pipe.writeEnd.close()
        let piped = String(decoding: try wrap { () throws(Errno) in try pipeReadEnd.readToEnd() }, as: UTF8.self)
        step(5, "this process shared a pipe's write end; process \(writer.pid) claimed it as fd 3:", since: started)
        say("   > " + piped.trimmedLine)

        // 4. Expiry.
        let expiringFile = try openFile(file, flags: O_RDONLY)
        let expiring = try broker.share(rawDescriptor: expiringFile.rawValue, timeout: .after(.milliseconds(300)))
        _ = consume expiringFile
        started = monotonicNanoseconds()
        var gone = false
        while !gone {
            usleep(50_000)
            let status = try broker.status()
            gone = status.keys == 0
        }
        step(6, "a key shared with --timeout 300ms expired by itself (broker closed the file)", since: started)
        let late = try runChild(["claim", expiring.text])
        say("   > " + late.error.trimmedLine)

        // 5. Restriction to one process.
        let restricted = try runChild(["share", "--for-pid", "\(getpid())", file]).output.trimmedLine
        let stranger = try runChild(["claim", restricted])
        step(7, "a key restricted with --for-pid \(getpid()) is invisible to process \(stranger.pid):", since: nil)
        say("   > " + stranger.error.trimmedLine)
        let mine = try broker.claim(try Key(parsing: restricted))
        say("   ...and claimable by process \(getpid()) itself (got fd \(mine.rawValue))")

        // 6. Cost of a hand-off.
        let probe = try openFile("/dev/null", flags: O_RDONLY)
        var samples: [UInt64] = []
        for _ in 0..<2000 {
            let begin = monotonicNanoseconds()
            let roundTrip = try broker.claim(try broker.share(rawDescriptor: probe.rawValue))
            samples.append(monotonicNanoseconds() - begin)
            _ = consume roundTrip
        }
        samples.sort()
        step(8, "2000 share+claim round trips through the broker: median \(formatDuration(nanoseconds: samples[samples.count / 2])), p99 \(formatDuration(nanoseconds: samples[samples.count * 99 / 100]))", since: nil)
        say("   (a debug build of the demo; `swift run -c release patchbay demo` for release figures)")

        // 7. Shared memory, anonymous: this process maps it, a child writes back through it.
        started = monotonicNanoseconds()
        let anonymous = try SharedMemory.anonymous()
        let board = try anonymous.map(length: 4096)
        let greeting = Array("hello from pid \(getpid())".utf8)
        board.withUnsafeMutableBytes { $0.copyBytes(from: greeting) }
        let boardKey = try broker.share(anonymous.descriptor)
        step(9, "an anonymous object: the first mapping fixed its size (\(try anonymous.size) bytes); shared by key",
             since: started)
        started = monotonicNanoseconds()
        let painter = try runChild(["claim", boardKey.text, "--", "/bin/sh", "-c",
                                    "head -c \(greeting.count) <&3; printf 'hello back from pid %s' $$ | dd of=/proc/self/fd/3 bs=1 seek=2048 conv=notrunc 2>/dev/null"])
        let answer = board.withUnsafeBytes { bytes in
            String(decoding: bytes[2048..<2048 + 64].prefix { $0 != 0 }, as: UTF8.self)
        }
        step(10, "process \(painter.pid) claimed it, read our bytes and wrote back; we read its bytes in place:",
             since: started)
        say("   child saw:  " + painter.output.trimmedLine)
        say("   we see:     " + answer)

        // 8. Shared memory, named: FreeBSD shm_open semantics, through the CLI and in place.
        started = monotonicNanoseconds()
        _ = try runChild(["shm", "create", "/demo/notice-board", "--size", "8k", "--mode", "0640"])
        _ = try runChildWithInput(["shm", "write", "/demo/notice-board"], input: "posted by a short-lived process")
        let named = try broker.openSharedMemory("/demo/notice-board", access: .readWrite)
        let notice = try named.map()
        let posted = notice.withUnsafeBytes { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        let reply = Array("answered in place by pid \(getpid())".utf8)
        notice.withUnsafeMutableBytes { UnsafeMutableRawBufferPointer(rebasing: $0[4096...]).copyBytes(from: reply) }
        let readBack = try runChild(["shm", "read", "/demo/notice-board", "--offset", "4k", "--length", "\(reply.count)"])
        step(11, "named object /demo/notice-board: one process wrote, we mapped and answered, another read:", since: started)
        say("   we read:    " + posted)
        say("   they read:  " + readBack.output)
        let listing = try runChild(["shm", "ls"])
        for line in listing.output.split(separator: "\n") { say("   " + line) }

        // 9. /net: a listener in another process, a connection from this one, packets both ways.
        started = monotonicNanoseconds()
        let echoServer = try spawnChild(["net", "listen", "demo-echo", "--echo"])
        while try !broker.listSockets().contains(where: { $0.name == "demo-echo" && $0.state == "LISTENING" }) {
            usleep(1_000)
        }
        step(12, "process \(echoServer) opened /net/local/seqpacket and wrote \"bind demo-echo && listen\" to its ctl",
             since: started)
        started = monotonicNanoseconds()
        let connection = try Socket.connect(broker, to: "demo-echo")
        step(13, "we opened a socket (id \(connection.id)), connected it, and got the kernel socket as its data file",
             since: started)
        for word in ["packets", "keep", "their", "boundaries"] {
            try connection.send(Array(word.utf8))
        }
        var echoes: [String] = []
        for _ in 0..<4 {
            if let packet = try connection.receive() { echoes.append(String(decoding: packet.bytes, as: UTF8.self)) }
        }
        say("   sent 4 packets, got back: " + echoes.map { "[\($0)]" }.joined(separator: " "))
        var pings: [UInt64] = []
        let ping = Array("ping".utf8)
        for _ in 0..<2000 {
            let begin = monotonicNanoseconds()
            try connection.send(ping)
            _ = try connection.receive()
            pings.append(monotonicNanoseconds() - begin)
        }
        pings.sort()
        say("   2000 echo round trips across the two processes: median \(formatDuration(nanoseconds: pings[1000])), "
            + "p99 \(formatDuration(nanoseconds: pings[1980])) (the kernel's own cost: the broker is not on the path)")
        let path = try broker.localSocketPath("demo-echo")
        say("   any program can connect too: socat - UNIX-CONNECT:\(path),type=5   (type 5: seqpacket)")
        let sockets = try runChild(["net", "ls"])
        for line in sockets.output.split(separator: "\n") { say("   " + line) }
        kill(echoServer, SIGTERM)
        _ = try wrap { () throws(Errno) in try waitForProcess(echoServer) }

        // 10. CAPS: a service in another process, requests and replies over shared memory.
        started = monotonicNanoseconds()
        // A monitor watches the broker meanwhile (what `patchbay monitor --subsystem caps` prints).
        let watcher = try BrokerMonitor(broker, filter: MonitorFilter(subsystems: MonitorFilter.bit(of: .caps)))
        let capsServer = try spawnChild(["caps", "serve", "demo.echo", "--allow", "world", "--echo"])
        let client = try CapsClient(broker, name: "demo.echo", waitForService: true)
        step(14, "process \(capsServer) registered CAPS service demo.echo; we connected (channel \(client.channelID))",
             since: started)
        let question = try client.put(Array("xyz".utf8))
        var replyBuffer = [UInt8](repeating: 0, count: 64)
        let capsReply = try replyBuffer.withUnsafeMutableBytes { raw in
            Result { () throws(PatchbayError) -> CapsReply in try client.wait(into: raw) }
        }.get()
        say("   REQUEST \(question) \"xyz\" → REPLY \(capsReply.messageID) \"\(String(decoding: replyBuffer[0..<capsReply.length], as: UTF8.self))\"; "
            + "consuming it sent DISPOSE back to the service")
        let small = Array(repeating: UInt8(ascii: "p"), count: 64)
        for _ in 0..<2000 { _ = try client.call(small) }  // warm up
        var trips: [UInt64] = []
        for _ in 0..<20000 {
            let begin = monotonicNanoseconds()
            _ = try client.call(small)
            trips.append(monotonicNanoseconds() - begin)
        }
        trips.sort()
        say("   20000 round trips of 64 bytes: median \(formatDuration(nanoseconds: trips[10000])), "
            + "p99 \(formatDuration(nanoseconds: trips[19800])) (requests and replies never touch the broker)")
        let services = try runChild(["caps", "ls"])
        for line in services.output.split(separator: "\n") { say("   " + line) }
        // The broker never saw those messages, yet it can count them: from the channel header's
        // ring words (`patchbay caps top` refreshes this every second).
        say("   patchbay monitor, beside it: the broker saw the registration and the connection, not one message:")
        while let event = try watcher.next(timeoutMilliseconds: 100) {
            say("   " + MonitorCommand.clock(event.time) + "  " + event.operation.padding(13) + "pid \(event.pid)".padding(11)
                + event.command.padding(10) + event.object.padding(11) + event.outcome)
        }
        let traffic = try runChild(["caps", "top", "--count", "1"])
        say("   patchbay caps top (the broker reads the ring words, never a message):")
        for line in traffic.output.split(separator: "\n") { say("   " + line) }
        kill(capsServer, SIGTERM)
        _ = try wrap { () throws(Errno) in try waitForProcess(capsServer) }
        // A service can show its own messages, to monitors of its uid: `caps serve --tap-payload`.
        let tappedServer = try spawnChild(["caps", "serve", "demo.tapped", "--allow", "world", "--tap-payload", "--echo"])
        let tappedClient = try CapsClient(broker, name: "demo.tapped", waitForService: true)
        _ = try tappedClient.call(Array("hello, tap".utf8))
        _ = try tappedClient.call(Array("again".utf8))
        say("   a service run with --tap-payload shows what it handles (the client's pid from the kernel, never from the service):")
        while let event = try watcher.next(timeoutMilliseconds: 100) {
            say("   " + MonitorCommand.clock(event.time) + "  " + event.operation.padding(15) + "pid \(event.pid)".padding(11)
                + event.object.padding(13) + event.detail
                + (event.payload.isEmpty ? "" : "  \"" + MonitorCommand.printable(event.payload) + "\""))
        }
        kill(tappedServer, SIGTERM)
        _ = try wrap { () throws(Errno) in try waitForProcess(tappedServer) }

        // 11. Status.
        let status = try runChild(["status"])
        step(15, "patchbay status:", since: nil)
        for line in status.output.split(separator: "\n", omittingEmptySubsequences: false) {
            say("   " + line)
        }
        started = monotonicNanoseconds()
        kill(brokerPID, SIGTERM)
        let ended = try waitForProcess(brokerPID)
        brokerPID = 0
        step(16, "stop the broker with SIGTERM: \(ended) (named objects stay in its store for the next start)",
             since: started)
        say("\nFigures against the raw Linux mechanisms, in release mode: `swift run -c release patchbay bench` (docs/BENCHMARKS.md).")
    }

    // MARK: Helpers

    struct ChildResult {
        var pid: pid_t
        var termination: Termination
        var output: String
        var error: String
    }

    func runChild(_ arguments: [String]) throws -> ChildResult {
        let stdout = try wrap { () throws(Errno) in try Pipe() }
        let stderr = try wrap { () throws(Errno) in try Pipe() }
        let pid = try wrap { () throws(Errno) in
            try spawnProcess(path: executable, arguments: arguments,
                             environment: environment(applying: ["PATCHBAY_SOCKET": socketPath]),
                             descriptors: [1: stdout.writeEnd.rawValue, 2: stderr.writeEnd.rawValue])
        }
        let outputEnd = stdout.readEnd
        let errorEnd = stderr.readEnd
        stdout.writeEnd.close()
        stderr.writeEnd.close()
        let output = try wrap { () throws(Errno) in try outputEnd.readToEnd() }
        let errors = try wrap { () throws(Errno) in try errorEnd.readToEnd() }
        let termination = try wrap { () throws(Errno) in try waitForProcess(pid) }
        return ChildResult(pid: pid, termination: termination, output: String(decoding: output, as: UTF8.self),
                           error: String(decoding: errors, as: UTF8.self))
    }

    /// Starts a child that keeps running (output discarded); returns its pid.
    func spawnChild(_ arguments: [String]) throws -> pid_t {
        let null = try wrap { () throws(Errno) in try openFile("/dev/null", flags: O_RDWR) }
        return try wrap { () throws(Errno) in
            try spawnProcess(path: executable, arguments: arguments,
                             environment: environment(applying: ["PATCHBAY_SOCKET": socketPath]),
                             descriptors: [0: null.rawValue, 1: null.rawValue, 2: null.rawValue])
        }
    }

    func runChildWithInput(_ arguments: [String], input: String) throws -> ChildResult {
        let stdin = try wrap { () throws(Errno) in try Pipe() }
        let pid = try wrap { () throws(Errno) in
            try spawnProcess(path: executable, arguments: arguments,
                             environment: environment(applying: ["PATCHBAY_SOCKET": socketPath]),
                             descriptors: [0: stdin.readEnd.rawValue])
        }
        let writer = stdin.writeEnd
        _ = consume stdin.readEnd
        try wrap { () throws(Errno) in try writer.writeAll(Array(input.utf8)) }
        _ = consume writer
        let termination = try wrap { () throws(Errno) in try waitForProcess(pid) }
        return ChildResult(pid: pid, termination: termination, output: "", error: "")
    }

    func startBroker() throws -> pid_t {
        let ready = try wrap { () throws(Errno) in try Pipe() }
        let log = try wrap { () throws(Errno) in
            try openFile(directory + "/broker.log", flags: O_WRONLY | O_CREAT | O_APPEND)
        }
        let pid = try wrap { () throws(Errno) in
            try spawnProcess(path: executable, arguments: ["daemon", "--socket", socketPath, "--shm-directory",
                                                           directory + "/shm", "--ready-fd", "3"],
                             environment: currentEnvironment(),
                             descriptors: [2: log.rawValue, 3: ready.writeEnd.rawValue])
        }
        let readyEnd = ready.readEnd
        ready.writeEnd.close()
        let answer = try wrap { () throws(Errno) in try readyEnd.readToEnd(limit: 16) }
        guard answer == Array("ready\n".utf8) else {
            throw PatchbayError(.connectionRefused, "the broker did not start; see \(directory)/broker.log")
        }
        return pid
    }

    func makeDirectory() throws -> String {
        var template = Array("/tmp/patchbay-demo-XXXXXX".utf8CString)
        guard let made = template.withUnsafeMutableBufferPointer({ mkdtemp($0.baseAddress!) }) else {
            throw PatchbayError(Errno.current, "cannot create a temporary directory")
        }
        return String(cString: made)
    }

    func writeText(_ path: String, _ text: String) throws {
        let file = try wrap { () throws(Errno) in try openFile(path, flags: O_WRONLY | O_CREAT | O_TRUNC) }
        try wrap { () throws(Errno) in try file.writeAll(Array(text.utf8)) }
    }

    func cleanUp() {
        if brokerPID > 0 {
            kill(brokerPID, SIGTERM)
            _ = try? waitForProcess(brokerPID)
        }
        if directory.hasPrefix("/tmp/patchbay-demo-"),
           let pid = try? spawnProcess(path: "/bin/rm", arguments: ["-rf", directory], environment: []) {
            _ = try? waitForProcess(pid)
        }
    }

    func wrap<T: ~Copyable>(_ body: () throws(Errno) -> T) throws(PatchbayError) -> T {
        do {
            return try body()
        } catch {
            throw PatchbayError(error, "the demo could not set up a step")
        }
    }

    func heading(_ text: String) {
        say(text)
        say(String(repeating: "=", count: min(text.count, 100)))
    }

    func step(_ number: Int, _ text: String, since start: UInt64?) {
        let timing = start.map { "  [\(formatDuration(nanoseconds: monotonicNanoseconds() - $0))]" } ?? ""
        say("\n\(number). \(text)\(timing)")
    }

    func say(_ text: some StringProtocol) {
        writeStandardOutput(String(text) + "\n")
    }
}

extension String {
    /// The first line, without surrounding spaces.
    fileprivate var trimmedLine: String {
        let line = split(separator: "\n").first.map(String.init) ?? ""
        return line.trimmingSpaces
    }

    fileprivate var trimmingSpaces: String {
        var scalars = Substring(self).unicodeScalars[...]
        while let first = scalars.first, first.properties.isWhitespace { scalars.removeFirst() }
        while let last = scalars.last, last.properties.isWhitespace { scalars.removeLast() }
        return String(String.UnicodeScalarView(scalars))
    }
}
