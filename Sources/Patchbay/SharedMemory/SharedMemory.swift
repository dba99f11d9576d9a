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
