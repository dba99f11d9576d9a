// A frame is one SOCK_SEQPACKET message: a 16-byte header and a payload. See docs/PROTOCOL.md.
//
//   offset  size  field
//   0       2     magic "PB"
//   2       1     version (1)
//   3       1     kind: 1 request, 2 reply, 3 error reply
//   4       2     opcode
//   6       2     reserved, zero
//   8       8     request id (a reply echoes its request's)
//   16      ...   payload, per opcode

/// The protocol version this build speaks.
public let protocolVersion: UInt8 = 1

/// The largest frame either side sends or accepts, header included.
public let maximumFrameSize = 65536

/// Size of the fixed frame header.
public let frameHeaderSize = 16

/// What a frame is.
public enum FrameKind: UInt8, Sendable {
    case request = 1
    case reply = 2
    case error = 3
    /// Unsolicited, broker → client (request id 0): CAPS connection notices to a service port.
    case event = 4
}

/// One decoded frame: header fields and the still-undecoded payload.
public struct Frame: Sendable, Equatable {
    public var kind: FrameKind
    public var opcode: Opcode
    public var requestID: UInt64
    public var payload: ArraySlice<UInt8>

    public init(kind: FrameKind, opcode: Opcode, requestID: UInt64, payload: ArraySlice<UInt8>) {
        self.kind = kind
        self.opcode = opcode
        self.requestID = requestID
        self.payload = payload
    }

    /// The header as it goes on the wire.
    public static func header(kind: FrameKind, opcode: Opcode, requestID: UInt64) -> WireWriter {
        header(kind: kind, rawOpcode: opcode.rawValue, requestID: requestID)
    }

    /// The header with an opcode given as a raw number (error replies echo whatever arrived).
    public static func header(kind: FrameKind, rawOpcode: UInt16, requestID: UInt64) -> WireWriter {
        var writer = WireWriter(capacity: 128)
        writer.u8(0x50)  // 'P'
        writer.u8(0x42)  // 'B'
        writer.u8(protocolVersion)
        writer.u8(kind.rawValue)
        writer.u16(rawOpcode)
        writer.u16(0)
        writer.u64(requestID)
        return writer
    }

    /// Reads the header of `bytes`. Total: any input either decodes or throws.
    public static func decode(_ bytes: ArraySlice<UInt8>) throws(DecodeError) -> Frame {
        guard bytes.count <= maximumFrameSize else { throw .oversized(bytes.count) }
        var reader = WireReader(bytes)
        let m0 = try reader.u8("magic")
        let m1 = try reader.u8("magic")
        guard m0 == 0x50, m1 == 0x42 else { throw .badMagic }
        let version = try reader.u8("version")
        guard version == protocolVersion else { throw .unsupportedVersion(version) }
        let rawKind = try reader.u8("kind")
        guard let kind = FrameKind(rawValue: rawKind) else { throw .unknownKind(rawKind) }
        let rawOpcode = try reader.u16("opcode")
        let reserved = try reader.u16("reserved")
        let requestID = try reader.u64("request id")
        guard let opcode = Opcode(rawValue: rawOpcode) else { throw .unknownOpcode(rawOpcode) }
        guard reserved == 0 else { throw .reservedBitsSet }
        return Frame(kind: kind, opcode: opcode, requestID: requestID,
                     payload: try reader.raw("payload", count: reader.remaining))
    }

    /// The request id of a frame whose header could not be fully decoded, when the bytes hold
    /// one, so an error reply can still be matched to its request.
    public static func salvageRequestID(_ bytes: ArraySlice<UInt8>) -> UInt64? {
        guard bytes.count >= frameHeaderSize else { return nil }
        var reader = WireReader(bytes.dropFirst(8))
        return try? reader.u64("request id")
    }

    /// The opcode field of a frame whose header could not be fully decoded, raw.
    public static func salvageOpcode(_ bytes: ArraySlice<UInt8>) -> UInt16 {
        guard bytes.count >= 6 else { return 0 }
        var reader = WireReader(bytes.dropFirst(4))
        return (try? reader.u16("opcode")) ?? 0
    }
}
