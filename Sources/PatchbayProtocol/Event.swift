// Events: unsolicited frames, broker → client, with request id 0. Today only CAPS has them (the
// notices a service port receives); their payloads are in Caps.swift.

/// Every event the broker sends.
public enum Event: Sendable, Equatable {
    case caps(Caps)
    /// To a monitor: a request the broker answered.
    case monitor(MonitorEvent)

    public var opcode: Opcode {
        switch self {
        case .caps(let event): event.opcode
        case .monitor: .monitorEvent
        }
    }

    public func encode() -> [UInt8] {
        var writer = Frame.header(kind: .event, opcode: opcode, requestID: 0)
        switch self {
        case .caps(let event): event.encodePayload(into: &writer)
        case .monitor(let event): event.encode(into: &writer)
        }
        return writer.bytes
    }

    public static func decode(_ frame: Frame) throws(DecodeError) -> Event {
        guard frame.kind == .event else { throw .invalidValue(field: "kind", reason: "expected an event") }
        let opcode = frame.opcode
        guard opcode.metadata.isEvent else { throw .wrongFrame(opcode, "event") }
        var reader = WireReader(frame.payload)
        let event: Event
        switch opcode.subsystem {
        case .caps: event = .caps(try .decode(opcode, &reader))
        case .broker where opcode == .monitorEvent: event = .monitor(try MonitorEvent.decode(&reader))
        default: throw .wrongFrame(opcode, "event")
        }
        try reader.finish()
        return event
    }
}
