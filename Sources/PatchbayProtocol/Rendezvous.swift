// Where clients find the broker. Part of the protocol because every client, in any language,
// must compute the same path.

/// The socket file name inside the broker's directory.
public let brokerSocketName = "patchbay.sock"

/// The system-wide broker's socket (`patchbay daemon --system`).
public let systemBrokerSocketPath = "/run/patchbay/patchbay.sock"

/// Root's own socket beside a system broker's socket `path`: mode 0600, so no other uid can
/// connect to it, and root's connections never wait in a listen backlog that other users can
/// fill. A client running as root tries it first, and uses it only if the broker there runs as
/// root (PROTOCOL.md §2).
public func rootSocketPath(forBrokerAt path: String) -> String { path + ".root" }

/// The per-user broker's directory: `$XDG_RUNTIME_DIR/patchbay` when that variable names an
/// absolute path, else `/tmp/patchbay-$UID`. The directory must be mode 0700 and owned by the user.
public func userBrokerDirectory(uid: UInt32, xdgRuntimeDirectory: String?) -> String {
    if let runtime = xdgRuntimeDirectory, runtime.hasPrefix("/") {
        return runtime.hasSuffix("/") ? runtime + "patchbay" : runtime + "/patchbay"
    }
    return "/tmp/patchbay-\(uid)"
}

/// The per-user broker's socket path.
public func userBrokerSocketPath(uid: UInt32, xdgRuntimeDirectory: String?) -> String {
    userBrokerDirectory(uid: uid, xdgRuntimeDirectory: xdgRuntimeDirectory) + "/" + brokerSocketName
}
