// CAPS (DragonFly BSD): register a named service, connect a client to it, list services; and the
// events a service port receives when clients come and go. The channel the two then share, and
// its layout, are CapsLayout.swift.

/// Access classes and options of `service` and `client` (SEMANTICS.md §5).
public struct CapsFlags: OptionSet, Sendable, Hashable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }

    public static let user = CapsFlags(rawValue: 1)
    public static let group = CapsFlags(rawValue: 2)
    public static let world = CapsFlags(rawValue: 4)
    /// service: fail with EEXIST if a matching service is registered.
    public static let exclusive = CapsFlags(rawValue: 8)
    /// client: wait for a matching service instead of ENOENT.
    public static let waitForService = CapsFlags(rawValue: 16)
    /// service: deliver connect and disconnect notices.
    public static let notifyConnections = CapsFlags(rawValue: 32)

    public static let accessClasses: CapsFlags = [.user, .group, .world]
    /// Every flag a service registration may carry.
    public static let serviceFlags: CapsFlags = [.accessClasses, .exclusive, .notifyConnections]
    /// Every flag a client connection may carry.
    public static let clientFlags: CapsFlags = [.accessClasses, .waitForService]
}

/// CAPS names: 1 to 63 characters of `[0-9A-Za-z_.]`. Returns the errno name of the failure
/// (`EINVAL` or `ENAMETOOLONG`), nil when valid.
public func capsNameProblem(_ name: String) -> String? {
    let bytes = Array(name.utf8)
    if bytes.isEmpty { return "EINVAL" }
    let valid = bytes.allSatisfy { byte in
        (byte >= 0x30 && byte <= 0x39) || (byte >= 0x41 && byte <= 0x5A) || (byte >= 0x61 && byte <= 0x7A)
            || byte == UInt8(ascii: "_") || byte == UInt8(ascii: ".")
    }
    if !valid { return "EINVAL" }
    if bytes.count > 63 { return "ENAMETOOLONG" }
    return nil
}

/// Who sent a CAPS message, as the kernel reported it when the client connected. A plain value
/// (the groups are kept inline, not in an array's heap storage), so handing it out with every
/// message costs no reference counting.
public struct CapsCredentials: Sendable, Equatable {
    public var pid: Int32
    /// Real uid (from /proc at connect time).
    public var uid: UInt32
    /// Effective uid (SO_PEERCRED).
    public var euid: UInt32
    public var gid: UInt32
    private var groupWords: (UInt32, UInt32, UInt32, UInt32, UInt32, UInt32, UInt32, UInt32,
                             UInt32, UInt32, UInt32, UInt32, UInt32, UInt32, UInt32, UInt32) =
        (0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    private var groupCount: UInt8 = 0

    /// Up to 16 supplementary groups (SO_PEERGROUPS); more are dropped.
    public var groups: [UInt32] {
        get {
            withUnsafeBytes(of: groupWords) { Array($0.bindMemory(to: UInt32.self).prefix(Int(groupCount))) }
        }
        set {
            let kept = newValue.prefix(16)
            groupCount = UInt8(kept.count)
            withUnsafeMutableBytes(of: &groupWords) { raw in
                let words = raw.bindMemory(to: UInt32.self)
                for index in 0..<16 { words[index] = index < kept.count ? kept[kept.startIndex + index] : 0 }
            }
        }
    }

    public init(pid: Int32, uid: UInt32, euid: UInt32, gid: UInt32, groups: [UInt32]) {
        self.pid = pid
        self.uid = uid
        self.euid = euid
        self.gid = gid
        self.groups = groups
    }

    public static func == (left: CapsCredentials, right: CapsCredentials) -> Bool {
        left.pid == right.pid && left.uid == right.uid && left.euid == right.euid && left.gid == right.gid
            && left.groups == right.groups
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

/// One CAPS channel's traffic as `patchbay caps top` shows it, read by the broker from the
/// channel's ring words (PROTOCOL.md §12.4), never from its messages. The service writes
/// `requestsTaken` (its request-ring head) and `repliesPut` (its reply-ring tail); the client
/// writes `requestsPut` (its request-ring tail) and `repliesTaken` (its reply-ring head), so each
/// side can misreport only its own words. Entries, not messages: the request ring also carries
/// ABORTs, and the client's reply head is its DISPOSEs too (each REPLY it moves past).
public struct CapsChannelTraffic: Sendable, Equatable {
    public var service: String
    /// The service's registered uid (-1: none) and the uid and pid of the process that registered it.
    public var serviceUID: Int32
    public var serviceOwner: UInt32
    public var servicePID: Int32
    public var channelID: UInt64
    public var clientUID: UInt32
    public var clientPID: Int32
    public var requestsPut: UInt64
    public var requestsTaken: UInt64
    public var repliesPut: UInt64
    public var repliesTaken: UInt64

    /// Channels per reply page: each is at most about 120 bytes, so a page stays far inside a frame.
    public static let pageSize = 256

    public init(service: String, serviceUID: Int32, serviceOwner: UInt32, servicePID: Int32, channelID: UInt64,
                clientUID: UInt32, clientPID: Int32, requestsPut: UInt64, requestsTaken: UInt64, repliesPut: UInt64,
                repliesTaken: UInt64) {
        self.service = service
        self.serviceUID = serviceUID
        self.serviceOwner = serviceOwner
        self.servicePID = servicePID
        self.channelID = channelID
        self.clientUID = clientUID
        self.clientPID = clientPID
        self.requestsPut = requestsPut
        self.requestsTaken = requestsTaken
        self.repliesPut = repliesPut
        self.repliesTaken = repliesTaken
    }

    static let minimumEncodedSize = 2 + 4 + 4 + 4 + 8 + 4 + 4 + 4 * 8

    func encode(into writer: inout WireWriter) {
        writer.string(service)
        writer.i32(serviceUID)
        writer.u32(serviceOwner)
        writer.i32(servicePID)
        writer.u64(channelID)
        writer.u32(clientUID)
        writer.i32(clientPID)
        writer.u64(requestsPut)
        writer.u64(requestsTaken)
        writer.u64(repliesPut)
        writer.u64(repliesTaken)
    }

    static func decode(_ reader: inout WireReader) throws(DecodeError) -> CapsChannelTraffic {
        CapsChannelTraffic(service: try reader.string("service"), serviceUID: try reader.i32("service uid"),
                           serviceOwner: try reader.u32("service owner"), servicePID: try reader.i32("service pid"),
                           channelID: try reader.u64("channel id"), clientUID: try reader.u32("client uid"),
                           clientPID: try reader.i32("client pid"), requestsPut: try reader.u64("requests put"),
                           requestsTaken: try reader.u64("requests taken"), repliesPut: try reader.u64("replies put"),
                           repliesTaken: try reader.u64("replies taken"))
    }
}

/// One message a tapped service saw, as its tap reports it (`capsTapRecord`, PROTOCOL.md §12.6).
/// The broker adds who the client is from the channel's kernel credentials, never from the record.
public struct CapsTapRecord: Sendable, Equatable {
    public enum Kind: UInt8, Sendable {
        /// A REQUEST the service took.
        case request = 1
        /// A reply it sent.
        case reply = 2
        /// An error reply (`length` is the errno).
        case errorReply = 3
        /// A DISPOSE it received: the client is done with a reply.
        case dispose = 4
        /// An ABORT it received: the client took a request back.
        case abort = 5
    }

    /// Bytes of payload a record carries at most (the rest is only counted in `length`).
    public static let payloadLimit = 256
    /// Records in one `capsTapRecord` frame at most.
    public static let recordsPerFrame = 64

    public var messageID: UInt64
    public var kind: Kind
    /// The payload's length; the errno for an error reply.
    public var length: UInt32
    /// The payload's first bytes (at most `payloadLimit`), only from a tap that asked for them.
    public var payload: [UInt8]

    public init(messageID: UInt64, kind: Kind, length: UInt32, payload: [UInt8] = []) {
        self.messageID = messageID
        self.kind = kind
        self.length = length
        self.payload = payload
    }

    static let minimumEncodedSize = 8 + 1 + 4 + 2

    func encode(into writer: inout WireWriter) {
        writer.u64(messageID)
        writer.u8(kind.rawValue)
        writer.u32(length)
        writer.bytes(payload)
    }

    static func decode(_ reader: inout WireReader) throws(DecodeError) -> CapsTapRecord {
        let messageID = try reader.u64("message id")
        let rawKind = try reader.u8("kind")
        guard let kind = Kind(rawValue: rawKind) else { throw .invalidValue(field: "kind", reason: "unknown tap record kind \(rawKind)") }
        let length = try reader.u32("length")
        let payload = try reader.bytes("payload")
        guard payload.count <= payloadLimit else {
            throw .invalidValue(field: "payload", reason: "at most \(payloadLimit) bytes")
        }
        return CapsTapRecord(messageID: messageID, kind: kind, length: length, payload: payload)
    }
}

extension Request {
    public enum Caps: Sendable, Equatable {
        /// The service's status page rides beside the frame.
        case service(name: String, uid: Int32, gid: Int32, flags: CapsFlags, maximumInFlight: UInt32)
        case client(name: String, uid: Int32, gid: Int32, flags: CapsFlags)
        case setGeneration(UInt64)
        case list
        /// The channels' traffic, in channel id order, starting after `after` (0: from the start).
        case traffic(after: UInt64)
        /// This connection becomes the tap of service `serviceID` (registered by the same process);
        /// `payloads`: its records may carry payload bytes.
        case tap(serviceID: UInt64, payloads: Bool)
        /// Messages the tapped service saw (one-way); `lost`: records it could not send before these.
        case tapRecords(lost: UInt32, [CapsTapRecord])
        /// The service port could not take the client of channel `channelID` (one-way).
        case refuseClient(channelID: UInt64)
        /// The service port takes no new connections from `uid` (`refusing`), or takes them again
        /// (one-way).
        case refuseUser(uid: UInt32, refusing: Bool)

        public var opcode: Opcode {
            switch self {
            case .service: .capsService
            case .client: .capsClient
            case .setGeneration: .capsSetGeneration
            case .list: .capsList
            case .traffic: .capsTraffic
            case .tap: .capsTap
            case .tapRecords: .capsTapRecord
            case .refuseClient: .capsRefuseClient
            case .refuseUser: .capsRefuseUser
            }
        }

        func encodePayload(into writer: inout WireWriter) {
            switch self {
            case .service(let name, let uid, let gid, let flags, let maximumInFlight):
                writer.string(name)
                writer.i32(uid)
                writer.i32(gid)
                writer.u32(flags.rawValue)
                writer.u32(maximumInFlight)
            case .client(let name, let uid, let gid, let flags):
                writer.string(name)
                writer.i32(uid)
                writer.i32(gid)
                writer.u32(flags.rawValue)
            case .setGeneration(let generation):
                writer.u64(generation)
            case .list:
                break
            case .traffic(let after):
                writer.u64(after)
            case .tap(let serviceID, let payloads):
                writer.u64(serviceID)
                writer.u8(payloads ? 1 : 0)
            case .tapRecords(let lost, let records):
                writer.u32(lost)
                writer.u32(UInt32(records.count))
                for record in records { record.encode(into: &writer) }
            case .refuseClient(let channelID):
                writer.u64(channelID)
            case .refuseUser(let uid, let refusing):
                writer.u32(uid)
                writer.u8(refusing ? 1 : 0)
            }
        }

        static func decode(_ opcode: Opcode, _ reader: inout WireReader) throws(DecodeError) -> Self {
            switch opcode {
            case .capsService:
                return .service(name: try reader.string("name"), uid: try reader.i32("uid"), gid: try reader.i32("gid"),
                                flags: CapsFlags(rawValue: try reader.u32("flags")),
                                maximumInFlight: try reader.u32("maximum in flight"))
            case .capsClient:
                return .client(name: try reader.string("name"), uid: try reader.i32("uid"), gid: try reader.i32("gid"),
                               flags: CapsFlags(rawValue: try reader.u32("flags")))
            case .capsSetGeneration:
                return .setGeneration(try reader.u64("generation"))
            case .capsList:
                return .list
            case .capsTraffic:
                return .traffic(after: try reader.u64("after"))
            case .capsTap:
                let serviceID = try reader.u64("service id")
                let payloads = try reader.u8("payloads")
                guard payloads <= 1 else { throw .invalidValue(field: "payloads", reason: "must be 0 or 1") }
                return .tap(serviceID: serviceID, payloads: payloads == 1)
            case .capsTapRecord:
                let lost = try reader.u32("lost")
                let count = try reader.count("records", minimumElementSize: CapsTapRecord.minimumEncodedSize)
                guard count <= CapsTapRecord.recordsPerFrame else {
                    throw .invalidValue(field: "records", reason: "at most \(CapsTapRecord.recordsPerFrame) per frame")
                }
                var records: [CapsTapRecord] = []
                records.reserveCapacity(count)
                for _ in 0..<count { records.append(try CapsTapRecord.decode(&reader)) }
                return .tapRecords(lost: lost, records)
            case .capsRefuseClient:
                return .refuseClient(channelID: try reader.u64("channel id"))
            case .capsRefuseUser:
                let uid = try reader.u32("uid")
                let refusing = try reader.u8("refusing")
                guard refusing <= 1 else { throw .invalidValue(field: "refusing", reason: "0 or 1") }
                return .refuseUser(uid: uid, refusing: refusing == 1)
            default:
                throw .wrongFrame(opcode, "caps request")
            }
        }
    }
}

extension Reply {
    public enum Caps: Sendable, Equatable {
        /// The notices page rides beside the frame; `generation` is where the service's generation
        /// starts (one past the last of its name), which the service writes to its status page.
        case service(serviceID: UInt64, generation: UInt64)
        /// The channel, the status page (read-only), the service's and the client's wake eventfds and
        /// the client's end of the direct socket ride beside the frame.
        case client(channelID: UInt64, serviceID: UInt64, maximumInFlight: UInt32, arenaSize: UInt32)
        case setGeneration
        case list([CapsServiceInfo])
        /// One page of channels (at most `CapsChannelTraffic.pageSize`); `more`: ask again after
        /// the last channel's id.
        case traffic([CapsChannelTraffic], more: Bool)
        case tap

        public var opcode: Opcode {
            switch self {
            case .service: .capsService
            case .client: .capsClient
            case .setGeneration: .capsSetGeneration
            case .list: .capsList
            case .traffic: .capsTraffic
            case .tap: .capsTap
            }
        }

        func encodePayload(into writer: inout WireWriter) {
            switch self {
            case .service(let serviceID, let generation):
                writer.u64(serviceID)
                writer.u64(generation)
            case .client(let channelID, let serviceID, let maximumInFlight, let arenaSize):
                writer.u64(channelID)
                writer.u64(serviceID)
                writer.u32(maximumInFlight)
                writer.u32(arenaSize)
            case .setGeneration, .tap: break
            case .list(let services):
                writer.u32(UInt32(services.count))
                for service in services { service.encode(into: &writer) }
            case .traffic(let channels, let more):
                writer.u8(more ? 1 : 0)
                writer.u32(UInt32(channels.count))
                for channel in channels { channel.encode(into: &writer) }
            }
        }

        static func decode(_ opcode: Opcode, _ reader: inout WireReader) throws(DecodeError) -> Self {
            switch opcode {
            case .capsService:
                return .service(serviceID: try reader.u64("service id"), generation: try reader.u64("generation"))
            case .capsClient:
                return .client(channelID: try reader.u64("channel id"), serviceID: try reader.u64("service id"),
                               maximumInFlight: try reader.u32("maximum in flight"), arenaSize: try reader.u32("arena size"))
            case .capsSetGeneration:
                return .setGeneration
            case .capsList:
                var services: [CapsServiceInfo] = []
                for _ in 0..<(try reader.count("services", minimumElementSize: CapsServiceInfo.minimumEncodedSize)) {
                    services.append(try CapsServiceInfo.decode(&reader))
                }
                return .list(services)
            case .capsTraffic:
                let more = try reader.u8("more")
                guard more <= 1 else { throw .invalidValue(field: "more", reason: "must be 0 or 1") }
                var channels: [CapsChannelTraffic] = []
                for _ in 0..<(try reader.count("channels", minimumElementSize: CapsChannelTraffic.minimumEncodedSize)) {
                    channels.append(try CapsChannelTraffic.decode(&reader))
                }
                return .traffic(channels, more: more == 1)
            case .capsTap:
                return .tap
            default:
                throw .wrongFrame(opcode, "caps reply")
            }
        }
    }
}

extension Event {
    public enum Caps: Sendable, Equatable {
        /// A client connected: its channel, wake eventfds and direct socket ride beside the frame.
        case connected(channelID: UInt64, credentials: CapsCredentials, arenaSize: UInt32)
        case disconnected(channelID: UInt64)

        public var opcode: Opcode {
            switch self {
            case .connected: .capsConnected
            case .disconnected: .capsDisconnected
            }
        }

        func encodePayload(into writer: inout WireWriter) {
            switch self {
            case .connected(let channelID, let credentials, let arenaSize):
                writer.u64(channelID)
                credentials.encode(into: &writer)
                writer.u32(arenaSize)
            case .disconnected(let channelID):
                writer.u64(channelID)
            }
        }

        static func decode(_ opcode: Opcode, _ reader: inout WireReader) throws(DecodeError) -> Self {
            switch opcode {
            case .capsConnected:
                return .connected(channelID: try reader.u64("channel id"), credentials: try CapsCredentials.decode(&reader),
                                  arenaSize: try reader.u32("arena size"))
            case .capsDisconnected:
                return .disconnected(channelID: try reader.u64("channel id"))
            default:
                throw .wrongFrame(opcode, "caps event")
            }
        }
    }
}
