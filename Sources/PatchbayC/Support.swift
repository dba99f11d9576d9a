// libpatchbay: the Swift library exported through a C ABI (Sources/CPatchbayABI/include/patchbay.h).
//
// Every export returns >= 0 or -errno and sets the calling thread's reason sentence on failure;
// no Swift type crosses the boundary. Handles are retained Swift objects passed as opaque
// pointers (`Unmanaged`), released by the matching close. The prototypes in patchbay.h are the
// contract: each `@_cdecl` here matches its declaration there, argument by argument.

import CPatchbayABI
import Glibc
import Patchbay
import PatchbayProtocol
import SystemPackage

/// Records `error` as the thread's reason and returns it as -errno.
func fail(_ error: PatchbayError) -> CInt {
    error.reason.withCString { pb__set_reason($0) }
    return -error.errno.rawValue
}

/// A failure the C layer itself finds (a NULL pointer, an unknown flag).
func fail(_ errno: Errno, _ reason: String) -> CInt {
    fail(PatchbayError(errno, reason))
}

/// Runs `body`, turning a thrown error into -errno.
@inline(__always)
func exported(_ body: () throws(PatchbayError) -> CInt) -> CInt {
    do {
        return try body()
    } catch {
        return fail(error)
    }
}

/// A NUL-terminated argument, or EINVAL for NULL or bytes that are not UTF-8 (which a lenient
/// decoding would replace, making two different names one), EFAULT for a pointer to memory that
/// cannot be read (as a kernel's copy-in answers, where reading it here would crash the caller).
func string(_ pointer: UnsafePointer<CChar>?, _ what: String) throws(PatchbayError) -> String {
    guard let pointer else { throw PatchbayError(.invalidArgument, "\(what) is NULL") }
    if pb__probe_string(pointer, UInt(CInt.max)) == -EFAULT {
        throw PatchbayError(.badAddress, "\(what) points at memory this process cannot read")
    }
    return try decoded(pointer, what)
}

/// A NUL-terminated argument already found readable, or EINVAL for bytes that are not UTF-8.
private func decoded(_ pointer: UnsafePointer<CChar>, _ what: String) throws(PatchbayError) -> String {
    guard let text = String(validatingCString: pointer) else {
        throw PatchbayError(.invalidArgument, "\(what) is not valid UTF-8")
    }
    return text
}

/// The object behind an opaque handle.
func object<T: AnyObject>(_ handle: OpaquePointer?, as type: T.Type, _ what: String) throws(PatchbayError) -> T {
    guard let handle else { throw PatchbayError(.invalidArgument, "the \(what) is NULL") }
    return Unmanaged<T>.fromOpaque(UnsafeRawPointer(handle)).takeUnretainedValue()
}

/// Hands `value` to C as an opaque handle (retained until its close).
func handle<T: AnyObject>(_ value: T) -> OpaquePointer {
    OpaquePointer(Unmanaged.passRetained(value).toOpaque())
}

/// Drops a handle made by `handle`.
func release<T: AnyObject>(_ handle: OpaquePointer?, as type: T.Type) {
    guard let handle else { return }
    Unmanaged<T>.fromOpaque(UnsafeRawPointer(handle)).release()
}

/// Writes a handle into an out parameter, or EINVAL for NULL.
func checkOut(_ out: UnsafeMutablePointer<OpaquePointer?>?) throws(PatchbayError) -> UnsafeMutablePointer<OpaquePointer?> {
    guard let out else { throw PatchbayError(.invalidArgument, "the out pointer is NULL") }
    return out
}

// MARK: The broker

@_cdecl("pb_broker_open")
public func pb_broker_open(_ out: UnsafeMutablePointer<OpaquePointer?>?) -> CInt {
    exported { () throws(PatchbayError) -> CInt in
        let out = try checkOut(out)
        out.pointee = handle(try Broker())
        return 0
    }
}

@_cdecl("pb_broker_open_at")
public func pb_broker_open_at(_ out: UnsafeMutablePointer<OpaquePointer?>?, _ path: UnsafePointer<CChar>?) -> CInt {
    exported { () throws(PatchbayError) -> CInt in
        let out = try checkOut(out)
        let socketPath = try string(path, "the socket path")
        // (An empty path would mean the default broker to Broker: not what this call names.)
        guard !socketPath.isEmpty else { throw PatchbayError(.invalidArgument, "the socket path is empty") }
        out.pointee = handle(try Broker(socketPath: socketPath, autostart: false))
        return 0
    }
}

@_cdecl("pb_broker_close")
public func pb_broker_close(_ broker: OpaquePointer?) {
    release(broker, as: Broker.self)
}

// MARK: Keys

@_cdecl("pb_share")
public func pb_share(_ broker: OpaquePointer?, _ fd: CInt, _ timeout: Int64, _ key: UnsafeMutablePointer<CChar>?) -> CInt {
    exported { () throws(PatchbayError) -> CInt in try share(broker, fd, timeout, nil, key) }
}

@_cdecl("pb_share_for")
public func pb_share_for(_ broker: OpaquePointer?, _ fd: CInt, _ timeout: Int64, _ who: CInt, _ id: Int64,
                         _ key: UnsafeMutablePointer<CChar>?) -> CInt {
    exported { () throws(PatchbayError) -> CInt in
        let restriction: ClaimRestriction
        switch who {
        case PB_CLAIMABLE_BY_UID:
            // ((uid_t)-1 is no uid: nobody could ever claim the key.)
            guard let uid = UInt32(exactly: id), uid != .max else { throw PatchbayError(.invalidArgument, "uid \(id) is out of range") }
            restriction = .uid(uid)
        case PB_CLAIMABLE_BY_GID:
            guard let gid = UInt32(exactly: id), gid != .max else { throw PatchbayError(.invalidArgument, "gid \(id) is out of range") }
            restriction = .gid(gid)
        case PB_CLAIMABLE_BY_PID:
            guard let pid = Int32(exactly: id), pid > 0 else { throw PatchbayError(.invalidArgument, "pid \(id) is out of range") }
            restriction = .pid(pid)
        default:
            throw PatchbayError(.invalidArgument, "who must be PB_CLAIMABLE_BY_UID, PB_CLAIMABLE_BY_GID or PB_CLAIMABLE_BY_PID, not \(who)")
        }
        return try share(broker, fd, timeout, restriction, key)
    }
}

/// `pb_share` and `pb_share_for`.
private func share(_ broker: OpaquePointer?, _ fd: CInt, _ timeout: Int64, _ restriction: ClaimRestriction?,
                   _ key: UnsafeMutablePointer<CChar>?) throws(PatchbayError) -> CInt {
    let broker = try object(broker, as: Broker.self, "broker")
    guard let key else { throw PatchbayError(.invalidArgument, "the key buffer is NULL") }
    let expiry: Broker.Expiry
    switch timeout {
    case Int64(PB_TIMEOUT_NEVER): expiry = .never
    case 1...: expiry = .after(.milliseconds(timeout))
    default: throw PatchbayError(.invalidArgument, "the timeout must be positive milliseconds or PB_TIMEOUT_NEVER (-1), not \(timeout)")
    }
    let text = try broker.share(rawDescriptor: fd, timeout: expiry, claimableBy: restriction).text
    let bytes = Array(text.utf8.prefix(Int(PB_KEY_TEXT_SIZE) - 1))
    for (index, byte) in bytes.enumerated() { key[index] = CChar(bitPattern: byte) }
    key[bytes.count] = 0
    return 0
}

@_cdecl("pb_claim")
public func pb_claim(_ broker: OpaquePointer?, _ key: UnsafePointer<CChar>?) -> CInt {
    exported { () throws(PatchbayError) -> CInt in
        let broker = try object(broker, as: Broker.self, "broker")
        return try broker.claim(try Key(parsing: try string(key, "the key"))).release().rawValue
    }
}

// MARK: Shared memory

/// Whether a name argument is `PB_SHM_ANON`, FreeBSD's `SHM_ANON`: the pointer 1.
private func isAnonymous(_ name: UnsafePointer<CChar>?) -> Bool {
    name.map { UInt(bitPattern: $0) == 1 } ?? false
}

/// A shared memory name from C. NULL (and `PB_SHM_ANON` where no anonymous object is meant) is
/// `EFAULT`, as FreeBSD's calls answer a name they cannot read.
private func sharedMemoryName(_ pointer: UnsafePointer<CChar>?, _ what: String) throws(PatchbayError) -> String {
    guard let pointer, !isAnonymous(pointer) else {
        throw PatchbayError(.badAddress, "\(what) is \(pointer == nil ? "NULL" : "PB_SHM_ANON, which names no object here")")
    }
    // As FreeBSD's copy-in of a path (`shm_copyin_path`): unreadable memory is EFAULT, no NUL
    // within the longest name and its NUL (1024 bytes) ENAMETOOLONG, whatever follows, and then a
    // name without its leading slash EINVAL, each name in turn (rename's `from` before its `to`).
    switch pb__probe_string(pointer, 1024) {
    case -EFAULT: throw PatchbayError(.badAddress, "\(what) points at memory this process cannot read")
    case -ENAMETOOLONG: throw PatchbayError(.fileNameTooLong, "\(what) is longer than 1023 bytes")
    default: break
    }
    let text = try decoded(pointer, what)
    guard text.utf8.first == UInt8(ascii: "/") else {
        throw PatchbayError(.invalidArgument, "\(what), \"\(text)\", does not start with /")
    }
    return text
}

@_cdecl("pb_shm_open")
public func pb_shm_open(_ broker: OpaquePointer?, _ name: UnsafePointer<CChar>?, _ oflag: CInt, _ mode: mode_t) -> CInt {
    exported { () throws(PatchbayError) -> CInt in
        // FreeBSD's order: the access mode and the flags, then the name.
        let access: SharedMemoryAccess
        switch oflag & O_ACCMODE {
        case O_RDONLY: access = .readOnly
        case O_RDWR: access = .readWrite
        default: throw PatchbayError(.invalidArgument, "write-only access is not allowed; open read-only or read-write")
        }
        let known = O_ACCMODE | O_CREAT | O_EXCL | O_TRUNC | O_CLOEXEC
        guard oflag & ~known == 0 else {
            throw PatchbayError(.invalidArgument, "flags other than O_CREAT, O_EXCL, O_TRUNC (and O_CLOEXEC) are not shm_open's")
        }
        if isAnonymous(name) {
            // SHM_ANON: a new anonymous object, made here (no broker needed); the other flags
            // and the mode do not apply.
            guard access == .readWrite else {
                throw PatchbayError(.invalidArgument, "an anonymous object (PB_SHM_ANON) is opened O_RDWR: read-only, nothing could ever write it")
            }
            return try SharedMemory.anonymous(sealable: false).releaseDescriptor()
        }
        let broker = try object(broker, as: Broker.self, "broker")
        let name = try sharedMemoryName(name, "the name")
        var options: SharedMemoryOpenOptions = []
        if oflag & O_CREAT != 0 { options.insert(.create) }
        if oflag & O_EXCL != 0 { options.insert(.exclusive) }
        if oflag & O_TRUNC != 0 { options.insert(.truncate) }
        let memory = try broker.openSharedMemory(name, access: access, options: options, mode: UInt32(mode))
        return memory.releaseDescriptor()
    }
}

@_cdecl("pb_shm_unlink")
public func pb_shm_unlink(_ broker: OpaquePointer?, _ name: UnsafePointer<CChar>?) -> CInt {
    exported { () throws(PatchbayError) -> CInt in
        let broker = try object(broker, as: Broker.self, "broker")
        try broker.unlinkSharedMemory(try sharedMemoryName(name, "the name"))
        return 0
    }
}

@_cdecl("pb_shm_rename")
public func pb_shm_rename(_ broker: OpaquePointer?, _ from: UnsafePointer<CChar>?, _ to: UnsafePointer<CChar>?, _ flags: CInt) -> CInt {
    exported { () throws(PatchbayError) -> CInt in
        // FreeBSD's order: the flags, an anonymous name, then the names themselves.
        let behaviour: SharedMemoryRename
        switch flags {
        case 0: behaviour = .replace
        case PB_SHM_RENAME_NOREPLACE: behaviour = .noReplace
        case PB_SHM_RENAME_EXCHANGE: behaviour = .exchange
        case PB_SHM_RENAME_NOREPLACE | PB_SHM_RENAME_EXCHANGE:
            throw PatchbayError(.invalidArgument, "PB_SHM_RENAME_NOREPLACE and PB_SHM_RENAME_EXCHANGE exclude each other")
        default: throw PatchbayError(.invalidArgument, "unknown rename flags \(flags)")
        }
        guard !isAnonymous(from), !isAnonymous(to) else {
            throw PatchbayError(.invalidArgument, "an anonymous object (PB_SHM_ANON) has no name to rename from or to")
        }
        let broker = try object(broker, as: Broker.self, "broker")
        try broker.renameSharedMemory(from: try sharedMemoryName(from, "from"), to: try sharedMemoryName(to, "to"), behaviour)
        return 0
    }
}

@_cdecl("pb_shm_anonymous")
public func pb_shm_anonymous(_ flags: CUnsignedInt) -> CInt {
    exported { () throws(PatchbayError) -> CInt in
        guard flags & ~CUnsignedInt(PB_SHM_SEALABLE) == 0 else {
            throw PatchbayError(.invalidArgument, "unknown flags \(flags): only PB_SHM_SEALABLE")
        }
        return try SharedMemory.anonymous(sealable: flags & CUnsignedInt(PB_SHM_SEALABLE) != 0).releaseDescriptor()
    }
}

@_cdecl("pb_shm_map")
public func pb_shm_map(_ fd: CInt, _ length: Int, _ prot: CInt, _ address: UnsafeMutablePointer<UnsafeMutableRawPointer?>?) -> CInt {
    exported { () throws(PatchbayError) -> CInt in
        guard let address else { throw PatchbayError(.invalidArgument, "the address pointer is NULL") }
        let writable: Bool
        switch prot {
        case PROT_READ: writable = false
        case PROT_READ | PROT_WRITE: writable = true
        default: throw PatchbayError(.invalidArgument, "prot must be PROT_READ or PROT_READ | PROT_WRITE")
        }
        guard length > 0 else { throw PatchbayError(.invalidArgument, "a mapping needs a positive length") }
        let memory = try SharedMemory(borrowingRawDescriptor: fd)
        address.pointee = try memory.map(length: length, offset: 0, writable: writable).release()
        return 0
    }
}
