// epoll and eventfd on real descriptors.
import Glibc
import PatchbaySystem
import SystemPackage
import Testing

@Suite("Epoll: registrations, readiness, tokens, timeouts")
struct EpollTests {
    @Test("a pipe becomes readable when written; the token comes back with the event")
    func pipeReadiness() throws {
        let epoll = try Epoll()
        let pipe = try Pipe()
        try epoll.add(pipe.readEnd.rawValue, events: .readable, token: 42)
        #expect(try epoll.wait(timeoutMilliseconds: 0).isEmpty)

        try pipe.writeEnd.writeAll([1])
        let events = try epoll.wait(timeoutMilliseconds: 0)
        #expect(events.count == 1)
        #expect(events.first?.token == 42)
        #expect(events.first?.events == .readable)
        // Level-triggered: still ready until read.
        #expect(try epoll.wait(timeoutMilliseconds: 0).map(\.token) == [42])
        #expect(readNow(pipe.readEnd.rawValue) == [1])
        #expect(try epoll.wait(timeoutMilliseconds: 0).isEmpty)
    }

    @Test("modify changes the interest and the token; remove ends the registration")
    func modifyAndRemove() throws {
        let epoll = try Epoll()
        let pipe = try Pipe()
        try pipe.writeEnd.writeAll([1, 2])
        try epoll.add(pipe.readEnd.rawValue, events: .readable, token: 1)
        #expect(try epoll.wait(timeoutMilliseconds: 0).map(\.token) == [1])

        // A read end is never writable: with only that interest, nothing is reported.
        try epoll.modify(pipe.readEnd.rawValue, events: .writable, token: 2)
        #expect(try epoll.wait(timeoutMilliseconds: 0).isEmpty)

        try epoll.modify(pipe.readEnd.rawValue, events: .readable, token: 3)
        #expect(try epoll.wait(timeoutMilliseconds: 0).map(\.token) == [3])

        try epoll.remove(pipe.readEnd.rawValue)
        #expect(try epoll.wait(timeoutMilliseconds: 0).isEmpty)

        expectErrno(.noSuchFileOrDirectory) { () throws(Errno) in try epoll.remove(pipe.readEnd.rawValue) }
        expectErrno(.noSuchFileOrDirectory) { () throws(Errno) in
            try epoll.modify(pipe.readEnd.rawValue, events: .readable, token: 4)
        }
        try epoll.add(pipe.readEnd.rawValue, events: .readable, token: 5)
        expectErrno(.fileExists) { () throws(Errno) in try epoll.add(pipe.readEnd.rawValue, events: .readable, token: 6) }
        #expect(try epoll.wait(timeoutMilliseconds: 0).map(\.token) == [5])
    }

    @Test("registering what epoll cannot watch: EPERM for a regular file, EBADF for a closed number")
    func registrationErrors() throws {
        let directory = makeTemporaryDirectory()
        defer { removeTree(directory) }
        let epoll = try Epoll()
        let file = try openFile(directory + "/f", flags: O_RDWR | O_CREAT)
        expectErrno(.notPermitted) { () throws(Errno) in try epoll.add(file.rawValue, events: .readable, token: 1) }
        expectErrno(.badFileDescriptor) { () throws(Errno) in try epoll.add(-1, events: .readable, token: 1) }
        // An epoll instance cannot watch itself.
        expectErrno(.invalidArgument) { () throws(Errno) in
            try epoll.add(epoll.descriptorNumber, events: .readable, token: 1)
        }
    }

    @Test("writable ends are ready at once; a closed writer is a hang-up on the read end")
    func writableAndHangup() throws {
        let epoll = try Epoll()
        let pipe = try Pipe()
        try epoll.add(pipe.writeEnd.rawValue, events: .writable, token: 10)
        #expect(try epoll.wait(timeoutMilliseconds: 0).map(\.token) == [10])
        try epoll.remove(pipe.writeEnd.rawValue)

        try epoll.add(pipe.readEnd.rawValue, events: .readable, token: 11)
        let reader = pipe.readEnd
        _ = consume pipe.writeEnd
        // Waited for, not sampled: a child being spawned meanwhile holds the writer an instant.
        let events = try epoll.wait(timeoutMilliseconds: 10_000)
        #expect(events.count == 1)
        #expect(events.first?.token == 11)
        // Hang-up is reported even though it was not asked for.
        #expect(events.first?.events.contains(.hangup) == true)
        _ = consume reader
    }

    @Test("tokens route back exactly the ready registrations, all 64 bits of them")
    func tokensRouteBack() throws {
        let epoll = try Epoll()
        let tokens: [UInt64] = [0, 1, 0xFFFF_FFFF, 0x1_0000_0000, 0xDEAD_BEEF_CAFE_F00D, UInt64.max - 1, UInt64.max,
                                1 << 63]
        var readEnds: [CInt] = []
        var writeEnds: [CInt] = []
        defer { for fd in readEnds + writeEnds { close(fd) } }
        for token in tokens {
            let pipe = try Pipe()
            try epoll.add(pipe.readEnd.rawValue, events: .readable, token: token)
            readEnds.append(pipe.readEnd.release())
            writeEnds.append(pipe.writeEnd.release())
        }
        let ready = [1, 3, 4, 6, 7]
        for index in ready { #expect(write(writeEnds[index], "x", 1) == 1) }
        let events = try epoll.wait(timeoutMilliseconds: 0)
        #expect(Set(events.map(\.token)) == Set(ready.map { tokens[$0] }))
        #expect(events.count == ready.count)
        #expect(events.allSatisfy { $0.events == .readable })
    }

    @Test("maximum bounds one wait; the rest come with the next")
    func maximumPerWait() throws {
        let epoll = try Epoll()
        var ends: [CInt] = []
        defer { for fd in ends { close(fd) } }
        for token in 0..<10 {
            let pipe = try Pipe()
            try pipe.writeEnd.writeAll([1])
            try epoll.add(pipe.readEnd.rawValue, events: .readable, token: UInt64(token))
            ends.append(pipe.readEnd.release())
            ends.append(pipe.writeEnd.release())
        }
        let first = try epoll.wait(maximum: 3, timeoutMilliseconds: 0)
        #expect(first.count == 3)
        // Asking for more than 64 is capped at the internal buffer, not an overflow.
        let all = try epoll.wait(maximum: 1000, timeoutMilliseconds: 0)
        #expect(Set(all.map(\.token)) == Set(0..<10))
    }

    @Test("a wait with nothing ready lasts its timeout and returns nothing")
    func timeout() throws {
        let epoll = try Epoll()
        let pipe = try Pipe()
        try epoll.add(pipe.readEnd.rawValue, events: .readable, token: 1)
        let start = monotonicNanoseconds()
        let events = try epoll.wait(timeoutMilliseconds: 30)
        let elapsed = millisecondsSince(start)
        #expect(events.isEmpty)
        #expect(elapsed >= 29, "returned after \(elapsed) ms")
        #expect(elapsed < 2000)
    }

    @Test("a wait blocked in one thread is woken by an eventfd signalled from another")
    func crossThreadWake() throws {
        let epoll = try Epoll()
        let counter = try EventCounter()
        try epoll.add(counter.descriptor.rawValue, events: .readable, token: 77)
        let number = counter.descriptor.rawValue
        startThread {
            var one: UInt64 = 5
            _ = write(number, &one, 8)
        }
        let start = monotonicNanoseconds()
        let events = try epoll.wait(timeoutMilliseconds: 10_000)
        #expect(events.map(\.token) == [77])
        #expect(millisecondsSince(start) < 10_000)
        #expect(try counter.consume() == 5)
    }

    @Test("the epoll descriptor is itself readable while a registration is ready")
    func epollDescriptorReadable() throws {
        let epoll = try Epoll()
        let pipe = try Pipe()
        try epoll.add(pipe.readEnd.rawValue, events: .readable, token: 1)
        #expect(pollEvents(epoll.descriptorNumber, milliseconds: 0) == 0)
        try pipe.writeEnd.writeAll([1])
        #expect(pollEvents(epoll.descriptorNumber, milliseconds: 0) & Int16(POLLIN) != 0)
        #expect(try Descriptor(adopting: dup(epoll.descriptorNumber)).fileKind() == .anonymous)
    }
}

@Suite("EventCounter: eventfd counting")
struct EventCounterTests {
    @Test("signals add up; consume reads and resets; an empty non-blocking counter is EAGAIN")
    func counting() throws {
        let counter = try EventCounter(initialValue: 3, nonblocking: true)
        #expect(try counter.consume() == 3)
        expectErrno(.resourceTemporarilyUnavailable) { () throws(Errno) in _ = try counter.consume() }
        try counter.signal(2)
        try counter.signal(5)
        try counter.signal()
        #expect(try counter.consume() == 8)
        expectErrno(.resourceTemporarilyUnavailable) { () throws(Errno) in _ = try counter.consume() }
    }

    @Test("the counter cannot pass 2^64-2: a non-blocking signal past it is EAGAIN, and 2^64-1 is EINVAL")
    func overflow() throws {
        let counter = try EventCounter(nonblocking: true)
        try counter.signal(UInt64.max - 1)
        expectErrno(.resourceTemporarilyUnavailable) { () throws(Errno) in try counter.signal(1) }
        expectErrno(.invalidArgument) { () throws(Errno) in try counter.signal(UInt64.max) }
        #expect(try counter.consume() == UInt64.max - 1)
    }

    @Test("a blocking consume returns what another thread signalled")
    func blockingConsume() throws {
        let counter = try EventCounter()
        #expect(fcntl(counter.descriptor.rawValue, F_GETFL) & O_NONBLOCK == 0)
        let number = counter.descriptor.rawValue
        startThread {
            var value: UInt64 = 11
            _ = write(number, &value, 8)
        }
        #expect(try counter.consume() == 11)
    }

    @Test("release hands over an open eventfd; adopting wraps one")
    func releaseAndAdopt() throws {
        let raw = try EventCounter(initialValue: 4).release()
        #expect(fcntl(raw, F_GETFD) & FD_CLOEXEC != 0)
        let adopted = EventCounter(adopting: Descriptor(adopting: raw))
        #expect(try adopted.consume() == 4)
    }

    @Test("an eventfd is readable in epoll exactly while non-zero")
    func readinessFollowsValue() throws {
        let epoll = try Epoll()
        let counter = try EventCounter(nonblocking: true)
        try epoll.add(counter.descriptor.rawValue, events: [.readable, .writable], token: 3)
        let idle = try epoll.wait(timeoutMilliseconds: 0)
        #expect(idle.count == 1 && idle.first?.events == .writable)
        try counter.signal()
        let ready = try epoll.wait(timeoutMilliseconds: 0)
        #expect(ready.first?.events == [.readable, .writable])
        _ = try counter.consume()
        #expect(try epoll.wait(timeoutMilliseconds: 0).first?.events == .writable)
    }
}
