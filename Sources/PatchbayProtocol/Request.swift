// Requests: client → broker. The envelope is here; each subsystem's requests and their payloads
// live in its own file, as a nested enum (`Request.Keys` in Keys.swift, and so on).

/// Every request a client can send. Descriptors travel beside the frame, not in it.
public enum Request: Sendable, Equatable {
    /// Broker identity, uptime and object counts (no payload).
    case status
    /// Metrics, as Prometheus text (no payload).
    case metrics
    /// Watch the broker's answers (PROTOCOL.md §5.9).
    case monitor(MonitorFilter)
    case keys(Keys)
    case namespace(Namespace)
    case sharedMemory(SharedMemory)
    case net(Net)
    case caps(Caps)

    public var opcode: Opcode {
        switch self {
        case .status: .status
        case .metrics: .metrics
        case .monitor: .monitor
        case .keys(let request): request.opcode
        case .namespace(let request): request.opcode
        case .sharedMemory(let request): request.opcode
        case .net(let request): request.opcode
        case .caps(let request): request.opcode
        }
    }

    public func encode(requestID: UInt64) -> [UInt8] {
        var writer = Frame.header(kind: .request, opcode: opcode, requestID: requestID)
        switch self {
        case .status, .metrics: break
        case .monitor(let filter): filter.encode(into: &writer)
        case .keys(let request): request.encodePayload(into: &writer)
        case .namespace(let request): request.encodePayload(into: &writer)
        case .sharedMemory(let request): request.encodePayload(into: &writer)
        case .net(let request): request.encodePayload(into: &writer)
        case .caps(let request): request.encodePayload(into: &writer)
        }
        return writer.bytes
    }

    /// Decodes a request frame's payload. Total on hostile input.
    public static func decode(_ frame: Frame) throws(DecodeError) -> Request {
        guard frame.kind == .request else {
            throw .invalidValue(field: "kind", reason: "a client may only send requests")
        }
        let opcode = frame.opcode
        guard opcode.metadata.isRequest else { throw .wrongFrame(opcode, "request") }
        var reader = WireReader(frame.payload)
        let request: Request
        switch opcode.subsystem {
        case .broker:
            switch opcode {
            case .metrics: request = .metrics
            case .monitor: request = .monitor(try MonitorFilter.decode(&reader))
            default: request = .status
            }
        case .keys: request = .keys(try .decode(opcode, &reader))
        case .namespace: request = .namespace(try .decode(opcode, &reader))
        case .sharedMemory: request = .sharedMemory(try .decode(opcode, &reader))
        case .net: request = .net(try .decode(opcode, &reader))
        case .caps: request = .caps(try .decode(opcode, &reader))
        }
        try reader.finish()
        return request
    }
}
