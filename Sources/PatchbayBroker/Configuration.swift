import Glibc
import PatchbayProtocol

/// How a broker runs: where it listens, whom it serves, and its limits.
public struct BrokerConfiguration: Sendable {
    public enum Mode: String, Sendable {
        /// Serves one uid (the broker's own); every other uid is refused at connect.
        case user
        /// Serves every uid; objects carry owners and modes checked from kernel credentials.
        case system
    }

    public var mode: Mode
    /// The socket path to create, or nil to use an inherited listening socket (`LISTEN_FDS`).
    public var socketPath: String
    /// Outstanding keys allowed per uid (`EDQUOT` beyond).
    public var maximumKeysPerUser: Int = 4096
    /// Failed claims a uid may make in a burst before being slowed to `failedClaimsPerSecond`.
    public var failedClaimBurst: Int = 64
    public var failedClaimsPerSecond: Double = 16
    /// Replies queued for a client that does not read before it is disconnected.
    public var maximumQueuedRepliesPerClient: Int = 1024
    /// The most clients connected at once; further connections are refused.
    public var maximumClients: Int = 65536

    public init(mode: Mode, socketPath: String) {
        self.mode = mode
        self.socketPath = socketPath
    }

    /// The default for `mode`: `/run/patchbay/patchbay.sock` for system, else the per-user path
    /// from `XDG_RUNTIME_DIR` (or `/tmp/patchbay-$UID`).
    public static func defaultSocketPath(mode: Mode) -> String {
        switch mode {
        case .system:
            return systemBrokerSocketPath
        case .user:
            let runtime = getenv("XDG_RUNTIME_DIR").map { String(cString: $0) }
            return userBrokerSocketPath(uid: geteuid(), xdgRuntimeDirectory: runtime)
        }
    }
}
