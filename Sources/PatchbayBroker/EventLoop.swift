// The loop's side of the kernel: one epoll instance, and for every descriptor in it a typed
// registration saying who owns it. Readiness goes to that owner; the loop knows nothing else.

import Logging
import PatchbaySystem
import SystemPackage

/// What a watched descriptor is, and so which room its readiness goes to.
enum Registration: Equatable {
    /// The broker's listening socket: new clients.
    case brokerListener
    /// The system broker's second listening socket, root's own (mode 0600).
    case rootListener
    /// SIGTERM, SIGINT and SIGHUP, as a signalfd.
    case terminationSignals
    /// A client's connection.
    case session(UInt64)
    /// A `/net` socket's broker-side handle: its hang-up means every client copy is closed.
    case netHandle(socket: UInt64)
    /// A `/net` listener with accepts parked on it.
    case netListener(socket: UInt64)
    /// An accepted `/net` connection charged to the uid that connected: the broker's copy of the
    /// kernel socket, watched for the hang-up of that uid's end.
    case netMaker(socket: UInt64)
}

/// Epoll with typed registrations. Each registration gets a token of its own that is never
/// reused, so an event still in a batch for a descriptor that was removed (and whose number a
/// new descriptor may already have) is dropped, not misrouted.
final class EventLoop {
    private let epoll: Epoll
    private var registrations: [UInt64: Registration] = [:]
    private var tokenByDescriptor: [CInt: UInt64] = [:]
    private var nextToken: UInt64 = 1
    /// Told of a registration found dead (its descriptor closed while watched) and replaced,
    /// which only a close path that forgot to unregister leaves.
    private let logger: Logger
    /// Events for registrations that no longer exist, since the loop started.
    private var deadEvents = 0

    init(logger: Logger) throws(Errno) {
        epoll = try Epoll()
        self.logger = logger
    }

    /// Watches `descriptor` for `events` on behalf of `owner`. Watching a descriptor that is
    /// already watched only updates its events and owner.
    func register(_ descriptor: CInt, as owner: Registration, events: Epoll.Events) throws(Errno) {
        if let token = tokenByDescriptor[descriptor] {
            do throws(Errno) {
                try epoll.modify(descriptor, events: events, token: token)
                registrations[token] = owner
                return
            } catch .noSuchFileOrDirectory {
                // The number's earlier descriptor was closed while watched: a bug (every close is
                // meant to unregister first), which this keeps from refusing every later
                // descriptor given the same number. The earlier watch is gone if its file closed
                // for good; if another process still holds that file, epoll keeps watching it
                // under the dead token (nothing here can name it any more), and `wait` drops
                // its events: logged, as this is.
                logger.error("descriptor \(descriptor) was closed while watched (for \(String(describing: registrations[token]))); watching the new one",
                             metadata: ["descriptor": "\(descriptor)"])
                tokenByDescriptor[descriptor] = nil
                registrations[token] = nil
            }
        }
        let token = nextToken
        nextToken += 1
        try epoll.add(descriptor, events: events, token: token)
        registrations[token] = owner
        tokenByDescriptor[descriptor] = token
    }

    /// Changes the events a watched descriptor is watched for.
    func modify(_ descriptor: CInt, events: Epoll.Events) throws(Errno) {
        guard let token = tokenByDescriptor[descriptor] else { throw .noSuchFileOrDirectory }
        try epoll.modify(descriptor, events: events, token: token)
    }

    /// Stops watching `descriptor`; its pending events are dropped. Call before closing it.
    func unregister(_ descriptor: CInt) {
        guard let token = tokenByDescriptor.removeValue(forKey: descriptor) else { return }
        registrations[token] = nil
        try? epoll.remove(descriptor)
    }

    /// Waits up to `timeoutMilliseconds` (-1: forever) and hands each ready descriptor's owner
    /// and events to `body`. The owner is looked up as each event is handled, so a registration
    /// an earlier event in the batch removed is skipped. Returns how many events the batch held
    /// (`batchSize` when more may be ready).
    @discardableResult
    func wait(timeoutMilliseconds: CInt, _ body: (Registration, Epoll.Events) -> Void) throws(Errno) -> Int {
        let events = try epoll.wait(maximum: Self.batchSize, timeoutMilliseconds: timeoutMilliseconds)
        for event in events {
            guard let owner = registrations[event.token] else {
                // A removed registration's event still in this batch (expected), or the watch of
                // a descriptor closed without being unregistered (a bug): counted, and logged
                // when it keeps coming.
                deadEvents &+= 1
                if deadEvents & (deadEvents &- 1) == 0, deadEvents >= 1024 {
                    logger.error("\(deadEvents) events for registrations that no longer exist")
                }
                continue
            }
            body(owner, event.events)
        }
        return events.count
    }

    /// Events one `wait` takes at most.
    static let batchSize = 64
}
