package import SystemPackage
import Glibc
package import CPatchbayShims

/// What the kernel knows of a file (`statx`), times in nanoseconds since the epoch.
package struct FileStatus: Sendable, Equatable {
    package var size: Int
    /// 512-byte blocks actually allocated (populated pages, for memory files).
    package var blocks: Int
    /// Type and permission bits (`st_mode`).
    package var mode: UInt32
    package var uid: UInt32
    package var gid: UInt32
    package var linkCount: UInt32
    package var inode: UInt64
    package var device: UInt64
    package var accessTime: Int64
    package var modifyTime: Int64
    package var changeTime: Int64
    /// Creation time, 0 when the file system does not record it.
    package var birthTime: Int64
}

extension FileStatus {
    init(_ raw: pb_file_status) {
        self.init(size: Int(raw.size), blocks: Int(raw.blocks), mode: raw.mode, uid: raw.uid, gid: raw.gid,
                  linkCount: raw.nlink, inode: raw.inode, device: raw.device, accessTime: raw.access_ns,
                  modifyTime: raw.modify_ns, changeTime: raw.change_ns, birthTime: raw.birth_ns)
    }
}

/// `rename(from, to)` that fails with `EEXIST` when `to` exists (renameat2 `RENAME_NOREPLACE`).
package func renameWithoutReplacing(_ from: String, _ to: String) throws(Errno) {
    _ = try syscallRetrying { pb_rename_noreplace(from, to) }
}

/// Swaps the entries `from` and `to` in one step (renameat2 `RENAME_EXCHANGE`): both must exist.
package func renameExchanging(_ from: String, _ to: String) throws(Errno) {
    _ = try syscallRetrying { pb_rename_exchange(from, to) }
}

/// What the kernel knows of `name` in `directory`, found without opening it (a symbolic link is
/// not followed). The corresponding C call is `statx(dirfd, name, AT_SYMLINK_NOFOLLOW)`.
package func fileStatus(in directory: borrowing Descriptor, _ name: String) throws(Errno) -> FileStatus {
    var raw = pb_file_status()
    _ = try syscallRetrying { pb_statx_at(directory.rawValue, name, &raw) }
    return FileStatus(raw)
}

extension Descriptor {
    /// The corresponding C call is `statx(fd, "", AT_EMPTY_PATH)`.
    package borrowing func status() throws(Errno) -> FileStatus {
        var raw = pb_file_status()
        _ = try syscallRetrying { pb_fstatx(rawValue, &raw) }
        return FileStatus(raw)
    }

    /// Device and inode, without asking a remote file system (`AT_STATX_DONT_SYNC`).
    package borrowing func identity() throws(Errno) -> (device: UInt64, inode: UInt64) {
        var device: UInt64 = 0
        var inode: UInt64 = 0
        _ = try syscallRetrying { pb_file_identity(rawValue, &device, &inode) }
        return (device, inode)
    }

    /// Whether two descriptors of this process refer to the same open file description. nil when
    /// the kernel will not say (kcmp unavailable). The corresponding C call is `kcmp(KCMP_FILE)`.
    package static func sameOpenFile(_ first: CInt, _ second: CInt) -> Bool? {
        let result = pb_same_open_file(first, second)
        return result < 0 ? nil : result == 0
    }

    /// Takes a POSIX write lock on the whole file, waiting for it. Such locks belong to the
    /// process, so they exclude other processes (threads of one process need their own lock).
    /// The corresponding C call is `fcntl(F_SETLKW)`.
    package borrowing func lockFile() throws(Errno) {
        _ = try syscallRetrying { pb_lock_file(rawValue, 1) }
    }

    /// `lockFile` without waiting: false when another process holds a lock on the file.
    /// The corresponding C call is `fcntl(F_SETLK)`.
    package borrowing func tryLockFile() throws(Errno) -> Bool {
        if pb_lock_file(rawValue, 0) == 0 { return true }
        let error = Errno.current
        if error == .resourceTemporarilyUnavailable || error == .permissionDenied { return false }
        throw error
    }

    /// The corresponding C call is `fcntl(F_SETLK, F_UNLCK)`.
    package borrowing func unlockFile() {
        _ = pb_unlock_file(rawValue)
    }

    /// The access mode the descriptor was opened with (`O_RDONLY`, `O_WRONLY` or `O_RDWR`).
    package borrowing func accessMode() throws(Errno) -> CInt {
        try syscallRetrying { fcntl(rawValue, F_GETFL) } & O_ACCMODE
    }

    /// Where `/proc/self/fd/N` points: a path, or a pseudo name like `/memfd:x (deleted)`.
    package borrowing func procLink() -> String? {
        var buffer = [CChar](repeating: 0, count: 4096)
        let length = readlink("/proc/self/fd/\(rawValue)", &buffer, buffer.count - 1)
        guard length > 0 else { return nil }
        return String(decoding: buffer[0..<length].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    /// Reads at `offset` without moving the file offset. The corresponding C call is `pread`.
    package borrowing func read(into buffer: UnsafeMutableRawBufferPointer, at offset: Int) throws(Errno) -> Int {
        try syscallRetrying { pread(rawValue, buffer.baseAddress, buffer.count, off_t(offset)) }
    }

    /// Writes at `offset` without moving the file offset. The corresponding C call is `pwrite`.
    package borrowing func write(_ buffer: UnsafeRawBufferPointer, at offset: Int) throws(Errno) -> Int {
        try syscallRetrying { pwrite(rawValue, buffer.baseAddress, buffer.count, off_t(offset)) }
    }
}

/// Opens `path` relative to the directory `directory`. The corresponding C call is `openat`;
/// `O_CLOEXEC` and `O_NOFOLLOW` are always added.
package func openFile(in directory: borrowing Descriptor, _ path: String, flags: CInt, mode: mode_t = 0o600)
    throws(Errno) -> Descriptor
{
    let fd = try syscallRetrying { openat(directory.rawValue, path, flags | O_CLOEXEC | O_NOFOLLOW, mode) }
    return Descriptor(adopting: fd)
}
