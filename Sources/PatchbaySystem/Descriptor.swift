package import SystemPackage
import Glibc
import Synchronization
package import CPatchbayShims

/// An open file descriptor that this value owns: it is closed exactly once, when the value ends.
///
/// `Descriptor` is `~Copyable`, so ownership is visible in the types: `consuming` hands it on,
/// `borrowing` uses it. `release()` gives the raw number up without closing it (for `exec`, or for
/// sending it away and then closing on purpose).
package struct Descriptor: ~Copyable {
    /// The kernel's number for the descriptor. Valid as long as this value lives.
    package let rawValue: CInt

    /// Takes ownership of `rawValue`, which this value will close.
    package init(adopting rawValue: CInt) {
        precondition(rawValue >= 0, "Descriptor(adopting:) needs a valid descriptor")
        self.rawValue = rawValue
    }

    deinit {
        // close(2) must not be retried on EINTR on Linux: the descriptor is gone either way.
        _ = Glibc.close(rawValue)
    }

    /// Closes the descriptor now, at this point of the program (not wherever the optimiser
    /// places the end of the value's life): for a pipe's write end whose closing a reader waits
    /// for.
    package consuming func close() {
        let fd = rawValue
        discard self
        _ = Glibc.close(fd)
    }

    /// Gives up ownership and returns the raw descriptor, which the caller must now close.
    package consuming func release() -> CInt {
        let fd = rawValue
        discard self
        return fd
    }

    /// Reads up to `buffer.count` bytes; 0 means end of file. The corresponding C call is `read`.
    package borrowing func read(into buffer: UnsafeMutableRawBufferPointer) throws(Errno) -> Int {
        try syscallRetrying { Glibc.read(rawValue, buffer.baseAddress, buffer.count) }
    }

    /// Writes up to `buffer.count` bytes and returns how many were written.
    /// The corresponding C call is `write`.
    package borrowing func write(_ buffer: UnsafeRawBufferPointer) throws(Errno) -> Int {
        try syscallRetrying { Glibc.write(rawValue, buffer.baseAddress, buffer.count) }
    }

    /// Writes every byte, looping over short writes.
    package borrowing func writeAll(_ bytes: some Sequence<UInt8>) throws(Errno) {
        let array = Array(bytes)
        var offset = 0
        while offset < array.count {
            let result = array.withUnsafeBytes { raw in
                Result { () throws(Errno) -> Int in try write(UnsafeRawBufferPointer(rebasing: raw[offset...])) }
            }
            offset += try result.get()
        }
    }

    /// Reads until end of file.
    package borrowing func readToEnd(limit: Int = .max) throws(Errno) -> [UInt8] {
        var result: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while result.count < limit {
            let want = min(chunk.count, limit - result.count)
            let n = try chunk.withUnsafeMutableBytes { raw in
                Result { () throws(Errno) -> Int in try read(into: UnsafeMutableRawBufferPointer(rebasing: raw[0..<want])) }
            }.get()
            if n == 0 { break }
            result.append(contentsOf: chunk[0..<n])
        }
        return result
    }

    /// Sets or clears `O_NONBLOCK` on the open file description.
    package borrowing func setNonblocking(_ on: Bool) throws(Errno) {
        _ = try syscallRetrying { pb_set_nonblocking(rawValue, on ? 1 : 0) }
    }

    /// What kind of file this descriptor refers to. The corresponding C call is `statx` with
    /// `AT_STATX_DONT_SYNC`, so a network or FUSE file system cannot make it block.
    package borrowing func fileKind() throws(Errno) -> FileKind {
        var mode: UInt32 = 0
        _ = try syscallRetrying { pb_file_type(rawValue, &mode) }
        return FileKind(mode: mode_t(mode))
    }

    /// The file's size in bytes, from `fstat`.
    package borrowing func size() throws(Errno) -> Int {
        var info = stat()
        _ = try syscallRetrying { fstat(rawValue, &info) }
        return Int(info.st_size)
    }
}

/// The kind of file behind a descriptor, as `fstat` reports it.
package enum FileKind: UInt8, Sendable, CaseIterable {
    case unknown = 0
    case regular, directory, socket, pipe, characterDevice, blockDevice, symbolicLink
    /// Descriptors with no inode type: eventfd, epoll, timerfd, signalfd and friends.
    case anonymous

    package init(mode: mode_t) {
        switch mode & S_IFMT {
        case S_IFREG: self = .regular
        case S_IFDIR: self = .directory
        case S_IFSOCK: self = .socket
        case S_IFIFO: self = .pipe
        case S_IFCHR: self = .characterDevice
        case S_IFBLK: self = .blockDevice
        case S_IFLNK: self = .symbolicLink
        case 0: self = .anonymous
        default: self = .unknown
        }
    }

    package var name: String {
        switch self {
        case .unknown: "unknown"
        case .regular: "file"
        case .directory: "directory"
        case .socket: "socket"
        case .pipe: "pipe"
        case .characterDevice: "character-device"
        case .blockDevice: "block-device"
        case .symbolicLink: "symlink"
        case .anonymous: "anonymous"
        }
    }
}

/// A new close-on-exec descriptor for the open file description behind `rawValue`, which the
/// caller does not own. The corresponding C call is `fcntl(F_DUPFD_CLOEXEC)`.
package func duplicateDescriptor(_ rawValue: CInt) throws(Errno) -> Descriptor {
    Descriptor(adopting: try syscallRetrying { fcntl(rawValue, F_DUPFD_CLOEXEC, 0) })
}

/// Opens a file. The corresponding C call is `open`; `O_CLOEXEC` is always added.
package func openFile(_ path: String, flags: CInt, mode: mode_t = 0o600) throws(Errno) -> Descriptor {
    let fd = try syscallRetrying { Glibc.open(path, flags | O_CLOEXEC, mode) }
    return Descriptor(adopting: fd)
}

/// The two ends of a pipe, both close-on-exec. The corresponding C call is `pipe2`.
@frozen
package struct Pipe: ~Copyable {
    package var readEnd: Descriptor
    package var writeEnd: Descriptor

    package init() throws(Errno) {
        var fds: [CInt] = [-1, -1]
        _ = try syscallRetrying { pb_pipe_cloexec(&fds) }
        readEnd = Descriptor(adopting: fds[0])
        writeEnd = Descriptor(adopting: fds[1])
    }
}

/// Number of descriptors a process has open, counted from `/proc/PID/fd`.
package func openDescriptorCount(pid: pid_t) throws(Errno) -> Int {
    guard let dir = opendir("/proc/\(pid)/fd") else { throw Errno.current }
    defer { closedir(dir) }
    var count = 0
    while let entry = readdir(dir) {
        let isDot = withUnsafeBytes(of: entry.pointee.d_name) { raw in raw[0] == UInt8(ascii: ".") }
        if !isDot { count += 1 }
    }
    // opendir holds one descriptor of its own while counting; do not report it.
    return pid == getpid() ? count - 1 : count
}

/// Closes a descriptor another process handed over, without letting that process's choice of
/// file make the close wait: the last `close` of a TCP socket with `SO_LINGER` set (and data the
/// peer does not take) waits up to the linger time, which the sender chose. Lingering is turned
/// off first, so the kernel finishes the socket in the background. (Any other holder of the same
/// socket sees `SO_LINGER` off from then on.) A sender that keeps a copy can set it again
/// between the two calls, so callers that must not wait at all still close off their hot thread.
package func closeHandedOver(_ fd: CInt) {
    var info = stat()
    if fstat(fd, &info) == 0, info.st_mode & S_IFMT == S_IFSOCK {
        var current = linger()
        var size = socklen_t(MemoryLayout<linger>.size)
        // Any l_linger: -1 is stored as "no timeout" and read back as a negative number.
        if getsockopt(fd, SOL_SOCKET, SO_LINGER, &current, &size) == 0, current.l_onoff != 0 {
            var off = linger(l_onoff: 0, l_linger: 0)
            _ = setsockopt(fd, SOL_SOCKET, SO_LINGER, &off, socklen_t(MemoryLayout<linger>.size))
        }
    }
    _ = close(fd)
}

extension Descriptor {
    /// Whether `poll` reports the descriptor hung up (`POLLHUP`: a socket whose peer is gone),
    /// without waiting.
    package borrowing func isHungUp() -> Bool {
        var poller = pollfd(fd: rawValue, events: 0, revents: 0)
        return poll(&poller, 1, 0) > 0 && poller.revents & Int16(POLLHUP) != 0
    }
}

/// Whether closing `fd` could free descriptors that wait inside it: any local socket. One with
/// messages queued may hold `SCM_RIGHTS` (a message of 0 bytes can carry them, so the queued byte
/// count says nothing), one listening may hold connections that do, and a peer can queue them on
/// a connected one until the moment it is closed. The last close of one of those can be the last
/// close of a file someone else chose, and wait.
package func mayHoldDescriptors(_ fd: CInt) -> Bool {
    var info = stat()
    guard fstat(fd, &info) == 0, info.st_mode & S_IFMT == S_IFSOCK else { return false }
    var domain: CInt = 0
    var length = socklen_t(MemoryLayout<CInt>.size)
    return getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &length) != 0 || domain == AF_UNIX
}

/// Closes descriptors a peer handed over without the calling thread waiting on any of them: each
/// goes to the closing thread of the peer it came from (`ClosingThreads`, `closeHandedOver`
/// there), so a peer that makes its closes wait holds up only its own. Not only local sockets
/// (which may hold others, `mayHoldDescriptors`): the last close of many files takes a while the
/// sender chose in bulk (an inotify instance waits for a grace period, about 8 ms; an AF_PACKET
/// socket from a user namespace about 12 ms; 16 to a message, message after message: the
/// thirteenth attack round stalled root's services to a few calls a second that way).
package enum PeerDescriptors {
    private static let threads = ClosingThreads()

    /// Closes `fd`, a descriptor this code owns that `peer` chose, on `peer`'s closing thread.
    package static func close(_ fd: CInt, of peer: UInt64) {
        threads.close(raw: fd, of: peer)
    }

    /// For a local socket this code keeps, and still closes itself, that `peer` can queue
    /// descriptors into: its last close happens on `peer`'s closing thread
    /// (`ClosingThreads.closeLast`). It is shut down for reading first, so nothing more can be
    /// queued in it meanwhile. (Whether its queue is empty cannot be told: a message of 0 bytes
    /// can carry descriptors, and a local socket's queue is charged to the sender's memory.)
    package static func closeLast(of fd: CInt, for peer: UInt64) {
        shutdown(fd, CInt(SHUT_RD))
        threads.closeLast(of: fd, for: peer)
    }

    /// Closes `fd`, a socket of this code's own that `peer` could queue descriptors into, on
    /// `peer`'s closing thread (at once if it cannot hold any).
    package static func closeOwn(_ fd: CInt, of peer: UInt64) {
        guard mayHoldDescriptors(fd) else { return closeHandedOver(fd) }
        shutdown(fd, CInt(SHUT_RD))
        threads.close(raw: fd, of: peer)
    }

    /// How many descriptors `peer` handed over wait to be closed.
    package static func outstanding(of peer: UInt64) -> Int {
        threads.outstanding(of: peer)
    }

    /// How many of one peer's descriptors may wait to be closed before a CAPS port takes no more
    /// from it: a peer whose closes do not finish (a file it chose blocks them) could otherwise
    /// fill this process's descriptor table.
    package static let bound = 64

    /// Whether `peer` has `bound` descriptors waiting to be closed.
    package static func pastBound(of peer: UInt64) -> Bool { outstanding(of: peer) >= bound }
}
