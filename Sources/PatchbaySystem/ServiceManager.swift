// The service manager's readiness protocol (systemd's sd_notify), written here: one datagram of
// `KEY=value` lines to the AF_UNIX socket named by $NOTIFY_SOCKET (a path, or `@name` for the
// abstract namespace). No libsystemd.

import Glibc

package enum ServiceManager {
    /// Sends `state` (e.g. `"READY=1\nSTATUS=serving"`) to the service manager, if one asked for
    /// it. Returns whether it was sent; without $NOTIFY_SOCKET there is nobody to tell.
    @discardableResult
    package static func notify(_ state: String) -> Bool {
        notify(state, descriptors: [])
    }

    /// Whether the service manager keeps descriptors for this service: `$NOTIFY_SOCKET` is set and
    /// `$FDSTORE` (systemd's `FileDescriptorStoreMax=`) is positive.
    package static var keepsDescriptors: Bool {
        guard getenv("NOTIFY_SOCKET") != nil, let raw = getenv("FDSTORE"), let count = Int(String(cString: raw)) else { return false }
        return count > 0
    }

    /// `notify` with descriptors beside the message (`SCM_RIGHTS`), for `FDSTORE=1`.
    @discardableResult
    package static func notify(_ state: String, descriptors: [CInt]) -> Bool {
        guard let raw = getenv("NOTIFY_SOCKET") else { return false }
        var name = Array(String(cString: raw).utf8)
        guard name.count >= 2, name[0] == UInt8(ascii: "/") || name[0] == UInt8(ascii: "@") else { return false }
        if name[0] == UInt8(ascii: "@") { name[0] = 0 }  // abstract: a leading NUL
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let capacity = MemoryLayout.size(ofValue: address.sun_path)
        guard name.count < capacity else { return false }
        withUnsafeMutableBytes(of: &address.sun_path) { $0.copyBytes(from: name) }
        let length = socklen_t(MemoryLayout<sa_family_t>.size + name.count)
        let fd = socket(AF_UNIX, CInt(SOCK_DGRAM.rawValue) | CInt(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        let bytes = Array(state.utf8)
        let connected = withUnsafePointer(to: &address) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, length) }
        }
        guard connected == 0 else { return false }
        let sent = bytes.withUnsafeBytes { raw in
            descriptors.withUnsafeBufferPointer { SeqpacketSocket.sendRaw(fd, raw, $0, nonblocking: true) }
        }
        return sent == bytes.count
    }
}
