import ArgumentParser
import Glibc
import PatchbaySystem
import SystemPackage

// `caps serve --exec` starts its program from a process of its own, started before the service
// takes any descriptor from a client. A process that forks holds, until its child execs, a copy
// of every descriptor it has open; the service closes what clients sent it on closing threads,
// and a close made meanwhile leaves the child's copy the last one. For a local socket with a
// lingering TCP socket in its queue, that last close (at exec, in the child) waits as long as a
// client chose, and posix_spawn, and the whole service, with it. The starter holds nothing a
// client chose: only the socket to the service and, for each request, the program's two pipes.

/// The starter's side: one program run per message on fd 3, in order.
struct ExecStarterCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "exec-starter", shouldDisplay: false)

    @Argument(parsing: .captureForPassthrough) var program: [String] = []

    func run() throws {
        guard let path = program.first else { throw ExitCode(2) }
        let arguments = Array(program.dropFirst())
        var byte: UInt8 = 0
        while true {
            // One byte and the program's stdin and stdout; nothing (the service is gone): done.
            guard let received = withUnsafeMutableBytes(of: &byte, { SeqpacketSocket.receiveRaw(3, $0) }) else {
                if errno == EINTR { continue }
                return
            }
            guard received.length == 1, received.descriptors.count == 2 else {
                received.descriptors.forEach { close($0) }
                if received.length == 0 { return }
                continue
            }
            var answer: [Int32]
            do {
                let pid = try spawnProcess(path: path, arguments: arguments, environment: currentEnvironment(),
                                           descriptors: [0: received.descriptors[0], 1: received.descriptors[1], 2: 2])
                received.descriptors.forEach { close($0) }
                switch try waitForProcess(pid) {
                case .exited(let code): answer = [0, code]
                case .signaled(let signal): answer = [1, signal]
                }
            } catch {
                received.descriptors.forEach { close($0) }
                answer = [2, error.rawValue]
            }
            let sent = answer.withUnsafeBytes { bytes in
                [CInt]().withUnsafeBufferPointer { SeqpacketSocket.sendRaw(3, bytes, $0) }
            }
            if sent != 8 { return }
        }
    }
}

/// The service's side: the starter, started now, and a program run through it.
final class ExecStarter {
    private let socket: CInt
    private let pid: pid_t
    let program: String

    /// Starts the starter for `program` with `arguments`. Call it before taking anything from a
    /// client.
    init(program: String, arguments: [String]) throws(Errno) {
        var pair: [CInt] = [-1, -1]
        guard socketpair(AF_UNIX, CInt(SOCK_SEQPACKET.rawValue) | CInt(SOCK_CLOEXEC.rawValue), 0, &pair) == 0 else {
            throw Errno.current
        }
        defer { close(pair[1]) }
        let executable = currentExecutablePath() ?? CommandLine.arguments[0]
        do {
            pid = try spawnProcess(path: executable, arguments: ["exec-starter", program] + arguments,
                                   environment: currentEnvironment(), descriptors: [0: 0, 1: 1, 2: 2, 3: pair[1]])
        } catch {
            close(pair[0])
            throw error
        }
        socket = pair[0]
        self.program = program
    }

    /// Starts the program once with `stdin` and `stdout` (both closed here once sent); false when
    /// the starter is gone. `wait` tells how it ended.
    func start(stdin: CInt, stdout: CInt) -> Bool {
        var byte: UInt8 = 1
        let sent = withUnsafeBytes(of: &byte) { bytes in
            [stdin, stdout].withUnsafeBufferPointer { SeqpacketSocket.sendRaw(socket, bytes, $0) }
        }
        close(stdin)
        close(stdout)
        return sent == 1
    }

    /// How the program `start` started ended.
    func wait() -> Result<Termination, FilterFailure> {
        var answer: [Int32] = [0, 0]
        guard let received = answer.withUnsafeMutableBytes({ SeqpacketSocket.receiveRaw(socket, $0) }), received.length == 8 else {
            return .failure(FilterFailure(reason: "lost track of \(program): its starter is gone"))
        }
        received.descriptors.forEach { close($0) }
        switch answer[0] {
        case 0: return .success(.exited(answer[1]))
        case 1: return .success(.signaled(answer[1]))
        default: return .failure(FilterFailure(reason: "cannot run \(program): \(Errno(rawValue: answer[1]).name)"))
        }
    }
}
