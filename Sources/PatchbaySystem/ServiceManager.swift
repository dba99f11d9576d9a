// The service manager's readiness protocol (systemd's sd_notify), written here: one datagram of
// `KEY=value` lines to the AF_UNIX socket named by $NOTIFY_SOCKET (a path, or `@name` for the
// abstract namespace). No libsystemd.

import Glibc

package enum ServiceManager {
    /// Sends `state` (e.g. `"READY=1\nSTATUS=serving"`) to the service manager, if one asked for
    /// it. Returns whether it was sent; without $NOTIFY_SOCKET there is nobody to tell.
    @discardableResult
    package static func notify(_ state: String) -> Bool {
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
        let sent = withUnsafePointer(to: &address) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { address in
                bytes.withUnsafeBytes { sendto(fd, $0.baseAddress, $0.count, CInt(MSG_NOSIGNAL), address, length) }
            }
        }
        return sent == bytes.count
    }
}
