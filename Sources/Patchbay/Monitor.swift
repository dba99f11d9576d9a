// Watching the broker: a connection of its own that receives one event per request the broker
// answers (PROTOCOL.md §5.9), as `patchbay monitor` prints them.

public import PatchbayProtocol
import Glibc
import PatchbaySystem
import SystemPackage

/// What a monitor asks to see (empty fields: everything).
public typealias MonitorFilter = PatchbayProtocol.MonitorFilter
/// A request the broker answered: when, what, who (pid, uid, command), on what, how, how long.
public typealias MonitorEvent = PatchbayProtocol.MonitorEvent

/// A connection that watches the broker. Root and the per-user broker's user see every caller's
/// requests; another user of the system broker sees its own. A monitor that does not keep up is
/// not waited for: the events it missed are counted in the next one's `lost`.
public final class BrokerMonitor {
    private var connection: Connection
    private let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: maximumFrameSize, alignment: 16)
    /// Events that came but could not be read since the last one returned: added to its `lost`.
    private var unreadable: UInt64 = 0

    /// Starts watching the broker `broker` talks to, with `filter`.
    public init(_ broker: Broker, filter: MonitorFilter = MonitorFilter()) throws(PatchbayError) {
        var connection = Connection(socket: try broker.connectOnce())
        let response = try connection.call(.monitor(filter))
        guard case .monitor = response.reply else {
            throw PatchbayError(.protocolError, "unexpected reply to a monitor request")
        }
        self.connection = connection
    }

    deinit {
        buffer.deallocate()
    }

    /// The next event if one comes within `timeoutMilliseconds`; nil otherwise.
    ///
    /// - Throws: `ECONNRESET` when the broker went away.
    public func next(timeoutMilliseconds: Int32) throws(PatchbayError) -> MonitorEvent? {
        let deadline = monotonicNanoseconds() + UInt64(max(timeoutMilliseconds, 0)) * 1_000_000
        while true {
            let now = monotonicNanoseconds()  // read once: a second read may already be past the deadline
            let left = deadline > now ? Int32((deadline - now) / 1_000_000) : 0
            var entry = pollfd(fd: connection.socket.rawValue, events: Int16(POLLIN), revents: 0)
            let ready = poll(&entry, 1, left)
            if ready < 0 && errno != EINTR { throw PatchbayError(Errno(rawValue: errno), "cannot wait for the broker's events") }
            if ready > 0 { return try next() }
            if monotonicNanoseconds() >= deadline { return nil }
        }
    }

    /// Waits for the next event.
    ///
    /// - Throws: `ECONNRESET` when the broker went away.
    public func next() throws(PatchbayError) -> MonitorEvent {
        while true {
            let message: ReceivedMessage
            do {
                message = try connection.socket.receive(into: buffer)
            } catch {
                throw PatchbayError(error, "cannot read the broker's events")
            }
            if message.length == 0 { throw PatchbayError(.connectionReset, "the broker closed the monitor's connection") }
            guard let frame = try? Frame.decode(Array(UnsafeRawBufferPointer(rebasing: buffer[0..<message.length]))[...]),
                  case .monitor(var event)? = try? Event.decode(frame) else {
                // Unreadable (too long for the buffer, or a newer broker's): counted as lost.
                unreadable &+= 1
                continue
            }
            event.lost &+= unreadable
            unreadable = 0
            return event
        }
    }
}
