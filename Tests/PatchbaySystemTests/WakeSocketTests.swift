// Wake-ups between CAPS peers that do not trust each other: a datagram socket pair, one end per
// side, so whatever one side does to its own end never makes the other side's call wait.
import Glibc
import PatchbaySystem
import SystemPackage
import Testing

@Suite("Wake sockets: neither side can make the other wait")
struct WakeSocketTests {
    func isReadable(_ fd: CInt) -> Bool {
        var entry = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        return poll(&entry, 1, 0) == 1 && entry.revents & Int16(POLLIN) != 0
    }

    @Test("a wake makes the reader readable; a drain empties it and returns at once on an empty end, blocking flag or not")
    func wakeAndDrain() throws {
        let pair = try WakeSocket.pair()
        let reader = pair.reader.rawValue
        #expect(!isReadable(reader))
        _ = fcntl(reader, F_SETFL, fcntl(reader, F_GETFL) & ~O_NONBLOCK)  // as a careless owner could
        #expect(WakeSocket.drain(reader, of: 1) == 0)
        WakeSocket.wake(pair.writer.rawValue)
        WakeSocket.wake(pair.writer.rawValue)
        #expect(isReadable(reader))
        #expect(WakeSocket.drain(reader, of: 1) == 2)
        #expect(!isReadable(reader))
    }

    @Test("waking a reader that never drains returns at once when its queue is full, even on a blocking writer end")
    func wakeNeverBlocks() throws {
        let pair = try WakeSocket.pair()
        let writer = pair.writer.rawValue
        _ = fcntl(writer, F_SETFL, fcntl(writer, F_GETFL) & ~O_NONBLOCK)
        for _ in 0..<10_000 { WakeSocket.wake(writer) }
        let held = WakeSocket.drain(pair.reader.rawValue, of: 1, limit: 100_000)
        #expect(held > 0 && held < 10_000, "the queue is bounded by the kernel: \(held)")
    }

    // Where the kernel cannot refuse them, this shows only that a drain leaks none (a plain recv
    // would close them too, in the draining thread); that it closes them off its own thread is
    // TwoUserLingerTests.wakeSocketDrainClosesElsewhere (a close that would wait a minute).
    @Test("neither end takes descriptors where the kernel can refuse them (EPERM); where it cannot, a drain takes them and closes them, leaking none")
    func noDescriptors() throws {
        let pair = try WakeSocket.pair()
        var ends: [CInt] = [-1, -1]
        #expect(pipe(&ends) == 0)
        defer { if ends[0] >= 0 { close(ends[0]) }; close(ends[1]) }
        func send(from fd: CInt) -> Int {
            var byte: UInt8 = 1
            return withUnsafeBytes(of: &byte) { raw in [ends[0]].withUnsafeBufferPointer { SeqpacketSocket.sendRaw(fd, raw, $0, nonblocking: true) } }
        }
        if WakeSocket.refuseDescriptors(pair.reader.rawValue) {
            #expect(send(from: pair.writer.rawValue) == -1 && errno == EPERM)
            #expect(send(from: pair.reader.rawValue) == -1 && errno == EPERM)
            // A kernel without SO_PASSRIGHTS, as far as this end goes:
            var on: CInt = 1
            #expect(setsockopt(pair.reader.rawValue, SOL_SOCKET, 83, &on, socklen_t(MemoryLayout<CInt>.size)) == 0)
        }
        #expect(send(from: pair.writer.rawValue) == 1)
        close(ends[0])
        ends[0] = -1
        // The pipe's read end is now only in the reader's queue: the drain takes it and closes it
        // (on the peer's closing thread; a pipe's end at once), which the write end sees.
        #expect(WakeSocket.drain(pair.reader.rawValue, of: 1) == 1)
        var writer = pollfd(fd: ends[1], events: Int16(POLLOUT), revents: 0)
        let deadline = monotonicNanoseconds() + 10_000_000_000
        while poll(&writer, 1, 0) >= 0, writer.revents & Int16(POLLERR) == 0, monotonicNanoseconds() < deadline { usleep(1_000) }
        #expect(writer.revents & Int16(POLLERR) != 0, "the descriptor a drain received was never closed")
    }

    @Test("a reader whose writer is gone is not readable (no hang-up to spin on)")
    func writerGone() throws {
        var pair = try WakeSocket.pair()
        let reader = pair.reader.rawValue
        pair.writer = Descriptor(adopting: open("/dev/null", O_RDONLY))  // the writer's end closes
        #expect(!isReadable(reader))
        WakeSocket.wake(pair.writer.rawValue)  // not a socket now: ignored, never fatal
        #expect(!isReadable(reader))
    }
}
