/// The 128 secret bits of a key. On the wire: 16 bytes. For people: 22 characters of base64url
/// without padding (URL- and shell-safe).
public struct KeyToken: Hashable, Sendable {
    public var high: UInt64
    public var low: UInt64

    public init(high: UInt64, low: UInt64) {
        self.high = high
        self.low = low
    }

    /// Builds a token from 16 bytes, most significant first.
    public init?(bytes: some Collection<UInt8>) {
        guard bytes.count == 16 else { return nil }
        var high: UInt64 = 0
        var low: UInt64 = 0
        for (index, byte) in bytes.enumerated() {
            if index < 8 { high = high << 8 | UInt64(byte) } else { low = low << 8 | UInt64(byte) }
        }
        self.init(high: high, low: low)
    }

    /// The 16 bytes, most significant first.
    public var bytes: [UInt8] {
        (0..<8).map { UInt8(truncatingIfNeeded: high >> (56 - 8 * $0)) }
            + (0..<8).map { UInt8(truncatingIfNeeded: low >> (56 - 8 * $0)) }
    }

    private static let alphabet = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_".utf8)

    /// The 22-character text: the 128 bits as base64url digits, most significant first, with the
    /// 4 spare bits (22 × 6 = 132) leading and zero. So the text never starts with `-` (it starts
    /// with one of `A B C D`), and no command line mistakes a key for an option. Equivalently:
    /// base64url of two zero bytes followed by the 16 key bytes, minus its first two characters.
    public var text: String {
        let source: [UInt8] = [0, 0] + bytes  // 18 bytes: six groups of three
        var output: [UInt8] = []
        output.reserveCapacity(24)
        for group in stride(from: 0, to: 18, by: 3) {
            let value = UInt32(source[group]) << 16 | UInt32(source[group + 1]) << 8 | UInt32(source[group + 2])
            for shift in [18, 12, 6, 0] {
                output.append(Self.alphabet[Int(value >> UInt32(shift) & 63)])
            }
        }
        return String(decoding: output[2...], as: UTF8.self)
    }

    /// Parses key text. Only the canonical form is accepted: exactly 22 characters of the
    /// base64url alphabet whose first character carries no more than the 2 bits that belong to
    /// the key (it is one of `A B C D`).
    public init?(text: String) {
        let characters = Array(text.utf8)
        guard characters.count == 22 else { return nil }
        var values: [UInt8] = [0, 0]
        values.reserveCapacity(24)
        for character in characters {
            switch character {
            case UInt8(ascii: "A")...UInt8(ascii: "Z"): values.append(character - UInt8(ascii: "A"))
            case UInt8(ascii: "a")...UInt8(ascii: "z"): values.append(character - UInt8(ascii: "a") + 26)
            case UInt8(ascii: "0")...UInt8(ascii: "9"): values.append(character - UInt8(ascii: "0") + 52)
            case UInt8(ascii: "-"): values.append(62)
            case UInt8(ascii: "_"): values.append(63)
            default: return nil
            }
        }
        guard values[2] < 4 else { return nil }
        var decoded: [UInt8] = []
        for group in stride(from: 0, to: 24, by: 4) {
            let value = UInt32(values[group]) << 18 | UInt32(values[group + 1]) << 12
                | UInt32(values[group + 2]) << 6 | UInt32(values[group + 3])
            decoded += [UInt8(truncatingIfNeeded: value >> 16), UInt8(truncatingIfNeeded: value >> 8),
                        UInt8(truncatingIfNeeded: value)]
        }
        self.init(bytes: decoded[2..<18])
    }
}
