// Resource limits of the running process.

package import SystemPackage
import Glibc

/// The process's descriptor limit (`RLIMIT_NOFILE`).
package struct DescriptorLimit: Sendable, Equatable {
    /// The limit in force: `open` fails with `EMFILE` at this many descriptors.
    package var soft: Int
    /// How far the soft limit may be raised without privilege.
    package var hard: Int

    /// The current limits. The corresponding C call is `getrlimit(RLIMIT_NOFILE)`.
    package static func current() throws(Errno) -> DescriptorLimit {
        var limit = rlimit()
        _ = try syscallRetrying { getrlimit(CInt(RLIMIT_NOFILE.rawValue), &limit) }
        return DescriptorLimit(soft: Int(clamping: limit.rlim_cur), hard: Int(clamping: limit.rlim_max))
    }

    /// Raises the limit as far as allowed and returns what is in force afterwards: the soft limit
    /// goes to the hard one, and a privileged process (root, or `CAP_SYS_RESOURCE`) also raises
    /// the hard limit up to the kernel's ceiling, `/proc/sys/fs/nr_open`.
    @discardableResult
    package static func raiseToMaximum() -> DescriptorLimit? {
        var limit = rlimit()
        guard getrlimit(CInt(RLIMIT_NOFILE.rawValue), &limit) == 0 else { return nil }
        if let ceiling = kernelCeiling(), ceiling > limit.rlim_max {
            var raised = rlimit(rlim_cur: ceiling, rlim_max: ceiling)
            if setrlimit(CInt(RLIMIT_NOFILE.rawValue), &raised) == 0 { return try? current() }
        }
        if limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max
            _ = setrlimit(CInt(RLIMIT_NOFILE.rawValue), &limit)
        }
        return try? current()
    }

    /// `/proc/sys/fs/nr_open`: no process may have more descriptors than this.
    private static func kernelCeiling() -> rlim_t? {
        guard let file = try? openFile("/proc/sys/fs/nr_open", flags: O_RDONLY),
              let bytes = try? file.readToEnd(limit: 32)
        else { return nil }
        return rlim_t(String(decoding: bytes, as: UTF8.self).split(separator: "\n").first ?? "")
    }
}
