import Glibc

/// How long a shared key stays claimable.
public enum KeyExpiry: Sendable, Equatable {
    case never
    case after(nanoseconds: UInt64)
}

/// Who may claim a key; anyone else gets `ENOENT`, as if the key did not exist.
public enum ClaimRestriction: Sendable, Equatable {
    case uid(UInt32)
    case gid(UInt32)
    case pid(Int32)
}

/// Every request a client can send. Descriptors travel beside the frame, not in it.
public enum Request: Sendable, Equatable {
    case status
    case share(expiry: KeyExpiry, restriction: ClaimRestriction?)
    case claim(KeyToken)
    /// `received: false` means the descriptor was lost on the way in (the claimer had no free
    /// descriptor slot), so the broker restores the key.
    case claimAcknowledge(KeyToken, received: Bool)
    /// Opens a path of the broker's namespace; `flags`: `OpenFlags`.
    case open(path: String, flags: UInt32)
    case netControl(socket: UInt64, command: String)
    case netList
    case netPath(name: String)
    case capsService(name: String, uid: Int32, gid: Int32, flags: UInt32, maximumInFlight: UInt32)
    case capsClient(name: String, uid: Int32, gid: Int32, flags: UInt32)
    case capsSetGeneration(UInt64)
    case capsList
    case sharedMemoryOpen(SharedMemoryOpenRequest)
    case sharedMemoryUnlink(name: [UInt8])
    case sharedMemoryRename(from: [UInt8], to: [UInt8], flags: UInt32)
    case sharedMemoryStat(name: [UInt8])
    /// Lists names sorted bytewise, starting after `after` (empty: from the start).
    case sharedMemoryList(after: [UInt8])

    public var opcode: Opcode {
        switch self {
        case .status: .status
        case .share: .share
        case .claim: .claim
        case .claimAcknowledge: .claimAcknowledge
        case .open: .open
        case .sharedMemoryOpen: .sharedMemoryOpen
        case .sharedMemoryUnlink: .sharedMemoryUnlink
        case .sharedMemoryRename: .sharedMemoryRename
        case .sharedMemoryStat: .sharedMemoryStat
        case .sharedMemoryList: .sharedMemoryList
        case .netControl: .netControl
        case .netList: .netList
        case .netPath: .netPath
        case .capsService: .capsService
        case .capsClient: .capsClient
        case .capsSetGeneration: .capsSetGeneration
        case .capsList: .capsList
        }
    }

    public func encode(requestID: UInt64) -> [UInt8] {
        var writer = Frame.header(kind: .request, opcode: opcode, requestID: requestID)
        switch self {
        case .status:
            break
        case .share(let expiry, let restriction):
            switch expiry {
            case .never:
                writer.u8(0)
                writer.u64(0)
            case .after(let nanoseconds):
                writer.u8(1)
                writer.u64(nanoseconds)
            }
            switch restriction {
            case nil:
                writer.u8(0)
                writer.u32(0)
            case .uid(let uid)?:
                writer.u8(1)
                writer.u32(uid)
            case .gid(let gid)?:
                writer.u8(2)
                writer.u32(gid)
            case .pid(let pid)?:
                writer.u8(3)
                writer.u32(UInt32(bitPattern: pid))
            }
        case .claim(let token):
            writer.raw(token.bytes)
        case .claimAcknowledge(let token, let received):
            writer.raw(token.bytes)
            writer.u8(received ? 1 : 0)
        case .open(let path, let flags):
            writer.string(path)
            writer.u32(flags)
        case .sharedMemoryOpen(let request):
            writer.bytes(request.name)
            writer.u8(request.access)
            writer.u32(request.flags)
            writer.u32(request.mode)
            writer.u32(request.umask)
        case .sharedMemoryUnlink(let name), .sharedMemoryStat(let name):
            writer.bytes(name)
        case .sharedMemoryRename(let from, let to, let flags):
            writer.bytes(from)
            writer.bytes(to)
            writer.u32(flags)
        case .sharedMemoryList(let after):
            writer.bytes(after)
        case .netControl(let socket, let command):
            writer.u64(socket)
            writer.string(command)
        case .netList:
            break
        case .netPath(let name):
            writer.string(name)
        case .capsService(let name, let uid, let gid, let flags, let maximumInFlight):
            writer.string(name)
            writer.i32(uid)
            writer.i32(gid)
            writer.u32(flags)
            writer.u32(maximumInFlight)
        case .capsClient(let name, let uid, let gid, let flags):
            writer.string(name)
            writer.i32(uid)
            writer.i32(gid)
            writer.u32(flags)
        case .capsSetGeneration(let generation):
            writer.u64(generation)
        case .capsList:
            break
        }
        return writer.bytes
    }

    /// Decodes a request frame's payload. Total on hostile input.
    public static func decode(_ frame: Frame) throws(DecodeError) -> Request {
        guard frame.kind == .request else {
            throw .invalidValue(field: "kind", reason: "a client may only send requests")
        }
        var reader = WireReader(frame.payload)
        let request: Request
        switch frame.opcode {
        case .connection:
            throw .invalidValue(field: "opcode", reason: "opcode 0 is not a request")
        case .status:
            request = .status
        case .share:
            let expiryKind = try reader.u8("expiry kind")
            let nanoseconds = try reader.u64("timeout")
            let expiry: KeyExpiry
            switch expiryKind {
            case 0: expiry = .never
            case 1: expiry = .after(nanoseconds: nanoseconds)
            default: throw .invalidValue(field: "expiry kind", reason: "\(expiryKind) is neither 0 (never) nor 1 (after)")
            }
            let restrictionKind = try reader.u8("restriction kind")
            let value = try reader.u32("restriction value")
            let restriction: ClaimRestriction?
            switch restrictionKind {
            case 0: restriction = nil
            case 1: restriction = .uid(value)
            case 2: restriction = .gid(value)
            case 3: restriction = .pid(Int32(bitPattern: value))
            default: throw .invalidValue(field: "restriction kind", reason: "\(restrictionKind) is not 0-3")
            }
            request = .share(expiry: expiry, restriction: restriction)
        case .claim:
            request = .claim(try token(&reader))
        case .claimAcknowledge:
            let token = try token(&reader)
            let received = try reader.u8("received")
            guard received <= 1 else { throw .invalidValue(field: "received", reason: "must be 0 or 1") }
            request = .claimAcknowledge(token, received: received == 1)
        case .open:
            request = .open(path: try reader.string("path"), flags: try reader.u32("flags"))
        case .sharedMemoryOpen:
            request = .sharedMemoryOpen(SharedMemoryOpenRequest(
                name: try reader.bytes("name"), access: try reader.u8("access"), flags: try reader.u32("flags"),
                mode: try reader.u32("mode"), umask: try reader.u32("umask")))
        case .sharedMemoryUnlink:
            request = .sharedMemoryUnlink(name: try reader.bytes("name"))
        case .sharedMemoryRename:
            request = .sharedMemoryRename(from: try reader.bytes("from"), to: try reader.bytes("to"),
                                          flags: try reader.u32("flags"))
        case .sharedMemoryStat:
            request = .sharedMemoryStat(name: try reader.bytes("name"))
        case .sharedMemoryList:
            request = .sharedMemoryList(after: try reader.bytes("after"))
        case .netControl:
            request = .netControl(socket: try reader.u64("socket"), command: try reader.string("command"))
        case .netList:
            request = .netList
        case .netPath:
            request = .netPath(name: try reader.string("name"))
        case .capsService:
            request = .capsService(name: try reader.string("name"), uid: try reader.i32("uid"), gid: try reader.i32("gid"),
                                   flags: try reader.u32("flags"), maximumInFlight: try reader.u32("maximum in flight"))
        case .capsClient:
            request = .capsClient(name: try reader.string("name"), uid: try reader.i32("uid"), gid: try reader.i32("gid"),
                                  flags: try reader.u32("flags"))
        case .capsSetGeneration:
            request = .capsSetGeneration(try reader.u64("generation"))
        case .capsList:
            request = .capsList
        case .capsConnected, .capsDisconnected:
            throw .invalidValue(field: "opcode", reason: "\(frame.opcode) is an event, not a request")
        }
        try reader.finish()
        return request
    }

    private static func token(_ reader: inout WireReader) throws(DecodeError) -> KeyToken {
        // 16 bytes always make a token.
        KeyToken(bytes: try reader.raw("key", count: 16))!
    }
}

/// Every successful reply the broker sends.
public enum Reply: Sendable, Equatable {
    case status(StatusReport)
    case share(KeyToken)
    /// The claimed descriptor rides beside the frame; the payload says what kind of file it is.
    case claim(fileKind: UInt8)
    /// The opened object's descriptors ride beside the frame (how many: `OpenedObjectKind`);
    /// `id` names the socket for socket objects, 0 otherwise.
    case open(objectKind: UInt8, id: UInt64)
    case netControl
    case netList([NetSocketInfo])
    case netPath(String)
    /// The notices page rides beside the frame; `generation` is where the service's generation
    /// starts (one past the last of its name), which the service writes to its status page.
    case capsService(serviceID: UInt64, generation: UInt64)
    /// The channel, the status page (read-only), the service's and the client's wake eventfds and
    /// the client's end of the direct socket ride beside the frame.
    case capsClient(channelID: UInt64, serviceID: UInt64, maximumInFlight: UInt32, arenaSize: UInt32)
    case capsSetGeneration
    case capsList([CapsServiceInfo])
    /// The handle rides beside the frame; the payload describes the object.
    case sharedMemoryOpen(SharedMemoryInfo)
    case sharedMemoryUnlink
    case sharedMemoryRename
    case sharedMemoryStat(SharedMemoryInfo)
    /// One page of a listing; `more` means ask again after the last name.
    case sharedMemoryList([SharedMemoryInfo], more: Bool)

    public var opcode: Opcode {
        switch self {
        case .status: .status
        case .share: .share
        case .claim: .claim
        case .open: .open
        case .sharedMemoryOpen: .sharedMemoryOpen
        case .sharedMemoryUnlink: .sharedMemoryUnlink
        case .sharedMemoryRename: .sharedMemoryRename
        case .sharedMemoryStat: .sharedMemoryStat
        case .sharedMemoryList: .sharedMemoryList
        case .netControl: .netControl
        case .netList: .netList
        case .netPath: .netPath
        case .capsService: .capsService
        case .capsClient: .capsClient
        case .capsSetGeneration: .capsSetGeneration
        case .capsList: .capsList
        }
    }

    public func encode(requestID: UInt64) -> [UInt8] {
        var writer = Frame.header(kind: .reply, opcode: opcode, requestID: requestID)
        switch self {
        case .status(let report): report.encode(into: &writer)
        case .share(let token): writer.raw(token.bytes)
        case .claim(let kind): writer.u8(kind)
        case .open(let kind, let id):
            writer.u8(kind)
            writer.u64(id)
        case .netControl: break
        case .netList(let sockets):
            writer.u32(UInt32(sockets.count))
            for socket in sockets { socket.encode(into: &writer) }
        case .netPath(let path): writer.string(path)
        case .capsService(let serviceID, let generation):
            writer.u64(serviceID)
            writer.u64(generation)
        case .capsClient(let channelID, let serviceID, let maximumInFlight, let arenaSize):
            writer.u64(channelID)
            writer.u64(serviceID)
            writer.u32(maximumInFlight)
            writer.u32(arenaSize)
        case .capsSetGeneration: break
        case .capsList(let services):
            writer.u32(UInt32(services.count))
            for service in services { service.encode(into: &writer) }
        case .sharedMemoryOpen(let info), .sharedMemoryStat(let info): info.encode(into: &writer)
        case .sharedMemoryUnlink, .sharedMemoryRename: break
        case .sharedMemoryList(let infos, let more):
            writer.u8(more ? 1 : 0)
            writer.u32(UInt32(infos.count))
            for info in infos { info.encode(into: &writer) }
        }
        return writer.bytes
    }

    public static func decode(_ frame: Frame) throws(DecodeError) -> Reply {
        guard frame.kind == .reply else {
            throw .invalidValue(field: "kind", reason: "expected a reply")
        }
        var reader = WireReader(frame.payload)
        let reply: Reply
        switch frame.opcode {
        case .status:
            reply = .status(try StatusReport.decode(&reader))
        case .share:
            reply = .share(KeyToken(bytes: try reader.raw("key", count: 16))!)
        case .claim:
            reply = .claim(fileKind: try reader.u8("file kind"))
        case .open:
            reply = .open(objectKind: try reader.u8("object kind"), id: try reader.u64("id"))
        case .netControl:
            reply = .netControl
        case .netList:
            var sockets: [NetSocketInfo] = []
            for _ in 0..<(try reader.count("sockets", minimumElementSize: NetSocketInfo.minimumEncodedSize)) {
                sockets.append(try NetSocketInfo.decode(&reader))
            }
            reply = .netList(sockets)
        case .netPath:
            reply = .netPath(try reader.string("path"))
        case .capsService:
            reply = .capsService(serviceID: try reader.u64("service id"), generation: try reader.u64("generation"))
        case .capsClient:
            reply = .capsClient(channelID: try reader.u64("channel id"), serviceID: try reader.u64("service id"),
                                maximumInFlight: try reader.u32("maximum in flight"), arenaSize: try reader.u32("arena size"))
        case .capsSetGeneration:
            reply = .capsSetGeneration
        case .capsList:
            var services: [CapsServiceInfo] = []
            for _ in 0..<(try reader.count("services", minimumElementSize: CapsServiceInfo.minimumEncodedSize)) {
                services.append(try CapsServiceInfo.decode(&reader))
            }
            reply = .capsList(services)
        case .capsConnected, .capsDisconnected:
            throw .invalidValue(field: "opcode", reason: "\(frame.opcode) is an event, not a reply")
        case .sharedMemoryOpen:
            reply = .sharedMemoryOpen(try SharedMemoryInfo.decode(&reader))
        case .sharedMemoryUnlink:
            reply = .sharedMemoryUnlink
        case .sharedMemoryRename:
            reply = .sharedMemoryRename
        case .sharedMemoryStat:
            reply = .sharedMemoryStat(try SharedMemoryInfo.decode(&reader))
        case .sharedMemoryList:
            let more = try reader.u8("more")
            guard more <= 1 else { throw .invalidValue(field: "more", reason: "must be 0 or 1") }
            var infos: [SharedMemoryInfo] = []
            for _ in 0..<(try reader.count("objects", minimumElementSize: SharedMemoryInfo.minimumEncodedSize)) {
                infos.append(try SharedMemoryInfo.decode(&reader))
            }
            reply = .sharedMemoryList(infos, more: more == 1)
        case .claimAcknowledge, .connection:
            throw .invalidValue(field: "opcode", reason: "\(frame.opcode) has no reply")
        }
        try reader.finish()
        return reply
    }
}

/// A failed request: the errno (Linux numbering) and a sentence for a person.
public struct ErrorReply: Sendable, Equatable, Error {
    public var errno: Int32
    public var reason: String

    public init(errno: Int32, reason: String) {
        self.errno = errno
        self.reason = reason
    }

    public func encode(rawOpcode: UInt16, requestID: UInt64) -> [UInt8] {
        var writer = Frame.header(kind: .error, rawOpcode: rawOpcode, requestID: requestID)
        writer.i32(errno)
        writer.string(reason)
        return writer.bytes
    }

    public static func decode(_ frame: Frame) throws(DecodeError) -> ErrorReply {
        guard frame.kind == .error else { throw .invalidValue(field: "kind", reason: "expected an error reply") }
        var reader = WireReader(frame.payload)
        let number = try reader.i32("errno")
        guard number > 0 && number < 4096 else {
            throw .invalidValue(field: "errno", reason: "\(number) is not an errno value")
        }
        let reason = try reader.string("reason")
        try reader.finish()
        return ErrorReply(errno: number, reason: reason)
    }

    /// The error for a frame that did not decode.
    public init(_ error: DecodeError) {
        switch error {
        case .unsupportedVersion: self.init(errno: EPROTONOSUPPORT, reason: error.reason)
        case .unknownOpcode: self.init(errno: EOPNOTSUPP, reason: error.reason)
        case .oversized: self.init(errno: EMSGSIZE, reason: error.reason)
        default: self.init(errno: EPROTO, reason: error.reason)
        }
    }
}

/// One uid's share of the broker's objects.
public struct UserUsage: Sendable, Equatable {
    public var uid: UInt32
    public var clients: UInt32
    public var keys: UInt32
    public var sharedMemoryObjects: UInt32
    public var sockets: UInt32
    public var services: UInt32
    /// Age of this uid's oldest outstanding key, 0 with none.
    public var oldestKeyAgeNanoseconds: UInt64

    public init(uid: UInt32, clients: UInt32 = 0, keys: UInt32 = 0, sharedMemoryObjects: UInt32 = 0,
                sockets: UInt32 = 0, services: UInt32 = 0, oldestKeyAgeNanoseconds: UInt64 = 0) {
        self.uid = uid
        self.clients = clients
        self.keys = keys
        self.sharedMemoryObjects = sharedMemoryObjects
        self.sockets = sockets
        self.services = services
        self.oldestKeyAgeNanoseconds = oldestKeyAgeNanoseconds
    }

    static let encodedSize = 32
}

/// What `patchbay status` shows. Keys are secret, so only counts, ages and file kinds appear.
public struct StatusReport: Sendable, Equatable {
    public var pid: Int32
    public var version: String
    /// `"user"` or `"system"`.
    public var mode: String
    public var socketPath: String
    public var uptimeNanoseconds: UInt64
    public var clients: UInt32
    /// Outstanding keys by the kind of file they hold (`FileKind` raw values).
    public var keysByFileKind: [UInt8: UInt32]
    /// Per-uid usage, at most `maximumUsers` rows (the busiest first when there are more).
    public var users: [UserUsage]

    /// The most per-uid rows a report carries, which keeps it well inside one frame.
    public static let maximumUsers = 1024

    public init(pid: Int32, version: String, mode: String, socketPath: String, uptimeNanoseconds: UInt64,
                clients: UInt32, keysByFileKind: [UInt8: UInt32], users: [UserUsage]) {
        self.pid = pid
        self.version = version
        self.mode = mode
        self.socketPath = socketPath
        self.uptimeNanoseconds = uptimeNanoseconds
        self.clients = clients
        self.keysByFileKind = keysByFileKind
        self.users = users
    }

    public var keys: UInt32 { users.reduce(0) { $0 + $1.keys } }
    public var sharedMemoryObjects: UInt32 { users.reduce(0) { $0 + $1.sharedMemoryObjects } }
    public var sockets: UInt32 { users.reduce(0) { $0 + $1.sockets } }
    public var services: UInt32 { users.reduce(0) { $0 + $1.services } }

    func encode(into writer: inout WireWriter) {
        writer.i32(pid)
        writer.string(String(version.prefix(256)))
        writer.string(String(mode.prefix(16)))
        writer.string(String(socketPath.prefix(4096)))
        writer.u64(uptimeNanoseconds)
        writer.u32(clients)
        let kinds = keysByFileKind.sorted { $0.key < $1.key }
        writer.u32(UInt32(kinds.count))
        for (kind, count) in kinds {
            writer.u8(kind)
            writer.u32(count)
        }
        let rows = users.prefix(Self.maximumUsers)
        writer.u32(UInt32(rows.count))
        for row in rows {
            writer.u32(row.uid)
            writer.u32(row.clients)
            writer.u32(row.keys)
            writer.u32(row.sharedMemoryObjects)
            writer.u32(row.sockets)
            writer.u32(row.services)
            writer.u64(row.oldestKeyAgeNanoseconds)
        }
    }

    static func decode(_ reader: inout WireReader) throws(DecodeError) -> StatusReport {
        let pid = try reader.i32("pid")
        let version = try reader.string("version")
        let mode = try reader.string("mode")
        let socketPath = try reader.string("socket path")
        let uptime = try reader.u64("uptime")
        let clients = try reader.u32("clients")
        var kinds: [UInt8: UInt32] = [:]
        for _ in 0..<(try reader.count("file kinds", minimumElementSize: 5)) {
            let kind = try reader.u8("file kind")
            kinds[kind] = try reader.u32("file kind count")
        }
        var users: [UserUsage] = []
        for _ in 0..<(try reader.count("users", minimumElementSize: UserUsage.encodedSize)) {
            users.append(UserUsage(
                uid: try reader.u32("uid"), clients: try reader.u32("clients"), keys: try reader.u32("keys"),
                sharedMemoryObjects: try reader.u32("shared memory objects"), sockets: try reader.u32("sockets"),
                services: try reader.u32("services"), oldestKeyAgeNanoseconds: try reader.u64("oldest key age")))
        }
        return StatusReport(pid: pid, version: version, mode: mode, socketPath: socketPath,
                            uptimeNanoseconds: uptime, clients: clients, keysByFileKind: kinds, users: users)
    }
}

/// The version string of this build.
public let patchbayVersion = "0.1.0"

/// `shm_open` as a request. `access`: 0 read-only, 1 read-write (2, write-only, is `EINVAL`).
public struct SharedMemoryOpenRequest: Sendable, Equatable {
    public static let create: UInt32 = 1
    public static let exclusive: UInt32 = 2
    public static let truncate: UInt32 = 4
    public static let knownFlags: UInt32 = create | exclusive | truncate

    public var name: [UInt8]
    public var access: UInt8
    public var flags: UInt32
    public var mode: UInt32
    /// The caller's umask, applied to `mode` when the object is created.
    public var umask: UInt32

    public init(name: [UInt8], access: UInt8, flags: UInt32, mode: UInt32, umask: UInt32) {
        self.name = name
        self.access = access
        self.flags = flags
        self.mode = mode
        self.umask = umask
    }
}

/// Rename flags (`shm_rename`).
public enum SharedMemoryRenameFlags {
    public static let noReplace: UInt32 = 1
    public static let exchange: UInt32 = 2
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

/// Flags of an `open` request.
public enum OpenFlags {
    /// `/dev/shmem/new`: the new object accepts seals.
    public static let sealable: UInt32 = 1
    /// `/net`: the open itself must not wait (`accept` with nothing pending is `EAGAIN`), and the
    /// library makes its own data calls on the handle non-blocking. Also written `path:nonblock`.
    public static let nonblock: UInt32 = 2
}

/// What an `open` returned, and how many descriptors ride with the reply.
public enum OpenedObjectKind: UInt8, Sendable {
    /// `/dev/shmem/new`: the memfd.
    case anonymousSharedMemory = 1
    /// A `/net` factory: the socket's handle (the socket lives while a copy of it is open).
    case socket = 2
    /// `/net/<family>/<id>/data`: the kernel socket.
    case socketData = 3
    /// `/net/<family>/<id>/accept`: the new connection's handle, then its kernel socket.
    case acceptedSocket = 4
    /// `/net/<family>/addrs`: a read-only memfd holding the bound names, one per line.
    case addressList = 5

    public var descriptorCount: Int { self == .acceptedSocket ? 2 : 1 }
}

/// A `/net` socket as `patchbay net ls` shows it.
public struct NetSocketInfo: Sendable, Equatable {
    public var id: UInt64
    public var family: String
    /// `seqpacket`, `stream` or `dgram`.
    public var type: String
    /// `NEW`, `BOUND`, `LISTENING`, `CONNECTING`, `CONNECTED`, `CLOSING`, `CLOSED`.
    public var state: String
    /// The bound local name, empty if none.
    public var name: String
    public var ownerPID: Int32
    public var ownerUID: UInt32
    /// Accept opens waiting for a connection on this socket.
    public var waitingAccepts: UInt32

    public init(id: UInt64, family: String, type: String, state: String, name: String, ownerPID: Int32, ownerUID: UInt32,
                waitingAccepts: UInt32 = 0) {
        self.id = id
        self.family = family
        self.type = type
        self.state = state
        self.name = name
        self.ownerPID = ownerPID
        self.ownerUID = ownerUID
        self.waitingAccepts = waitingAccepts
    }

    static let minimumEncodedSize = 8 + 2 * 4 + 2 + 4 + 4 + 4

    func encode(into writer: inout WireWriter) {
        writer.u64(id)
        writer.string(family)
        writer.string(type)
        writer.string(state)
        writer.string(name)
        writer.i32(ownerPID)
        writer.u32(ownerUID)
        writer.u32(waitingAccepts)
    }

    static func decode(_ reader: inout WireReader) throws(DecodeError) -> NetSocketInfo {
        NetSocketInfo(id: try reader.u64("id"), family: try reader.string("family"), type: try reader.string("type"),
                      state: try reader.string("state"), name: try reader.string("name"),
                      ownerPID: try reader.i32("owner pid"), ownerUID: try reader.u32("owner uid"),
                      waitingAccepts: try reader.u32("waiting accepts"))
    }
}

/// Who sent a CAPS message, as the kernel reported it when the client connected.
public struct CapsCredentials: Sendable, Equatable {
    public var pid: Int32
    /// Real uid (from /proc at connect time).
    public var uid: UInt32
    /// Effective uid (SO_PEERCRED).
    public var euid: UInt32
    public var gid: UInt32
    /// Up to 16 supplementary groups (SO_PEERGROUPS).
    public var groups: [UInt32]

    public init(pid: Int32, uid: UInt32, euid: UInt32, gid: UInt32, groups: [UInt32]) {
        self.pid = pid
        self.uid = uid
        self.euid = euid
        self.gid = gid
        self.groups = Array(groups.prefix(16))
    }

    func encode(into writer: inout WireWriter) {
        writer.i32(pid)
        writer.u32(uid)
        writer.u32(euid)
        writer.u32(gid)
        writer.u8(UInt8(groups.count))
        for group in groups { writer.u32(group) }
    }

    static func decode(_ reader: inout WireReader) throws(DecodeError) -> CapsCredentials {
        let pid = try reader.i32("pid")
        let uid = try reader.u32("uid")
        let euid = try reader.u32("euid")
        let gid = try reader.u32("gid")
        let count = Int(try reader.u8("group count"))
        guard count <= 16 else { throw .invalidValue(field: "group count", reason: "at most 16") }
        var groups: [UInt32] = []
        for _ in 0..<count { groups.append(try reader.u32("group")) }
        return CapsCredentials(pid: pid, uid: uid, euid: euid, gid: gid, groups: groups)
    }
}

/// Unsolicited frames from the broker to a service port.
public enum Event: Sendable, Equatable {
    /// A client connected: its channel, wake eventfds and direct socket ride beside the frame.
    case capsConnected(channelID: UInt64, credentials: CapsCredentials, arenaSize: UInt32)
    case capsDisconnected(channelID: UInt64)

    public var opcode: Opcode {
        switch self {
        case .capsConnected: .capsConnected
        case .capsDisconnected: .capsDisconnected
        }
    }

    public func encode() -> [UInt8] {
        var writer = Frame.header(kind: .event, opcode: opcode, requestID: 0)
        switch self {
        case .capsConnected(let channelID, let credentials, let arenaSize):
            writer.u64(channelID)
            credentials.encode(into: &writer)
            writer.u32(arenaSize)
        case .capsDisconnected(let channelID):
            writer.u64(channelID)
        }
        return writer.bytes
    }

    public static func decode(_ frame: Frame) throws(DecodeError) -> Event {
        guard frame.kind == .event else { throw .invalidValue(field: "kind", reason: "expected an event") }
        var reader = WireReader(frame.payload)
        let event: Event
        switch frame.opcode {
        case .capsConnected:
            event = .capsConnected(channelID: try reader.u64("channel id"),
                                   credentials: try CapsCredentials.decode(&reader), arenaSize: try reader.u32("arena size"))
        case .capsDisconnected:
            event = .capsDisconnected(channelID: try reader.u64("channel id"))
        default:
            throw .invalidValue(field: "opcode", reason: "\(frame.opcode) is not an event")
        }
        try reader.finish()
        return event
    }
}

/// A registered service as `patchbay caps ls` shows it.
public struct CapsServiceInfo: Sendable, Equatable {
    public var name: String
    public var uid: Int32
    public var gid: Int32
    public var flags: UInt32
    public var clients: UInt32
    public var generation: UInt64
    public var pid: Int32

    public init(name: String, uid: Int32, gid: Int32, flags: UInt32, clients: UInt32, generation: UInt64, pid: Int32) {
        self.name = name
        self.uid = uid
        self.gid = gid
        self.flags = flags
        self.clients = clients
        self.generation = generation
        self.pid = pid
    }

    static let minimumEncodedSize = 2 + 4 * 4 + 8 + 4

    func encode(into writer: inout WireWriter) {
        writer.string(name)
        writer.i32(uid)
        writer.i32(gid)
        writer.u32(flags)
        writer.u32(clients)
        writer.u64(generation)
        writer.i32(pid)
    }

    static func decode(_ reader: inout WireReader) throws(DecodeError) -> CapsServiceInfo {
        CapsServiceInfo(name: try reader.string("name"), uid: try reader.i32("uid"), gid: try reader.i32("gid"),
                        flags: try reader.u32("flags"), clients: try reader.u32("clients"),
                        generation: try reader.u64("generation"), pid: try reader.i32("pid"))
    }
}
