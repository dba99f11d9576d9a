// The broker as a process: hostile frames, lifecycle, socket activation, autostart.
import Glibc
import Patchbay
import PatchbayProtocol
import PatchbaySystem
import SystemPackage
import Testing

/// A client that speaks raw frames, to send what the library never would.
struct RawClient: ~Copyable {
    let socket: SeqpacketSocket
    let buffer: UnsafeMutableRawBufferPointer

    init(path: String) throws {
        let connected = try SeqpacketSocket()
        try connected.connect(path: path)
        socket = connected
        buffer = .allocate(byteCount: maximumFrameSize, alignment: 8)
    }

    deinit { buffer.deallocate() }

    /// Sends bytes (and descriptors) and returns the decoded answer.
    func exchange(_ bytes: [UInt8], descriptors: [CInt] = []) throws -> (frame: Frame, descriptors: Int) {
        try socket.send(bytes, descriptors: descriptors)
        let message = try socket.receive(into: buffer)
        let count = message.descriptors.count
        return (try Frame.decode(Array(buffer[0..<message.length])[...]), count)
    }

    func error(for bytes: [UInt8], descriptors: [CInt] = []) throws -> (requestID: UInt64, reply: ErrorReply) {
        let (frame, _) = try exchange(bytes, descriptors: descriptors)
        #expect(frame.kind == .error)
        return (frame.requestID, try ErrorReply.decode(frame))
    }
}

@Suite("Broker")
struct BrokerTests {
    @Test("hostile frames get precise errors, leak nothing, and the session keeps working")
    func hostileFrames() throws {
        let broker = try TestBroker()
        let client = try RawClient(path: broker.socketPath)
        _ = try client.exchange(Request.status.encode(requestID: 1))
        let baseline = try broker.descriptorCount()

        // Garbage with a plausible header length: EPROTO, and the request id is echoed.
        var garbage = Request.status.encode(requestID: 99)
        garbage[0] = 0x00
        let bad = try client.error(for: garbage)
        #expect(bad.requestID == 99 && bad.reply.errno == EPROTO)
        #expect(try client.error(for: [1, 2, 3]).reply.errno == EPROTO)

        // Wrong version, unknown opcode, oversized.
        var version = Request.status.encode(requestID: 2)
        version[2] = 200
        #expect(try client.error(for: version).reply.errno == EPROTONOSUPPORT)
        var opcode = Request.status.encode(requestID: 3)
        opcode[4] = 0x77
        #expect(try client.error(for: opcode).reply.errno == EOPNOTSUPP)
        let oversized = Request.status.encode(requestID: 4) + [UInt8](repeating: 0, count: maximumFrameSize)
        let tooBig = try client.error(for: oversized)
        #expect(tooBig.reply.errno == EMSGSIZE && tooBig.requestID == 4)

        // Acknowledgements: one with an unsound header gets its error like any frame; a sound one
        // with a bad payload gets no answer at all (the next answer is the next request's).
        var badAck = Request.keys(.claimAcknowledge(sampleKeyToken, received: true)).encode(requestID: 11)
        badAck[0] = 0x00
        let badAckError = try client.error(for: badAck)
        #expect(badAckError.requestID == 11 && badAckError.reply.errno == EPROTO)
        var oddAck = Request.keys(.claimAcknowledge(sampleKeyToken, received: true)).encode(requestID: 12)
        oddAck[oddAck.count - 1] = 7  // received must be 0 or 1
        try client.socket.send(oddAck, descriptors: [])
        let next = try client.exchange(Request.status.encode(requestID: 13))
        #expect(next.frame.requestID == 13 && next.frame.kind == .reply)

        // Descriptors where none belong, and the wrong number where one does: EINVAL, and every
        // descriptor that arrived is closed again.
        let files = try (0..<3).map { _ in try openFile("/dev/null", flags: O_RDONLY).release() }
        defer { for fd in files { close(fd) } }
        let stray = try client.error(for: Request.status.encode(requestID: 5), descriptors: [files[0]])
        #expect(stray.reply.errno == EINVAL && stray.reply.reason.contains("no descriptors"))
        let missing = try client.error(for: Request.keys(.share(expiry: .never, restriction: nil)).encode(requestID: 6))
        #expect(missing.reply.errno == EINVAL)
        let extra = try client.error(for: Request.keys(.share(expiry: .never, restriction: nil)).encode(requestID: 7),
                                     descriptors: files)
        #expect(extra.reply.errno == EINVAL && extra.reply.reason.contains("exactly 1"))
        let zero = try client.error(for: Request.keys(.share(expiry: .after(nanoseconds: 0), restriction: nil)).encode(requestID: 8),
                                    descriptors: [files[0]])
        #expect(zero.reply.errno == EINVAL)
        // A malformed acknowledgement is not answered (nobody waits for it) and changes nothing.
        try client.socket.send(Request.keys(.claimAcknowledge(sampleKeyToken, received: true)).encode(requestID: 9) + [1])
        #expect(try broker.waitForDescriptorCount(baseline) == baseline)

        // Still serving this session, in order, and everybody else.
        let (frame, _) = try client.exchange(Request.status.encode(requestID: 10))
        #expect(frame.kind == .reply && frame.requestID == 10)
        #expect(try broker.connect().status().clients == 2)
    }

    @Test("SIGTERM stops the broker cleanly and removes its socket")
    func cleanShutdown() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        _ = try client.share(try openFile("/dev/null", flags: O_RDONLY))
        #expect(access(broker.socketPath, F_OK) == 0)
        #expect(try broker.stop() == .exited(0))
        #expect(access(broker.socketPath, F_OK) != 0)
        // The client learns promptly: an error, not a hang.
        do {
            _ = try client.status()
            Issue.record("a request to a stopped broker succeeded")
        } catch {
            #expect([Errno.connectionReset, .brokenPipe].contains(error.errno), "\(error)")
            #expect(error.reason.contains("broker"))
        }
    }

    @Test("a broker killed with SIGKILL gives its clients an error, and a new one takes over the path")
    func killedBrokerIsReplaced() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        _ = try client.status()
        kill(broker.pid, SIGKILL)
        _ = try waitForProcess(broker.pid)
        do {
            _ = try client.status()
            Issue.record("a request to a dead broker succeeded")
        } catch {
            #expect([Errno.connectionReset, .brokenPipe].contains(error.errno), "\(error)")
        }
        // The stale socket file is still there; a new broker on the same path replaces it.
        let replacement = try spawnDaemon(socketPath: broker.socketPath, sharedMemoryDirectory: broker.directory + "/shm")
        defer { kill(replacement, SIGTERM); _ = try? waitForProcess(replacement) }
        #expect(try Broker(socketPath: broker.socketPath).status().pid == replacement)
    }

    @Test("a second broker on the same path refuses with EADDRINUSE")
    func secondBrokerRefused() throws {
        let broker = try TestBroker()
        let second = try run(patchbayDaemon, ["--socket", broker.socketPath, "--shm-directory", broker.directory + "/shm"])
        #expect(second.termination == .exited(1))
        #expect(second.standardError.hasPrefix("patchbay: daemon: EADDRINUSE: "), "\(second.standardError)")
        #expect(try broker.connect().status().pid == broker.pid)
    }

    @Test("socket activation: an inherited listening socket on descriptor 3 is served")
    func socketActivation() throws {
        let directory = makeTemporaryDirectory()
        defer { removeTree(directory) }
        let path = directory + "/activated.sock"
        let listener = try SeqpacketSocket()
        try listener.bind(path: path)
        try listener.listen(backlog: 16)
        let ready = try Pipe()
        // LISTEN_PID must be the daemon's own pid: a shell sets it and then execs into the daemon.
        let pid = try spawnProcess(
            path: "/bin/sh",
            arguments: ["-c", "LISTEN_PID=$$ LISTEN_FDS=1 exec \"$0\" daemon --socket \"$1\" --shm-directory \"$2\" --ready-fd 4",
                        patchbayCLI, path, directory + "/shm"],
            environment: currentEnvironment(),
            descriptors: [3: listener.rawValue, 4: ready.writeEnd.rawValue])
        _ = consume ready.writeEnd
        #expect(try ready.readEnd.readToEnd() == Array("ready\n".utf8))
        let status = try Broker(socketPath: path).status()
        #expect(status.pid == pid)
        kill(pid, SIGTERM)
        let end = try waitForProcess(pid)
        #expect(end == .exited(0), "the broker ended with \(end)")
        // The socket belonged to the service manager, so the broker leaves its file alone.
        #expect(access(path, F_OK) == 0)
    }

    @Test("started as the systemd unit starts it (inherited socket, NOTIFY_SOCKET): READY=1 once serving, STOPPING=1 and exit 0 on SIGTERM, an empty store removed")
    func serviceManagerReadiness() throws {
        let directory = makeTemporaryDirectory()
        defer { removeTree(directory) }
        let path = directory + "/activated.sock"
        let listener = try SeqpacketSocket()
        try listener.bind(path: path)
        try listener.listen(backlog: 16)
        // The service manager's end of the notification protocol: a datagram socket.
        let manager = try UnixSocket(.datagram)
        try manager.bind(path: directory + "/notify")
        let pid = try spawnProcess(
            path: "/bin/sh",
            arguments: ["-c", "LISTEN_PID=$$ LISTEN_FDS=1 exec \"$0\" --socket \"$1\" --shm-directory \"$2\"",
                        patchbayDaemon, path, directory + "/shm"],
            environment: PatchbaySystem.environment(applying: ["NOTIFY_SOCKET": directory + "/notify"]),
            descriptors: [3: listener.rawValue])
        func nextNotification() throws -> String {
            var ready = pollfd(fd: manager.rawValue, events: Int16(POLLIN), revents: 0)
            guard poll(&ready, 1, 10_000) == 1 else { return "(nothing within 10 s)" }
            var buffer = [UInt8](repeating: 0, count: 4096)
            let count = buffer.withUnsafeMutableBytes { recv(manager.rawValue, $0.baseAddress, $0.count, 0) }
            return String(decoding: buffer[0..<max(count, 0)], as: UTF8.self)
        }
        let readiness = try nextNotification()
        #expect(readiness.contains("READY=1") && readiness.contains("MAINPID=\(pid)"), "\(readiness)")
        // Ready means serving.
        #expect(try Broker(socketPath: path).status().pid == pid)
        #expect(access(directory + "/shm", F_OK) == 0)
        kill(pid, SIGTERM)
        #expect(try nextNotification().contains("STOPPING=1"))
        #expect(try waitForProcess(pid) == .exited(0))
        // Nothing was stored, so the store is gone; the socket stays, the manager's.
        #expect(access(directory + "/shm", F_OK) != 0)
        #expect(access(path, F_OK) == 0)
    }

    @Test("keys survive a broker crash in the service manager's fd store: FDSTORE=1 at share, FDSTOREREMOVE=1 at claim, restored from LISTEN_FDNAMES")
    func keysInServiceManagerStore() throws {
        let directory = makeTemporaryDirectory()
        defer { removeTree(directory) }
        let path = directory + "/kept.sock"
        let listener = try SeqpacketSocket()
        try listener.bind(path: path)
        try listener.listen(backlog: 16)
        // This test plays the service manager: it owns the listening socket and a notification
        // socket, keeps the descriptors the broker stores, and hands them back at the restart.
        let manager = try UnixSocket(.datagram)
        try manager.bind(path: directory + "/notify")
        var stored: [String: CInt] = [:]
        defer { for fd in stored.values { close(fd) } }
        func nextMessage() throws -> String {
            var ready = pollfd(fd: manager.rawValue, events: Int16(POLLIN), revents: 0)
            guard poll(&ready, 1, 10_000) == 1 else { return "(nothing within 10 s)" }
            var buffer = [UInt8](repeating: 0, count: 4096)
            let message = buffer.withUnsafeMutableBytes { SeqpacketSocket.receiveRaw(manager.rawValue, $0) }
            guard let message else { return "(receive failed)" }
            let text = String(decoding: buffer[0..<message.length], as: UTF8.self)
            let name = text.split(separator: "\n").first { $0.hasPrefix("FDNAME=") }.map { String($0.dropFirst(7)) } ?? ""
            if text.contains("FDSTORE=1"), let fd = message.descriptors.first {
                stored[name] = fd
            } else if text.contains("FDSTOREREMOVE=1"), let fd = stored.removeValue(forKey: name) {
                close(fd)
            }
            for extra in message.descriptors.dropFirst() { close(extra) }
            return text
        }
        func startBroker(_ passed: [(String, CInt)]) throws -> pid_t {
            var descriptors: [CInt: CInt] = [3: listener.rawValue]
            for (index, entry) in passed.enumerated() { descriptors[CInt(4 + index)] = entry.1 }
            let names = (["patchbay.socket"] + passed.map(\.0)).joined(separator: ":")
            let pid = try spawnProcess(
                path: "/bin/sh",
                arguments: ["-c", "LISTEN_PID=$$ LISTEN_FDS=\(1 + passed.count) LISTEN_FDNAMES=\"$3\" exec \"$0\" --socket \"$1\" --shm-directory \"$2\" --fd-store",
                            patchbayDaemon, path, directory + "/shm", names],
                environment: PatchbaySystem.environment(applying: ["NOTIFY_SOCKET": directory + "/notify"]),
                descriptors: descriptors)
            #expect(try nextMessage().contains("READY=1"))
            return pid
        }

        let first = try startBroker([])
        let file = try openFile(directory + "/payload", flags: O_RDWR | O_CREAT, mode: 0o600)
        try file.writeAll(Array("kept across the crash".utf8))
        let client = try Broker(socketPath: path)
        let forever = try client.share(file, timeout: .never)
        #expect(try nextMessage().contains("FDSTORE=1"))
        let restricted = try client.share(file, timeout: .after(.seconds(3600)), claimableBy: .uid(geteuid()))
        #expect(try nextMessage().contains("FDSTORE=1"))
        let claimedBefore = try client.share(file, timeout: .never)
        #expect(try nextMessage().contains("FDSTORE=1"))
        _ = try client.claim(claimedBefore)
        #expect(try nextMessage().contains("FDSTOREREMOVE=1"))
        #expect(stored.count == 2)
        #expect(stored.keys.allSatisfy { !$0.contains(claimedBefore.text) })

        // A crash: the broker is gone, the manager still holds the files.
        kill(first, SIGKILL)
        _ = try waitForProcess(first)
        let second = try startBroker(stored.map { ($0.key, $0.value) })
        defer { kill(second, SIGTERM); _ = try? waitForProcess(second) }
        let after = try Broker(socketPath: path)
        #expect(try after.status().keys == 2)
        let claimed = try after.claim(forever)
        var buffer = [UInt8](repeating: 0, count: 64)
        // The same open file description the sharer wrote through: read from the start.
        let count = buffer.withUnsafeMutableBytes { pread(claimed.rawValue, $0.baseAddress, $0.count, 0) }
        #expect(Array(buffer[0..<count]) == Array("kept across the crash".utf8))
        #expect(try nextMessage().contains("FDSTOREREMOVE=1"))
        _ = try after.claim(restricted)
        expectErrno(.noSuchFileOrDirectory) { () throws(PatchbayError) in _ = try after.claim(claimedBefore) }
    }

    @Test("named shared memory survives a crash of a system broker whose mount namespace goes with it (a unit's private one): each uid's tmpfs root and the store's state tmpfs (its journal) are kept in the service manager's fd store and found through it",
          .enabled(if: geteuid() == 0 && access("/usr/bin/unshare", X_OK) == 0, "needs root and unshare"))
    func sharedMemoryInServiceManagerStore() throws {
        let directory = makeTemporaryDirectory()
        defer { removeTree(directory) }
        let path = directory + "/kept.sock"
        let listener = try SeqpacketSocket()
        try listener.bind(path: path)
        try listener.listen(backlog: 16)
        // This test plays the service manager, as in the keys' test above.
        let manager = try UnixSocket(.datagram)
        try manager.bind(path: directory + "/notify")
        var stored: [String: CInt] = [:]
        defer { for fd in stored.values { close(fd) } }
        func nextMessage() throws -> String {
            var ready = pollfd(fd: manager.rawValue, events: Int16(POLLIN), revents: 0)
            guard poll(&ready, 1, 10_000) == 1 else { return "(nothing within 10 s)" }
            var buffer = [UInt8](repeating: 0, count: 4096)
            let message = buffer.withUnsafeMutableBytes { SeqpacketSocket.receiveRaw(manager.rawValue, $0) }
            guard let message else { return "(receive failed)" }
            let text = String(decoding: buffer[0..<message.length], as: UTF8.self)
            let name = text.split(separator: "\n").first { $0.hasPrefix("FDNAME=") }.map { String($0.dropFirst(7)) } ?? ""
            if text.contains("FDSTORE=1"), let fd = message.descriptors.first {
                if let old = stored.updateValue(fd, forKey: name) { close(old) }
            } else if text.contains("FDSTOREREMOVE=1"), let fd = stored.removeValue(forKey: name) {
                close(fd)
            }
            for extra in message.descriptors.dropFirst() { close(extra) }
            return text
        }
        /// A system broker alone in a new mount namespace: its per-uid tmpfs mounts go with it.
        func startBroker(_ passed: [(String, CInt)]) throws -> pid_t {
            var descriptors: [CInt: CInt] = [3: listener.rawValue]
            for (index, entry) in passed.enumerated() { descriptors[CInt(4 + index)] = entry.1 }
            let names = (["patchbay.socket"] + passed.map(\.0)).joined(separator: ":")
            let pid = try spawnProcess(
                path: "/usr/bin/unshare",
                arguments: ["--mount", "--propagation", "private", "/bin/sh", "-c",
                            "LISTEN_PID=$$ LISTEN_FDS=\(1 + passed.count) LISTEN_FDNAMES=\"$3\" exec \"$0\" --system --socket \"$1\" --shm-directory \"$2\" --fd-store",
                            patchbayDaemon, path, directory + "/shm", names],
                environment: PatchbaySystem.environment(applying: ["NOTIFY_SOCKET": directory + "/notify"]),
                descriptors: descriptors)
            // The store's state tmpfs (its journal) is given to keep before the broker is ready,
            // by the first broker only: the second mounts the kept one again.
            let said = try nextMessage()
            if passed.isEmpty {
                #expect(said == "FDSTORE=1\nFDNAME=pbshm-state")
                #expect(try nextMessage().contains("READY=1"))
            } else {
                #expect(said.contains("READY=1"), "\(said)")
            }
            return pid
        }

        let first = try startBroker([])
        #expect(stored.keys.sorted() == ["pbshm-state"])
        let client = try Broker(socketPath: path)
        let memory = try client.openSharedMemory("/kept", options: .create)
        #expect(try nextMessage() == "FDSTORE=1\nFDNAME=pbshm-uid-0")
        try memory.truncate(to: 4096)
        do {
            let mapping = try memory.map(length: 4096)
            Array("kept across the crash".utf8).withUnsafeBytes { mapping.mutableBytes.copyMemory(from: $0) }
        }
        // The tmpfs are mounted only in the broker's namespace, never in this one.
        #expect(!isMountPoint(directory + "/shm/uids/0") && !isMountPoint(directory + "/shm/state"))
        // A crash: the broker and its mount namespace are gone; the manager holds the tmpfs root.
        kill(first, SIGKILL)
        _ = try waitForProcess(first)
        let second = try startBroker(stored.map { ($0.key, $0.value) })
        defer { kill(second, SIGTERM); _ = try? waitForProcess(second) }
        let after = try Broker(socketPath: path)
        let again = try after.openSharedMemory("/kept")
        #expect(try again.size == 4096)
        let mapping = try again.map(length: 4096)
        #expect(Array(UnsafeRawBufferPointer(rebasing: mapping.bytes[0..<21])) == Array("kept across the crash".utf8))
        // Created after the restart, in the same tmpfs, and found by the same name.
        _ = try after.openSharedMemory("/new", options: .create)
        #expect(try after.status().sharedMemoryObjects == 2)
    }

    @Test("CAPS generations carry on across a broker crash: a name registered after the restart is newer than every one before")
    func generationsAcrossRestart() throws {
        let broker = try TestBroker()
        do {
            let first = try CapsService(try broker.connect(), name: "survivor")
            #expect(first.currentGeneration == 1)
        }
        let second = try CapsService(try broker.connect(), name: "survivor")
        #expect(second.currentGeneration == 2)
        // The broker dies while the second registration runs.
        kill(broker.pid, SIGKILL)
        _ = try waitForProcess(broker.pid)
        let restarted = try spawnDaemon(socketPath: broker.socketPath, sharedMemoryDirectory: broker.directory + "/shm")
        defer { kill(restarted, SIGTERM); _ = try? waitForProcess(restarted) }
        let third = try CapsService(try Broker(socketPath: broker.socketPath), name: "survivor")
        #expect(third.currentGeneration == 3)
        _ = second
    }

    @Test("status never starts a broker: not running is exit status 3")
    func statusWhenNotRunning() throws {
        let directory = makeTemporaryDirectory()
        defer { removeTree(directory) }
        let status = try run(patchbayCLI, ["status"], environment: ["PATCHBAY_SOCKET": directory + "/absent.sock"])
        #expect(status.termination == .exited(3))
        #expect(status.standardOutput.hasPrefix("not running"))
        #expect(access(directory + "/absent.sock", F_OK) != 0)
    }

    @Test("status counts clients and keys per uid, and never shows key text")
    func statusCounts() throws {
        let broker = try TestBroker()
        let first = try broker.connect()
        let second = try broker.connect()
        let file = try openFile("/dev/null", flags: O_RDONLY)
        let key = try first.share(file)
        _ = try second.share(try EventCounter().descriptor)
        let report = try second.status()
        #expect(report.pid == broker.pid)
        #expect(report.clients == 2)
        #expect(report.keys == 2)
        #expect(report.keysByFileKind[FileKind.characterDevice.rawValue] == 1)
        #expect(report.keysByFileKind[FileKind.anonymous.rawValue] == 1)
        let mine = try #require(report.users.first { $0.uid == geteuid() })
        #expect(mine.clients == 2 && mine.keys == 2)
        let cli = try run(patchbayCLI, ["status", "--json"], environment: broker.environment)
        #expect(cli.termination == .exited(0))
        #expect(cli.standardOutput.contains("\"pid\": \(broker.pid)"))
        #expect(cli.standardOutput.contains("\"keys\": 2"))
        #expect(!cli.standardOutput.contains(key.text))
        let text = try run(patchbayCLI, ["status"], environment: broker.environment)
        #expect(text.standardOutput.contains("2 keys"))
        #expect(!text.standardOutput.contains(key.text))
        // Kept as keys come and go (no longer counted by a walk of every key per status): the
        // oldest key's age is the oldest live one's, whichever were claimed in between.
        let older = try #require(try second.status().users.first { $0.uid == geteuid() }).oldestKeyAgeNanoseconds
        let later = try first.share(try openFile("/dev/null", flags: O_RDONLY))
        _ = try second.claim(key)  // the oldest goes
        let after = try #require(try second.status().users.first { $0.uid == geteuid() })
        #expect(after.keys == 2 && after.oldestKeyAgeNanoseconds > 0 && after.oldestKeyAgeNanoseconds < older + 1_000_000_000)
        _ = try second.claim(later)
        let counts = try second.status()
        #expect(counts.keysByFileKind[FileKind.characterDevice.rawValue] == nil && counts.keysByFileKind[FileKind.anonymous.rawValue] == 1,
                "\(counts.keysByFileKind)")
        for _ in 0..<300 { _ = try second.claim(try first.share(try openFile("/dev/null", flags: O_RDONLY))) }
        let left = try #require(try second.status().users.first { $0.uid == geteuid() })
        #expect(left.keys == 1 && left.oldestKeyAgeNanoseconds >= older, "the event counter's key is the one left")
    }

    @Test("an autostarted broker keeps none of its starter's descriptors but those it is given: a pipe the starter left open without close-on-exec ends with the starter")
    func autostartedBrokerKeepsNoStarterDescriptors() throws {
        let runtime = makeTemporaryDirectory()
        defer { removeTree(runtime) }
        let output = try Pipe()
        let extra = try Pipe()
        let pid = try spawnProcess(
            path: patchbayCLI, arguments: ["status", "--start", "--json"],
            environment: PatchbaySystem.environment(applying: ["XDG_RUNTIME_DIR": runtime, "PATCHBAY_SOCKET": nil]),
            descriptors: [1: output.writeEnd.rawValue, 2: 2, 7: extra.writeEnd.rawValue])
        _ = consume output.writeEnd
        _ = consume extra.writeEnd
        #expect(try waitForProcess(pid) == .exited(0))
        let line = String(decoding: try output.readEnd.readToEnd(), as: UTF8.self)
        let field = try #require(line.split(separator: ",").first { $0.contains("\"pid\"") })
        let brokerPID = try #require(Int32(String(field.split(separator: ":")[1]).trimmed))
        defer { kill(brokerPID, SIGTERM) }
        // Nobody holds the pipe's write end any more: its reader is at end of file at once.
        var reader = pollfd(fd: extra.readEnd.rawValue, events: Int16(POLLIN), revents: 0)
        #expect(poll(&reader, 1, 0) == 1 && reader.revents & Int16(POLLHUP) != 0, "the broker kept its starter's descriptor 7")
        #expect(kill(brokerPID, 0) == 0)
    }

    @Test("in a process with borrowed privileges (real and effective ids differ, as in a set-user-ID program) the library reads no PATCHBAY_SOCKET, XDG_RUNTIME_DIR or PATCHBAY_DAEMON and starts no broker; a broker started so takes its effective ids for all three", .enabled(if: geteuid() == 0 && access("/usr/bin/setpriv", X_OK) == 0, "needs root and setpriv"))
    func borrowedPrivilegesIgnoreTheEnvironment() throws {
        let directory = makeTemporaryDirectory()
        defer { removeTree(directory) }
        let fake = try SeqpacketSocket()
        try fake.bind(path: directory + "/fake.sock")
        try fake.listen(backlog: 16)
        chmod(directory, 0o755)
        chmod(directory + "/fake.sock", 0o777)
        let runtime = directory + "/xdg"
        let environment: [String: String?] = ["PATCHBAY_SOCKET": directory + "/fake.sock", "XDG_RUNTIME_DIR": runtime,
                                              "PATCHBAY_DAEMON": patchbayDaemon, "PATCHBAY_AUTOSTART": nil]
        let borrowed = ["--ruid", "65534", "--euid", "0", "--rgid", "65534", "--egid", "0", "--clear-groups"]
        _ = try run("/usr/bin/setpriv", borrowed + [patchbayCLI, "status", "--start"], environment: environment)
        var pending = pollfd(fd: fake.descriptor.rawValue, events: Int16(POLLIN), revents: 0)
        #expect(poll(&pending, 1, 0) == 0, "the library connected to the socket its environment named")
        #expect(access(runtime, F_OK) != 0, "the library made a directory its environment named")
        // Without borrowed privileges the same environment is obeyed (so the test can fail).
        let obeying = try Child(patchbayCLI, ["status"], environment: environment)
        #expect(poll(&pending, 1, 10_000) == 1)
        let accepted = Glibc.accept(fake.descriptor.rawValue, nil, nil)
        #expect(accepted >= 0)
        // Gone (its reconnections refused), the command ends.
        _ = consume fake
        unlink(directory + "/fake.sock")
        close(accepted)
        _ = try obeying.wait()
        // The daemon itself, started with a real uid and gid other than its effective ones.
        // (No shell between them: dash gives up an effective uid its real one does not match.)
        let ready = try Pipe()
        let daemon = try spawnProcess(
            path: "/usr/bin/setpriv",
            arguments: borrowed + [patchbayDaemon, "--socket", directory + "/own.sock", "--shm-directory", directory + "/shm", "--ready-fd", "3"],
            environment: currentEnvironment(), descriptors: [3: ready.writeEnd.rawValue])
        _ = consume ready.writeEnd
        defer { kill(daemon, SIGTERM); _ = try? waitForProcess(daemon) }
        #expect(try ready.readEnd.readToEnd() == Array("ready\n".utf8))
        let status = String(decoding: try openFile("/proc/\(daemon)/status", flags: O_RDONLY).readToEnd(), as: UTF8.self)
        let ids = status.split(separator: "\n").filter { $0.hasPrefix("Uid:") || $0.hasPrefix("Gid:") }
            .map { $0.split(whereSeparator: { $0 == "\t" || $0 == " " }).dropFirst().joined(separator: " ") }
        #expect(ids == ["0 0 0 0", "0 0 0 0"], "\(ids)")
    }

    @Test("autostart: clients started together with no broker all end up on one broker")
    func autostartRace() throws {
        let runtime = makeTemporaryDirectory()
        defer { removeTree(runtime) }
        let environment: [String: String?] = ["XDG_RUNTIME_DIR": runtime, "PATCHBAY_SOCKET": nil]
        // Eight CLI processes, released at once by closing their shared stdin... the CLI does not
        // read stdin, so simply start them back to back: all race for the missing broker.
        var children: [Child] = []
        for _ in 0..<8 {
            children.append(try Child(patchbayCLI, ["status", "--start", "--json"], environment: environment))
        }
        var pids: Set<String> = []
        for child in children {
            let line = try #require(try child.readLine())
            #expect(try child.wait() == .exited(0))
            let field = try #require(line.split(separator: ",").first { $0.contains("\"pid\"") })
            pids.insert(String(field.split(separator: ":")[1]).trimmed)
        }
        #expect(pids.count == 1, "clients saw brokers \(pids)")
        let pidText = try #require(pids.first)
        let brokerPID = try #require(Int32(pidText))
        // The per-user directory is private, and the broker outlives the clients that started it.
        var info = stat()
        #expect(stat(runtime + "/patchbay", &info) == 0)
        #expect(info.st_mode & 0o777 == 0o700)
        #expect(kill(brokerPID, 0) == 0)
        kill(brokerPID, SIGTERM)
        // Not our child (it detached), but its pidfd turns readable when it ends: then its socket
        // must be gone (a broker killed by the signal, not stopping on it, would leave it).
        #expect(childEnds(brokerPID, within: 60_000_000_000), "the broker did not stop on SIGTERM")
        #expect(access(runtime + "/patchbay/patchbay.sock", F_OK) != 0)
    }
}

let sampleKeyToken = KeyToken(high: 1, low: 2)

/// Starts `patchbayd` on `socketPath` and returns its pid once it is ready.
func spawnDaemon(socketPath: String, sharedMemoryDirectory: String, _ arguments: [String] = []) throws -> pid_t {
    let ready = try Pipe()
    let pid = try spawnProcess(
        path: patchbayDaemon,
        arguments: ["--socket", socketPath, "--shm-directory", sharedMemoryDirectory, "--ready-fd", "3"] + arguments,
        environment: currentEnvironment(), descriptors: [3: ready.writeEnd.rawValue])
    _ = consume ready.writeEnd
    guard try ready.readEnd.readToEnd() == Array("ready\n".utf8) else {
        throw PatchbayError(.connectionRefused, "patchbayd did not start on \(socketPath)")
    }
    return pid
}

@Suite("Broker safety")
struct BrokerSafetyTests {
    @Test("a claimer that never acknowledges cannot pin the key: after the deadline the claim stands")
    func acknowledgementDeadline() throws {
        let broker = try TestBroker(["--claim-ack-timeout", "200ms"])
        let client = try broker.connect()
        let key = try client.share(try openFile("/dev/null", flags: O_RDONLY), timeout: .never)
        _ = try client.status()
        let baseline = try broker.descriptorCount()
        let silent = try RawClient(path: broker.socketPath)
        let (frame, descriptors) = try silent.exchange(Request.keys(.claim(key.token)).encode(requestID: 1))
        #expect(frame.kind == .reply && descriptors == 1)
        // The silent claimer stays connected (one more descriptor) and never acknowledges; the
        // broker's copy of the file goes when the acknowledgement deadline passes.
        #expect(try broker.waitForDescriptorCount(baseline) == baseline)
        #expect(try client.status().keys == 0)
        expectErrno(.noSuchFileOrDirectory) { () throws(PatchbayError) in _ = try client.claim(key) }
    }

    @Test("--socket on something that is not a socket is refused and left alone")
    func socketPathIsNotASocket() throws {
        let directory = makeTemporaryDirectory()
        defer { removeTree(directory) }
        let path = directory + "/precious.txt"
        try writeFile(path, "do not delete")
        let daemon = try run(patchbayDaemon, ["--socket", path, "--shm-directory", directory + "/shm"])
        #expect(daemon.termination == .exited(1))
        #expect(daemon.standardError.contains("patchbay: daemon: EADDRINUSE: "), "\(daemon.standardError)")
        #expect(try openFile(path, flags: O_RDONLY).readToEnd() == Array("do not delete".utf8))
    }

    @Test("the library refuses a per-user broker directory that is not private")
    func autostartRefusesUnsafeDirectory() throws {
        let runtime = makeTemporaryDirectory()
        defer { removeTree(runtime) }
        #expect(mkdir(runtime + "/patchbay", 0o755) == 0)
        chmod(runtime + "/patchbay", 0o755)
        let status = try run(patchbayCLI, ["status", "--start"], environment: ["XDG_RUNTIME_DIR": runtime, "PATCHBAY_SOCKET": nil])
        #expect(status.termination == .exited(69))  // no broker could be reached or started
        #expect(status.standardError.hasPrefix("patchbay: status: EACCES: "), "\(status.standardError)")
        #expect(access(runtime + "/patchbay/patchbay.sock", F_OK) != 0)
    }

    @Test("daemon options are validated")
    func optionValidation() throws {
        for arguments in [["--max-keys-per-uid", "0"], ["--failed-claims-per-second", "nan"], ["--log-level", "loud"],
                          ["--ready-fd", "999"], ["--claim-ack-timeout", "never"], ["--max-sockets-per-uid", "0"],
                          ["--max-services-per-uid", "-1"], ["--max-caps-clients-per-uid", "0"], ["--max-caps-names-per-uid", "0"], ["--max-shm-objects-per-uid", "0"],
                          ["--max-shm-bytes-per-uid", "0"], ["--max-shm-bytes-per-uid", "lots"]] {
            let daemon = try run(patchbayDaemon, ["--socket", "/tmp/patchbay-test-unused/x.sock"] + arguments)
            // Every bad value is a usage error (64), whether the parser or a later check finds it.
            #expect(daemon.termination == .exited(64), "\(arguments): \(daemon.standardError)")
        }
    }
}
