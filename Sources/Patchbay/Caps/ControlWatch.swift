// What wakes a service port that sleeps on futex words when the wake-up is not a client's push.
//
// A service sleeping with futex_waitv(2) on its channels' wake words (PROTOCOL.md §12.8) cannot
// also wait on descriptors: its broker connection (new clients, departures, the broker's own
// death), `cancelWait`, a registration made again after a broker restart, the clients' direct
// sockets while no broker reports departures. Those sit in the port's control epoll, and a thread
// of the port's own sleeps on it here: whenever something arrives there, it bumps a word the
// service's futex_waitv also watches and wakes it. The service then reads the control epoll
// without waiting. None of this is on a message's path: it is what a socket wake-up used to carry
// besides the messages.

import Glibc
import PatchbaySystem
import Synchronization
import SystemPackage

/// A thread that turns readiness of one epoll descriptor into a futex wake-up.
final class ControlWatch: @unchecked Sendable {
    /// Bumped (then woken) each time the watched descriptor has something new. Process-local;
    /// lives as long as this object, which the watching thread keeps until it is told to stop.
    let word: UnsafeMutablePointer<UInt32>
    private let epoll: Epoll
    private let stopEvent: EventCounter

    private static let watchedToken: UInt64 = 1
    private static let stopToken: UInt64 = 2

    /// Starts watching `control` (an epoll descriptor the caller keeps open until `stop`).
    init(watching control: CInt) throws(Errno) {
        word = UnsafeMutablePointer<UInt32>.allocate(capacity: 1)
        word.initialize(to: 0)
        epoll = try Epoll()
        stopEvent = try EventCounter(nonblocking: true)
        // Edge-triggered: one wake-up per arrival, not a loop while the service has not read it
        // yet. Something already waiting there is reported once at once.
        try epoll.add(control, events: [.readable, .edgeTriggered], token: Self.watchedToken)
        try epoll.add(stopEvent.descriptor.rawValue, events: .readable, token: Self.stopToken)
        startThread { [self] in run() }
    }

    deinit { word.deallocate() }

    /// Ends the thread (it holds this object until then).
    func stop() {
        try? stopEvent.signal()
    }

    private func run() {
        while true {
            guard let events = try? epoll.wait(maximum: 2, timeoutMilliseconds: -1) else { return }
            if events.contains(where: { $0.token == Self.stopToken }) { return }
            if !events.isEmpty {
                SharedWord.increment(word)
                Futex.wake(word)
            }
        }
    }
}

/// How service ports sleep, for the whole process.
enum ServiceSleep {
    private static let futexes = Atomic<Bool>(getenv("PATCHBAY_CAPS_SERVICE_SLEEP").map { String(cString: $0) } != "epoll")

    /// On the channels' futex words (the default), unless `PATCHBAY_CAPS_SERVICE_SLEEP=epoll`
    /// or the kernel has no futex_waitv (found at the first sleep).
    static var onFutexes: Bool {
        get { futexes.load(ordering: .relaxed) }
        set { futexes.store(newValue, ordering: .relaxed) }
    }
}
