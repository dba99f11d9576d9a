import ArgumentParser
import Glibc
import Patchbay
import PatchbayProtocol
import PatchbaySystem
import SystemPackage
import Synchronization

/// `patchbay load`: many clients at once doing mixed control operations against a broker of its
/// own, plus one client that sends requests and never reads a reply. Reports errors by errno,
/// per-operation p50/p99, throughput, the broker's RSS, and what became of the slow client.
struct LoadCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "load",
        abstract: "Load test: many concurrent clients, mixed operations, one client that never reads (run with -c release).",
        discussion: """
            Opens CLIENTS connections to a broker started on a private socket and spreads them over \
            THREADS threads; each thread cycles through its connections, one operation each: status, \
            share + claim of a descriptor, create + unlink of a named shared memory object, open + \
            close of a /net socket. Every error is counted by errno; none is expected.
            """)

    @Option(parsing: .unconditional, help: "Client connections (with --hostile: the idle connections the hostile uid tries to hold).")
    var clients = 1000

    @Option(parsing: .unconditional, help: "How long to run, in seconds.")
    var seconds = 30.0

    @Option(parsing: .unconditional, help: "Client threads.")
    var threads = 4

    @Flag(help: "Leave out the client that never reads.")
    var noSlowClient = false

    @Flag(help: "Instead: one uid (nobody, when run as root) floods the broker with everything it can make it hold, while an honest client of another uid measures status and share + claim.")
    var hostile = false

    func validate() throws {
        guard clients > 0, threads > 0, clients >= threads else { throw ValidationError("--clients must be at least --threads, both positive") }
        guard seconds.isFinite, seconds > 0 else { throw ValidationError("--seconds must be positive") }
    }

    func run() throws {
        if hostile {
            try HostileLoad(seconds: seconds, connections: clients).run()
            return
        }
        DescriptorLimit.raiseToMaximum()
        let load = try LoadRun()
        defer { load.stop() }
        try load.run(clients: clients, seconds: seconds, threads: threads, slowClient: !noSlowClient)
    }
}

/// The operations, in the order each connection cycles through them.
enum LoadOperation: Int, CaseIterable {
    case status, shareClaim, sharedMemory, socket

    var label: String {
        switch self {
        case .status: "status"
        case .shareClaim: "share + claim"
        case .sharedMemory: "shm create + unlink"
        case .socket: "/net socket open + close"
        }
    }
}

/// What one thread saw.
final class LoadTally: @unchecked Sendable {
    var latencies: [[UInt64]] = Array(repeating: [], count: LoadOperation.allCases.count)
    var errors: [String: Int] = [:]
}

/// Broker handles moved to the thread that uses them, and used only there.
final class LoadConnections: @unchecked Sendable {
    let brokers: [Broker]
    init(_ brokers: [Broker]) { self.brokers = brokers }
}

final class LoadRun {
    let scratch: ScratchBroker
    var socketPath: String { scratch.socketPath }
    var brokerPID: pid_t { scratch.pid }

    init() throws {
        scratch = try ScratchBroker("patchbay-load", arguments: ["--log-level", "notice"])
    }

    func stop() {
        scratch.stop()
    }

    func run(clients: Int, seconds: Double, threads: Int, slowClient: Bool) throws {
        let idleRSS = Bench.residentKilobytes(brokerPID)
        var connections: [Broker] = []
        for _ in 0..<clients { connections.append(try Broker(socketPath: socketPath)) }
        let observer = try Broker(socketPath: socketPath)
        while try observer.status().clients < clients + 1 { usleep(1_000) }
        let connectedRSS = Bench.residentKilobytes(brokerPID)
        writeStandardOutput("patchbay load: \(clients) clients on \(threads) threads for \(format2(seconds)) s, "
            + "broker pid \(brokerPID), \(onlineCPUCount()) CPUs\(slowClient ? ", plus one client that never reads" : "")\n")

        let running = Atomic<Bool>(true)
        let finished = Atomic<Int>(0)
        let tallies = (0..<threads).map { _ in LoadTally() }
        let perThread = clients / threads
        let null = try openFile("/dev/null", flags: O_RDONLY)
        let nullNumber = null.rawValue
        for index in 0..<threads {
            let first = index * perThread
            let last = index == threads - 1 ? clients : first + perThread
            let mine = LoadConnections(Array(connections[first..<last]))
            let tally = tallies[index]
            startThread {
                Self.work(mine, base: first, tally: tally, file: nullNumber, running: running)
                finished.add(1, ordering: .releasing)
            }
        }
        connections.removeAll()

        let slow = slowClient ? try SlowClient(socketPath: socketPath) : nil
        let start = monotonicNanoseconds()
        let end = start + UInt64(seconds * 1e9)
        var peakRSS = connectedRSS
        // On a terminal, how far the run is, on one line rewritten in place (never into a pipe).
        let showsProgress = isatty(STDOUT_FILENO) == 1 && isatty(STDERR_FILENO) == 1
        var shownSecond = -1
        while monotonicNanoseconds() < end {
            slow?.push()
            peakRSS = max(peakRSS, Bench.residentKilobytes(brokerPID))
            let second = Int((monotonicNanoseconds() - start) / 1_000_000_000)
            if showsProgress && second != shownSecond {
                shownSecond = second
                writeStandardError("\r\u{1B}[K[load] \(second) of \(Int(seconds.rounded(.up))) s, broker RSS \(peakRSS) KiB peak")
            }
            usleep(slow?.disconnected == false ? 1_000 : 50_000)
        }
        if showsProgress { writeStandardError("\r\u{1B}[K") }
        running.store(false, ordering: .relaxed)
        while finished.load(ordering: .acquiring) < threads { usleep(1_000) }
        let elapsed = Double(monotonicNanoseconds() - start) / 1e9
        _ = consume null

        var errors: [String: Int] = [:]
        var total = 0
        writeStandardOutput("\n" + "operation".padding(32) + "count".leftPadding(10) + "p50".leftPadding(10) + "p99".leftPadding(10)
            + "max".leftPadding(10) + "\n")
        for operation in LoadOperation.allCases {
            let samples = Samples(tallies.flatMap { $0.latencies[operation.rawValue] })
            total += samples.values.count
            writeStandardOutput(operation.label.padding(32) + "\(samples.values.count)".leftPadding(10)
                + formatNanoseconds(samples.median).leftPadding(10) + formatNanoseconds(samples.p99).leftPadding(10)
                + formatNanoseconds(samples.values.last ?? 0).leftPadding(10) + "\n")
        }
        for tally in tallies { errors.merge(tally.errors, uniquingKeysWith: +) }
        writeStandardOutput("\n\(total) operations in \(format2(elapsed)) s: \(formatRate(UInt64(Double(total) / elapsed))) ops/s\n")
        writeStandardOutput("errors: " + (errors.isEmpty ? "none" : errors.sorted { $0.key < $1.key }.map { "\($0.key) ×\($0.value)" }.joined(separator: ", ")) + "\n")
        writeStandardOutput("broker RSS: \(idleRSS) KiB idle, \(connectedRSS) KiB with \(clients) clients connected, \(peakRSS) KiB peak under load, "
            + "\(Bench.residentKilobytes(brokerPID)) KiB at the end\n")
        if let slow {
            writeStandardOutput("slow client: sent \(slow.sent) requests and read none; "
                + (slow.disconnected
                    ? "the broker disconnected it (\(slow.ending))"
                    : "the broker stopped reading it once its replies filled the queue, so its requests wait in its own socket buffer (back-pressure; it is disconnected only after leaving them unread for 30 s)")
                + "\n")
        }
        // The clients' hang-ups reach the broker as events it may not have handled yet when the
        // observer asks: wait (bounded) until only the observer and the slow client remain.
        let remaining = slow == nil ? 1 : 2
        var after = try observer.status()
        let settleDeadline = monotonicNanoseconds() + 5_000_000_000
        while after.clients > remaining, monotonicNanoseconds() < settleDeadline {
            usleep(5_000)
            after = try observer.status()
        }
        writeStandardOutput("broker after the run: \(after.clients) clients, \(after.keys) keys outstanding\n")
        if !errors.isEmpty { throw ExitCode(1) }
    }

    /// One thread's loop: each of its connections does the next operation in turn.
    static func work(_ connections: LoadConnections, base: Int, tally: LoadTally, file: CInt, running: borrowing Atomic<Bool>) {
        var round = 0
        while running.load(ordering: .relaxed) {
            for (offset, broker) in connections.brokers.enumerated() {
                let operation = LoadOperation(rawValue: (round + offset) % LoadOperation.allCases.count)!
                let begin = monotonicNanoseconds()
                do {
                    switch operation {
                    case .status:
                        _ = try broker.status()
                    case .shareClaim:
                        _ = try broker.claim(try broker.share(rawDescriptor: file))
                    case .sharedMemory:
                        let name = "/load-\(base + offset)"
                        _ = try broker.openSharedMemory(name, options: [.create, .exclusive])
                        try broker.unlinkSharedMemory(name)
                    case .socket:
                        _ = try Socket.open(broker, type: .seqpacket)
                    }
                    tally.latencies[operation.rawValue].append(monotonicNanoseconds() - begin)
                } catch {
                    tally.errors["\(operation.label): \(error.errno.name)", default: 0] += 1
                }
                if !running.load(ordering: .relaxed) { break }
            }
            round += 1
        }
    }
}

/// A connection that sends status requests as fast as the socket takes them and never reads.
final class SlowClient {
    let socket: SeqpacketSocket
    var sent = 0
    var disconnected = false
    var ending = "its socket buffer full"

    init(socketPath: String) throws {
        socket = try SeqpacketSocket()
        try socket.connect(path: socketPath)
    }

    func push() {
        guard !disconnected else { return }
        while true {
            do {
                try socket.send(Request.status.encode(requestID: UInt64(sent + 1)), nonblocking: true)
                sent += 1
            } catch {
                if error == .resourceTemporarilyUnavailable { return }
                disconnected = true
                ending = "send: \(error.name)"
                return
            }
        }
    }
}

extension String {
    func leftPadding(_ width: Int) -> String { count >= width ? self : String(repeating: " ", count: width - count) + self }
}
