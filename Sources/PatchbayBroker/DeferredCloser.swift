import Glibc
import PatchbaySystem
import Synchronization

/// Closes descriptors that clients handed to the broker, on a thread of its own.
///
/// The last `close` of a file can block: a TCP socket with `SO_LINGER` and unsent data, a FUSE
/// or NFS file flushing to a server that may never answer. The event loop must never wait on a
/// client's choice of file, so everything a client gave the broker (shared files, descriptors
/// attached to rejected requests) is closed here instead.
final class DeferredCloser: Sendable {
    static let shared = DeferredCloser()

    private let pending = Mutex<[CInt]>([])
    /// An eventfd the closing thread sleeps on; lives as long as the process.
    private let wakeup: CInt

    private init() {
        do {
            wakeup = try EventCounter().release()
        } catch {
            fatalError("cannot create the closer's eventfd: \(error.name)")
        }
        startThread { [self] in run() }
    }

    /// Queues `descriptor` to be closed soon, off the calling thread.
    func close(_ descriptor: consuming Descriptor) {
        close(raw: descriptor.release())
    }

    /// Queues a raw descriptor this code owns.
    func close(raw: CInt) {
        pending.withLock { $0.append(raw) }
        var one: UInt64 = 1
        _ = Glibc.write(wakeup, &one, 8)
    }

    private func run() {
        while true {
            var count: UInt64 = 0
            if Glibc.read(wakeup, &count, 8) < 0 { continue }
            let batch = pending.withLock { queued -> [CInt] in
                defer { queued.removeAll(keepingCapacity: true) }
                return queued
            }
            for fd in batch { _ = Glibc.close(fd) }
        }
    }
}
