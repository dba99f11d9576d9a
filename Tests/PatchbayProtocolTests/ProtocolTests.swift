// The wire format on bytes: round trips, and a decoder that is total on hostile input.
import Glibc
import PatchbayProtocol
import Testing

/// A small deterministic generator (SplitMix64), so a failing input can be reproduced.
struct SplitMix: RandomNumberGenerator {
    var state: UInt64
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

let sampleToken = KeyToken(high: 0x0123_4567_89AB_CDEF, low: 0xFEDC_BA98_7654_3210)

let sampleRequests: [Request] = [
    .status, .metrics,
    .keys(.share(expiry: .never, restriction: nil)),
    .keys(.share(expiry: .after(nanoseconds: 200_000_000), restriction: .uid(1000))),
    .keys(.share(expiry: .after(nanoseconds: 1), restriction: .gid(27))),
    .keys(.share(expiry: .after(nanoseconds: .max), restriction: .pid(-5))),
    .keys(.claim(sampleToken)),
    .keys(.claimAcknowledge(sampleToken, received: true)),
    .keys(.claimAcknowledge(sampleToken, received: false)),
    .namespace(.open(path: "/net/local/seqpacket", flags: .nonblock)),
    .sharedMemory(.open(SharedMemoryOpenRequest(name: Array("/a".utf8), access: 1, flags: [.create, .exclusive],
                                                mode: 0o640, umask: 0o022))),
    .sharedMemory(.rename(from: Array("/a".utf8), to: Array("/b".utf8), flags: .exchange)),
    .sharedMemory(.unlink(name: Array("/a".utf8))),
    .sharedMemory(.stat(name: Array("/a".utf8))),
    .sharedMemory(.list(after: [])),
    .sharedMemory(.watch),
    .net(.control(socket: 7, command: "bind x && listen")),
    .net(.list(after: 0)),
    .net(.list(after: 512)),
    .net(.path(name: "x")), .net(.adopt(family: "local", type: "stream", name: "x")),
    .caps(.service(name: "svc", uid: -1, gid: 100, flags: .world, maximumInFlight: 128)),
    .caps(.client(name: "svc", uid: -1, gid: -1, flags: [.world, .waitForService])),
    .caps(.setGeneration(9)),
    .caps(.list),
    .caps(.traffic(after: 7)),
    .caps(.tap(serviceID: 5, payloads: true)),
    .caps(.tapRecords(lost: 2, [CapsTapRecord(messageID: 1 << 32 | 7, kind: .request, length: 3, payload: [1, 2, 3]),
                                CapsTapRecord(messageID: 1 << 32 | 7, kind: .errorReply, length: 5)])),
    .caps(.refuseClient(channelID: 1 << 40 | 3)),
    .caps(.refuseUser(uid: 65534, refusing: true)),
    .monitor(MonitorFilter(subsystems: 10, uid: 65534, pid: 42, name: "/x")),
]

let sampleReport = StatusReport(
    pid: 4242, version: "0.1.0", mode: "user", socketPath: "/run/user/1000/patchbay/patchbay.sock",
    uptimeNanoseconds: 123_456_789, clients: 3, keysByFileKind: [1: 2, 3: 1],
    users: [UserUsage(uid: 1000, clients: 3, keys: 3, oldestKeyAgeNanoseconds: 99)])

let sampleInfo = SharedMemoryInfo(
    name: Array("/app/state".utf8), size: 65536, uid: 1000, gid: 1000, mode: 0o640, accessTime: 1, modifyTime: 2,
    changeTime: 3, birthTime: -4, blocks: 128)

let sampleReplies: [Reply] = [
    .status(sampleReport), .metrics("# TYPE patchbay_clients gauge\npatchbay_clients 1\n"), .keys(.share(sampleToken)), .keys(.claim(fileKind: 4)),
    .namespace(.open(objectKind: 2, id: 5)),
    .sharedMemory(.open(sampleInfo)), .sharedMemory(.unlink), .sharedMemory(.rename), .sharedMemory(.stat(sampleInfo)),
    .sharedMemory(.list([sampleInfo, sampleInfo], more: true)), .sharedMemory(.watch),
    .net(.control), .net(.path("/run/patchbay/net/x")), .net(.adopt(id: 7)),
    .net(.list([NetSocketInfo(id: 1, family: "local", type: "stream", state: "LISTENING", name: "x", ownerPID: 3, ownerUID: 0,
                              waitingAccepts: 2)])),
    .caps(.service(serviceID: 3, generation: 4)),
    .caps(.client(channelID: 1, serviceID: 2, maximumInFlight: 128, arenaSize: 1 << 24)),
    .caps(.setGeneration),
    .caps(.list([CapsServiceInfo(name: "svc", uid: 0, gid: -1, flags: 7, clients: 3, generation: 2, pid: 10)])),
    .monitor,
    .caps(.tap),
    .caps(.traffic([CapsChannelTraffic(service: "svc", serviceUID: -1, serviceOwner: 0, servicePID: 10, channelID: 3, clientUID: 65534,
                                       clientPID: 11, requestsPut: 9, requestsTaken: 8, repliesPut: 4, repliesTaken: 4)], more: true)),
]

@Suite("Wire protocol")
struct ProtocolTests {
    @Test("every request survives encode and decode", arguments: sampleRequests)
    func requestRoundTrip(_ request: Request) throws {
        let bytes = request.encode(requestID: 77)
        let frame = try Frame.decode(bytes[...])
        #expect(frame.kind == .request)
        #expect(frame.requestID == 77)
        #expect(frame.opcode == request.opcode)
        #expect(try Request.decode(frame) == request)
    }

    @Test("every reply survives encode and decode", arguments: sampleReplies)
    func replyRoundTrip(_ reply: Reply) throws {
        let frame = try Frame.decode(reply.encode(requestID: .max)[...])
        #expect(frame.requestID == .max)
        #expect(try Reply.decode(frame) == reply)
    }

    @Test("events survive encode and decode")
    func eventRoundTrip() throws {
        for event in [Event.caps(.connected(channelID: 4, credentials: CapsCredentials(pid: 1, uid: 2, euid: 3, gid: 4, groups: [5, 6]),
                                               arenaSize: 1 << 24)),
                      .caps(.disconnected(channelID: 4)),
                      .monitor(MonitorEvent(time: 1, subsystem: "keys", operation: "claim", pid: 7, uid: 65534, command: "cat",
                                            object: "a key", outcome: "ENOENT", elapsed: 1200, lost: 3)),
                      .monitor(MonitorEvent(time: 2, subsystem: "caps", operation: "tapRequest", pid: 8, uid: 0, command: "sh",
                                            object: "svc", outcome: "ok", elapsed: 0, lost: 0, detail: "message 9, 3 bytes",
                                            payload: [0, 255, 7]))] {
            let frame = try Frame.decode(event.encode()[...])
            #expect(frame.kind == .event && frame.requestID == 0)
            #expect(try Event.decode(frame) == event)
        }
    }

    @Test("the opcode table: every request and reply opcode has a payload that round-trips, and no frame crosses kinds")
    func opcodeTable() throws {
        let requestOpcodes = Set(Opcode.allCases.filter { $0.metadata.isRequest })
        let replyOpcodes = Set(Opcode.allCases.filter { $0.metadata.expectsReply })
        #expect(Set(sampleRequests.map(\.opcode)) == requestOpcodes)
        #expect(Set(sampleReplies.map(\.opcode)) == replyOpcodes)
        #expect(!requestOpcodes.contains(.connection) && !requestOpcodes.contains(.capsConnected))
        #expect(requestOpcodes.subtracting(replyOpcodes) == [.claimAcknowledge, .capsTapRecord, .capsRefuseClient, .capsRefuseUser])
        for request in sampleRequests {
            #expect(request.opcode.subsystem == Opcode(rawValue: request.opcode.rawValue)!.metadata.subsystem)
        }
        // An event opcode in a request frame, and a request-only opcode in a reply frame, are refused.
        var bytes = Request.status.encode(requestID: 1)
        bytes[4] = UInt8(Opcode.capsConnected.rawValue)
        #expect(throws: DecodeError.self) { try Request.decode(try Frame.decode(bytes[...])) }
        bytes = Reply.net(.control).encode(requestID: 1)
        bytes[4] = UInt8(Opcode.claimAcknowledge.rawValue)
        #expect(throws: DecodeError.self) { try Reply.decode(try Frame.decode(bytes[...])) }
        // Flags keep unknown bits, so the broker can refuse them with EINVAL instead of ignoring them.
        let odd = Request.sharedMemory(.open(SharedMemoryOpenRequest(name: [0x2F], access: 0, flags: .init(rawValue: 0x80),
                                                                      mode: 0, umask: 0)))
        #expect(try Request.decode(try Frame.decode(odd.encode(requestID: 2)[...])) == odd)
    }

    @Test("error replies carry errno and reason")
    func errorRoundTrip() throws {
        let error = ErrorReply(errno: ENOENT, reason: "no such key — gone")
        let frame = try Frame.decode(error.encode(rawOpcode: Opcode.claim.rawValue, requestID: 5)[...])
        #expect(frame.kind == .error)
        #expect(try ErrorReply.decode(frame) == error)
    }

    @Test("the header layout is what docs/PROTOCOL.md says")
    func headerLayout() {
        #expect(Request.status.encode(requestID: 1)
                == [0x50, 0x42, 0x01, 0x01, 0x01, 0x00, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0, 0])
    }

    @Test("every truncation of every valid frame is rejected, never trapped")
    func truncations() {
        let frames = sampleRequests.map { $0.encode(requestID: 3) } + sampleReplies.map { $0.encode(requestID: 3) }
        for bytes in frames {
            for length in 0..<bytes.count {
                let prefix = bytes[0..<length]
                let outcome = Result { () throws(DecodeError) -> Void in
                    let frame = try Frame.decode(prefix)
                    if frame.kind == .request { _ = try Request.decode(frame) } else { _ = try Reply.decode(frame) }
                }
                // A shorter frame can only be valid if the payload is empty (status request), or
                // if it is exactly the header of a request whose one field is optional (netList:
                // no cursor is the same as 0).
                if case .success = outcome {
                    let optionalCursor = length == frameHeaderSize && bytes[4] == UInt8(Opcode.netList.rawValue) && bytes[3] == 1
                    #expect(length == bytes.count || bytes.count == frameHeaderSize || optionalCursor)
                }
                if length < frameHeaderSize, case .failure(let error) = outcome {
                    if case .truncated = error {} else if length >= 2 { Issue.record("length \(length): \(error)") }
                }
            }
        }
    }

    @Test("header errors are specific")
    func headerErrors() {
        var bytes = Request.status.encode(requestID: 1)
        bytes[0] = 0x58
        #expect(throws: DecodeError.badMagic) { try Frame.decode(bytes[...]) }
        bytes = Request.status.encode(requestID: 1)
        bytes[2] = 9
        #expect(throws: DecodeError.unsupportedVersion(9)) { try Frame.decode(bytes[...]) }
        bytes = Request.status.encode(requestID: 1)
        bytes[3] = 0
        #expect(throws: DecodeError.unknownKind(0)) { try Frame.decode(bytes[...]) }
        bytes = Request.status.encode(requestID: 1)
        bytes[4] = 0xEE
        #expect(throws: DecodeError.unknownOpcode(0xEE)) { try Frame.decode(bytes[...]) }
        bytes = Request.status.encode(requestID: 1)
        bytes[6] = 1
        #expect(throws: DecodeError.reservedBitsSet) { try Frame.decode(bytes[...]) }
        bytes = Request.status.encode(requestID: 1) + [0]
        #expect(throws: DecodeError.trailingBytes(1)) { try Request.decode(try Frame.decode(bytes[...])) }
        let huge = [UInt8](repeating: 0x50, count: maximumFrameSize + 1)
        #expect(throws: DecodeError.oversized(maximumFrameSize + 1)) { try Frame.decode(huge[...]) }
        #expect(ErrorReply(DecodeError.unsupportedVersion(9)).errno == EPROTONOSUPPORT)
        #expect(ErrorReply(DecodeError.unknownOpcode(9)).errno == EOPNOTSUPP)
        #expect(ErrorReply(DecodeError.oversized(1 << 20)).errno == EMSGSIZE)
        #expect(ErrorReply(DecodeError.badMagic).errno == EPROTO)
    }

    @Test("field values outside their domain are rejected")
    func fieldDomains() throws {
        var share = Request.keys(.share(expiry: .never, restriction: nil)).encode(requestID: 1)
        share[frameHeaderSize] = 7  // expiry kind
        #expect(throws: DecodeError.self) { try Request.decode(try Frame.decode(share[...])) }
        var acknowledgement = Request.keys(.claimAcknowledge(sampleToken, received: true)).encode(requestID: 1)
        acknowledgement[acknowledgement.count - 1] = 2
        #expect(throws: DecodeError.self) { try Request.decode(try Frame.decode(acknowledgement[...])) }
        // Invalid UTF-8 in a string.
        var error = ErrorReply(errno: EINVAL, reason: "ab").encode(rawOpcode: 1, requestID: 1)
        error[error.count - 1] = 0xFF
        #expect(throws: DecodeError.invalidValue(field: "reason", reason: "not valid UTF-8")) {
            try ErrorReply.decode(try Frame.decode(error[...]))
        }
        // A status report claiming four billion users in a small frame.
        var report = Reply.status(sampleReport).encode(requestID: 1)
        let usersCountOffset = report.count - 4 - 32
        report.replaceSubrange(usersCountOffset..<usersCountOffset + 4, with: [0xFF, 0xFF, 0xFF, 0xFF])
        #expect(throws: DecodeError.self) { try Reply.decode(try Frame.decode(report[...])) }
        // A reply is not a request and the other way round.
        #expect(throws: DecodeError.self) { try Request.decode(try Frame.decode(Reply.keys(.share(sampleToken)).encode(requestID: 1)[...])) }
        #expect(throws: DecodeError.self) { try Reply.decode(try Frame.decode(Request.status.encode(requestID: 1)[...])) }
    }

    @Test("200,000 random and mutated frames decode or throw, never trap")
    func hostileBytes() {
        var generator = SplitMix(state: 0x5EED)
        let seeds = sampleRequests.map { $0.encode(requestID: 1) } + sampleReplies.map { $0.encode(requestID: 1) }
        var decoded = 0
        for round in 0..<200_000 {
            var bytes: [UInt8]
            if round % 2 == 0 {
                // Mutate a valid frame: flip, insert or delete a few bytes.
                bytes = seeds[Int(generator.next() % UInt64(seeds.count))]
                for _ in 0..<(1 + generator.next() % 4) {
                    let position = Int(generator.next() % UInt64(bytes.count + 1))
                    switch generator.next() % 3 {
                    case 0 where position < bytes.count: bytes[position] = UInt8(truncatingIfNeeded: generator.next())
                    case 1: bytes.insert(UInt8(truncatingIfNeeded: generator.next()), at: position)
                    default: if position < bytes.count { bytes.remove(at: position) }
                    }
                }
            } else {
                // Pure garbage behind a valid magic and version, so the decoder gets past the header.
                let length = Int(generator.next() % 96)
                bytes = [0x50, 0x42, 0x01] + (0..<length).map { _ in UInt8(truncatingIfNeeded: generator.next()) }
            }
            if let frame = try? Frame.decode(bytes[...]) {
                switch frame.kind {
                case .request: if (try? Request.decode(frame)) != nil { decoded += 1 }
                case .reply: if (try? Reply.decode(frame)) != nil { decoded += 1 }
                case .error: if (try? ErrorReply.decode(frame)) != nil { decoded += 1 }
                case .event: if (try? Event.decode(frame)) != nil { decoded += 1 }
                }
            }
        }
        // Some mutations (a flipped request id, say) stay valid: the decoder is exercised on both paths.
        #expect(decoded > 1000)
    }

    @Test("key text: 22 base64url characters, round trip, canonical only")
    func keyText() {
        var generator = SplitMix(state: 42)
        for _ in 0..<10_000 {
            let token = KeyToken(high: generator.next(), low: generator.next())
            let text = token.text
            #expect(text.utf8.count == 22)
            #expect(text.utf8.allSatisfy { byte in
                (byte >= 0x41 && byte <= 0x5A) || (byte >= 0x61 && byte <= 0x7A) || (byte >= 0x30 && byte <= 0x39)
                    || byte == UInt8(ascii: "-") || byte == UInt8(ascii: "_")
            })
            #expect(KeyToken(text: text) == token)
            #expect(text.first.map { "ABCD".contains($0) } == true)
        }
        #expect(KeyToken(high: 0, low: 0).text == "AAAAAAAAAAAAAAAAAAAAAA")
        #expect(KeyToken(high: .max, low: .max).text == "D_____________________")
        #expect(KeyToken(text: "D_____________________") == KeyToken(high: .max, low: .max))
        #expect(KeyToken(high: 0, low: 1).text == "AAAAAAAAAAAAAAAAAAAAAB")
        #expect(KeyToken(bytes: Array(0..<16))!.text == "AAAQIDBAUGBwgJCgsMDQ4P")  // docs/PROTOCOL.md §6
        // The first character carries 2 bits; any of its 4 high bits set is not a key.
        #expect(KeyToken(text: "E_____________________") == nil)
        #expect(KeyToken(text: "-AAAAAAAAAAAAAAAAAAAAA") == nil)
        #expect(KeyToken(text: "AAAAAAAAAAAAAAAAAAAAA") == nil)
        #expect(KeyToken(text: "AAAAAAAAAAAAAAAAAAAAAAA") == nil)
        #expect(KeyToken(text: "AAAAAAAAAAAAAAAAAAAA+A") == nil)
        #expect(KeyToken(text: "AAAAAAAAAAAAAAAAAAAAé") == nil)
    }

    @Test("the per-user socket path follows XDG_RUNTIME_DIR, else /tmp/patchbay-UID")
    func rendezvous() {
        #expect(userBrokerSocketPath(uid: 1000, xdgRuntimeDirectory: "/run/user/1000") == "/run/user/1000/patchbay/patchbay.sock")
        #expect(userBrokerSocketPath(uid: 1000, xdgRuntimeDirectory: "/run/user/1000/") == "/run/user/1000/patchbay/patchbay.sock")
        #expect(userBrokerSocketPath(uid: 1000, xdgRuntimeDirectory: nil) == "/tmp/patchbay-1000/patchbay.sock")
        #expect(userBrokerSocketPath(uid: 7, xdgRuntimeDirectory: "relative") == "/tmp/patchbay-7/patchbay.sock")
    }
}
