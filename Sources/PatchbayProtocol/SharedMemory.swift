// Named shared memory with FreeBSD's semantics: `shm_open`, `shm_unlink`, `shm_rename`, plus
// stat and a paged listing. Names are bytes (UTF-8 by the broker's rule), at most 1023 of them.

/// Flags of `shm_open` (`O_CREAT`, `O_EXCL`, `O_TRUNC`).
public struct SharedMemoryOpenFlags: OptionSet, Sendable, Hashable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }

    public static let create = SharedMemoryOpenFlags(rawValue: 1)
    public static let exclusive = SharedMemoryOpenFlags(rawValue: 2)
    public static let truncate = SharedMemoryOpenFlags(rawValue: 4)
    /// Every flag that exists; any other bit is `EINVAL`.
    public static let known: SharedMemoryOpenFlags = [.create, .exclusive, .truncate]
}

/// Flags of `shm_rename` (`SHM_RENAME_NOREPLACE`, `SHM_RENAME_EXCHANGE`).
public struct SharedMemoryRenameFlags: OptionSet, Sendable, Hashable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }

    public static let noReplace = SharedMemoryRenameFlags(rawValue: 1)
    public static let exchange = SharedMemoryRenameFlags(rawValue: 2)
    public static let known: SharedMemoryRenameFlags = [.noReplace, .exchange]
}

/// `shm_open` as a request. `access`: 0 read-only, 1 read-write (2, write-only, is `EINVAL`).
public struct SharedMemoryOpenRequest: Sendable, Equatable {
    public var name: [UInt8]
    public var access: UInt8
    public var flags: SharedMemoryOpenFlags
    public var mode: UInt32
    /// The caller's umask, applied to `mode` when the object is created.
    public var umask: UInt32

    public init(name: [UInt8], access: UInt8, flags: SharedMemoryOpenFlags, mode: UInt32, umask: UInt32) {
        self.name = name
        self.access = access
        self.flags = flags
        self.mode = mode
        self.umask = umask
    }
}

/// A named shared memory object as `stat` and `ls` show it. Times are nanoseconds since the epoch.
public struct SharedMemoryInfo: Sendable, Equatable {
    public var name: [UInt8]
    public var size: UInt64
    public var uid: UInt32
    public var gid: UInt32
    /// Permission bits (0o777 at most).
    public var mode: UInt32
    public var accessTime: Int64
    public var modifyTime: Int64
    public var changeTime: Int64
    public var birthTime: Int64
    /// 512-byte blocks actually populated.
    public var blocks: UInt64

    public init(name: [UInt8], size: UInt64, uid: UInt32, gid: UInt32, mode: UInt32, accessTime: Int64,
                modifyTime: Int64, changeTime: Int64, birthTime: Int64, blocks: UInt64) {
        self.name = name
        self.size = size
        self.uid = uid
        self.gid = gid
        self.mode = mode
        self.accessTime = accessTime
        self.modifyTime = modifyTime
        self.changeTime = changeTime
        self.birthTime = birthTime
        self.blocks = blocks
    }

    /// The name as text (names are UTF-8; the broker refuses others).
    public var nameText: String { String(decoding: name, as: UTF8.self) }

    static let minimumEncodedSize = 2 + 8 + 4 + 4 + 4 + 8 * 4 + 8

    func encode(into writer: inout WireWriter) {
        writer.bytes(name)
        writer.u64(size)
        writer.u32(uid)
        writer.u32(gid)
        writer.u32(mode)
        writer.i64(accessTime)
        writer.i64(modifyTime)
        writer.i64(changeTime)
        writer.i64(birthTime)
        writer.u64(blocks)
    }

    static func decode(_ reader: inout WireReader) throws(DecodeError) -> SharedMemoryInfo {
        SharedMemoryInfo(
            name: try reader.bytes("name"), size: try reader.u64("size"), uid: try reader.u32("uid"),
            gid: try reader.u32("gid"), mode: try reader.u32("mode"), accessTime: try reader.i64("access time"),
            modifyTime: try reader.i64("modify time"), changeTime: try reader.i64("change time"),
            birthTime: try reader.i64("birth time"), blocks: try reader.u64("blocks"))
    }
}

extension Request {
    public enum SharedMemory: Sendable, Equatable {
        case open(SharedMemoryOpenRequest)
        case unlink(name: [UInt8])
        case rename(from: [UInt8], to: [UInt8], flags: SharedMemoryRenameFlags)
        case stat(name: [UInt8])
        /// Lists names sorted bytewise, starting after `after` (empty: from the start).
        case list(after: [UInt8])
        /// The namespace's change counter: a page the broker bumps on every change of what a name
        /// refers to (create, unlink, rename), for clients that reopen objects by themselves.
        case watch

        public var opcode: Opcode {
            switch self {
            case .open: .sharedMemoryOpen
            case .unlink: .sharedMemoryUnlink
            case .rename: .sharedMemoryRename
            case .stat: .sharedMemoryStat
            case .list: .sharedMemoryList
            case .watch: .sharedMemoryWatch
            }
        }

        func encodePayload(into writer: inout WireWriter) {
            switch self {
            case .open(let request):
                writer.bytes(request.name)
                writer.u8(request.access)
                writer.u32(request.flags.rawValue)
                writer.u32(request.mode)
                writer.u32(request.umask)
            case .unlink(let name), .stat(let name):
                writer.bytes(name)
            case .rename(let from, let to, let flags):
                writer.bytes(from)
                writer.bytes(to)
                writer.u32(flags.rawValue)
            case .list(let after):
                writer.bytes(after)
            case .watch:
                break
            }
        }

        static func decode(_ opcode: Opcode, _ reader: inout WireReader) throws(DecodeError) -> Self {
            switch opcode {
            case .sharedMemoryOpen:
                return .open(SharedMemoryOpenRequest(
                    name: try reader.bytes("name"), access: try reader.u8("access"),
                    flags: SharedMemoryOpenFlags(rawValue: try reader.u32("flags")),
                    mode: try reader.u32("mode"), umask: try reader.u32("umask")))
            case .sharedMemoryUnlink:
                return .unlink(name: try reader.bytes("name"))
            case .sharedMemoryRename:
                return .rename(from: try reader.bytes("from"), to: try reader.bytes("to"),
                               flags: SharedMemoryRenameFlags(rawValue: try reader.u32("flags")))
            case .sharedMemoryStat:
                return .stat(name: try reader.bytes("name"))
            case .sharedMemoryList:
                return .list(after: try reader.bytes("after"))
            case .sharedMemoryWatch:
                return .watch
            default:
                throw .wrongFrame(opcode, "shared memory request")
            }
        }
    }
}

extension Reply {
    public enum SharedMemory: Sendable, Equatable {
        /// The handle rides beside the frame; the payload describes the object.
        case open(SharedMemoryInfo)
        case unlink
        case rename
        case stat(SharedMemoryInfo)
        /// One page of a listing; `more` means ask again after the last name.
        case list([SharedMemoryInfo], more: Bool)
        /// The change counter's page rides beside the frame (a sealed memfd: a u64 at offset 0).
        case watch

        public var opcode: Opcode {
            switch self {
            case .open: .sharedMemoryOpen
            case .unlink: .sharedMemoryUnlink
            case .rename: .sharedMemoryRename
            case .stat: .sharedMemoryStat
            case .list: .sharedMemoryList
            case .watch: .sharedMemoryWatch
            }
        }

        func encodePayload(into writer: inout WireWriter) {
            switch self {
            case .open(let info), .stat(let info): info.encode(into: &writer)
            case .unlink, .rename, .watch: break
            case .list(let infos, let more):
                writer.u8(more ? 1 : 0)
                writer.u32(UInt32(infos.count))
                for info in infos { info.encode(into: &writer) }
            }
        }

        static func decode(_ opcode: Opcode, _ reader: inout WireReader) throws(DecodeError) -> Self {
            switch opcode {
            case .sharedMemoryOpen: return .open(try SharedMemoryInfo.decode(&reader))
            case .sharedMemoryUnlink: return .unlink
            case .sharedMemoryRename: return .rename
            case .sharedMemoryWatch: return .watch
            case .sharedMemoryStat: return .stat(try SharedMemoryInfo.decode(&reader))
            case .sharedMemoryList:
                let more = try reader.u8("more")
                guard more <= 1 else { throw .invalidValue(field: "more", reason: "must be 0 or 1") }
                var infos: [SharedMemoryInfo] = []
                for _ in 0..<(try reader.count("objects", minimumElementSize: SharedMemoryInfo.minimumEncodedSize)) {
                    infos.append(try SharedMemoryInfo.decode(&reader))
                }
                return .list(infos, more: more == 1)
            default:
                throw .wrongFrame(opcode, "shared memory reply")
            }
        }
    }
}
