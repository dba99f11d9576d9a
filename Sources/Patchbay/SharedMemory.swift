// Shared memory: anonymous objects (PatchworkOS /dev/shmem/new, FreeBSD SHM_ANON) and named
// objects (FreeBSD shm_open), both handed to clients as real descriptors.
//
// Anonymous objects are memfds. Their first mapping decides their size (rounded up to the page
// size) and must be at offset 0; later mappings map the existing object at page-aligned offsets
// inside it, and a mapping that would reach past the end is EINVAL. `truncate` is the other way to
// set the size. "First" is decided under a lock, so two processes racing to map a fresh object
// cannot both size it.
//
// Named objects come from the broker (`Broker.openSharedMemory`) and follow FreeBSD: size 0 until
// truncated, mappings past the size are allowed (touching pages past the end raises SIGBUS, as the
// kernel does), never sealable.

import Glibc
import PatchbayProtocol
import PatchbaySystem
import Synchronization

/// A shared memory object held by this process: a descriptor plus what kind of object it is.
/// Closing (dropping) it does not unmap mappings made from it.
public struct SharedMemory: ~Copyable {
    public enum Kind: Sendable, Equatable {
        /// Anonymous: size fixed by the first mapping (or by `truncate`), sealable if asked.
        case anonymous
        /// Named: lives in the broker's namespace until unlinked.
        case named
    }

    public let descriptor: Descriptor
    public let kind: Kind
    /// Whether this handle may write (it was opened read-write).
    public let isWritable: Bool

    /// A new anonymous object, created in this process (no broker round trip): the
    /// `SHM_ANON`/`/dev/shmem/new` object. `sealable` allows Linux memfd seals on it.
    public static func anonymous(sealable: Bool = false) throws(PatchbayError) -> SharedMemory {
        do {
            return SharedMemory(descriptor: try makeMemoryFile(name: "patchbay-anonymous", sealable: sealable),
                                kind: .anonymous, isWritable: true)
        } catch {
            throw PatchbayError(error, "cannot create an anonymous shared memory object")
        }
    }

    init(descriptor: consuming Descriptor, kind: Kind, isWritable: Bool) {
        self.descriptor = descriptor
        self.kind = kind
        self.isWritable = isWritable
    }

    /// Adopts a descriptor that refers to a shared memory object (claimed by key, received over a
    /// socket, inherited). Memfds are anonymous objects; anything else is treated as named.
    public init(adopting descriptor: consuming Descriptor) throws(PatchbayError) {
        let access: CInt
        do {
            access = try descriptor.accessMode()
        } catch {
            throw PatchbayError(error, "not an open descriptor")
        }
        guard access != O_WRONLY else {
            throw PatchbayError(.invalidArgument, "a write-only descriptor cannot be mapped")
        }
        let link = descriptor.procLink() ?? ""
        self.kind = link.hasPrefix("/memfd:") ? .anonymous : .named
        self.isWritable = access == O_RDWR
        self.descriptor = descriptor
    }

    /// A read-only handle on the same object (a new open file description).
    public func readOnly() throws(PatchbayError) -> SharedMemory {
        do {
            let handle = try openFile("/proc/self/fd/\(descriptor.rawValue)", flags: O_RDONLY)
            return SharedMemory(descriptor: handle, kind: kind, isWritable: false)
        } catch {
            throw PatchbayError(error, "cannot reopen the object read-only")
        }
    }

    /// The object's current size in bytes.
    public var size: Int {
        get throws(PatchbayError) {
            do { return try descriptor.size() } catch { throw PatchbayError(error, "fstat failed") }
        }
    }

    /// Maps the object shared. `length` nil maps everything from `offset` to the end.
    ///
    /// For an anonymous object of size 0 this is the first mapping: it needs a length, must be at
    /// offset 0, and fixes the size (rounded up to the page size).
    ///
    /// - Throws: `EACCES` for a writable mapping of a read-only handle; `EINVAL` for an offset that
    ///   is not page-aligned, a zero length, a first mapping elsewhere than offset 0 or without a
    ///   length, or a later mapping of an anonymous object that reaches past its end.
    public func map(length: Int? = nil, offset: Int = 0, writable: Bool = true) throws(PatchbayError) -> Mapping {
        if writable && !isWritable {
            throw PatchbayError(.permissionDenied, "a writable mapping needs a read-write handle; this one is read-only")
        }
        guard offset >= 0, offset % pageSize == 0 else {
            throw PatchbayError(.invalidArgument, "the offset must be a non-negative multiple of the page size (\(pageSize))")
        }
        if let length, length <= 0 {
            throw PatchbayError(.invalidArgument, "a mapping needs a positive length")
        }
        let mappedLength: Int
        switch kind {
        case .named:
            let size = try self.size
            guard let length = length ?? (size > offset ? size - offset : nil) else {
                throw PatchbayError(.invalidArgument, "the object is \(size) bytes; give a length to map past its end")
            }
            mappedLength = length
        case .anonymous:
            mappedLength = try sizeForAnonymousMapping(length: length, offset: offset)
        }
        do {
            return try Mapping(descriptor, length: mappedLength, offset: offset, writable: writable)
        } catch {
            throw PatchbayError(error, error == .permissionDenied
                ? "the kernel refused a writable mapping (is the object sealed against writes?)"
                : "mmap failed")
        }
    }

    /// The first-mapping rule, decided under a lock that excludes other processes (a POSIX lock
    /// on the object) and other threads of this one.
    private func sizeForAnonymousMapping(length: Int?, offset: Int) throws(PatchbayError) -> Int {
        if !isWritable {
            // A read-only handle cannot size the object, so it never takes the lock.
            let size = try self.size
            guard size > 0 else {
                throw PatchbayError(.permissionDenied, "the object has no size yet and a read-only handle cannot fix it")
            }
            return try laterMappingLength(size: size, length: length, offset: offset)
        }
        return try anonymousSizingLock.withLock { _ throws(PatchbayError) -> Int in
            try sizeUnderLock(length: length, offset: offset)
        }
    }

    private func sizeUnderLock(length: Int?, offset: Int) throws(PatchbayError) -> Int {
        do {
            try descriptor.lockFile()
        } catch {
            throw PatchbayError(error, "cannot lock the object to decide its size")
        }
        defer { descriptor.unlockFile() }
        let size = try self.size
        if size > 0 {
            return try laterMappingLength(size: size, length: length, offset: offset)
        }
        guard offset == 0 else {
            throw PatchbayError(.invalidArgument, "the first mapping of an anonymous object decides its size and must be at offset 0")
        }
        guard let length else {
            throw PatchbayError(.invalidArgument, "the first mapping of an anonymous object decides its size; give a length")
        }
        let rounded = (length + pageSize - 1) / pageSize * pageSize
        do {
            try descriptor.truncate(to: rounded)
        } catch {
            throw PatchbayError(error, "cannot size the object to \(rounded) bytes")
        }
        return rounded
    }

    private func laterMappingLength(size: Int, length: Int?, offset: Int) throws(PatchbayError) -> Int {
        guard offset < size else {
            throw PatchbayError(.invalidArgument, "offset \(offset) is past the end of the \(size)-byte object")
        }
        let mapped = length ?? (size - offset)
        guard mapped <= size - offset else {
            throw PatchbayError(.invalidArgument,
                                "a mapping of \(mapped) bytes at offset \(offset) reaches past the end of the \(size)-byte object")
        }
        return mapped
    }

    /// Sets the size (FreeBSD's `ftruncate` on a shared memory object). Shrinking discards the
    /// tail, so a later grow reads zeros there.
    ///
    /// - Throws: `EINVAL` on a read-only handle or a negative size; `EPERM` when a grow or
    ///   shrink seal forbids it.
    public func truncate(to size: Int) throws(PatchbayError) {
        guard isWritable else {
            throw PatchbayError(.invalidArgument, "a read-only handle cannot change the size")
        }
        guard size >= 0 else {
            throw PatchbayError(.invalidArgument, "the size cannot be negative")
        }
        do {
            try descriptor.truncate(to: size)
        } catch {
            throw PatchbayError(error, error == .notPermitted ? "a seal forbids this size change" : "ftruncate failed")
        }
    }

    /// The object's seals. Named objects report `.seal` only: they can never be sealed.
    public func seals() throws(PatchbayError) -> Seals {
        if kind == .named { return .seal }
        do { return try descriptor.seals() } catch { throw PatchbayError(error, "F_GET_SEALS failed") }
    }

    /// Adds seals (Linux memfd semantics).
    ///
    /// - Throws: `EPERM` when the object was not created sealable, is named, or already has
    ///   `.seal`; `EBUSY` for `.write` while a writable shared mapping exists.
    public func addSeals(_ seals: Seals) throws(PatchbayError) {
        if kind == .named {
            throw PatchbayError(.notPermitted, "named shared memory objects are never sealable")
        }
        do {
            try descriptor.addSeals(seals)
        } catch {
            let reason = switch error {
            case .notPermitted: "the object does not allow (more) seals: it was not created sealable, or is sealed against sealing"
            case .resourceBusy: "a writable shared mapping exists, so the write seal cannot be added"
            default: "F_ADD_SEALS failed"
            }
            throw PatchbayError(error, reason)
        }
    }

    /// Size, populated blocks and times, from the kernel.
    public func status() throws(PatchbayError) -> FileStatus {
        do { return try descriptor.status() } catch { throw PatchbayError(error, "statx failed") }
    }
}

/// Threads of one process share POSIX locks, so sizing also takes this process-wide lock.
private let anonymousSizingLock = Mutex(())

extension Mapping {
    /// Runs `body` with the mapped bytes for reading, in place.
    public func withUnsafeBytes<R, E: Error>(_ body: (UnsafeRawBufferPointer) throws(E) -> R) throws(E) -> R {
        try body(bytes)
    }

    /// Runs `body` with the mapped bytes for writing, in place.
    public func withUnsafeMutableBytes<R, E: Error>(_ body: (UnsafeMutableRawBufferPointer) throws(E) -> R) throws(E) -> R {
        try body(mutableBytes)
    }
}

// MARK: Named objects through the broker

/// How `openSharedMemory` opens.
public struct SharedMemoryOpenOptions: OptionSet, Sendable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    /// Create the object if the name is free.
    public static let create = SharedMemoryOpenOptions(rawValue: SharedMemoryOpenFlags.create.rawValue)
    /// With `create`: fail with `EEXIST` if the name is taken.
    public static let exclusive = SharedMemoryOpenOptions(rawValue: SharedMemoryOpenFlags.exclusive.rawValue)
    /// With read-write access: set the size to 0.
    public static let truncate = SharedMemoryOpenOptions(rawValue: SharedMemoryOpenFlags.truncate.rawValue)
}

/// Access a handle asks for.
public enum SharedMemoryAccess: UInt8, Sendable {
    case readOnly = 0
    case readWrite = 1
    /// Refused with `EINVAL`, as in FreeBSD; present so the refusal can be exercised.
    case writeOnly = 2
}

/// `renameSharedMemory` behaviour when the target exists.
public enum SharedMemoryRename: Sendable {
    /// Replace an existing target.
    case replace
    /// Fail with `EEXIST` if the target exists.
    case noReplace
    /// Swap the two objects' names atomically (a plain rename if the target does not exist).
    case exchange
    /// Both flags at once: refused with `EINVAL`, as in FreeBSD.
    case noReplaceAndExchange

    var flags: SharedMemoryRenameFlags {
        switch self {
        case .replace: []
        case .noReplace: .noReplace
        case .exchange: .exchange
        case .noReplaceAndExchange: [.noReplace, .exchange]
        }
    }
}

extension Broker {
    /// `shm_open`: opens (or with `.create`, creates) the named object `name`.
    ///
    /// New objects have size 0, the caller's effective uid and gid (from the kernel), and mode
    /// `mode & ~umask & 0o777`.
    ///
    /// - Throws: `ENAMETOOLONG` (over 1023 bytes), `EINVAL` (no leading `/`, write-only access),
    ///   `ENOENT`, `EEXIST` (`.create` + `.exclusive` on an existing name), `EACCES`.
    public func openSharedMemory(
        _ name: String, access: SharedMemoryAccess = .readWrite, options: SharedMemoryOpenOptions = [],
        mode: UInt32 = 0o600
    ) throws(PatchbayError) -> SharedMemory {
        let bytes = try Self.nameBytes(name)
        // The umask matters only to a new object, and reading it safely (from /proc, not by
        // setting it) costs more than the round trip itself, so only a create pays for it.
        let request = SharedMemoryOpenRequest(name: bytes, access: access.rawValue, flags: SharedMemoryOpenFlags(rawValue: options.rawValue),
                                              mode: mode, umask: options.contains(.create) ? currentUmask() : 0)
        var response = try call(.sharedMemory(.open(request)))
        guard case .sharedMemory(.open) = response.reply, let handle = response.takeDescriptor() else {
            throw PatchbayError(.protocolError, "the broker's open reply carried no descriptor")
        }
        return SharedMemory(descriptor: handle, kind: .named, isWritable: access == .readWrite)
    }

    /// A new anonymous object made by the broker (opening `/dev/shmem/new` in its namespace).
    /// `SharedMemory.anonymous` does the same without a round trip.
    public func newAnonymousSharedMemory(sealable: Bool = false) throws(PatchbayError) -> SharedMemory {
        var response = try call(.namespace(.open(path: "/dev/shmem/new", flags: sealable ? .sealable : [])))
        guard case .namespace(.open) = response.reply, let handle = response.takeDescriptor() else {
            throw PatchbayError(.protocolError, "the broker's open reply carried no descriptor")
        }
        return SharedMemory(descriptor: handle, kind: .anonymous, isWritable: true)
    }

    /// `shm_unlink`: removes the name. Existing handles and mappings keep working.
    /// - Throws: `ENOENT`, `EACCES` (needs read and write permission), name errors.
    public func unlinkSharedMemory(_ name: String) throws(PatchbayError) {
        _ = try call(.sharedMemory(.unlink(name: try Self.nameBytes(name))))
    }

    /// `shm_rename`, atomic.
    /// - Throws: `ENOENT` (no `from`), `EEXIST` (`.noReplace` onto an existing name), `EACCES`,
    ///   `EINVAL` (both flags), name errors.
    public func renameSharedMemory(from: String, to: String, _ behaviour: SharedMemoryRename = .replace)
        throws(PatchbayError)
    {
        _ = try call(.sharedMemory(.rename(from: try Self.nameBytes(from), to: try Self.nameBytes(to),
                                         flags: behaviour.flags)))
    }

    /// Size, owner, mode, four times and populated blocks of a named object.
    public func statSharedMemory(_ name: String) throws(PatchbayError) -> SharedMemoryInfo {
        let response = try call(.sharedMemory(.stat(name: try Self.nameBytes(name))))
        guard case .sharedMemory(.stat(let info)) = response.reply else {
            throw PatchbayError(.protocolError, "unexpected reply to stat")
        }
        return info
    }

    /// Every named object, sorted by name.
    public func listSharedMemory() throws(PatchbayError) -> [SharedMemoryInfo] {
        var all: [SharedMemoryInfo] = []
        var after: [UInt8] = []
        while true {
            let response = try call(.sharedMemory(.list(after: after)))
            guard case .sharedMemory(.list(let page, let more)) = response.reply else {
                throw PatchbayError(.protocolError, "unexpected reply to list")
            }
            all += page
            guard more, let last = page.last else { return all }
            after = last.name
        }
    }

    /// Name bytes, with the checks that must happen before anything is sent: a name longer than
    /// the wire can carry is `ENAMETOOLONG` here (the broker checks everything else).
    static func nameBytes(_ name: String) throws(PatchbayError) -> [UInt8] {
        let bytes = Array(name.utf8)
        guard bytes.count <= 4096 else {
            throw PatchbayError(.fileNameTooLong, "a shared memory name is at most 1023 bytes; this one has \(bytes.count)")
        }
        return bytes
    }
}

/// This process's umask, read without changing it (`/proc/self/status`), falling back to the
/// racy umask(2) probe on kernels without the field.
func currentUmask() -> UInt32 {
    if let status = try? openFile("/proc/self/status", flags: O_RDONLY),
       let bytes = try? status.readToEnd(limit: 65536) {
        for line in String(decoding: bytes, as: UTF8.self).split(separator: "\n") where line.hasPrefix("Umask:") {
            if let value = UInt32(line.dropFirst(6).trimmingPrefix(while: { $0 == " " || $0 == "\t" }), radix: 8) {
                return value
            }
        }
    }
    let mask = umask(0o022)
    umask(mask)
    return UInt32(mask)
}
