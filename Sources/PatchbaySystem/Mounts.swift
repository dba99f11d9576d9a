// Mounts: the broker gives each uid's named shared memory a tmpfs of its own, so the kernel
// enforces each uid's byte quota whatever route the bytes take (create, ftruncate, write, mmap).

package import SystemPackage
import Glibc

/// Mounts a new tmpfs at `path`, at most `bytes` big (rounded up to pages) and holding at most
/// `files` files, mode 0700, without devices, set-id or executables. Needs `CAP_SYS_ADMIN`.
/// The corresponding C call is `mount("tmpfs", path, "tmpfs", ...)`.
package func mountMemoryFileSystem(at path: String, bytes: Int, files: Int) throws(Errno) {
    let options = "size=\(bytes),nr_inodes=\(files),mode=0700"
    _ = try syscallRetrying {
        mount("tmpfs", path, "tmpfs", UInt(MS_NOSUID | MS_NODEV | MS_NOEXEC), options)
    }
}

/// Detaches the file system mounted at `path` (`umount2(MNT_DETACH)`): it goes once nothing
/// uses it any more.
package func unmount(at path: String) throws(Errno) {
    _ = try syscallRetrying { umount2(path, CInt(MNT_DETACH)) }
}

/// Detaches every mount below `directory`, deepest first (from `/proc/self/mountinfo`), so the
/// directory can be removed.
package func unmountEverything(under directory: String) {
    guard let table = try? openFile("/proc/self/mountinfo", flags: O_RDONLY), let bytes = try? table.readToEnd() else { return }
    let mountPoints = String(decoding: bytes, as: UTF8.self).split(separator: "\n").compactMap { line -> String? in
        let fields = line.split(separator: " ")
        return fields.count > 4 ? String(fields[4]) : nil
    }
    for point in mountPoints.filter({ $0.hasPrefix(directory + "/") }).sorted(by: { $0.count > $1.count }) {
        try? unmount(at: point)
    }
}

/// Whether `path` is the root of a mount: a directory on another device than its parent, or
/// its own parent (`/`).
package func isMountPoint(_ path: String) -> Bool {
    var own = stat()
    var parent = stat()
    guard lstat(path, &own) == 0, lstat(path + "/..", &parent) == 0 else { return false }
    return own.st_dev != parent.st_dev || own.st_ino == parent.st_ino
}

/// Space on the file system of an open directory (`fstatvfs`).
package struct FileSystemUsage: Sendable, Equatable {
    package var totalBytes: Int
    package var usedBytes: Int
    package var totalFiles: Int
    package var usedFiles: Int
}

extension Descriptor {
    /// The usage of the file system this descriptor's file lives on.
    package borrowing func fileSystemUsage() throws(Errno) -> FileSystemUsage {
        var info = statvfs()
        _ = try syscallRetrying { fstatvfs(rawValue, &info) }
        let block = Int(info.f_frsize > 0 ? info.f_frsize : info.f_bsize)
        return FileSystemUsage(totalBytes: Int(info.f_blocks) * block, usedBytes: Int(info.f_blocks - info.f_bfree) * block,
                               totalFiles: Int(info.f_files), usedFiles: Int(info.f_files - info.f_ffree))
    }
}
