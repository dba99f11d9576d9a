// `patchbay monitor` and `BrokerMonitor`: one event per answered request, with the caller's pid,
// uid and command, the object, the outcome; filters; a monitor that does not read; two users.
import Glibc
import Patchbay
import PatchbayProtocol
import PatchbaySystem
import Testing

/// How many monitors the broker has accepted so far (its metrics).
func monitorsAccepted(_ broker: Broker) throws -> Int {
    let prefix = "patchbay_requests_total{subsystem=\"broker\",operation=\"monitor\",outcome=\"ok\"} "
    return try broker.metrics().split(separator: "\n").first { $0.hasPrefix(prefix) }.flatMap { Int($0.dropFirst(prefix.count)) } ?? 0
}

/// Waits (at most 30 s) until the broker has accepted `count` monitors.
func waitForMonitors(_ broker: Broker, _ count: Int) throws {
    let deadline = monotonicNanoseconds() + 30_000_000_000
    while try monitorsAccepted(broker) < count, monotonicNanoseconds() < deadline { usleep(2_000) }
}

/// Events until `want` holds for one of them (returned with all seen), or 30 s without it.
private func events(_ monitor: BrokerMonitor, until want: (MonitorEvent) -> Bool) throws -> (found: MonitorEvent?, seen: [MonitorEvent]) {
    var seen: [MonitorEvent] = []
    let deadline = monotonicNanoseconds() + 30_000_000_000
    while monotonicNanoseconds() < deadline {
        guard let event = try monitor.next(timeoutMilliseconds: 200) else { continue }
        seen.append(event)
        if want(event) { return (event, seen) }
    }
    return (nil, seen)
}

@Suite("Monitor")
struct MonitorTests {
    @Test("each subsystem's answers, with the caller's pid, uid and command, the object and the errno; never a key's text")
    func eventsPerSubsystem() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        let monitor = try BrokerMonitor(client)
        let sharedMemoryOnly = try BrokerMonitor(client, filter: MonitorFilter(subsystems: MonitorFilter.bit(of: .sharedMemory)))

        // keys, from another process: share, claim, a second claim (ENOENT).
        let shared = try run(patchbayCLI, ["share", "/etc/hostname"], environment: broker.environment)
        let key = shared.standardOutput.trimmingCharacters(in: .whitespacesAndNewlines)
        let share = try events(monitor) { $0.operation == "share" }.found
        #expect(share?.subsystem == "keys" && share?.outcome == "ok" && share?.object == "regular file")
        #expect(share?.uid == geteuid() && share?.command == "patchbay" && (share?.pid ?? 0) > 0 && share?.pid != getpid())
        _ = try run(patchbayCLI, ["claim", key], environment: broker.environment)
        let again = try run(patchbayCLI, ["claim", key], environment: broker.environment)
        #expect(again.termination != .exited(0))
        let claims = try events(monitor) { $0.operation == "claim" && $0.outcome == "ENOENT" }
        // The claim that got the file says what it was and whose; the failed one nothing of the key.
        let claimed = claims.seen.first { $0.operation == "claim" && $0.outcome == "ok" }
        #expect(claimed?.object == "regular file" && claimed?.detail.hasPrefix("shared by uid \(geteuid()) pid \(share?.pid ?? 0), ") == true,
                "\(String(describing: claimed))")
        #expect(claims.found?.object == "a key" && claims.found?.detail == "")
        #expect(!claims.seen.contains { $0.object.contains(key) || $0.detail.contains(key) }, "a key's text never shows")

        // shared memory, here: create, open of a missing name (ENOENT).
        _ = try client.openSharedMemory("/watched", options: .create)
        expectErrno(.noSuchFileOrDirectory) { () throws(PatchbayError) in _ = try client.openSharedMemory("/missing") }
        let missing = try events(monitor) { $0.object == "/missing" }.found
        #expect(missing?.operation == "sharedMemoryOpen" && missing?.outcome == "ENOENT" && missing?.pid == getpid())
        // CAPS: a registration.
        let service = try CapsService(client, name: "watched.service", access: [.world])
        let registered = try events(monitor) { $0.operation == "capsService" }.found
        #expect(registered?.object == "watched.service" && registered?.outcome == "ok")
        _ = service

        // The filtered monitor saw shared memory only, and both of those.
        var filtered: [MonitorEvent] = []
        while let event = try sharedMemoryOnly.next(timeoutMilliseconds: 200) { filtered.append(event) }
        #expect(filtered.allSatisfy { $0.subsystem == "shm" } && filtered.map(\.object).contains("/watched")
                && filtered.map(\.object).contains("/missing"), "\(filtered)")

        // The command line, as JSON lines, stopping after its count.
        let before = try monitorsAccepted(client)
        let watcher = try Child(patchbayCLI, ["monitor", "--json", "--count", "1", "--name", "/named-by-cli"],
                                environment: broker.environment)
        try waitForMonitors(client, before + 1)
        guard try monitorsAccepted(client) == before + 1 else {
            watcher.kill(SIGKILL)
            Issue.record("the command line's monitor never registered")
            return
        }
        _ = try client.openSharedMemory("/named-by-cli", options: .create)
        let line = try watcher.readLine() ?? ""
        #expect(line.contains("\"object\": \"/named-by-cli\"") && line.contains("\"outcome\": \"ok\""), "\(line)")
        #expect(try watcher.wait() == .exited(0))
    }

    @Test("a request whose object is as long as its frame (a ctl line padded to 64 KiB) still reaches monitors, its object cut to 4 KiB")
    func longObjectIsCut() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        let monitor = try BrokerMonitor(client, filter: MonitorFilter(subsystems: MonitorFilter.bit(of: .net)))
        let socket = try Socket.open(client, type: .seqpacket)
        // Sent as a client written from PROTOCOL.md may send it (the library sends its own form).
        let raw = try RawClient(path: broker.socketPath)
        let line = "bind" + String(repeating: " ", count: 65_380) + "padded-bind"
        let (answer, _) = try raw.exchange(Request.net(.control(socket: socket.id, command: line)).encode(requestID: 1))
        #expect(answer.kind == .reply)
        let bind = try events(monitor) { $0.object.hasPrefix("socket \(socket.id): bind ") }.found
        #expect(bind?.outcome == "ok" && bind?.lost == 0, "\(String(describing: bind?.outcome))")
        #expect((bind?.object.utf8.count ?? .max) <= 4096 && bind?.object.hasSuffix("…") == true, "\(bind?.object.utf8.count ?? -1) \(String(describing: bind?.object.suffix(40)))")
        _ = consume socket
    }

    @Test("what is no client's request: a key's expiry, a socket's last close, a CAPS client leaving, a service's port closing")
    func departuresAndExpiry() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        let monitor = try BrokerMonitor(client)
        let file = try openFile("/etc/hostname", flags: O_RDONLY)
        _ = try client.share(file, timeout: .after(.milliseconds(50)))
        let expiry = try events(monitor) { $0.operation == "keyExpiry" }.found
        #expect(expiry?.subsystem == "keys" && expiry?.object == "regular file" && expiry?.uid == geteuid()
                && expiry?.pid == getpid() && expiry?.outcome == "ok" && expiry?.detail.hasPrefix("unclaimed for ") == true,
                "\(String(describing: expiry))")

        // A /net socket whose last handle closes.
        do {
            let socket = try Socket.listen(client, name: "closing-listener", type: .seqpacket, backlog: 4)
            let closedID = socket.id
            _ = consume socket
            let closed = try events(monitor) { $0.operation == "netClose" }.found
            #expect(closed?.subsystem == "net" && closed?.object == "socket \(closedID)" && closed?.pid == getpid()
                    && closed?.detail == "was LISTENING, named closing-listener", "\(String(describing: closed))")
        }

        let service = try Child(patchbayCLI, ["caps", "serve", "departing", "--allow", "world", "--echo"], environment: broker.environment)
        let registered = try events(monitor) { $0.operation == "capsService" && $0.object == "departing" }.found
        #expect(registered?.pid == service.pid)
        let called = try run(patchbayCLI, ["caps", "call", "departing", "hello"], environment: broker.environment)
        #expect(called.termination == .exited(0) && called.standardOutput == "hello")
        let connect = try events(monitor) { $0.operation == "capsClient" && $0.object == "departing" }.found
        let left = try events(monitor) { $0.operation == "capsDisconnect" }.found
        #expect(left?.object == "departing" && left?.pid == connect?.pid && left?.command == "patchbay"
                && left?.detail.hasPrefix("channel ") == true, "\(String(describing: left))")
        service.kill(SIGKILL)
        _ = try service.wait()
        let death = try events(monitor) { $0.operation == "capsDeath" }.found
        #expect(death?.object == "departing" && death?.pid == service.pid && death?.uid == geteuid(), "\(String(describing: death))")
    }

    @Test("a tapped service's messages, with the client's kernel credentials; payloads only when asked; only the registering process taps")
    func tappedService() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        let monitor = try BrokerMonitor(client, filter: MonitorFilter(subsystems: MonitorFilter.bit(of: .caps)))
        let service = try CapsService(client, name: "tapped", access: [.world], tap: .payloads)
        let caller = try CapsClient(client, name: "tapped")
        var buffer = [UInt8](repeating: 0, count: 256)
        let id = try caller.put(Array("hello tap".utf8))
        let message = try buffer.withUnsafeMutableBytes { raw in
            Result { () throws(PatchbayError) -> CapsServiceMessage in try service.wait(into: raw) }
        }.get()
        #expect(message.messageID == id)
        try service.reply(to: id, Array("HELLO".utf8))
        let reply = try buffer.withUnsafeMutableBytes { raw in
            Result { () throws(PatchbayError) -> CapsReply in try caller.wait(into: raw) }
        }.get()
        #expect(reply.messageID == id)
        let failing = try caller.put(Array("x".utf8))
        // The first reply's DISPOSE may come first.
        while try buffer.withUnsafeMutableBytes({ raw in
            Result { () throws(PatchbayError) -> CapsServiceMessage in try service.wait(into: raw) }
        }).get().messageID != failing {}
        try service.reply(to: failing, error: .ioError)

        let request = try events(monitor) { $0.operation == "tapRequest" }.found
        #expect(request?.object == "tapped" && request?.pid == getpid() && request?.uid == geteuid()
                && request?.payload == Array("hello tap".utf8) && request?.detail == "message \(id), 9 bytes",
                "\(String(describing: request))")
        let answered = try events(monitor) { $0.operation == "tapReply" }.found
        #expect(answered?.payload == Array("HELLO".utf8) && answered?.detail == "message \(id), 5 bytes")
        let refused = try events(monitor) { $0.operation == "tapErrorReply" }.found
        #expect(refused?.detail == "message \(failing), EIO")

        // Headers only: no bytes.
        let plain = try CapsService(client, name: "tapped.plain", access: [.world], tap: .headers)
        let plainCaller = try CapsClient(client, name: "tapped.plain")
        let plainID = try plainCaller.put(Array("secret".utf8))
        _ = try buffer.withUnsafeMutableBytes { raw in
            Result { () throws(PatchbayError) -> CapsServiceMessage in try plain.wait(into: raw) }
        }.get()
        let header = try events(monitor) { $0.operation == "tapRequest" && $0.object == "tapped.plain" }.found
        #expect(header?.detail == "message \(plainID), 6 bytes" && header?.payload == [])

        // A tap reporting another service's message is ignored: the next event is its own.
        let forger = try CapsTap(client, serviceID: plain.serviceID, mode: .headers)
        forger.record(.request, id, length: 1)
        forger.record(.dispose, plainID, length: 0)
        let next = try events(monitor) { $0.operation.hasPrefix("tap") && $0.operation != "tapDispose" || $0.detail == "message \(plainID)" }.found
        #expect(next?.operation == "tapDispose" && next?.object == "tapped.plain", "\(String(describing: next))")

        // Another process may not tap this one's service; a service that does not exist is ENOENT.
        let stranger = try run(testPeer, ["caps-tap", "\(service.serviceID)"], environment: broker.environment)
        #expect(stranger.standardOutput == "refused EPERM\n", "\(stranger.standardOutput)")
        let nothing = try run(testPeer, ["caps-tap", "999999"], environment: broker.environment)
        #expect(nothing.standardOutput == "refused ENOENT\n", "\(nothing.standardOutput)")

        // The command line: `caps serve --tap-payload`, called from another process.
        let served = try Child(patchbayCLI, ["caps", "serve", "tapped.cli", "--allow", "world", "--tap-payload", "--echo"],
                               environment: broker.environment)
        defer { served.kill(SIGKILL); _ = try? served.wait() }
        _ = try events(monitor) { $0.operation == "capsService" && $0.object == "tapped.cli" }
        let called = try run(patchbayCLI, ["caps", "call", "tapped.cli", "from the CLI"], environment: broker.environment)
        #expect(called.standardOutput == "from the CLI")
        let cli = try events(monitor) { $0.operation == "tapRequest" && $0.object == "tapped.cli" }.found
        #expect(cli?.payload == Array("from the CLI".utf8) && cli?.command == "patchbay" && cli?.pid != getpid()
                && cli?.pid != served.pid, "\(String(describing: cli))")
        _ = (caller, plainCaller)
    }

    @Test("a monitor that never reads does not slow the broker; it is told how many events it missed")
    func slowMonitorIsNotWaitedFor() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        let monitor = try BrokerMonitor(client)
        // 20,000 requests while the monitor reads nothing: every one is answered.
        for _ in 0..<20_000 { _ = try client.status() }
        // It reads what was queued for it, then the next event says what it missed.
        while try monitor.next(timeoutMilliseconds: 200) != nil {}
        _ = try client.openSharedMemory("/after-the-flood", options: .create)
        let next = try events(monitor) { $0.object == "/after-the-flood" }.found
        #expect((next?.lost ?? 0) > 1_000, "missed events counted: \(String(describing: next?.lost))")
    }
}

@Suite("Two users: monitor", .enabled(if: twoUsersAvailable, "needs root, setpriv and a nobody user that can run the products"))
struct TwoUserMonitorTests {
    @Test("on a system broker, nobody's monitor sees its own requests only; root's sees nobody's")
    func monitorSeesOwn() throws {
        let broker = try TestBroker(["--system"])
        chmod(broker.directory, 0o755)
        let root = try broker.connect()
        let rootMonitor = try BrokerMonitor(root)
        let before = try monitorsAccepted(root)
        let watcher = try Child("/usr/bin/setpriv", ["--reuid", "65534", "--regid", "65534", "--clear-groups", patchbayCLI,
                                                     "monitor", "--json", "--count", "1"], environment: broker.environment)
        try waitForMonitors(root, before + 1)
        // Root's own request first: nobody must not see it.
        _ = try root.openSharedMemory("/roots-secret", options: .create)
        let made = try runAsOtherUser(["shm", "create", "/nobodys", "--size", "4k"], environment: broker.environment)
        #expect(made.termination == .exited(0), "\(made.standardError)")
        if made.termination != .exited(0) { watcher.kill(SIGKILL) }  // no event of nobody's would ever come
        let line = try watcher.readLine() ?? ""
        #expect(!line.contains("roots-secret") && line.contains("\"uid\": 65534"), "nobody's first event: \(line)")
        #expect(try watcher.wait() == .exited(0))
        let seen = try events(rootMonitor) { $0.object == "/nobodys" }.found
        #expect(seen?.uid == 65534)
    }

    @Test("nobody holds a CAPS name: its monitor sees root connect to its service, not root's failed attempt to reach a service of root's under that name")
    func failedCapsConnectNotShownToNameOwner() throws {
        let broker = try TestBroker(["--system"])
        chmod(broker.directory, 0o755)
        let root = try broker.connect()
        let service = try Child("/usr/bin/setpriv", ["--reuid", "65534", "--regid", "65534", "--clear-groups", patchbayCLI,
                                                     "caps", "serve", "squat.agent", "--echo", "--allow", "world"],
                                environment: broker.environment)
        defer { service.kill(SIGTERM); _ = try? service.wait() }
        #expect(try eventually { try root.listServices().contains { $0.name == "squat.agent" } })
        let before = try monitorsAccepted(root)
        let watcher = try Child("/usr/bin/setpriv", ["--reuid", "65534", "--regid", "65534", "--clear-groups", patchbayCLI,
                                                     "monitor", "--json", "--count", "1", "--subsystem", "caps"],
                                environment: broker.environment)
        try waitForMonitors(root, before + 1)
        // Root asks for a service of its own under that name: there is none (ENOENT).
        expectErrno(.noSuchFileOrDirectory) { () throws(PatchbayError) in _ = try CapsClient(root, name: "squat.agent", uid: 0) }
        // Then connects to nobody's: that, nobody's monitor is told of.
        let client = try CapsClient(root, name: "squat.agent", uid: 65534)
        let line = try watcher.readLine() ?? ""
        #expect(line.contains("\"operation\": \"capsClient\"") && line.contains("\"outcome\": \"ok\""), "nobody's first event: \(line)")
        #expect(try watcher.wait() == .exited(0))
        withExtendedLifetime(client) {}
    }

    @Test("nobody's failed claim of root's restricted key shows nobody nothing of the key; root's monitor sees the same")
    func failedClaimDescribesNoKey() throws {
        let broker = try TestBroker(["--system"])
        chmod(broker.directory, 0o755)
        let root = try broker.connect()
        let rootMonitor = try BrokerMonitor(root, filter: MonitorFilter(subsystems: MonitorFilter.bit(of: .keys)))
        let file = try openFile("/etc/hostname", flags: O_RDONLY)
        let key = try root.share(file, claimableBy: .uid(0))
        let before = try monitorsAccepted(root)
        let watcher = try Child("/usr/bin/setpriv", ["--reuid", "65534", "--regid", "65534", "--clear-groups", patchbayCLI,
                                                     "monitor", "--json", "--count", "1", "--subsystem", "keys"],
                                environment: broker.environment)
        try waitForMonitors(root, before + 1)
        let claimed = try runAsOtherUser(["claim", key.text], environment: broker.environment)
        #expect(claimed.termination != .exited(0))
        let line = try watcher.readLine() ?? ""
        #expect(line.contains("\"operation\": \"claim\"") && line.contains("\"object\": \"a key\"")
                && line.contains("\"outcome\": \"ENOENT\"") && line.contains("\"detail\": \"\"")
                && !line.contains("regular file") && !line.contains(key.text), "nobody's event: \(line)")
        #expect(try watcher.wait() == .exited(0))
        let seen = try events(rootMonitor) { $0.operation == "claim" }.found
        #expect(seen?.uid == 65534 && seen?.object == "a key" && seen?.detail == "", "\(String(describing: seen))")
    }

    @Test("nobody may open 8 monitors of the system broker, not 9 (EDQUOT); root is not limited")
    func monitorsPerUserAreBounded() throws {
        let broker = try TestBroker(["--system"])
        chmod(broker.directory, 0o755)
        let watcher = try Child("/usr/bin/setpriv", ["--reuid", "65534", "--regid", "65534", "--clear-groups", testPeer,
                                                     "open-monitors", "20"], environment: broker.environment)
        defer { watcher.closeInput(); _ = try? watcher.wait() }
        #expect(try watcher.readLine() == "refused at 9 EDQUOT")
        let root = try broker.connect()
        let rootMonitors = try (0..<12).map { _ in try BrokerMonitor(root) }
        #expect(rootMonitors.count == 12)
    }

    @Test("nobody flooding its own tap under root's monitor: root's requests are all answered, the monitor is told what it missed")
    func tapFloodDoesNotStall() throws {
        let broker = try TestBroker(["--system"])
        chmod(broker.directory, 0o755)
        let root = try broker.connect()
        let monitor = try BrokerMonitor(root, filter: MonitorFilter(subsystems: MonitorFilter.bit(of: .caps)))
        let flood = try Child("/usr/bin/setpriv", ["--reuid", "65534", "--regid", "65534", "--clear-groups", testPeer,
                                                   "caps-tap-flood", "nobodys.flood", "50000"], environment: broker.environment)
        defer { flood.kill(SIGKILL); _ = try? flood.wait() }
        // Root's requests while the flood runs (the monitor reads nothing meanwhile): every one answered.
        for _ in 0..<2_000 { _ = try root.status() }
        #expect(try flood.readLine() == "flooded")
        #expect(try flood.wait() == .exited(0))
        // Root sees nobody's tapped messages; once it reads again, the next event says how many it
        // missed (a service of root's registered last makes sure there is a next event).
        var tapped = 0
        var missed: UInt64 = 0
        while let event = try monitor.next(timeoutMilliseconds: 200) {
            if event.operation == "tapRequest" && event.object == "nobodys.flood" && event.uid == 65534 { tapped += 1 }
            missed += event.lost
        }
        let sentinel = try CapsService(root, name: "after.the.flood")
        let last = try events(monitor) { event in
            missed += event.lost
            return event.object == "after.the.flood"
        }.found
        #expect(last != nil && tapped > 0 && missed > 0, "tapped \(tapped), missed \(missed)")
        _ = sentinel
    }

    /// A system broker holding nobody's object `/nobodys-object` (`made`: its creation), and
    /// nobody's monitor, showing one event, accepted by the broker.
    func nobodysObjectWatchedByNobody() throws -> (TestBroker, Broker, Finished, Child) {
        let broker = try TestBroker(["--system"])
        chmod(broker.directory, 0o755)
        let root = try broker.connect()
        let made = try runAsOtherUser(["shm", "create", "/nobodys-object", "--size", "4k"], environment: broker.environment)
        #expect(made.termination == .exited(0), "\(made.standardError)")
        let before = try monitorsAccepted(root)
        let watcher = try Child("/usr/bin/setpriv", ["--reuid", "65534", "--regid", "65534", "--clear-groups", patchbayCLI,
                                                     "monitor", "--json", "--count", "1"], environment: broker.environment)
        try waitForMonitors(root, before + 1)
        return (broker, root, made, watcher)
    }

    @Test("nobody's monitor does not see root's failed rename of a name root never made onto nobody's object (it would show root's name)")
    func failedRenameOntoAnotherUsersNameIsNotShownToIt() throws {
        let (broker, root, _, watcher) = try nobodysObjectWatchedByNobody()
        expectErrno(.noSuchFileOrDirectory) { () throws(PatchbayError) in
            try root.renameSharedMemory(from: "/roots-private-plan", to: "/nobodys-object")
        }
        // Nobody's own request next: the first line nobody's monitor shows.
        _ = try runAsOtherUser(["status"], environment: broker.environment)
        let line = try watcher.readLine() ?? ""
        #expect(line.contains("\"operation\": \"status\"") && !line.contains("roots-private-plan"), "nobody's first event: \(line)")
        #expect(try watcher.wait() == .exited(0))
    }

    @Test("nobody's monitor sees root's requests on nobody's objects, never root's tap; nobody cannot tap root's service")
    func monitorSeesOwnObjects() throws {
        let (broker, root, made, watcher) = try nobodysObjectWatchedByNobody()
        // Root's tapped service and its traffic first: nobody must see none of it.
        let service = try CapsService(root, name: "roots.tapped", access: [.world], tap: .payloads)
        let client = try CapsClient(root, name: "roots.tapped")
        let id = try client.put(Array("root's secret".utf8))
        var buffer = [UInt8](repeating: 0, count: 256)
        _ = try buffer.withUnsafeMutableBytes { raw in
            Result { () throws(PatchbayError) -> CapsServiceMessage in try service.wait(into: raw) }
        }.get()
        try service.reply(to: id, Array("root's answer".utf8))
        // Then root tries to open nobody's object read-write (its mode, 0644, refuses): that nobody sees.
        expectErrno(.permissionDenied) { () throws(PatchbayError) in _ = try root.openSharedMemory("/nobodys-object") }
        // Nobody's own request last, so that the watcher has a line even if root's were hidden.
        _ = try runAsOtherUser(["status"], environment: broker.environment)
        if made.termination != .exited(0) { watcher.kill(SIGKILL) }
        let line = try watcher.readLine() ?? ""
        #expect(line.contains("\"object\": \"/nobodys-object\"") && line.contains("\"uid\": 0,")
                && line.contains("\"outcome\": \"EACCES\"") && !line.contains("secret"),
                "nobody's first event: \(line)")
        #expect(try watcher.wait() == .exited(0))

        let tapper = try run("/usr/bin/setpriv", ["--reuid", "65534", "--regid", "65534", "--clear-groups", testPeer,
                                                  "caps-tap", "\(service.serviceID)"], environment: broker.environment)
        #expect(tapper.standardOutput == "refused EPERM\n", "\(tapper.standardOutput)")
        _ = client
    }
}
