import PatchbayProtocol

/// A one-time key naming a shared file: 128 random bits, written as 22 base64url characters
/// that never start with `-` (docs/PROTOCOL.md §6).
public struct Key: Sendable, Hashable, CustomStringConvertible {
    public let token: KeyToken

    public init(token: KeyToken) {
        self.token = token
    }

    /// Parses key text. Anything but 22 canonical base64url characters is `EINVAL`.
    public init(_ text: String) throws(PatchbayError) {
        guard let token = KeyToken(text: text) else {
            throw PatchbayError(.invalidArgument,
                                "a key is 22 characters of A-Z, a-z, 0-9, '-' and '_', starting with A, B, C or D; \"\(text.prefix(64))\" is not one")
        }
        self.token = token
    }

    /// The key text, e.g. `"q3KxW0f6tQ2aN8c1Zb7sYg"`.
    public var text: String { token.text }
    public var description: String { text }
}

