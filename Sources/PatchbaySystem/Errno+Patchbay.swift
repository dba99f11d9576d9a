package import SystemPackage
import Glibc

extension Errno {
    /// The calling thread's `errno`, as the last failed call left it.
    @inline(__always)
    package static var current: Errno { Errno(rawValue: Glibc.errno) }

    /// The C name of the error (`"ENOENT"`), the form the CLI and the logs print.
    package var name: String {
        errnoNames[rawValue] ?? "E\(rawValue)"
    }

}

/// Runs a system call, retrying it while it fails with `EINTR`, and turns `-1` into a thrown
/// `Errno`. The one place in Patchbay where `EINTR` is retried.
@inline(__always)
package func syscallRetrying<T: FixedWidthInteger>(_ call: () -> T) throws(Errno) -> T {
    while true {
        let result = call()
        if result != -1 { return result }
        let error = Errno.current
        if error != .interrupted { throw error }
    }
}

private let errnoNames: [CInt: String] = [
    EPERM: "EPERM", ENOENT: "ENOENT", ESRCH: "ESRCH", EINTR: "EINTR", EIO: "EIO",
    ENXIO: "ENXIO", E2BIG: "E2BIG", EBADF: "EBADF", ECHILD: "ECHILD", EAGAIN: "EAGAIN",
    ENOMEM: "ENOMEM", EACCES: "EACCES", EFAULT: "EFAULT", EBUSY: "EBUSY", EEXIST: "EEXIST",
    ENODEV: "ENODEV", ENOTDIR: "ENOTDIR", EISDIR: "EISDIR", EINVAL: "EINVAL", ENFILE: "ENFILE",
    EMFILE: "EMFILE", ENOSPC: "ENOSPC", ESPIPE: "ESPIPE", EROFS: "EROFS", EPIPE: "EPIPE",
    ERANGE: "ERANGE", ENAMETOOLONG: "ENAMETOOLONG", ENOSYS: "ENOSYS", ENOTEMPTY: "ENOTEMPTY",
    ENOTSOCK: "ENOTSOCK", EMSGSIZE: "EMSGSIZE", EPROTOTYPE: "EPROTOTYPE",
    EPROTONOSUPPORT: "EPROTONOSUPPORT", EOPNOTSUPP: "EOPNOTSUPP", EADDRINUSE: "EADDRINUSE",
    EADDRNOTAVAIL: "EADDRNOTAVAIL", ECONNABORTED: "ECONNABORTED", ECONNRESET: "ECONNRESET",
    ENOBUFS: "ENOBUFS", EISCONN: "EISCONN", ENOTCONN: "ENOTCONN", ETIMEDOUT: "ETIMEDOUT",
    ECONNREFUSED: "ECONNREFUSED", EDQUOT: "EDQUOT", EPROTO: "EPROTO", ECANCELED: "ECANCELED",
    EOVERFLOW: "EOVERFLOW", EBADMSG: "EBADMSG", ETXTBSY: "ETXTBSY", EFBIG: "EFBIG",
]
