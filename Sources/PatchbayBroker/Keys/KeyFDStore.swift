// Keys that outlive the broker: under a service manager that keeps descriptors (systemd's fd
// store, `FileDescriptorStoreMax=`), each key's file is pushed with `FDSTORE=1` under a name that
// holds what the key needs, removed with `FDSTOREREMOVE=1` when the key ends, and handed back at
// the next start (`LISTEN_FDS`, `LISTEN_FDNAMES`), so a key shared before a restart or a crash is
// claimable after it.
//
// The name: `pbkey-<token, 32 hex digits>-<deadline: CLOCK_MONOTONIC ns, or never>-<owner uid>-
// <restriction: any, u<uid> or g<gid>>`. Monotonic time is the machine's, so deadlines hold across
// restarts (stored descriptors do not outlive a reboot anyway). A key restricted to a pid is not
// stored: the process it names is held by a pidfd that a restart cannot carry. The token is in
// the name, which only root (the service manager) sees; root is trusted.

import PatchbayProtocol
import PatchbaySystem

/// A key as the service manager kept it.
struct StoredKey: Equatable {
    var token: KeyToken
    var deadline: UInt64?
    var ownerUID: UInt32
    var restriction: ClaimRestriction?

    static let prefix = "pbkey-"

    /// The name for a key, or nil for one that cannot be stored (a pid restriction).
    var name: String? {
        let restrictionText: String
        switch restriction {
        case nil: restrictionText = "any"
        case .uid(let uid)?: restrictionText = "u\(uid)"
        case .gid(let gid)?: restrictionText = "g\(gid)"
        case .pid?: return nil
        }
        let hex = token.bytes.map { byte in (byte < 16 ? "0" : "") + String(byte, radix: 16) }.joined()
        return Self.prefix + hex + "-" + (deadline.map(String.init) ?? "never") + "-\(ownerUID)-" + restrictionText
    }

    /// A stored name read back; nil for anything else.
    init?(name: String) {
        guard name.hasPrefix(Self.prefix) else { return nil }
        let fields = name.dropFirst(Self.prefix.count).split(separator: "-", omittingEmptySubsequences: false)
        guard fields.count == 4, fields[0].utf8.count == 32 else { return nil }
        var bytes: [UInt8] = []
        var index = fields[0].startIndex
        while index < fields[0].endIndex {
            let next = fields[0].index(index, offsetBy: 2)
            guard let byte = UInt8(fields[0][index..<next], radix: 16) else { return nil }
            bytes.append(byte)
            index = next
        }
        guard let token = KeyToken(bytes: bytes), let owner = UInt32(fields[2]) else { return nil }
        self.token = token
        self.ownerUID = owner
        if fields[1] == "never" {
            deadline = nil
        } else {
            guard let value = UInt64(fields[1]) else { return nil }
            deadline = value
        }
        switch fields[3].first {
        case "a" where fields[3] == "any": restriction = nil
        case "u": guard let uid = UInt32(fields[3].dropFirst()) else { return nil }; restriction = .uid(uid)
        case "g": guard let gid = UInt32(fields[3].dropFirst()) else { return nil }; restriction = .gid(gid)
        default: return nil
        }
    }

    init(token: KeyToken, deadline: UInt64?, ownerUID: UInt32, restriction: ClaimRestriction?) {
        self.token = token
        self.deadline = deadline
        self.ownerUID = ownerUID
        self.restriction = restriction
    }
}

/// Pushes keys to the service manager's store and takes them out again.
struct KeyFDStore {
    /// A key was made: its file goes to the store under its name.
    func stored(_ key: StoredKey, file: CInt) {
        guard let name = key.name else { return }
        ServiceManager.notify("FDSTORE=1\nFDNAME=\(name)", descriptors: [file])
    }

    /// A key ended (claimed, expired): the store lets its copy go.
    func removed(_ key: StoredKey) {
        guard let name = key.name else { return }
        ServiceManager.notify("FDSTOREREMOVE=1\nFDNAME=\(name)")
    }
}
