import ArgumentParser
import Glibc
import Patchbay
import PatchbayProtocol
import PatchbaySystem
import SystemPackage

/// `patchbay load --hostile`: one uid does everything it can to make the broker hold things and
/// spend time (idle connections by the thousand, replies with descriptors it never reads, large
/// listing replies it never reads, listing floods, never-expiring keys), while an honest client of
/// another uid measures `status` and share + claim beside it. Run as root: the hostile uid is
/// `nobody` (through setpriv); otherwise both run as the same uid and the report says so.
struct HostileLoad {
    let seconds: Double
    /// Idle connections the hostile uid tries to hold (it stops earlier if refused).
    let connections: Int

    func run() throws {
        // The connection rate per uid is raised for this run, so that what stops the hostile uid's
        // thousands of idle connections is its share of the broker's descriptors (the rate is
        // tested on its own: `Two users: resources`).
        let scratch = try ScratchBroker("patchbay-hostile", arguments: ["--system", "--log-level", "notice",
                                                                       "--policy-directory", "/nonexistent",
                                                                       "--connection-burst-per-uid", "1000000"])
        defer { scratch.stop() }
        chmod(scratch.directory, 0o755)
        let honest = try Broker(socketPath: scratch.socketPath)
        let idleRSS = Bench.residentKilobytes(scratch.pid)
        let idleDescriptors = (try? openDescriptorCount(pid: scratch.pid)) ?? 0

        let executable = currentExecutablePath() ?? CommandLine.arguments[0]
        let asOtherUser = getuid() == 0 && access("/usr/bin/setpriv", X_OK) == 0
        let worker = [executable, "load-hostile-worker", "--socket", scratch.socketPath, "--seconds", "\(seconds)",
                      "--connections", "\(connections)"]
        let output = try Pipe()
        let pid = try spawnProcess(
            path: asOtherUser ? "/usr/bin/setpriv" : executable,
            arguments: asOtherUser ? ["--reuid", "65534", "--regid", "65534", "--clear-groups"] + worker : Array(worker.dropFirst()),
            environment: currentEnvironment(), descriptors: [1: output.writeEnd.rawValue, 2: 2])
        output.writeEnd.close()
        let reader = output.readEnd
        writeStandardOutput("patchbay load --hostile: broker pid \(scratch.pid) (system mode), hostile uid "
            + (asOtherUser ? "65534 (nobody)" : "\(getuid()) (the same as the honest client: run as root to separate them)")
            + ", \(onlineCPUCount()) CPUs, \(format2(seconds)) s\n")
        // The worker says "ready" once its flood is in place.
        var line: [UInt8] = []
        var byte: UInt8 = 0
        while (try? withUnsafeMutableBytes(of: &byte) { try reader.read(into: $0) }) == 1, byte != 10 { line.append(byte) }
        writeStandardOutput("hostile: " + String(decoding: line, as: UTF8.self) + "\n")

        var statusLatencies: [UInt64] = []
        var keyLatencies: [UInt64] = []
        var errors: [String: Int] = [:]
        var peakRSS = idleRSS
        var peakDescriptors = idleDescriptors
        let file = try openFile("/dev/null", flags: O_RDONLY)
        let end = monotonicNanoseconds() + UInt64(seconds * 1e9)
        var round = 0
        while monotonicNanoseconds() < end {
            let start = monotonicNanoseconds()
            do {
                _ = try honest.status()
                statusLatencies.append(monotonicNanoseconds() - start)
            } catch {
                errors[error.errno.name, default: 0] += 1
            }
            let keyStart = monotonicNanoseconds()
            do {
                let key = try honest.share(rawDescriptor: file.rawValue)
                _ = try honest.claim(key)
                keyLatencies.append(monotonicNanoseconds() - keyStart)
            } catch {
                errors[error.errno.name, default: 0] += 1
            }
            round += 1
            if round % 64 == 0 {
                peakRSS = max(peakRSS, Bench.residentKilobytes(scratch.pid))
                peakDescriptors = max(peakDescriptors, (try? openDescriptorCount(pid: scratch.pid)) ?? 0)
            }
        }
        let rest = (try? reader.readToEnd()) ?? []
        let termination = try waitForProcess(pid)
        // The broker takes the hang-ups of the worker's connections in its own time: give it a
        // while (bounded: 30 s, since a machine busy with other work can slow those closes well
        // past a second; a quiet one settles in milliseconds) to get back to what it held before,
        // but for what outlives the worker by design (the file its keys hold, its shared memory
        // store).
        let settle = monotonicNanoseconds() + 30_000_000_000
        var descriptorsAfter = (try? openDescriptorCount(pid: scratch.pid)) ?? 0
        while descriptorsAfter > idleDescriptors + 3, monotonicNanoseconds() < settle {
            usleep(10_000)
            descriptorsAfter = (try? openDescriptorCount(pid: scratch.pid)) ?? 0
        }
        let status = Samples(statusLatencies)
        let keys = Samples(keyLatencies)
        writeStandardOutput("hostile: " + String(decoding: rest, as: UTF8.self).split(separator: "\n").joined(separator: "\nhostile: ")
            + " (\(termination))\n")
        writeStandardOutput("honest client: \(status.values.count) status, p50 \(formatNanoseconds(status.median)), "
            + "p99 \(formatNanoseconds(status.p99)), max \(formatNanoseconds(status.values.last ?? 0)); "
            + "\(keys.values.count) share + claim, p50 \(formatNanoseconds(keys.median)), p99 \(formatNanoseconds(keys.p99))\n")
        writeStandardOutput("honest client errors: " + (errors.isEmpty ? "none" : errors.sorted { $0.key < $1.key }.map { "\($0.key) ×\($0.value)" }.joined(separator: ", ")) + "\n")
        writeStandardOutput("broker: RSS \(idleRSS) KiB idle, \(peakRSS) KiB peak, \(Bench.residentKilobytes(scratch.pid)) KiB after; "
            + "descriptors \(idleDescriptors) idle, \(peakDescriptors) peak, \(descriptorsAfter) after\n")
        // A worker that did not run to its end made no flood worth the name: the run failed too.
        if !errors.isEmpty || termination != .exited(0) { throw ExitCode(1) }
    }
}

/// The hostile side of `patchbay load --hostile`, run as its own process (as another uid).
struct HostileWorkerCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "load-hostile-worker", shouldDisplay: false)

    @Option var socket: String
    @Option var seconds: Double
    @Option var connections: Int

    func run() throws {
        DescriptorLimit.raiseToMaximum()
        var refusals: [String: Int] = [:]
        func refused(_ error: PatchbayError) { refusals[error.errno.name, default: 0] += 1 }

        // Never-expiring keys (a thousand: the budget is left for connections), and objects to
        // list, so listing replies are large.
        let broker = try Broker(socketPath: socket)
        let file = try openFile("/dev/null", flags: O_RDONLY)
        var keys = 0
        while keys < 1000 {
            do {
                _ = try broker.share(rawDescriptor: file.rawValue, timeout: .never)
                keys += 1
            } catch {
                refused(error)
                break
            }
        }
        var objects = 0
        while objects < 300 {
            do {
                _ = try broker.openSharedMemory("/hostile-\(objects)-" + String(repeating: "x", count: 900), options: [.create])
                objects += 1
            } catch {
                refused(error)
                break
            }
        }
        // Idle connections, until the broker refuses or there are as many as asked for.
        var idle: [CInt] = []
        let statusRequest = Request.status.encode(requestID: 1)
        var buffer = [UInt8](repeating: 0, count: maximumFrameSize)
        while idle.count < connections {
            guard let connection = Self.connect(socket) else { refusals["connect (here)", default: 0] += 1; break }
            // An admitted connection answers; a refused one gets an error frame, then its end.
            _ = Self.send(statusRequest, on: connection, wait: true)
            var length = buffer.withUnsafeMutableBytes { Glibc.recv(connection, $0.baseAddress, $0.count, 0) }
            if length < 0 && errno == ECONNRESET {
                length = buffer.withUnsafeMutableBytes { Glibc.recv(connection, $0.baseAddress, $0.count, 0) }
            }
            guard length >= frameHeaderSize, let frame = try? Frame.decode(buffer[0..<length]) else {
                refusals["closed", default: 0] += 1
                close(connection)
                break
            }
            if frame.kind == .error {
                let errno = (try? ErrorReply.decode(frame)).map { Errno(rawValue: $0.errno).name } ?? "error"
                refusals[errno, default: 0] += 1
                close(connection)
                break
            }
            idle.append(connection)
        }
        // Make room in its share for the flooders (the broker takes the hang-ups in its own time;
        // a round trip on another connection gives it that time).
        if refusals["EDQUOT"] != nil {
            for connection in idle.suffix(100) { close(connection) }
            idle.removeLast(min(100, idle.count))
            _ = try? broker.status()
        }
        // Connections that flood requests whose replies they never read: with a descriptor each
        // (/dev/shmem/new), and large ones (a listing page). From here on this uid's own
        // connections are held back with them: that is its problem, nobody else's.
        var flooders: [CInt] = []
        for index in 0..<40 {
            guard let connection = Self.connect(socket) else { break }
            let request = index % 2 == 0
                ? Request.namespace(.open(path: "/dev/shmem/new", flags: [])).encode(requestID: 1)
                : Request.sharedMemory(.list(after: [])).encode(requestID: 1)
            while Self.send(request, on: connection) {}
            flooders.append(connection)
        }
        writeStandardOutput("ready: \(keys) keys, \(objects) objects, \(idle.count) idle connections, "
            + "\(flooders.count) connections flooding replies they never read; refused: "
            + (refusals.isEmpty ? "nothing" : refusals.sorted { $0.key < $1.key }.map { "\($0.key) ×\($0.value)" }.joined(separator: ", "))
            + "\n")
        // Keep the flood going until the time is up: more requests on every flooding connection.
        let end = monotonicNanoseconds() + UInt64(seconds * 1e9)
        var pushed = 0
        while monotonicNanoseconds() < end {
            for connection in flooders where Self.send(Request.sharedMemory(.list(after: [])).encode(requestID: 2), on: connection) {
                pushed += 1
            }
            usleep(1_000)
        }
        let blocked = flooders.filter { !Self.send(statusRequest, on: $0) }.count
        writeStandardOutput("pushed \(pushed) more requests; \(blocked) of \(flooders.count) flooding connections not read by the broker at the end\n")
    }

    /// A raw connection to the broker (the library would read every reply).
    static func connect(_ path: String) -> CInt? {
        let fd = Glibc.socket(AF_UNIX, CInt(SOCK_SEQPACKET.rawValue) | CInt(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return nil }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: address.sun_path) else { close(fd); return nil }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            for (index, byte) in bytes.enumerated() { raw[index] = byte }
        }
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard connected == 0 else { close(fd); return nil }
        return fd
    }

    /// Sends one frame; false when the socket is full (or gone).
    static func send(_ frame: [UInt8], on fd: CInt, wait: Bool = false) -> Bool {
        frame.withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, CInt(MSG_NOSIGNAL) | (wait ? 0 : CInt(MSG_DONTWAIT))) } == frame.count
    }
}
