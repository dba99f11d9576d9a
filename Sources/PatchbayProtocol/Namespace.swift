// The broker's file namespace, PatchworkOS style: `open` of a path (`/dev/shmem/new`,
// `/net/<family>/<type>`, `/net/<family>/<id>/data|accept`, `/net/<family>/addrs`) returns the
// object's descriptors beside the reply.

/// Flags of an `open` request.
public struct OpenFlags: OptionSet, Sendable, Hashable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }

    /// `/dev/shmem/new`: the new object accepts seals.
    public static let sealable = OpenFlags(rawValue: 1)
    /// `/net`: the open itself must not wait (`accept` with nothing pending is `EAGAIN`), and the
    /// library makes its own data calls on the handle non-blocking. Also written `path:nonblock`.
    public static let nonblock = OpenFlags(rawValue: 2)
}

/// What an `open` returned, and how many descriptors ride with the reply.
public enum OpenedObjectKind: UInt8, Sendable {
    /// `/dev/shmem/new`: the memfd.
    case anonymousSharedMemory = 1
    /// A `/net` factory: the socket's handle (the socket lives while a copy of it is open), then
    /// its kernel socket, on which the client itself calls `listen` and `connect`.
    case socket = 2
    /// `/net/<family>/<id>/data`: the kernel socket.
    case socketData = 3
    /// `/net/<family>/<id>/accept`: the new connection's handle, then its kernel socket.
    case acceptedSocket = 4
    /// `/net/<family>/addrs`: a read-only memfd holding the bound names, one per line.
    case addressList = 5

    public var descriptorCount: Int { self == .acceptedSocket || self == .socket ? 2 : 1 }
}

extension Request {
    public enum Namespace: Sendable, Equatable {
        case open(path: String, flags: OpenFlags)

        public var opcode: Opcode { .open }

        func encodePayload(into writer: inout WireWriter) {
            switch self {
            case .open(let path, let flags):
                writer.string(path)
                writer.u32(flags.rawValue)
            }
        }

        static func decode(_ opcode: Opcode, _ reader: inout WireReader) throws(DecodeError) -> Self {
            guard opcode == .open else { throw .wrongFrame(opcode, "namespace request") }
            return .open(path: try reader.string("path"), flags: OpenFlags(rawValue: try reader.u32("flags")))
        }
    }
}

extension Reply {
    public enum Namespace: Sendable, Equatable {
        /// The opened object's descriptors ride beside the frame (how many: `OpenedObjectKind`);
        /// `id` names the socket for socket objects, 0 otherwise.
        case open(objectKind: UInt8, id: UInt64)

        public var opcode: Opcode { .open }

        func encodePayload(into writer: inout WireWriter) {
            switch self {
            case .open(let kind, let id):
                writer.u8(kind)
                writer.u64(id)
            }
        }

        static func decode(_ opcode: Opcode, _ reader: inout WireReader) throws(DecodeError) -> Self {
            guard opcode == .open else { throw .wrongFrame(opcode, "namespace reply") }
            return .open(objectKind: try reader.u8("object kind"), id: try reader.u64("id"))
        }
    }
}
