import ArgumentParser
import Glibc
import Patchbay
import PatchbayBroker
import PatchbayProtocol
import PatchbaySystem
import SystemPackage

/// `patchbay doctor`: where the broker's socket, directory, store, log, lock and executable are,
/// and what is wrong with them. Never starts a broker.
struct DoctorCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "doctor",
        abstract: "Say where the broker's socket, store, log and lock are, and what is wrong with them.",
        discussion: """
            Looks at the broker this user's commands would use (PATCHBAY_SOCKET, else the per-user \
            one) without starting it. Exit status 0 when nothing is wrong, 1 otherwise.
            """
    )

    @Flag(help: "Print JSON.")
    var json = false

    struct Finding {
        var what: String
        var path: String
        var ok: Bool
        var note: String
    }

    func run() throws {
        let socketPath = Broker.defaultSocketPath
        let directory = socketPath.lastIndex(of: "/").map { String(socketPath[..<$0]) } ?? "."
        var findings: [Finding] = []

        // The directory: it must be private to this user for a per-user broker.
        var info = stat()
        if lstat(directory, &info) != 0 {
            findings.append(Finding(what: "directory", path: directory, ok: true, note: "missing; made when a broker starts"))
        } else {
            let mode = info.st_mode & 0o7777
            let mine = info.st_uid == geteuid()
            let isDirectory = info.st_mode & S_IFMT == S_IFDIR
            let shared = socketPath == BrokerConfiguration.defaultSocketPath(mode: .system)
            let ok = isDirectory && (shared || (mine && mode & 0o077 == 0))
            findings.append(Finding(what: "directory", path: directory, ok: ok, note: ok
                ? "mode \(octal(UInt32(mode))), owner uid \(info.st_uid)"
                : isDirectory
                    ? "mode \(octal(UInt32(mode))), owner uid \(info.st_uid): a per-user broker's directory must be this user's (uid \(geteuid())) with no access for others"
                    : "not a directory"))
        }

        // The socket, and whether a broker answers on it. One starts by itself only on the
        // per-user default path, with autostart on and a daemon to run.
        let named = getenv("PATCHBAY_SOCKET").map { String(cString: $0) }.map { !$0.isEmpty } ?? false
        let autostartOff = getenv("PATCHBAY_AUTOSTART").map { String(cString: $0) } == "0"
        let startsByItself = !named && !autostartOff && Broker.daemonExecutable.map(isExecutableFile) == true
        if isSocketFile(atPath: socketPath) != true {
            let exists = fileExists(atPath: socketPath)
            let why = named ? "PATCHBAY_SOCKET names this path" : autostartOff ? "PATCHBAY_AUTOSTART=0" : "no daemon to run (below)"
            findings.append(Finding(what: "socket", path: socketPath, ok: !exists && startsByItself, note: exists
                ? "something that is not a socket is in the way"
                : startsByItself ? "no broker running; one starts on the first use"
                : "no broker running, and none starts by itself (\(why)): start one (patchbay daemon)"))
        } else {
            do {
                let report = try Broker(socketPath: socketPath, autostart: false).status()
                findings.append(Finding(what: "socket", path: socketPath, ok: true,
                                        note: "a broker answers: pid \(report.pid), version \(report.version), \(report.clients) clients"))
            } catch {
                findings.append(Finding(what: "socket", path: socketPath, ok: false,
                                        note: "\(error.errno.name): \(error.reason) (a stale socket file is removed by the next broker)"))
            }
        }

        // The system broker's second socket, root's own.
        if socketPath == BrokerConfiguration.defaultSocketPath(mode: .system), isSocketFile(atPath: socketPath) == true {
            let own = rootSocketPath(forBrokerAt: socketPath)
            if lstat(own, &info) != 0 {
                findings.append(Finding(what: "root socket", path: own, ok: false,
                                        note: "missing: root's connections wait in the shared socket's backlog with everyone's (the broker's log says why)"))
            } else {
                let ok = info.st_mode & S_IFMT == S_IFSOCK && info.st_uid == 0 && info.st_mode & 0o077 == 0
                findings.append(Finding(what: "root socket", path: own, ok: ok, note: ok
                    ? "mode \(octal(UInt32(info.st_mode & 0o7777))), root's alone"
                    : "mode \(octal(UInt32(info.st_mode & 0o7777))), owner uid \(info.st_uid): must be a socket of root's with no access for others"))
            }
        }

        // Named shared memory's store.
        let isSystem = socketPath == BrokerConfiguration.defaultSocketPath(mode: .system)
        let defaultStore = BrokerConfiguration.defaultSharedMemoryDirectory(mode: isSystem ? .system : .user, socketPath: socketPath)
        // A per-user broker whose default store name another user took keeps it beside that,
        // recorded in its socket directory.
        let recordedStore = isSystem ? nil : StorePlace.recorded(for: defaultStore, in: directory)
        let store = recordedStore ?? defaultStore
        if lstat(store, &info) != 0 {
            findings.append(Finding(what: "store", path: store, ok: true, note: "missing; made when a broker starts"))
        } else if !isSystem && info.st_uid != geteuid() {
            let movesAside = socketPath == BrokerConfiguration.defaultSocketPath(mode: .user)
            findings.append(Finding(what: "store", path: store, ok: movesAside, note: movesAside
                ? "owner uid \(info.st_uid), not this user: the next broker keeps its store beside it, under a name of its own, recorded as \(directory)/\(StorePlace.recordName)"
                : "owner uid \(info.st_uid), not this user: a broker on this socket refuses to start (EACCES); give it --shm-directory"))
        } else {
            let ok = info.st_mode & S_IFMT == S_IFDIR && info.st_mode & 0o077 == 0
            let place = recordedStore == nil ? "" : ", beside \(defaultStore), which another user took (recorded as \(directory)/\(StorePlace.recordName))"
            findings.append(Finding(what: "store", path: store, ok: ok, note: ok
                ? "private directory (mode \(octal(UInt32(info.st_mode & 0o7777))))\(place)"
                : "mode \(octal(UInt32(info.st_mode & 0o7777))): the store must be a directory only its broker can enter"))
        }

        // The autostarted broker's log and the autostart lock.
        let log = directory + "/patchbayd.log"
        if lstat(log, &info) == 0 {
            findings.append(Finding(what: "log", path: log, ok: true, note: "\(info.st_size) bytes"))
        } else {
            findings.append(Finding(what: "log", path: log, ok: true, note: "none yet (written by an autostarted broker; a systemd one logs to the journal)"))
        }
        let lock = directory + "/autostart.lock"
        findings.append(Finding(what: "lock", path: lock, ok: true,
                                note: fileExists(atPath: lock) ? "present (held only while a broker starts)" : "none yet"))

        // What autostart would run.
        if let daemon = Broker.daemonExecutable {
            let runnable = isExecutableFile(daemon)
            findings.append(Finding(what: "daemon", path: daemon, ok: runnable, note: runnable
                ? "autostart runs this" : "not an executable file: autostart cannot start a broker (PATCHBAY_DAEMON names it)"))
        } else {
            findings.append(Finding(what: "daemon", path: "-", ok: false,
                                    note: "patchbayd is not beside this program nor on PATH: autostart cannot start a broker (install it, or set PATCHBAY_DAEMON)"))
        }

        if json {
            writeStandardOutput(JSON.array(findings.map { finding in
                JSON.object([("what", JSON.string(finding.what)), ("path", JSON.string(finding.path)),
                             ("ok", finding.ok ? "true" : "false"), ("note", JSON.string(finding.note))])
            }) + "\n")
        } else {
            var out = ""
            let width = max(10, (findings.map(\.what.count).max() ?? 0) + 1)
            for finding in findings {
                out += finding.what.padding(width) + (finding.ok ? "ok       " : "PROBLEM  ") + finding.path + "\n"
                out += String(repeating: " ", count: width + 9) + finding.note + "\n"
            }
            writeStandardOutput(out)
        }
        if findings.contains(where: { !$0.ok }) { throw ExitCode(1) }
    }
}

/// A regular file this process may execute.
private func isExecutableFile(_ path: String) -> Bool {
    var info = stat()
    return stat(path, &info) == 0 && info.st_mode & S_IFMT == S_IFREG && access(path, X_OK) == 0
}
