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
// Durability. The namespace is a journal beside the objects: one appended record per change
// (bind a name to a new object, unbind a name, rename/exchange). A record is written before the
// file system is touched for a removal and after it for a creation, so a broker killed at any
// instant restarts into a consistent namespace: names whose file is gone are dropped, files no
// name refers to are deleted, and the journal is compacted. Contents, sizes and times live in the
// files themselves; owners and modes live in the journal. Only a reboot (tmpfs) clears it all.
// Where the broker may mount, the journal (and the CAPS registry's id and generation files) are
// on a small tmpfs of the store's own (`state/`), kept across restarts as the uids' are: on the
// store's own file system (`/dev/shm`, which any user may fill) a full file system would make
// every change fail.
//
// Permissions. The owner is the creator's effective uid and gid as the kernel reports them; the
// mode is `mode & ~umask & 0777`; the creator is not checked. Decision (Linux's
// `protected_regular`): a create-open without exclusive of an existing object owned by another
// uid that is not root, or put under its name by one (a rename), is EACCES, so nobody can plant
// an object under a name another user is about to create, not even that user's own world-writable
// one, and have that user's data written into it. Opening checks the mode bits (read
// for read-only; read and write for read-write) against the caller: owner bits for the owner,
// group bits for a member of the group, other bits for everyone else. Decision: root gets no
// bypass, as in CAPS, so an object's mode means the same for every caller.
//
// Quotas. Creating an object is refused with EDQUOT when the creator's uid already owns
// `maximumObjectsPerUser` named objects, or when the pages its named objects hold reach
// `maximumBytesPerUser`. Where the broker may mount (the system broker, as root), each uid's
// objects live on a tmpfs of their own (`uids/<uid>/`, sized to the byte quota), so the kernel
// enforces the quota on every route, ftruncate and stores through a client's own descriptor
// included, and a uid that fills its tmpfs makes only its own writes fail. Elsewhere (the
// per-user broker, one uid) objects share `objects/`, the byte check is made at create against
// an estimate refreshed a bounded number of objects at a time, and growth through a descriptor
// the client already holds is bounded only by the file system's own size.
//
// Errors (SEMANTICS.md §3), in FreeBSD's order: EINVAL (write-only access, unknown flags, bad
// rename flags), then the name's: ENAMETOOLONG, then EINVAL (no leading slash, NUL or non-UTF-8
// bytes); ENOENT, EEXIST (before any permission check), EACCES.

import Glibc
import Logging
import PatchbayProtocol
import PatchbaySystem
import SystemPackage

/// One named object: the file that holds it and who may do what with it.
struct SharedMemoryObject {
    /// The file's name: 32 hex digits.
    var id: String
    var uid: UInt32
    var gid: UInt32
    var mode: UInt32
    /// Who put the object under its name: its creator, or the uid that renamed it there.
    var boundBy: UInt32
    /// Whether the file is in its owner's own tmpfs (`uids/<uid>/`) or in `objects/`. Not
    /// journaled: found again at start by looking.
    var inOwnerStore = false

    init(id: String, uid: UInt32, gid: UInt32, mode: UInt32, boundBy: UInt32? = nil) {
        self.id = id
        self.uid = uid
        self.gid = gid
        self.mode = mode
        self.boundBy = boundBy ?? uid
    }
}

/// An open directory the store keeps.
final class StoreDirectory {
    let descriptor: Descriptor
    init(_ descriptor: consuming Descriptor) { self.descriptor = descriptor }
}

/// A handle just opened, with what the client is told about it.
struct OpenedObject: ~Copyable {
    var handle: Descriptor
    var info: SharedMemoryInfo
}

final class SharedMemoryStore {
    static let maximumNameLength = 1023

    let path: String
    /// Where the journal and the CAPS registry's files live: `state/`, a tmpfs of the store's
    /// own, where the broker may mount; else `path`.
    let statePath: String
    /// The state tmpfs's root the service manager kept, when it is mounted nowhere here (the
    /// mount went with an earlier broker's namespace): `statePath` is `/proc/self/fd/<it>`.
    private var keptStateDirectory: StoreDirectory?
    private let lock: FileLock
    private let objectsDirectory: StoreDirectory
    /// Each uid's own tmpfs, once it has one.
    private var ownerDirectories: [UInt32: StoreDirectory] = [:]
    /// Whether uids get a tmpfs of their own (false once mounting proved impossible).
    private var perOwnerStores: Bool
    /// uids' tmpfs roots the service manager kept from an earlier broker, not taken yet.
    private var keptOwnerRoots: [UInt32: StoreDirectory] = [:]
    /// Whether each uid's tmpfs root goes to the service manager's descriptor store, so that it
    /// outlives the mount namespace it was mounted in (a unit's private one, gone at a restart).
    private let keepRootsWithServiceManager: Bool
    private var journal: Descriptor
    private var journalRecords = 0
    /// Name reservations (`shm` rules): who may create a reserved name.
    var policy = Policy.none
    /// The journal's length up to its last whole record, as `replay` found it.
    private var journalIntactLength = 0
    private(set) var objects = ObjectNames()
    /// Where the bounded refresh of byte estimates resumes (an index into the sorted names).
    private var refreshCursor = 0
    private var logger: Logger
    var maximumObjectsPerUser = 4096
    var maximumBytesPerUser = 8 << 30

    /// Objects whose byte estimate one create refreshes, where the kernel does not count per uid.
    static let refreshesPerCreate = 64

    /// Bumped on every change of what a name refers to; clients map it read-only (opcode 45) to
    /// know when an object they opened by a name may no longer be that name's.
    let changes: ChangeCounter
    /// Named objects created since the broker started (`patchbay_shm_objects_created_total`).
    private(set) var objectsCreated: UInt64 = 0

    /// Opens (or creates) the store at `path`, replays its journal and removes what a crash left.
    /// With `perOwnerStores`, each uid's objects go to a tmpfs of its own (needs `CAP_SYS_ADMIN`;
    /// without it the store says so and keeps every object in `objects/`).
    ///
    /// A uid's tmpfs is found again at `uids/<uid>` if it is still mounted there, else in
    /// `keptOwnerRoots` (its root directory, which the service manager kept: the mount went with
    /// the last broker's mount namespace, the file system did not). With
    /// `keepRootsWithServiceManager`, each root in use is given to the service manager
    /// (`FDSTORE=1`, `pbshm-uid-<uid>`) and taken back when its tmpfs is let go.
    ///
    /// With `perOwnerStores` too, the journal goes to `state/`, a tmpfs of its own, found again
    /// as the uids' are (`keptStateRoot`, `pbshm-state`); a journal an earlier broker left in
    /// `path` is moved there.
    init(path: String, perOwnerStores: Bool = false, keptOwnerRoots: [UInt32: CInt] = [:], keptStateRoot: CInt? = nil,
         keepRootsWithServiceManager: Bool = false, logger: Logger) throws(BrokerStartError) {
        for (uid, fd) in keptOwnerRoots { self.keptOwnerRoots[uid] = StoreDirectory(Descriptor(adopting: fd)) }
        self.keepRootsWithServiceManager = keepRootsWithServiceManager
        do {
            changes = try ChangeCounter()
        } catch {
            throw BrokerStartError(errno: error, reason: "cannot create the namespace's change counter: \(error.name)")
        }
        self.path = path
        self.logger = logger
        self.perOwnerStores = perOwnerStores
        do {
            try Self.placeStore(path, logger: logger)
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
        if perOwnerStores {
            (statePath, keptStateDirectory) = Self.stateFileSystem(of: path, kept: keptStateRoot,
                                                                   keepWithServiceManager: keepRootsWithServiceManager, logger: logger)
        } else {
            if let keptStateRoot { close(keptStateRoot) }
            statePath = path
        }
        do {
            objectsDirectory = StoreDirectory(try openFile(path + "/objects", flags: O_RDONLY | O_DIRECTORY | O_NOFOLLOW))
            journal = try openFile(statePath + "/journal", flags: O_RDWR | O_CREAT | O_APPEND | O_NOFOLLOW, mode: 0o600)
        } catch {
            throw BrokerStartError(errno: error, reason: "cannot open the shared memory store \(path): \(error.name)")
        }
        do {
            try replay()
            try removeOrphans()
        } catch {
            throw BrokerStartError(errno: error, reason: "cannot recover the shared memory store \(path): \(error.name)")
        }
        // The journal's file system may be full: `/dev/shm`, which any user can fill (tenth
        // attack round). That must not keep the broker from starting: the journal replayed is
        // kept, cut back to its last whole record so that later appends follow it.
        do {
            try compact()
        } catch {
            logger.warning("journal compaction failed; the journal is kept as it is", metadata: ["errno": "\(error.name)"])
            if (try? journal.size()) != journalIntactLength {
                do { try journal.truncate(to: journalIntactLength) } catch {
                    throw BrokerStartError(errno: error, reason: "cannot cut the torn end off the shared memory store's journal \(statePath)/journal: \(error.name)")
                }
            }
        }
        // Kept roots that no name needs (their uid's tmpfs is mounted after all, or holds nothing
        // named): the service manager lets its copy go, unless it now keeps the mounted one
        // under the same name.
        for uid in self.keptOwnerRoots.keys where ownerDirectories[uid] == nil && keepRootsWithServiceManager {
            ServiceManager.notify("FDSTOREREMOVE=1\nFDNAME=\(BrokerListener.ownerRootPrefix)\(uid)")
        }
        self.keptOwnerRoots = [:]
        logger.info("shared memory store ready", metadata: ["store": "\(path)", "objects": "\(objects.count)"])
    }

    // MARK: Operations

    /// `shm_open`. Returns a handle with the requested access and the object's description.
    func open(_ request: SharedMemoryOpenRequest, by caller: PeerCredentials) throws(RequestError)
        -> OpenedObject
    {
        // FreeBSD's order: the access mode and the flags, then the name.
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
        try Self.validate(request.name)
        let create = request.flags.contains(.create)
        let exclusive = request.flags.contains(.exclusive)
        let truncate = request.flags.contains(.truncate)
        let access = readWrite ? O_RDWR : O_RDONLY

        if let object = objects[request.name] {
            if create && exclusive {
                throw RequestError(errno: .fileExists, reason: "\(Self.display(request.name)) already exists")
            }
            if create && object.uid != caller.uid && object.uid != 0 {
                throw RequestError(errno: .permissionDenied,
                                   reason: "\(Self.display(request.name)) already exists and belongs to uid \(object.uid); creating opens only your own or root's objects (use exclusive to make sure the object is new)")
            }
            if create && object.boundBy != caller.uid && object.boundBy != 0 {
                throw RequestError(errno: .permissionDenied,
                                   reason: "\(Self.display(request.name)) already exists, put under that name by uid \(object.boundBy) (a rename); creating opens only objects you or root named (use exclusive to make sure the object is new)")
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
        try checkReservation(request.name, by: caller)
        try checkQuota(of: caller.uid)
        var object = SharedMemoryObject(id: Self.newIdentifier(), uid: caller.uid, gid: caller.gid,
                                        mode: request.mode & ~request.umask & 0o777)
        object.inOwnerStore = try ownerStore(of: caller.uid) != nil
        let data: Descriptor
        do {
            data = try openFile(in: directory(of: object).descriptor, object.id, flags: O_RDWR | O_CREAT | O_EXCL, mode: 0o600)
        } catch {
            throw RequestError(errno: error == .noSpace ? .diskQuotaExceeded : error,
                               reason: "cannot create the object's file: \(error.name)")
        }
        // The file carries the object's owner and mode, so fstat on any descriptor of it reports
        // them (FreeBSD's shm fstat does). The broker's table stays the authority for access. A
        // broker that is not root keeps read and write for itself (it is the owner anyway).
        let fileMode = geteuid() == 0 ? object.mode : object.mode | 0o600
        try? data.setOwnerAndMode(uid: object.uid, gid: object.gid, mode: fileMode)
        do {
            try append(.bind(name: request.name, object: object))
        } catch {
            removeFile(of: object)
            throw error
        }
        objects[request.name] = object
        objectsCreated &+= 1
        compactIfMostlyDead()
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
        removeFile(of: object)
        compactIfMostlyDead()
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
        // The names the rename binds (both, for an exchange) must not be reserved for others.
        try checkReservation(to, by: caller)
        if swap { try checkReservation(from, by: caller) }
        try append(.rename(from: from, to: to, exchange: swap, by: caller.uid))
        var moved = source
        moved.boundBy = caller.uid
        objects[to] = moved
        if swap, var other = target {
            other.boundBy = caller.uid
            objects[from] = other
        } else {
            objects[from] = nil
            if let target { removeFile(of: target) }
        }
        compactIfMostlyDead()
    }

    /// What `stat` shows. Needs no permission, like `ls -l` of a directory one can read.
    func stat(_ name: [UInt8]) throws(RequestError) -> SharedMemoryInfo {
        try Self.validate(name)
        guard let object = objects[name] else {
            throw RequestError(errno: .noSuchFileOrDirectory, reason: "no shared memory object is named \(Self.display(name))")
        }
        // Found, not opened: an open of a file its owner holds a lease on would wait for the
        // lease (45 s by default), and `stat` needs no permission at all.
        let status: FileStatus
        do {
            status = try fileStatus(in: directory(of: object).descriptor, object.id)
        } catch {
            throw RequestError(errno: error, reason: "cannot stat the object's file: \(error.name)")
        }
        return Self.info(name, object, status)
    }

    /// Up to `limit` objects whose names sort after `after`, and whether more follow: a binary
    /// search and `limit` stats, however many objects there are.
    func list(after: [UInt8], limit: Int) -> ([SharedMemoryInfo], more: Bool) {
        let (names, more) = objects.page(after: after, limit: limit)
        var result: [SharedMemoryInfo] = []
        for name in names {
            if let info = try? stat(name) { result.append(info) }
        }
        return (result, more)
    }

    /// EDQUOT when `uid` may create no more objects. Constant work for the count; for the bytes,
    /// one `fstatvfs` of the uid's own tmpfs, or else a bounded refresh of the estimate.
    private func checkQuota(of uid: UInt32) throws(RequestError) {
        let owned = objects.objectsByOwner[uid] ?? 0
        guard owned < maximumObjectsPerUser else {
            throw RequestError(errno: .diskQuotaExceeded,
                               reason: "uid \(uid) already owns \(owned) named shared memory objects, the limit")
        }
        let bytes: Int
        if let store = try ownerStore(of: uid) {
            bytes = (try? store.descriptor.fileSystemUsage().usedBytes) ?? 0
        } else {
            refreshByteEstimates(count: Self.refreshesPerCreate)
            bytes = objects.bytesByOwner[uid] ?? 0
        }
        guard bytes < maximumBytesPerUser else {
            throw RequestError(errno: .diskQuotaExceeded,
                               reason: "uid \(uid)'s named shared memory objects hold \(bytes) bytes, at or past the limit of \(maximumBytesPerUser)")
        }
    }

    /// Looks at the next `count` objects' files (in name order, wrapping) and records what they hold.
    private func refreshByteEstimates(count: Int) {
        let names = objects.sortedNames
        guard !names.isEmpty else { return }
        for _ in 0..<min(count, names.count) {
            if refreshCursor >= names.count { refreshCursor = 0 }
            let name = names[refreshCursor]
            refreshCursor += 1
            if let object = objects[name] { noteBytes(of: object) }
        }
    }

    private func noteBytes(of object: SharedMemoryObject) {
        var status = Glibc.stat()
        if fstatat(directory(of: object).descriptor.rawValue, object.id, &status, AT_SYMLINK_NOFOLLOW) == 0 {
            objects.noteBytes(Int(status.st_blocks) * 512, of: object)
        }
    }

    /// Named objects per owner uid, for `status`.
    func countByOwner() -> [UInt32: Int] {
        objects.objectsByOwner
    }

    // MARK: Per-owner stores

    /// The directory holding `object`'s file.
    private func directory(of object: SharedMemoryObject) -> StoreDirectory {
        object.inOwnerStore ? (ownerDirectories[object.uid] ?? objectsDirectory) : objectsDirectory
    }

    private func removeFile(of object: SharedMemoryObject) {
        unlinkat(directory(of: object).descriptor.rawValue, object.id, 0)
    }

    /// `uid`'s own tmpfs, mounted on first use; nil where stores are shared. Per-uid stores are
    /// given up for good only when mounting is impossible here (no privilege, no tmpfs); a
    /// passing shortage (out of descriptors or memory) fails this one request and changes
    /// nothing, or a client that ran the broker short once would switch the byte limit off.
    private func ownerStore(of uid: UInt32) throws(RequestError) -> StoreDirectory? {
        guard perOwnerStores else { return nil }
        if let store = ownerDirectories[uid] { return store }
        let directory = path + "/uids/\(uid)"
        do throws(RequestError) {
            try Self.makePrivateDirectory(path + "/uids")
            try Self.makePrivateDirectory(directory)
            if !isMountPoint(directory) {
                do {
                    // Page-rounded by the kernel; a few inodes beyond the object quota for the root.
                    try mountMemoryFileSystem(at: directory, bytes: maximumBytesPerUser, files: maximumObjectsPerUser + 16)
                } catch {
                    throw RequestError(errno: error, reason: "cannot mount a tmpfs at \(directory): \(error.name)")
                }
            }
            let store = StoreDirectory(try Self.openDirectory(directory))
            ownerDirectories[uid] = store
            keepWithServiceManager(store, of: uid)
            return store
        } catch {
            let passing: [Errno] = [.tooManyOpenFiles, .tooManyOpenFilesInSystem, .noMemory, .resourceTemporarilyUnavailable,
                                    .interrupted, .noSpace, .resourceBusy]
            if passing.contains(error.errno) {
                throw RequestError(errno: error.errno, reason: "cannot open uid \(uid)'s store now: \(error.reason)")
            }
            perOwnerStores = false
            logger.warning("per-uid stores are not available; every uid's objects share one file system, and the byte quota is checked at create only",
                           metadata: ["reason": "\(error.reason)"])
            return nil
        }
    }

    /// A new, unnamed file (`O_TMPFILE`, mode 0444) in `uid`'s own tmpfs, for memory the broker
    /// builds on `uid`'s behalf and hands over (an `addrs` snapshot): its pages count against
    /// `uid`'s byte quota and its inode against its object quota, enforced by the kernel, for as
    /// long as anyone holds it. Nil where uids have no tmpfs of their own.
    func scratchFile(for uid: UInt32) throws(RequestError) -> Descriptor? {
        guard let store = try ownerStore(of: uid) else { return nil }
        do {
            return try openUnnamedFile(in: store.descriptor.rawValue, mode: 0o444)
        } catch {
            throw RequestError(errno: error == .noSpace ? .diskQuotaExceeded : error,
                               reason: "no room for a file in uid \(uid)'s shared memory store: \(error.name)")
        }
    }

    /// Gives `uid`'s tmpfs root to the service manager to keep (`keepRootsWithServiceManager`): a
    /// later broker, in a mount namespace of its own, finds the file system through it.
    private func keepWithServiceManager(_ store: StoreDirectory, of uid: UInt32) {
        guard keepRootsWithServiceManager else { return }
        ServiceManager.notify("FDSTORE=1\nFDNAME=\(BrokerListener.ownerRootPrefix)\(uid)", descriptors: [store.descriptor.rawValue])
    }

    // MARK: The state's file system

    /// Bytes and files of the state's tmpfs. The journal holds one record per live name (at most
    /// about 1.1 KiB) and up to four dead ones per live name plus 4,096 before it is compacted,
    /// so this is room for about 180,000 names; pages are used only as the files grow.
    static let stateBytes = 1 << 30
    static let stateFiles = 64
    /// The files an earlier broker left in the store's directory that move to the state's. (The
    /// CAPS registry's stay there as copies, which it reads when the state has none: see
    /// `CapsRegistry.mirrorDirectory`.)
    static let stateFileNames = ["journal"]

    /// Where the state lives: `path/state` with a tmpfs of its own mounted there, or `path` if
    /// none can be had (the broker says why; its files then share the store's file system). A
    /// tmpfs still mounted there is used; else the one the service manager kept (`kept`), through
    /// its descriptor, which is then returned to be held (a mount cannot be made again from a
    /// file system whose mount namespace is gone); else a new one, given to the service manager
    /// to keep. Files an earlier broker left in `path` are moved in; if they cannot be, they stay
    /// where they are, and so does the state.
    private static func stateFileSystem(of path: String, kept: CInt?, keepWithServiceManager: Bool,
                                        logger: Logger) -> (path: String, held: StoreDirectory?) {
        var directory = path + "/state"
        var held: StoreDirectory?
        do throws(RequestError) {
            try makePrivateDirectory(directory)
            if isMountPoint(directory) {
                // Mounted in this namespace: an earlier broker's, which the manager keeps already.
                if let kept { close(kept) } else { keepStateRoot(directory, keepWithServiceManager) }
            } else if let kept {
                held = StoreDirectory(Descriptor(adopting: kept))
                directory = "/proc/self/fd/\(kept)"
            } else {
                do {
                    try mountMemoryFileSystem(at: directory, bytes: stateBytes, files: stateFiles)
                } catch {
                    throw RequestError(errno: error, reason: "cannot mount a tmpfs at \(directory): \(error.name)")
                }
                keepStateRoot(directory, keepWithServiceManager)
            }
        } catch {
            logger.warning("the store's journal and CAPS files stay on the store's own file system, where a full one makes changes fail",
                           metadata: ["reason": "\(error.reason)"])
            if let kept { close(kept) }
            return (path, nil)
        }
        for name in stateFileNames {
            do throws(Errno) {
                try moveFile(name, from: path, to: directory)
            } catch {
                logger.error("cannot move the store's \(name) to its own file system; the store's files stay where they are",
                             metadata: ["errno": "\(error.name)"])
                return (path, nil)
            }
        }
        Glibc.unlink(path + "/journal.new")
        return (directory, held)
    }

    private static func keepStateRoot(_ directory: String, _ keep: Bool) {
        guard keep, let root = try? openDirectory(directory) else { return }
        ServiceManager.notify("FDSTORE=1\nFDNAME=\(BrokerListener.stateRootName)", descriptors: [root.rawValue])
    }

    /// Moves the file `name` from the directory `from` to `to` (another file system): copied to
    /// a new file, renamed into place, then removed from `from`. A copy already in `to` (a
    /// move cut short after its rename) is kept, being the same.
    private static func moveFile(_ name: String, from: String, to: String) throws(Errno) {
        let source: Descriptor
        do {
            source = try openFile(from + "/" + name, flags: O_RDONLY | O_NOFOLLOW)
        } catch .noSuchFileOrDirectory {
            return
        }
        var info = Glibc.stat()
        if lstat(to + "/" + name, &info) != 0 {
            let bytes = try source.readToEnd()
            let temporary = to + "/" + name + ".new"
            Glibc.unlink(temporary)
            let copy = try openFile(temporary, flags: O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW, mode: 0o600)
            do throws(Errno) {
                try copy.writeAll(bytes)
                _ = try syscallRetrying { Glibc.rename(temporary, to + "/" + name) }
            } catch {
                Glibc.unlink(temporary)
                throw error
            }
        }
        _ = try syscallRetrying { Glibc.unlink(from + "/" + name) }
    }

    private static func isEmptyDirectory(_ path: String) -> Bool {
        guard let listing = opendir(path) else { return false }
        defer { closedir(listing) }
        while let entry = readdir(listing) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in Array(raw.prefix { $0 != 0 }) }
            if name != [0x2E] && name != [0x2E, 0x2E] { return false }
        }
        return true
    }

    private static func openDirectory(_ path: String) throws(RequestError) -> Descriptor {
        do {
            return try openFile(path, flags: O_RDONLY | O_DIRECTORY | O_NOFOLLOW)
        } catch {
            throw RequestError(errno: error, reason: "cannot open \(path): \(error.name)")
        }
    }

    /// At a clean stop: a store that holds no object is removed (journal, lock, directories),
    /// so brokers on passing sockets leave nothing behind. One that holds objects stays, for the
    /// next broker on the same socket.
    func removeIfEmpty() {
        guard objects.count == 0, ownerDirectories.isEmpty else { return }
        try? PatchbaySystem.removeFile(atPath: statePath + "/journal")
        // The state's tmpfs goes when it holds nothing more (the CAPS registry's files keep it,
        // and with it the store: names' generations are kept across restarts).
        if statePath != path, Self.isEmptyDirectory(statePath) {
            if keepRootsWithServiceManager { ServiceManager.notify("FDSTOREREMOVE=1\nFDNAME=\(BrokerListener.stateRootName)") }
            if keptStateDirectory != nil {
                keptStateDirectory = nil
                _ = rmdir(path + "/state")
            } else if (try? unmount(at: statePath)) != nil {
                _ = rmdir(statePath)
            }
        }
        _ = rmdir(path + "/objects")
        _ = rmdir(path + "/uids")
        try? PatchbaySystem.removeFile(atPath: path + "/lock")
        if rmdir(path) == 0 {
            logger.info("removed the empty shared memory store", metadata: ["path": "\(path)"])
        }
    }

    /// Unmounts the per-uid stores that hold no object (at a clean stop: nothing is lost).
    func releaseEmptyOwnerStores() {
        for uid in Array(ownerDirectories.keys) where (objects.objectsByOwner[uid] ?? 0) == 0 {
            ownerDirectories[uid] = nil
            if keepRootsWithServiceManager {
                ServiceManager.notify("FDSTOREREMOVE=1\nFDNAME=\(BrokerListener.ownerRootPrefix)\(uid)")
            }
            // The mount point goes too (empty once unmounted), or the store could never be
            // removed as empty: `uids` would still hold it.
            if (try? unmount(at: path + "/uids/\(uid)")) != nil { _ = rmdir(path + "/uids/\(uid)") }
        }
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

    /// EACCES when the broker's policy reserves `name` for owners other than `caller`: only they
    /// may put an object under it (create it, or rename onto it).
    private func checkReservation(_ name: [UInt8], by caller: PeerCredentials) throws(RequestError) {
        try policy.checkTake(.shm, Substring(String(decoding: name, as: UTF8.self)), by: caller)
    }

    static func octal(_ mode: UInt32) -> String {
        let digits = String(mode, radix: 8)
        return String(repeating: "0", count: max(0, 4 - digits.count)) + digits
    }

    // MARK: Files

    /// Opens the object's file without ever waiting (tenth attack round): the file is its owner's,
    /// who may hold a lease on it (`F_SETLEASE`), and a blocking open that conflicts with a lease
    /// waits until the owner lets go or the kernel breaks it (`lease-break-time`, 45 s), with the
    /// broker's one thread. Non-blocking, the open starts the break and fails at once: `EAGAIN`.
    /// The descriptor the client gets is blocking again, as any other.
    private func openData(_ object: SharedMemoryObject, flags: CInt) throws(RequestError) -> Descriptor {
        let handle: Descriptor
        do {
            handle = try openFile(in: directory(of: object).descriptor, object.id, flags: flags | O_NONBLOCK)
        } catch {
            if error == .wouldBlock {
                throw RequestError(errno: .resourceTemporarilyUnavailable,
                                   reason: "the object's owner holds a lease on its file (F_SETLEASE); the kernel breaks it within /proc/sys/fs/lease-break-time seconds unless the owner lets go sooner: try again then")
            }
            throw RequestError(errno: error, reason: "cannot open the object's file: \(error.name)")
        }
        guard fcntl(handle.rawValue, F_SETFL, 0) == 0 else {  // no status flag: O_NONBLOCK off
            let error = Errno.current
            throw RequestError(errno: error, reason: "cannot make the object's descriptor blocking: \(error.name)")
        }
        return handle
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
        return Self.info(name, object, status)
    }

    private static func info(_ name: [UInt8], _ object: SharedMemoryObject, _ status: FileStatus) -> SharedMemoryInfo {
        SharedMemoryInfo(
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

    /// A store's name in a directory anyone may write (the default `/dev/shm/patchbay-system`) can
    /// be taken by another user first, which kept the broker from starting (seventh attack round).
    /// Run as root there, the broker makes its store whole under a name nobody can guess
    /// (`mkdtemp`) and puts it in place in one step: at the free name (`RENAME_NOREPLACE`), or in
    /// exchange for another user's entry (`RENAME_EXCHANGE`), which it then moves aside, to
    /// `<path>.moved-aside-<uid>-<random>`, still its maker's, and says so. Moving the entry aside
    /// first and then making the directory let a user who made the name again in between win every
    /// start (tenth attack round). (A broker not run as root cannot move another user's entry in
    /// a sticky directory: `makePrivateDirectory` then refuses to start.)
    private static func placeStore(_ path: String, logger: Logger) throws(RequestError) {
        guard geteuid() == 0, let slash = path.lastIndex(of: "/") else { return }
        var parent = Glibc.stat()
        let parentPath = slash == path.startIndex ? "/" : String(path[..<slash])
        guard lstat(parentPath + "/.", &parent) == 0, parent.st_mode & 0o002 != 0 else { return }
        // A few rounds: each lost one means another user changed the entry between two calls.
        for _ in 0..<16 {
            var info = Glibc.stat()
            if lstat(path, &info) == 0 && info.st_uid == geteuid() { return }  // root's: checked by the caller
            var template = Array((path + ".new-XXXXXX").utf8CString)
            guard let made = template.withUnsafeMutableBufferPointer({ mkdtemp($0.baseAddress!) }) else {
                let error = Errno.current
                throw RequestError(errno: error, reason: "cannot create a directory beside \(path): \(error.name)")
            }
            let fresh = String(cString: made)
            do throws(Errno) {
                try renameWithoutReplacing(fresh, path)
                return
            } catch where error == .fileExists {
                // Taken since: swap ours in, if it is still another's, and move theirs aside.
                if lstat(path, &info) == 0, info.st_uid != geteuid(), (try? renameExchanging(fresh, path)) != nil {
                    let aside = path + ".moved-aside-\(info.st_uid)-" + newIdentifier().prefix(8)
                    let moved = Glibc.rename(fresh, aside) == 0
                    logger.warning("another user's entry was at the shared memory store's path: moved aside", metadata: [
                        "path": "\(path)", "uid": "\(info.st_uid)", "moved_to": "\(moved ? aside : fresh)",
                    ])
                    return
                }
                rmdir(fresh)
            } catch {
                rmdir(fresh)
                throw RequestError(errno: error, reason: "cannot put the shared memory store in place at \(path): \(error.name)")
            }
        }
        throw RequestError(errno: .resourceBusy, reason: "\(path) kept changing under another user's hands; the shared memory store could not be put there")
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

    /// Journal records. Types 1 and 3 (a bind and a rename without the uid that made them) are
    /// still read, from journals older brokers wrote: their names count as bound by the owner.
    enum Record {
        case bind(name: [UInt8], object: SharedMemoryObject)
        case unbind(name: [UInt8])
        case rename(from: [UInt8], to: [UInt8], exchange: Bool, by: UInt32)

        func encode() -> [UInt8] {
            var body = WireWriter()
            switch self {
            case .bind(let name, let object):
                body.u8(4)
                body.string(object.id)
                body.u32(object.uid)
                body.u32(object.gid)
                body.u32(object.mode)
                body.bytes(name)
                body.u32(object.boundBy)
            case .unbind(let name):
                body.u8(2)
                body.bytes(name)
            case .rename(let from, let to, let exchange, let renamer):
                body.u8(5)
                body.bytes(from)
                body.bytes(to)
                body.u8(exchange ? 1 : 0)
                body.u32(renamer)
            }
            var framed = WireWriter()
            framed.u32(UInt32(body.bytes.count))
            framed.raw(body.bytes)
            return framed.bytes
        }
    }

    /// Appends one record with one `write`, so a record is either wholly there or (torn by a
    /// crash mid-write, which tmpfs makes unlikely) detected and dropped at replay. A write that
    /// fails or is cut short (the file system full) is undone: the journal is cut back to where
    /// it ended, so no part of a record stays in it for later ones to follow (replay stops at
    /// the first record it cannot read, and everything after it would be lost).
    private func append(_ record: Record) throws(RequestError) {
        let bytes = record.encode()
        let end = try? journal.size()
        let outcome = bytes.withUnsafeBytes { raw in
            Result { () throws(Errno) -> Int in try journal.write(raw) }
        }
        func undo() {
            guard let end else { return }
            if (try? journal.truncate(to: end)) == nil {
                logger.error("cannot cut a failed journal record back; the names recorded after it would not survive a restart")
            }
        }
        switch outcome {
        case .success(let written) where written == bytes.count:
            break
        case .success:
            undo()
            throw RequestError(errno: .noSpace, reason: "the store's journal is full")
        case .failure(let error):
            undo()
            throw RequestError(errno: error, reason: "cannot record the change in the store's journal: \(error.name)")
        }
        journalRecords += 1
        changes.bump()
    }

    /// Rewrites the journal when dead records outnumber live names four to one. Called after a
    /// change is applied to `objects`, never between its record and its application: compaction
    /// writes `objects`, so a change not applied yet would be lost from the journal.
    private func compactIfMostlyDead() {
        guard journalRecords > 4 * objects.count + 4096 else { return }
        do { try compact() } catch {
            logger.warning("journal compaction failed", metadata: ["errno": "\(error.name)"])
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
            journalIntactLength = bytes.count - reader.remaining
            var fields = WireReader(body)
            do {
                switch try fields.u8("type") {
                case let type where type == 1 || type == 4:
                    let id = try fields.string("id")
                    var object = SharedMemoryObject(id: id, uid: try fields.u32("uid"), gid: try fields.u32("gid"),
                                                    mode: try fields.u32("mode"))
                    let name = try fields.bytes("name")
                    if type == 4 { object.boundBy = try fields.u32("bound by") }
                    objects[name] = object
                case 2:
                    objects[try fields.bytes("name")] = nil
                case let type where type == 3 || type == 5:
                    let from = try fields.bytes("from")
                    let to = try fields.bytes("to")
                    let exchange = try fields.u8("exchange") == 1
                    var source = objects[from]
                    var target = objects[to]
                    if type == 5 {
                        let renamer = try fields.u32("renamer")
                        source?.boundBy = renamer
                        target?.boundBy = renamer
                    }
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
        // Each file is in its owner's tmpfs or in objects/; names whose file is gone (a crash
        // between journal and file system) are dropped.
        for (name, var object) in objects {
            var info = Glibc.stat()
            if let store = existingOwnerStore(of: object.uid),
               fstatat(store.descriptor.rawValue, object.id, &info, AT_SYMLINK_NOFOLLOW) == 0 {
                object.inOwnerStore = true
                objects[name] = object
            } else if fstatat(objectsDirectory.descriptor.rawValue, object.id, &info, AT_SYMLINK_NOFOLLOW) != 0 {
                logger.warning("dropping a name whose file is missing", metadata: ["name": "\(Self.display(name))"])
                objects[name] = nil
                continue
            }
            objects.noteBytes(Int(info.st_blocks) * 512, of: object)
        }
        journalRecords = records
    }

    /// A uid's tmpfs left by an earlier broker: still mounted, or kept by the service manager
    /// (`keptOwnerRoots`); nil if there is none.
    private func existingOwnerStore(of uid: UInt32) -> StoreDirectory? {
        if let store = ownerDirectories[uid] { return store }
        let directory = path + "/uids/\(uid)"
        if isMountPoint(directory), let descriptor = try? Self.openDirectory(directory) {
            let store = StoreDirectory(descriptor)
            ownerDirectories[uid] = store
            keepWithServiceManager(store, of: uid)
            return store
        }
        guard let kept = keptOwnerRoots.removeValue(forKey: uid) else { return nil }
        ownerDirectories[uid] = kept
        return kept
    }

    /// Deletes object files that no name refers to (their unlink was journaled, then the broker
    /// died before removing the file; or a creation died before its journal record).
    private func removeOrphans() throws(Errno) {
        let referenced = Set(objects.values.map(\.id))
        try removeOrphans(in: objectsDirectory, referenced: referenced)
        for store in ownerDirectories.values {
            try removeOrphans(in: store, referenced: referenced)
        }
    }

    private func removeOrphans(in store: StoreDirectory, referenced: Set<String>) throws(Errno) {
        let listing = try duplicateDescriptor(store.descriptor.rawValue)
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
            unlinkat(store.descriptor.rawValue, orphan, 0)
            logger.notice("removed an object file no name refers to", metadata: ["file": "\(orphan)"])
        }
    }

    /// Rewrites the journal as one bind record per live name, atomically (write aside, rename).
    private func compact() throws(Errno) {
        var bytes: [UInt8] = []
        for (name, object) in objects.sorted(by: { $0.key.lexicographicallyPrecedes($1.key) }) {
            bytes += Record.bind(name: name, object: object).encode()
        }
        let temporary = statePath + "/journal.new"
        Glibc.unlink(temporary)
        let replacement = try openFile(temporary, flags: O_RDWR | O_CREAT | O_EXCL | O_APPEND | O_NOFOLLOW, mode: 0o600)
        do throws(Errno) {
            try replacement.writeAll(bytes)
            _ = try syscallRetrying { Glibc.rename(temporary, statePath + "/journal") }
        } catch {
            Glibc.unlink(temporary)
            throw error
        }
        journal = replacement
        journalRecords = objects.count
    }
}

/// The namespace's change counter: a u64 at offset 0 of a one-page memfd that the broker maps
/// writable and then seals with future-write, so that no client (each gets the memfd itself,
/// opcode 45) can write it or map it writable. The broker bumps it, with release ordering,
/// whenever a name comes to refer to another object or to none (create, unlink, rename,
/// exchange), before it answers the request that made the change.
final class ChangeCounter {
    let descriptor: Descriptor
    private let mapping: Mapping

    init() throws(Errno) {
        let memory = try makeMemoryFile(name: "patchbay-shm-changes", sealable: true)
        try memory.truncate(to: 4096)
        mapping = try Mapping(memory, length: 4096, writable: true)
        try memory.addSeals([.futureWrite, .shrink, .grow, .seal])
        descriptor = memory
    }

    func bump() {
        let word = mapping.baseAddress.assumingMemoryBound(to: UInt64.self)
        SharedWord.store(word, SharedWord.load(word) &+ 1)
    }
}
