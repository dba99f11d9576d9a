public import SystemPackage
import PatchbayProtocol

/// What a Patchbay operation throws: the errno of `SEMANTICS.md` and a sentence for a person,
/// usually written by the broker.
public struct PatchbayError: Error, Equatable, Sendable, CustomStringConvertible {
    public var errno: Errno
    public var reason: String

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
