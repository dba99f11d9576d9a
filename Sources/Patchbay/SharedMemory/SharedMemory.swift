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

    /// The object's descriptor, owned by this handle (share it with `Broker.share`).
    public let descriptor: Descriptor
    /// Anonymous or named.
    public let kind: Kind
    /// Whether this handle may write (it was opened read-write).
    public let isWritable: Bool

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
        self.descriptor = descriptor
    }

    /// A handle on a copy (`dup`) of a descriptor the caller keeps, for the C library.
    package init(borrowingRawDescriptor fd: CInt) throws(PatchbayError) {
        let copy = fcntl(fd, F_DUPFD_CLOEXEC, 0)
        guard copy >= 0 else { throw PatchbayError(Errno(rawValue: errno), "descriptor \(fd) is not open") }
        try self.init(adopting: Descriptor(PatchbaySystem.Descriptor(adopting: copy)))
    }

    /// Gives up the descriptor to the caller, who closes it (for the C library).
    package consuming func releaseDescriptor() -> CInt {
        descriptor.release().rawValue
    }

    /// A read-only handle on the same object (a new open file description).
    public func readOnly() throws(PatchbayError) -> SharedMemory {
        do {
            let handle = try openFile("/proc/self/fd/\(descriptor.rawValue)", flags: O_RDONLY)
            return SharedMemory(descriptor: Descriptor(handle), kind: kind, isWritable: false)
        } catch {
            throw PatchbayError(error, "cannot reopen the object read-only")
        }
    }

    /// The object's current size in bytes.
    public var size: Int {
        get throws(PatchbayError) {
            try descriptor.size()
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
            try descriptor.system.truncate(to: size)
        } catch {
            throw PatchbayError(error, error == .notPermitted ? "a seal forbids this size change" : "ftruncate failed")
        }
    }

    /// The object's seals. Named objects report `.seal` only: they can never be sealed.
    public func seals() throws(PatchbayError) -> Seals {
        if kind == .named { return .seal }
        do { return Seals(rawValue: try descriptor.system.seals().rawValue) } catch { throw PatchbayError(error, "F_GET_SEALS failed") }
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
            try descriptor.system.addSeals(PatchbaySystem.Seals(rawValue: seals.rawValue))
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
        try descriptor.status()
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
