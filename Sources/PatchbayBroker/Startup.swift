// Start-up: everything the broker settles before its loop runs. The socket's directory is made
// safe, one lock makes one broker per path, the listening socket is created (or adopted from a
// service manager), and the descriptor limit is raised. Each step that fails says why, once.

import Glibc
import PatchbayProtocol
import PatchbaySystem
public import SystemPackage

/// An error that stops the broker from starting, with a sentence for a person.
public struct BrokerStartError: Error, CustomStringConvertible {
    public var errno: Errno
    public var reason: String
    public var description: String { "\(errno.name): \(reason)" }
}

/// The broker's listening socket and the file it lives at.
final class BrokerListener {
    let socket: SeqpacketSocket
    let path: String
    /// Held for the broker's life so that a second broker on the same path refuses to start.
    private let pathLock: FileLock
    /// The socket file this broker created (device and inode), removed at exit only if it is
    /// still that file; nil for an inherited socket, which belongs to the service manager.
    private var ownSocketFile: (device: UInt64, inode: UInt64)?
    /// Key files the service manager kept for this broker (`pbkey-` names), for the key table.
    var inheritedKeyFiles: [(name: String, file: CInt)] = []
    /// The system broker's second socket, root's own (`rootSocketPath(forBrokerAt:)`, mode 0600):
    /// root's connections wait in no backlog that another uid can fill. Nil in per-user mode, or
    /// when it could not be made (`rootSocketProblem` says why; the broker serves without it).
    private(set) var rootSocket: RootSocket?
    private(set) var rootSocketProblem: String?
    private var ownRootSocketFile: (device: UInt64, inode: UInt64)?

    /// The name under which the service manager keeps a uid's shared memory tmpfs (its root
    /// directory, `SharedMemoryStore`): `pbshm-uid-<uid>`.
    static let ownerRootPrefix = "pbshm-uid-"
    /// The name under which it keeps the store's state tmpfs (its journal, `SharedMemoryStore`).
    static let stateRootName = "pbshm-state"

    /// Prepares `path`'s directory, takes the path's lock, and listens there, or adopts the
    /// listening socket a service manager passed (`LISTEN_FDS`). `beforeListening` runs after the
    /// lock and before the socket exists, so whatever it sets up (the shared memory store) can
    /// fail without leaving a socket behind; it is given the uids' tmpfs roots the service
    /// manager kept (`pbshm-uid-` names), by uid, and the state's root (`pbshm-state`).
    init(path: String, mode: BrokerConfiguration.Mode, backlog: Int32 = 4096,
         beforeListening: (_ keptOwnerRoots: [UInt32: CInt], _ keptStateRoot: CInt?) throws(BrokerStartError) -> Void)
        throws(BrokerStartError)
    {
        self.path = path
        var keptFiles: [(name: String, file: CInt)] = []
        let inherited = try Self.inheritedListener(keptFiles: &keptFiles)
        inheritedKeyFiles = keptFiles.filter { $0.name.hasPrefix(StoredKey.prefix) }
        var ownerRoots: [UInt32: CInt] = [:]
        var stateRoot: CInt?
        for (name, fd) in keptFiles where name.hasPrefix(Self.ownerRootPrefix) || name == Self.stateRootName {
            if name == Self.stateRootName, stateRoot == nil {
                stateRoot = fd
            } else if let uid = UInt32(name.dropFirst(Self.ownerRootPrefix.count)), ownerRoots[uid] == nil {
                ownerRoots[uid] = fd
            } else {
                close(fd)
            }
        }
        if inherited == nil {
            try Self.prepareSocketDirectory(for: path, mode: mode)
        }
        // Under socket activation too: a broker started by hand on the same path must not steal it.
        pathLock = try Self.lockPath(path)
        try beforeListening(ownerRoots, stateRoot)
        if let inherited {
            socket = inherited
            ownSocketFile = nil
        } else {
            socket = try Self.listen(on: path, mode: mode, backlog: backlog)
            ownSocketFile = fileIdentity(atPath: path)
        }
        do {
            try socket.descriptor.setNonblocking(true)
        } catch {
            throw BrokerStartError(errno: error, reason: "cannot make the listening socket non-blocking: \(error.name)")
        }
        // Every frame says which process sent it (`Server.handle`): set on the listener, the
        // accepted connections have it from the start (Linux copies it at accept, and records
        // the sender of a frame sent before the accept anyway), so no frame reads between the
        // accept and the broker's own `setsockopt` on the connection without its sender.
        try? socket.enableSenderCredentials()
        if mode == .system { makeRootSocket(backlog: backlog) }
    }

    deinit {
        removeSocketFile()
    }

    /// Root's listening socket, held where an optional can name it.
    final class RootSocket {
        let socket: SeqpacketSocket
        init(_ socket: consuming SeqpacketSocket) { self.socket = socket }
    }

    /// Removes the socket files if they are still the ones this broker created (a broker started
    /// after ours was stopped by hand may own the path by now).
    func removeSocketFile() {
        for (file, own) in [(path, ownSocketFile), (rootSocketPath(forBrokerAt: path), ownRootSocketFile)] {
            guard let own else { continue }
            if let current = fileIdentity(atPath: file), current == own {
                try? removeFile(atPath: file)
            }
        }
        ownSocketFile = nil
        ownRootSocketFile = nil
    }

    /// Listens at root's own path too, also under socket activation (the service manager passes
    /// one socket; this one is the broker's, in the same directory). The path lock is held, so a
    /// socket file left there is stale: removed if it is root's; anything else is left alone and
    /// the broker serves without it.
    private func makeRootSocket(backlog: Int32) {
        let rootPath = rootSocketPath(forBrokerAt: path)
        guard rootPath.utf8.count < 108 else {
            rootSocketProblem = "\(rootPath) is too long for a socket address"
            return
        }
        if let isSocket = isSocketFile(atPath: rootPath) {
            guard isSocket, socketFileOwner(atPath: rootPath) == 0 else {
                rootSocketProblem = "\(rootPath) exists and is not root's socket; not replacing it"
                return
            }
            try? removeFile(atPath: rootPath)
        }
        do {
            let socket = try Self.bindAndListen(rootPath, permissions: 0o600, backlog: backlog)
            try? socket.enableSenderCredentials()
            rootSocket = RootSocket(consume socket)
            ownRootSocketFile = fileIdentity(atPath: rootPath)
        } catch {
            rootSocketProblem = "cannot listen on \(rootPath): \(error.name)"
        }
    }

    /// What a service manager passed (`LISTEN_FDS`, `LISTEN_PID`, `LISTEN_FDNAMES`, from fd 3):
    /// at most one listening socket, and files it kept: keys (`pbkey-` names, KeyFDStore.swift)
    /// uids' shared memory roots (`pbshm-uid-`) and the store's state root (`pbshm-state`).
    private static func inheritedListener(keptFiles: inout [(name: String, file: CInt)]) throws(BrokerStartError)
        -> SeqpacketSocket?
    {
        guard let countText = getenv("LISTEN_FDS").map({ String(cString: $0) }),
              let pidText = getenv("LISTEN_PID").map({ String(cString: $0) }),
              let count = Int(countText), let pid = Int32(pidText), pid == getpid(), (1...65_536).contains(count)
        else { return nil }
        let names = getenv("LISTEN_FDNAMES").map { String(cString: $0).split(separator: ":", omittingEmptySubsequences: false).map(String.init) } ?? []
        unsetenv("LISTEN_FDS")
        unsetenv("LISTEN_PID")
        unsetenv("LISTEN_FDNAMES")
        var listenerFD: CInt?
        for index in 0..<count {
            let fd = CInt(3 + index)
            let name = index < names.count ? names[index] : ""
            if name.hasPrefix(StoredKey.prefix) || name.hasPrefix(ownerRootPrefix) || name == stateRootName {
                _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
                keptFiles.append((name, fd))
            } else if listenerFD == nil {
                listenerFD = fd
            } else {
                throw BrokerStartError(errno: .invalidArgument,
                                       reason: "socket activation passed more than one socket (\(name.isEmpty ? "fd \(fd)" : name)); the broker takes exactly one")
            }
        }
        guard let listenerFD else { return nil }
        let socket = SeqpacketSocket(adopting: Descriptor(adopting: listenerFD))
        guard (try? socket.socketType()) == CInt(SOCK_SEQPACKET.rawValue), (try? socket.isListening()) == true else {
            // The broker exits on this error, so closing the descriptor here changes nothing.
            throw BrokerStartError(errno: .invalidArgument,
                                   reason: "the inherited descriptor \(listenerFD) is not a listening SOCK_SEQPACKET socket")
        }
        try? socket.descriptor.setCloseOnExec()
        return socket
    }

    /// Makes sure the socket's directory is safe: private and ours for a per-user broker; owned
    /// by root (or us) and not writable by others for the system broker or a chosen path.
    private static func prepareSocketDirectory(for path: String, mode: BrokerConfiguration.Mode) throws(BrokerStartError) {
        guard let slash = path.lastIndex(of: "/"), slash != path.startIndex else { return }
        let directory = String(path[..<slash])
        let isDefaultUserPath = mode == .user && path == BrokerConfiguration.defaultSocketPath(mode: .user)
        do {
            try prepareDirectory(directory, mode: mode == .system ? 0o755 : 0o700, owner: geteuid(),
                                 private: isDefaultUserPath, allowRootOwner: !isDefaultUserPath)
        } catch {
            throw BrokerStartError(errno: error.errno, reason: error.reason)
        }
    }

    /// The lock that makes one broker per socket path. A broker that is just exiting still holds
    /// it for a moment (its socket file already gone, so clients start a new one): the lock is
    /// tried for up to two seconds before the path counts as taken.
    private static func lockPath(_ path: String) throws(BrokerStartError) -> FileLock {
        let deadline = monotonicNanoseconds() + 2_000_000_000
        while true {
            do {
                return try FileLock(path: path + ".lock", wait: false)
            } catch {
                guard error == .resourceTemporarilyUnavailable else {
                    throw BrokerStartError(errno: error, reason: "cannot lock \(path).lock: \(error.name)")
                }
                // A live broker keeps its socket; a departing one has already removed it.
                if fileExists(atPath: path) || monotonicNanoseconds() > deadline {
                    throw BrokerStartError(errno: .addressInUse, reason: "another broker is already serving \(path)")
                }
                usleep(10_000)
            }
        }
    }

    /// Binds and listens at `path`. The path lock proves no broker serves it, so a socket file
    /// left there is stale and removed; anything that is not a socket is left alone (EADDRINUSE).
    private static func listen(on path: String, mode: BrokerConfiguration.Mode, backlog: Int32) throws(BrokerStartError) -> SeqpacketSocket {
        if let isSocket = isSocketFile(atPath: path) {
            guard isSocket else {
                throw BrokerStartError(errno: .addressInUse, reason: "\(path) exists and is not a socket; not replacing it")
            }
            try? removeFile(atPath: path)
        }
        do {
            return try bindAndListen(path, permissions: mode == .system ? 0o666 : 0o600, backlog: backlog)
        } catch {
            throw BrokerStartError(errno: error, reason: "cannot listen on \(path): \(error.name)")
        }
    }

    private static func bindAndListen(_ path: String, permissions: mode_t, backlog: Int32) throws(Errno) -> SeqpacketSocket {
        let socket = try SeqpacketSocket(nonblocking: true)
        try socket.bind(path: path)
        // bind creates the file under the process umask; set the mode explicitly rather than
        // changing the umask, which is process-wide.
        do {
            try changeMode(atPath: path, to: permissions)
        } catch {
            try? removeFile(atPath: path)
            throw error
        }
        try socket.listen(backlog: backlog)
        return socket
    }
}
