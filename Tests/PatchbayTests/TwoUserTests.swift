// Two users, for real: the test (root) and `nobody` (65534), through setpriv. Skipped, with the
// reason shown, when not running as root or when `nobody` cannot run the built products.
import Glibc
import Patchbay
import PatchbayProtocol
import PatchbaySystem
import SystemPackage
import Synchronization
import Testing

let otherUID: uid_t = 65534

/// Whether a second user can be used: root, setpriv present, and `nobody` can run `patchbay`.
let twoUsersAvailable: Bool = {
    guard getuid() == 0, access("/usr/bin/setpriv", X_OK) == 0 else { return false }
    let probe = try? run("/usr/bin/setpriv", ["--reuid", "65534", "--regid", "65534", "--clear-groups",
                                              patchbayCLI, "--version"])
    return probe?.termination == .exited(0)
}()

/// Runs the CLI as `nobody`.
func runAsOtherUser(_ arguments: [String], environment: [String: String?], input: String = "") throws -> Finished {
    try run("/usr/bin/setpriv", ["--reuid", "65534", "--regid", "65534", "--clear-groups", patchbayCLI] + arguments,
            environment: environment, input: input)
}

@Suite("Two users", .enabled(if: twoUsersAvailable, "needs root, setpriv and a nobody user that can run the products"))
struct TwoUserTests {
    /// A broker in a directory other users can reach.
    func openBroker(_ arguments: [String]) throws -> TestBroker {
        let broker = try TestBroker(arguments)
        chmod(broker.directory, 0o755)
        return broker
    }

    @Test("a per-user broker refuses other uids")
    func perUserBrokerRefusesOthers() throws {
        let broker = try openBroker([])
        chmod(broker.socketPath, 0o666)  // let the connection reach the broker's own check
        let status = try runAsOtherUser(["status"], environment: broker.environment)
        #expect(status.termination == .exited(1))
        #expect(status.standardError.hasPrefix("patchbay: status: EACCES: this is the per-user broker of uid 0"),
                "\(status.standardError)")
    }

    @Test("a system broker enforces shared memory modes from kernel credentials")
    func systemBrokerModes() throws {
        let broker = try openBroker(["--system"])
        let root = try broker.connect()
        try root.openSharedMemory("/secret", options: .create, mode: 0o600).truncate(to: 4096)
        try root.openSharedMemory("/public", options: .create, mode: 0o644).truncate(to: 4096)
        let environment = broker.environment
        let secret = try runAsOtherUser(["shm", "read", "/secret"], environment: environment)
        #expect(secret.standardError.hasPrefix("patchbay: shm read: EACCES: "), "\(secret.standardError)")
        #expect(try runAsOtherUser(["shm", "read", "/public"], environment: environment).termination == .exited(0))
        let write = try runAsOtherUser(["shm", "write", "/public"], environment: environment, input: "x")
        #expect(write.standardError.hasPrefix("patchbay: shm write: EACCES: "), "\(write.standardError)")
        let remove = try runAsOtherUser(["shm", "rm", "/public"], environment: environment)
        #expect(remove.standardError.hasPrefix("patchbay: shm rm: EACCES: "), "\(remove.standardError)")
        // An object created by the other user is owned by its kernel identity, whatever it says.
        #expect(try runAsOtherUser(["shm", "create", "/theirs", "--mode", "0600"], environment: environment)
            .termination == .exited(0))
        let theirs = try root.statSharedMemory("/theirs")
        #expect(theirs.uid == otherUID && theirs.gid == 65534)
        // fstat on a descriptor says the same as the broker: nobody's object, nobody's mode.
        #expect(try runAsOtherUser(["shm", "create", "/theirs-public", "--mode", "0444"], environment: environment)
            .termination == .exited(0))
        let status = try root.openSharedMemory("/theirs-public", access: .readOnly).status()
        #expect(status.uid == otherUID && status.gid == 65534 && status.mode & 0o777 == 0o444, "\(status)")
        // Mode bits bind root too (no bypass).
        expectErrno(.permissionDenied) { () throws(PatchbayError) in _ = try root.openSharedMemory("/theirs") }
    }

    @Test("nobody's lease on its own object's file never makes the broker wait: stat and ls do not open the file, an open is EAGAIN at once (the lease's break begun), and succeeds once the lease is gone")
    func leasedObjectNeverStallsTheBroker() throws {
        let broker = try openBroker(["--system"])
        let root = try broker.connect()
        let holder = try nobodyPeer(["shm-lease", "/leased"], broker)
        defer { holder.kill(SIGKILL); _ = try? holder.wait() }
        #expect(try holder.readLine() == "leased")
        // A blocking open by the broker would wait for the lease's break (45 s by default), with
        // everyone's requests behind it; the break would show in F_GETLEASE.
        let info = try root.statSharedMemory("/leased")
        #expect(info.uid == otherUID && info.mode == 0o644)
        #expect(try root.listSharedMemory().contains { $0.name == Array("/leased".utf8) })
        try holder.writeLine("lease?")
        #expect(try holder.readLine() == "lease F_WRLCK")
        let refused = expectErrno(.resourceTemporarilyUnavailable) { () throws(PatchbayError) in
            _ = try root.openSharedMemory("/leased", access: .readOnly)
        }
        #expect(refused?.reason.contains("lease") == true, "\(String(describing: refused))")
        // The open began the break: the holder was told to let go of writing (a read-only open
        // needs the write lease downgraded, to a read lease).
        try holder.writeLine("lease?")
        #expect(try holder.readLine() == "lease F_RDLCK")
        try holder.writeLine("release")
        #expect(try holder.readLine() == "released")
        let opened = try root.openSharedMemory("/leased", access: .readOnly)
        // The descriptor root gets is an ordinary, blocking one.
        #expect(fcntl(opened.descriptor.rawValue, F_GETFL) & O_NONBLOCK == 0)
        #expect(try root.status().clients >= 1)
    }

    @Test("nobody's leases on its own /proc files never make the broker wait when it accepts nobody's connection (it reads the connecting process's /proc/PID/stat then): root is answered while nobody still holds them")
    func procLeasesNeverStallTheBroker() throws {
        let broker = try openBroker(["--system"])
        let holder = try nobodyPeer(["lease-own-proc-and-connect", broker.socketPath], broker)
        // A broker that waited would wait for the leases' break (45 s by default): the watchdog
        // kills the holder sooner, which lets the broker go on, and fails the test below.
        let watchdog = killing(holder.pid, after: 20)
        defer { watchdog(); holder.kill(SIGKILL); _ = try? holder.wait() }
        #expect(try holder.readLine() == "leased")
        #expect(try holder.readLine() == "connected")
        // Three requests in turn: nobody's connection waited to be accepted before the first, so
        // the accept comes before the last of them is answered.
        let root = try broker.connect()
        for _ in 0..<3 { _ = try root.status() }
        try holder.writeLine("release?")
        #expect(try holder.readLine() == "held 3")
    }

    @Test("CAPS: registering someone else's uid or gid is EPERM for a non-root caller")
    func capsRegistrationPermission() throws {
        let broker = try openBroker(["--system"])
        let asRoot = try runAsOtherUser(["caps", "serve", "stolen", "--uid", "0", "--echo"], environment: broker.environment)
        #expect(asRoot.standardError.hasPrefix("patchbay: caps serve: EPERM: "), "\(asRoot.standardError)")
        let asGroup = try runAsOtherUser(["caps", "serve", "stolen", "--uid=-1", "--gid", "0", "--echo"],
                                         environment: broker.environment)
        #expect(asGroup.standardError.hasPrefix("patchbay: caps serve: EPERM: "), "\(asGroup.standardError)")
    }

    @Test("nobody claims root's key and says the file never came: root's own claim is refused (it learns of the theft), not given the file a second time")
    func stolenClaimIsNotGivenBack() throws {
        let broker = try TestBroker(["--system"])
        chmod(broker.directory, 0o755)
        let root = try broker.connect()
        let path = broker.directory + "/secret.txt"
        try writeFile(path, "secret")
        let key = try root.share(try openFile(path, flags: O_RDONLY))
        let thief = try Child("/usr/bin/setpriv", ["--reuid", "65534", "--regid", "65534", "--clear-groups", testPeer,
                                                   "claim-with-full-table", key.text], environment: broker.environment)
        #expect(try thief.readLine() == "EMFILE")
        #expect(throws: PatchbayError.self) { _ = try root.claim(key) }
        thief.closeInput()
        #expect(try thief.readLine() == "claimed on retry")
        _ = try thief.wait()
    }

    @Test("nobody's fresh CAPS names are remembered up to --max-caps-names-per-uid, its oldest then forgotten; root's are not, a forgotten name still comes back newer, and nobody's registrations never move root's generations")
    func rememberedNamesAreBoundedPerUser() throws {
        let broker = try TestBroker(["--system", "--max-caps-names-per-uid", "8"])
        chmod(broker.directory, 0o755)
        let root = try broker.connect()
        do {
            let kept = try CapsService(root, name: "root.kept", access: [.world])
            #expect(kept.currentGeneration == 1)
            let raised = try CapsService(root, name: "root.raised", access: [.world])
            try raised.setGeneration(40)
        }
        while try root.listServices().contains(where: { $0.name == "root.kept" || $0.name == "root.raised" }) { sched_yield() }
        // nobody registers 30 fresh names, one after another; without a bound the broker would keep
        // all 30 for good. Each starts above every generation nobody forgot before it.
        let churn = try nobodyPeer(["caps-register-many", "n", "30"], broker)
        let said = try churn.readLine() ?? ""
        let generations = said.split(separator: " ").dropFirst().compactMap { UInt64($0) }
        #expect(said.hasPrefix("generations ") && generations.count == 30, "\(said)")
        #expect(generations.first == 1 && zip(generations, generations.dropFirst()).allSatisfy { $0 <= $1 }, "\(said)")
        _ = try churn.wait()
        // The generations file, replayed line by line as the broker reads it at start.
        let text = try String(decoding: openFile(broker.directory + "/shm/state/caps-generations", flags: O_RDONLY).readToEnd(limit: 1 << 20),
                              as: UTF8.self)
        var remembered = Set<String>()
        for line in text.split(separator: "\n") {
            let fields = line.split(separator: " ").map(String.init)
            guard fields.count == 3, fields[1] != "*" else { continue }
            if fields[0] == "-" { remembered.remove(fields[2] + " " + fields[1]) } else { remembered.insert(fields[2] + " " + fields[1]) }
        }
        let nobodys = remembered.filter { $0.hasPrefix("65534 ") }.sorted()
        #expect(nobodys == (22..<30).map { "65534 n.\($0)" }.sorted(), "the 8 most recent stay: \(nobodys)")
        #expect(remembered.contains("0 root.kept") && remembered.contains("0 root.raised"))
        // Root's names were not forgotten for nobody's: their generations go on.
        #expect((try CapsService(root, name: "root.kept", access: [.world])).currentGeneration == 2)
        #expect((try CapsService(root, name: "root.raised", access: [.world])).currentGeneration == 41)
        // Nobody's names are nobody's record: root registering one starts its own at 1.
        #expect((try CapsService(root, name: "n.29", access: [.world])).currentGeneration == 1)
        guard generations.count == 30 else { return }
        // nobody's forgotten name comes back above every generation nobody forgot (n.0 to n.21's;
        // n.22 goes then), its remembered one from its own; and root's name, free while root's
        // service is down, is a name nobody never had (above n.22's, and n.23 goes), registered
        // with a huge generation: root's own goes on from 2 all the same.
        while try root.listServices().contains(where: { $0.name == "root.kept" || $0.name == "n.29" }) { sched_yield() }
        let again = try nobodyPeer(["caps-register", "n.0", "n.28", "root.kept=9223372036854775000"], broker)
        #expect(try again.readLine() == "generations \(generations[21] + 1) \(generations[28] + 1) \(generations[22] + 1)")
        _ = try again.wait()
        #expect((try CapsService(root, name: "root.kept", access: [.world])).currentGeneration == 3)
        // A broker started again reads it all back: what was forgotten, the floors, what was kept.
        kill(broker.pid, SIGKILL)
        _ = try waitForProcess(broker.pid)
        let restarted = try spawnDaemon(socketPath: broker.socketPath, sharedMemoryDirectory: broker.directory + "/shm", ["--system"])
        defer { kill(restarted, SIGTERM); _ = try? waitForProcess(restarted) }
        let after = try Broker(socketPath: broker.socketPath)
        #expect((try CapsService(after, name: "root.kept", access: [.world])).currentGeneration == 4)
        let later = try nobodyPeer(["caps-register", "n.1", "n.27"], broker)
        #expect(try later.readLine() == "generations \(generations[23] + 1) \(generations[27] + 1)")
        _ = try later.wait()
    }

    @Test("capsRefuseUser from a connection that is no service port moves nothing: root still connects to root's service")
    func refuseUserFromElsewhereIsIgnored() throws {
        let broker = try TestBroker(["--system"])
        chmod(broker.directory, 0o755)
        let root = try broker.connect()
        let service = try CapsService(root, name: "guarded", access: [.world])
        for uid in ["0", "65534"] {
            let peer = try nobodyPeer(["refuse-user-raw", uid], broker)
            #expect(try peer.readLine() == "sent")
            _ = try peer.wait()
        }
        _ = try CapsClient(root, name: "guarded")
        let visitor = try nobodyPeer(["caps-connect-many", "guarded", "1"], broker)
        defer { visitor.closeInput(); _ = try? visitor.wait() }
        #expect(try visitor.readLine() == "connected 1")
        withExtendedLifetime(service) {}
    }

    @Test("root's request is taken in the loop's next turn, not after the thousands nobody pipelined on hundreds of connections")
    func busyUserDoesNotDelayAnother() throws {
        let broker = try TestBroker(["--system"])
        chmod(broker.directory, 0o755)
        let root = try broker.connect()
        _ = try root.status()
        // 500 connections of 16 metrics requests each: 8,000 requests of 16 units of work.
        let flood = try Child("/usr/bin/setpriv", ["--reuid", "65534", "--regid", "65534", "--clear-groups", testPeer,
                                                   "pipeline-metrics", "500", "16"], environment: broker.environment)
        defer { flood.closeInput(); _ = try? flood.wait() }
        #expect(try flood.readLine() == "queued")
        _ = try root.status()
        try flood.writeLine("count")
        let line = try flood.readLine() ?? ""
        let answered = Int(line.split(separator: " ").dropFirst().first ?? "") ?? .max
        // A uid's work per turn is bounded (1,024 units: 64 of these), and every ready connection
        // is looked at in each turn, so root's request came back before nobody had one answer per
        // connection. (Served a connection at a time, root's connection waited for all of
        // nobody's ready ones: 4 answers each.)
        #expect(line.hasPrefix("answered ") && answered < 500, "\(line)")
    }

    @Test("nobody may hold 5 connections to root's world service with --max-caps-clients-per-uid 5, not 6 (EDQUOT); root may hold more")
    func capsClientsPerUserAreBounded() throws {
        let broker = try TestBroker(["--system", "--max-caps-clients-per-uid", "5"])
        chmod(broker.directory, 0o755)
        let root = try broker.connect()
        let service = try CapsService(root, name: "crowded", access: [.world])
        let crowd = try Child("/usr/bin/setpriv", ["--reuid", "65534", "--regid", "65534", "--clear-groups", testPeer,
                                                   "caps-connect-many", "crowded", "50"], environment: broker.environment)
        defer { crowd.closeInput(); _ = try? crowd.wait() }
        #expect(try crowd.readLine() == "refused at 6 EDQUOT")
        let rootClients = try (0..<8).map { _ in try CapsClient(root, name: "crowded") }
        #expect(rootClients.count == 8)
        withExtendedLifetime(service) {}
    }

    @Test("CAPS access classes for another user: USER and GROUP by kernel identity, WORLD for anyone")
    func capsAccessClasses() throws {
        let broker = try openBroker(["--system"])
        let root = try broker.connect()
        // Root's USER-only service, a GROUP service for nobody's group, and a WORLD service.
        let services = [
            try CapsService(root, name: "root.user", access: [.user]),
            try CapsService(root, name: "nobody.group", uid: -1, gid: 65534, access: [.group]),
            try CapsService(root, name: "anyone.world", access: [.world]),
        ]
        let stop = Atomic<Bool>(false)
        for service in services {
            startThread {
                while !stop.load(ordering: .relaxed) {
                    try? service.receive { (message: CapsServiceMessage, payload: UnsafeRawBufferPointer) in
                        if message.kind == .request {
                            try? service.reply(to: message.messageID, Array("uid \(message.credentials.uid)".utf8))
                        }
                    }
                }
            }
        }
        defer {
            stop.store(true, ordering: .relaxed)
            for service in services { service.cancelWait() }
        }
        let environment = broker.environment
        let user = try runAsOtherUser(["caps", "call", "root.user", "hi"], environment: environment)
        #expect(user.standardError.hasPrefix("patchbay: caps call: EACCES: "), "\(user.standardError)")
        // The service sees the caller's kernel uid, whatever the caller might claim.
        let group = try runAsOtherUser(["caps", "call", "nobody.group", "hi"], environment: environment)
        #expect(group.standardOutput.hasPrefix("uid 65534"), "\(group.standardOutput)\(group.standardError)")
        let world = try runAsOtherUser(["caps", "call", "anyone.world", "hi"], environment: environment)
        #expect(world.standardOutput.hasPrefix("uid 65534"), "\(world.standardOutput)\(world.standardError)")
        // Asking for a service "of uid 65534" does not make root's service theirs.
        let forged = try runAsOtherUser(["caps", "call", "root.user", "--uid", "65534", "hi"], environment: environment)
        #expect(forged.standardError.hasPrefix("patchbay: caps call: ENOENT: "), "\(forged.standardError)")
    }

    @Test("C names a service's owner as DragonFly's caps_sys_client does: root reaches nobody's service by its uid, not by name alone; nobody cannot register as root")
    func cClientNamesTheServiceOwner() throws {
        let build = try CBuild.shared.get()
        // The C test program and its library link, where nobody can run them.
        chmod(build.libraryDirectory, 0o755)
        let broker = try openBroker(["--system"])
        var environment = build.environment(broker)
        environment["PATCHBAY_SOCKET"] = broker.socketPath
        // Access bits: PB_CAPS_USER 1, PB_CAPS_WORLD 4.
        let asNobody = ["--reuid", "65534", "--regid", "65534", "--clear-groups", build.testProgram]
        // nobody may register only under its own uid and groups.
        for (uid, gid) in [("0", "-1"), ("-1", "0")] {
            let stolen = try run("/usr/bin/setpriv", asNobody + ["register", "c.owned", uid, gid, "4"],
                                 environment: environment)
            #expect(stolen.standardOutput == "error \(EPERM)\n", "\(stolen.standardOutput)\(stolen.standardError)")
        }
        let service = try Child("/usr/bin/setpriv", asNobody + ["register", "c.owned", "65534", "-1", "4"],
                                environment: environment)
        #expect(try service.readLine() == "ready")
        // By name alone, root's client looks only for services it can trust (its own, root's).
        let byName = try run(build.testProgram, ["connect", "c.owned", "-1", "-1", "0", "hi"], environment: environment)
        #expect(byName.standardOutput == "error \(ENOENT)\n", "\(byName.standardOutput)\(byName.standardError)")
        // The classes must meet: the service admits WORLD only.
        let userOnly = try run(build.testProgram, ["connect", "c.owned", "65534", "-1", "1", "hi"],
                               environment: environment)
        #expect(userOnly.standardOutput == "error \(EACCES)\n", "\(userOnly.standardOutput)\(userOnly.standardError)")
        let named = try run(build.testProgram, ["connect", "c.owned", "65534", "-1", "4", "hi"],
                            environment: environment)
        // nobody's service saw root's kernel uid on the request, then the DISPOSE.
        try expectServedOnce(service, named, from: "0", "root's call by uid")
    }

    @Test("a service root registers for a uid past 2^31 admits that uid through USER (the id travels as its bits)")
    func capsUserClassPastTwoToThe31() throws {
        let build = try CBuild.shared.get()
        chmod(build.libraryDirectory, 0o755)
        let broker = try openBroker(["--system"])
        let environment = build.environment(broker)
        let service = try Child(build.testProgram, ["register", "c.high", "3000000000", "-1", "1"], environment: environment)
        #expect(try service.readLine() == "ready")
        let call = try run("/usr/bin/setpriv", ["--reuid", "3000000000", "--regid", "3000000000", "--clear-groups",
                                                build.testProgram, "connect", "c.high", "3000000000", "-1", "1", "hi"],
                           environment: environment)
        try expectServedOnce(service, call, from: "3000000000", "uid 3000000000's call")
    }

    /// The variables named `prefix`… in `output` (lines of `env`), each with every value it had:
    /// one set twice shows as two.
    private func variables(_ output: String, startingWith prefix: String) -> [String: [String]] {
        var found: [String: [String]] = [:]
        for line in output.split(separator: "\n") where line.hasPrefix(prefix) {
            let parts = line.split(separator: "=", maxSplits: 1)
            found[String(parts[0]), default: []].append(parts.count == 2 ? String(parts[1]) : "")
        }
        return found
    }

    /// The C test program's `register` service, after `call` (its `connect`): answered, and the
    /// service saw the request with the caller's kernel uid, then its DISPOSE, and ended. A
    /// failed call leaves the service waiting for a request that never comes: it is killed.
    private func expectServedOnce(_ service: Child, _ call: Finished, from uid: String, _ what: String,
                                  sourceLocation: SourceLocation = #_sourceLocation) throws {
        guard call.standardOutput == "c:hi\n" else {
            Issue.record("\(what): \(call.standardOutput)\(call.standardError)", sourceLocation: sourceLocation)
            service.kill(SIGKILL)
            _ = try service.wait()
            return
        }
        let request = try #require(try service.readLine(), sourceLocation: sourceLocation).split(separator: " ")
        #expect(request.count == 5 && request[0] == "request" && request[3] == uid[...], "\(request)",
                sourceLocation: sourceLocation)
        #expect(try service.readLine() == "dispose \(request.count == 5 ? request[1] : "")", sourceLocation: sourceLocation)
        #expect(try service.wait() == .exited(0), sourceLocation: sourceLocation)
    }

    @Test("caps serve --exec gives its program the kernel's credentials of the request's client (nobody's, not what the service's environment said) and the message id")
    func execProgramSeesItsClient() throws {
        let broker = try openBroker(["--system"])
        var environment = broker.environment
        // A value the service inherited must not pass for the client's, nor stay beside it.
        environment["PATCHBAY_CAPS_CLIENT_UID"] = "0"
        let service = try Child(patchbayCLI, ["caps", "serve", "whoami", "--allow", "world", "--exec", "/usr/bin/env"],
                                environment: environment)
        defer { service.kill(SIGTERM); _ = try? service.wait() }
        let caller = try Child("/usr/bin/setpriv", ["--reuid", "65534", "--regid", "65534", "--clear-groups", patchbayCLI,
                                                    "caps", "call", "whoami", "--wait-for-service", "x"], environment: broker.environment)
        var output = ""
        while let line = try caller.readLine() { output += line + "\n" }
        #expect(try caller.wait() == .exited(0))
        let seen = variables(output, startingWith: "PATCHBAY_CAPS_")
        let messageID = seen["PATCHBAY_CAPS_MESSAGE_ID"] ?? []
        #expect(messageID.count == 1 && messageID.first.flatMap { UInt64($0) }.map { $0 > 0 } == true, "\(seen)")
        #expect(seen.filter { $0.key != "PATCHBAY_CAPS_MESSAGE_ID" }
                    == ["PATCHBAY_CAPS_CLIENT_PID": ["\(caller.pid)"], "PATCHBAY_CAPS_CLIENT_UID": ["65534"],
                        "PATCHBAY_CAPS_CLIENT_EUID": ["65534"], "PATCHBAY_CAPS_CLIENT_GID": ["65534"]], "\(seen)")
        // Root's own call says root.
        let mine = variables(String(decoding: try CapsClient(try broker.connect(), name: "whoami").call(Array("x".utf8)), as: UTF8.self),
                             startingWith: "PATCHBAY_CAPS_")
        #expect(mine["PATCHBAY_CAPS_CLIENT_PID"] == ["\(getpid())"] && mine["PATCHBAY_CAPS_CLIENT_UID"] == ["0"]
                    && mine["PATCHBAY_CAPS_CLIENT_GID"] == ["\(getegid())"], "\(mine)")
    }

    @Test("net listen --exec gives its program the connection's peer as the kernel recorded it (nobody), whatever the server's environment said")
    func netExecProgramSeesItsPeer() throws {
        let broker = try openBroker(["--system"])
        var environment = broker.environment
        environment["PATCHBAY_NET_PEER_UID"] = "0"
        let server = try Child(patchbayCLI, ["net", "listen", "peerenv", "--type", "stream", "--exec", "/usr/bin/env"],
                               environment: environment)
        defer { server.kill(SIGTERM); _ = try? server.wait() }
        _ = try waitUntilListening(try broker.connect(), "peerenv")
        let peer = try Child("/usr/bin/setpriv", ["--reuid", "65534", "--regid", "65534", "--clear-groups", patchbayCLI,
                                                  "net", "connect", "peerenv", "--type", "stream"], environment: broker.environment)
        peer.closeInput()
        var output = ""
        while let line = try peer.readLine() { output += line + "\n" }
        _ = try peer.wait()
        let seen = variables(output, startingWith: "PATCHBAY_NET_PEER_")
        #expect(seen == ["PATCHBAY_NET_PEER_PID": ["\(peer.pid)"], "PATCHBAY_NET_PEER_UID": ["65534"],
                         "PATCHBAY_NET_PEER_GID": ["65534"]], "\(seen)")
    }

    @Test("share --for-uid: only that uid can claim")
    func claimRestrictedToAnotherUser() throws {
        let broker = try openBroker(["--system"])
        let root = try broker.connect()
        let path = broker.directory + "/for-nobody.txt"
        try writeFile(path, "for nobody only")
        chmod(path, 0o600)  // nobody cannot open it; only the key gets it there
        let key = try root.share(try openFile(path, flags: O_RDONLY), claimableBy: .uid(otherUID))
        let wrongKey = try root.share(try openFile(path, flags: O_RDONLY), claimableBy: .uid(0))
        let claimed = try runAsOtherUser(["claim", key.text], environment: broker.environment)
        #expect(claimed.standardOutput == "for nobody only", "\(claimed.standardError)")
        let refused = try runAsOtherUser(["claim", wrongKey.text], environment: broker.environment)
        #expect(refused.standardError.hasPrefix("patchbay: claim: ENOENT: "))
        _ = try root.claim(wrongKey)
    }

    @Test("a key for a set-uid program's pid is not claimed by nobody's child over the connection the program's process made before its exec")
    func childOfSetUIDProgramCannotClaim() throws {
        let broker = try openBroker(["--system"])
        let root = try broker.connect()
        let path = broker.directory + "/for-the-helper.txt"
        try writeFile(path, "for the set-uid helper only")
        chmod(path, 0o600)
        // nobody connects, forks, and the connecting process execs a set-uid root program (it
        // waits on its input: chfn asks for a password) with the same pid, start time and pidfd;
        // its child keeps the connection. (A program that is not set-uid, where chfn is missing,
        // shows the same: the connection is the child's to use now, not the program's.)
        var chfn = stat()
        let setUID = stat("/usr/bin/chfn", &chfn) == 0 && chfn.st_mode & S_ISUID != 0 && chfn.st_uid == 0
        let program = setUID ? ["/usr/bin/chfn"] : ["/bin/sleep", "60"]
        let attacker = try Child("/usr/bin/setpriv", ["--reuid", "65534", "--regid", "65534", "--clear-groups", testPeer,
                                                      "claim-after-exec"] + program, environment: broker.environment)
        defer { attacker.kill(SIGKILL); _ = try? attacker.wait() }
        let line = try #require(try attacker.readLine())
        let pid = try #require(line.hasPrefix("exec'd ") ? pid_t(line.dropFirst(7)) : nil, "\(line)")
        if setUID {
            // Root sees a process running as root (euid 0) under that pid: its helper.
            let status = try run("/bin/grep", ["^Uid:", "/proc/\(pid)/status"]).standardOutput
            let uids = status.split(whereSeparator: \.isWhitespace)
            #expect(uids.count == 5 && uids[1] == "65534" && uids[2] == "0", "\(uids)")
        }
        let key = try root.share(try openFile(path, flags: O_RDONLY), timeout: .never, claimableBy: .pid(pid))
        try attacker.writeLine("claim " + key.text)
        #expect(try attacker.readLine() == "refused EPERM")
        #expect(try root.status().keys == 1, "the key is still there for the helper")
        attacker.closeInput()
        _ = try attacker.wait()
    }

    @Test("nobody's child cannot open a CAPS channel (nor register a service) under a set-uid program's pid, over the connection the program's process made before its exec")
    func childOfSetUIDProgramCannotSpeakForIt() throws {
        let broker = try openBroker(["--system"])
        let root = try broker.connect()
        let service = try CapsService(root, name: "whoami", access: [.world], notifyConnections: true)
        var chfn = stat()
        let setUID = stat("/usr/bin/chfn", &chfn) == 0 && chfn.st_mode & S_ISUID != 0 && chfn.st_uid == 0
        let program = setUID ? ["/usr/bin/chfn"] : ["/bin/sleep", "60"]
        for command in ["caps-client whoami", "caps-service mine"] {
            let attacker = try Child("/usr/bin/setpriv", ["--reuid", "65534", "--regid", "65534", "--clear-groups", testPeer,
                                                          "claim-after-exec"] + program, environment: broker.environment)
            defer { attacker.kill(SIGKILL); _ = try? attacker.wait() }
            let line = try #require(try attacker.readLine())
            #expect(line.hasPrefix("exec'd "), "\(line)")
            // Without the rule, root's service would see the program's pid (its euid 0 by then),
            // and capsList would show it as the registering process.
            try attacker.writeLine(command)
            #expect(try attacker.readLine() == "refused EPERM", "\(command)")
            attacker.closeInput()
            _ = try attacker.wait()
        }
        let services = try root.listServices()
        #expect(services.first { $0.name == "whoami" }?.clients == 0 && !services.contains { $0.name == "mine" })
        withExtendedLifetime(service) {}
    }
}
