// Paths on the file system: the few calls the broker makes on names rather than descriptors.

package import SystemPackage
import Glibc
import CPatchbayShims

/// The device and inode of the file at `path` itself (a final symlink is not followed), or nil
/// when nothing is there. The corresponding C call is `lstat`.
package func fileIdentity(atPath path: String) -> (device: UInt64, inode: UInt64)? {
    var info = stat()
    guard lstat(path, &info) == 0 else { return nil }
    return (UInt64(info.st_dev), UInt64(info.st_ino))
}

/// For each file (`fileIdentity`), whether a local socket in this network namespace is bound to
/// it, from the kernel's socket table (sock_diag); nil when that cannot be read.
package func unixSocketsBound(to files: [(device: UInt64, inode: UInt64)]) -> [Bool]? {
    let devices = files.map(\.device)
    let inodes = files.map(\.inode)
    var bound = [UInt8](repeating: 0, count: files.count)
    guard pb_unix_sockets_bound_to(devices, inodes, CInt(files.count), &bound) == 0 else { return nil }
    return bound.map { $0 != 0 }
}

/// Whether the file at `path` itself is a socket; nil when nothing is there (`lstat`).
package func isSocketFile(atPath path: String) -> Bool? {
    var info = stat()
    guard lstat(path, &info) == 0 else { return nil }
    return info.st_mode & S_IFMT == S_IFSOCK
}

/// The owner uid of the socket file at `path` itself; nil when nothing, or no socket, is there.
package func socketFileOwner(atPath path: String) -> UInt32? {
    var info = stat()
    guard lstat(path, &info) == 0, info.st_mode & S_IFMT == S_IFSOCK else { return nil }
    return info.st_uid
}

/// Checks that this process has `count` free descriptors now (opening and closing as many): a
/// call whose answer brings descriptors from the broker is refused before it asks, when what
/// the broker would do on the way could not be handed over. `EMFILE` (or `ENFILE`) otherwise.
package func checkDescriptorRoom(_ count: Int) throws(Errno) {
    var opened: [CInt] = []
    defer { for fd in opened { close(fd) } }
    for _ in 0..<count {
        let fd = open("/dev/null", O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw Errno.current }
        opened.append(fd)
    }
}

/// Whether anything exists at `path` (`access(F_OK)`).
package func fileExists(atPath path: String) -> Bool {
    access(path, F_OK) == 0
}

/// Removes the name `path` (`unlink`).
package func removeFile(atPath path: String) throws(Errno) {
    _ = try syscallRetrying { unlink(path) }
}

/// Sets the permission bits of the file at `path` (`chmod`).
package func changeMode(atPath path: String, to mode: UInt32) throws(Errno) {
    _ = try syscallRetrying { chmod(path, mode) }
}

/// Gives the file at `path` itself (a final symlink is not followed) to `uid`:`gid` (`lchown`).
package func changeOwner(atPath path: String, uid: UInt32, gid: UInt32) throws(Errno) {
    _ = try syscallRetrying { lchown(path, uid, gid) }
}
