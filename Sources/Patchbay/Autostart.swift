// Finding the broker, and starting the per-user one when nobody answers.
//
// Race-free start: every would-be starter takes an exclusive flock on `autostart.lock` in the
// broker's directory, then tries to connect once more. Only one holds the lock at a time, so only
// the first finds no broker and starts one; it waits until the broker writes "ready" on a pipe
// (a real readiness signal, not a sleep) and then releases the lock, and everyone after it simply
// connects. The broker detaches (forks into its own session), so it outlives the client that
// started it and is never that client's zombie.

import Glibc
import PatchbayProtocol
import PatchbaySystem
import SystemPackage

enum Autostart {
    static func defaultUserSocketPath() -> String {
        let runtime = getenv("XDG_RUNTIME_DIR").map { String(cString: $0) }
        return userBrokerSocketPath(uid: geteuid(), xdgRuntimeDirectory: runtime)
    }

    static func connect(path: String) throws(PatchbayError) -> SeqpacketSocket {
        do {
            let socket = try SeqpacketSocket()
            try socket.connect(path: path)
            return socket
        } catch {
            throw PatchbayError(error, connectFailureReason(error, path: path))
        }
    }

    static func connectOrStart(path: String) throws(PatchbayError) -> SeqpacketSocket {
        do {
            return try connect(path: path)
        } catch let first {
            guard first.errno == .noSuchFileOrDirectory || first.errno == .connectionRefused else { throw first }
        }
        let directory = String(path[..<(path.lastIndex(of: "/") ?? path.endIndex)])
        if mkdir(directory, 0o700) != 0 && Errno.current != .fileExists {
            let error = Errno.current
            throw PatchbayError(error, "cannot create the broker directory \(directory): \(error.name)")
        }
        let lock: FileLock
        do {
            lock = try FileLock(path: directory + "/autostart.lock", wait: true)
        } catch {
            throw PatchbayError(error, "cannot lock \(directory)/autostart.lock to start a broker")
        }
        return try connectOrStart(path: path, directory: directory, holding: lock)
    }

    /// The part of the start that runs under the autostart lock.
    private static func connectOrStart(
        path: String, directory: String, holding lock: borrowing FileLock
    ) throws(PatchbayError) -> SeqpacketSocket {
        if let socket = try? connect(path: path) { return socket }
        try startBroker(socketPath: path, directory: directory)
        return try connect(path: path)
    }

    /// Starts `patchbayd` (or `patchbay daemon`) detached and waits until it is listening.
    private static func startBroker(socketPath: String, directory: String) throws(PatchbayError) {
        guard let daemon = daemonExecutable() else {
            throw PatchbayError(.noSuchFileOrDirectory,
                                "no broker is running at \(socketPath) and patchbayd was not found to start one (set PATCHBAY_DAEMON to its path)")
        }
        let ready = try preparing { () throws(Errno) in try Pipe() }
        let logFile = try preparing { () throws(Errno) in
            try openFile(directory + "/patchbayd.log", flags: O_WRONLY | O_CREAT | O_APPEND, mode: 0o600)
        }
        let nullFile = try preparing { () throws(Errno) in try openFile("/dev/null", flags: O_RDWR) }
        let isDaemonBinary = daemon.split(separator: "/").last == "patchbayd"
        let arguments = (isDaemonBinary ? [] : ["daemon"]) + ["--socket", socketPath, "--ready-fd", "3", "--detach"]
        let pid: pid_t
        do {
            pid = try spawnProcess(
                path: daemon, arguments: arguments,
                environment: environment(applying: ["LISTEN_FDS": nil, "LISTEN_PID": nil]),
                descriptors: [0: nullFile.rawValue, 1: nullFile.rawValue, 2: logFile.rawValue,
                              3: ready.writeEnd.rawValue],
                newSession: true)
        } catch {
            throw PatchbayError(error, "cannot start the broker \(daemon): \(error.name)")
        }
        // Only the broker may hold the write end now, so end of file means it died.
        let readEnd = ready.readEnd
        _ = consume ready.writeEnd
        let answer = (try? readEnd.readToEnd(limit: 64)) ?? []
        // The first process forks the real broker and exits at once; reap it.
        _ = try? waitForProcess(pid)
        guard String(decoding: answer, as: UTF8.self).hasPrefix("ready") else {
            throw PatchbayError(.connectionRefused,
                                "the broker \(daemon) did not start; its log is \(directory)/patchbayd.log")
        }
    }

    private static func preparing<T: ~Copyable>(_ body: () throws(Errno) -> T) throws(PatchbayError) -> T {
        do {
            return try body()
        } catch {
            throw PatchbayError(error, "cannot prepare to start the broker: \(error.name)")
        }
    }

    /// `PATCHBAY_DAEMON`, else `patchbayd` or `patchbay` beside the running executable, else
    /// `patchbayd` on `PATH`.
    static func daemonExecutable() -> String? {
        if let explicit = getenv("PATCHBAY_DAEMON").map({ String(cString: $0) }), !explicit.isEmpty {
            return explicit
        }
        var candidates: [String] = []
        if let current = currentExecutablePath(), let slash = current.lastIndex(of: "/") {
            let directory = String(current[..<slash])
            candidates += [directory + "/patchbayd", directory + "/patchbay"]
        }
        if let path = getenv("PATH").map({ String(cString: $0) }) {
            candidates += path.split(separator: ":").map { $0 + "/patchbayd" }
        }
        return candidates.first { access($0, X_OK) == 0 }
    }

    private static func connectFailureReason(_ error: Errno, path: String) -> String {
        switch error {
        case .noSuchFileOrDirectory: "no broker socket at \(path)"
        case .connectionRefused: "no broker is listening at \(path)"
        case .permissionDenied: "not allowed to connect to the broker at \(path)"
        default: "cannot connect to the broker at \(path)"
        }
    }
}
