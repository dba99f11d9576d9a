// Sockets through `/net` (PatchworkOS): a socket is opened through the namespace
// (Namespace.swift); here are its `ctl` command lines, the socket listing and a name's path.
// The state machine the commands drive is NetStateMachine.swift.

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

extension Request {
    public enum Net: Sendable, Equatable {
        /// A command line written to socket `socket`'s `ctl` (`bind NAME`, `listen`, `connect NAME`, ...).
        case control(socket: UInt64, command: String)
        /// Sockets in id order, starting after id `after` (0: from the first). A reply holds at
        /// most 512; ask again after the last id for more.
        case list(after: UInt64)
        /// The filesystem path of a bound local name.
        case path(name: String)
        /// A listening kernel socket (attached) still bound to `name`'s socket file, made by a
        /// broker that is gone: registered again as a new socket, LISTENING, under `name`.
        case adopt(family: String, type: String, name: String)

        public var opcode: Opcode {
            switch self {
            case .control: .netControl
            case .list: .netList
            case .path: .netPath
            case .adopt: .netAdopt
            }
        }

        func encodePayload(into writer: inout WireWriter) {
            switch self {
            case .control(let socket, let command):
                writer.u64(socket)
                writer.string(command)
            case .list(let after):
                // Empty for 0, as the request was before it took a cursor.
                if after != 0 { writer.u64(after) }
            case .path(let name):
                writer.string(name)
            case .adopt(let family, let type, let name):
                writer.string(family)
                writer.string(type)
                writer.string(name)
            }
        }

        static func decode(_ opcode: Opcode, _ reader: inout WireReader) throws(DecodeError) -> Self {
            switch opcode {
            case .netControl: return .control(socket: try reader.u64("socket"), command: try reader.string("command"))
            case .netList: return .list(after: reader.remaining == 0 ? 0 : try reader.u64("after"))
            case .netPath: return .path(name: try reader.string("name"))
            case .netAdopt:
                return .adopt(family: try reader.string("family"), type: try reader.string("type"), name: try reader.string("name"))
            default: throw .wrongFrame(opcode, "net request")
            }
        }
    }
}

extension Reply {
    public enum Net: Sendable, Equatable {
        case control
        case list([NetSocketInfo])
        case path(String)
        /// The adopted listener's new id; its handle is attached.
        case adopt(id: UInt64)

        public var opcode: Opcode {
            switch self {
            case .control: .netControl
            case .list: .netList
            case .path: .netPath
            case .adopt: .netAdopt
            }
        }

        func encodePayload(into writer: inout WireWriter) {
            switch self {
            case .control: break
            case .list(let sockets):
                writer.u32(UInt32(sockets.count))
                for socket in sockets { socket.encode(into: &writer) }
            case .path(let path): writer.string(path)
            case .adopt(let id): writer.u64(id)
            }
        }

        static func decode(_ opcode: Opcode, _ reader: inout WireReader) throws(DecodeError) -> Self {
            switch opcode {
            case .netControl: return .control
            case .netList:
                var sockets: [NetSocketInfo] = []
                for _ in 0..<(try reader.count("sockets", minimumElementSize: NetSocketInfo.minimumEncodedSize)) {
                    sockets.append(try NetSocketInfo.decode(&reader))
                }
                return .list(sockets)
            case .netPath: return .path(try reader.string("path"))
            case .netAdopt: return .adopt(id: try reader.u64("id"))
            default: throw .wrongFrame(opcode, "net reply")
            }
        }
    }
}
