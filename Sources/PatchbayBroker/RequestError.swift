import PatchbayProtocol
import PatchbaySystem
import SystemPackage

/// An error a subsystem reports to a client: the errno of SEMANTICS.md plus a sentence.
struct RequestError: Error {
    var errno: Errno
    var reason: String
}

extension ErrorReply {
    init(_ error: RequestError) {
        self.init(errno: error.errno.rawValue, reason: error.reason)
    }
}
