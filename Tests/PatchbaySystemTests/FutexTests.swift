// futex(2) wait/wake and the shared-word atomics, on private and on memfd-shared memory.
import Glibc
import PatchbaySystem
import SystemPackage
import Testing

@Suite("Futex and SharedWord")
struct FutexTests {
    @Test("wait returns at once when the word differs from the expected value")
    func mismatchReturns() throws {
        let word = UnsafeMutablePointer<UInt32>.allocate(capacity: 1)
        defer { word.deallocate() }
        word.initialize(to: 5)
        let start = monotonicNanoseconds()
        // Without the EAGAIN path this would sleep for the whole 10 s.
        try Futex.wait(word, expected: 4, timeoutNanoseconds: 10_000_000_000)
        #expect(millisecondsSince(start) < 5_000)
    }

    @Test("wait on a matching word times out with ETIMEDOUT after its timeout")
    func timesOut() throws {
        let word = UnsafeMutablePointer<UInt32>.allocate(capacity: 1)
        defer { word.deallocate() }
        word.initialize(to: 0)
        let start = monotonicNanoseconds()
        expectErrno(.timedOut) { () throws(Errno) in try Futex.wait(word, expected: 0, timeoutNanoseconds: 25_000_000) }
        let elapsed = millisecondsSince(start)
        #expect(elapsed >= 24, "woke after \(elapsed) ms")
        // A timeout of more than a second is split into seconds and nanoseconds correctly.
        let longer = monotonicNanoseconds()
        expectErrno(.timedOut) { () throws(Errno) in try Futex.wait(word, expected: 0, timeoutNanoseconds: 1_010_000_000) }
        #expect(millisecondsSince(longer) >= 1_009)
    }

    @Test("wake with nobody waiting wakes nobody")
    func wakeWithoutWaiters() {
        let word = UnsafeMutablePointer<UInt32>.allocate(capacity: 1)
        defer { word.deallocate() }
        word.initialize(to: 0)
        #expect(Futex.wake(word) == 0)
        #expect(Futex.wake(word, count: 1) == 0)
    }

    @Test("a thread asleep on a word is woken by another thread; wake reports it")
    func crossThreadWake() throws {
        let word = UnsafeMutablePointer<UInt32>.allocate(capacity: 1)
        defer { word.deallocate() }
        word.initialize(to: 0)
        let done = try EventCounter()
        try runWaiter(on: Handoff(value: word), done: done.descriptor.rawValue)
        // Spin (no sleep) until the waiter is really asleep in the kernel: a wake then finds it.
        let woke = wakeOneSleeper(word)
        #expect(woke, "no thread was ever found asleep on the word")
        SharedWord.store(word, 1)
        Futex.wake(word)
        #expect(pollEvents(done.descriptor.rawValue, milliseconds: 10_000) & Int16(POLLIN) != 0,
                "the waiter did not finish")
    }

    @Test("futexes are shared: a wake through a second mapping of a memfd reaches a sleeper on the first")
    func sharedAcrossMappings() throws {
        let memory = try makeMemoryFile(name: "patchbay-systest-futex", sealable: false)
        try memory.truncate(to: pageSize)
        let first = try Mapping(memory, length: pageSize, writable: true)
        let second = try Mapping(memory, length: pageSize, writable: true)
        #expect(first.baseAddress != second.baseAddress)
        let waitWord = first.baseAddress.advanced(by: 64).assumingMemoryBound(to: UInt32.self)
        let wakeWord = second.baseAddress.advanced(by: 64).assumingMemoryBound(to: UInt32.self)
        SharedWord.store(waitWord, 0)
        let done = try EventCounter()
        try runWaiter(on: Handoff(value: waitWord), done: done.descriptor.rawValue)
        // A private futex is keyed by address and would never match; a shared one by page.
        #expect(wakeOneSleeper(wakeWord), "a wake through the other mapping never found the sleeper")
        SharedWord.store(wakeWord, 1)
        #expect(SharedWord.load(waitWord) == 1)
        Futex.wake(wakeWord)
        #expect(pollEvents(done.descriptor.rawValue, milliseconds: 10_000) & Int16(POLLIN) != 0)
    }

    @Test("SharedWord read-modify-writes return the old value and wrap")
    func atomics() {
        let word = UnsafeMutablePointer<UInt32>.allocate(capacity: 1)
        let wide = UnsafeMutablePointer<UInt64>.allocate(capacity: 1)
        defer { word.deallocate(); wide.deallocate() }
        word.initialize(to: 0)
        wide.initialize(to: 0)
        SharedWord.store(word, 7)
        #expect(SharedWord.load(word) == 7)
        #expect(SharedWord.increment(word) == 7)
        #expect(SharedWord.load(word) == 8)
        #expect(SharedWord.decrement(word) == 8)
        #expect(SharedWord.load(word) == 7)
        SharedWord.store(word, 0)
        #expect(SharedWord.decrement(word) == 0)
        #expect(SharedWord.load(word) == UInt32.max)
        #expect(SharedWord.increment(word) == UInt32.max)
        #expect(SharedWord.load(word) == 0)

        #expect(SharedWord.compareExchange(word, expected: 1, desired: 9) == false)
        #expect(SharedWord.load(word) == 0)
        #expect(SharedWord.compareExchange(word, expected: 0, desired: 9) == true)
        #expect(SharedWord.load(word) == 9)

        SharedWord.store(wide, 0x1234_5678_9ABC_DEF0)
        #expect(SharedWord.load(wide) == 0x1234_5678_9ABC_DEF0)
        SharedWord.fence()
        SharedWord.relax()
    }

    @Test("increments from two threads are never lost")
    func concurrentIncrements() throws {
        let word = Handoff(value: UnsafeMutablePointer<UInt32>.allocate(capacity: 1))
        defer { word.value.deallocate() }
        word.value.initialize(to: 0)
        let done = try EventCounter()
        let doneNumber = done.descriptor.rawValue
        for _ in 0..<2 {
            startThread {
                for _ in 0..<100_000 { SharedWord.increment(word.value) }
                var one: UInt64 = 1
                _ = write(doneNumber, &one, 8)
            }
        }
        var finished: UInt64 = 0
        while finished < 2 { finished += try done.consume() }
        #expect(SharedWord.load(word.value) == 200_000)
    }
}

/// Starts a thread that sleeps on `word` while it is 0 and then signals `done` (an eventfd).
private func runWaiter(on word: Handoff<UnsafeMutablePointer<UInt32>>, done: CInt) throws {
    startThread {
        while SharedWord.load(word.value) == 0 {
            try? Futex.wait(word.value, expected: 0, timeoutNanoseconds: 10_000_000_000)
        }
        var one: UInt64 = 1
        _ = write(done, &one, 8)
    }
}

/// Wakes one sleeper on `word`, retrying (spinning, not sleeping) until one is found or 10 s pass.
private func wakeOneSleeper(_ word: UnsafeMutablePointer<UInt32>) -> Bool {
    let deadline = monotonicNanoseconds() + 10_000_000_000
    while monotonicNanoseconds() < deadline {
        if Futex.wake(word, count: 1) == 1 { return true }
        sched_yield()
    }
    return false
}
