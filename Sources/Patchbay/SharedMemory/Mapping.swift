// Mapping shared memory: the first-mapping rule of anonymous objects and the `Mapping` a
// mapping call returns (unmapped when it goes away).

import Glibc
import PatchbaySystem
import SystemPackage
import Synchronization

extension SharedMemory {
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
        switch kind {
        case .named:
            let size = try self.size
            guard let length = length ?? (size > offset ? size - offset : nil) else {
                throw PatchbayError(.invalidArgument, "the object is \(size) bytes; give a length to map past its end")
            }
            return try mapSystem(length: length, offset: offset, writable: writable)
        case .anonymous:
            return try mapAnonymous(length: length, offset: offset, writable: writable)
        }
    }

    private func mapSystem(length: Int, offset: Int, writable: Bool) throws(PatchbayError) -> Mapping {
        do {
            return Mapping(try PatchbaySystem.Mapping(handle.system, length: length, offset: offset, writable: writable))
        } catch {
            // Linux says EPERM for a writable mapping of a write-sealed memfd, EACCES for a
            // read-only descriptor.
            let reason = switch error {
            case .notPermitted: "the kernel refused a writable mapping: the object is sealed against writes"
            case .permissionDenied: "the kernel refused a writable mapping: this descriptor is not open for writing"
            case .noMemory: "the kernel could not map \(length) bytes (no room in this process's address space)"
            default: "mmap failed"
            }
            throw PatchbayError(error, reason)
        }
    }

    /// The first-mapping rule, decided under a lock that excludes other processes (a POSIX lock
    /// on the object) and other threads of this one; a first mapping is made under it too, so one
    /// that fails leaves the object as it was (of no size).
    private func mapAnonymous(length: Int?, offset: Int, writable: Bool) throws(PatchbayError) -> Mapping {
        if !isWritable {
            // A read-only handle cannot size the object, so it never takes the lock.
            let size = try self.size
            guard size > 0 else {
                throw PatchbayError(.permissionDenied, "the object has no size yet and a read-only handle cannot fix it")
            }
            return try laterMapping(size: size, length: length, offset: offset, writable: writable)
        }
        if confinement != nil, let mapping = try anonymousSizingLock.locked({ () throws(PatchbayError) -> Mapping? in
            // Only this process holds it: the size is the one it set, and nobody can race.
            guard let size = confinement?.confinedSize else { return nil }
            if size > 0 { return try laterMapping(size: size, length: length, offset: offset, writable: writable) }
            return try firstMapping(length: length, offset: offset, writable: writable)
        }) {
            return mapping
        }
        // Sized already: there is nothing to decide, and so no lock to wait for (another process
        // holding one, a reader's lock for instance, cannot hold this mapping up).
        let size = try self.size
        if size > 0 { return try laterMapping(size: size, length: length, offset: offset, writable: writable) }
        return try mapUnderLock(length: length, offset: offset, writable: writable)
    }

    /// The lock held by another process is waited for at most this long (it is held for the
    /// few system calls of a first mapping).
    private static let sizingLockPatience: UInt64 = 2_000_000_000

    /// Decides the size under the object's lock, looking each millisecond whether it is free
    /// (or whoever holds it sized the object), for at most `sizingLockPatience`: `EAGAIN` past
    /// that. This process's lock is held only while trying, so its other threads never wait on
    /// another process's lock.
    private func mapUnderLock(length: Int?, offset: Int, writable: Bool) throws(PatchbayError) -> Mapping {
        let deadline = monotonicNanoseconds() + Self.sizingLockPatience
        while true {
            if let mapping = try anonymousSizingLock.locked({ () throws(PatchbayError) -> Mapping? in
                let locked: Bool
                do throws(Errno) {
                    locked = try handle.system.tryLockFile()
                } catch {
                    throw PatchbayError(error, "cannot lock the object to decide its size")
                }
                guard locked else { return nil }
                defer { handle.system.unlockFile() }
                let size = try self.size
                if size > 0 { return try laterMapping(size: size, length: length, offset: offset, writable: writable) }
                return try firstMapping(length: length, offset: offset, writable: writable)
            }) {
                return mapping
            }
            let size = try self.size
            if size > 0 { return try laterMapping(size: size, length: length, offset: offset, writable: writable) }
            guard monotonicNanoseconds() < deadline else {
                throw PatchbayError(.resourceTemporarilyUnavailable,
                                    "another process has held the object's lock for 2 s without sizing it; its first mapping cannot be decided now")
            }
            Glibc.usleep(1_000)
        }
    }

    /// The first mapping: sizes the object and maps it (the caller holds what excludes other
    /// sizers). If the kernel cannot map it, the object goes back to no size: a failed call fixes
    /// nothing.
    private func firstMapping(length: Int?, offset: Int, writable: Bool) throws(PatchbayError) -> Mapping {
        guard offset == 0 else {
            throw PatchbayError(.invalidArgument, "the first mapping of an anonymous object decides its size and must be at offset 0")
        }
        guard let length else {
            throw PatchbayError(.invalidArgument, "the first mapping of an anonymous object decides its size; give a length")
        }
        guard length <= Int.max - pageSize else {
            throw PatchbayError(.invalidArgument, "a mapping of \(length) bytes is longer than any object can be")
        }
        let rounded = (length + pageSize - 1) / pageSize * pageSize
        // Mapped first (a mapping may reach past the end), then sized: another process that
        // finds the size without the lock (`mapAnonymous`) only ever finds a final one. One that
        // cannot be mapped leaves the object as it was.
        let mapping = try mapSystem(length: rounded, offset: 0, writable: writable)
        do throws(Errno) {
            try handle.system.truncate(to: rounded)
        } catch {
            throw PatchbayError(error, "cannot size the object to \(rounded) bytes")  // (unmapped as it goes)
        }
        confinement?.sized(rounded)
        return mapping
    }

    /// A mapping of an object that has its size already: within it.
    private func laterMapping(size: Int, length: Int?, offset: Int, writable: Bool) throws(PatchbayError) -> Mapping {
        try mapSystem(length: laterMappingLength(size: size, length: length, offset: offset), offset: offset, writable: writable)
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
}

/// Threads of one process share POSIX locks, so sizing also takes this process-wide lock.
private let anonymousSizingLock = Lock()

/// A shared mapping of a shared memory object, unmapped when this value ends. The memory is used
/// in place: `withUnsafeBytes`/`withUnsafeMutableBytes`, or `bytes`/`mutableBytes` while the
/// mapping lives.
public struct Mapping: ~Copyable {
    let system: PatchbaySystem.Mapping

    init(_ system: consuming PatchbaySystem.Mapping) {
        self.system = system
    }

    /// Gives the mapping up without unmapping it (for the C library, whose callers `munmap`).
    package consuming func release() -> UnsafeMutableRawPointer { system.release() }

    /// The first mapped byte.
    public var baseAddress: UnsafeMutableRawPointer { system.baseAddress }

    /// The mapped length in bytes.
    public var count: Int { system.count }

    /// The mapped bytes, for reading in place (valid while the mapping lives).
    public var bytes: UnsafeRawBufferPointer { system.bytes }

    /// The mapped bytes, for writing in place (valid while the mapping lives).
    public var mutableBytes: UnsafeMutableRawBufferPointer { system.mutableBytes }

    /// Runs `body` with the mapped bytes for reading, in place.
    public func withUnsafeBytes<R, E: Error>(_ body: (UnsafeRawBufferPointer) throws(E) -> R) throws(E) -> R {
        try body(system.bytes)
    }

    /// Runs `body` with the mapped bytes for writing, in place.
    public func withUnsafeMutableBytes<R, E: Error>(_ body: (UnsafeMutableRawBufferPointer) throws(E) -> R) throws(E) -> R {
        try body(system.mutableBytes)
    }
}
