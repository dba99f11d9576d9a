import Glibc

/// A failed request: the errno (Linux numbering) and a sentence for a person. Request id 0
/// addresses the connection itself (for example, a per-user broker refusing another uid).
public struct ErrorReply: Sendable, Equatable, Error {
    public var errno: Int32
    public var reason: String

    public init(errno: Int32, reason: String) {
        self.errno = errno
        self.reason = reason
    }

    public func encode(rawOpcode: UInt16, requestID: UInt64) -> [UInt8] {
        var writer = Frame.header(kind: .error, rawOpcode: rawOpcode, requestID: requestID)
        writer.i32(errno)
        writer.string(reason)
        return writer.bytes
    }

    public static func decode(_ frame: Frame) throws(DecodeError) -> ErrorReply {
        guard frame.kind == .error else { throw .invalidValue(field: "kind", reason: "expected an error reply") }
        var reader = WireReader(frame.payload)
        let number = try reader.i32("errno")
        guard number > 0 && number < 4096 else {
            throw .invalidValue(field: "errno", reason: "\(number) is not an errno value")
        }
        let reason = try reader.string("reason")
        try reader.finish()
        return ErrorReply(errno: number, reason: reason)
    }

    /// The error for a frame that did not decode.
    public init(_ error: DecodeError) {
        switch error {
        case .unsupportedVersion: self.init(errno: EPROTONOSUPPORT, reason: error.reason)
        case .unknownOpcode: self.init(errno: EOPNOTSUPP, reason: error.reason)
        case .oversized: self.init(errno: EMSGSIZE, reason: error.reason)
        default: self.init(errno: EPROTO, reason: error.reason)
        }
    }
}
