// Named shared memory (FreeBSD shm_open): the broker keeps the namespace.

public import PatchbayProtocol
import Glibc
import PatchbaySystem
import SystemPackage

/// A named object as `statSharedMemory` and `listSharedMemory` show it: name, size, owner, mode,
/// times (nanoseconds since the epoch) and populated blocks.
public typealias SharedMemoryInfo = PatchbayProtocol.SharedMemoryInfo

/// How `openSharedMemory` opens.
public struct SharedMemoryOpenOptions: OptionSet, Sendable {
    /// The wire's open flag bits.
    public let rawValue: UInt32
    /// Options from their wire bits.
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
        // FreeBSD's order: the access mode and the flags, then the name (the broker checks all
        // three the same way; these two are refused here so that a name too long to send does
        // not answer first).
        guard access != .writeOnly else {
            throw PatchbayError(.invalidArgument, "write-only access is not allowed; open read-only or read-write")
        }
        guard options.isSubset(of: [.create, .exclusive, .truncate]) else {
            throw PatchbayError(.invalidArgument, "unknown open flags 0x\(String(options.subtracting([.create, .exclusive, .truncate]).rawValue, radix: 16)); only create, exclusive and truncate exist")
        }
        let bytes = try Self.nameBytes(name)
        let plain = options.isEmpty
        // An object this broker opened under this name before, while no name changed since:
        // opened directly (Reopen.swift), at the cost of a local open.
        if plain, let fd = namedObjects.reopen(bytes, readWrite: access == .readWrite, broker: self) {
            return SharedMemory(descriptor: Descriptor(adopting: fd), kind: .named, isWritable: access == .readWrite)
        }
        // Read before asking: a change after this makes what the broker answers unsafe to reuse.
        let counter = plain ? namedObjects.counter(for: self) : nil
        // The umask matters only to a new object, and reading it safely (from /proc, not by
        // setting it) costs more than the round trip itself, so only a create pays for it.
        let request = SharedMemoryOpenRequest(name: bytes, access: access.rawValue, flags: SharedMemoryOpenFlags(rawValue: options.rawValue),
                                              mode: mode, umask: options.contains(.create) ? currentUmask() : 0)
        if options.contains(.create) {
            // With no free descriptor here, the broker would make the object and this process
            // could not take it: refused first, as shm_open(3) is (it needs its descriptor first).
            do {
                try checkDescriptorRoom(1)
            } catch {
                throw PatchbayError(error, "no free descriptor in this process for the object; nothing was created")
            }
        }
        var response = try call(.sharedMemory(.open(request)))
        guard case .sharedMemory(.open) = response.reply, let handle = response.takeDescriptor() else {
            throw PatchbayError(.protocolError, "the broker's open reply carried no descriptor")
        }
        if let counter { namedObjects.remember(bytes, readWrite: access == .readWrite, handle: handle.rawValue, counter: counter) }
        return SharedMemory(descriptor: Descriptor(handle), kind: .named, isWritable: access == .readWrite)
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
        // FreeBSD's order: `from` fails the name rules before `to` does (the broker checks the
        // rest of both in that order; only the lengths are checked here, and `from`'s first).
        let source = try Self.nameBytes(from)
        if Array(to.utf8).count > Self.maximumNameLength, source.first != UInt8(ascii: "/") {
            throw PatchbayError(.invalidArgument, "a shared memory name starts with '/': \(from.prefix(60))")
        }
        _ = try call(.sharedMemory(.rename(from: source, to: try Self.nameBytes(to), flags: behaviour.flags)))
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

    // MARK: Async

    /// `openSharedMemory` without blocking a Swift concurrency thread.
    public func openSharedMemory(
        _ name: String, access: SharedMemoryAccess = .readWrite, options: SharedMemoryOpenOptions = [],
        mode: UInt32 = 0o600
    ) async throws(PatchbayError) -> SharedMemory {
        try await offThePool { [self] () throws(PatchbayError) in
            try openSharedMemory(name, access: access, options: options, mode: mode)
        }
    }

    /// `unlinkSharedMemory` without blocking a Swift concurrency thread.
    public func unlinkSharedMemory(_ name: String) async throws(PatchbayError) {
        try await offThePool { [self] () throws(PatchbayError) in try unlinkSharedMemory(name) }
    }

    /// `renameSharedMemory` without blocking a Swift concurrency thread.
    public func renameSharedMemory(from: String, to: String, _ behaviour: SharedMemoryRename = .replace)
        async throws(PatchbayError)
    {
        try await offThePool { [self] () throws(PatchbayError) in try renameSharedMemory(from: from, to: to, behaviour) }
    }

    /// `statSharedMemory` without blocking a Swift concurrency thread.
    public func statSharedMemory(_ name: String) async throws(PatchbayError) -> SharedMemoryInfo {
        try await offThePool { [self] () throws(PatchbayError) in try statSharedMemory(name) }
    }

    /// `listSharedMemory` without blocking a Swift concurrency thread.
    public func listSharedMemory() async throws(PatchbayError) -> [SharedMemoryInfo] {
        try await offThePool { [self] () throws(PatchbayError) in try listSharedMemory() }
    }

    /// The longest name, in bytes (FreeBSD's `PATH_MAX - 1`); the broker says the same.
    static let maximumNameLength = 1023

    /// Name bytes, with the length check made before anything is sent (`ENAMETOOLONG`, the
    /// broker's sentence); the broker checks everything else.
    static func nameBytes(_ name: String) throws(PatchbayError) -> [UInt8] {
        let bytes = Array(name.utf8)
        guard bytes.count <= maximumNameLength else {
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
