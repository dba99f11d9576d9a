// The broker's file namespace: paths a client can open, PatchworkOS style. Each entry is a
// function from (path, flags, caller) to a new kernel object; the table grows with subsystems
// (`/net/...` comes with sockets).

import Glibc
import PatchbayProtocol
import PatchbaySystem
import SystemPackage

/// What kind of object an `open` returned (the reply's payload).
enum NamespaceObjectKind: UInt8 {
    case anonymousSharedMemory = 1
}

/// A new object from the namespace.
struct NamespaceObject: ~Copyable {
    var kind: NamespaceObjectKind
    var handle: Descriptor
}

enum Namespace {
    /// `/dev/shmem/new` flags: bit 0 asks for a sealable object.
    static let sealableFlag: UInt32 = 1

    typealias Opener = @Sendable (_ flags: UInt32, _ caller: PeerCredentials) throws(RequestError) -> NamespaceObject

    static let entries: [String: Opener] = [
        "/dev/shmem/new": openAnonymousSharedMemory,
    ]

    static func open(_ path: String, flags: UInt32, by caller: PeerCredentials) throws(RequestError) -> NamespaceObject {
        guard let opener = entries[path] else {
            throw RequestError(errno: .noSuchFileOrDirectory, reason: "\(path.prefix(200)) is not in the broker's namespace")
        }
        return try opener(flags, caller)
    }

    /// Every open is a new anonymous object: a memfd of size 0 whose first mapping decides its size.
    private static func openAnonymousSharedMemory(flags: UInt32, caller: PeerCredentials) throws(RequestError)
        -> NamespaceObject
    {
        guard flags & ~sealableFlag == 0 else {
            throw RequestError(errno: .invalidArgument, reason: "/dev/shmem/new takes only the sealable flag")
        }
        do {
            let memory = try makeMemoryFile(name: "patchbay-anonymous", sealable: flags & sealableFlag != 0)
            return NamespaceObject(kind: .anonymousSharedMemory, handle: memory)
        } catch {
            throw RequestError(errno: error, reason: "cannot create an anonymous object: \(error.name)")
        }
    }
}
