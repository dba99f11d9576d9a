// Little-endian primitives for the wire format: a writer that appends and a reader that checks
// every length against what is actually there before using it.

/// Why bytes could not be decoded. Decoding never traps: every malformed input ends here.
public enum DecodeError: Error, Equatable, Sendable {
    /// Fewer bytes than the header or a field needs.
    case truncated(field: String)
    /// The frame does not start with the Patchbay magic.
    case badMagic
    /// A protocol version this side does not speak.
    case unsupportedVersion(UInt8)
    /// A frame kind that does not exist.
    case unknownKind(UInt8)
    /// An opcode that does not exist.
    case unknownOpcode(UInt16)
    /// Reserved header bits were set.
    case reservedBitsSet
    /// The frame is larger than `maximumFrameSize`.
    case oversized(Int)
    /// Bytes were left over after the last field.
    case trailingBytes(Int)
    /// A field holds a value outside its domain.
    case invalidValue(field: String, reason: String)

    /// A sentence for a person.
    public var reason: String {
        switch self {
        case .truncated(let field): "the frame ends before its \(field) field"
        case .badMagic: "the frame does not start with the Patchbay magic \"PB\""
        case .unsupportedVersion(let version):
            "protocol version \(version) is not supported (this side speaks \(protocolVersion))"
        case .unknownKind(let kind): "frame kind \(kind) does not exist"
        case .unknownOpcode(let opcode): "opcode \(opcode) does not exist"
        case .reservedBitsSet: "reserved header bits are set"
        case .oversized(let size): "the frame is \(size) bytes, more than the \(maximumFrameSize)-byte limit"
        case .trailingBytes(let count): "\(count) unexpected bytes follow the last field"
        case .invalidValue(let field, let reason): "the \(field) field is invalid: \(reason)"
        }
    }
}

/// Appends little-endian values to a byte array.
public struct WireWriter: Sendable {
    public private(set) var bytes: [UInt8]

    public init(capacity: Int = 64) {
        bytes = []
        bytes.reserveCapacity(capacity)
    }

    public mutating func u8(_ value: UInt8) { bytes.append(value) }

    public mutating func u16(_ value: UInt16) { append(value) }

    public mutating func u32(_ value: UInt32) { append(value) }

    public mutating func u64(_ value: UInt64) { append(value) }

    public mutating func i32(_ value: Int32) { append(UInt32(bitPattern: value)) }

    public mutating func i64(_ value: Int64) { append(UInt64(bitPattern: value)) }

    /// A UTF-8 string with a 16-bit length prefix. Longer strings are cut at 65535 bytes on a
    /// character boundary, so what is written always decodes.
    public mutating func string(_ value: String) {
        var utf8 = Array(value.utf8)
        if utf8.count > Int(UInt16.max) {
            var end = Int(UInt16.max)
            while end > 0, utf8[end] & 0xC0 == 0x80 { end -= 1 }
            utf8 = Array(utf8[0..<end])
        }
        u16(UInt16(utf8.count))
        bytes.append(contentsOf: utf8)
    }

    public mutating func raw(_ value: some Collection<UInt8>) { bytes.append(contentsOf: value) }

    /// Bytes with a 16-bit length prefix (callers keep them under 65536).
    public mutating func bytes(_ value: [UInt8]) {
        let count = min(value.count, Int(UInt16.max))
        u16(UInt16(count))
        bytes.append(contentsOf: value[0..<count])
    }

    private mutating func append<T: FixedWidthInteger>(_ value: T) {
        withUnsafeBytes(of: value.littleEndian) { bytes.append(contentsOf: $0) }
    }
}

/// Reads little-endian values from a byte slice, throwing instead of reading past the end.
public struct WireReader: Sendable {
    private let bytes: ArraySlice<UInt8>
    private var position: Int

    public init(_ bytes: ArraySlice<UInt8>) {
        self.bytes = bytes
        position = bytes.startIndex
    }

    public var remaining: Int { bytes.endIndex - position }

    public mutating func u8(_ field: String) throws(DecodeError) -> UInt8 {
        guard remaining >= 1 else { throw .truncated(field: field) }
        defer { position += 1 }
        return bytes[position]
    }

    public mutating func u16(_ field: String) throws(DecodeError) -> UInt16 { try integer(field) }

    public mutating func u32(_ field: String) throws(DecodeError) -> UInt32 { try integer(field) }

    public mutating func u64(_ field: String) throws(DecodeError) -> UInt64 { try integer(field) }

    public mutating func i32(_ field: String) throws(DecodeError) -> Int32 {
        Int32(bitPattern: try integer(field) as UInt32)
    }

    public mutating func i64(_ field: String) throws(DecodeError) -> Int64 {
        Int64(bitPattern: try integer(field) as UInt64)
    }

    public mutating func string(_ field: String) throws(DecodeError) -> String {
        let length = Int(try u16(field))
        let raw = try self.raw(field, count: length)
        guard let text = String(validating: raw, as: UTF8.self) else {
            throw .invalidValue(field: field, reason: "not valid UTF-8")
        }
        return text
    }

    /// Bytes with a 16-bit length prefix.
    public mutating func bytes(_ field: String) throws(DecodeError) -> [UInt8] {
        let length = Int(try u16(field))
        return Array(try raw(field, count: length))
    }

    public mutating func raw(_ field: String, count: Int) throws(DecodeError) -> ArraySlice<UInt8> {
        guard count >= 0, remaining >= count else { throw .truncated(field: field) }
        defer { position += count }
        return bytes[position..<position + count]
    }

    /// An element count, checked against the bytes left so a hostile count cannot make the
    /// decoder allocate more than the frame could hold.
    public mutating func count(_ field: String, minimumElementSize: Int) throws(DecodeError) -> Int {
        let count = Int(try u32(field))
        guard count <= remaining / max(minimumElementSize, 1) else { throw .truncated(field: field) }
        return count
    }

    /// Fails unless every byte was consumed.
    public func finish() throws(DecodeError) {
        if remaining != 0 { throw .trailingBytes(remaining) }
    }

    private mutating func integer<T: FixedWidthInteger>(_ field: String) throws(DecodeError) -> T {
        let size = MemoryLayout<T>.size
        guard remaining >= size else { throw .truncated(field: field) }
        var value = T.zero
        for index in 0..<size {
            value |= T(bytes[position + index]) << (8 * index)
        }
        position += size
        return value
    }
}
