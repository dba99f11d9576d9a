// Who may hold which names: the system broker's reservations, read at start from a directory of
// `*.conf` files (`/etc/patchbay/policy.d` by default), the way D-Bus policy reserves well-known
// names. A reserved CAPS name can be registered, a reserved `/net` name bound, and a reserved
// shared memory name created (or made a rename's target), only by the owners its rule lists;
// anyone else gets EACCES. A CAPS client that names no uid trusts the services of its own uid
// and of root, and, for a reserved name, those of the name's owners.
//
// The format, one rule per line, `#` to the end of a line is a comment:
//
//   caps  NAME  OWNER...        reserve a CAPS service name
//   net   NAME  OWNER...        reserve a /net/local name
//   shm   NAME  OWNER...        reserve a named shared memory object's name (with its `/`)
//
// NAME is exact, or a prefix followed by `*` (`org.example.*`). An OWNER is `uid:N`,
// `uid:USERNAME`, `group:N` or `group:GROUPNAME` (a member of the group). Files are read in
// name order; a name matched by several rules takes the first. A malformed line stops the
// broker from starting, with the file and line number.

import Glibc
import PatchbaySystem
import SystemPackage

struct Policy {
    enum Kind: String {
        case caps
        case net
        case shm
    }

    enum Owner: Equatable {
        case uid(UInt32)
        case group(UInt32)

        func includes(_ credentials: PeerCredentials) -> Bool {
            switch self {
            case .uid(let uid): credentials.uid == uid
            case .group(let gid): credentials.isMember(of: gid)
            }
        }

        var description: String {
            switch self {
            case .uid(let uid): "uid \(uid)"
            case .group(let gid): "group \(gid)"
            }
        }
    }

    struct Rule: Equatable {
        var kind: Kind
        /// The exact name, or the prefix when `isPrefix`.
        var name: String
        var isPrefix: Bool
        var owners: [Owner]

        func matches(_ candidate: Substring) -> Bool {
            isPrefix ? candidate.hasPrefix(name) : candidate == name
        }
    }

    private(set) var rules: [Rule] = []

    /// No reservations at all (the per-user broker, or no policy directory).
    static let none = Policy()

    /// The rule reserving `name`, if any.
    func rule(for kind: Kind, _ name: Substring) -> Rule? {
        rules.first { $0.kind == kind && $0.matches(name) }
    }

    /// EACCES unless `caller` may take `name` (register it, bind it).
    func checkTake(_ kind: Kind, _ name: Substring, by caller: PeerCredentials) throws(RequestError) {
        guard let rule = rule(for: kind, name), !rule.owners.contains(where: { $0.includes(caller) }) else { return }
        throw RequestError(errno: .permissionDenied,
                           reason: "the \(kind.rawValue) name \(name.prefix(80)) is reserved by the broker's policy for \(rule.owners.map(\.description).joined(separator: ", "))")
    }

    /// Whether a client that named no uid trusts a service of `name` registered by `owner`:
    /// its own, root's, or an owner the name is reserved for.
    func trusts(serviceOwner owner: PeerCredentials, of name: String, client: PeerCredentials) -> Bool {
        if owner.uid == client.uid || owner.uid == 0 { return true }
        guard let rule = rule(for: .caps, Substring(name)) else { return false }
        // An owner the rule names: its uid, or a member of its group (as registering checks).
        return rule.owners.contains { $0.includes(owner) }
    }

    // MARK: Reading

    /// Reads every `*.conf` in `directory`; a directory that does not exist is an empty policy.
    static func load(directory: String) throws(BrokerStartError) -> Policy {
        guard let listing = opendir(directory) else {
            if errno == ENOENT { return Policy() }
            let error = Errno(rawValue: errno)
            throw BrokerStartError(errno: error, reason: "cannot read the policy directory \(directory): \(error.name)")
        }
        var files: [String] = []
        while let entry = readdir(listing) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            if name.hasSuffix(".conf"), !name.hasPrefix(".") { files.append(name) }
        }
        closedir(listing)
        var policy = Policy()
        for file in files.sorted() {
            let path = directory + "/" + file
            let bytes: [UInt8]
            do {
                bytes = try openFile(path, flags: O_RDONLY | O_NOFOLLOW).readToEnd(limit: 1 << 20)
            } catch {
                throw BrokerStartError(errno: error, reason: "cannot read the policy file \(path): \(error.name)")
            }
            try policy.parse(String(decoding: bytes, as: UTF8.self), file: path)
        }
        return policy
    }

    /// Adds the rules of one file's text.
    mutating func parse(_ text: String, file: String) throws(BrokerStartError) {
        for (index, rawLine) in text.split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
            let line = rawLine.split(separator: "#", maxSplits: 1, omittingEmptySubsequences: false).first ?? ""
            let words = line.split(whereSeparator: { $0 == " " || $0 == "\t" || $0 == "\r" })
            guard !words.isEmpty else { continue }
            func failure(_ reason: String) -> BrokerStartError {
                BrokerStartError(errno: .invalidArgument, reason: "\(file), line \(index + 1): \(reason)")
            }
            guard let kind = Kind(rawValue: String(words[0])) else {
                throw failure("a rule starts with caps, net or shm, not \"\(words[0].prefix(40))\"")
            }
            guard words.count >= 3 else { throw failure("a rule is KIND NAME OWNER..., with at least one owner") }
            var name = String(words[1])
            let isPrefix = name.hasSuffix("*")
            if isPrefix { name.removeLast() }
            guard !name.contains("*") else { throw failure("\"*\" may only end a name") }
            var owners: [Owner] = []
            for word in words.dropFirst(2) {
                guard let owner = Self.owner(word) else {
                    throw failure("an owner is uid:N, uid:USER, group:N or group:GROUP; \"\(word.prefix(60))\" is not one")
                }
                owners.append(owner)
            }
            rules.append(Rule(kind: kind, name: name, isPrefix: isPrefix, owners: owners))
        }
    }

    private static func owner(_ word: Substring) -> Owner? {
        let parts = word.split(separator: ":", maxSplits: 1)
        guard parts.count == 2 else { return nil }
        let value = String(parts[1])
        switch parts[0] {
        case "uid":
            if let uid = UInt32(value) { return .uid(uid) }
            return getpwnam(value).map { .uid($0.pointee.pw_uid) }
        case "group":
            if let gid = UInt32(value) { return .group(gid) }
            return getgrnam(value).map { .group($0.pointee.gr_gid) }
        default:
            return nil
        }
    }
}
