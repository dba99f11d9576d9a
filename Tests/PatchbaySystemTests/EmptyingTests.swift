// Emptying a refused socket (`ClosingThreads.emptyAndClose`): what a peer queued in a local socket
// is taken out and closed without a close that waits, however it is nested; past the budget, what
// is left is handed back open.
import Glibc
import PatchbaySystem
import Synchronization
import SystemPackage
import Testing

/// A TCP listener on 127.0.0.1 with a small receive buffer that never accepts: what its
/// connections send stays unread. Closing it resets them.
private struct DeafTCPListener: ~Copyable {
    let fd: CInt
    let port: UInt16

    init() throws {
        fd = socket(AF_INET, CInt(SOCK_STREAM.rawValue) | CInt(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw Errno.current }
        var small: CInt = 4096
        _ = setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &small, socklen_t(MemoryLayout<CInt>.size))
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = UInt32(0x7F00_0001).bigEndian
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let listening = fd
        let bound = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { pointer in
                bind(listening, pointer, length) == 0 && listen(listening, 64) == 0
                    && getsockname(listening, pointer, &length) == 0
            }
        }
        guard bound else {
            let error = Errno.current
            close(fd)
            throw error
        }
        port = UInt16(bigEndian: address.sin_port)
    }

    /// A TCP socket to this listener whose last close would wait a minute: `SO_LINGER` on, its
    /// send queue full.
    func lingeringSocket() throws -> CInt {
        let socket = Glibc.socket(AF_INET, CInt(SOCK_STREAM.rawValue) | CInt(SOCK_CLOEXEC.rawValue), 0)
        guard socket >= 0 else { throw Errno.current }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = port.bigEndian
        address.sin_addr.s_addr = UInt32(0x7F00_0001).bigEndian
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(socket, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        var minute = linger(l_onoff: 1, l_linger: 60)
        guard connected == 0, setsockopt(socket, SOL_SOCKET, SO_LINGER, &minute, socklen_t(MemoryLayout<linger>.size)) == 0 else {
            let error = Errno.current
            close(socket)
            throw error
        }
        let chunk = [UInt8](repeating: 7, count: 65536)
        while chunk.withUnsafeBytes({ send(socket, $0.baseAddress, $0.count, CInt(MSG_DONTWAIT)) }) > 0 {}
        return socket
    }

    deinit { close(fd) }
}

/// Sends `descriptors` on `socket` with `bytes`, then closes them here.
private func queue(_ descriptors: [CInt], on socket: CInt, bytes: [UInt8] = [1]) throws {
    let sent = bytes.withUnsafeBytes { raw in
        descriptors.withUnsafeBufferPointer { SeqpacketSocket.sendRaw(socket, raw, $0) }
    }
    guard sent == bytes.count else { throw Errno.current }
    for fd in descriptors { close(fd) }
}

private func localPair(_ type: __socket_type) throws -> (CInt, CInt) {
    var pair: [CInt] = [-1, -1]
    guard socketpair(AF_UNIX, CInt(type.rawValue) | CInt(SOCK_CLOEXEC.rawValue), 0, &pair) == 0 else { throw Errno.current }
    return (pair[0], pair[1])
}

/// What `fd` is, as /proc names it ("socket:[inode]").
private func link(_ fd: CInt) -> String {
    var buffer = [CChar](repeating: 0, count: 256)
    let length = readlink("/proc/self/fd/\(fd)", &buffer, buffer.count - 1)
    return length > 0 ? String(decoding: buffer[0..<length].map { UInt8(bitPattern: $0) }, as: UTF8.self) : ""
}

/// Runs `body` on a thread of its own; its result, or nil if it took more than 20 s (a close that
/// waited: the thread is left behind).
private func within20Seconds<T: Sendable>(_ body: @escaping @Sendable () -> T) throws -> T? {
    var ends: [CInt] = [-1, -1]
    guard pipe(&ends) == 0 else { throw Errno.current }
    let result = Mutex<T?>(nil)
    let signal = ends[1]
    startThread {
        let value = body()
        result.withLock { $0 = value }
        var byte: UInt8 = 1
        _ = Glibc.write(signal, &byte, 1)
    }
    var poller = pollfd(fd: ends[0], events: Int16(POLLIN), revents: 0)
    guard poll(&poller, 1, 20_000) == 1 else { return nil }
    close(ends[0])
    close(ends[1])
    return result.withLock { $0 }
}

@Suite("Emptying a refused socket")
struct EmptyingTests {
    @Test("lingering TCP sockets queued in a stream socket, a 0-byte datagram and a listener's pending connection, all inside one seqpacket socket, with a pipe and /dev/null: every one closed at once, nothing left")
    func nestedLingeringSocketsCloseAtOnce() throws {
        let listener = try DeafTCPListener()
        var links: Set<String> = []
        let (outerSender, outer) = try localPair(SOCK_SEQPACKET)
        // A stream socket holding a lingering socket, with bytes.
        let (streamSender, stream) = try localPair(SOCK_STREAM)
        let first = try listener.lingeringSocket()
        links.formUnion([link(first), link(stream)])
        try queue([first], on: streamSender, bytes: [1, 2, 3])
        close(streamSender)
        // A datagram socket holding one in a message of no bytes.
        let (datagramSender, datagram) = try localPair(SOCK_DGRAM)
        let second = try listener.lingeringSocket()
        links.formUnion([link(second), link(datagram)])
        try queue([second], on: datagramSender, bytes: [])
        close(datagramSender)
        // An abstract-address listener whose pending connection holds one.
        let name = "patchbay-systest-emptying-\(getpid())-\(monotonicNanoseconds())"
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in raw.copyBytes(from: [0] + Array(name.utf8)) }
        let length = socklen_t(MemoryLayout<sa_family_t>.size + 1 + name.utf8.count)
        let local = socket(AF_UNIX, CInt(SOCK_SEQPACKET.rawValue) | CInt(SOCK_CLOEXEC.rawValue), 0)
        let caller = socket(AF_UNIX, CInt(SOCK_SEQPACKET.rawValue) | CInt(SOCK_CLOEXEC.rawValue), 0)
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                bind(local, $0, length) == 0 && listen(local, 8) == 0 && connect(caller, $0, length) == 0
            }
        }
        #expect(connected)
        let third = try listener.lingeringSocket()
        links.formUnion([link(third), link(local)])
        try queue([third], on: caller)
        close(caller)
        // All of it, a pipe's end and /dev/null in the outer socket, this side's copies closed.
        let pipe = try Pipe()
        // (A copy: `queue` closes what it sends, and the pipe closes its own ends. Sending the
        // pipe's own number closed it twice, the second time whatever another test had opened
        // under that number meanwhile.)
        let pipeEnd = fcntl(pipe.readEnd.rawValue, F_DUPFD_CLOEXEC, 0)
        let null = open("/dev/null", O_RDONLY | O_CLOEXEC)
        links.insert(link(outer))
        try queue([stream, datagram, local, pipeEnd, null], on: outerSender, bytes: [])
        close(outerSender)
        #expect(openCount(of: links) == 1, "only the outer socket is in this process's table; the rest is in its queue")
        let left = try within20Seconds { ClosingThreads.emptyAndClose(outer) }
        #expect(left == [], "emptying waited on a close (nil), or left descriptors open: \(left?.map { link($0) } ?? [])")
        #expect(openCount(of: links) == 0, "nothing it took out was left in this process's table")
        withExtendedLifetime(pipe) {}
    }

    @Test("a TCP socket handed in itself (a /net connection refused), lingering with its send queue full: closed at once, nothing left")
    func tcpSocketClosesAtOnce() throws {
        let listener = try DeafTCPListener()
        let socket = try listener.lingeringSocket()
        let identity: Set<String> = [link(socket)]
        let left = try within20Seconds { ClosingThreads.emptyAndClose(socket) }
        #expect(left == [], "emptying waited on the close (nil), or left it open")
        #expect(openCount(of: identity) == 0)
    }

    @Test("a refused connection whose peer connected and closed having sent nothing is closed at once, stream or seqpacket, not handed to a closing thread (a connect-and-close loop costs a few system calls each)",
          arguments: [SOCK_STREAM, SOCK_SEQPACKET])
    func emptyRefusedConnectionClosesAtOnce(_ type: __socket_type) throws {
        let threads = ClosingThreads()
        let (peer, refused) = try localPair(type)
        close(peer)
        threads.closeRefused(refused, of: 7)
        #expect(threads.outstanding(of: 7) == 0, "handed to the closing thread")
        // One that holds a descriptor is not closed here.
        let (sender, holder) = try localPair(type)
        let null = open("/dev/null", O_RDONLY | O_CLOEXEC)
        try queue([null], on: sender)
        close(sender)
        threads.closeRefused(holder, of: 8)
        #expect(threads.outstanding(of: 8) <= 1)
    }

    @Test("a chain of local sockets deeper than the budget: emptied down to the budget, the rest handed back open, one socket, for a closing thread")
    func pastTheBudgetIsHandedBack() throws {
        var inner = open("/dev/null", O_RDONLY | O_CLOEXEC)
        for _ in 0..<(Int(ClosingThreads.emptyingBudget) + 8) {
            let (sender, holder) = try localPair(SOCK_SEQPACKET)
            try queue([inner], on: sender)
            close(sender)
            inner = holder
        }
        let left = ClosingThreads.emptyAndClose(inner)
        #expect(left.count == 1)
        #expect(left.first.map { link($0).hasPrefix("socket:") } == true, "handed back: \(left.map { "\($0) \(link($0))" })")
        // The rest of the chain: 7 sockets and /dev/null, closed here (nothing in it waits).
        for fd in left { close(fd) }
    }
}

@Suite("PeerDescriptors: a peer's files are closed on its own thread")
struct PeerDescriptorTests {
    @Test("every descriptor a peer handed over is closed on that peer's closing thread, not the caller's: a plain pipe end queued behind a close that waits stays open until that one finishes")
    func closedOnThePeersThread() throws {
        let listener = try DeafTCPListener()
        let peer = UInt64.random(in: 1 << 40 ..< 1 << 50)
        // The peer's closing thread held up: a local socket holding a TCP socket lingering a minute.
        let (holder, wrapper) = try localPair(SOCK_SEQPACKET)
        try queue([try listener.lingeringSocket()], on: holder)
        close(holder)
        PeerDescriptors.close(wrapper, of: peer)
        // A pipe's write end from the same peer: closed here, its reader would see the end at once.
        var ends: [CInt] = [-1, -1]
        #expect(pipe(&ends) == 0)
        defer { close(ends[0]) }
        PeerDescriptors.close(ends[1], of: peer)
        var reader = pollfd(fd: ends[0], events: Int16(POLLIN), revents: 0)
        #expect(poll(&reader, 1, 0) == 0, "the pipe was closed on the calling thread")
        #expect(PeerDescriptors.outstanding(of: peer) == 2)
        // The listener gone, the lingering close ends (reset), and the pipe's follows.
        _ = consume listener
        reader.revents = 0
        #expect(poll(&reader, 1, 30_000) == 1 && reader.revents & Int16(POLLHUP) != 0)
    }
}
