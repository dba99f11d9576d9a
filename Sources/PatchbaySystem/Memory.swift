public import SystemPackage
import Glibc
import CPatchbayShims

/// memfd seals (`F_SEAL_*`).
public struct Seals: OptionSet, Sendable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public static let seal = Seals(rawValue: pb_seal_seal())
    public static let shrink = Seals(rawValue: pb_seal_shrink())
    public static let grow = Seals(rawValue: pb_seal_grow())
    public static let write = Seals(rawValue: pb_seal_write())
    public static let futureWrite = Seals(rawValue: pb_seal_future_write())
}

/// An anonymous memory file. The corresponding C call is `memfd_create(MFD_CLOEXEC)`.
public func makeMemoryFile(name: String, sealable: Bool) throws(Errno) -> Descriptor {
    var flags = pb_mfd_cloexec()
    if sealable { flags |= pb_mfd_allow_sealing() }
    return Descriptor(adopting: try syscallRetrying { pb_memfd_create(name, flags) })
}

extension Descriptor {
    /// Sets the file's size. The corresponding C call is `ftruncate`.
    public borrowing func truncate(to size: Int) throws(Errno) {
        _ = try syscallRetrying { ftruncate(rawValue, off_t(size)) }
    }

    /// The corresponding C call is `fcntl(F_ADD_SEALS)`.
    public borrowing func addSeals(_ seals: Seals) throws(Errno) {
        _ = try syscallRetrying { pb_add_seals(rawValue, seals.rawValue) }
    }

    /// The corresponding C call is `fcntl(F_GET_SEALS)`.
    public borrowing func seals() throws(Errno) -> Seals {
        Seals(rawValue: UInt32(try syscallRetrying { pb_get_seals(rawValue) }))
    }
}

/// A shared mapping of a file, unmapped when this value ends.
public struct Mapping: ~Copyable {
    public let baseAddress: UnsafeMutableRawPointer
    public let count: Int

    /// Maps `length` bytes of `descriptor` at `offset`, shared. The corresponding C call is `mmap`.
    public init(
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

    /// The mapped bytes, for reading in place.
    public var bytes: UnsafeRawBufferPointer { UnsafeRawBufferPointer(start: baseAddress, count: count) }

    /// The mapped bytes, for writing in place.
    public var mutableBytes: UnsafeMutableRawBufferPointer {
        UnsafeMutableRawBufferPointer(start: baseAddress, count: count)
    }
}

/// The system page size.
public let pageSize: Int = Int(sysconf(CInt(_SC_PAGESIZE)))
