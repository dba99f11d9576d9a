// The broker's file namespace: the paths a client can open, PatchworkOS style.
//
//   /dev/shmem/new                  a new anonymous shared memory object on every open
//   /net/<family>/<type>            a factory: a new socket (`seqpacket`, `stream`, `dgram`)
//   /net/<family>/<id>/data         the socket's kernel socket
//   /net/<family>/<id>/accept       one accepted connection of a listening socket
//   /net/<family>/addrs             the bound names, one per line (a read-only snapshot)
//
// A `:nonblock` suffix on any path is the same as the nonblock open flag.

import Glibc
import PatchbayProtocol
import PatchbaySystem
import SystemPackage

enum NamespacePath: Equatable {
    case anonymousSharedMemory
    case netFactory(family: String, type: NetSocketType)
    case netData(family: String, id: UInt64)
    case netAccept(family: String, id: UInt64)
    case netAddresses(family: String)

    /// Parses a path and its `:nonblock` suffix; unknown paths are ENOENT.
    /// No path in the namespace is longer (the longest is about 60 bytes).
    static let maximumLength = 1024

    static func parse(_ text: String, flags: OpenFlags) throws(RequestError) -> (NamespacePath, nonblock: Bool) {
        guard text.utf8.count <= maximumLength else {
            throw RequestError(errno: .fileNameTooLong,
                               reason: "a path in the broker's namespace is at most \(maximumLength) bytes; this one is \(text.utf8.count)")
        }
        var path = Substring(text)
        var nonblock = flags.contains(.nonblock)
        if path.hasSuffix(":nonblock") {
            path = path.dropLast(":nonblock".count)
            nonblock = true
        }
        if path == "/dev/shmem/new" { return (.anonymousSharedMemory, nonblock) }
        let parts = path.split(separator: "/", omittingEmptySubsequences: false)
        // "", "net", family, ...
        if parts.count >= 4, parts[0].isEmpty, parts[1] == "net" {
            let family = String(parts[2])
            if parts.count == 4, let type = NetSocketType(rawValue: String(parts[3])) {
                return (.netFactory(family: family, type: type), nonblock)
            }
            if parts.count == 4, parts[3] == "addrs" {
                return (.netAddresses(family: family), nonblock)
            }
            // Ids are written as the handle reads them: decimal, no sign, no leading zero.
            if parts.count == 5, let id = UInt64(parts[3]), String(id) == parts[3] {
                switch parts[4] {
                case "data": return (.netData(family: family, id: id), nonblock)
                case "accept": return (.netAccept(family: family, id: id), nonblock)
                case "ctl":
                    throw RequestError(errno: .invalidArgument,
                                       reason: "ctl is written with a net control request, not opened")
                default: break
                }
            }
        }
        throw RequestError(errno: .noSuchFileOrDirectory, reason: "\(text.prefix(200)) is not in the broker's namespace")
    }
}
