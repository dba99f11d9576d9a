// The monitor: a connection that asked to watch (opcode 3) receives one event (opcode 4) per
// request the broker answers, as the broker answers it, per key expiry and CAPS departure, and
// per message a tapped CAPS service reports (PROTOCOL.md §5.9).

/// What a monitor wants to see. Empty fields match everything.
public struct MonitorFilter: Sendable, Equatable {
    /// Subsystems, as `MonitorFilter.bit(of:)` bits; 0: all.
    public var subsystems: UInt8
    /// The caller's uid (-1: any).
    public var uid: Int64
    /// The caller's pid (0: any).
    public var pid: Int32
    /// The object's name, exactly (empty: any).
    public var name: String

    public init(subsystems: UInt8 = 0, uid: Int64 = -1, pid: Int32 = 0, name: String = "") {
        self.subsystems = subsystems
        self.uid = uid
        self.pid = pid
        self.name = name
    }

    /// The bit of `subsystem` in `subsystems`.
    public static func bit(of subsystem: Subsystem) -> UInt8 {
        switch subsystem {
        case .broker: 1
        case .keys: 2
        case .namespace: 4
        case .sharedMemory: 8
        case .net: 16
        case .caps: 32
        }
    }

    func encode(into writer: inout WireWriter) {
        writer.u8(subsystems)
        writer.i64(uid)
        writer.i32(pid)
        writer.string(name)
    }

    static func decode(_ reader: inout WireReader) throws(DecodeError) -> MonitorFilter {
        let subsystems = try reader.u8("subsystems")
        guard subsystems & ~63 == 0 else { throw .invalidValue(field: "subsystems", reason: "unknown subsystem bits") }
        return MonitorFilter(subsystems: subsystems, uid: try reader.i64("uid"), pid: try reader.i32("pid"),
                             name: try reader.string("name"))
    }
}

/// One answered request, as a monitor sees it.
public struct MonitorEvent: Sendable, Equatable {
    /// When the broker answered (CLOCK_REALTIME, nanoseconds since the epoch).
    public var time: UInt64
    public var subsystem: String
    public var operation: String
    public var pid: Int32
    public var uid: UInt32
    /// The caller's command name (`/proc/PID/comm`).
    public var command: String
    /// What the request concerned: a name, a socket id, a service, a key's file kind (never a key).
    public var object: String
    /// "ok", or the errno's name.
    public var outcome: String
    /// From the broker taking the request up to answering it (nanoseconds; a parked request's
    /// wait included).
    public var elapsed: UInt64
    /// Events this monitor missed just before this one (its socket was full, or a tapped
    /// service's own tap connection was).
    public var lost: UInt64
    /// More about the object: a key's age, a channel, a tapped message's id and length ("" if nothing).
    public var detail: String
    /// A tapped message's first bytes (only from a tap that asked for payloads).
    public var payload: [UInt8]

    public init(time: UInt64, subsystem: String, operation: String, pid: Int32, uid: UInt32, command: String, object: String,
                outcome: String, elapsed: UInt64, lost: UInt64, detail: String = "", payload: [UInt8] = []) {
        self.time = time
        self.subsystem = subsystem
        self.operation = operation
        self.pid = pid
        self.uid = uid
        self.command = command
        self.object = object
        self.outcome = outcome
        self.elapsed = elapsed
        self.lost = lost
        self.detail = detail
        self.payload = payload
    }

    func encode(into writer: inout WireWriter) {
        writer.u64(time)
        writer.string(subsystem)
        writer.string(operation)
        writer.i32(pid)
        writer.u32(uid)
        writer.string(command)
        writer.string(object)
        writer.string(outcome)
        writer.u64(elapsed)
        writer.u64(lost)
        writer.string(detail)
        writer.bytes(payload)
    }

    static func decode(_ reader: inout WireReader) throws(DecodeError) -> MonitorEvent {
        MonitorEvent(time: try reader.u64("time"), subsystem: try reader.string("subsystem"),
                     operation: try reader.string("operation"), pid: try reader.i32("pid"), uid: try reader.u32("uid"),
                     command: try reader.string("command"), object: try reader.string("object"),
                     outcome: try reader.string("outcome"), elapsed: try reader.u64("elapsed"), lost: try reader.u64("lost"),
                     detail: try reader.string("detail"), payload: try reader.bytes("payload"))
    }
}
