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
    /// Named shared memory objects one uid may own (`EDQUOT` beyond).
    public var maximumSharedMemoryObjectsPerUser: Int = 4096
    /// Memory one uid's named objects may occupy before it may create no more (`EDQUOT`), in
    /// bytes. Checked at create against the pages its objects hold; see SharedMemoryStore.
    public var maximumSharedMemoryBytesPerUser: Int = 8 << 30
    /// `/net` sockets one uid may hold open (`EDQUOT` beyond), accepted connections included.
    public var maximumSocketsPerUser: Int = 4096
    /// CAPS services one uid may have registered at once (`EDQUOT` beyond).
    public var maximumServicesPerUser: Int = 256
    /// Connections one uid other than root may have open to one service of another uid
    /// (`EDQUOT` beyond).
    public var maximumCapsClientsPerUser: Int = 64
    /// CAPS names one uid may have remembered for their generations; past it, its least recently
    /// registered name not registered now is forgotten.
    public var maximumCapsNamesPerUser: Int = 1024
    /// How long each CAPS name registered when the last broker stopped is kept for the uid that
    /// held it (until it registers the name again), in nanoseconds; 0: not kept.
    public var capsNameGrace: UInt64 = 30_000_000_000
    /// Failed claims a uid may make in a burst before being slowed to `failedClaimsPerSecond`.
    public var failedClaimBurst: Int = 64
    public var failedClaimsPerSecond: Double = 16
    /// How long a claimer has to acknowledge a claimed descriptor before the claim counts as
    /// received (and the broker drops its copy), in nanoseconds.
    public var claimAcknowledgementTimeout: UInt64 = 10_000_000_000
    /// Reply bytes, descriptors and frames queued for a client at which the broker stops reading
    /// its requests until it drains (back-pressure, not a disconnect).
    public var maximumQueuedBytesPerClient: Int = 1 << 20
    public var maximumQueuedDescriptorsPerClient: Int = 64
    public var maximumQueuedFramesPerClient: Int = 256
    /// Reply bytes queued for all of one uid's clients at which the broker stops reading every
    /// one of them, so many connections cannot add up what one may not hold.
    public var maximumQueuedBytesPerUser: Int = 16 << 20
    /// Frames queued for a client past which events other clients cause (CAPS connection notices)
    /// are refused, the connecting client getting EAGAIN; the client itself is never disconnected
    /// for them. Requests stop being read long before replies get there; departure notices (one
    /// per channel the service was told of) may go past it.
    public var maximumQueuedRepliesPerClient: Int = 4096
    /// How long a client may leave its queue full, not reading at all, before it is disconnected,
    /// in nanoseconds.
    public var stuckClientTimeout: UInt64 = 30_000_000_000
    /// How long the close of a descriptor a client handed over may wait (a lingering TCP socket,
    /// a terminal draining) before it is interrupted, in nanoseconds; 0: never.
    public var closeTimeout: UInt64 = 5_000_000_000
    /// Keep every key's file in the service manager's descriptor store (systemd's
    /// `FileDescriptorStoreMax=`, through `$NOTIFY_SOCKET`), so keys survive a restart or a
    /// crash. Also on when the manager says it keeps descriptors (`$FDSTORE`).
    public var keepKeysWithServiceManager = false
    /// The most clients connected at once; further connections are refused (EAGAIN).
    public var maximumClients: Int = 65536
    /// The most connections one uid may hold, so one user cannot take every slot.
    public var maximumClientsPerUser: Int = 16384
    /// New connections one uid other than root (and the per-user broker's own) may open in a
    /// burst, then per second: past them a connection is refused (`EAGAIN`) before the broker
    /// looks at its process, so connecting and closing in a loop costs the broker little.
    public var connectionBurstPerUser: Int = 1024
    /// The listen backlog of the broker's socket (and of root's own beside the system broker's).
    public var listenBacklog: Int32 = 4096
    public var connectionsPerSecondPerUser: Double = 512
    /// Connections one uid other than root may make to `/net` listeners in a burst, then per
    /// second: past them the broker closes them unread rather than accept and hand them over.
    public var netConnectionBurstPerUser: Int = 4096
    public var netConnectionsPerSecondPerUser: Double = 2048

    /// Where the name reservations of the system broker are read from at start (`*.conf` files,
    /// see Policy.swift); nil for none. The system broker's default is `/etc/patchbay/policy.d`.
    public var policyDirectory: String?

    /// The private directory (mode 0700, normally on tmpfs) holding named shared memory objects.
    public var sharedMemoryDirectory: String

    /// Where bound `/net/local` names live as real AF_UNIX socket files: `net/` beside the
    /// broker's socket.
    public var netDirectory: String

    public init(mode: Mode, socketPath: String, sharedMemoryDirectory: String? = nil, netDirectory: String? = nil) {
        self.mode = mode
        self.socketPath = socketPath
        self.sharedMemoryDirectory = sharedMemoryDirectory
            ?? Self.defaultSharedMemoryDirectory(mode: mode, socketPath: socketPath)
        let socketDirectory = socketPath.lastIndex(of: "/").map { String(socketPath[..<$0]) } ?? "."
        self.netDirectory = netDirectory ?? (socketDirectory.isEmpty ? "/net" : socketDirectory + "/net")
        policyDirectory = mode == .system ? "/etc/patchbay/policy.d" : nil
    }

    /// `/dev/shm/patchbay-system` for the system broker; for the per-user broker at its default
    /// path, `shm/` beside its socket when that lives in `$XDG_RUNTIME_DIR` (a tmpfs by
    /// definition), else `/dev/shm/patchbay-$UID`; for a broker on any other socket,
    /// `/dev/shm/patchbay-$UID-<hash of the socket path>`. So restarting a broker on the same
    /// socket finds its objects again, and two brokers never share a store.
    public static func defaultSharedMemoryDirectory(mode: Mode, socketPath: String) -> String {
        if mode == .system { return "/dev/shm/patchbay-system" }
        let base = "/dev/shm/patchbay-\(geteuid())"
        if socketPath == defaultSocketPath(mode: .user) {
            if let runtime = getenv("XDG_RUNTIME_DIR").map({ String(cString: $0) }), runtime.hasPrefix("/") {
                return userBrokerDirectory(uid: geteuid(), xdgRuntimeDirectory: runtime) + "/shm"
            }
            return base
        }
        var hash: UInt64 = 0xCBF2_9CE4_8422_2325  // FNV-1a
        for byte in socketPath.utf8 {
            hash = (hash ^ UInt64(byte)) &* 0x100_0000_01B3
        }
        let hex = String(hash, radix: 16)
        return base + "-" + String(repeating: "0", count: 16 - hex.count) + hex
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
