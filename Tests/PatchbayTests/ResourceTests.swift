// What a client can make the broker hold: back-pressure on unread replies, the disconnect of a
// client that stays stuck, and the descriptor budget. Each test watches the broker's own
// descriptor table (/proc/PID/fd), the thing an attacker would try to fill.
import Glibc
import Patchbay
import PatchbayProtocol
import PatchbaySystem
import Synchronization
import Testing

@Suite("Resources")
struct ResourceTests {
    /// `open /dev/shmem/new` requests: each reply carries a new memfd, which waits in the broker
    /// (as a duplicate) while the client does not read.
    static func anonymousOpen(_ id: Int) -> [UInt8] {
        Request.namespace(.open(path: "/dev/shmem/new", flags: [])).encode(requestID: UInt64(id))
    }

    /// Sends `count` anonymous opens on `fd` from a thread of its own, blocking whenever the
    /// socket is full, and counts what went out; stops at the first error.
    static func flood(_ fd: CInt, count: Int) -> Flood {
        let flood = Flood()
        startThread {
            for id in 1...count {
                let sent = anonymousOpen(id).withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, CInt(MSG_NOSIGNAL)) }
                if sent < 0 {
                    flood.failed.store(true, ordering: .releasing)
                    break
                }
                flood.sent.add(1, ordering: .releasing)
            }
            flood.done.store(true, ordering: .releasing)
        }
        return flood
    }

    final class Flood: Sendable {
        let sent = Atomic<Int>(0)
        let failed = Atomic<Bool>(false)
        let done = Atomic<Bool>(false)
    }

    /// The most descriptors the broker may hold for one flooding client: 64 queued, at most one
    /// batch of 64 frames read before the pause took effect, and its connection.
    static let floodBound = 64 + 64 + 1

    @Test("a client that does not read its replies stops being read: the broker holds at most a bounded queue, and every reply arrives once it reads")
    func backPressure() throws {
        let broker = try TestBroker()
        let observer = try broker.connect()
        _ = try observer.status()
        let baseline = try broker.descriptorCount()
        let flooder = try RawClient(path: broker.socketPath)
        let total = 3000
        let flood = Self.flood(flooder.socket.rawValue, count: total)
        // Watch the broker while the flood runs and nobody reads: replies pile up to the bound and
        // no further. Without back-pressure the broker would read all 3,000 requests in this time
        // and hold a descriptor for each.
        var most = 0
        let deadline = monotonicNanoseconds() + 2_000_000_000
        while monotonicNanoseconds() < deadline {
            most = max(most, try broker.descriptorCount() - baseline)
            usleep(5_000)
        }
        #expect(most >= 64, "the flood never filled the queue (\(most) held)")
        #expect(most <= Self.floodBound, "the broker held \(most) descriptors for one client")
        let sentWhileUnread = flood.sent.load(ordering: .acquiring)
        #expect(sentWhileUnread < total, "the broker kept reading a client that never reads")
        // Another client is not slowed down.
        #expect(try observer.status().clients == 2)
        // Reading everything: every request gets its reply with its descriptor, in order.
        for id in 1...total {
            var message = try flooder.socket.receive(into: flooder.buffer)
            let frame = try Frame.decode(Array(flooder.buffer[0..<message.length])[...])
            #expect(frame.kind == .reply && frame.requestID == UInt64(id), "reply \(id)")
            #expect(message.descriptors.count == 1)
            while message.descriptors.takeFirst() != nil {}
        }
        let finished = flood.done.load(ordering: .acquiring) && !flood.failed.load(ordering: .acquiring)
        #expect(finished)
        _ = consume flooder
        #expect(try broker.waitForDescriptorCount(baseline) == baseline)
    }

    @Test("a client that leaves its full queue unread is disconnected after --stuck-client-timeout, and what it held is freed")
    func stuckClientDisconnected() throws {
        let broker = try TestBroker(["--stuck-client-timeout", "300ms"])
        let observer = try broker.connect()
        _ = try observer.status()
        let baseline = try broker.descriptorCount()
        let flooder = try RawClient(path: broker.socketPath)
        let flood = Self.flood(flooder.socket.rawValue, count: 3000)
        // The queue fills; then the client, never reading, is let go, and everything the broker
        // held for it is closed (its connection too: the test still holds its own end).
        let deadline = monotonicNanoseconds() + 10_000_000_000
        while try broker.descriptorCount() < baseline + 64, monotonicNanoseconds() < deadline { usleep(2_000) }
        #expect(try broker.descriptorCount() >= baseline + 64)
        #expect(try broker.waitForDescriptorCount(baseline) == baseline)
        #expect(try observer.status().clients == 1)
        // Its sends fail once the broker has closed the connection; what was sent before arrives,
        // then the end of the connection.
        var replies = 0
        while true {
            guard var message = try? flooder.socket.receive(into: flooder.buffer), message.length > 0 else { break }
            replies += 1
            while message.descriptors.takeFirst() != nil {}
        }
        while !flood.done.load(ordering: .acquiring) { usleep(1_000) }
        let failed = flood.failed.load(ordering: .acquiring)
        #expect(failed)
        #expect(replies < 3000)
    }

    @Test("the broker reads a paused client again as soon as its queue drains")
    func pauseAndResume() throws {
        let broker = try TestBroker(["--stuck-client-timeout", "1h"])
        let client = try RawClient(path: broker.socketPath)
        for round in 0..<3 {
            var sent = 0
            while sent < 100_000, (try? client.socket.send(Self.anonymousOpen(sent + 1), nonblocking: true)) != nil {
                sent += 1
            }
            for _ in 0..<sent {
                var message = try client.socket.receive(into: client.buffer)
                #expect(message.length > 0, "round \(round)")
                while message.descriptors.takeFirst() != nil {}
            }
            // The same connection works normally afterwards.
            let (frame, _) = try client.exchange(Request.status.encode(requestID: 999))
            #expect(frame.kind == .reply && frame.requestID == 999)
        }
    }
}
