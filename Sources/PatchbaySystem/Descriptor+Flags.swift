public import SystemPackage
import Glibc
import CPatchbayShims

extension Descriptor {
    /// Lets the descriptor survive `exec` (clears `FD_CLOEXEC`).
    public borrowing func clearCloseOnExec() throws(Errno) {
        _ = try syscallRetrying { pb_clear_cloexec(rawValue) }
    }

    /// Whether `FD_CLOEXEC` is set.
    public borrowing func isCloseOnExec() throws(Errno) -> Bool {
        let flags = try syscallRetrying { fcntl(rawValue, F_GETFD) }
        return flags & FD_CLOEXEC != 0
    }
}
