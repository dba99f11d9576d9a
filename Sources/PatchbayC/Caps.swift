// libpatchbay: CAPS services and clients (patchbay.h, "CAPS").

import CPatchbayABI
import Glibc
import Patchbay
import SystemPackage

public typealias ReadCallback = @convention(c) (UnsafePointer<pb_caps_message>?, UnsafeRawPointer?, Int, UnsafeMutableRawPointer?) -> CInt
public typealias FillCallback = @convention(c) (UnsafeMutableRawPointer?, Int, UnsafeMutableRawPointer?) -> Void

extension pb_caps_message {
    init(_ message: CapsServiceMessage) {
        let kind: pb_caps_kind = switch message.kind {
        case .request: PB_CAPS_REQUEST
        case .dispose: PB_CAPS_DISPOSE
        case .aborted: PB_CAPS_ABORTED
        case .connected: PB_CAPS_CONNECTED
        case .disconnected: PB_CAPS_DISCONNECTED
        }
        // A connection notice answers nothing: its id is the client's channel id (SEMANTICS.md),
        // which C has no other field for.
        let notice = message.kind == .connected || message.kind == .disconnected
        self.init(id: notice ? message.channelID : message.messageID, kind: CInt(kind.rawValue), length: message.length,
                  pid: message.credentials.pid,
                  uid: message.credentials.uid, euid: message.credentials.euid, gid: message.credentials.gid)
    }

    /// A reply, as a client sees it (no credentials: the client chose the service).
    init(reply id: UInt64, length: Int) {
        self.init(id: id, kind: CInt(PB_CAPS_REPLY.rawValue), length: length, pid: 0, uid: 0, euid: 0, gid: 0)
    }
}

func buffer(_ pointer: UnsafeMutableRawPointer?, _ capacity: Int) throws(PatchbayError) -> UnsafeMutableRawBufferPointer {
    guard pointer != nil || capacity == 0 else { throw PatchbayError(.invalidArgument, "the buffer is NULL") }
    return UnsafeMutableRawBufferPointer(start: pointer, count: capacity)
}

func bytes(_ pointer: UnsafeRawPointer?, _ length: Int) throws(PatchbayError) -> UnsafeRawBufferPointer {
    guard pointer != nil || length == 0 else { throw PatchbayError(.invalidArgument, "the data is NULL") }
    return UnsafeRawBufferPointer(start: pointer, count: length)
}

// MARK: Services

@_cdecl("pb_caps_service_open")
public func pb_caps_service_open(_ broker: OpaquePointer?, _ name: UnsafePointer<CChar>?, _ access: CUnsignedInt,
                                 _ out: UnsafeMutablePointer<OpaquePointer?>?) -> CInt {
    exported { () throws(PatchbayError) -> CInt in
        // The GROUP class needs a group to compare with: the caller's effective gid, as the
        // service's uid is its effective uid.
        let gid = access & CUnsignedInt(PB_CAPS_GROUP) != 0 ? Int32(bitPattern: getegid()) : -1
        try openService(broker, name, uid: Int32(bitPattern: geteuid()), gid: gid, access, out)
        return 0
    }
}

@_cdecl("pb_caps_service_register")
public func pb_caps_service_register(_ broker: OpaquePointer?, _ name: UnsafePointer<CChar>?, _ uid: Int64, _ gid: Int64,
                                     _ access: CUnsignedInt, _ out: UnsafeMutablePointer<OpaquePointer?>?) -> CInt {
    exported { () throws(PatchbayError) -> CInt in
        try openService(broker, name, uid: try registrationID(uid, "uid"), gid: try registrationID(gid, "gid"), access, out)
        return 0
    }
}

/// A uid or gid as the wire carries it: PB_CAPS_ANY (-1), or the id's bits in an i32.
/// ((uid_t)-1 is no one's id: it would read as the wildcard.)
private func registrationID(_ id: Int64, _ what: String) throws(PatchbayError) -> Int32 {
    if id == Int64(PB_CAPS_ANY) { return -1 }
    guard let id = UInt32(exactly: id), id != .max else {
        throw PatchbayError(.invalidArgument, "\(what) \(id) is out of range: 0 to 4294967294, or PB_CAPS_ANY (-1)")
    }
    return Int32(bitPattern: id)
}

/// `pb_caps_service_open` and `pb_caps_service_register`.
private func openService(_ broker: OpaquePointer?, _ name: UnsafePointer<CChar>?, uid: Int32, gid: Int32,
                         _ access: CUnsignedInt, _ out: UnsafeMutablePointer<OpaquePointer?>?) throws(PatchbayError) {
    let broker = try object(broker, as: Broker.self, "broker")
    let out = try checkOut(out)
    let classBits = CUnsignedInt(PB_CAPS_USER | PB_CAPS_GROUP | PB_CAPS_WORLD)
    let known = classBits | CUnsignedInt(PB_CAPS_NOTIFY | PB_CAPS_EXCLUSIVE)
    guard access & ~known == 0 else {
        throw PatchbayError(.invalidArgument,
                            "unknown bits \(access): PB_CAPS_USER, PB_CAPS_GROUP, PB_CAPS_WORLD, PB_CAPS_NOTIFY, PB_CAPS_EXCLUSIVE")
    }
    let classes = access & classBits
    out.pointee = handle(try CapsService(broker, name: try string(name, "the name"), uid: uid, gid: gid,
                                         access: CapsAccess(rawValue: classes == 0 ? CUnsignedInt(PB_CAPS_USER) : classes),
                                         exclusive: access & CUnsignedInt(PB_CAPS_EXCLUSIVE) != 0,
                                         notifyConnections: access & CUnsignedInt(PB_CAPS_NOTIFY) != 0))
}

/// `wait` and `get`: the header into `m`, the payload into the buffer, and the payload's full
/// length (DragonFly's rule: more than the buffer's capacity means only that much was copied and
/// the message stays queued).
private func deliver(_ message: CapsServiceMessage, _ m: UnsafeMutablePointer<pb_caps_message>?) throws(PatchbayError) -> CInt {
    m?.pointee = pb_caps_message(message)
    return CInt(clamping: message.length)
}

@_cdecl("pb_caps_wait")
public func pb_caps_wait(_ service: OpaquePointer?, _ m: UnsafeMutablePointer<pb_caps_message>?,
                         _ data: UnsafeMutableRawPointer?, _ capacity: Int) -> CInt {
    exported { () throws(PatchbayError) -> CInt in
        let service = try object(service, as: CapsService.self, "service")
        return try deliver(try service.wait(into: try buffer(data, capacity)), m)
    }
}

@_cdecl("pb_caps_get")
public func pb_caps_get(_ service: OpaquePointer?, _ m: UnsafeMutablePointer<pb_caps_message>?,
                        _ data: UnsafeMutableRawPointer?, _ capacity: Int) -> CInt {
    exported { () throws(PatchbayError) -> CInt in
        let service = try object(service, as: CapsService.self, "service")
        return try deliver(try service.get(into: try buffer(data, capacity)), m)
    }
}

@_cdecl("pb_caps_receive")
public func pb_caps_receive(_ service: OpaquePointer?, _ read: ReadCallback?, _ context: UnsafeMutableRawPointer?) -> CInt {
    exported { () throws(PatchbayError) -> CInt in
        let service = try object(service, as: CapsService.self, "service")
        guard let read else { throw PatchbayError(.invalidArgument, "the read callback is NULL") }
        var result: CInt = 0
        try service.receive { (message: CapsServiceMessage, payload: UnsafeRawBufferPointer) in
            var header = pb_caps_message(message)
            result = read(&header, payload.baseAddress, payload.count, context)
        }
        return result
    }
}

@_cdecl("pb_caps_reply")
public func pb_caps_reply(_ service: OpaquePointer?, _ id: UInt64, _ data: UnsafeRawPointer?, _ length: Int) -> CInt {
    exported { () throws(PatchbayError) -> CInt in
        let service = try object(service, as: CapsService.self, "service")
        let payload = try bytes(data, length)
        try service.reply(to: id, length: length) { buffer in
            if length > 0 { buffer.copyMemory(from: payload) }
        }
        return 0
    }
}

@_cdecl("pb_caps_reply_in_place")
public func pb_caps_reply_in_place(_ service: OpaquePointer?, _ id: UInt64, _ length: Int, _ fill: FillCallback?,
                                   _ context: UnsafeMutableRawPointer?) -> CInt {
    exported { () throws(PatchbayError) -> CInt in
        let service = try object(service, as: CapsService.self, "service")
        guard let fill else { throw PatchbayError(.invalidArgument, "the fill callback is NULL") }
        try service.reply(to: id, length: length) { buffer in fill(buffer.baseAddress, buffer.count, context) }
        return 0
    }
}

@_cdecl("pb_caps_reply_error")
public func pb_caps_reply_error(_ service: OpaquePointer?, _ id: UInt64, _ error: CInt) -> CInt {
    exported { () throws(PatchbayError) -> CInt in
        try object(service, as: CapsService.self, "service").reply(to: id, error: Errno(rawValue: error))
        return 0
    }
}

@_cdecl("pb_caps_set_generation")
public func pb_caps_set_generation(_ service: OpaquePointer?, _ generation: UInt64) -> CInt {
    exported { () throws(PatchbayError) -> CInt in
        try object(service, as: CapsService.self, "service").setGeneration(generation)
        return 0
    }
}

@_cdecl("pb_caps_service_fd")
public func pb_caps_service_fd(_ service: OpaquePointer?) -> CInt {
    exported { () throws(PatchbayError) -> CInt in try object(service, as: CapsService.self, "service").eventDescriptor }
}

@_cdecl("pb_caps_service_cancel")
public func pb_caps_service_cancel(_ service: OpaquePointer?) {
    guard let service else { return }
    Unmanaged<CapsService>.fromOpaque(UnsafeRawPointer(service)).takeUnretainedValue().cancelWait()
}

@_cdecl("pb_caps_service_close")
public func pb_caps_service_close(_ service: OpaquePointer?) {
    guard let service else { return }
    // Every wait blocked in another thread returns -ECANCELED and lets the service go; without
    // this their references kept the service registered, and the waits blocked, after the close.
    Unmanaged<CapsService>.fromOpaque(UnsafeRawPointer(service)).takeUnretainedValue().cancelWaits()
    release(service, as: CapsService.self)
}

// MARK: Clients

@_cdecl("pb_caps_client_open")
public func pb_caps_client_open(_ broker: OpaquePointer?, _ name: UnsafePointer<CChar>?, _ flags: CUnsignedInt,
                                _ out: UnsafeMutablePointer<OpaquePointer?>?) -> CInt {
    exported { () throws(PatchbayError) -> CInt in
        try openClient(broker, name, uid: -1, gid: -1, access: 0, flags, out)
        return 0
    }
}

@_cdecl("pb_caps_client_connect")
public func pb_caps_client_connect(_ broker: OpaquePointer?, _ name: UnsafePointer<CChar>?, _ uid: Int64, _ gid: Int64,
                                   _ access: CUnsignedInt, _ flags: CUnsignedInt,
                                   _ out: UnsafeMutablePointer<OpaquePointer?>?) -> CInt {
    exported { () throws(PatchbayError) -> CInt in
        try openClient(broker, name, uid: try registrationID(uid, "uid"), gid: try registrationID(gid, "gid"),
                       access: access, flags, out)
        return 0
    }
}

/// `pb_caps_client_open` and `pb_caps_client_connect`; an access of 0 is all three classes.
private func openClient(_ broker: OpaquePointer?, _ name: UnsafePointer<CChar>?, uid: Int32, gid: Int32,
                        access: CUnsignedInt, _ flags: CUnsignedInt,
                        _ out: UnsafeMutablePointer<OpaquePointer?>?) throws(PatchbayError) {
    let broker = try object(broker, as: Broker.self, "broker")
    let out = try checkOut(out)
    let classBits = CUnsignedInt(PB_CAPS_USER | PB_CAPS_GROUP | PB_CAPS_WORLD)
    guard access & ~classBits == 0 else {
        throw PatchbayError(.invalidArgument, "unknown access bits \(access): PB_CAPS_USER, PB_CAPS_GROUP, PB_CAPS_WORLD")
    }
    guard flags & ~CUnsignedInt(PB_CAPS_WAIT_FOR_SERVICE) == 0 else {
        throw PatchbayError(.invalidArgument, "unknown flags \(flags): only PB_CAPS_WAIT_FOR_SERVICE")
    }
    out.pointee = handle(try CapsClient(broker, name: try string(name, "the name"), uid: uid, gid: gid,
                                        access: CapsAccess(rawValue: access == 0 ? classBits : access),
                                        waitForService: flags & CUnsignedInt(PB_CAPS_WAIT_FOR_SERVICE) != 0))
}

@_cdecl("pb_caps_call")
public func pb_caps_call(_ client: OpaquePointer?, _ request: UnsafeRawPointer?, _ length: Int,
                         _ reply: UnsafeMutableRawPointer?, _ capacity: Int) -> Int {
    do throws(PatchbayError) {
        guard let client else { throw PatchbayError(.invalidArgument, "the client is NULL") }
        let request = try bytes(request, length)
        let reply = try buffer(reply, capacity)
        // Borrowed, not counted: the handle holds the client until pb_caps_client_close.
        return try Unmanaged<CapsClient>.fromOpaque(UnsafeRawPointer(client))._withUnsafeGuaranteedRef { client in
            Result { () throws(PatchbayError) -> Int in try client.call(request, into: reply) }
        }.get()
    } catch {
        return Int(fail(error))
    }
}

@_cdecl("pb_caps_abort")
public func pb_caps_abort(_ client: OpaquePointer?, _ id: UInt64) -> CInt {
    exported { () throws(PatchbayError) -> CInt in
        switch try object(client, as: CapsClient.self, "client").abort(id) {
        case .returned: PB_CAPS_ABORT_RETURNED
        case .atService: PB_CAPS_ABORT_AT_SERVICE
        }
    }
}

@_cdecl("pb_caps_generation")
public func pb_caps_generation(_ client: OpaquePointer?, _ generation: UnsafeMutablePointer<UInt64>?) -> CInt {
    exported { () throws(PatchbayError) -> CInt in
        let client = try object(client, as: CapsClient.self, "client")
        guard let generation else { throw PatchbayError(.invalidArgument, "the generation pointer is NULL") }
        generation.pointee = try client.generation()
        return 0
    }
}

@_cdecl("pb_caps_put")
public func pb_caps_put(_ client: OpaquePointer?, _ data: UnsafeRawPointer?, _ length: Int, _ id: UnsafeMutablePointer<UInt64>?) -> CInt {
    exported { () throws(PatchbayError) -> CInt in
        let client = try object(client, as: CapsClient.self, "client")
        let payload = try bytes(data, length)
        let messageID = try client.put(length: length) { buffer in
            if length > 0 { buffer.copyMemory(from: payload) }
        }
        id?.pointee = messageID
        return 0
    }
}

@_cdecl("pb_caps_put_in_place")
public func pb_caps_put_in_place(_ client: OpaquePointer?, _ length: Int, _ fill: FillCallback?, _ context: UnsafeMutableRawPointer?,
                                 _ id: UnsafeMutablePointer<UInt64>?) -> CInt {
    exported { () throws(PatchbayError) -> CInt in
        let client = try object(client, as: CapsClient.self, "client")
        guard let fill else { throw PatchbayError(.invalidArgument, "the fill callback is NULL") }
        let messageID = try client.put(length: length) { buffer in fill(buffer.baseAddress, buffer.count, context) }
        id?.pointee = messageID
        return 0
    }
}

@_cdecl("pb_caps_wait_reply")
public func pb_caps_wait_reply(_ client: OpaquePointer?, _ m: UnsafeMutablePointer<pb_caps_message>?,
                               _ data: UnsafeMutableRawPointer?, _ capacity: Int) -> CInt {
    exported { () throws(PatchbayError) -> CInt in
        let client = try object(client, as: CapsClient.self, "client")
        return try deliver(try client.wait(into: try buffer(data, capacity)), of: client, m)
    }
}

@_cdecl("pb_caps_client_get")
public func pb_caps_client_get(_ client: OpaquePointer?, _ m: UnsafeMutablePointer<pb_caps_message>?,
                               _ data: UnsafeMutableRawPointer?, _ capacity: Int) -> CInt {
    exported { () throws(PatchbayError) -> CInt in
        let client = try object(client, as: CapsClient.self, "client")
        return try deliver(try client.get(into: try buffer(data, capacity)), of: client, m)
    }
}

/// `wait_reply` and `client_get`: the header into `m`, the reply into the buffer and its full
/// length (as `deliver` above), or the errno the service answered with. A request the service
/// left unanswered when it went away comes back as a 0-byte reply, as in DragonFly.
private func deliver(_ reply: CapsReply, of client: CapsClient, _ m: UnsafeMutablePointer<pb_caps_message>?) throws(PatchbayError) -> CInt {
    m?.pointee = pb_caps_message(reply: reply.messageID, length: reply.length)
    if let errno = reply.error { throw CapsClient.serviceError(errno, for: reply.messageID, limit: client.maximumInFlight) }
    return CInt(clamping: reply.length)
}

@_cdecl("pb_caps_receive_reply")
public func pb_caps_receive_reply(_ client: OpaquePointer?, _ read: ReadCallback?, _ context: UnsafeMutableRawPointer?) -> CInt {
    exported { () throws(PatchbayError) -> CInt in
        let client = try object(client, as: CapsClient.self, "client")
        guard let read else { throw PatchbayError(.invalidArgument, "the read callback is NULL") }
        var result: CInt = 0
        try client.waitReply { (id: UInt64, payload: UnsafeRawBufferPointer) in
            var header = pb_caps_message(reply: id, length: payload.count)
            result = read(&header, payload.baseAddress, payload.count, context)
        }
        return result
    }
}

@_cdecl("pb_caps_client_fd")
public func pb_caps_client_fd(_ client: OpaquePointer?) -> CInt {
    exported { () throws(PatchbayError) -> CInt in try object(client, as: CapsClient.self, "client").eventDescriptor }
}

@_cdecl("pb_caps_client_close")
public func pb_caps_client_close(_ client: OpaquePointer?) {
    release(client, as: CapsClient.self)
}
