import ArgumentParser
import Glibc
import Patchbay
import PatchbayProtocol
import PatchbaySystem
import SystemPackage

/// `patchbay bench`: every Patchbay primitive against the raw Linux mechanism, measured in the
/// same run, on the same CPUs, with peers in processes of their own.
struct BenchCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench",
        abstract: "Measure Patchbay against the raw Linux mechanisms, side by side (run with -c release).",
        discussion: "Starts its own broker on a private socket and its own peer processes, pinned to CPUs.")

    enum Suite: String, ExpressibleByArgument, CaseIterable {
        case keys, shm, net, caps, broker
    }

    @Option(name: .customLong("suite"), parsing: .unconditionalSingleValue, help: "keys, shm, net, caps, broker (repeatable; default: all).")
    var suites: [Suite] = []

    @Flag(help: "Fewer iterations: finishes in under a minute.")
    var quick = false

    @Flag(help: "Print JSON rows instead of the table.")
    var json = false

    @Option(parsing: .unconditional, help: ArgumentHelp("Also draw the run as an SVG chart in this file.", valueName: "file"))
    var svg: String?

    func run() throws {
        let bench = try Bench(quick: quick, json: json)
        defer { bench.stop() }
        let chosen = suites.isEmpty ? Suite.allCases : suites
        for (index, suite) in chosen.enumerated() {
            bench.stage = "\(suite.rawValue), suite \(index + 1) of \(chosen.count)"
            bench.progress("starting")
            switch suite {
            case .caps: try bench.caps()
            case .keys: try bench.keys()
            case .shm: try bench.sharedMemory()
            case .net: try bench.net()
            case .broker: try bench.broker()
            }
        }
        bench.clearProgress()
        bench.report()
        if let svg {
            let title = "Patchbay \(patchbayVersion) benchmark\(quick ? " (quick)" : ""), \(bench.cpuCount) CPUs, "
                + "load average \(format2(bench.loadBefore))"
            let bytes = Array(BenchChart.svg(rows: bench.rows, title: title).utf8)
            do {
                let file = try openFile(svg, flags: O_WRONLY | O_CREAT | O_TRUNC, mode: 0o644)
                try file.writeAll(bytes)
            } catch {
                throw PatchbayError(error, "cannot write the chart to \(svg)")
            }
        }
    }
}

/// One line of the report.
struct BenchRow {
    var name: String
    var samples: Samples
    var baseline: String
    var baselineSamples: Samples?
    /// The target, as text, and whether it is met.
    var target: String
    var met: Bool?
    /// For throughput rows, the figure is operations per second instead of a latency.
    var unit: String = "ns"
    var ratioOverride: Double?
    /// For rows measured in rounds alternating with their baseline: the ratio of medians of each
    /// round (`ratio` is then their median).
    var roundRatios: [Double] = []

    var ratio: Double? {
        if let ratioOverride { return ratioOverride }
        if !roundRatios.isEmpty { return roundRatios.sorted()[roundRatios.count / 2] }
        guard let baseline = baselineSamples, baseline.median > 0 else { return nil }
        return Double(samples.median) / Double(baseline.median)
    }
}

struct Samples {
    var values: [UInt64]

    init(_ values: [UInt64]) { self.values = values.sorted() }

    var median: UInt64 { values.isEmpty ? 0 : values[values.count / 2] }
    var p99: UInt64 { values.isEmpty ? 0 : values[min(values.count - 1, values.count * 99 / 100)] }

    /// Each sample divided by `count`: the time per message of a batch.
    func perMessage(_ count: Int) -> Samples { Samples(values.map { $0 / UInt64(max(count, 1)) }) }
}

final class Bench {
    let quick: Bool
    let json: Bool
    let executable = currentExecutablePath() ?? CommandLine.arguments[0]
    let scratch: ScratchBroker
    var socketPath: String { scratch.socketPath }
    var brokerPID: pid_t { scratch.pid }
    var rows: [BenchRow] = []
    var notes: [String] = []
    let loadBefore: Double
    let cpuCount = onlineCPUCount()
    let clientCPU: Int32 = 0
    let peerCPU: Int32

    init(quick: Bool, json: Bool) throws {
        self.quick = quick
        self.json = json
        peerCPU = onlineCPUCount() > 1 ? 1 : 0
        loadBefore = Bench.loadAverage()
        // Pinned first: the broker inherits the client's CPU.
        try? pinToCPU(clientCPU)
        scratch = try ScratchBroker("patchbay-bench", arguments: ["--max-keys-per-uid", "1000000", "--log-level", "warning"])
        setenv("PATCHBAY_SOCKET", socketPath, 1)
        if !json {
            writeStandardOutput("Patchbay \(patchbayVersion) benchmark\(quick ? " (quick)" : ""): this process on CPU \(clientCPU), "
                + "peers on CPU \(peerCPU), \(cpuCount) CPUs online, load average \(String(format2(loadBefore)))\n")
            if cpuCount < 2 { writeStandardOutput("warning: one CPU only; cross-CPU figures are same-CPU figures here\n") }
        }
    }

    func iterations(_ full: Int) -> Int { quick ? max(full / 10, 200) : full }

    // MARK: Peers and the broker

    final class Peer {
        let pid: pid_t
        private let input: PatchbaySystem.Descriptor
        init(pid: pid_t, input: consuming PatchbaySystem.Descriptor) {
            self.pid = pid
            self.input = input
        }
        func stop() {
            kill(pid, SIGKILL)
            _ = try? waitForProcess(pid)
        }
    }

    /// Starts `bench-peer ROLE` pinned to the peer CPU, with `descriptors` as its fds 3, 4, ...
    func peer(_ role: String, _ arguments: [String] = [], descriptors: [CInt] = []) throws -> Peer {
        let stdout = try Pipe()
        let stdin = try Pipe()
        var map: [CInt: CInt] = [0: stdin.readEnd.rawValue, 1: stdout.writeEnd.rawValue, 2: 2]
        for (index, fd) in descriptors.enumerated() { map[CInt(3 + index)] = fd }
        let pid = try spawnProcess(path: executable, arguments: ["bench-peer", role, "--cpu", "\(peerCPU)"] + arguments,
                                   environment: currentEnvironment(), descriptors: map)
        let reader = stdout.readEnd
        let writer = stdin.writeEnd
        stdout.writeEnd.close()
        _ = consume stdin.readEnd
        var line: [UInt8] = []
        var byte: UInt8 = 0
        while byte != UInt8(ascii: "\n") {
            let n = Glibc.read(reader.rawValue, &byte, 1)
            if n <= 0 { throw PatchbayError(.connectionRefused, "the \(role) peer did not start") }
            line.append(byte)
        }
        return Peer(pid: pid, input: writer)
    }

    func stop() {
        scratch.stop()
    }

    /// Times `body` `count` times after `warmup` untimed runs (with `group` above 1, `warmup` untimed
    /// groups), or with `group` above 1, in `count` groups of `group` back-to-back runs, each sample a group's time divided by `group`: a clock
    /// read (about 22 ns here, more than a cache line's crossing) then weighs on a sample `group`
    /// times less, and nothing but the operation itself runs between one run and the next.
    func measure(_ count: Int, warmup: Int? = nil, grouping group: Int = 1, _ body: () throws -> Void) rethrows -> Samples {
        for _ in 0..<(warmup ?? max(count / 10, 50)) * group { try body() }
        var values = [UInt64](repeating: 0, count: count)
        for index in 0..<count {
            let start = monotonicNanoseconds()
            for _ in 0..<group { try body() }
            values[index] = (monotonicNanoseconds() - start) / UInt64(group)
        }
        return Samples(values)
    }

    /// Rounds of a paired measurement: 3 quick, 7 full.
    var rounds: Int { quick ? 3 : 7 }

    /// Measures `subject` and `baseline` back to back, `rounds` times alternating, `count`
    /// iterations in all for each: where the two vCPUs land on the host changes during a run, and
    /// a ratio is only honest between figures taken under the same placement. Returns all samples
    /// of each and the ratio of medians of every round.
    func paired(count: Int, baseline: (Int) throws -> Samples, subject: (Int) throws -> Samples) rethrows
        -> (subject: Samples, baseline: Samples, ratios: [Double])
    {
        var subjectValues: [UInt64] = []
        var baselineValues: [UInt64] = []
        var ratios: [Double] = []
        let each = max(count / rounds, 100)
        for round in 0..<rounds {
            progress("round \(round + 1) of \(rounds)")
            let base = try baseline(each)
            let measured = try subject(each)
            baselineValues += base.values
            subjectValues += measured.values
            if base.median > 0 { ratios.append(Double(measured.median) / Double(base.median)) }
        }
        return (Samples(subjectValues), Samples(baselineValues), ratios)
    }

    /// Adds a row measured with `paired`: its ratio is the median of the rounds' ratios, and its
    /// target is met when that is at most `limit`.
    func addPaired(_ name: String, _ pairs: (subject: Samples, baseline: Samples, ratios: [Double]), baseline: String,
                   target: String, limit: Double) {
        var row = BenchRow(name: name, samples: pairs.subject, baseline: baseline, baselineSamples: pairs.baseline,
                           target: target, met: nil)
        row.roundRatios = pairs.ratios
        row.met = (row.ratio ?? .infinity) <= limit
        add(row)
    }

    func add(_ row: BenchRow) {
        rows.append(row)
        clearProgress()
        if !json { writeStandardOutput(Bench.format(row)) }
        progress("\(rows.count) rows measured")
    }

    // MARK: Progress

    /// Progress goes to a terminal only: never into a pipe, a file or JSON output.
    lazy var showsProgress = !json && isatty(STDOUT_FILENO) == 1 && isatty(STDERR_FILENO) == 1
    /// The suite running now, as progress names it.
    var stage = ""
    private var progressShown = false

    /// Shows where the run is (`[caps] round 2 of 7`) on one line of the terminal, replaced by the
    /// next, and erased before a row is printed.
    func progress(_ step: String) {
        guard showsProgress else { return }
        writeStandardError("\r\u{1B}[K[\(stage)] \(step)")
        progressShown = true
    }

    func clearProgress() {
        guard progressShown else { return }
        writeStandardError("\r\u{1B}[K")
        progressShown = false
    }

    // MARK: Raw baselines

    /// Shared-memory ping-pong with a peer that spins (or always sleeps on a futex).
    /// `grouping`: as `measure`'s.
    func sharedMemoryPingPong(sleeping: Bool, count: Int, grouping group: Int = 1) throws -> Samples {
        let memory = try makeMemoryFile(name: "bench-pingpong", sealable: false)
        try memory.truncate(to: 4096)
        let mapping = try Mapping(memory, length: 4096, writable: true)
        let ping = mapping.baseAddress.assumingMemoryBound(to: UInt32.self)
        let pong = mapping.baseAddress.advanced(by: 64).assumingMemoryBound(to: UInt32.self)
        let echo = try peer(sleeping ? "futex-echo" : "spin-echo", descriptors: [memory.rawValue])
        defer { echo.stop() }
        var sequence: UInt32 = 0
        return measure(count, grouping: group) {
            sequence &+= 1
            if sequence == .max { sequence = 1 }
            SharedWord.store(ping, sequence)
            if sleeping {
                Futex.wake(ping)
                while SharedWord.load(pong) != sequence { try? Futex.wait(pong, expected: sequence &- 1) }
            } else {
                while SharedWord.load(pong) != sequence { SharedWord.relax() }
            }
        }
    }

    /// Ping-pong of `size`-byte messages over a socket pair (or two pipes) with an echo peer.
    func socketPingPong(type: CInt, size: Int, count: Int) throws -> Samples {
        var fds: [CInt] = [-1, -1]
        guard socketpair(AF_UNIX, type | CInt(SOCK_CLOEXEC.rawValue), 0, &fds) == 0 else { throw Errno.current }
        let mine = PatchbaySystem.Descriptor(adopting: fds[0])
        let theirs = PatchbaySystem.Descriptor(adopting: fds[1])
        let echo = try peer(type == CInt(SOCK_STREAM.rawValue) ? "stream-echo" : "socket-echo", ["--size", "\(size)"],
                            descriptors: [theirs.rawValue])
        _ = consume theirs
        defer { echo.stop() }
        var buffer = [UInt8](repeating: 7, count: size)
        return try measure(count) { try exchange(mine.rawValue, mine.rawValue, &buffer) }
    }

    func pipePingPong(size: Int, count: Int) throws -> Samples {
        let there = try Pipe()
        let back = try Pipe()
        let echo = try peer("pipe-echo", ["--size", "\(size)"], descriptors: [there.readEnd.rawValue, back.writeEnd.rawValue])
        let writer = there.writeEnd
        let reader = back.readEnd
        _ = consume there.readEnd
        back.writeEnd.close()
        defer { echo.stop() }
        var buffer = [UInt8](repeating: 7, count: size)
        return try measure(count) { try exchange(writer.rawValue, reader.rawValue, &buffer) }
    }

    func exchange(_ output: CInt, _ input: CInt, _ buffer: inout [UInt8]) throws {
        let size = buffer.count
        let sent = buffer.withUnsafeBytes { Glibc.write(output, $0.baseAddress, size) }
        guard sent == size else { throw Errno.current }
        var got = 0
        while got < size {
            let n = buffer.withUnsafeMutableBytes { Glibc.read(input, $0.baseAddress! + got, size - got) }
            guard n > 0 else { throw Errno.current }
            got += n
        }
    }

    static func loadAverage() -> Double {
        guard let file = try? openFile("/proc/loadavg", flags: O_RDONLY), let bytes = try? file.readToEnd(limit: 256) else { return 0 }
        return Double(String(decoding: bytes, as: UTF8.self).split(separator: " ").first ?? "0") ?? 0
    }

    static func residentKilobytes(_ pid: pid_t) -> Int {
        guard let file = try? openFile("/proc/\(pid)/status", flags: O_RDONLY), let bytes = try? file.readToEnd(limit: 1 << 16) else { return 0 }
        for line in String(decoding: bytes, as: UTF8.self).split(separator: "\n") where line.hasPrefix("VmRSS:") {
            return Int(line.dropFirst(6).split(whereSeparator: { $0 == " " || $0 == "\t" }).first ?? "0") ?? 0
        }
        return 0
    }

    // MARK: Report

    static func format(_ row: BenchRow) -> String {
        let figure: (Samples) -> String = { samples in
            row.unit == "ns" ? "\(formatNanoseconds(samples.median)) / \(formatNanoseconds(samples.p99))"
                             : "\(formatRate(samples.median)) \(row.unit)"
        }
        let baseline = row.baselineSamples.map(figure) ?? "—"
        let ratio = row.ratio.map { String(format2($0)) + "×" } ?? "—"
        let verdict = row.met.map { $0 ? "met" : "MISSED" } ?? ""
        var line = row.name.padding(46) + figure(row.samples).padding(24) + row.baseline.padding(34) + baseline.padding(24)
            + ratio.padding(9) + row.target.padding(12) + verdict + "\n"
        if let low = row.roundRatios.min(), let high = row.roundRatios.max() {
            line += "    \(row.roundRatios.count) rounds alternating with the baseline on the same CPUs: "
                + "ratio of medians \(format2(low))× to \(format2(high))× (median \(ratio))\n"
        }
        return line
    }

    func report() {
        let loadAfter = Bench.loadAverage()
        if json {
            let items = rows.map { row in
                JSON.object([
                    ("name", JSON.string(row.name)), ("median_ns", "\(row.samples.median)"), ("p99_ns", "\(row.samples.p99)"),
                    ("unit", JSON.string(row.unit)), ("baseline", JSON.string(row.baseline)),
                    ("baseline_median_ns", row.baselineSamples.map { "\($0.median)" } ?? "null"),
                    ("ratio", row.ratio.map { String(format2($0)) } ?? "null"), ("target", JSON.string(row.target)),
                    ("met", row.met.map { $0 ? "true" : "false" } ?? "null"),
                    ("round_ratios", "[" + row.roundRatios.map { format2($0) }.joined(separator: ",") + "]"),
                ])
            }
            writeStandardOutput(JSON.array(items) + "\n")
            return
        }
        for note in notes { writeStandardOutput("note: " + note + "\n") }
        if loadBefore > 1.0 || loadAfter > Double(cpuCount) + 0.5 {
            writeStandardOutput("warning: the machine was busy (load average \(format2(loadBefore)) before, \(format2(loadAfter)) after); "
                + "figures are noisier than usual\n")
        }
    }

    static func header() -> String {
        "operation".padding(46) + "Patchbay median / p99".padding(24) + "raw Linux baseline (same run)".padding(34)
            + "median / p99".padding(24) + "ratio".padding(9) + "target".padding(12) + "\n"
    }
}

func format2(_ value: Double) -> String {
    let scaled = (value * 100).rounded() / 100
    return String(scaled)
}

func formatNanoseconds(_ value: UInt64) -> String {
    if value < 1_000 { return "\(value) ns" }
    if value < 1_000_000 { return format2(Double(value) / 1e3) + " µs" }
    return format2(Double(value) / 1e6) + " ms"
}

func formatRate(_ value: UInt64) -> String {
    if value >= 1_000_000 { return format2(Double(value) / 1e6) + "M" }
    if value >= 1_000 { return format2(Double(value) / 1e3) + "k" }
    return "\(value)"
}

/// A broker of a benchmark's own, on a socket in a fresh private directory: in /dev/shm (tmpfs)
/// when it exists, as the broker's default store is, so named objects are measured on the file
/// system they live on in production, not on whatever /tmp is. `stop()` stops it and removes the
/// directory.
final class ScratchBroker {
    let directory: String
    let socketPath: String
    private(set) var pid: pid_t = 0

    init(_ prefix: String, arguments: [String]) throws {
        let base = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp"
        var template = Array("\(base)/\(prefix)-XXXXXX".utf8CString)
        guard let made = template.withUnsafeMutableBufferPointer({ mkdtemp($0.baseAddress!) }) else {
            throw PatchbayError(Errno.current, "cannot create a temporary directory in \(base)")
        }
        directory = String(cString: made)
        socketPath = directory + "/patchbay.sock"
        let ready = try Pipe()
        let log = try openFile(directory + "/broker.log", flags: O_WRONLY | O_CREAT | O_APPEND)
        pid = try spawnProcess(
            path: currentExecutablePath() ?? CommandLine.arguments[0],
            arguments: ["daemon", "--socket", socketPath, "--shm-directory", directory + "/shm", "--ready-fd", "3"] + arguments,
            environment: currentEnvironment(), descriptors: [2: log.rawValue, 3: ready.writeEnd.rawValue])
        let reader = ready.readEnd
        ready.writeEnd.close()
        guard try reader.readToEnd(limit: 16) == Array("ready\n".utf8) else {
            stop()
            throw PatchbayError(.connectionRefused, "the broker did not start; see \(directory)/broker.log")
        }
    }

    func stop() {
        if pid > 0 {
            kill(pid, SIGTERM)
            _ = try? waitForProcess(pid)
            pid = 0
        }
        // A system broker leaves the per-uid stores that still hold objects mounted.
        unmountEverything(under: directory)
        if let remover = try? spawnProcess(path: "/bin/rm", arguments: ["-rf", directory], environment: []) {
            _ = try? waitForProcess(remover)
        }
    }
}
