// The CAPS ports' lock (`Lock`, `pb_lock` in the C shim): mutual exclusion across threads,
// recursion, and a waiter that has to sleep on the futex until the holder lets go.
import Glibc
import PatchbaySystem
import Synchronization
import Testing

@Suite("Lock")
struct LockTests {
    /// A counter that only the lock protects: plain loads and stores, no atomics.
    final class Counter: @unchecked Sendable {
        var value = 0
    }

    @Test("four threads incrementing under the lock, some of them recursively, lose no increment")
    func exclusion() throws {
        let lock = Lock()
        let counter = Counter()
        let rounds = 100_000
        @Sendable func work(_ thread: Int) {
            for round in 0..<rounds {
                lock.locked {
                    if round % 3 == thread % 3 {
                        // Taken again by the thread that holds it: must not deadlock.
                        lock.locked { counter.value += 1 }
                    } else {
                        counter.value += 1
                    }
                }
            }
        }
        // EventCounter is not copyable: three of them, one per thread.
        let first = try EventCounter(), second = try EventCounter(), third = try EventCounter()
        let events = [first.descriptor.rawValue, second.descriptor.rawValue, third.descriptor.rawValue]
        for (index, descriptor) in events.enumerated() {
            startThread {
                work(index + 1)
                var one: UInt64 = 1
                _ = write(descriptor, &one, 8)
            }
        }
        work(0)
        for descriptor in events {
            #expect(pollEvents(descriptor, milliseconds: 60_000) & Int16(POLLIN) != 0, "a thread did not finish")
        }
        #expect(lock.locked { counter.value } == 4 * rounds)
    }

    @Test("a thread kept waiting past the spin sleeps, is woken by the release, and gets the lock")
    func sleeperIsWoken() throws {
        let lock = Lock()
        let counter = Counter()
        let trying = Atomic<Bool>(false)
        let acquired = Atomic<Bool>(false)
        let done = try EventCounter()
        let descriptor = done.descriptor.rawValue
        let handoff = Handoff(value: (lock, counter))
        lock.locked {
            startThread {
                let (lock, counter) = handoff.value
                trying.store(true, ordering: .releasing)
                lock.locked {
                    acquired.store(true, ordering: .releasing)
                    counter.value += 1
                }
                var one: UInt64 = 1
                _ = write(descriptor, &one, 8)
            }
            // Held until the other thread is trying, then long past its short spin (100 rounds):
            // it has to sleep on the futex, and only the release can wake it.
            while !trying.load(ordering: .acquiring) { sched_yield() }
            for _ in 0..<200_000 { SharedWord.relax() }
            let early = acquired.load(ordering: .acquiring)
            #expect(!early, "the lock let a second thread in")
            counter.value += 1
        }
        #expect(pollEvents(descriptor, milliseconds: 60_000) & Int16(POLLIN) != 0, "the waiting thread never got the lock")
        let late = acquired.load(ordering: .acquiring)
        #expect(late)
        #expect(lock.locked { counter.value } == 2)
    }
}
