// Named shared memory: FreeBSD's shm_open / shm_unlink / shm_rename, kept by the broker.
//
// What it is. A dictionary from names ("/" then up to 1022 more bytes of UTF-8, slashes and all,
// no "."/".." processing) to objects. Each object is a file in a private directory (mode 0700)
// that the broker owns, normally on tmpfs (/dev/shm), so its pages are ordinary shared memory.
// A client's `open` gets a descriptor for that file (read-only or read-write); from then on the
// client maps and uses it without the broker.
//
// Lifetime. A name keeps its object alive. `unlink` removes the name and the file's directory
// entry at once, so the object lives on exactly while some handle or mapping refers to it, and
// the kernel frees its pages when the last one goes. A later `open(create)` of the same name makes
// a new object.
//
// Durability. The namespace is a journal next to the objects: one appended record per change
// (bind a name to a new object, unbind a name, rename/exchange). A record is written before the
// file system is touched for a removal and after it for a creation, so a broker killed at any
// instant restarts into a consistent namespace: names whose file is gone are dropped, files no
// name refers to are deleted, and the journal is compacted. Contents, sizes and times live in the
// files themselves; owners and modes live in the journal. Only a reboot (tmpfs) clears it all.
//
// Permissions. The owner is the creator's effective uid and gid as the kernel reports them; the
// mode is `mode & ~umask & 0777`; the creator is not checked. Opening checks the mode bits (read
// for read-only; read and write for read-write) against the caller: owner bits for the owner,
// group bits for a member of the group, other bits for everyone else. Decision: root gets no
// bypass, as in CAPS, so an object's mode means the same for every caller.
//
// Quotas. Creating an object is refused with EDQUOT when the creator's uid already owns
// `maximumObjectsPerUser` named objects, or when the pages its named objects hold (st_blocks, so
// what they really occupy, not their sparse sizes) reach `maximumBytesPerUser`. The byte check
// is made at create: a client that grows an object it already holds, with ftruncate and stores
// on its own descriptor, does so without the broker, and only the tmpfs's own size bounds that.
//
// Errors (SEMANTICS.md §3): ENAMETOOLONG (checked first), EINVAL (no leading slash, NUL or
// non-UTF-8 bytes, write-only access, unknown flags, bad rename flags), ENOENT, EEXIST (before any
// permission check), EACCES.

import Glibc
import Logging
import PatchbayProtocol
import PatchbaySystem
import SystemPackage

/// One named object: the file that holds it and who may do what with it.
struct SharedMemoryObject {
    /// The file name under `objects/`: 32 hex digits.
    var id: String
    var uid: UInt32
    var gid: UInt32
    var mode: UInt32
}

/// A handle just opened, with what the client is told about it.
struct OpenedObject: ~Copyable {
    var handle: Descriptor
    var info: SharedMemoryInfo
}

final class SharedMemoryStore {
    static let maximumNameLength = 1023

    let path: String
    private let lock: FileLock
    private let objectsDirectory: Descriptor
    private var journal: Descriptor
    private var journalRecords = 0
    private(set) var objects: [[UInt8]: SharedMemoryObject] = [:]
    private var logger: Logger
    var maximumObjectsPerUser = 4096
    var maximumBytesPerUser = 8 << 30

    /// Opens (or creates) the store at `path`, replays its journal and removes what a crash left.
    init(path: String, logger: Logger) throws(BrokerStartError) {
        self.path = path
        self.logger = logger
        do {
            try Self.makePrivateDirectory(path)
            try Self.makePrivateDirectory(path + "/objects")
        } catch {
            throw BrokerStartError(errno: error.errno, reason: error.reason)
        }
        do {
            lock = try FileLock(path: path + "/lock", wait: false)
        } catch {
            throw BrokerStartError(errno: .addressInUse, reason: "another broker is using the shared memory store \(path)")
        }
        do {
            objectsDirectory = try openFile(path + "/objects", flags: O_RDONLY | O_DIRECTORY | O_NOFOLLOW)
            journal = try openFile(path + "/journal", flags: O_RDWR | O_CREAT | O_APPEND | O_NOFOLLOW, mode: 0o600)
        } catch {
            throw BrokerStartError(errno: error, reason: "cannot open the shared memory store \(path): \(error.name)")
        }
        do {
            try replay()
            try removeOrphans()
            try compact()
        } catch {
            throw BrokerStartError(errno: error, reason: "cannot recover the shared memory store \(path): \(error.name)")
        }
        logger.info("shared memory store ready", metadata: ["store": "\(path)", "objects": "\(objects.count)"])
    }

    // MARK: Operations

    /// `shm_open`. Returns a handle with the requested access and the object's description.
    func open(_ request: SharedMemoryOpenRequest, by caller: PeerCredentials) throws(RequestError)
        -> OpenedObject
    {
        try Self.validate(request.name)
        let readWrite: Bool
        switch request.access {
        case 0: readWrite = false
        case 1: readWrite = true
        case 2: throw RequestError(errno: .invalidArgument, reason: "write-only access is not allowed; open read-only or read-write")
        default: throw RequestError(errno: .invalidArgument, reason: "access \(request.access) is not read-only (0) or read-write (1)")
        }
        guard request.flags.isSubset(of: .known) else {
            throw RequestError(errno: .invalidArgument,
                               reason: "unknown open flags 0x\(String(request.flags.subtracting(.known).rawValue, radix: 16)); only create, exclusive and truncate exist")
        }
        let create = request.flags.contains(.create)
        let exclusive = request.flags.contains(.exclusive)
        let truncate = request.flags.contains(.truncate)
        let access = readWrite ? O_RDWR : O_RDONLY

        if let object = objects[request.name] {
            if create && exclusive {
                throw RequestError(errno: .fileExists, reason: "\(Self.display(request.name)) already exists")
            }
            guard Self.permits(object, caller, read: true, write: readWrite) else {
                throw RequestError(errno: .permissionDenied,
                                   reason: "mode \(Self.octal(object.mode)) of \(Self.display(request.name)) does not allow \(readWrite ? "read-write" : "read-only") access by uid \(caller.uid)")
            }
            let handle = try openData(object, flags: access)
            if truncate && readWrite {
                do { try handle.truncate(to: 0) } catch {
                    throw RequestError(errno: error, reason: "truncating \(Self.display(request.name)) failed")
                }
            }
            let description = try info(request.name, object, handle)
            return OpenedObject(handle: handle, info: description)
        }
        guard create else {
            throw RequestError(errno: .noSuchFileOrDirectory, reason: "no shared memory object is named \(Self.display(request.name))")
        }
        try checkQuota(of: caller.uid)
        let object = SharedMemoryObject(id: Self.newIdentifier(), uid: caller.uid, gid: caller.gid,
                                        mode: request.mode & ~request.umask & 0o777)
        let data: Descriptor
        do {
            data = try openFile(in: objectsDirectory, object.id, flags: O_RDWR | O_CREAT | O_EXCL, mode: 0o600)
        } catch {
            throw RequestError(errno: error, reason: "cannot create the object's file: \(error.name)")
        }
        do {
            try append(.bind(name: request.name, object: object))
        } catch {
            unlinkat(objectsDirectory.rawValue, object.id, 0)
            throw error
        }
        objects[request.name] = object
        let handle: Descriptor
        if readWrite {
            handle = data
        } else {
            handle = try openData(object, flags: O_RDONLY)
        }
        let description = try info(request.name, object, handle)
        return OpenedObject(handle: handle, info: description)
    }

    /// `shm_unlink`: needs read and write permission.
    func unlink(_ name: [UInt8], by caller: PeerCredentials) throws(RequestError) {
        try Self.validate(name)
        guard let object = objects[name] else {
            throw RequestError(errno: .noSuchFileOrDirectory, reason: "no shared memory object is named \(Self.display(name))")
        }
        guard Self.permits(object, caller, read: true, write: true) else {
            throw RequestError(errno: .permissionDenied,
                               reason: "unlinking needs read and write permission; mode \(Self.octal(object.mode)) of \(Self.display(name)) does not give them to uid \(caller.uid)")
        }
        try append(.unbind(name: name))
        objects[name] = nil
        unlinkat(objectsDirectory.rawValue, object.id, 0)
    }

    /// `shm_rename` with `noReplace` or `exchange` (not both). Atomic: one journal record.
    func rename(from: [UInt8], to: [UInt8], flags: SharedMemoryRenameFlags, by caller: PeerCredentials)
        throws(RequestError)
    {
        let noReplace = flags.contains(.noReplace)
        let exchange = flags.contains(.exchange)
        guard flags.isSubset(of: .known) else {
            throw RequestError(errno: .invalidArgument, reason: "unknown rename flags; only noReplace and exchange exist")
        }
        guard !(noReplace && exchange) else {
            throw RequestError(errno: .invalidArgument, reason: "noReplace and exchange exclude each other")
        }
        try Self.validate(from)
        try Self.validate(to)
        if from == to { return }
        guard let source = objects[from] else {
            throw RequestError(errno: .noSuchFileOrDirectory, reason: "no shared memory object is named \(Self.display(from))")
        }
        let target = objects[to]
        // SEMANTICS §3 order (FreeBSD's too): ENOENT, then EEXIST for noReplace, then EACCES.
        if target != nil && noReplace {
            throw RequestError(errno: .fileExists, reason: "\(Self.display(to)) already exists")
        }
        guard Self.permits(source, caller, read: true, write: true) else {
            throw RequestError(errno: .permissionDenied,
                               reason: "renaming needs read and write permission on \(Self.display(from))")
        }
        if let target {
            guard Self.permits(target, caller, read: true, write: true) else {
                throw RequestError(errno: .permissionDenied,
                                   reason: "replacing needs read and write permission on \(Self.display(to))")
            }
        }
        let swap = exchange && target != nil
        try append(.rename(from: from, to: to, exchange: swap))
        objects[to] = source
        if swap {
            objects[from] = target
        } else {
            objects[from] = nil
            if let target { unlinkat(objectsDirectory.rawValue, target.id, 0) }
        }
    }

    /// What `stat` shows. Needs no permission, like `ls -l` of a directory one can read.
    func stat(_ name: [UInt8]) throws(RequestError) -> SharedMemoryInfo {
        try Self.validate(name)
        guard let object = objects[name] else {
            throw RequestError(errno: .noSuchFileOrDirectory, reason: "no shared memory object is named \(Self.display(name))")
        }
        let handle = try openData(object, flags: O_RDONLY)
        return try info(name, object, handle)
    }

    /// Up to `limit` objects whose names sort after `after`, and whether more follow.
    func list(after: [UInt8], limit: Int) -> ([SharedMemoryInfo], more: Bool) {
        let names = objects.keys.filter { after.isEmpty || $0.lexicographicallyPrecedes(after) == false && $0 != after }
            .sorted { $0.lexicographicallyPrecedes($1) }
        var result: [SharedMemoryInfo] = []
        for name in names.prefix(limit) {
            if let info = try? stat(name) { result.append(info) }
        }
        return (result, names.count > limit)
    }

    /// EDQUOT when `uid` may create no more objects. The byte check stats each of the uid's
    /// objects, in the event loop: at most `maximumObjectsPerUser` of them (about 1 µs each on
    /// tmpfs), and only once the cheaper count check has passed.
    private func checkQuota(of uid: UInt32) throws(RequestError) {
        let owned = objects.values.filter { $0.uid == uid }
        guard owned.count < maximumObjectsPerUser else {
            throw RequestError(errno: .diskQuotaExceeded,
                               reason: "uid \(uid) already owns \(owned.count) named shared memory objects, the limit")
        }
        var bytes = 0
        for object in owned {
            var status = Glibc.stat()
            if fstatat(objectsDirectory.rawValue, object.id, &status, AT_SYMLINK_NOFOLLOW) == 0 {
                bytes += Int(status.st_blocks) * 512
            }
        }
        guard bytes < maximumBytesPerUser else {
            throw RequestError(errno: .diskQuotaExceeded,
                               reason: "uid \(uid)'s named shared memory objects hold \(bytes) bytes, at or past the limit of \(maximumBytesPerUser)")
        }
    }

    /// Named objects per owner uid, for `status`.
    func countByOwner() -> [UInt32: Int] {
        var counts: [UInt32: Int] = [:]
        for object in objects.values { counts[object.uid, default: 0] += 1 }
        return counts
    }

    // MARK: Permission and names

    static func permits(_ object: SharedMemoryObject, _ caller: PeerCredentials, read: Bool, write: Bool) -> Bool {
        let bits: UInt32
        if caller.uid == object.uid {
            bits = object.mode >> 6 & 7
        } else if caller.isMember(of: object.gid) {
            bits = object.mode >> 3 & 7
        } else {
            bits = object.mode & 7
        }
        if read && bits & 4 == 0 { return false }
        if write && bits & 2 == 0 { return false }
        return true
    }

    static func validate(_ name: [UInt8]) throws(RequestError) {
        guard name.count <= maximumNameLength else {
            throw RequestError(errno: .fileNameTooLong,
                               reason: "a shared memory name is at most \(maximumNameLength) bytes; this one has \(name.count)")
        }
        guard name.first == UInt8(ascii: "/") else {
            throw RequestError(errno: .invalidArgument, reason: "a shared memory name starts with \"/\"")
        }
        guard !name.contains(0) else {
            throw RequestError(errno: .invalidArgument, reason: "a shared memory name cannot contain a NUL byte")
        }
        guard String(validating: name, as: UTF8.self) != nil else {
            throw RequestError(errno: .invalidArgument, reason: "a shared memory name must be valid UTF-8")
        }
    }

    static func display(_ name: [UInt8]) -> String {
        let text = String(decoding: name.prefix(80), as: UTF8.self)
        return "\"" + text + (name.count > 80 ? "…" : "") + "\""
    }

    static func octal(_ mode: UInt32) -> String {
        let digits = String(mode, radix: 8)
        return String(repeating: "0", count: max(0, 4 - digits.count)) + digits
    }

    // MARK: Files

    private func openData(_ object: SharedMemoryObject, flags: CInt) throws(RequestError) -> Descriptor {
        do {
            return try openFile(in: objectsDirectory, object.id, flags: flags)
        } catch {
            throw RequestError(errno: error, reason: "cannot open the object's file: \(error.name)")
        }
    }

    private func info(_ name: [UInt8], _ object: SharedMemoryObject, _ handle: borrowing Descriptor)
        throws(RequestError) -> SharedMemoryInfo
    {
        let status: FileStatus
        do {
            status = try handle.status()
        } catch {
            throw RequestError(errno: error, reason: "cannot stat the object's file: \(error.name)")
        }
        return SharedMemoryInfo(
            name: name, size: UInt64(status.size), uid: object.uid, gid: object.gid, mode: object.mode,
            accessTime: status.accessTime, modifyTime: status.modifyTime, changeTime: status.changeTime,
            birthTime: status.birthTime, blocks: UInt64(status.blocks))
    }

    private static func newIdentifier() -> String {
        var bytes = [UInt8](repeating: 0, count: 16)
        bytes.withUnsafeMutableBytes { raw in
            do { try secureRandomBytes(into: raw) } catch { fatalError("getrandom failed: \(error)") }
        }
        return bytes.map { ($0 < 16 ? "0" : "") + String($0, radix: 16) }.joined()
    }

    private static func makePrivateDirectory(_ path: String) throws(RequestError) {
        if mkdir(path, 0o700) == 0 { return }
        let error = Errno.current
        guard error == .fileExists else {
            throw RequestError(errno: error, reason: "cannot create \(path): \(error.name)")
        }
        var info = Glibc.stat()
        guard lstat(path, &info) == 0, info.st_mode & S_IFMT == S_IFDIR else {
            throw RequestError(errno: .notDirectory, reason: "\(path) exists and is not a directory")
        }
        guard info.st_uid == geteuid(), info.st_mode & 0o077 == 0 else {
            throw RequestError(errno: .permissionDenied,
                               reason: "\(path) must be owned by uid \(geteuid()) with mode 0700")
        }
    }

    // MARK: Journal

    enum Record {
        case bind(name: [UInt8], object: SharedMemoryObject)
        case unbind(name: [UInt8])
        case rename(from: [UInt8], to: [UInt8], exchange: Bool)

        func encode() -> [UInt8] {
            var body = WireWriter()
            switch self {
            case .bind(let name, let object):
                body.u8(1)
                body.string(object.id)
                body.u32(object.uid)
                body.u32(object.gid)
                body.u32(object.mode)
                body.bytes(name)
            case .unbind(let name):
                body.u8(2)
                body.bytes(name)
            case .rename(let from, let to, let exchange):
                body.u8(3)
                body.bytes(from)
                body.bytes(to)
                body.u8(exchange ? 1 : 0)
            }
            var framed = WireWriter()
            framed.u32(UInt32(body.bytes.count))
            framed.raw(body.bytes)
            return framed.bytes
        }
    }

    /// Appends one record with one `write`, so a record is either wholly there or (torn by a
    /// crash mid-write, which tmpfs makes unlikely) detected and dropped at replay.
    private func append(_ record: Record) throws(RequestError) {
        let bytes = record.encode()
        let outcome = bytes.withUnsafeBytes { raw in
            Result { () throws(Errno) -> Int in try journal.write(raw) }
        }
        switch outcome {
        case .success(let written) where written == bytes.count:
            break
        case .success:
            throw RequestError(errno: .noSpace, reason: "the store's journal is full")
        case .failure(let error):
            throw RequestError(errno: error, reason: "cannot record the change in the store's journal: \(error.name)")
        }
        journalRecords += 1
        if journalRecords > 4 * objects.count + 4096 {
            do { try compact() } catch {
                logger.warning("journal compaction failed", metadata: ["errno": "\(error.name)"])
            }
        }
    }

    private func replay() throws(Errno) {
        _ = lseek(journal.rawValue, 0, SEEK_SET)
        let bytes = try journal.readToEnd()
        var reader = WireReader(bytes[...])
        var records = 0
        while reader.remaining > 0 {
            guard let length = try? reader.u32("length"), let body = try? reader.raw("record", count: Int(length)) else {
                logger.warning("dropping a torn record at the end of the journal")
                break
            }
            var fields = WireReader(body)
            do {
                switch try fields.u8("type") {
                case 1:
                    let id = try fields.string("id")
                    let object = SharedMemoryObject(id: id, uid: try fields.u32("uid"), gid: try fields.u32("gid"),
                                                    mode: try fields.u32("mode"))
                    objects[try fields.bytes("name")] = object
                case 2:
                    objects[try fields.bytes("name")] = nil
                case 3:
                    let from = try fields.bytes("from")
                    let to = try fields.bytes("to")
                    let exchange = try fields.u8("exchange") == 1
                    let source = objects[from]
                    let target = objects[to]
                    objects[to] = source
                    objects[from] = exchange ? target : nil
                default:
                    logger.warning("skipping a journal record of unknown type")
                }
            } catch {
                logger.warning("skipping a malformed journal record", metadata: ["reason": "\(error.reason)"])
            }
            records += 1
        }
        // Names whose file is gone (a crash between journal and file system) are dropped.
        for (name, object) in objects {
            var info = Glibc.stat()
            if fstatat(objectsDirectory.rawValue, object.id, &info, AT_SYMLINK_NOFOLLOW) != 0 {
                logger.warning("dropping a name whose file is missing", metadata: ["name": "\(Self.display(name))"])
                objects[name] = nil
            }
        }
        journalRecords = records
    }

    /// Deletes object files that no name refers to (their unlink was journaled, then the broker
    /// died before removing the file; or a creation died before its journal record).
    private func removeOrphans() throws(Errno) {
        let referenced = Set(objects.values.map(\.id))
        let listing = try duplicateDescriptor(objectsDirectory.rawValue)
        guard let directory = fdopendir(listing.release()) else { throw Errno.current }
        defer { closedir(directory) }
        rewinddir(directory)
        var orphans: [String] = []
        while let entry = readdir(directory) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
            }
            if name == "." || name == ".." { continue }
            if !referenced.contains(name) { orphans.append(name) }
        }
        for orphan in orphans {
            unlinkat(objectsDirectory.rawValue, orphan, 0)
            logger.notice("removed an object file no name refers to", metadata: ["file": "\(orphan)"])
        }
    }

    /// Rewrites the journal as one bind record per live name, atomically (write aside, rename).
    private func compact() throws(Errno) {
        var bytes: [UInt8] = []
        for (name, object) in objects.sorted(by: { $0.key.lexicographicallyPrecedes($1.key) }) {
            bytes += Record.bind(name: name, object: object).encode()
        }
        let temporary = path + "/journal.new"
        Glibc.unlink(temporary)
        let replacement = try openFile(temporary, flags: O_RDWR | O_CREAT | O_EXCL | O_APPEND | O_NOFOLLOW, mode: 0o600)
        try replacement.writeAll(bytes)
        _ = try syscallRetrying { Glibc.rename(temporary, path + "/journal") }
        journal = replacement
        journalRecords = objects.count
    }
}
