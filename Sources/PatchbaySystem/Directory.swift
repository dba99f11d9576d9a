package import SystemPackage
import Glibc
public import CPatchbayShims

/// Why a directory cannot hold a socket or a store safely: errno plus a sentence.
package struct DirectoryProblem: Error, Sendable {
    package var errno: Errno
    package var reason: String
}

/// Creates `path` (mode `mode`) if it is missing, then checks that what is there is safe to put
/// a socket or private files in:
/// - a real directory, not a symlink;
/// - owned by `owner` (or by root, when `allowRootOwner`);
/// - when `private`: no access at all for group or others (a per-user directory, 0700);
/// - otherwise: not writable by group or others, unless the sticky bit protects entries from
///   being replaced by other users (like /tmp).
package func prepareDirectory(
    _ path: String, mode: mode_t, owner: uid_t, private: Bool, allowRootOwner: Bool = false
) throws(DirectoryProblem) {
    if mkdir(path, mode) == 0 {
        // mkdir applies the umask; make the mode exact.
        _ = chmod(path, mode)
    } else if Errno.current != .fileExists {
        let error = Errno.current
        throw DirectoryProblem(errno: error, reason: "cannot create \(path): \(error.name)")
    }
    var info = stat()
    guard lstat(path, &info) == 0 else {
        let error = Errno.current
        throw DirectoryProblem(errno: error, reason: "cannot inspect \(path): \(error.name)")
    }
    guard info.st_mode & S_IFMT == S_IFDIR else {
        throw DirectoryProblem(errno: .notDirectory, reason: "\(path) is not a directory (a symlink or a file is in the way)")
    }
    guard info.st_uid == owner || (allowRootOwner && info.st_uid == 0) else {
        throw DirectoryProblem(errno: .permissionDenied,
                               reason: "\(path) belongs to uid \(info.st_uid), not to uid \(owner); refusing to use it")
    }
    let permissions = info.st_mode & 0o7777
    if `private` {
        guard permissions & 0o077 == 0 else {
            throw DirectoryProblem(errno: .permissionDenied,
                                   reason: "\(path) has mode \(String(permissions, radix: 8)); it must be private (0700)")
        }
    } else if permissions & 0o022 != 0 && permissions & S_ISVTX == 0 {
        throw DirectoryProblem(errno: .permissionDenied,
                               reason: "\(path) is writable by other users (mode \(String(permissions, radix: 8))) and not sticky")
    }
}

/// Starts a detached thread running `body` (the corresponding C call is `pthread_create`). For
/// blocking work that must stay off both event loops and Swift's concurrency pool.
package func startThread(_ body: @escaping @Sendable () -> Void) {
    final class Box: @unchecked Sendable {
        let body: @Sendable () -> Void
        init(_ body: @escaping @Sendable () -> Void) { self.body = body }
    }
    let context = Unmanaged.passRetained(Box(body)).toOpaque()
    var thread = pthread_t()
    let result = pthread_create(&thread, nil, { raw in
        let box = Unmanaged<Box>.fromOpaque(raw!).takeRetainedValue()
        box.body()
        return nil
    }, context)
    precondition(result == 0, "pthread_create failed: \(result)")
    pthread_detach(thread)
}

/// A recursive mutual-exclusion lock for objects that serialise their operations and return
/// non-Sendable results from them, which `Mutex.withLock` does not allow. Recursive, so a callback
/// run under it (a CAPS `receive` body) may call the same object again. A compare-and-swap to take
/// and an exchange to give back when uncontended, a private futex when not (`pb_lock` in the C
/// shim). Public so that `locked` is specialised and inlined in the library (see
/// SharedWords.swift); not API.
public final class Lock: @unchecked Sendable {
    @usableFromInline let state = UnsafeMutablePointer<pb_lock>.allocate(capacity: 1)

    public init() {
        state.initialize(to: pb_lock(state: 0, depth: 0, owner: 0))
    }

    deinit {
        state.deallocate()
    }

    @inlinable @inline(__always)
    public func locked<R: ~Copyable, E: Error>(_ body: () throws(E) -> R) throws(E) -> R {
        pb_lock_acquire(state)
        defer { pb_lock_release(state) }
        return try body()
    }
}

/// A new file with no name (`O_TMPFILE`) in the file system of `directory`, open read-write, with
/// `mode`: it goes when its last descriptor closes.
package func openUnnamedFile(in directory: CInt, mode: mode_t) throws(Errno) -> Descriptor {
    let fd = openat(directory, ".", pb_o_tmpfile() | O_RDWR | O_CLOEXEC, mode)
    guard fd >= 0 else { throw Errno.current }
    return Descriptor(adopting: fd)
}
