// Where a per-user broker keeps named shared memory when the name its store would have in
// /dev/shm is another user's.
//
// /dev/shm is a directory anyone may write, and a per-user broker without $XDG_RUNTIME_DIR keeps
// its store there at a name anyone can compute (/dev/shm/patchbay-$UID). Another user who makes
// that name first cannot be moved aside (the directory is sticky: only root, or the entry's
// owner, may rename it), and the broker must not use what another user owns. So the broker makes
// a directory of its own beside it, under a name nobody can guess (mkdtemp), and records that
// name where only its uid can write: a symbolic link in its private socket directory
// (`/tmp/patchbay-$UID/shm-store`). Every later broker on that socket reads the record first, so
// named objects survive restarts there as they do at the default name. A record lost (a cleaner
// of /tmp removed it, with the store still in /dev/shm) is made again for the store left behind:
// a directory beside the taken name that only this uid can have made (its own, private).

import Glibc
import Logging
import PatchbaySystem
import SystemPackage

public enum StorePlace {
    /// The record's name in the socket directory.
    public static let recordName = "shm-store"

    /// The place recorded in `socketDirectory` for the store whose default is `path`, if the
    /// record names a directory of this uid's, private, whose name is `path` with a suffix
    /// `mkdtemp` made. Nil otherwise (no record, or one that names anything else).
    public static func recorded(for path: String, in socketDirectory: String) -> String? {
        var buffer = [CChar](repeating: 0, count: 4097)
        let length = readlink(socketDirectory + "/" + recordName, &buffer, 4096)
        guard length > 0 else { return nil }
        let place = String(decoding: buffer[0..<length].map { UInt8(bitPattern: $0) }, as: UTF8.self)
        var info = Glibc.stat()
        guard place.hasPrefix(path + "-"), place.utf8.count == path.utf8.count + 7,
              lstat(place, &info) == 0, info.st_mode & S_IFMT == S_IFDIR, info.st_uid == geteuid(), info.st_mode & 0o077 == 0
        else { return nil }
        return place
    }

    /// Where the store whose default is `path` lives, for a broker whose socket directory,
    /// private to this uid, is `socketDirectory`: the recorded place if there is one; else
    /// `path`, unless another uid owns an entry there; then a new private directory beside it,
    /// recorded.
    static func choose(default path: String, socketDirectory: String, logger: Logger) throws(BrokerStartError) -> String {
        if let place = recorded(for: path, in: socketDirectory) { return place }
        var info = Glibc.stat()
        guard lstat(path, &info) == 0, info.st_uid != geteuid() else { return path }
        let owner = info.st_uid
        let place: String
        if let left = leftBehind(for: path) {
            place = left
            logger.warning("the shared memory store's record was gone; recorded again the store found beside the taken name",
                           metadata: ["store": "\(place)"])
        } else {
            var template = Array((path + "-XXXXXX").utf8CString)
            guard mkdtemp(&template) != nil else {
                let error = Errno.current
                throw BrokerStartError(errno: error, reason: "\(path) is uid \(owner)'s, and no store could be made beside it: \(error.name)")
            }
            place = String(decoding: template.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        }
        let record = socketDirectory + "/" + recordName
        unlink(record)  // one that names something else (`recorded` passed it over)
        guard symlink(place, record) == 0 else {
            let error = Errno.current
            rmdir(place)  // (only if empty: a store left behind keeps its objects)
            throw BrokerStartError(errno: error, reason: "cannot record the store's place at \(record): \(error.name)")
        }
        logger.warning("the shared memory store's default name is another user's; this broker's store is beside it, recorded in its socket directory",
                       metadata: ["taken": "\(path)", "owner": "\(owner)", "store": "\(place)", "record": "\(record)"])
        return place
    }

    /// A store an earlier broker made beside `path` and whose record is gone: a directory named
    /// as `mkdtemp` names them there, this uid's and private (no other uid can make one that
    /// is), the most recently changed if there are several.
    static func leftBehind(for path: String) -> String? {
        guard let slash = path.lastIndex(of: "/") else { return nil }
        let parent = String(path[..<slash]), prefix = String(path[path.index(after: slash)...]) + "-"
        guard let directory = opendir(parent.isEmpty ? "/" : parent) else { return nil }
        defer { closedir(directory) }
        var newest: (place: String, changed: Int)?
        while let entry = readdir(directory) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
            }
            guard name.hasPrefix(prefix), name.utf8.count == prefix.utf8.count + 6 else { continue }
            let place = parent + "/" + name
            var info = Glibc.stat()
            guard lstat(place, &info) == 0, info.st_mode & S_IFMT == S_IFDIR, info.st_uid == geteuid(),
                  info.st_mode & 0o077 == 0 else { continue }
            let changed = info.st_mtim.tv_sec
            if newest == nil || changed > newest!.changed { newest = (place, changed) }
        }
        return newest?.place
    }
}
