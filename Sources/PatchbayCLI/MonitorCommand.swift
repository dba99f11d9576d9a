import ArgumentParser
import Glibc
import Patchbay
import PatchbaySystem

/// `patchbay monitor`: the broker's answers, live, one line each.
struct MonitorCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "monitor",
        abstract: "Watch the broker answer requests, live: time, subsystem, operation, caller, object, outcome, time taken.",
        discussion: """
            One line per answered request: share, claim, shared memory open/unlink/rename/stat, /net \
            opens and ctl commands, CAPS registrations and connections, and every refusal with its \
            errno (quotas and rate limits included); one per key that expires (keyExpiry), CAPS \
            client that leaves (capsDisconnect) and service port that closes (capsDeath); and one \
            per message of a service tapped with `caps serve --tap` (tapRequest, tapReply, ...). \
            Never a key's text. Root and the per-user broker's user see everything; another user \
            of the system broker sees its own requests, requests on its objects (its keys, names, \
            sockets, services), and its own services' taps. A monitor that does not keep up is \
            not waited for: a line says how many events it missed. Watching costs the broker \
            nothing while nobody watches. Never starts a broker: with none running it fails with \
            status 69.
            """)

    @Option(name: .customLong("subsystem"), parsing: .unconditionalSingleValue, help: "keys, shm, net, caps, broker, namespace (repeatable; default: all).")
    var subsystems: [String] = []

    @Option(parsing: .unconditional, help: "Only requests of this uid.")
    var uid: Int64?

    @Option(parsing: .unconditional, help: "Only requests of this pid.")
    var pid: Int32?

    @Option(parsing: .unconditional, help: "Only requests about this object (a name, exactly as shown).")
    var name: String?

    @Option(parsing: .unconditional, help: "Stop after this many events.")
    var count: Int?

    @Flag(help: "One JSON object per line.")
    var json = false

    func run() throws {
        var mask: UInt8 = 0
        for word in subsystems {
            switch word {
            case "keys": mask |= 2
            case "namespace": mask |= 4
            case "shm": mask |= 8
            case "net": mask |= 16
            case "caps": mask |= 32
            case "broker": mask |= 1
            default: failUsage("monitor", "\"\(word)\" is not a subsystem; use keys, shm, net, caps, broker or namespace")
            }
        }
        if let count, count < 1 { failUsage("monitor", "--count must be at least 1") }
        let broker: Broker
        do {
            broker = try Broker(socketPath: Broker.defaultSocketPath, autostart: false)
        } catch {
            fail("monitor", error, status: ExitStatus.unavailable)
        }
        let filter = MonitorFilter(subsystems: mask, uid: uid ?? -1, pid: pid ?? 0, name: name ?? "")
        let monitor = attempt("monitor") { () throws(PatchbayError) in try BrokerMonitor(broker, filter: filter) }
        if !json {
            writeStandardOutput("TIME             SUBSYSTEM  OPERATION           PID      UID     COMMAND          OBJECT                          OUTCOME   TOOK      DETAIL\n")
        }
        var seen = 0
        while count.map({ seen < $0 }) ?? true {
            let event = attempt("monitor") { () throws(PatchbayError) in try monitor.next() }
            if event.lost > 0 {
                writeStandardOutput(json ? JSON.object([("lost", "\(event.lost)")]) + "\n"
                                         : "-- \(event.lost) events missed: this monitor did not read fast enough --\n")
            }
            if json {
                writeStandardOutput(JSON.object([
                    ("time_ns", "\(event.time)"), ("subsystem", JSON.string(event.subsystem)),
                    ("operation", JSON.string(event.operation)), ("pid", "\(event.pid)"), ("uid", "\(event.uid)"),
                    ("command", JSON.string(event.command)), ("object", JSON.string(event.object)),
                    ("outcome", JSON.string(event.outcome)), ("elapsed_ns", "\(event.elapsed)"),
                    ("detail", JSON.string(event.detail)),
                    ("payload_hex", JSON.string(event.payload.map { Self.hex($0) }.joined())),
                ]) + "\n")
            } else {
                writeStandardOutput(Self.clock(event.time).padding(17) + event.subsystem.padding(11) + event.operation.padding(20)
                    + "\(event.pid)".padding(9) + "\(event.uid)".padding(8) + terminalSafe(event.command).padding(17)
                    + String(terminalSafe(event.object).prefix(31)).padding(32) + event.outcome.padding(10)
                    + (event.elapsed == 0 ? "-" : formatDuration(nanoseconds: event.elapsed)).padding(10) + terminalSafe(event.detail) + "\n")
                if !event.payload.isEmpty { writeStandardOutput("    | " + Self.printable(event.payload) + "\n") }
            }
            seen += 1
        }
    }

    /// Payload bytes as text: printable ASCII as is, anything else as `\xNN`.
    static func printable(_ bytes: [UInt8]) -> String {
        bytes.map { $0 >= 0x20 && $0 < 0x7F && $0 != UInt8(ascii: "\\") ? String(UnicodeScalar($0)) : "\\x" + hex($0) }.joined()
    }

    static func hex(_ byte: UInt8) -> String {
        let digits = Array("0123456789abcdef")
        return String([digits[Int(byte >> 4)], digits[Int(byte & 15)]])
    }

    /// HH:MM:SS.micro, local time.
    static func clock(_ nanoseconds: UInt64) -> String {
        var seconds = time_t(nanoseconds / 1_000_000_000)
        var parts = tm()
        localtime_r(&seconds, &parts)
        func two(_ value: Int32) -> String { value < 10 ? "0\(value)" : "\(value)" }
        let micro = String(nanoseconds % 1_000_000_000 / 1000)
        return "\(two(parts.tm_hour)):\(two(parts.tm_min)):\(two(parts.tm_sec))." + String(repeating: "0", count: 6 - micro.count) + micro
    }
}
