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
import PatchbaySystem
import Synchronization
import SystemPackage

/// A shared memory object held by this process: a descriptor plus what kind of object it is.
/// Closing (dropping) it does not unmap mappings made from it.
public struct SharedMemory: ~Copyable {
    /// What kind of object a handle refers to.
    public enum Kind: Sendable, Equatable {
        /// Anonymous: size fixed by the first mapping (or by `truncate`), sealable if asked.
        case anonymous
        /// Named: lives in the broker's namespace until unlinked.
        case named
    }

    /// The object's descriptor, owned by this handle (share it with `Broker.share`). Once it has
    /// been asked for, the object may be in other processes' hands, and its first mapping is
    /// decided under a lock that excludes them.
    public var descriptor: Descriptor {
        _read {
            confinement?.escape()
            yield handle
        }
    }
    let handle: Descriptor
    /// Anonymous or named.
    public let kind: Kind
    /// Whether this handle may write (it was opened read-write).
    public let isWritable: Bool
    /// For an anonymous object made in this process: whether its descriptor can still be only
    /// here, and its size as this process set it.
    let confinement: Confinement?

    init(descriptor: consuming Descriptor, kind: Kind, isWritable: Bool, confined: Bool = false) {
        self.handle = descriptor
        self.kind = kind
        self.isWritable = isWritable
        confinement = confined ? Confinement() : nil
    }

    /// Adopts a descriptor that refers to a shared memory object (claimed by key, received over a
    /// socket, inherited). Memfds are anonymous objects; anything else is treated as named.
    public init(adopting descriptor: consuming Descriptor) throws(PatchbayError) {
        let access: CInt
        do {
            access = try descriptor.system.accessMode()
        } catch {
            throw PatchbayError(error, "not an open descriptor")
        }
        guard access != O_WRONLY else {
            throw PatchbayError(.invalidArgument, "a write-only descriptor cannot be mapped")
        }
        let link = descriptor.system.procLink() ?? ""
        self.kind = link.hasPrefix("/memfd:") ? .anonymous : .named
        self.isWritable = access == O_RDWR
        self.handle = descriptor
        confinement = nil
    }

    /// A handle on a copy (`dup`) of a descriptor the caller keeps, for the C library.
    package init(borrowingRawDescriptor fd: CInt) throws(PatchbayError) {
        let copy = fcntl(fd, F_DUPFD_CLOEXEC, 0)
        guard copy >= 0 else { throw PatchbayError(Errno(rawValue: errno), "descriptor \(fd) is not open") }
        try self.init(adopting: Descriptor(PatchbaySystem.Descriptor(adopting: copy)))
    }

    /// Gives up the descriptor to the caller, who closes it (for the C library).
    package consuming func releaseDescriptor() -> CInt {
        confinement?.escape()
        return handle.release().rawValue
    }

    /// A read-only handle on the same object (a new open file description).
    public func readOnly() throws(PatchbayError) -> SharedMemory {
        do {
            let handle = try openFile("/proc/self/fd/\(handle.rawValue)", flags: O_RDONLY)
            return SharedMemory(descriptor: Descriptor(handle), kind: kind, isWritable: false)
        } catch {
            throw PatchbayError(error, "cannot reopen the object read-only")
        }
    }

    /// The object's current size in bytes.
    public var size: Int {
        get throws(PatchbayError) {
            try handle.size()
        }
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
            try handle.system.truncate(to: size)
            confinement?.sized(size)
        } catch {
            throw PatchbayError(error, error == .notPermitted ? "a seal forbids this size change" : "ftruncate failed")
        }
    }

    /// The object's seals. Named objects report `.seal` only: they can never be sealed.
    public func seals() throws(PatchbayError) -> Seals {
        if kind == .named { return .seal }
        do { return Seals(rawValue: try handle.system.seals().rawValue) } catch { throw PatchbayError(error, "F_GET_SEALS failed") }
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
            try handle.system.addSeals(PatchbaySystem.Seals(rawValue: seals.rawValue))
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
        try handle.status()
    }
}

/// Linux memfd seals (`F_SEAL_*`) on an anonymous object.
public struct Seals: OptionSet, Sendable, Hashable {
    /// The `F_SEAL_*` bits.
    public let rawValue: UInt32
    /// Seals from their `F_SEAL_*` bits.
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    /// No more seals may be added (`F_SEAL_SEAL`).
    public static let seal = Seals(rawValue: PatchbaySystem.Seals.seal.rawValue)
    /// The size may not shrink (`F_SEAL_SHRINK`).
    public static let shrink = Seals(rawValue: PatchbaySystem.Seals.shrink.rawValue)
    /// The size may not grow (`F_SEAL_GROW`).
    public static let grow = Seals(rawValue: PatchbaySystem.Seals.grow.rawValue)
    /// No writes at all, through any mapping or descriptor (`F_SEAL_WRITE`).
    public static let write = Seals(rawValue: PatchbaySystem.Seals.write.rawValue)
    /// No new writable mappings or writes; existing writable mappings keep working
    /// (`F_SEAL_FUTURE_WRITE`).
    public static let futureWrite = Seals(rawValue: PatchbaySystem.Seals.futureWrite.rawValue)
}

/// What makes an anonymous object's first mapping cheap: while its descriptor has not left this
/// process (nobody asked for `descriptor`, nothing inherited it across `fork`), no other process
/// can map or size it, so the first-mapping rule needs neither the POSIX lock nor an `fstat`:
/// the size is the one this process set. Threads of this process still take the process-wide
/// sizing lock.
final class Confinement: Sendable {
    private let createdIn = forkGeneration()
    private let escaped = Atomic<Bool>(false)
    /// The size this process gave the object (0: none yet).
    private let size = Atomic<Int>(0)

    func escape() { escaped.store(true, ordering: .releasing) }

    /// The object's size while it is confined; nil once it may not be.
    var confinedSize: Int? {
        guard !escaped.load(ordering: .acquiring), forkGeneration() == createdIn else { return nil }
        return size.load(ordering: .acquiring)
    }

    func sized(_ bytes: Int) { size.store(bytes, ordering: .releasing) }
}
