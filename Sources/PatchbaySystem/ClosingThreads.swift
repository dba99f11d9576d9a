// Closing threads: descriptors a peer chose, closed off the caller's thread, one thread per
// owner (the peer they came from), so that a close that waits holds up only that owner's closes.

package import SystemPackage
import Glibc
import Synchronization
import CPatchbayShims

/// Closes descriptors that peers handed over, off the calling thread, one thread per owner (the
/// broker's uids; a CAPS port's peers).
///
/// The last `close` of a file can block: a TCP socket with `SO_LINGER` and unsent data, a local
/// socket whose queue holds one, a FUSE or NFS file flushing to a server that may never answer.
/// A thread that serves others must never wait on a peer's choice of file, so what a peer gave is
/// closed here instead. Lingering is turned off before the close (`closeHandedOver`), and each
/// owner's descriptors are closed on a thread of that owner's own: an owner that still makes one
/// close wait holds up only its own closes, and what waits to be closed is counted
/// (`outstanding`), so the caller can refuse an owner that piles descriptors up.
///
/// A caller never waits for a closing thread: a thread touches only its own owner's queue (one
/// short lock to take the batch) and atomics, and sleeps on a futex word, so it holds no
/// descriptor of its own. It ends after 2 s without work.
///
/// With `interruptCloses(after:)` (the broker's), a close that has waited that long is
/// interrupted: its thread is sent a signal whose handler does nothing, which ends the waits a
/// close makes on a peer's behalf (a lingering TCP socket's, a terminal's drain), so no owner,
/// and no racer who turns lingering back on between this side's `setsockopt` and its `close`,
/// keeps a thread waiting for longer.
package final class ClosingThreads: Sendable {

    /// Work for one thread: one owner's descriptors to close (kept once made, one per owner that
    /// ever handed one over), or the refused sockets to be emptied, with their owners.
    private final class Queue<Item: Sendable>: @unchecked Sendable {  // the word is touched through atomics and futexes only
        let pending = Mutex<[Item]>([])
        /// Queued plus being closed.
        let outstanding = Atomic<Int>(0)
        /// Whether a thread serves this queue.
        let running = Atomic<Bool>(false)
        /// Bumped for each descriptor queued; the thread sleeps on it.
        let wakeup: UnsafeMutablePointer<UInt32>
        /// Since when the thread has been in one close (0: it is not), and which thread it is.
        /// Held while the thread is signalled, so that it cannot end meanwhile.
        let closing = Mutex<(since: UInt64, thread: pthread_t)>((0, 0))

        init() {
            wakeup = UnsafeMutablePointer<UInt32>.allocate(capacity: 1)
            wakeup.initialize(to: 0)
        }
    }

    private let queues = Mutex<[UInt64: Queue<CInt>]>([:])
    /// Refused sockets holding descriptors, to be emptied (`closeRefused`), and their owners.
    private let refused = Queue<(fd: CInt, owner: UInt64)>()
    /// How many descriptors the emptying of one refused socket takes out at most: past that, the
    /// rest waits for its owner's closing thread. Anyone who wants one of their refused sockets
    /// to wait there thus puts more than this many descriptors in flight for it, of the kernel's
    /// limit on a user's (its `RLIMIT_NOFILE`).
    package static let emptyingBudget: CInt = 1024
    /// How long an owner's thread waits for more work before it ends.
    private static let idleNanoseconds: Int64 = 2_000_000_000
    /// How long a close may wait before it is interrupted (0: never).
    private let interruptAfter = Atomic<UInt64>(0)
    /// Closes interrupted so far.
    private let interrupted = Atomic<UInt64>(0)

    /// (Opens `/dev/null` for `closeLast` now, with the owner's other descriptors, not at a first close.)
    package init() { _ = Self.nothing }

    private func queue(of owner: UInt64) -> Queue<CInt> {
        queues.withLock { queues in
            if let queue = queues[owner] { return queue }
            let queue = Queue<CInt>()
            queues[owner] = queue
            return queue
        }
    }

    /// Queues `descriptor`, handed over by `owner`, to be closed soon, off the calling thread.
    package func close(_ descriptor: consuming Descriptor, of owner: UInt64) {
        close(raw: descriptor.release(), of: owner)
    }

    /// Queues a raw descriptor this code owns, handed over by `owner`.
    package func close(raw: CInt, of owner: UInt64) {
        let queue = queue(of: owner)
        queue.outstanding.add(1, ordering: .relaxed)
        enqueue(raw, on: queue) { fd in
            closeHandedOver(fd)
            queue.outstanding.subtract(1, ordering: .relaxed)
        }
    }

    /// Puts `item` on `queue` and wakes its thread, or starts one that runs `handle` on each item.
    private func enqueue<Item>(_ item: Item, on queue: Queue<Item>, _ handle: @escaping @Sendable (Item) -> Void) {
        queue.pending.withLock { $0.append(item) }
        SharedWord.increment(queue.wakeup)
        if queue.running.compareExchange(expected: false, desired: true, ordering: .acquiringAndReleasing).exchanged {
            startThread { [self] in run(queue, handle) }
        } else {
            Futex.wake(queue.wakeup)
        }
    }

    /// Closes `fd`, a local socket this code owns and never read from (a connection refused at
    /// once), that a peer may have queued descriptors in: here and now when its queue holds none
    /// and can take none (`pb_queue_holds_no_descriptors`: shut for reading, then walked), else on
    /// the emptying thread, shared by every owner: it takes out what is queued and closes what
    /// it took where that cannot wait (a TCP socket's lingering turned off first; local sockets
    /// among it emptied the same way), up to `emptyingBudget` descriptors
    /// (`pb_empty_and_close`). What is left (a socket past the budget, a file whose close may
    /// wait on a server) goes to `owner`'s closing thread. A refused connection is thus not left
    /// waiting behind `owner`'s closes, which `owner` may have made wait, unless it carries more
    /// than the budget; it counts against `owner` (`outstanding`) until it is closed.
    package func closeRefused(_ fd: CInt, of owner: UInt64) {
        if pb_queue_holds_no_descriptors(fd, 16) == 1 {
            Glibc.close(fd)
            return
        }
        queue(of: owner).outstanding.add(1, ordering: .relaxed)
        enqueue((fd, owner), on: refused) { [self] item in
            for fd in Self.emptyAndClose(item.fd) { close(raw: fd, of: item.owner) }
            queue(of: item.owner).outstanding.subtract(1, ordering: .relaxed)
        }
    }

    /// `pb_empty_and_close` of `fd`: what it left open.
    package static func emptyAndClose(_ fd: CInt) -> [CInt] {
        let capacity = Int(emptyingBudget) + 254
        return [CInt](unsafeUninitializedCapacity: capacity) { buffer, count in
            let left = pb_empty_and_close(fd, emptyingBudget, buffer.baseAddress, CInt(capacity))
            if left < 0 {
                buffer[0] = fd
                count = 1
            } else {
                count = Int(left)
            }
        }
    }

    /// Makes the last close of the file behind `fd` (which its owner still closes itself) happen
    /// here, for `owner`. For sockets a peer can write descriptors into (the broker's
    /// connections, `/net` sockets and handles, a CAPS port's sockets to its peer): closing one
    /// frees what waits in its queue, and a lingering TCP socket among it would make that close
    /// wait. A copy is queued, and `fd` is pointed at `/dev/null` first: the caller's reference is
    /// gone before the copy can be closed, so the copy's close is the last whichever thread runs
    /// first (queued with the original still open, the closing thread could close the copy before
    /// the caller's own close, which would then be the last). The caller still closes `fd`.
    package func closeLast(of fd: CInt, for owner: UInt64) {
        let copy = fcntl(fd, F_DUPFD_CLOEXEC, 0)
        guard copy >= 0 else { return }
        if Self.nothing >= 0, dup2(Self.nothing, fd) == fd { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
        close(raw: copy, of: owner)
    }

    /// `/dev/null`, opened once (not per close, on the broker's loop): what `closeLast` leaves
    /// behind a descriptor number.
    private static let nothing: CInt = (try? FileDescriptor.open("/dev/null", .readOnly, options: .closeOnExec))?.rawValue ?? -1


    /// Descriptors `owner` handed over that are not closed yet.
    package func outstanding(of owner: UInt64) -> Int {
        queues.withLock { $0[owner] }?.outstanding.load(ordering: .relaxed) ?? 0
    }

    /// Descriptors not closed yet of every owner but `owner`.
    package func outstanding(ofAllBut owner: UInt64) -> Int {
        queues.withLock { queues in
            queues.reduce(0) { $0 + ($1.key == owner ? 0 : $1.value.outstanding.load(ordering: .relaxed)) }
        }
    }

    /// Interrupts every close that has waited `nanoseconds` (the first call installs the
    /// signal's handler, which does nothing, and starts the thread that watches).
    package func interruptCloses(after nanoseconds: UInt64) {
        let before = interruptAfter.exchange(nanoseconds, ordering: .relaxed)
        guard before == 0, nanoseconds > 0 else { return }
        _ = pb_install_interrupt_handler(pb_interrupt_signal())
        startThread { [self] in watchCloses() }
    }

    /// Closes interrupted so far (`interruptCloses`).
    package var interruptedCloses: UInt64 { interrupted.load(ordering: .relaxed) }

    private func watchCloses() {
        // Started before a caller may block its termination signals for a signalfd: none is
        // delivered here.
        _ = pb_block_all_signals()
        let signal = pb_interrupt_signal()
        while true {
            let limit = interruptAfter.load(ordering: .relaxed)
            let period = min(max(limit / 4, 1_000_000), 250_000_000)
            var pause = timespec(tv_sec: Int(period / 1_000_000_000), tv_nsec: Int(period % 1_000_000_000))
            _ = nanosleep(&pause, nil)
            let now = monotonicNanoseconds()
            func look<Item>(_ queue: Queue<Item>) {
                queue.closing.withLock { closing in
                    guard closing.since != 0, now &- closing.since >= limit else { return }
                    if pb_interrupt_thread(closing.thread, signal) == 0 { interrupted.add(1, ordering: .relaxed) }
                    closing.since = now  // again after another `limit`, if the close still waits
                }
            }
            for queue in queues.withLock({ Array($0.values) }) { look(queue) }
            look(refused)
        }
    }

    private func run<Item>(_ queue: Queue<Item>, _ handle: (Item) -> Void) {
        let me = pthread_self()
        while true {
            let seen = SharedWord.load(queue.wakeup)
            let batch = queue.pending.withLock { pending -> [Item] in
                defer { pending.removeAll(keepingCapacity: true) }
                return pending
            }
            for item in batch {
                queue.closing.withLock { $0 = (monotonicNanoseconds(), me) }
                handle(item)
                queue.closing.withLock { $0.since = 0 }
            }
            if !batch.isEmpty { continue }
            do {
                try Futex.wait(queue.wakeup, expected: seen, timeoutNanoseconds: Self.idleNanoseconds)
            } catch {
                // Idle: the thread ends, unless something was queued meanwhile and no new thread
                // took it (the flag is given up first, then the queue looked at again).
                queue.running.store(false, ordering: .sequentiallyConsistent)
                let empty = queue.pending.withLock { $0.isEmpty }
                if empty || !queue.running.compareExchange(expected: false, desired: true, ordering: .acquiringAndReleasing).exchanged {
                    return
                }
            }
        }
    }
}
