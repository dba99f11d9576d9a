import ArgumentParser
import Glibc
import Patchbay
import PatchbaySystem
import SystemPackage

/// `patchbay status [--json]`.
struct StatusCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "status",
        abstract: "Show the broker's pid, version, uptime, clients and object counts per uid."
    )

    @Flag(help: "Print JSON.")
    var json = false

    @Flag(help: "Start the per-user broker if none runs (as any other command would), then report.")
    var start = false

    func run() throws {
        // Asking never starts a broker unless told to: not running is an answer (status 3, as
        // systemctl says).
        let path = Broker.defaultSocketPath
        let broker: Broker
        do {
            broker = start ? try Broker() : try Broker(socketPath: path, autostart: false)
        } catch {
            if error.errno == .noSuchFileOrDirectory || error.errno == .connectionRefused {
                writeStandardOutput(json ? "{\"running\": false, \"socket\": \(JSON.string(path))}\n" : "not running (no broker at \(path))\n")
                Glibc.exit(3)
            }
            fail("status", error, status: ExitStatus.unavailable)
        }
        let report: StatusReport
        do {
            report = try broker.status()
        } catch {
            fail("status", error)
        }
        writeStandardOutput(json ? Self.json(report) : Self.text(report))
    }

    static func json(_ report: StatusReport) -> String {
        let users = report.users.map { user in
            JSON.object([
                ("uid", "\(user.uid)"), ("clients", "\(user.clients)"), ("keys", "\(user.keys)"),
                ("shared_memory_objects", "\(user.sharedMemoryObjects)"), ("sockets", "\(user.sockets)"),
                ("services", "\(user.services)"), ("oldest_key_age_ns", "\(user.oldestKeyAgeNanoseconds)"),
            ])
        }
        let kinds = report.keysByFileKind.sorted { $0.key < $1.key }.map { kind, count in
            (FileKind(rawValue: kind)?.name ?? "unknown", "\(count)")
        }
        return JSON.object([
            ("pid", "\(report.pid)"), ("version", JSON.string(report.version)), ("mode", JSON.string(report.mode)),
            ("socket", JSON.string(report.socketPath)), ("uptime_ns", "\(report.uptimeNanoseconds)"),
            ("clients", "\(report.clients)"), ("keys", "\(report.keys)"),
            ("shared_memory_objects", "\(report.sharedMemoryObjects)"), ("sockets", "\(report.sockets)"),
            ("services", "\(report.services)"), ("keys_by_file_kind", JSON.object(kinds)),
            ("users", JSON.array(users)),
        ]) + "\n"
    }

    static func text(_ report: StatusReport) -> String {
        var out = """
            broker    pid \(report.pid), version \(report.version), \(report.mode) mode
            socket    \(report.socketPath)
            uptime    \(formatDuration(nanoseconds: report.uptimeNanoseconds))
            clients   \(report.clients)
            objects   \(report.keys) keys, \(report.sharedMemoryObjects) shared memory objects, \(report.sockets) sockets, \(report.services) services

            """
        if !report.keysByFileKind.isEmpty {
            let kinds = report.keysByFileKind.sorted { $0.key < $1.key }.map { kind, count in
                "\(count) \(FileKind(rawValue: kind)?.name ?? "unknown")"
            }
            out += "keys hold \(kinds.joined(separator: ", "))\n"
        }
        out += "\n" + pad("uid", 8) + pad("clients", 9) + pad("keys", 8) + pad("shm", 6) + pad("sockets", 9)
            + pad("services", 10) + "oldest key\n"
        for user in report.users {
            out += pad("\(user.uid)", 8) + pad("\(user.clients)", 9) + pad("\(user.keys)", 8)
                + pad("\(user.sharedMemoryObjects)", 6) + pad("\(user.sockets)", 9) + pad("\(user.services)", 10)
                + (user.keys > 0 ? formatDuration(nanoseconds: user.oldestKeyAgeNanoseconds) : "-") + "\n"
        }
        return out
    }

    private static func pad(_ text: String, _ width: Int) -> String {
        text.count >= width ? text + " " : text + String(repeating: " ", count: width - text.count)
    }
}
