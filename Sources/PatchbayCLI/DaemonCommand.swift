import ArgumentParser
import CPatchbayShims
import Glibc
import Logging
import Patchbay
import PatchbaySystem
import SystemPackage
import PatchbayBroker
import PatchbayProtocol

/// `patchbay daemon` (also `patchbayd`): runs the broker in the foreground until SIGTERM/SIGINT.
public struct DaemonCommand: ParsableCommand {
    public static let configuration = CommandConfiguration(
        commandName: "daemon",
        abstract: "Run the broker.",
        discussion: """
            Per-user by default: the socket is $XDG_RUNTIME_DIR/patchbay/patchbay.sock (or \
            /tmp/patchbay-$EUID/patchbay.sock) in a directory of mode 0700, and only this uid may \
            connect. --system serves every uid at /run/patchbay/patchbay.sock, and root alone at \
            /run/patchbay/patchbay.sock.root (mode 0600), which root's clients try first so that \
            other users cannot make root's connections wait. An inherited listening socket \
            (LISTEN_FDS=1, LISTEN_PID, fd 3) is used instead of creating the first one.
            """,
        version: PatchbayProtocol.patchbayVersion
    )

    @Option(parsing: .unconditional, help: "Listen on this socket path.")
    var socket: String?

    @Flag(help: "Serve every user (socket /run/patchbay/patchbay.sock, mode 0666; root's own beside it, <socket>.root, mode 0600).")
    var system = false

    @Option(name: .customLong("shm-directory"), parsing: .unconditional,
            help: "Private directory for named shared memory (default: shm/ beside the per-user socket under $XDG_RUNTIME_DIR, else /dev/shm/patchbay-$UID[-hash]; /dev/shm/patchbay-system with --system).")
    var sharedMemoryDirectory: String?

    @Option(parsing: .unconditional, help: "Outstanding keys allowed per uid (EDQUOT beyond).")
    var maxKeysPerUid = 4096

    @Option(parsing: .unconditional, help: "Named shared memory objects allowed per uid (EDQUOT beyond).")
    var maxShmObjectsPerUid = 4096

    @Option(parsing: .unconditional, help: "Memory a uid's named shared memory may occupy before it can create no more (e.g. 8G, 512M).")
    var maxShmBytesPerUid = "8G"

    @Option(parsing: .unconditional, help: "/net sockets allowed open per uid (EDQUOT beyond).")
    var maxSocketsPerUid = 4096

    @Option(parsing: .unconditional, help: "CAPS services allowed registered per uid (EDQUOT beyond).")
    var maxServicesPerUid = 256

    @Option(parsing: .unconditional, help: "Connections one uid other than root may have open to one CAPS service of another uid (EDQUOT beyond).")
    var maxCapsClientsPerUid = 64

    @Option(parsing: .unconditional, help: "CAPS names a uid may have remembered for their generations; past it, its least recently registered name not registered now is forgotten.")
    var maxCapsNamesPerUid = 1024

    @Option(parsing: .unconditional, help: "How long a CAPS name registered when the broker last stopped stays its holder's uid's, until that uid registers it again (e.g. 30s, 2m; 0 keeps none): another uid's registration meanwhile is EEXIST.")
    var capsNameGrace = "30s"

    @Option(parsing: .unconditional, help: "The listen backlog of the broker's socket (the kernel caps it at net.core.somaxconn). Root's own socket beside the system broker's has its own.")
    var listenBacklog: Int32 = 4096

    @Option(parsing: .unconditional, help: "New connections a uid other than root may open to the broker in a burst before it is slowed down (EAGAIN beyond).")
    var connectionBurstPerUid = 1024

    @Option(parsing: .unconditional, help: "New connections per second a uid other than root is allowed once its burst is spent.")
    var connectionsPerSecondPerUid = 512.0

    @Option(parsing: .unconditional, help: "Connections a uid other than root may make to /net listeners in a burst before the broker closes them unaccepted.")
    var netConnectionBurstPerUid = 4096

    @Option(parsing: .unconditional, help: "Connections per second a uid other than root may make to /net listeners once its burst is spent.")
    var netConnectionsPerSecondPerUid = 2048.0

    @Option(parsing: .unconditional, help: "Failed claims a uid may make in a burst before it is slowed down.")
    var failedClaimBurst = 64

    @Option(parsing: .unconditional, help: "Failed claims per second a uid is allowed once its burst is spent.")
    var failedClaimsPerSecond = 16.0

    @Option(parsing: .unconditional, help: "How long a claimer has to acknowledge a claimed descriptor (e.g. 10s, 500ms).")
    var claimAckTimeout = "10s"

    @Flag(help: "Keep each key's file, and each uid's shared memory tmpfs (--system), in the service manager's descriptor store ($NOTIFY_SOCKET, systemd's FileDescriptorStoreMax=), so they survive a restart or a crash.")
    var fdStore = false

    @Option(parsing: .unconditional, help: "Read name reservations from the *.conf files of this directory (system broker; default /etc/patchbay/policy.d).")
    var policyDirectory: String?

    @Option(parsing: .unconditional, help: "Messages a client may leave unread before the broker refuses to queue more for it (CAPS connection notices: the connecting client gets EAGAIN).")
    var maxQueuedMessages = 4096

    @Option(parsing: .unconditional, help: "How long a client may leave its full reply queue unread before it is disconnected (e.g. 30s).")
    var stuckClientTimeout = "30s"

    @Option(parsing: .unconditional, help: "How long the close of a descriptor a client handed over may wait (a lingering TCP socket) before it is interrupted (e.g. 5s, or never).")
    var closeTimeout = "5s"

    @Option(parsing: .unconditional, help: "Log level: trace, debug, info, notice, warning, error, critical.")
    var logLevel = "info"

    @Option(parsing: .unconditional, help: "Write \"ready\" to this descriptor once listening, then close it.")
    var readyFd: Int32?

    @Flag(help: "Fork into the background first (used when a client starts the broker).")
    var detach = false

    @Option(parsing: .unconditional, help: ArgumentHelp("Write the metrics (Prometheus text, as `patchbay metrics` prints them) to this absolute path, replaced atomically, for node_exporter's textfile collector.",
                               valueName: "path"))
    var metricsFile: String?

    @Option(parsing: .unconditional, help: "How often --metrics-file is written (e.g. 15s, 500ms).")
    var metricsInterval = "15s"

    @Option(parsing: .unconditional, help: ArgumentHelp("The --metrics-file's permissions, in octal. The file holds the broker's view, every uid's rows and every service's name: 0640 lets the file's group read it too (a directory with the setgid bit gives the file the directory's group), 0644 lets every user read them.",
                               valueName: "mode"))
    var metricsFileMode = "0600"

    public init() {}

    public func validate() throws {
        guard maxKeysPerUid > 0 else { throw ValidationError("--max-keys-per-uid must be positive") }
        guard maxShmObjectsPerUid > 0 else { throw ValidationError("--max-shm-objects-per-uid must be positive") }
        guard maxSocketsPerUid > 0 else { throw ValidationError("--max-sockets-per-uid must be positive") }
        guard maxCapsClientsPerUid > 0 else { throw ValidationError("--max-caps-clients-per-uid must be positive") }
        guard maxCapsNamesPerUid > 0 else { throw ValidationError("--max-caps-names-per-uid must be positive") }
        guard maxQueuedMessages >= 16 else { throw ValidationError("--max-queued-messages must be at least 16") }
        guard maxServicesPerUid > 0 else { throw ValidationError("--max-services-per-uid must be positive") }
        guard listenBacklog > 0 else { throw ValidationError("--listen-backlog must be positive") }
        guard connectionBurstPerUid > 0 else { throw ValidationError("--connection-burst-per-uid must be positive") }
        guard connectionsPerSecondPerUid.isFinite, connectionsPerSecondPerUid > 0 else {
            throw ValidationError("--connections-per-second-per-uid must be a positive number")
        }
        guard netConnectionBurstPerUid > 0 else { throw ValidationError("--net-connection-burst-per-uid must be positive") }
        guard netConnectionsPerSecondPerUid.isFinite, netConnectionsPerSecondPerUid > 0 else {
            throw ValidationError("--net-connections-per-second-per-uid must be a positive number")
        }
        guard failedClaimBurst > 0 else { throw ValidationError("--failed-claim-burst must be positive") }
        guard failedClaimsPerSecond.isFinite, failedClaimsPerSecond > 0 else {
            throw ValidationError("--failed-claims-per-second must be a positive number")
        }
        guard Logger.Level(rawValue: logLevel) != nil else {
            throw ValidationError("--log-level must be one of trace, debug, info, notice, warning, error, critical")
        }
        if let readyFd {
            let activated = getenv("LISTEN_FDS") != nil
            guard readyFd >= 3, fcntl(readyFd, F_GETFD) >= 0, !(activated && readyFd == 3) else {
                throw ValidationError("--ready-fd must name an open descriptor of 3 or more that is not the activation socket")
            }
        }
    }

    public func run() throws {
        if let metricsFile, !metricsFile.hasPrefix("/") { failUsage("daemon", "--metrics-file needs an absolute path, not \"\(metricsFile)\"") }
        guard case .after(let metricsPeriod) = DurationText.parse(metricsInterval, for: "daemon"), metricsPeriod >= .milliseconds(10) else {
            failUsage("daemon", "--metrics-interval must be a duration of at least 10ms")
        }
        guard let metricsMode = mode_t(metricsFileMode, radix: 8), metricsMode <= 0o666 else {
            failUsage("daemon", "--metrics-file-mode must be octal permissions without execute, setuid, setgid or sticky bits (e.g. 0600, 0640), not \"\(metricsFileMode)\"")
        }
        // The ready descriptor is ours from here on; nothing else may inherit it.
        if let readyFd { _ = fcntl(readyFd, F_SETFD, FD_CLOEXEC) }
        // Started with real ids other than its effective ones (by a set-user-ID program), the
        // broker takes its effective ids for all three: its real user could otherwise signal it,
        // stop it or kill it (fifteenth attack round).
        let (euid, egid) = (geteuid(), getegid())
        if getgid() != egid || getuid() != euid {
            guard pb_become_only(euid, egid) == 0 else {
                fail("daemon", Errno.current, "cannot give up the real uid \(getuid()) and gid \(getgid()) it was started with")
            }
        }
        if detach {
            // Before any thread exists: the parent returns at once to whoever started us, and the
            // broker continues in a child that is no one's zombie, in a session of its own, and
            // holding no directory busy.
            let child = fork()
            if child < 0 { fail("daemon", Errno.current, "fork failed") }
            if child > 0 { _exit(0) }
            _ = setsid()
            _ = chdir("/")
        }
        let level = Logger.Level(rawValue: logLevel)!
        LoggingSystem.bootstrap { label in
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = level
            return handler
        }
        let logger = Logger(label: "patchbayd")

        let mode: BrokerConfiguration.Mode = system ? .system : .user
        var configuration = BrokerConfiguration(
            mode: mode, socketPath: socket ?? BrokerConfiguration.defaultSocketPath(mode: mode),
            sharedMemoryDirectory: sharedMemoryDirectory)
        configuration.maximumKeysPerUser = maxKeysPerUid
        configuration.maximumSharedMemoryObjectsPerUser = maxShmObjectsPerUid
        configuration.maximumSharedMemoryBytesPerUser = parseSize(maxShmBytesPerUid, "daemon")
        if configuration.maximumSharedMemoryBytesPerUser == 0 {
            failUsage("daemon", "--max-shm-bytes-per-uid must be positive")
        }
        configuration.maximumSocketsPerUser = maxSocketsPerUid
        configuration.maximumQueuedRepliesPerClient = maxQueuedMessages
        configuration.keepKeysWithServiceManager = fdStore
        configuration.maximumServicesPerUser = maxServicesPerUid
        configuration.maximumCapsClientsPerUser = maxCapsClientsPerUid
        configuration.maximumCapsNamesPerUser = maxCapsNamesPerUid
        if let policyDirectory { configuration.policyDirectory = policyDirectory }
        configuration.listenBacklog = listenBacklog
        configuration.connectionBurstPerUser = connectionBurstPerUid
        configuration.connectionsPerSecondPerUser = connectionsPerSecondPerUid
        configuration.netConnectionBurstPerUser = netConnectionBurstPerUid
        configuration.netConnectionsPerSecondPerUser = netConnectionsPerSecondPerUid
        configuration.failedClaimBurst = failedClaimBurst
        configuration.failedClaimsPerSecond = failedClaimsPerSecond
        if case .after(let duration) = DurationText.parse(claimAckTimeout, for: "daemon") {
            configuration.claimAcknowledgementTimeout = nanoseconds(duration)
        } else {
            failUsage("daemon", "--claim-ack-timeout must be a duration, not never")
        }
        if ["0", "0s", "0ms"].contains(capsNameGrace) {
            configuration.capsNameGrace = 0
        } else if case .after(let duration) = DurationText.parse(capsNameGrace, for: "daemon") {
            configuration.capsNameGrace = nanoseconds(duration)
        } else {
            failUsage("daemon", "--caps-name-grace must be a duration or 0, not never")
        }
        if case .after(let duration) = DurationText.parse(stuckClientTimeout, for: "daemon") {
            configuration.stuckClientTimeout = nanoseconds(duration)
        } else {
            failUsage("daemon", "--stuck-client-timeout must be a duration, not never")
        }
        switch DurationText.parse(closeTimeout, for: "daemon") {
        case .never:
            configuration.closeTimeout = 0
        case .after(let duration):
            configuration.closeTimeout = max(1, nanoseconds(duration))
        }

        let server: BrokerServer
        do {
            server = try BrokerServer(configuration: configuration, logger: logger)
        } catch {
            if let readyFd { close(readyFd) }
            fail("daemon", error.errno, error.reason)
        }
        let socketPath = configuration.socketPath
        server.run { [metricsFile] in
            if let metricsFile {
                MetricsFileWriter.start(path: metricsFile, mode: metricsMode, every: metricsPeriod, socketPath: socketPath, logger: logger)
            }
            ServiceManager.notify("READY=1\nSTATUS=serving \(configuration.socketPath)\nMAINPID=\(getpid())")
            if let readyFd {
                let message = Array("ready\n".utf8)
                _ = message.withUnsafeBytes { write(readyFd, $0.baseAddress, $0.count) }
                close(readyFd)
            }
        }
    }
}

/// `--metrics-file`: a thread of the daemon that asks its own broker for the metrics, as any
/// client would, and replaces the file atomically (a temporary file beside it, renamed over it),
/// with `mode` whatever the umask.
enum MetricsFileWriter {
    static func start(path: String, mode: mode_t, every period: Duration, socketPath: String, logger: Logger) {
        startThread {
            var broker: Broker?
            var failing = false
            let (seconds, attoseconds) = period.components
            while true {
                do throws(PatchbayError) {
                    let client: Broker
                    if let broker { client = broker } else {
                        client = try Broker(socketPath: socketPath, autostart: false, reconnect: .never)
                    }
                    broker = client
                    try write(try client.metrics(), to: path, mode: mode)
                    if failing { logger.notice("metrics file written again", metadata: ["path": "\(path)"]) }
                    failing = false
                } catch {
                    broker = nil
                    if !failing { logger.warning("cannot write the metrics file", metadata: ["path": "\(path)", "errno": "\(error.errno.name)", "reason": "\(error.reason)"]) }
                    failing = true
                }
                var pause = timespec(tv_sec: Int(seconds), tv_nsec: Int(attoseconds / 1_000_000_000))
                var remaining = timespec()
                while nanosleep(&pause, &remaining) != 0 && errno == EINTR { pause = remaining }
            }
        }
    }

    private static func write(_ text: String, to path: String, mode: mode_t) throws(PatchbayError) {
        let temporary = path + ".tmp"
        do throws(Errno) {
            // A new file each time (one left by a failed write may be open in a reader that
            // could read what goes into it), made private, then given its mode whatever the umask.
            if unlink(temporary) != 0 && errno != ENOENT { throw Errno.current }
            let file = try openFile(temporary, flags: O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, mode: 0o600)
            guard fchmod(file.rawValue, mode) == 0 else { throw Errno.current }
            try file.writeAll(Array(text.utf8))
            guard rename(temporary, path) == 0 else { throw Errno.current }
        } catch {
            throw PatchbayError(error, "cannot write \(path)")
        }
    }
}

/// A parsed duration in nanoseconds, as the broker's configuration keeps them.
func nanoseconds(_ duration: Duration) -> UInt64 {
    let (seconds, attoseconds) = duration.components
    return UInt64(seconds) * 1_000_000_000 + UInt64(attoseconds / 1_000_000_000)
}
