// Test support: real brokers on private sockets, real child processes, real descriptors.
import Glibc
import Patchbay
import PatchbayProtocol
import PatchbaySystem
import SystemPackage
import Testing

/// The directory holding the built products (`patchbay`, `patchbayd`, `patchbay-testpeer`),
/// which is where the test bundle itself lives.
let productsDirectory: String = {
    let executable = currentExecutablePath() ?? CommandLine.arguments[0]
    return String(executable[..<executable.lastIndex(of: "/")!])
}()

let patchbayCLI = productsDirectory + "/patchbay"
let patchbayDaemon = productsDirectory + "/patchbayd"
let testPeer = productsDirectory + "/patchbay-testpeer"

/// A fresh private directory, removed by `removeTree` at the end of a test.
func makeTemporaryDirectory() -> String {
    var template = Array("/tmp/patchbay-test-XXXXXX".utf8CString)
    let result = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
    precondition(result != nil, "mkdtemp failed")
    return String(cString: result!)
}

func removeTree(_ path: String) {
    precondition(path.hasPrefix("/tmp/patchbay-test-"))
    let pid = try! spawnProcess(path: "/bin/rm", arguments: ["-rf", path], environment: [])
    _ = try? waitForProcess(pid)
}

func writeFile(_ path: String, _ contents: String) throws {
    let file = try openFile(path, flags: O_WRONLY | O_CREAT | O_TRUNC, mode: 0o600)
    try file.writeAll(Array(contents.utf8))
}

/// What a finished child printed and how it ended.
struct Finished {
    var termination: Termination
    var standardOutput: String
    var standardError: String
}

/// Runs a program to completion with `input` on its stdin.
func run(_ path: String, _ arguments: [String], environment: [String: String?] = [:],
         input: String = "") throws -> Finished {
    let stdin = try Pipe()
    let stdout = try Pipe()
    let stderr = try Pipe()
    let pid = try spawnProcess(
        path: path, arguments: arguments, environment: PatchbaySystem.environment(applying: environment),
        descriptors: [0: stdin.readEnd.rawValue, 1: stdout.writeEnd.rawValue, 2: stderr.writeEnd.rawValue])
    let inputWriter = stdin.writeEnd
    _ = consume stdin.readEnd
    _ = consume stdout.writeEnd
    _ = consume stderr.writeEnd
    // A child may stop reading its input and exit (that can be what the test is about): its
    // input pipe then says EPIPE, which must not kill the test process with SIGPIPE.
    signal(SIGPIPE, SIG_IGN)
    do {
        try inputWriter.writeAll(Array(input.utf8))
    } catch {
        guard error == .brokenPipe else { throw error }
    }
    _ = consume inputWriter
    let output = try stdout.readEnd.readToEnd()
    let errors = try stderr.readEnd.readToEnd()
    return Finished(termination: try waitForProcess(pid),
                    standardOutput: String(decoding: output, as: UTF8.self),
                    standardError: String(decoding: errors, as: UTF8.self))
}

/// A child that keeps running while the test talks to it line by line.
final class Child {
    let pid: pid_t
    private var input: PatchbaySystem.Descriptor?
    private let output: PatchbaySystem.Descriptor
    private var reaped: Termination?

    init(_ path: String, _ arguments: [String], environment: [String: String?] = [:]) throws {
        let stdin = try Pipe()
        let stdout = try Pipe()
        pid = try spawnProcess(
            path: path, arguments: arguments, environment: PatchbaySystem.environment(applying: environment),
            descriptors: [0: stdin.readEnd.rawValue, 1: stdout.writeEnd.rawValue, 2: 2])
        input = consume stdin.writeEnd
        output = stdout.readEnd
        _ = consume stdin.readEnd
        _ = consume stdout.writeEnd
    }

    /// Reads one line of the child's stdout (blocking), without the newline; nil at end of file.
    func readLine() throws -> String? {
        var line: [UInt8] = []
        var byte: UInt8 = 0
        while true {
            let count = try withUnsafeMutableBytes(of: &byte) { raw in
                Result { () throws(Errno) -> Int in try output.read(into: raw) }
            }.get()
            if count == 0 { return line.isEmpty ? nil : String(decoding: line, as: UTF8.self) }
            if byte == UInt8(ascii: "\n") { return String(decoding: line, as: UTF8.self) }
            line.append(byte)
        }
    }

    /// Whether the process is still alive (not exited, not a zombie), without reaping it.
    var isRunning: Bool {
        guard reaped == nil, let stat = try? openFile("/proc/\(pid)/stat", flags: O_RDONLY), let bytes = try? stat.readToEnd(limit: 4096),
              let close = bytes.lastIndex(of: UInt8(ascii: ")")), close + 2 < bytes.count else { return false }
        return bytes[close + 2] != UInt8(ascii: "Z")
    }

    /// Closes the child's stdin (its cue in several test-peer commands).
    func closeInput() {
        input = nil
    }

    /// Writes `line` and a newline to the child's stdin.
    func writeLine(_ line: String) throws {
        try input?.writeAll(Array((line + "\n").utf8))
    }

    func kill(_ signal: CInt) {
        _ = Glibc.kill(pid, signal)
    }

    @discardableResult
    func wait() throws -> Termination {
        if let reaped { return reaped }
        let termination = try waitForProcess(pid)
        reaped = termination
        return termination
    }

    deinit {
        if reaped == nil {
            _ = Glibc.kill(pid, SIGKILL)
            _ = try? waitForProcess(pid)
        }
    }
}

/// A broker of the test's own, on a socket in a private directory, stopped at the end.
final class TestBroker {
    let directory: String
    let socketPath: String
    let pid: pid_t
    private var stopped = false

    /// Starts `patchbayd` with `arguments` and returns once it says it is ready. With
    /// `descriptorLimit`, the broker runs with that `RLIMIT_NOFILE` (soft and hard, through
    /// prlimit), which sets the size of its descriptor budget.
    init(_ arguments: [String] = [], descriptorLimit: Int? = nil) throws {
        directory = makeTemporaryDirectory()
        socketPath = directory + "/patchbay.sock"
        let ready = try Pipe()
        let log = try openFile(directory + "/broker.log", flags: O_WRONLY | O_CREAT | O_APPEND)
        let daemon = [patchbayDaemon, "--socket", socketPath, "--shm-directory", directory + "/shm", "--ready-fd", "3",
                      "--log-level", "debug"] + arguments
        pid = try spawnProcess(
            path: descriptorLimit == nil ? patchbayDaemon : "/usr/bin/prlimit",
            arguments: descriptorLimit.map { ["--nofile=\($0):\($0)"] + daemon } ?? Array(daemon.dropFirst()),
            environment: PatchbaySystem.environment(applying: ["LISTEN_FDS": nil, "LISTEN_PID": nil]),
            descriptors: [1: log.rawValue, 2: log.rawValue, 3: ready.writeEnd.rawValue])
        _ = consume ready.writeEnd
        let answer = try ready.readEnd.readToEnd(limit: 16)
        guard String(decoding: answer, as: UTF8.self) == "ready\n" else {
            throw PatchbayError(.connectionRefused, "test broker did not start; see \(directory)/broker.log")
        }
    }

    /// Environment for child processes: talk to this broker.
    var environment: [String: String?] { ["PATCHBAY_SOCKET": socketPath] }

    func connect() throws -> Broker {
        try Broker(socketPath: socketPath)
    }

    /// Descriptors the broker process has open right now.
    func descriptorCount() throws -> Int {
        try openDescriptorCount(pid: pid)
    }

    /// Waits (bounded) until the broker's descriptor count equals `expected`; returns the last
    /// count seen. The broker closes descriptors asynchronously to the test (on a client's close
    /// or a key's expiry), so the test polls the observable outcome with a deadline.
    func waitForDescriptorCount(_ expected: Int, within seconds: Double = 30) throws -> Int {
        let deadline = monotonicNanoseconds() + UInt64(seconds * 1e9)
        var count = try descriptorCount()
        while count != expected && monotonicNanoseconds() < deadline {
            usleep(2_000)
            count = try descriptorCount()
        }
        return count
    }

    /// SIGTERM, then waits for the exit.
    @discardableResult
    func stop() throws -> Termination {
        stopped = true
        Glibc.kill(pid, SIGTERM)
        return try waitForProcess(pid)
    }

    deinit {
        if !stopped {
            Glibc.kill(pid, SIGKILL)
            _ = try? waitForProcess(pid)
        }
        unmountEverything(under: directory)
        removeTree(directory)
    }
}

/// Runs `body` expecting a `PatchbayError` with `errno`; returns it.
@discardableResult
func expectErrno(_ errno: Errno, sourceLocation: SourceLocation = #_sourceLocation,
                 _ body: () throws(PatchbayError) -> Void) -> PatchbayError? {
    do {
        try body()
        Issue.record("expected \(errno.name), but the call succeeded", sourceLocation: sourceLocation)
        return nil
    } catch {
        #expect(error.errno == errno, "expected \(errno.name), got \(error)", sourceLocation: sourceLocation)
        return error
    }
}

extension String {
    /// Without leading and trailing whitespace and newlines.
    var trimmed: String {
        var scalars = Substring(self).unicodeScalars[...]
        while let first = scalars.first, first.properties.isWhitespace { scalars.removeFirst() }
        while let last = scalars.last, last.properties.isWhitespace { scalars.removeLast() }
        return String(String.UnicodeScalarView(scalars))
    }
}

extension Broker {
    /// `share` for a descriptor of the system layer (the tests open files with PatchbaySystem's
    /// `openFile`); the library's own overloads take `Patchbay.Descriptor`, `FileDescriptor` or a
    /// raw number.
    func share(_ descriptor: borrowing PatchbaySystem.Descriptor, timeout: Expiry = .after(.seconds(60)),
               claimableBy restriction: ClaimRestriction? = nil) throws(PatchbayError) -> Key {
        try share(rawDescriptor: descriptor.rawValue, timeout: timeout, claimableBy: restriction)
    }
}

/// Polls `condition` until it holds or 10 s pass; whether it held. For outcomes another process
/// brings about, which the test can only observe: a wait that would otherwise hang fails instead.
func eventually(_ condition: () throws -> Bool) throws -> Bool {
    let deadline = monotonicNanoseconds() + 10_000_000_000
    while try !condition() {
        guard monotonicNanoseconds() < deadline else { return false }
        usleep(2_000)
    }
    return true
}

/// 24 connections to `broker` held at once, each admitted and answered, and its log without a
/// dropped connection or a watch left on a closed descriptor: what a descriptor number left in
/// the broker's event loop would break for whichever connection is given it.
func expectEveryConnectionAdmitted(_ broker: TestBroker) throws {
    var held: [Broker] = []
    for index in 0..<24 {
        let connection = try broker.connect()
        #expect(throws: Never.self, "connection \(index)") { _ = try connection.status() }
        held.append(connection)
    }
    let log = (try? String(contentsOfFile: broker.directory + "/broker.log", encoding: .utf8)) ?? ""
    #expect(!log.contains("cannot watch client") && !log.contains("was closed while watched"), "\(log.suffix(2000))")
}

/// A `Socket` a test keeps open: it is not copyable, so an array holds it boxed.
final class HeldSocket {
    let socket: Socket
    init(_ socket: consuming Socket) { self.socket = socket }
}
