// The broker subsystem: `status`, the broker's identity and each uid's share of its objects.

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
