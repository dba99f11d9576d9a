import Glibc
import PatchbaySystem
import Synchronization

/// `caps serve --exec`'s programs: at most `slots` run at once, at most `perUID` of them for any
/// one uid other than the service's own, and a slot that frees goes to the next uid in turn that
/// has a request waiting, so one user's slow requests delay another's by at most a program's
/// run, and only while that user holds every slot it may. Each slot is a thread of its own
/// (`run` waits for its program); the service's thread only files requests and withdraws those a
/// DISPOSE or an abort took back.
final class ExecJobs: @unchecked Sendable {  // the queue under its mutex; the word is atomic
    /// A request waiting for its program: its copy, and whose it is.
    struct Job: Sendable {
        let origin: ProgramPeer  // with its message id
        let request: [UInt8]
        var messageID: UInt64 { origin.messageID ?? 0 }
        var uid: UInt32 { origin.uid }
    }

    private struct Queue {
        /// Requests not started yet, per uid, oldest first.
        var waiting: [UInt32: [Job]] = [:]
        /// Uids with requests waiting, in the order their turns come.
        var turns: [UInt32] = []
        /// Programs running, per uid.
        var running: [UInt32: Int] = [:]
    }

    let slots: Int
    let perUID: Int
    private let ownUID: UInt32
    private let queue = Mutex(Queue())
    /// Moved, and woken, when a request is filed or a program ends.
    private let changed = UnsafeMutablePointer<UInt32>.allocate(capacity: 1)

    /// Starts `slots` threads that each take the next job in turn and call `run` with it.
    init(slots: Int, perUID: Int, ownUID: UInt32 = geteuid(), run: @escaping @Sendable (Job) -> Void) {
        self.slots = slots
        self.perUID = perUID
        self.ownUID = ownUID
        changed.initialize(to: 0)
        for _ in 0..<slots {
            startThread { [self] in
                while true {
                    let job = next()
                    run(job)
                    finished(job.uid)
                }
            }
        }
    }

    deinit { changed.deallocate() }

    /// Files a request; it runs when a slot is free and its uid's turn comes.
    func submit(_ job: Job) {
        queue.withLock { queue in
            if queue.waiting[job.uid, default: []].isEmpty { queue.turns.append(job.uid) }
            queue.waiting[job.uid, default: []].append(job)
        }
        signal()
    }

    /// Takes back a request not started yet (its client took it back, or is gone); nil if it
    /// started, or was never filed.
    func withdraw(_ messageID: UInt64, of uid: UInt32) -> Job? {
        queue.withLock { queue in
            guard var jobs = queue.waiting[uid], let index = jobs.firstIndex(where: { $0.messageID == messageID }) else {
                return nil
            }
            let job = jobs.remove(at: index)
            if jobs.isEmpty {
                queue.waiting[uid] = nil
                queue.turns.removeAll { $0 == uid }
            } else {
                queue.waiting[uid] = jobs
            }
            return job
        }
    }

    /// The next request whose uid may run one more program, waiting for one.
    private func next() -> Job {
        while true {
            let seen = SharedWord.load(changed)
            let taken: Job? = queue.withLock { queue in
                guard let turn = queue.turns.firstIndex(where: { uid in
                    uid == ownUID || queue.running[uid, default: 0] < perUID
                }) else { return nil }
                let uid = queue.turns.remove(at: turn)
                var jobs = queue.waiting[uid]!
                let job = jobs.removeFirst()
                if jobs.isEmpty {
                    queue.waiting[uid] = nil
                } else {
                    queue.waiting[uid] = jobs
                    queue.turns.append(uid)  // its next request waits for the others' turns
                }
                queue.running[uid, default: 0] += 1
                return job
            }
            if let taken { return taken }
            try? Futex.wait(changed, expected: seen)
        }
    }

    private func finished(_ uid: UInt32) {
        queue.withLock { queue in
            let left = queue.running[uid, default: 1] - 1
            queue.running[uid] = left > 0 ? left : nil
        }
        signal()
    }

    private func signal() {
        _ = SharedWord.increment(changed)
        Futex.wake(changed)
    }
}
