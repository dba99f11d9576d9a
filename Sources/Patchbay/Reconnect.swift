// Riding out a broker restart.
//
// A broker that dies takes its connections with it; one that comes back (a service manager's
// restart, or the per-user autostart) listens on the same path. A `Broker` finds out the next
// time it sends: the kernel says EPIPE or ECONNRESET. A request that never left this process is
// safe to send again, so the library reconnects (with the bounded backoff below) and sends it.
// A request whose reply was lost is not: it may or may not have happened, so that call throws
// ECONNRESET saying so, and the next call reconnects first. Nothing is retried twice and nothing
// reports a success the broker did not confirm.
//
// What lived only in the old broker is gone unless the broker was started with `--fd-store`
// under a service manager that keeps descriptors: keys, and the sockets' ids. What the library
// can make again, it does: a `CapsService` registers its name again (its clients' channels never
// needed the broker), and a listening `Socket` made with `Socket.listen` binds its name again the
// next time it accepts.

import Glibc
import PatchbaySystem
import SystemPackage

/// How a `Broker` (and the service ports and listeners made through it) reconnect after the
/// broker went away: one attempt at once, then `attempts - 1` more, the delay doubling from
/// `initialDelay` up to `maximumDelay`. The default tries 8 times over about 3.5 seconds.
public struct ReconnectPolicy: Sendable, Equatable {
    /// Attempts before giving up; nil: never give up (for long-running servers).
    public var attempts: Int?
    /// The pause after the first failed attempt, in milliseconds.
    public var initialDelay: Int
    /// The longest pause between two attempts, in milliseconds.
    public var maximumDelay: Int

    public init(attempts: Int?, initialDelay: Int = 50, maximumDelay: Int = 1000) {
        self.attempts = attempts.map { max(0, $0) }
        self.initialDelay = max(1, initialDelay)
        self.maximumDelay = max(self.initialDelay, maximumDelay)
    }

    /// 8 attempts: at once, then after 50, 100, 200, 400, 800, 1000 and 1000 ms.
    public static let standard = ReconnectPolicy(attempts: 8)
    /// Never reconnect: a lost connection stays lost (every later call fails with EPIPE).
    public static let never = ReconnectPolicy(attempts: 0)
    /// Keep trying, every 2 seconds at most: for servers that must come back with the broker.
    public static let forever = ReconnectPolicy(attempts: nil, maximumDelay: 2000)

    /// Whether a lost connection is made again at all.
    public var reconnects: Bool { attempts != 0 }

    /// The pause after failed attempt `attempt` (1-based), in milliseconds.
    func delay(after attempt: Int) -> Int {
        var delay = initialDelay
        for _ in 1..<max(1, attempt) where delay < maximumDelay { delay = min(maximumDelay, delay * 2) }
        return delay
    }

    /// Runs `attempt` until it succeeds, fails with something other than "nobody listens there
    /// (yet)", or the attempts run out. Between attempts it sleeps; `canceled` is asked before
    /// each attempt and stops the retries.
    func retry<T: ~Copyable>(what: String, _ attempt: () throws(PatchbayError) -> T) throws(PatchbayError) -> T {
        var tries = 0
        var waited = 0
        while true {
            tries += 1
            do {
                return try attempt()
            } catch {
                guard Self.isAbsence(error.errno) else { throw error }
                if let attempts, tries >= attempts {
                    throw PatchbayError(.connectionReset,
                                        "\(what) did not come back: \(tries) attempts over \(waited) ms (\(error.reason))")
                }
            }
            let pause = delay(after: tries)
            var request = timespec(tv_sec: pause / 1000, tv_nsec: (pause % 1000) * 1_000_000)
            var remaining = timespec()
            while nanosleep(&request, &remaining) != 0 && errno == EINTR { request = remaining }
            waited += pause
        }
    }

    /// What a broker that is down or restarting looks like to a client.
    static func isAbsence(_ errno: Errno) -> Bool {
        errno == .noSuchFileOrDirectory || errno == .connectionRefused || errno == .connectionReset
            || errno == .brokenPipe || errno == .resourceTemporarilyUnavailable
    }

    /// Errors that mean the connection itself is gone.
    static func isTransport(_ errno: Errno) -> Bool {
        errno == .brokenPipe || errno == .connectionReset || errno == .socketNotConnected
    }
}
