// The one error type of the library: every public call throws it (typed throws).

public import SystemPackage
import PatchbayProtocol
import PatchbaySystem

/// What a Patchbay operation throws: the errno of `SEMANTICS.md` and a sentence for a person,
/// usually written by the broker. Broker calls, reads and writes on the library's descriptors,
/// mappings and CAPS ports all throw it.
public struct PatchbayError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The errno, as swift-system spells it (`.noSuchFileOrDirectory` is `ENOENT`).
    public var errno: Errno
    /// Why, in a sentence.
    public var reason: String

    /// An error with `errno` and `reason`.
    public init(_ errno: Errno, _ reason: String) {
        self.errno = errno
        self.reason = reason
    }

    init(_ reply: ErrorReply) {
        self.init(Errno(rawValue: reply.errno), reply.reason)
    }

    /// `ENOENT: no such key ...`
    public var description: String { "\(errno.name): \(reason)" }
}
