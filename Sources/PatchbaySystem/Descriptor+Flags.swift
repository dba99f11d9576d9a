package import SystemPackage
import Glibc
import CPatchbayShims

extension Descriptor {
    /// Lets the descriptor survive `exec` (clears `FD_CLOEXEC`).
    package borrowing func clearCloseOnExec() throws(Errno) {
        _ = try syscallRetrying { pb_clear_cloexec(rawValue) }
    }

    /// Closes the descriptor at `exec` (sets `FD_CLOEXEC`).
    /// Gives the file to `uid`:`gid` with permission bits `mode` (`fchown`, `fchmod`).
    package borrowing func setOwnerAndMode(uid: UInt32, gid: UInt32, mode: UInt32) throws(Errno) {
        _ = try syscallRetrying { fchown(rawValue, uid, gid) }
        _ = try syscallRetrying { fchmod(rawValue, mode_t(mode)) }
    }

    package borrowing func setCloseOnExec() throws(Errno) {
        _ = try syscallRetrying { fcntl(rawValue, F_SETFD, FD_CLOEXEC) }
    }

    /// Moves the file offset to `offset` from the start (`lseek(SEEK_SET)`).
    package borrowing func seek(to offset: Int) throws(Errno) {
        _ = try syscallRetrying { lseek(rawValue, off_t(offset), SEEK_SET) }
    }

    /// `discardPendingPackets(_:maximumPackets:closing:)` on this socket.
    @discardableResult
    package borrowing func discardPendingPackets(maximumPackets: Int, closing close: (CInt) -> Void) -> Int {
        PatchbaySystem.discardPendingPackets(rawValue, maximumPackets: maximumPackets, closing: close)
    }

    /// A new, read-only open file description of the same file, through `/proc/self/fd`: unlike
    /// `dup`, whoever receives it cannot write, whatever the original allows. Never waits for a
    /// lease on the file (`EAGAIN` instead, as `openProcessFile`); the new description is
    /// blocking, as any other.
    package borrowing func reopenReadOnly() throws(Errno) -> Descriptor {
        let reopened = try openFile("/proc/self/fd/\(rawValue)", flags: O_RDONLY | O_NONBLOCK)
        _ = try syscallRetrying { fcntl(reopened.rawValue, F_SETFL, 0) }
        return reopened
    }

    /// Whether `FD_CLOEXEC` is set.
    package borrowing func isCloseOnExec() throws(Errno) -> Bool {
        let flags = try syscallRetrying { fcntl(rawValue, F_GETFD) }
        return flags & FD_CLOEXEC != 0
    }
}

/// Reads and throws away up to `maximumPackets` packets waiting on the socket `fd`, without
/// blocking, into a small buffer; returns how many there were. Read with room for descriptors:
/// any that came with the packets go to `close` (with a plain `recv` the kernel would close them
/// in this thread, and a lingering TCP socket's last close waits).
@discardableResult
package func discardPendingPackets(_ fd: CInt, maximumPackets: Int, closing close: (CInt) -> Void) -> Int {
    withUnsafeTemporaryAllocation(of: CInt.self, capacity: maximumDescriptorsReceived) { fds in
        var scratch = (UInt64(0), UInt64(0), UInt64(0), UInt64(0), UInt64(0), UInt64(0), UInt64(0), UInt64(0))
        var count = 0
        while count < maximumPackets {
            var received: CInt = 0
            var flags: CInt = 0
            let length = withUnsafeMutableBytes(of: &scratch) {
                pb_recv_with_fds(fd, $0.baseAddress, $0.count, fds.baseAddress, CInt(fds.count), &received, &flags, 1)
            }
            for index in 0..<Int(received) { close(fds[index]) }
            if length < 0 { break }  // (EINTR is retried inside)
            count += 1
        }
        return count
    }
}
