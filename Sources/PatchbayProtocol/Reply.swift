// Replies: broker → client, one per request (acknowledgements get none). The envelope is here;
// each subsystem's replies live in its own file as a nested enum (`Reply.Keys`, ...).

/// Every successful reply the broker sends.
public enum Reply: Sendable, Equatable {
    case status(StatusReport)
    /// The Prometheus text exposition of the broker's metrics.
    case metrics(String)
    /// Watching from now on: events follow on this connection.
    case monitor
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
        case .keys(let reply): reply.opcode
        case .namespace(let reply): reply.opcode
        case .sharedMemory(let reply): reply.opcode
        case .net(let reply): reply.opcode
        case .caps(let reply): reply.opcode
        }
    }

    public func encode(requestID: UInt64) -> [UInt8] {
        var writer = Frame.header(kind: .reply, opcode: opcode, requestID: requestID)
        switch self {
        case .status(let report): report.encode(into: &writer)
        case .metrics(let text): writer.string(text)
        case .monitor: break
        case .keys(let reply): reply.encodePayload(into: &writer)
        case .namespace(let reply): reply.encodePayload(into: &writer)
        case .sharedMemory(let reply): reply.encodePayload(into: &writer)
        case .net(let reply): reply.encodePayload(into: &writer)
        case .caps(let reply): reply.encodePayload(into: &writer)
        }
        return writer.bytes
    }

    public static func decode(_ frame: Frame) throws(DecodeError) -> Reply {
        guard frame.kind == .reply else {
            throw .invalidValue(field: "kind", reason: "expected a reply")
        }
        let opcode = frame.opcode
        guard opcode.metadata.expectsReply else { throw .wrongFrame(opcode, "reply") }
        var reader = WireReader(frame.payload)
        let reply: Reply
        switch opcode.subsystem {
        case .broker:
            switch opcode {
            case .metrics: reply = .metrics(try reader.string("metrics"))
            case .monitor: reply = .monitor
            default: reply = .status(try StatusReport.decode(&reader))
            }
        case .keys: reply = .keys(try .decode(opcode, &reader))
        case .namespace: reply = .namespace(try .decode(opcode, &reader))
        case .sharedMemory: reply = .sharedMemory(try .decode(opcode, &reader))
        case .net: reply = .net(try .decode(opcode, &reader))
        case .caps: reply = .caps(try .decode(opcode, &reader))
        }
        try reader.finish()
        return reply
    }
}
