package import SystemPackage
import Glibc
import CPatchbayShims

/// memfd seals (`F_SEAL_*`).
package struct Seals: OptionSet, Sendable {
    package let rawValue: UInt32
    package init(rawValue: UInt32) { self.rawValue = rawValue }
    package static let seal = Seals(rawValue: pb_seal_seal())
    package static let shrink = Seals(rawValue: pb_seal_shrink())
    package static let grow = Seals(rawValue: pb_seal_grow())
    package static let write = Seals(rawValue: pb_seal_write())
    package static let futureWrite = Seals(rawValue: pb_seal_future_write())
}

/// An anonymous memory file. The corresponding C call is `memfd_create(MFD_CLOEXEC)`.
package func makeMemoryFile(name: String, sealable: Bool) throws(Errno) -> Descriptor {
    var flags = pb_mfd_cloexec()
    if sealable { flags |= pb_mfd_allow_sealing() }
    let memory = Descriptor(adopting: try syscallRetrying { pb_memfd_create(name, flags) })
    // A memfd is made with mode 0777, and anyone holding any descriptor of it could open it again
    // through /proc/self/fd with any access: a read-only handle given to another user would be
    // a read-write one. 0600: only its owner (and root) reopens it, as `readOnly()` does.
    _ = try syscallRetrying { fchmod(memory.rawValue, 0o600) }
    return memory
}

extension Descriptor {
    /// Sets the file's size. The corresponding C call is `ftruncate`.
    package borrowing func truncate(to size: Int) throws(Errno) {
        _ = try syscallRetrying { ftruncate(rawValue, off_t(size)) }
    }

    /// The corresponding C call is `fcntl(F_ADD_SEALS)`.
    package borrowing func addSeals(_ seals: Seals) throws(Errno) {
        _ = try syscallRetrying { pb_add_seals(rawValue, seals.rawValue) }
    }

    /// The corresponding C call is `fcntl(F_GET_SEALS)`.
    package borrowing func seals() throws(Errno) -> Seals {
        Seals(rawValue: UInt32(try syscallRetrying { pb_get_seals(rawValue) }))
    }
}

/// A shared mapping of a file, unmapped when this value ends.
package struct Mapping: ~Copyable {
    package let baseAddress: UnsafeMutableRawPointer
    package let count: Int

    /// Maps `length` bytes of `descriptor` at `offset`, shared. The corresponding C call is `mmap`.
    package init(
        _ descriptor: borrowing Descriptor, length: Int, offset: Int = 0, writable: Bool
    ) throws(Errno) {
        let protection = writable ? (PROT_READ | PROT_WRITE) : PROT_READ
        guard let address = mmap(nil, length, protection, MAP_SHARED, descriptor.rawValue, off_t(offset)),
              address != MAP_FAILED
        else { throw Errno.current }
        baseAddress = address
        count = length
    }

    deinit {
        munmap(baseAddress, count)
    }

    /// Gives the mapping up without unmapping it: the caller unmaps it (`munmap`).
    package consuming func release() -> UnsafeMutableRawPointer {
        let address = baseAddress
        discard self
        return address
    }

    /// The mapped bytes, for reading in place.
    package var bytes: UnsafeRawBufferPointer { UnsafeRawBufferPointer(start: baseAddress, count: count) }

    /// The mapped bytes, for writing in place.
    package var mutableBytes: UnsafeMutableRawBufferPointer {
        UnsafeMutableRawBufferPointer(start: baseAddress, count: count)
    }
}

/// The system page size.
package let pageSize: Int = Int(sysconf(CInt(_SC_PAGESIZE)))

/// The seals of the file behind a descriptor this code does not own, or nil when it has none to
/// report (it is not a memfd, or was made without sealing: `F_GET_SEALS` fails).
package func seals(ofDescriptor fd: CInt) -> Seals? {
    let value = pb_get_seals(fd)
    return value < 0 ? nil : Seals(rawValue: UInt32(value))
}
