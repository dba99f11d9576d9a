package import SystemPackage
import Glibc
package import CPatchbayShims

/// An epoll instance. Each registration carries a 64-bit token that comes back with its events.
package struct Epoll: ~Copyable {
    package struct Events: OptionSet, Sendable {
        package let rawValue: UInt32
        package init(rawValue: UInt32) { self.rawValue = rawValue }
        package static let readable = Events(rawValue: 0x001)
        package static let writable = Events(rawValue: 0x004)
        package static let error = Events(rawValue: 0x008)
        package static let hangup = Events(rawValue: 0x010)
        /// `EPOLLRDHUP`: the peer shut its writing down (or closed); reads now return end of file.
        package static let readHangup = Events(rawValue: 0x2000)
        /// `EPOLLET`: reported once per change, not while it lasts.
        package static let edgeTriggered = Events(rawValue: 1 << 31)
    }

    package struct Event: Sendable {
        package var events: Events
        package var token: UInt64
    }

    private let descriptor: Descriptor

    /// The epoll descriptor: itself readable when any registered descriptor is ready.
    package var descriptorNumber: CInt { descriptor.rawValue }

    /// The corresponding C call is `epoll_create1(EPOLL_CLOEXEC)`.
    package init() throws(Errno) {
        descriptor = Descriptor(adopting: try syscallRetrying { pb_epoll_create() })
    }

    package borrowing func add(_ fd: CInt, events: Events, token: UInt64) throws(Errno) {
        _ = try syscallRetrying { pb_epoll_ctl(descriptor.rawValue, 1, fd, events.rawValue, token) }
    }

    package borrowing func modify(_ fd: CInt, events: Events, token: UInt64) throws(Errno) {
        _ = try syscallRetrying { pb_epoll_ctl(descriptor.rawValue, 3, fd, events.rawValue, token) }
    }

    package borrowing func remove(_ fd: CInt) throws(Errno) {
        _ = try syscallRetrying { pb_epoll_ctl(descriptor.rawValue, 2, fd, 0, 0) }
    }

    /// Waits up to `timeoutMilliseconds` (-1: forever) and returns the ready registrations.
    /// An interrupted wait returns no events rather than throwing.
    package borrowing func wait(maximum: Int = 64, timeoutMilliseconds: CInt) throws(Errno) -> [Event] {
        let capacity = min(maximum, 64)
        var events = [UInt32](repeating: 0, count: capacity)
        var tokens = [UInt64](repeating: 0, count: capacity)
        let count = pb_epoll_wait(descriptor.rawValue, &events, &tokens, CInt(capacity), timeoutMilliseconds)
        if count < 0 {
            let error = Errno.current
            if error == .interrupted { return [] }
            throw error
        }
        return (0..<Int(count)).map { Event(events: Events(rawValue: events[$0]), token: tokens[$0]) }
    }
}

/// An eventfd: a 64-bit counter that is readable while non-zero. The corresponding C call is
/// `eventfd`.
package struct EventCounter: ~Copyable {
    package let descriptor: Descriptor

    package init(initialValue: UInt32 = 0, nonblocking: Bool = false) throws(Errno) {
        descriptor = Descriptor(adopting: try syscallRetrying { pb_eventfd(initialValue, nonblocking ? 1 : 0) })
    }

    /// Gives up ownership of the eventfd and returns its number, for objects that live as long
    /// as the process.
    package consuming func release() -> CInt {
        descriptor.release()
    }

    package init(adopting descriptor: consuming Descriptor) {
        self.descriptor = descriptor
    }

    /// Adds `value` to the counter, waking readers.
    package borrowing func signal(_ value: UInt64 = 1) throws(Errno) {
        var value = value
        _ = try syscallRetrying { Glibc.write(descriptor.rawValue, &value, 8) }
    }

    /// Reads and resets the counter; blocks while it is zero unless non-blocking (`EAGAIN`).
    package borrowing func consume() throws(Errno) -> UInt64 {
        var value: UInt64 = 0
        _ = try syscallRetrying { Glibc.read(descriptor.rawValue, &value, 8) }
        return value
    }
}

/// futex(2) on a 32-bit word that may live in memory shared between processes.
package enum Futex {
    /// Sleeps while `*word == expected`. Returns normally when woken, when the value differed
    /// (`EAGAIN` is not an error here) or on a signal; throws `ETIMEDOUT` on timeout.
    package static func wait(
        _ word: UnsafeMutablePointer<UInt32>, expected: UInt32, timeoutNanoseconds: Int64 = -1
    ) throws(Errno) {
        if pb_futex_wait(word, expected, timeoutNanoseconds) == -1 {
            let error = Errno.current
            if error == .resourceTemporarilyUnavailable || error == .interrupted { return }
            throw error
        }
    }

    /// The most words one `waitAny` watches (the kernel's limit).
    package static let waitAnyLimit = 128

    /// Sleeps until one of `waiters` (at most `waitAnyLimit`, each with its expected value and
    /// `flags` 2) is woken; returns at once when one no longer holds its value, or on a signal.
    /// Returns the index of the word woken, nil for the other two. Throws `ENOSYS` on a kernel
    /// older than 5.16.
    package static func waitAny(_ waiters: UnsafeMutableBufferPointer<pb_futex_waiter>) throws(Errno) -> Int? {
        let woken = pb_futex_waitv(waiters.baseAddress, UInt32(waiters.count))
        if woken >= 0 { return Int(woken) }
        let error = Errno.current
        if error == .resourceTemporarilyUnavailable || error == .interrupted { return nil }
        throw error
    }

    /// A `waitAny` entry for a 32-bit word shared between processes (`FUTEX_32`).
    package static func waiter(_ word: UnsafeMutablePointer<UInt32>, expected: UInt32) -> pb_futex_waiter {
        pb_futex_waiter(expected: UInt64(expected), address: UInt64(UInt(bitPattern: word)), flags: 2, reserved: 0)
    }

    /// Wakes up to `count` sleepers; returns how many were woken.
    @discardableResult
    package static func wake(_ word: UnsafeMutablePointer<UInt32>, count: CInt = .max) -> Int {
        Int(pb_futex_wake(word, count))
    }
}

/// Bytes from the kernel's CSPRNG. The corresponding C call is `getrandom(flags: 0)`, which
/// blocks only until the pool is first initialised and never falls back to anything weaker.
package func secureRandomBytes(into buffer: UnsafeMutableRawBufferPointer) throws(Errno) {
    if pb_getrandom(buffer.baseAddress, buffer.count) != 0 { throw Errno.current }
}

/// Monotonic time in nanoseconds (`CLOCK_MONOTONIC`), for deadlines and durations.
package func monotonicNanoseconds() -> UInt64 {
    var now = timespec()
    clock_gettime(CLOCK_MONOTONIC, &now)
    return UInt64(now.tv_sec) * 1_000_000_000 + UInt64(now.tv_nsec)
}

/// Formats nanoseconds for people (the CLI's tables, the broker's monitor details): `850 ns`, `12.3 µs`, `4.56 ms`, `1.2 s`, `3m 20s`.
package func formatDuration(nanoseconds: UInt64) -> String {
    let value = Double(nanoseconds)
    switch nanoseconds {
    case ..<1_000: return "\(nanoseconds) ns"
    case ..<1_000_000: return String(format1(value / 1e3)) + " µs"
    case ..<1_000_000_000: return String(format1(value / 1e6)) + " ms"
    case ..<60_000_000_000: return String(format1(value / 1e9)) + " s"
    default:
        let seconds = nanoseconds / 1_000_000_000
        if seconds < 3600 { return "\(seconds / 60)m \(seconds % 60)s" }
        return "\(seconds / 3600)h \(seconds % 3600 / 60)m"
    }
}

private func format1(_ value: Double) -> String {
    let rounded = (value * 10).rounded() / 10
    return rounded == rounded.rounded() && rounded >= 100 ? String(Int(rounded)) : String(rounded)
}

/// A signalfd for SIGTERM, SIGINT and SIGHUP, which are blocked in the calling thread so they
/// arrive here instead of killing the process; an event loop reads them like any other input.
package struct TerminationSignals: ~Copyable {
    package let descriptor: Descriptor

    package init() throws(Errno) {
        descriptor = Descriptor(adopting: try syscallRetrying { pb_termination_signalfd() })
    }

    /// The next pending signal number, or nil when none is pending.
    package borrowing func next() -> CInt? {
        let signal = pb_read_signalfd(descriptor.rawValue)
        return signal < 0 ? nil : signal
    }
}

/// A one-way wake-up between two processes that do not trust each other: a datagram socket pair
/// whose ends are two open file descriptions, one held by each side. Neither side can change how
/// the other's end behaves (`O_NONBLOCK` lives in the description), every call here is
/// non-blocking by itself (`MSG_DONTWAIT`), a full socket means its reader is woken already, and
/// a datagram pair reports no hang-up when the writer goes, so it is readable only when woken.
package enum WakeSocket {
    /// The two ends of one wake-up.
    @frozen
    package struct Pair: ~Copyable {
        /// Read (drained) by the side that is woken.
        package var reader: Descriptor
        /// Written by the side that wakes it.
        package var writer: Descriptor
    }

    /// A new pair, both ends close-on-exec and non-blocking, and neither taking descriptors where
    /// the kernel can refuse them (`SO_PASSRIGHTS` off, Linux 6.16): a peer's `sendmsg` with
    /// `SCM_RIGHTS` to either end fails with `EPERM`. (Received, a descriptor's last close could
    /// wait, a lingering TCP socket's for an hour, in whichever thread drains or closes the end.)
    package static func pair() throws(Errno) -> Pair {
        var fds: [CInt] = [-1, -1]
        let type = CInt(SOCK_DGRAM.rawValue) | CInt(SOCK_CLOEXEC.rawValue) | CInt(SOCK_NONBLOCK.rawValue)
        _ = try syscallRetrying { socketpair(AF_UNIX, type, 0, &fds) }
        for fd in fds { refuseDescriptors(fd) }
        return Pair(reader: Descriptor(adopting: fds[0]), writer: Descriptor(adopting: fds[1]))
    }

    /// `SO_PASSRIGHTS` (asm-generic/socket.h, Linux 6.16; the C library's headers here predate it).
    static let passRights: CInt = 83

    /// Turns `SO_PASSRIGHTS` off on a local socket; false on a kernel without it (`ENOPROTOOPT`),
    /// where `drain` still keeps what arrives off the draining thread.
    @discardableResult
    package static func refuseDescriptors(_ fd: CInt) -> Bool {
        var off: CInt = 0
        return setsockopt(fd, SOL_SOCKET, passRights, &off, socklen_t(MemoryLayout<CInt>.size)) == 0
    }

    /// Turns `SO_PASSRIGHTS` back on: only for the project's tests, which play a kernel that
    /// cannot refuse descriptors on a wake socket.
    package static func acceptDescriptors(_ fd: CInt) {
        var on: CInt = 1
        _ = setsockopt(fd, SOL_SOCKET, passRights, &on, socklen_t(MemoryLayout<CInt>.size))
    }

    /// Wakes the reader: one 1-byte datagram. A full socket (the reader is woken already) or a
    /// reader that is gone is not an error.
    package static func wake(_ writer: CInt) {
        var byte: UInt8 = 1
        _ = Glibc.send(writer, &byte, 1, CInt(MSG_DONTWAIT) | CInt(MSG_NOSIGNAL))
    }

    /// Empties the reader's end without waiting; returns how many wake-ups it held (at most
    /// `limit` are read per call). Read with room for descriptors: on a kernel that cannot refuse
    /// them (`pair`), any that `peer` sent anyway are closed on its closing thread, never here (a
    /// plain `recv` would have the kernel close them in this thread).
    @discardableResult
    package static func drain(_ reader: CInt, of peer: UInt64, limit: Int = 1024) -> Int {
        discardPendingPackets(reader, maximumPackets: limit) { PeerDescriptors.close($0, of: peer) }
    }
}
