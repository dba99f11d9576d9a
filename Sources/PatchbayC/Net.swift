// libpatchbay: sockets through /net (patchbay.h, "Sockets through /net").

import CPatchbayABI
import Glibc
import Patchbay
import Synchronization

/// A `/net` socket as C holds it.
final class SocketHandle {
    let socket: Socket
    /// The data descriptor made non-blocking for `PB_NET_NONBLOCK` (-1: none yet), so that
    /// `pb_net_data`, called before each send or receive, changes its flags only the first time.
    let madeNonblocking = Atomic<CInt>(-1)
    init(_ socket: consuming Socket) { self.socket = socket }
}


func socketKind(_ type: UnsafePointer<CChar>?) throws(PatchbayError) -> Socket.Kind {
    let name = try string(type, "the socket type")
    guard let kind = Socket.Kind(rawValue: name) else {
        throw PatchbayError(.invalidArgument, "\"\(name.prefix(40))\" is not a socket type: seqpacket, stream or dgram")
    }
    return kind
}

func checkNetFlags(_ flags: CUnsignedInt) throws(PatchbayError) -> Bool {
    guard flags & ~CUnsignedInt(PB_NET_NONBLOCK) == 0 else {
        throw PatchbayError(.invalidArgument, "unknown flags \(flags): only PB_NET_NONBLOCK")
    }
    return flags & CUnsignedInt(PB_NET_NONBLOCK) != 0
}

@_cdecl("pb_net_open")
public func pb_net_open(_ broker: OpaquePointer?, _ type: UnsafePointer<CChar>?, _ flags: CUnsignedInt,
                        _ out: UnsafeMutablePointer<OpaquePointer?>?) -> CInt {
    exported { () throws(PatchbayError) -> CInt in
        let broker = try object(broker, as: Broker.self, "broker")
        let out = try checkOut(out)
        let nonblocking = try checkNetFlags(flags)
        out.pointee = handle(SocketHandle(try Socket.open(broker, type: try socketKind(type), nonblocking: nonblocking)))
        return 0
    }
}

@_cdecl("pb_net_ctl")
public func pb_net_ctl(_ socket: OpaquePointer?, _ command: UnsafePointer<CChar>?) -> CInt {
    exported { () throws(PatchbayError) -> CInt in
        try object(socket, as: SocketHandle.self, "socket").socket.control(line: try string(command, "the command"))
        return 0
    }
}

@_cdecl("pb_net_accept")
public func pb_net_accept(_ listener: OpaquePointer?, _ flags: CUnsignedInt, _ out: UnsafeMutablePointer<OpaquePointer?>?) -> CInt {
    exported { () throws(PatchbayError) -> CInt in
        let listener = try object(listener, as: SocketHandle.self, "listener")
        let out = try checkOut(out)
        let nonblocking = try checkNetFlags(flags)
        out.pointee = handle(SocketHandle(try listener.socket.accept(nonblocking: nonblocking ? true : nil)))
        return 0
    }
}

@_cdecl("pb_net_data")
public func pb_net_data(_ socket: OpaquePointer?) -> CInt {
    exported { () throws(PatchbayError) -> CInt in
        let held = try object(socket, as: SocketHandle.self, "socket")
        let fd = try openedData(held)
        // PB_NET_NONBLOCK: C's data calls are the kernel's, on this descriptor.
        if held.socket.nonblocking, held.madeNonblocking.load(ordering: .relaxed) != fd {
            _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
            held.madeNonblocking.store(fd, ordering: .relaxed)
        }
        return fd
    }
}

/// The data descriptor, opening a bound datagram socket's data file on first use (`pb_net_data`).
private func openedData(_ held: SocketHandle) throws(PatchbayError) -> CInt {
    if held.socket.dataDescriptor < 0 && held.socket.kind == .dgram { try held.socket.openDataInPlace() }
    guard held.socket.dataDescriptor >= 0 else {
        throw PatchbayError(.socketNotConnected, "socket \(held.socket.id) is not connected (no data descriptor yet)")
    }
    return held.socket.dataDescriptor
}

@_cdecl("pb_net_recv")
public func pb_net_recv(_ socket: OpaquePointer?, _ buffer: UnsafeMutableRawPointer?, _ capacity: Int,
                        _ from: UnsafeMutableRawPointer?, _ fromLength: UnsafeMutablePointer<socklen_t>?) -> Int {
    do throws(PatchbayError) {
        let held = try object(socket, as: SocketHandle.self, "socket")
        let buffer = try PatchbayC.buffer(buffer, capacity)
        if from != nil && fromLength == nil { throw PatchbayError(.invalidArgument, "from is given without fromlen") }
        _ = try openedData(held)
        let received = try held.socket.receive(into: buffer, wantSender: from != nil, interruptible: true)
        if let from, let fromLength {
            // As recvfrom(2): at most *fromlen bytes of the address, and its whole length back.
            let bytes = received.sender?.bytes ?? []
            let room = Int(fromLength.pointee)
            bytes.withUnsafeBytes { raw in
                if let base = raw.baseAddress { from.copyMemory(from: base, byteCount: min(room, raw.count)) }
            }
            fromLength.pointee = socklen_t(bytes.count)
        }
        return received.messageLength
    } catch {
        return Int(fail(error))
    }
}

@_cdecl("pb_net_reply")
public func pb_net_reply(_ socket: OpaquePointer?, _ data: UnsafeRawPointer?, _ length: Int,
                         _ to: UnsafeRawPointer?, _ toLength: socklen_t) -> Int {
    do throws(PatchbayError) {
        let held = try object(socket, as: SocketHandle.self, "socket")
        let data = try bytes(data, length)
        guard let to else { throw PatchbayError(.invalidArgument, "the address is NULL") }
        guard toLength >= 2, Int(toLength) <= MemoryLayout<sockaddr_un>.size else {
            throw PatchbayError(.invalidArgument, "an address of \(toLength) bytes is not a sockaddr_un")
        }
        guard to.loadUnaligned(as: sa_family_t.self) == sa_family_t(AF_UNIX) else {
            throw PatchbayError(.addressFamilyNotSupported, "the address is not AF_UNIX")
        }
        _ = try openedData(held)
        let address = Socket.Address(bytes: Array(UnsafeRawBufferPointer(start: to, count: Int(toLength))))
        return try held.socket.reply(data, to: address)
    } catch {
        return Int(fail(error))
    }
}

@_cdecl("pb_net_fd")
public func pb_net_fd(_ socket: OpaquePointer?) -> CInt {
    exported { () throws(PatchbayError) -> CInt in
        try object(socket, as: SocketHandle.self, "socket").socket.kernelDescriptor
    }
}

@_cdecl("pb_net_id")
public func pb_net_id(_ socket: OpaquePointer?) -> UInt64 {
    guard let socket else { return 0 }
    return Unmanaged<SocketHandle>.fromOpaque(UnsafeRawPointer(socket)).takeUnretainedValue().socket.id
}

@_cdecl("pb_net_listen")
public func pb_net_listen(_ broker: OpaquePointer?, _ name: UnsafePointer<CChar>?, _ type: UnsafePointer<CChar>?,
                          _ out: UnsafeMutablePointer<OpaquePointer?>?) -> CInt {
    exported { () throws(PatchbayError) -> CInt in
        let broker = try object(broker, as: Broker.self, "broker")
        let out = try checkOut(out)
        out.pointee = handle(SocketHandle(try Socket.listen(broker, name: try string(name, "the name"), type: try socketKind(type))))
        return 0
    }
}

@_cdecl("pb_net_connect")
public func pb_net_connect(_ broker: OpaquePointer?, _ name: UnsafePointer<CChar>?, _ type: UnsafePointer<CChar>?,
                           _ out: UnsafeMutablePointer<OpaquePointer?>?) -> CInt {
    exported { () throws(PatchbayError) -> CInt in
        let broker = try object(broker, as: Broker.self, "broker")
        let out = try checkOut(out)
        out.pointee = handle(SocketHandle(try Socket.connect(broker, to: try string(name, "the name"), type: try socketKind(type))))
        return 0
    }
}

@_cdecl("pb_net_close")
public func pb_net_close(_ socket: OpaquePointer?) {
    release(socket, as: SocketHandle.self)
}
