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
        let runtime = trustedEnvironmentValue("XDG_RUNTIME_DIR")
        return userBrokerSocketPath(uid: geteuid(), xdgRuntimeDirectory: runtime)
    }

    static func connect(path: String) throws(PatchbayError) -> SeqpacketSocket {
        if geteuid() == 0, let own = connectAsRoot(besides: path) { return own }
        do {
            let socket = try SeqpacketSocket()
            try socket.connect(path: path)
            return socket
        } catch {
            throw PatchbayError(error, connectFailureReason(error, path: path))
        }
    }

    /// Root's own way to a system broker: its second socket (`rootSocketPath(forBrokerAt:)`, mode
    /// 0600), where root's connections never wait behind other users' in a listen backlog. Used
    /// only if the file is root's and the process listening there is root; nil (and the shared
    /// socket is used) when there is none, it is anyone else's, or its backlog is full: the
    /// connect never waits, so a socket another user planted there (in a directory anyone may
    /// write) cannot hold root's program up.
    private static func connectAsRoot(besides path: String) -> SeqpacketSocket? {
        let own = rootSocketPath(forBrokerAt: path)
        guard own.utf8.count < 108, socketFileOwner(atPath: own) == 0, let socket = try? SeqpacketSocket(),
              (try? UnixSocket.connectWithoutBlocking(on: socket.descriptor.rawValue, path: own)) != nil,
              (try? socket.peerCredentials())?.uid == 0
        else { return nil }
        return socket
    }

    /// Connects to the per-user broker, starting it if nobody answers. The directory must be
    /// ours and private, and the broker must run as our uid: otherwise another user could stand
    /// in front of us (say, by creating /tmp/patchbay-$UID first) and receive what we share.
    static func connectOrStart(path: String) throws(PatchbayError) -> SeqpacketSocket {
        let directory = try ownPrivateDirectory(of: path)
        do {
            return try verifiedOwnBroker(try connect(path: path), path: path)
        } catch let first {
            guard first.errno == .noSuchFileOrDirectory || first.errno == .connectionRefused else { throw first }
        }
        let lock: FileLock
        do {
            lock = try FileLock(path: directory + "/autostart.lock", wait: true)
        } catch {
            throw PatchbayError(error, "cannot lock \(directory)/autostart.lock to start a broker")
        }
        return try connectOrStart(path: path, directory: directory, holding: lock)
    }

    /// Connects to the per-user broker without starting one (autostart off, `Broker(autostart:
    /// false)`, `patchbay status`), under the same checks as `connectOrStart`: the default path
    /// is a well-known name, and another user who made its directory first, or runs a broker
    /// there, must not receive what this process sends.
    static func connectToOwn(path: String) throws(PatchbayError) -> SeqpacketSocket {
        _ = try ownPrivateDirectory(of: path)
        return try verifiedOwnBroker(try connect(path: path), path: path)
    }

    /// The per-user socket's directory, made if missing (mode 0700), and refused unless it is
    /// this uid's and private.
    private static func ownPrivateDirectory(of path: String) throws(PatchbayError) -> String {
        let directory = String(path[..<(path.lastIndex(of: "/") ?? path.endIndex)])
        do {
            try prepareDirectory(directory, mode: 0o700, owner: geteuid(), private: true)
        } catch {
            throw PatchbayError(error.errno, error.reason)
        }
        return directory
    }

    /// The part of the start that runs under the autostart lock.
    private static func connectOrStart(
        path: String, directory: String, holding lock: borrowing FileLock
    ) throws(PatchbayError) -> SeqpacketSocket {
        if let socket = try? connect(path: path) { return try verifiedOwnBroker(socket, path: path) }
        try startBroker(socketPath: path, directory: directory)
        return try verifiedOwnBroker(try connect(path: path), path: path)
    }

    /// The per-user broker must be running as this user (kernel credentials, not a claim).
    private static func verifiedOwnBroker(_ socket: consuming SeqpacketSocket, path: String) throws(PatchbayError)
        -> SeqpacketSocket
    {
        let peer: PeerCredentials
        do {
            peer = try socket.peerCredentials()
        } catch {
            throw PatchbayError(error, "cannot read the broker's credentials")
        }
        guard peer.uid == geteuid() else {
            throw PatchbayError(.permissionDenied,
                                "the broker at \(path) runs as uid \(peer.uid), not as uid \(geteuid()); refusing to use it")
        }
        return socket
    }

    /// Starts `patchbayd` (or `patchbay daemon`) detached and waits until it is listening.
    private static func startBroker(socketPath: String, directory: String) throws(PatchbayError) {
        guard let daemon = daemonExecutable() else {
            throw PatchbayError(.noSuchFileOrDirectory,
                                "no broker is running at \(socketPath) and patchbayd was not found to start one (set PATCHBAY_DAEMON to its path)")
        }
        let ready = try preparing { () throws(Errno) in try Pipe() }
        let logFile = try preparing { () throws(Errno) in
            try openFile(directory + "/patchbayd.log", flags: O_WRONLY | O_CREAT | O_APPEND | O_NOFOLLOW | O_NOCTTY,
                         mode: 0o600)
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
                newSession: true, closingOthers: true)
        } catch {
            throw PatchbayError(error, "cannot start the broker \(daemon): \(error.name)")
        }
        // Only the broker may hold the write end now, so end of file means it died.
        let readEnd = ready.readEnd
        ready.writeEnd.close()
        // The first process forks the real broker and exits at once; reap it.
        _ = try? waitForProcess(pid)
        // Bounded: a broker that hangs before "ready" must not hold every client of this user
        // behind the autostart lock forever.
        var poller = pollfd(fd: readEnd.rawValue, events: Int16(POLLIN), revents: 0)
        var readable: CInt = 0
        repeat {
            readable = poll(&poller, 1, 10_000)
        } while readable < 0 && errno == EINTR
        guard readable > 0 else {
            throw PatchbayError(.timedOut,
                                "the broker \(daemon) did not become ready within 10 s; its log is \(directory)/patchbayd.log")
        }
        let answer = (try? readEnd.readToEnd(limit: 64)) ?? []
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
    ///
    /// None in a process with borrowed privileges (a set-user-ID program): it starts no broker.
    /// One beside the running executable only if neither it nor its directory can be changed by
    /// another user (owned by root or this uid, not group- or world-writable): a program run from
    /// a directory anyone may write must not make whoever runs it start another user's file.
    static func daemonExecutable() -> String? {
        guard !runsWithBorrowedPrivileges else { return nil }
        if let explicit = trustedEnvironmentValue("PATCHBAY_DAEMON"), !explicit.isEmpty {
            return explicit
        }
        var candidates: [String] = []
        if let current = currentExecutablePath(), let slash = current.lastIndex(of: "/") {
            let directory = String(current[..<slash])
            if Self.isOnlyOurs(directory) {
                candidates += [directory + "/patchbayd", directory + "/patchbay"].filter(Self.isOnlyOurs)
            }
        }
        if let path = trustedEnvironmentValue("PATH") {
            candidates += path.split(separator: ":").filter { $0.hasPrefix("/") }.map { $0 + "/patchbayd" }
        }
        return candidates.first { access($0, X_OK) == 0 }
    }

    /// Whether `path` (followed) is owned by root or this uid and not writable by group or others.
    private static func isOnlyOurs(_ path: String) -> Bool {
        var info = stat()
        guard stat(path, &info) == 0 else { return false }
        return (info.st_uid == 0 || info.st_uid == geteuid()) && info.st_mode & 0o022 == 0
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
