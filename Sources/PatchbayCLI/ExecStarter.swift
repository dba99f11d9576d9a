import ArgumentParser
import Glibc
import Patchbay
import PatchbaySystem
import SystemPackage

// `caps serve --exec` starts its program from a process of its own, started before the service
// takes any descriptor from a client. A process that forks holds, until its child execs, a copy
// of every descriptor it has open; the service closes what clients sent it on closing threads,
// and a close made meanwhile leaves the child's copy the last one. For a local socket with a
// lingering TCP socket in its queue, that last close (at exec, in the child) waits as long as a
// client chose, and posix_spawn, and the whole service, with it. The starter holds nothing a
// client chose: only the socket to the service and, for each program, its standard input and
// output (the request's pipes; for `net listen --exec`, the connection, which is the program's).
//
// Between the two, on a local seqpacket socket: the service sends a message of 16 bytes, two
// 64-bit words (a tag, and how long the program may run in nanoseconds, 0 for ever), with two
// descriptors (the program's stdin and stdout); or of 32 bytes, whose two more words are the
// kernel's credentials of the peer the program answers, pid and uid, then euid and gid (32 bits
// each, low first), for a `/net` connection (`PATCHBAY_NET_PEER_PID`, `_UID`, `_GID` in the
// program's environment); or of 40 bytes, the same and a CAPS request's message id
// (`PATCHBAY_CAPS_CLIENT_PID`, `_UID`, `_EUID`, `_GID`, `PATCHBAY_CAPS_MESSAGE_ID`). The
// service's own values of those names never reach a program. The starter answers, once the program has ended,
// with 24 bytes, three 64-bit words: the tag, then how it ended (0 and the exit status, 1 and the
// signal, 2 and the errno it could not be started with, 3 and 0: it ran out of time and the
// starter killed it). Programs run at the same time as far as the service starts them so.

/// The starter's side: a program per message on fd 3, each waited for on a thread of its own.
struct ExecStarterCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "exec-starter", shouldDisplay: false)

    @Argument(parsing: .captureForPassthrough) var program: [String] = []

    func run() throws {
        guard let path = program.first else { throw ExitCode(2) }
        let arguments = Array(program.dropFirst())
        // The service's own values of the names below never reach a program.
        let environment = currentEnvironment().filter { !$0.hasPrefix("PATCHBAY_CAPS_") && !$0.hasPrefix("PATCHBAY_NET_PEER_") }
        var words: (tag: UInt64, limit: UInt64, pidUID: UInt64, euidGID: UInt64, message: UInt64) = (0, 0, 0, 0, 0)
        while true {
            // A tag, a time limit (and a CAPS request's id and client) and the program's stdin
            // and stdout; nothing (the service is gone): done.
            guard let received = withUnsafeMutableBytes(of: &words, { SeqpacketSocket.receiveRaw(3, $0) }) else {
                if errno == EINTR { continue }
                return
            }
            guard [16, 32, 40].contains(received.length), received.descriptors.count == 2 else {
                received.descriptors.forEach { close($0) }
                if received.length == 0 { return }
                continue
            }
            var programEnvironment = environment
            if received.length >= 32 {
                let pid = Int32(bitPattern: UInt32(truncatingIfNeeded: words.pidUID)), uid = words.pidUID >> 32
                let euid = UInt32(truncatingIfNeeded: words.euidGID), gid = words.euidGID >> 32
                programEnvironment += received.length == 40
                    ? ["PATCHBAY_CAPS_CLIENT_PID=\(pid)", "PATCHBAY_CAPS_CLIENT_UID=\(uid)", "PATCHBAY_CAPS_CLIENT_EUID=\(euid)",
                       "PATCHBAY_CAPS_CLIENT_GID=\(gid)", "PATCHBAY_CAPS_MESSAGE_ID=\(words.message)"]
                    : ["PATCHBAY_NET_PEER_PID=\(pid)", "PATCHBAY_NET_PEER_UID=\(uid)", "PATCHBAY_NET_PEER_GID=\(gid)"]
            }
            let started = Result { () throws(Errno) -> pid_t in
                try spawnProcess(path: path, arguments: arguments, environment: programEnvironment,
                                 descriptors: [0: received.descriptors[0], 1: received.descriptors[1], 2: 2])
            }
            received.descriptors.forEach { close($0) }
            let (which, limit) = (words.tag, words.limit)
            switch started {
            case .success(let pid):
                startThread {
                    // Only this thread reaps the program, so until it does, `pid` is the
                    // program's and no other process's: killed here, it cannot be another.
                    let outOfTime = limit > 0 && !childEnds(pid, within: limit)
                    if outOfTime { kill(pid, SIGKILL) }
                    let answer: [Int64] = switch try? waitForProcess(pid) {
                    case _ where outOfTime: [3, 0]
                    case .exited(let code): [0, Int64(code)]
                    case .signaled(let signal): [1, Int64(signal)]
                    case nil: [2, Int64(ECHILD)]
                    }
                    Self.answer(which, answer)
                }
            case .failure(let error):
                Self.answer(which, [2, Int64(error.rawValue)])
            }
        }
    }

    private static func answer(_ tag: UInt64, _ how: [Int64]) {
        let message = [Int64(bitPattern: tag)] + how
        _ = message.withUnsafeBytes { bytes in [CInt]().withUnsafeBufferPointer { SeqpacketSocket.sendRaw(3, bytes, $0) } }
    }
}

/// The starter for `program`, started now; a command that cannot start it fails, saying why.
func startExecStarter(_ program: String, arguments: [String], for command: String) -> ExecStarter {
    attempt(command) { () throws(PatchbayError) -> ExecStarter in
        do throws(Errno) {
            return try ExecStarter(program: program, arguments: arguments)
        } catch {
            throw PatchbayError(error, "cannot start the process that runs \(program)")
        }
    }
}

/// The peer a program answers, as the kernel saw it: a connection's (`SO_PEERCRED`, whose uid is
/// also its euid), or a CAPS request's client with the request's id; for the program's environment.
struct ProgramPeer: Sendable {
    var pid: Int32
    var uid: UInt32
    var euid: UInt32
    var gid: UInt32
    var messageID: UInt64?
}

/// The service's side: the starter, started now, and programs run through it, from any thread.
final class ExecStarter: @unchecked Sendable {  // the socket is written whole messages at a time; the rest under `state`
    private let socket: CInt
    let program: String
    private struct State {
        var nextTag: UInt64 = 1
        /// Answers not yet taken, by tag; a tag with no entry yet is still running.
        var answers: [UInt64: Result<Termination, FilterFailure>] = [:]
        /// Whether a thread reads the socket now (the others wait for it to hand them their answer).
        var reading = false
        /// The starter is gone: every wait fails.
        var gone = false
    }
    private var state = State()
    /// Guards `state`; `changed` is signalled when an answer is filed or the reader steps aside.
    private let lock = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private let changed = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)

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
            _ = try spawnProcess(path: executable, arguments: ["exec-starter", program] + arguments,
                                 environment: currentEnvironment(), descriptors: [0: 0, 1: 1, 2: 2, 3: pair[1]])
        } catch {
            close(pair[0])
            throw error
        }
        socket = pair[0]
        self.program = program
        pthread_mutex_init(lock, nil)
        pthread_cond_init(changed, nil)
    }

    /// Starts the program once with `stdin` and `stdout` (the same descriptor may be both; the
    /// caller still owns them, and may close them once this returns), to be killed if it runs
    /// longer than `limit` nanoseconds (0: it may run for ever). Nil when the starter is gone;
    /// else the tag `wait` takes.
    func start(stdin: CInt, stdout: CInt, limit: UInt64 = 0, peer: ProgramPeer? = nil) -> UInt64? {
        pthread_mutex_lock(lock)
        let tag = state.nextTag
        state.nextTag += 1
        pthread_mutex_unlock(lock)
        var words: [UInt64] = [tag, limit]
        if let peer {
            words += [UInt64(UInt32(bitPattern: peer.pid)) | UInt64(peer.uid) << 32, UInt64(peer.euid) | UInt64(peer.gid) << 32]
            if let messageID = peer.messageID { words.append(messageID) }
        }
        let sent = words.withUnsafeBytes { raw in
            [stdin, stdout].withUnsafeBufferPointer { SeqpacketSocket.sendRaw(socket, raw, $0) }
        }
        guard sent == words.count * 8 else {
            pthread_mutex_lock(lock)
            state.gone = true
            pthread_cond_broadcast(changed)
            pthread_mutex_unlock(lock)
            return nil
        }
        return tag
    }

    /// The starter is gone (killed, or crashed): no program can be run any more.
    var isGone: Bool {
        pthread_mutex_lock(lock)
        defer { pthread_mutex_unlock(lock) }
        return state.gone
    }

    /// How the program `start` started as `tag` ended. One thread at a time reads the starter's
    /// answers and files them by tag; the others wait for theirs.
    func wait(_ tag: UInt64) -> Result<Termination, FilterFailure> {
        pthread_mutex_lock(lock)
        while true {
            if let answer = state.answers.removeValue(forKey: tag) {
                pthread_mutex_unlock(lock)
                return answer
            }
            if state.gone {
                pthread_mutex_unlock(lock)
                return .failure(FilterFailure(reason: "lost track of \(program): its starter is gone"))
            }
            if state.reading {
                pthread_cond_wait(changed, lock)
                continue
            }
            state.reading = true
            pthread_mutex_unlock(lock)
            var answer: [Int64] = [0, 0, 0]
            let received = answer.withUnsafeMutableBytes { SeqpacketSocket.receiveRaw(socket, $0) }
            let interrupted = received == nil && errno == EINTR  // (read before the lock is taken)
            pthread_mutex_lock(lock)
            state.reading = false
            if let received, received.length == 24 {
                received.descriptors.forEach { close($0) }
                let result: Result<Termination, FilterFailure> = switch answer[1] {
                case 0: .success(.exited(CInt(truncatingIfNeeded: answer[2])))
                case 1: .success(.signaled(CInt(truncatingIfNeeded: answer[2])))
                case 3: .failure(FilterFailure(reason: "\(program) ran out of time and was killed", errno: .timedOut))
                default: .failure(FilterFailure(reason: "cannot run \(program): \(Errno(rawValue: CInt(truncatingIfNeeded: answer[2])).name)"))
                }
                state.answers[UInt64(bitPattern: answer[0])] = result
            } else if interrupted {
                // read again
            } else {
                received?.descriptors.forEach { close($0) }
                state.gone = true
            }
            pthread_cond_broadcast(changed)
        }
    }
}
