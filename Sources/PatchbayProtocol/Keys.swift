// Keys (PatchworkOS share/claim): `share` hands a descriptor to the broker under a new key,
// `claim` takes it back by key, and the claimer acknowledges what arrived (docs/PROTOCOL.md §9).
// The key itself is `KeyToken` (KeyToken.swift).

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

extension Request {
    public enum Keys: Sendable, Equatable {
        /// The file rides beside the frame.
        case share(expiry: KeyExpiry, restriction: ClaimRestriction?)
        case claim(KeyToken)
        /// `received: false` means the descriptor was lost on the way in (the claimer had no free
        /// descriptor slot), so the broker restores the key. One-way: no reply.
        case claimAcknowledge(KeyToken, received: Bool)

        public var opcode: Opcode {
            switch self {
            case .share: .share
            case .claim: .claim
            case .claimAcknowledge: .claimAcknowledge
            }
        }

        func encodePayload(into writer: inout WireWriter) {
            switch self {
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
            }
        }

        static func decode(_ opcode: Opcode, _ reader: inout WireReader) throws(DecodeError) -> Self {
            switch opcode {
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
                return .share(expiry: expiry, restriction: restriction)
            case .claim:
                return .claim(try reader.token())
            case .claimAcknowledge:
                let token = try reader.token()
                let received = try reader.u8("received")
                guard received <= 1 else { throw .invalidValue(field: "received", reason: "must be 0 or 1") }
                return .claimAcknowledge(token, received: received == 1)
            default:
                throw .wrongFrame(opcode, "keys request")
            }
        }
    }
}

extension Reply {
    public enum Keys: Sendable, Equatable {
        case share(KeyToken)
        /// The claimed descriptor rides beside the frame; the payload says what kind of file it is.
        case claim(fileKind: UInt8)

        public var opcode: Opcode {
            switch self {
            case .share: .share
            case .claim: .claim
            }
        }

        func encodePayload(into writer: inout WireWriter) {
            switch self {
            case .share(let token): writer.raw(token.bytes)
            case .claim(let kind): writer.u8(kind)
            }
        }

        static func decode(_ opcode: Opcode, _ reader: inout WireReader) throws(DecodeError) -> Self {
            switch opcode {
            case .share: return .share(try reader.token())
            case .claim: return .claim(fileKind: try reader.u8("file kind"))
            default: throw .wrongFrame(opcode, "keys reply")
            }
        }
    }
}

extension WireReader {
    mutating func token() throws(DecodeError) -> KeyToken {
        // 16 bytes always make a token.
        KeyToken(bytes: try raw("key", count: 16))!
    }
}
