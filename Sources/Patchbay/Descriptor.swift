// Descriptors the library hands out: owned, closed once, and spoken of in swift-system's terms.
//
// A `Descriptor` is what `claim`, `openAddressList`, `SharedMemory.descriptor`, `Socket.handle`
// and `CapsDescriptors.take()` give back. It is `~Copyable`: the value owns the descriptor, so it
// is closed exactly once, when the value ends, unless `release()` hands it over as a
// swift-system `FileDescriptor` that the caller closes. Every call on it throws `PatchbayError`.

public import SystemPackage
import Glibc
package import PatchbaySystem

/// An open file descriptor this value owns: it is closed exactly once, when the value ends.
///
/// `consuming` hands it on, `borrowing` uses it; `release()` gives it up as a swift-system
/// `FileDescriptor` that the caller must close. `fileDescriptor` lends it to swift-system APIs
/// without giving it up (valid while this value lives).
public struct Descriptor: ~Copyable {
    /// The owned descriptor, as the system layer knows it (closes on deinit).
    package let system: PatchbaySystem.Descriptor

    init(_ system: consuming PatchbaySystem.Descriptor) {
        self.system = system
    }

    /// Takes ownership of `rawValue`, which this value will close.
    public init(adopting rawValue: CInt) {
        system = PatchbaySystem.Descriptor(adopting: rawValue)
    }

    /// Takes ownership of `fileDescriptor`, which this value will close.
    public init(adopting fileDescriptor: FileDescriptor) {
        self.init(adopting: fileDescriptor.rawValue)
    }

    /// The kernel's number for the descriptor. Valid as long as this value lives.
    public var rawValue: CInt { system.rawValue }

    /// The descriptor as swift-system's `FileDescriptor`, still owned by this value: do not close
    /// it, and do not use it after this value ends.
    public var fileDescriptor: FileDescriptor { FileDescriptor(rawValue: system.rawValue) }

    /// Gives up ownership: the caller now owns (and must close) the returned descriptor.
    public consuming func release() -> FileDescriptor {
        FileDescriptor(rawValue: system.release())
    }

    /// A new descriptor for the same open file description, close-on-exec.
    /// The corresponding C call is `fcntl(F_DUPFD_CLOEXEC)`.
    public borrowing func duplicate() throws(PatchbayError) -> Descriptor {
        do { return Descriptor(try duplicateDescriptor(system.rawValue)) } catch {
            throw PatchbayError(error, "cannot duplicate descriptor \(rawValue)")
        }
    }

    /// Reads up to `buffer.count` bytes; 0 means end of file. The corresponding C call is `read`.
    public borrowing func read(into buffer: UnsafeMutableRawBufferPointer) throws(PatchbayError) -> Int {
        do { return try system.read(into: buffer) } catch { throw PatchbayError(error, Self.failure("read", error)) }
    }

    /// Writes up to `buffer.count` bytes and returns how many were written.
    /// The corresponding C call is `write`.
    public borrowing func write(_ buffer: UnsafeRawBufferPointer) throws(PatchbayError) -> Int {
        do { return try system.write(buffer) } catch { throw PatchbayError(error, Self.failure("write", error)) }
    }

    /// Writes every byte, looping over short writes.
    public borrowing func writeAll(_ bytes: some Sequence<UInt8>) throws(PatchbayError) {
        do { try system.writeAll(bytes) } catch { throw PatchbayError(error, Self.failure("write", error)) }
    }

    /// Reads until end of file, at most `limit` bytes.
    public borrowing func readToEnd(limit: Int = .max) throws(PatchbayError) -> [UInt8] {
        do { return try system.readToEnd(limit: limit) } catch { throw PatchbayError(error, Self.failure("read", error)) }
    }

    /// The file's size in bytes. The corresponding C call is `fstat`.
    public borrowing func size() throws(PatchbayError) -> Int {
        do { return try system.size() } catch { throw PatchbayError(error, "fstat failed") }
    }

    /// Size, owner, mode, times and populated blocks, from the kernel.
    /// The corresponding C call is `statx(fd, "", AT_EMPTY_PATH)`.
    public borrowing func status() throws(PatchbayError) -> FileStatus {
        do { return FileStatus(try system.status()) } catch { throw PatchbayError(error, "statx failed") }
    }

    private static func failure(_ call: String, _ error: Errno) -> String {
        switch error {
        case .badFileDescriptor: "the descriptor is not open for \(call == "read" ? "reading" : "writing")"
        case .isDirectory: "\(call) on a directory"
        case .resourceTemporarilyUnavailable: "nothing to \(call) without waiting (non-blocking)"
        case .brokenPipe: "the reading end is closed"
        default: "\(call) failed"
        }
    }
}

/// What the kernel knows of a file (`statx`), times in nanoseconds since the epoch.
public struct FileStatus: Sendable, Equatable {
    /// Size in bytes.
    public var size: Int
    /// 512-byte blocks actually allocated (populated pages, for memory files).
    public var blocks: Int
    /// Type and permission bits (`st_mode`).
    public var mode: UInt32
    /// Owner.
    public var uid: UInt32
    /// Group.
    public var gid: UInt32
    /// Hard links (0 for a memfd).
    public var linkCount: UInt32
    /// Inode number.
    public var inode: UInt64
    /// Device the inode lives on.
    public var device: UInt64
    /// Last access.
    public var accessTime: Int64
    /// Last modification of the contents.
    public var modifyTime: Int64
    /// Last change of the inode.
    public var changeTime: Int64
    /// Creation time, 0 when the file system does not record it.
    public var birthTime: Int64

    init(_ status: PatchbaySystem.FileStatus) {
        size = status.size
        blocks = status.blocks
        mode = status.mode
        uid = status.uid
        gid = status.gid
        linkCount = status.linkCount
        inode = status.inode
        device = status.device
        accessTime = status.accessTime
        modifyTime = status.modifyTime
        changeTime = status.changeTime
        birthTime = status.birthTime
    }
}
