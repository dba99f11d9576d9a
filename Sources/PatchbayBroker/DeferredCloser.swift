import Glibc
import PatchbaySystem
import Synchronization

/// Closes descriptors that clients handed to the broker, off the event loop, one thread per uid.
///
/// The last `close` of a file can block: a TCP socket with `SO_LINGER` and unsent data, a FUSE
/// or NFS file flushing to a server that may never answer. The event loop must never wait on a
/// client's choice of file, so everything a client gave the broker (shared files, descriptors
/// attached to rejected requests) is closed here instead. Lingering is turned off before the
/// close (`closeHandedOver`), and each uid's descriptors are closed on a thread of that uid's
/// own: a uid that still makes one close wait (it set `SO_LINGER` again on a copy it kept, between
/// the two calls) holds up only its own closes, and what waits to be closed still counts against
/// its descriptor share (`outstanding`), so it cannot make the broker pile up descriptors either.
///
/// The loop never waits for a closing thread: a thread touches only its own uid's queue (one
/// short lock to take the batch) and atomics, and sleeps on a futex word, so it holds no
/// descriptor of its own.
final class DeferredCloser: Sendable {
    static let shared = DeferredCloser()

    /// One uid's descriptors to close. Kept once made (one per uid that ever handed one over).
    private final class Queue: @unchecked Sendable {  // the word is touched through atomics and futexes only
        let pending = Mutex<[CInt]>([])
        /// Queued plus being closed.
        let outstanding = Atomic<Int>(0)
        /// Whether a thread serves this queue.
        let running = Atomic<Bool>(false)
        /// Bumped for each descriptor queued; the thread sleeps on it.
        let wakeup: UnsafeMutablePointer<UInt32>

        init() {
            wakeup = UnsafeMutablePointer<UInt32>.allocate(capacity: 1)
            wakeup.initialize(to: 0)
        }
    }

    private let queues = Mutex<[UInt32: Queue]>([:])
    /// How long a uid's thread waits for more work before it ends.
    private static let idleNanoseconds: Int64 = 2_000_000_000

    private init() {}

    private func queue(of uid: UInt32) -> Queue {
        queues.withLock { queues in
            if let queue = queues[uid] { return queue }
            let queue = Queue()
            queues[uid] = queue
            return queue
        }
    }

    /// Queues `descriptor`, handed over by `uid`, to be closed soon, off the calling thread.
    func close(_ descriptor: consuming Descriptor, of uid: UInt32) {
        close(raw: descriptor.release(), of: uid)
    }

    /// Queues a raw descriptor this code owns, handed over by `uid`.
    func close(raw: CInt, of uid: UInt32) {
        let queue = queue(of: uid)
        queue.outstanding.add(1, ordering: .relaxed)
        queue.pending.withLock { $0.append(raw) }
        SharedWord.increment(queue.wakeup)
        if queue.running.compareExchange(expected: false, desired: true, ordering: .acquiringAndReleasing).exchanged {
            startThread { [self] in run(queue) }
        } else {
            Futex.wake(queue.wakeup)
        }
    }

    /// Makes the last close of the file behind `fd` (which its owner still closes itself) happen
    /// here, for `uid`: a copy is queued, so the owner's own close is not the last. For the
    /// broker's sockets that a client can write descriptors into (a connection, a `/net` socket
    /// and its handle): closing one frees what waits in its queue, and a lingering TCP socket
    /// among it would make that close wait.
    func closeLast(of fd: CInt, for uid: UInt32) {
        let copy = fcntl(fd, F_DUPFD_CLOEXEC, 0)
        if copy >= 0 { close(raw: copy, of: uid) }
    }

    /// Descriptors `uid` handed over that are not closed yet.
    func outstanding(of uid: UInt32) -> Int {
        queues.withLock { $0[uid] }?.outstanding.load(ordering: .relaxed) ?? 0
    }

    /// Descriptors not closed yet of every uid but `uid`.
    func outstanding(ofAllBut uid: UInt32) -> Int {
        queues.withLock { queues in
            queues.reduce(0) { $0 + ($1.key == uid ? 0 : $1.value.outstanding.load(ordering: .relaxed)) }
        }
    }

    private func run(_ queue: Queue) {
        while true {
            let seen = SharedWord.load(queue.wakeup)
            let batch = queue.pending.withLock { pending -> [CInt] in
                defer { pending.removeAll(keepingCapacity: true) }
                return pending
            }
            for fd in batch {
                closeHandedOver(fd)
                queue.outstanding.subtract(1, ordering: .relaxed)
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
