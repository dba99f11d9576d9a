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
final class DeferredCloser: Sendable {
    static let shared = DeferredCloser()

    private struct Queue {
        var descriptors: [CInt] = []
        /// Queued plus being closed.
        var outstanding = 0
        /// The word the uid's thread sleeps on (bumped for each descriptor queued); nil when no
        /// thread runs. A futex, not an eventfd: a closing thread holds no descriptor of its own.
        var wakeup: UnsafeMutablePointer<UInt32>?
    }

    private struct Queues: @unchecked Sendable {  // used under the mutex only
        var byUID: [UInt32: Queue] = [:]
    }

    private let queues = Mutex(Queues())
    /// How long a uid's thread waits for more work before it ends.
    private static let idleNanoseconds: Int64 = 2_000_000_000

    private init() {}

    /// Queues `descriptor`, handed over by `uid`, to be closed soon, off the calling thread.
    func close(_ descriptor: consuming Descriptor, of uid: UInt32) {
        close(raw: descriptor.release(), of: uid)
    }

    /// Queues a raw descriptor this code owns, handed over by `uid`.
    func close(raw: CInt, of uid: UInt32) {
        let start = queues.withLock { queues -> UnsafeMutablePointer<UInt32>? in
            var queue = queues.byUID[uid] ?? Queue()
            queue.descriptors.append(raw)
            queue.outstanding += 1
            defer { queues.byUID[uid] = queue }
            if let wakeup = queue.wakeup {
                // Under the lock: the thread frees the word only after taking its queue away.
                SharedWord.increment(wakeup)
                Futex.wake(wakeup)
                return nil
            }
            let wakeup = UnsafeMutablePointer<UInt32>.allocate(capacity: 1)
            wakeup.initialize(to: 0)
            queue.wakeup = wakeup
            return wakeup
        }
        if let start {
            let address = UInt(bitPattern: start)
            startThread { [self] in run(uid, wakeup: UnsafeMutablePointer(bitPattern: address)!) }
        }
    }

    /// Descriptors `uid` handed over that are not closed yet.
    func outstanding(of uid: UInt32) -> Int {
        queues.withLock { $0.byUID[uid]?.outstanding ?? 0 }
    }

    /// Descriptors not closed yet of every uid but `uid`.
    func outstanding(ofAllBut uid: UInt32) -> Int {
        queues.withLock { queues in queues.byUID.reduce(0) { $0 + ($1.key == uid ? 0 : $1.value.outstanding) } }
    }

    private func run(_ uid: UInt32, wakeup: UnsafeMutablePointer<UInt32>) {
        while true {
            let (batch, seen) = queues.withLock { queues -> ([CInt], UInt32) in
                let batch = queues.byUID[uid]?.descriptors ?? []
                if !batch.isEmpty { queues.byUID[uid]?.descriptors.removeAll() }
                return (batch, SharedWord.load(wakeup))
            }
            for fd in batch {
                closeHandedOver(fd)
                queues.withLock { $0.byUID[uid]?.outstanding -= 1 }
            }
            if !batch.isEmpty { continue }
            do {
                try Futex.wait(wakeup, expected: seen, timeoutNanoseconds: Self.idleNanoseconds)
            } catch {
                // Idle: the thread ends, unless something was queued meanwhile.
                let ended = queues.withLock { queues -> Bool in
                    guard queues.byUID[uid]?.descriptors.isEmpty ?? true else { return false }
                    queues.byUID[uid] = nil
                    return true
                }
                if ended {
                    wakeup.deallocate()
                    return
                }
            }
        }
    }
}
