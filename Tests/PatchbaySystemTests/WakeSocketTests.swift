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
        #expect(WakeSocket.drain(reader) == 0)
        WakeSocket.wake(pair.writer.rawValue)
        WakeSocket.wake(pair.writer.rawValue)
        #expect(isReadable(reader))
        #expect(WakeSocket.drain(reader) == 2)
        #expect(!isReadable(reader))
    }

    @Test("waking a reader that never drains returns at once when its queue is full, even on a blocking writer end")
    func wakeNeverBlocks() throws {
        let pair = try WakeSocket.pair()
        let writer = pair.writer.rawValue
        _ = fcntl(writer, F_SETFL, fcntl(writer, F_GETFL) & ~O_NONBLOCK)
        for _ in 0..<10_000 { WakeSocket.wake(writer) }
        let held = WakeSocket.drain(pair.reader.rawValue, limit: 100_000)
        #expect(held > 0 && held < 10_000, "the queue is bounded by the kernel: \(held)")
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
