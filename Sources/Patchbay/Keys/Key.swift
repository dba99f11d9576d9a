// A key as users hold it: text that names one shared file, once.

package import PatchbayProtocol

/// A one-time key naming a shared file: 128 random bits, written as 22 base64url characters
/// that never start with `-` (docs/PROTOCOL.md §6).
///
/// `Key("…")` is nil for anything but the canonical text (`LosslessStringConvertible`);
/// `Key(parsing:)` throws `EINVAL` with a sentence instead. A key encodes (`Codable`) as its text,
/// a single string.
public struct Key: Sendable, Hashable, LosslessStringConvertible, Codable {
    /// The 128 bits, as the wire carries them.
    package let token: KeyToken

    package init(token: KeyToken) {
        self.token = token
    }

    /// Parses key text: nil for anything but 22 canonical base64url characters.
    public init?(_ description: String) {
        guard let token = KeyToken(text: description) else { return nil }
        self.token = token
    }

    /// Parses key text. Anything but 22 canonical base64url characters is `EINVAL`.
    public init(parsing text: String) throws(PatchbayError) {
        guard let key = Key(text) else {
            throw PatchbayError(.invalidArgument,
                                "a key is 22 characters of A-Z, a-z, 0-9, '-' and '_', starting with A, B, C or D; \"\(text.prefix(64))\" is not one")
        }
        self = key
    }

    /// The key text, e.g. `"q3KxW0f6tQ2aN8c1Zb7sYg"`.
    public var text: String { token.text }

    /// The key text (`text`).
    public var description: String { text }

    /// Decodes a key from its text; other text is a `DecodingError.dataCorrupted`.
    public init(from decoder: any Decoder) throws {
        let container = try decoder.singleValueContainer()
        let text = try container.decode(String.self)
        guard let key = Key(text) else {
            throw DecodingError.dataCorruptedError(
                in: container, debugDescription: "\"\(text.prefix(64))\" is not a Patchbay key (22 base64url characters)")
        }
        self = key
    }

    /// Encodes the key as its text.
    public func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(text)
    }
}
