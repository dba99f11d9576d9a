// Two users against one system broker, for what one uid can make the broker (or the other uid)
// pay: shared memory bytes enforced by the kernel per uid, names another uid planted, and the
// descriptors a uid can make the broker hold.
import Glibc
import Patchbay
import PatchbaySystem
import Synchronization
import SystemPackage
import Testing

@Suite("Two users: resources", .enabled(if: twoUsersAvailable, "needs root, setpriv and a nobody user that can run the products"))
struct TwoUserResourceTests {
    func openBroker(_ arguments: [String]) throws -> TestBroker {
        let broker = try TestBroker(["--system"] + arguments)
        chmod(broker.directory, 0o755)
        return broker
    }

    @Test("nobody connecting and closing in a loop is refused (EAGAIN, saying why) past its burst before the broker reads its process; root, at the same pace, never is, and its own connection is served throughout")
    func connectionChurnIsRateLimitedPerUid() throws {
        let broker = try openBroker(["--connection-burst-per-uid", "12", "--connections-per-second-per-uid", "0.5"])
        let root = try broker.connect()
        let churn = try nobodyPeer(["connect-churn", "40"], broker)
        let said = try churn.readLine() ?? ""
        _ = try churn.wait()
        // 12 in the burst (a token back every 2 s may add one on a slow machine), then refused.
        #expect(said.hasPrefix("refused at 13 EAGAIN: uid 65534 opens connections faster than the broker takes them from one user")
                    || said.hasPrefix("refused at 14 EAGAIN: uid 65534 opens connections faster"), "\(said)")
        // Root's connection, open all along, is served; root may open as many as it likes.
        _ = try root.status()
        let rootChurn = try Child(testPeer, ["connect-churn", "40"], environment: broker.environment)
        #expect(try rootChurn.readLine() == "connected 40")
        _ = try rootChurn.wait()
        let refused = Exposition(try root.metrics()).samples["patchbay_connections_refused_for_rate_total{to=\"broker\"}"] ?? -1
        #expect(refused == 1, "one refusal (nobody stopped at its first): \(refused)")
    }

    @Test("the system broker listens for root on a socket of its own (mode 0600) that nobody cannot connect to: with the shared socket's backlog filled by nobody while the broker is held up, root still connects, and root's library goes through it")
    func rootHasASocketOfItsOwn() throws {
        let broker = try openBroker(["--listen-backlog", "2"])
        let rootPath = broker.socketPath + ".root"
        var info = stat()
        #expect(lstat(rootPath, &info) == 0)
        #expect(info.st_mode & S_IFMT == S_IFSOCK && info.st_uid == 0 && info.st_mode & 0o777 == 0o600,
                "mode \(String(info.st_mode, radix: 8)), uid \(info.st_uid)")
        let knocking = try nobodyPeer(["connect-to", rootPath], broker)
        #expect(try knocking.readLine() == "EACCES")
        _ = try knocking.wait()
        // Should its mode let nobody in, the broker still serves nobody nothing there.
        chmod(rootPath, 0o666)
        let inside = try Child("/usr/bin/setpriv", setprivNobody + [testPeer, "connect-churn", "1"],
                               environment: ["PATCHBAY_SOCKET": rootPath])
        let insideSaid = try inside.readLine() ?? ""
        #expect(insideSaid.hasPrefix("refused at 1 "), "\(insideSaid)")
        _ = try inside.wait()
        chmod(rootPath, 0o600)

        // The broker held up: nobody fills the shared socket's backlog; a connection there is then
        // refused at once, and root's own socket still takes one.
        kill(broker.pid, SIGSTOP)
        var resumed = false
        defer { if !resumed { kill(broker.pid, SIGCONT) } }
        let filler = try nobodyPeer(["connect-fill"], broker)
        let said = try filler.readLine() ?? ""
        #expect(said.hasPrefix("filled ") && said.hasSuffix(" EAGAIN"), "\(said)")
        let shared = try SeqpacketSocket()
        #expect(throws: Errno.resourceTemporarilyUnavailable) {
            try UnixSocket.connectWithoutBlocking(on: shared.descriptor.rawValue, path: broker.socketPath)
        }
        let own = try SeqpacketSocket()
        try UnixSocket.connectWithoutBlocking(on: own.descriptor.rawValue, path: rootPath)
        kill(broker.pid, SIGCONT)
        resumed = true

        // Root's library connects through its own socket: the broker counts that one and the raw one.
        let root = try broker.connect()
        let onRootSocket = Exposition(try root.metrics()).samples["patchbay_connections_on_root_socket_total"] ?? -1
        #expect(onRootSocket == 2, "\(onRootSocket)")
        filler.closeInput()
        _ = try filler.wait()
        try broker.stop()
        #expect(!fileExists(atPath: rootPath), "the broker removes root's socket when it stops")
    }

    @Test("root's library uses a socket beside the broker's only if root listens there: one another user planted is passed over for the broker's own")
    func plantedRootSocketIsPassedOver() throws {
        // A broker that makes no socket of root's own (per-user mode), in a directory anyone may
        // write: nobody listens at the name root's library looks at first, and drops what comes.
        let broker = try TestBroker([])
        chmod(broker.directory, 0o777)
        let planted = try nobodyPeer(["listen-and-drop", broker.socketPath + ".root"], broker)
        #expect(try planted.readLine() == "listening")
        let root = try broker.connect()
        #expect(try root.status().pid == broker.pid)
        #expect(socketFileOwner(atPath: broker.socketPath + ".root") == 65534)
        planted.closeInput()
        _ = try planted.wait()
        unlink(broker.socketPath + ".root")

        // One planted with its backlog full, where a blocking connect would wait for ever: root's
        // program (a child, stopped after 20 s if it hangs) still reaches the broker.
        let full = try nobodyPeer(["listen-full", broker.socketPath + ".root"], broker)
        defer { full.closeInput(); _ = try? full.wait() }
        #expect(try full.readLine() == "listening full")
        let program = try Child(testPeer, ["connect-churn", "1"], environment: broker.environment)
        let watchdog = killing(program.pid, after: 20)
        #expect(try program.readLine() == "connected 1")
        watchdog()
        _ = try program.wait()
    }

    @Test("with autostart off, root's client still checks its per-user default path: nobody who made that directory first and runs a broker in it gets neither root's status request nor what root shares (EACCES)")
    func defaultPathIsCheckedWithoutAutostart() throws {
        let runtime = makeTemporaryDirectory()
        defer { removeTree(runtime) }
        chmod(runtime, 0o777)
        let directory = runtime + "/patchbay"
        let store = runtime + "/nobody-shm"
        #expect(try run("/usr/bin/setpriv", setprivNobody + ["/bin/mkdir", "-m", "0755", directory]).termination == .exited(0))
        #expect(try run("/usr/bin/setpriv", setprivNobody + ["/bin/mkdir", "-m", "0700", store]).termination == .exited(0))
        let squatter = try daemonSayingReady(["--system", "--socket", directory + "/patchbay.sock", "--shm-directory", store,
                                              "--policy-directory", store], asNobody: true)
        defer { squatter.kill(SIGTERM); _ = try? squatter.wait() }
        #expect(try squatter.readLine() == "ready")
        let environment: [String: String?] = ["XDG_RUNTIME_DIR": runtime, "PATCHBAY_SOCKET": nil, "PATCHBAY_AUTOSTART": "0"]
        let status = try run(patchbayCLI, ["status"], environment: environment)
        #expect(status.termination != .exited(0))
        #expect(status.standardError.hasPrefix("patchbay: status: EACCES: \(directory) belongs to uid 65534"), "\(status.standardError)")
        let share = try run(patchbayCLI, ["share", "/etc/hostname"], environment: environment)
        #expect(share.termination != .exited(0))
        #expect(share.standardError.hasPrefix("patchbay: share: EACCES: "), "\(share.standardError)")
        #expect(share.standardOutput.isEmpty, "no key: \(share.standardOutput)")
    }

    @Test("a system broker whose shared memory store's name nobody took first, in a directory anyone may write (as /dev/shm), moves nobody's entry aside and starts")
    func plantedStoreIsMovedAside() throws {
        try expectStoreTakenBack { (store: String) throws -> Child? in
            #expect(try run("/usr/bin/setpriv", setprivNobody + ["/bin/mkdir", "-m", "0700", store]).termination == .exited(0))
            return nil
        }
    }

    @Test("a system broker starts although nobody makes its store's name again whenever it is gone, in a directory anyone may write: the store is put in place in one step (in exchange for nobody's entry, moved aside once)")
    func racedStoreNameIsExchanged() throws {
        // Moved aside and then made anew, the name was nobody's again by the broker's mkdir.
        try expectStoreTakenBack { (store: String) throws -> Child? in
            let racer = try Child("/usr/bin/setpriv", setprivNobody + [testPeer, "mkdir-loop", store])
            #expect(try racer.readLine() == "looping")
            return racer
        }
    }

    /// A system broker on a store in a sticky directory anyone may write (as /dev/shm), started
    /// once `plant` made nobody's entry at the store's path (and perhaps goes on making it: the
    /// process it returns, killed at the end): the broker starts, the store is root's and
    /// private, nobody's entry was moved aside once, and no directory of the broker's own is
    /// left beside it.
    private func expectStoreTakenBack(plant: (String) throws -> Child?) throws {
        let socketDirectory = makeTemporaryDirectory()
        let shared = makeTemporaryDirectory()
        defer { unmountEverything(under: shared); removeTree(shared); removeTree(socketDirectory) }
        chmod(shared, 0o1777)
        let store = shared + "/patchbay-system"
        let planter = try plant(store)
        defer { planter?.kill(SIGKILL); _ = try? planter?.wait() }
        let broker = try daemonSayingReady(["--system", "--socket", socketDirectory + "/patchbay.sock", "--shm-directory", store])
        defer { broker.kill(SIGTERM); _ = try? broker.wait() }
        #expect(try broker.readLine() == "ready")
        var info = stat()
        #expect(lstat(store, &info) == 0 && info.st_uid == 0 && info.st_mode & 0o777 == 0o700, "uid \(info.st_uid)")
        let entries = try directoryEntries(shared)
        let moved = entries.filter { $0.hasPrefix("patchbay-system.moved-aside-65534-") }
        #expect(moved.count == 1, "\(entries)")
        #expect(moved.first.map { lstat(shared + "/" + $0, &info) == 0 && info.st_uid == 65534 } == true)
        #expect(entries.allSatisfy { !$0.hasPrefix("patchbay-system.new-") }, "\(entries)")
    }

    @Test("nobody filling the file system the system broker's store is on (/dev/shm, which anyone may write) changes nothing for root: the journal and the CAPS files are on a tmpfs of the store's own, so creates, renames, removals and CAPS registrations go on, before a crash and after it")
    func fullStoreFileSystem() throws {
        let socketDirectory = makeTemporaryDirectory()
        let shared = makeTemporaryDirectory()
        defer { unmountEverything(under: shared); removeTree(shared); removeTree(socketDirectory) }
        #expect(try run("/bin/mount", ["-t", "tmpfs", "-o", "size=2m,mode=1777", "tmpfs", shared]).termination == .exited(0))
        let socket = socketDirectory + "/patchbay.sock"
        let store = shared + "/patchbay-system"
        let arguments = ["--system", "--socket", socket, "--shm-directory", store]
        let first = try daemonSayingReady(arguments)
        #expect(try first.readLine() == "ready")
        #expect(isMountPoint(store + "/state"))
        let filler = try run("/usr/bin/setpriv", setprivNobody + ["/bin/sh", "-c", "cat /dev/zero > \(shared)/filler"])
        #expect(filler.standardError.contains("No space left"), "\(filler.standardError)")
        do {
            let root = try Broker(socketPath: socket)
            try root.openSharedMemory("/kept", options: .create).truncate(to: 8192)
            _ = try root.openSharedMemory("/moved", options: .create)
            try root.renameSharedMemory(from: "/moved", to: "/renamed")
            _ = try root.openSharedMemory("/gone", options: .create)
            try root.unlinkSharedMemory("/gone")
            let during = try CapsService(root, name: "during", access: [.world])
            #expect(try root.listServices().contains { $0.name == "during" })
            withExtendedLifetime(during) {}
        }
        // A crash, the file system still full.
        first.kill(SIGKILL)
        _ = try first.wait()
        let second = try daemonSayingReady(arguments)
        defer { second.kill(SIGTERM); _ = try? second.wait() }
        #expect(try second.readLine() == "ready")
        let root = try Broker(socketPath: socket)
        #expect(try root.statSharedMemory("/kept").size == 8192)
        _ = try root.statSharedMemory("/renamed")
        for gone in ["/moved", "/gone"] {
            expectErrno(.noSuchFileOrDirectory) { () throws(PatchbayError) in _ = try root.statSharedMemory(gone) }
        }
        // The first service after a start reserves a new block of ids; its name's hold is saved.
        let after = try CapsService(root, name: "after", access: [.world])
        #expect(after.serviceID > 4096)
        let saved = String(decoding: try openFile(store + "/state/caps-generations", flags: O_RDONLY).readToEnd(limit: 1 << 20), as: UTF8.self)
        #expect(saved.contains(" during ") && saved.contains(" after "), "\(saved)")
        #expect(access(shared + "/filler", F_OK) == 0)
        withExtendedLifetime(after) {}
    }

    @Test("nobody filling the file system a per-user broker's store is on (as /dev/shm, which anyone may write; a per-user broker cannot mount one of its own) neither keeps the broker from starting again nor makes it hand out CAPS ids it could not reserve; with room again, all is as before")
    func fullJournalFileSystem() throws {
        let socketDirectory = makeTemporaryDirectory()
        let shared = makeTemporaryDirectory()
        defer { unmountEverything(under: shared); removeTree(shared); removeTree(socketDirectory) }
        #expect(try run("/bin/mount", ["-t", "tmpfs", "-o", "size=2m,mode=1777", "tmpfs", shared]).termination == .exited(0))
        let socket = socketDirectory + "/patchbay.sock"
        let arguments = ["--socket", socket, "--shm-directory", shared + "/patchbay-0"]
        let first = try daemonSayingReady(arguments)
        #expect(try first.readLine() == "ready")
        #expect(!isMountPoint(shared + "/patchbay-0/state"))
        let generations = shared + "/patchbay-0/caps-generations"
        do {
            let root = try Broker(socketPath: socket)
            try root.openSharedMemory("/kept", options: .create).truncate(to: 8192)
            // Kept open while the file is padded below (its close appends a line).
            let before = try CapsService(root, name: "before", access: [.world])
            defer { withExtendedLifetime(before) {} }
            // The generations file's last page full (lines of one word are skipped when read), so
            // that its next line needs a block of the full file system.
            var info = stat()
            #expect(stat(generations, &info) == 0 && info.st_size < 4096)
            let padding = Array(String(repeating: "x\n", count: (4096 - Int(info.st_size)) / 2).utf8)
                + (info.st_size % 2 == 1 ? Array("\n".utf8) : [])
            let file = try openFile(generations, flags: O_WRONLY | O_APPEND)
            try file.writeAll(padding)
            #expect(stat(generations, &info) == 0 && info.st_size == 4096)
            // nobody fills the file system.
            let filler = try run("/usr/bin/setpriv", setprivNobody + ["/bin/sh", "-c", "cat /dev/zero > \(shared)/filler"])
            #expect(filler.standardError.contains("No space left"), "\(filler.standardError)")
            // An id is at hand (its block reserved), but the registration's generation and hold
            // cannot be saved: it is refused, so that a restart cannot give its name to another.
            let unsaved = expectErrno(.noSpace) { () throws(PatchbayError) in _ = try CapsService(root, name: "during", access: [.world]) }
            #expect(unsaved?.reason.contains("generation") == true, "\(String(describing: unsaved))")
            #expect(try !root.listServices().contains { $0.name == "during" })
        }
        // The broker is killed (a crash, a restart).
        first.kill(SIGKILL)
        _ = try first.wait()
        let second = try daemonSayingReady(arguments)
        defer { second.kill(SIGTERM); _ = try? second.wait() }
        #expect(try second.readLine() == "ready")
        let root = try Broker(socketPath: socket)
        #expect(try root.statSharedMemory("/kept").size == 8192)
        // A new service needs an id this broker has not reserved yet: refused, not handed out.
        let refused = expectErrno(.noSpace) { () throws(PatchbayError) in _ = try CapsService(root, name: "during", access: [.world]) }
        #expect(refused?.reason.contains("reserve") == true, "\(String(describing: refused))")
        #expect(unlink(shared + "/filler") == 0)
        let after = try CapsService(root, name: "after", access: [.world])
        #expect(after.serviceID > 4096)  // past the block the first broker reserved
        #expect(try root.openSharedMemory("/new", options: .create).size == 0)
        let saved = String(decoding: try openFile(generations, flags: O_RDONLY).readToEnd(limit: 1 << 20), as: UTF8.self)
        #expect(saved.contains("held after 0\n") && !saved.contains(" during "), "\(saved)")
    }

    @Test("a per-user broker whose store's default name (/dev/shm/patchbay-$UID, in a directory anyone may write) another user took keeps its store beside it under a name of its own, recorded in its private socket directory, and finds its objects there after a restart, and after the record is removed; the taker's entry is left alone")
    func perUserStoreNameTakenByAnother() throws {
        // A user with no other business on this machine (no passwd entry needed), running its
        // per-user broker at the default path: no XDG_RUNTIME_DIR, so /tmp/patchbay-$UID.
        let uid = UInt32.random(in: 40_000..<60_000)
        let store = "/dev/shm/patchbay-\(uid)"
        let socketDirectory = "/tmp/patchbay-\(uid)"
        func cleanUp() {
            let stores = ((try? directoryEntries("/dev/shm")) ?? []).filter { $0 == "patchbay-\(uid)" || $0.hasPrefix("patchbay-\(uid)-") }
            _ = try? run("/bin/rm", ["-rf", socketDirectory] + stores.map { "/dev/shm/" + $0 })
        }
        cleanUp()
        defer { cleanUp() }
        let asUser = ["--reuid", "\(uid)", "--regid", "\(uid)", "--clear-groups"]
        let environment: [String: String?] = ["XDG_RUNTIME_DIR": nil, "PATCHBAY_SOCKET": nil, "PATCHBAY_AUTOSTART": "0"]
        #expect(try run("/usr/bin/setpriv", setprivNobody + ["/bin/mkdir", "-m", "0700", store]).termination == .exited(0))
        func startBroker() throws -> Child {
            try Child("/usr/bin/setpriv", asUser + ["/bin/sh", "-c", "exec \"$0\" --ready-fd 3 3>&1", patchbayDaemon], environment: environment)
        }
        func cli(_ arguments: [String], input: String = "") throws -> Finished {
            try run("/usr/bin/setpriv", asUser + [patchbayCLI] + arguments, environment: environment, input: input)
        }
        let first = try startBroker()
        defer { first.kill(SIGTERM); _ = try? first.wait() }
        #expect(try first.readLine() == "ready")
        let create = try cli(["shm", "create", "/kept"])
        #expect(create.termination == .exited(0), "\(create.standardError)")
        let write = try cli(["shm", "write", "/kept"], input: "kept bytes")
        #expect(write.termination == .exited(0), "\(write.standardError)")
        // The record names a directory of the user's own beside the taken name.
        var target = [CChar](repeating: 0, count: 4097)
        let length = readlink(socketDirectory + "/shm-store", &target, 4096)
        let place = length > 0 ? String(decoding: target[0..<length].map { UInt8(bitPattern: $0) }, as: UTF8.self) : ""
        #expect(place.hasPrefix(store + "-") && place.utf8.count == store.utf8.count + 7, "\(place)")
        var info = stat()
        #expect(lstat(place, &info) == 0 && info.st_uid == uid && info.st_mode & 0o7777 == 0o700, "\(place): uid \(info.st_uid)")
        #expect(lstat(store, &info) == 0 && info.st_uid == 65534, "nobody's entry was touched")
        // A restart finds the store through the record, with the object in it.
        first.kill(SIGTERM)
        #expect(try first.wait() == .exited(0))
        let second = try startBroker()
        defer { second.kill(SIGTERM); _ = try? second.wait() }
        #expect(try second.readLine() == "ready")
        let read = try cli(["shm", "read", "/kept"])
        #expect(read.termination == .exited(0), "\(read.standardError)")
        #expect(read.standardOutput == "kept bytes")
        let doctor = try cli(["doctor"])
        #expect(doctor.standardOutput.contains(place), "\(doctor.standardOutput)")
        // A cleaner of /tmp removes the record, the store staying in /dev/shm: the next broker
        // finds the store it left there, and records it again.
        second.kill(SIGTERM)
        #expect(try second.wait() == .exited(0))
        #expect(unlink(socketDirectory + "/shm-store") == 0)
        let third = try startBroker()
        defer { third.kill(SIGTERM); _ = try? third.wait() }
        #expect(try third.readLine() == "ready")
        let again = try cli(["shm", "read", "/kept"])
        #expect(again.termination == .exited(0), "\(again.standardError)")
        #expect(again.standardOutput == "kept bytes")
        let relength = readlink(socketDirectory + "/shm-store", &target, 4096)
        #expect(relength > 0 && String(decoding: target[0..<relength].map { UInt8(bitPattern: $0) }, as: UTF8.self) == place)
    }

    @Test("nobody connecting to root's /net listener past its burst finds its connections closed unaccepted (the broker accepts and hands over no more of them); root's own connections, at the same pace, are all served")
    func netConnectionChurnIsRateLimitedPerUid() throws {
        let broker = try openBroker(["--net-connection-burst-per-uid", "5", "--net-connections-per-second-per-uid", "0.5"])
        let root = try broker.connect()
        let server = try Child(patchbayCLI, ["net", "listen", "churned", "--echo"], environment: broker.environment)
        defer { server.kill(SIGTERM); _ = try? server.wait() }
        _ = try waitUntilListening(root, "churned")
        let churn = try nobodyPeer(["net-connect-hold", "churned", "12"], broker)
        let said = try churn.readLine() ?? ""
        churn.closeInput()
        _ = try churn.wait()
        // 5 in the burst (a token back every 2 s may add one on a slow machine), the rest closed.
        #expect(said == "echoed 5 ended 7" || said == "echoed 6 ended 6", "\(said)")
        let mine = try Child(testPeer, ["net-connect-hold", "churned", "12"], environment: broker.environment)
        #expect(try mine.readLine() == "echoed 12 ended 0")
        mine.closeInput()
        _ = try mine.wait()
        let refused = Exposition(try root.metrics()).samples["patchbay_connections_refused_for_rate_total{to=\"net\"}"] ?? -1
        #expect(refused == 7 || refused == 6, "\(refused)")
    }

    @Test("root's caps serve --exec bounds what nobody's requests make its program do: output past --max-reply is not read (EMSGSIZE), a program past --exec-timeout is killed (ETIMEDOUT), and output a process it left behind holds open is given up at that deadline (ETIMEDOUT); the service answers again after each; with --exec-timeout never a slow program is waited for")
    func execProgramsAreBounded() throws {
        let broker = try TestBroker(["--system"])
        chmod(broker.directory, 0o755)
        func serve(_ name: String, _ options: [String]) throws -> Child {
            try Child(patchbayCLI, ["caps", "serve", name, "--allow", "world"] + options, environment: broker.environment)
        }
        // `yes` never ends and writes as fast as it can; `sleep` never reads and outlives the
        // limit; the shell exits at once, leaving a sleep behind that holds its stdout.
        let services = [try serve("endless", ["--max-reply", "1M", "--exec", "/usr/bin/yes"]),
                        try serve("stuck", ["--exec-timeout", "300ms", "--exec", "/bin/sleep", "20"]),
                        try serve("leaver", ["--exec-timeout", "300ms", "--exec", "/bin/sh", "-c", "/bin/sleep 20.5 & exec /bin/cat"]),
                        try serve("patient", ["--exec-timeout", "never", "--exec", "/bin/sh", "-c", "/bin/sleep 1.5; exec /bin/cat"])]
        // Without the bounds the calls below never end: the services are killed after 60 s, and
        // the calls then fail otherwise.
        let watchdogs = services.map { killing($0.pid, after: 60) }
        defer {
            watchdogs.forEach { $0() }
            for service in services { service.kill(SIGKILL); _ = try? service.wait() }
            // The sleeps the shell left behind (the starter does not own them).
            for pid in processes(withCommandLine: "/bin/sleep 20.5 ") { kill(pid, SIGKILL) }
        }
        func callAsNobody(_ name: String) throws -> Finished {
            try run("/usr/bin/setpriv", ["--reuid", "65534", "--regid", "65534", "--clear-groups", patchbayCLI,
                                         "caps", "call", name, "--wait-for-service", "from nobody"], environment: broker.environment)
        }
        let root = try broker.connect()
        for (name, errno) in [("endless", "EMSGSIZE"), ("stuck", "ETIMEDOUT"), ("leaver", "ETIMEDOUT")] {
            let call = try callAsNobody(name)
            #expect(call.termination == .exited(1), "\(name): \(call.standardError)")
            #expect(call.standardOutput.isEmpty, "\(name)")
            #expect(call.standardError.hasPrefix("patchbay: caps call: \(errno): the service answered request "), "\(name): \(call.standardError)")
        }
        // Each service is still there, and answers root the same way.
        expectErrno(.messageTooLong) { () throws(PatchbayError) in _ = try CapsClient(root, name: "endless").call(Array("x".utf8)) }
        expectErrno(.timedOut) { () throws(PatchbayError) in _ = try CapsClient(root, name: "stuck").call(Array("x".utf8)) }
        // Without a limit, a program takes the time it takes (here more than the second this
        // side otherwise waits past the limit).
        #expect(try CapsClient(root, name: "patient", waitForService: true).call(Array("in time".utf8)) == Array("in time".utf8))
        // The programs were killed and reaped: the starters have no child left.
        for service in services.prefix(2) {
            let starter = try #require(childProcesses(of: service.pid).first { processCommandLine(of: $0).contains("exec-starter") })
            #expect(childProcesses(of: starter).isEmpty, "\(processCommandLine(of: starter)) still has children")
        }
    }

    @Test("root's caps serve --exec runs nobody's programs no more than --max-programs-per-uid at once: root is answered while nobody's slow requests run and wait")
    func execProgramsTakeTurns() throws {
        let broker = try TestBroker(["--system"])
        chmod(broker.directory, 0o755)
        // A request "slow" says so through the FIFO, then sleeps two minutes; any other is echoed.
        let started = broker.directory + "/started"
        #expect(mkfifo(started, 0o600) == 0)
        let service = try Child(patchbayCLI, ["caps", "serve", "paced", "--allow", "world", "--max-programs", "2",
                                              "--exec-timeout", "180s", "--exec", "/bin/sh", "-c",
                                              "read x; if [ \"$x\" = slow ]; then echo started > \(started); exec /bin/sleep 121.5; fi; echo \"$x\""],
                                environment: broker.environment)
        // One program at a time, or no cap per uid, and root's call waits two minutes behind
        // nobody's: the service is killed after 45 s and the call then fails.
        let watchdog = killing(service.pid, after: 45)
        var callers: [Child] = []
        defer {
            watchdog()
            service.kill(SIGKILL)
            _ = try? service.wait()
            for caller in callers { caller.kill(SIGKILL); _ = try? caller.wait() }
            for pid in processes(withCommandLine: "/bin/sleep 121.5") { kill(pid, SIGKILL) }
        }
        for _ in 0..<3 {
            callers.append(try Child("/usr/bin/setpriv", ["--reuid", "65534", "--regid", "65534", "--clear-groups", patchbayCLI,
                                                          "caps", "call", "paced", "--wait-for-service", "slow"],
                                     environment: broker.environment))
        }
        // nobody's first program is running (its others wait: one slot of two is nobody's).
        let fifo = open(started, O_RDONLY | O_NONBLOCK | O_CLOEXEC)
        #expect(fifo >= 0)
        defer { close(fifo) }
        var ready = pollfd(fd: fifo, events: Int16(POLLIN), revents: 0)
        #expect(poll(&ready, 1, 40_000) == 1)
        var line = [UInt8](repeating: 0, count: 16)
        #expect(read(fifo, &line, line.count) == 8 && Array(line.prefix(8)) == Array("started\n".utf8))
        // All three of nobody's requests are the service's before root's comes (it counts the
        // entries it takes in its status page, and the broker shows the count).
        let root = try broker.connect()
        let taken = "patchbay_caps_messages_total{service=\"paced\",uid=\"0\",direction=\"to_service\"}"
        var requests = 0.0
        for _ in 0..<2_000 where requests < 3 {
            requests = Exposition(try root.metrics()).samples[taken] ?? 0
            if requests < 3 { usleep(10_000) }
        }
        #expect(requests == 3)
        #expect(try CapsClient(root, name: "paced", waitForService: true).call(Array("fast".utf8)) == Array("fast\n".utf8))
    }

    @Test("nobody cannot leave descriptors with root's service by rewriting the id of a request it read short: what was kept for the old id is closed, and root's service is back to its own descriptors once nobody leaves")
    func rewrittenShortReadKeepsNothing() throws {
        let broker = try TestBroker(["--system"])
        chmod(broker.directory, 0o755)
        let service = try Child(testPeer, ["caps-short-reader", "kept"], environment: broker.environment)
        defer { service.kill(SIGKILL); _ = try? service.wait() }
        let ready = try #require(try service.readLine())
        #expect(ready.hasPrefix("ready "))
        let own = ready.split(separator: " ").last.map(String.init) ?? ""
        let client = try nobodyPeer(["caps-rewrite-kept", "kept"], broker)
        defer { client.kill(SIGKILL); _ = try? client.wait() }
        let put = try #require(try client.readLine())
        // Read short: its 8 descriptors kept for the request's next read.
        #expect(try service.readLine() == "short \(put.dropFirst(4))")
        // nobody writes a new id over the entry, with 8 more descriptors under it.
        try client.writeLine("rewrite")
        let rewritten = try #require(try client.readLine())
        #expect(rewritten.hasPrefix("rewritten ") && rewritten != "rewritten none", "\(rewritten)")
        // Root's refusal names the id it read: no longer the entry's.
        try service.writeLine("go")
        #expect(try service.readLine() == "EINVAL")
        #expect(try service.readLine() == "short \(rewritten.dropFirst(10))")
        try service.writeLine("go")
        #expect(try service.readLine() == "refused")
        // nobody leaves: its refused request is DISPOSEd, and the service holds what it held
        // before nobody came (with the leak, 8 of nobody's descriptors more, for good).
        client.closeInput()
        _ = try client.wait()
        let disposed = try service.readLine()
        #expect(disposed == "dispose \(rewritten.dropFirst(10)) \(own)", "\(disposed ?? "nothing"), ready with \(own)")
    }

    @Test("the loop's time refusing nobody's connections to root's /net listener is charged to nobody's share of the turn, not root's (whose other requests waited turn after turn while nobody connected in a loop)")
    func refusedNetConnectionsAreChargedToTheirMaker() throws {
        let broker = try openBroker(["--net-connection-burst-per-uid", "2", "--net-connections-per-second-per-uid", "0.5"])
        let root = try broker.connect()
        let server = try Child(patchbayCLI, ["net", "listen", "charged", "--echo"], environment: broker.environment)
        defer { server.kill(SIGTERM); _ = try? server.wait() }
        _ = try waitUntilListening(root, "charged")
        // Plain connects to the listener's file: nobody sends the broker nothing at all.
        let churn = try nobodyPeer(["connect-to", broker.directory + "/net/charged", "12"], broker)
        #expect(try churn.readLine() == "connected 12")
        _ = try churn.wait()
        // Wait (bounded) for the broker to have refused the ones past the burst.
        var refused = 0.0
        for _ in 0..<500 where refused < 9 {
            refused = Exposition(try root.metrics()).samples["patchbay_connections_refused_for_rate_total{to=\"net\"}"] ?? 0
            if refused < 9 { usleep(10_000) }
        }
        #expect(refused >= 9, "\(refused)")
        let charged = Exposition(try root.metrics()).samples["patchbay_user_loop_seconds_total{uid=\"65534\"}"] ?? 0
        #expect(charged > 0, "\(charged)")
    }

    @Test("root's net listen serves nobody at most --max-connections-per-uid connections at once (its others are closed at once) and root still gets through; with few descriptors it serves what it can hold, and never loses its name")
    func listenerBoundsOneUsersConnections() throws {
        let broker = try openBroker([])
        let root = try broker.connect()
        func answers(_ name: String, _ text: String) throws -> Bool {
            let socket = try Socket.connect(root, to: name)
            _ = try socket.send(Array(text.utf8))
            return try socket.receive()?.bytes == Array(text.utf8)
        }
        let server = try Child(patchbayCLI, ["net", "listen", "bounded", "--echo", "--max-connections", "8", "--max-connections-per-uid", "3"],
                               environment: broker.environment)
        defer { server.kill(SIGTERM); _ = try? server.wait() }
        _ = try waitUntilListening(root, "bounded")
        let holder = try nobodyPeer(["net-connect-hold", "bounded", "6"], broker)
        #expect(try holder.readLine() == "echoed 3 ended 3")
        // Root is the server's own uid: served while nobody holds its three.
        #expect(try answers("bounded", "root"))
        holder.closeInput()
        _ = try holder.wait()

        // A server with few descriptors (a hard limit of 40: each connection holds two) serves
        // only as many connections as it can hold (4 here), whatever --max-connections says:
        // the rest would wait in the backlog, none is lost for want of a descriptor, and it
        // goes on serving under its name. (Before, it took them until accept ran out and lost
        // the ones it could not take.)
        let starved = try Child("/usr/bin/prlimit", ["--nofile=40", "--", patchbayCLI, "net", "listen", "starved", "--echo",
                                                     "--max-connections-per-uid", "100"], environment: broker.environment)
        defer { starved.kill(SIGTERM); _ = try? starved.wait() }
        let listening = try waitUntilListening(root, "starved")
        let flood = try nobodyPeer(["net-connect-hold", "starved", "4"], broker)
        #expect(try flood.readLine() == "echoed 4 ended 0")
        flood.closeInput()
        _ = try flood.wait()
        #expect(starved.isRunning)
        // Once nobody's connections are gone, root's is answered, by the same server.
        let deadline = monotonicNanoseconds() + 20_000_000_000
        var answered = false
        while !answered && monotonicNanoseconds() < deadline { answered = try answers("starved", "still mine") }
        #expect(answered)
        #expect(try root.listSockets().first { $0.name == "starved" }?.ownerPID == listening.ownerPID)

        // The same limit with the default share: the bound comes from the descriptor limit (40:
        // 4 connections), a quarter of it per uid, so nobody holding 16 connections has one
        // served and cannot lock root out (before: 64 a uid, every descriptor nobody's).
        let shared = try Child("/usr/bin/prlimit", ["--nofile=40", "--", patchbayCLI, "net", "listen", "shared", "--echo"],
                               environment: broker.environment)
        defer { shared.kill(SIGTERM); _ = try? shared.wait() }
        _ = try waitUntilListening(root, "shared")
        let hog = try nobodyPeer(["net-connect-hold", "shared", "16"], broker)
        #expect(try hog.readLine() == "echoed 1 ended 15")
        #expect(try answers("shared", "root while nobody holds its share"))
        hog.closeInput()
        _ = try hog.wait()
    }

    @Test("shared memory bytes: a uid that grows its object through its own descriptor fills only its own tmpfs; root's objects keep working")
    func sharedMemoryBytesPerUid() throws {
        let broker = try openBroker(["--max-shm-bytes-per-uid", "1M"])
        let root = try broker.connect()
        // nobody creates a small object, then grows it far past its quota with ftruncate on its
        // own descriptor (the broker is not asked), and writes into it.
        let environment = broker.environment
        #expect(try runAsOtherUser(["shm", "create", "/big", "--size", "64M", "--mode", "0644"], environment: environment)
            .termination == .exited(0))
        let payload = String(repeating: "x", count: 2 << 20)
        let filled = try runAsOtherUser(["shm", "write", "/big"], environment: environment, input: payload)
        #expect(filled.termination != .exited(0), "nobody wrote 2 MiB with a 1 MiB quota")
        #expect(filled.standardError.contains("ENOSPC") || filled.standardError.contains("EDQUOT"), "\(filled.standardError)")
        let info = try root.statSharedMemory("/big")
        #expect(info.size == 64 << 20)
        #expect(info.blocks * 512 <= 1 << 20 + 4096, "nobody's object occupies \(info.blocks * 512) bytes")
        // Its next create is EDQUOT: its tmpfs is full.
        let more = try runAsOtherUser(["shm", "create", "/more", "--size", "4k"], environment: environment)
        #expect(more.standardError.contains("EDQUOT"), "\(more.standardError)")
        // Root's own object, in the same broker, fills half a megabyte as if nobody had done
        // anything: root's tmpfs is its own. (Writing through a mapping would SIGBUS this test
        // process if the memory were not there.)
        let mine = try root.openSharedMemory("/mine", options: .create, mode: 0o600)
        try mine.truncate(to: 512 << 10)
        let mapping = try mine.map()
        mapping.withUnsafeMutableBytes { bytes in
            for offset in stride(from: 0, to: bytes.count, by: 4096) { bytes[offset] = 1 }
        }
        #expect(try root.statSharedMemory("/mine").blocks * 512 >= 512 << 10)
    }

    @Test("a clean stop unmounts each uid's empty store and removes a store left with no object; one with an object stays, mounted")
    func emptyStoreRemovedAtCleanStop() throws {
        let broker = try openBroker([])
        let store = broker.directory + "/shm"
        let uidStore = store + "/uids/\(otherUID)"
        let environment = broker.environment
        #expect(try runAsOtherUser(["shm", "create", "/passing", "--size", "4k"], environment: environment).termination == .exited(0))
        #expect(isMountPoint(uidStore), "nobody's objects live in a tmpfs of its own")
        #expect(try runAsOtherUser(["shm", "rm", "/passing"], environment: environment).termination == .exited(0))
        #expect(try broker.stop() == .exited(0))
        #expect(!isMountPoint(uidStore))
        #expect(access(store, F_OK) != 0, "the store, empty, outlived its broker")

        // With an object left, the store and nobody's tmpfs stay for the next broker.
        let kept = try openBroker([])
        let keptStore = kept.directory + "/shm"
        #expect(try runAsOtherUser(["shm", "create", "/kept", "--size", "4k"], environment: kept.environment).termination == .exited(0))
        #expect(try kept.stop() == .exited(0))
        #expect(isMountPoint(keptStore + "/uids/\(otherUID)"))
        #expect(access(keptStore + "/state/journal", F_OK) == 0)
    }

    @Test("nobody's listeners killed with an accept waiting leave no stale watch behind: the broker takes every later connection, root's included")
    func killedListenersLeaveNoStaleWatch() throws {
        let broker = try openBroker([])
        let root = try broker.connect()
        for round in 0..<4 {
            // `net listen` waits in a blocking accept; killed, its session and its socket's
            // handle go at once, in whichever order the broker sees them.
            let name = "trap-\(round)"
            let listener = try Child("/usr/bin/setpriv", ["--reuid", "65534", "--regid", "65534", "--clear-groups", patchbayCLI,
                                                          "net", "listen", name, "--echo"], environment: broker.environment)
            let id = try waitUntilListening(root, name).id
            #expect(try eventually { try root.listSockets().first(where: { $0.id == id })?.waitingAccepts ?? 0 > 0 })
            listener.kill(SIGKILL)
            _ = try listener.wait()
            #expect(try eventually { try !root.listSockets().contains(where: { $0.id == id }) })
        }
        // And in the order that always left the watch behind: the waiting connection leaves
        // first, then the listener closes.
        let ordered = try run("/usr/bin/setpriv", ["--reuid", "65534", "--regid", "65534", "--clear-groups", testPeer,
                                                   "net-accept-left-behind", "trap-ordered"], environment: broker.environment)
        #expect(ordered.standardOutput == "done\n", "\(ordered.standardError)")
        // The listeners' descriptor numbers are free again in the broker; connections made now
        // take them.
        try expectEveryConnectionAdmitted(broker)
    }

    @Test("nobody's blocking accepts: one waits per connection, the other 999 are EINVAL at once; root's listener accepts as before")
    func oneWaitingAcceptForNobody() throws {
        let broker = try openBroker([])
        let root = try broker.connect()
        let attacker = try nobodyPeer(["net-accept-many", "accept.flood", "1000"], broker)
        defer { attacker.closeInput() }
        let said = try attacker.readLine()
        #expect(said == "refused 999 of 999 EINVAL, waiting 1", "\(String(describing: said))")
        // The broker lists the one waiting accept too, and root's own listener is not held up.
        let flood = try #require(try root.listSockets().first(where: { $0.name == "accept.flood" }))
        #expect(flood.waitingAccepts == 1 && flood.ownerUID == otherUID, "\(flood)")
        let listener = try Socket.listen(root, name: "root.accepts")
        let caller = try Socket.connect(root, to: "root.accepts")
        let accepted = try listener.accept()
        try caller.send(Array("past the flood".utf8))
        #expect(try accepted.receive()?.bytes == Array("past the flood".utf8))
    }

    @Test("a name another uid planted is not opened by create: root's create of nobody's object is EACCES")
    func squattedName() throws {
        let broker = try openBroker([])
        let root = try broker.connect()
        #expect(try runAsOtherUser(["shm", "create", "/app-state", "--mode", "0666", "--size", "4k"],
                                   environment: broker.environment).termination == .exited(0))
        let error = expectErrno(.permissionDenied) { () throws(PatchbayError) in
            _ = try root.openSharedMemory("/app-state", options: .create, mode: 0o600)
        }
        #expect(error?.reason.contains("belongs to uid 65534") == true, "\(String(describing: error))")
        // Opening it without create is still possible, on its mode: that is asking for it by name.
        _ = try root.openSharedMemory("/app-state", access: .readOnly)
        // And nobody may create-open root's objects (root is trusted), subject to their mode.
        _ = try root.openSharedMemory("/root-state", options: .create, mode: 0o644)
        let reopen = try runAsOtherUser(["shm", "create", "/root-state"], environment: broker.environment)
        #expect(reopen.standardError.hasPrefix("patchbay: shm create: EACCES: "), "\(reopen.standardError)")
    }
}

extension TwoUserResourceTests {
    @Test("the /net address lists nobody keeps open count against its own shared memory quota: past it, it gets the last list again, and its own creates fail; root's are untouched")
    func pinnedAddressListsAreCharged() throws {
        let broker = try openBroker(["--max-shm-bytes-per-uid", "64K"])
        let root = try broker.connect()
        let pinner = try nobodyPeer(["pin-addrs", "60"], broker)
        defer { pinner.closeInput(); _ = try? pinner.wait() }
        let said = try pinner.readLine() ?? ""
        // Each list is a page of nobody's 64 KiB (16 pages): without the charge, the build rate
        // limit alone (a burst of 32) would have let it keep 32 or more.
        let distinct = Int(said.split(separator: " ").dropFirst().first ?? "") ?? .max
        #expect(said.hasPrefix("distinct ") && distinct <= 17, "\(said)")
        #expect(try pinner.readLine() == "reopen for writing: EACCES")
        let full = try runAsOtherUser(["shm", "create", "/nobody-state", "--size", "4k"], environment: broker.environment)
        #expect(full.termination != .exited(0) && full.standardError.contains("EDQUOT"), "\(full.standardError)")
        // Root's quota is its own: it creates, and gets a list of its own.
        let mine = try root.openSharedMemory("/root-state", options: .create)
        try mine.truncate(to: 4096)
        _ = try root.openAddressList()
    }

    @Test("nobody renames root's own world-writable object onto the name root is about to create privately: root's create is EACCES, before and after a broker restart; nobody's rename is allowed (it may read and write the object)")
    func plantedByRenameIsNotOpenedByCreate() throws {
        let broker = try openBroker([])
        let root = try broker.connect()
        // World-writable: made through the CLI with umask 0 (this process's umask stays as it is).
        let made = try run("/bin/sh", ["-c", "umask 0 && exec \"$0\" shm create /public/board --size 4k --mode 0666", patchbayCLI],
                           environment: broker.environment)
        #expect(made.termination == .exited(0), "\(made.standardError)")
        #expect(try root.statSharedMemory("/public/board").mode == 0o666)
        let moved = try runAsOtherUser(["shm", "mv", "/public/board", "/app/secret"], environment: broker.environment)
        #expect(moved.termination == .exited(0), "\(moved.standardError)")
        let error = expectErrno(.permissionDenied) { () throws(PatchbayError) in
            _ = try root.openSharedMemory("/app/secret", options: .create, mode: 0o600)
        }
        #expect(error?.reason.contains("put under that name by uid 65534") == true, "\(String(describing: error))")
        // The CLI says so and exits non-zero.
        let create = try run(patchbayCLI, ["shm", "create", "/app/secret", "--mode", "0600", "--size", "4k"], environment: broker.environment)
        #expect(create.termination != .exited(0) && create.standardError.contains("EACCES"), "\(create.standardError)")
        // Opening it by name without create is asking for that object, on its mode.
        _ = try root.openSharedMemory("/app/secret", access: .readOnly)
        // Who put it there is journalled: a restarted broker refuses the same.
        kill(broker.pid, SIGKILL)
        _ = try waitForProcess(broker.pid)
        let restarted = try spawnDaemon(socketPath: broker.socketPath, sharedMemoryDirectory: broker.directory + "/shm", ["--system"])
        defer { kill(restarted, SIGTERM); _ = try? waitForProcess(restarted) }
        let again = try Broker(socketPath: broker.socketPath)
        expectErrno(.permissionDenied) { () throws(PatchbayError) in
            _ = try again.openSharedMemory("/app/secret", options: .create, mode: 0o600)
        }
        // Root renaming it back names it root's again: create-open allowed.
        try again.renameSharedMemory(from: "/app/secret", to: "/app/mine")
        _ = try again.openSharedMemory("/app/mine", options: .create, mode: 0o600)
    }

    @Test("the namespace's change counter is the broker's uid's only: nobody gets EACCES and opens through the broker, with the same answers")
    func changeCounterIsRootsOnly() throws {
        let broker = try openBroker([])
        let root = try broker.connect()
        let object = try root.openSharedMemory("/shared-state", options: .create, mode: 0o644)
        try object.truncate(to: 5)
        _ = try object.map().withUnsafeMutableBytes { $0.copyBytes(from: Array("hello".utf8)) }
        // nobody reads it twice (each `shm read` opens it plainly, which asks for the counter first).
        for _ in 0..<2 {
            let read = try runAsOtherUser(["shm", "read", "/shared-state"], environment: broker.environment)
            #expect(read.termination == .exited(0) && read.standardOutput == "hello", "\(read.standardError)")
        }
        let refused = "patchbay_requests_total{subsystem=\"shm\",operation=\"sharedMemoryWatch\",outcome=\"EACCES\"} 2"
        #expect(try root.metrics().contains(refused))
        // Root's own reopen still skips the broker after the first (the counter is root's).
        _ = try root.openSharedMemory("/shared-state")
        let before = try root.metrics()
        _ = try root.openSharedMemory("/shared-state")
        let after = try root.metrics()
        let opens = "patchbay_requests_total{subsystem=\"shm\",operation=\"sharedMemoryOpen\",outcome=\"ok\"}"
        let count = { (text: String) in text.split(separator: "\n").first { $0.hasPrefix(opens) }.map { String($0) } }
        #expect(count(before) == count(after), "the second reopen did not reach the broker")
    }
}

/// Whether the next pid can be chosen (`/proc/sys/kernel/ns_last_pid`, root with CAP_SYS_ADMIN).
let pidsCanBeSteered: Bool = access("/proc/sys/kernel/ns_last_pid", W_OK) == 0

/// The pid of the child that made the connection `attacker` (the test peer's
/// `claim-through-orphaned-connection`) holds: it has exited, so its pid is free.
private func orphanedPid(of attacker: Child) throws -> pid_t {
    let line = try #require(try attacker.readLine())
    return try #require(line.hasPrefix("orphaned ") ? pid_t(line.dropFirst(9)) : nil, "\(line)")
}

/// A root process (`sleep 60`) made to get `pid` through `ns_last_pid`, as waiting for the pid
/// counter to wrap would; nil if no try got it.
private func rootProcess(withPid pid: pid_t) throws -> Child? {
    // Other tests running at the same time fork too, and may take the number between the write
    // and this fork: under the full suite 50 tries in a row were seen to miss, so the tries go
    // on for up to a minute (they hit at once when nothing else forks).
    let deadline = monotonicNanoseconds() + 60_000_000_000
    while monotonicNanoseconds() < deadline {
        try writeFile("/proc/sys/kernel/ns_last_pid", "\(pid - 1)")
        let attempt = try Child("/bin/sleep", ["60"])
        if attempt.pid == pid { return attempt }
        attempt.kill(SIGKILL)
        _ = try attempt.wait()
    }
    return nil
}

@Suite("Two users: pid reuse", .enabled(if: twoUsersAvailable && pidsCanBeSteered, "needs root with CAP_SYS_ADMIN, setpriv and nobody"))
struct PidReuseTests {
    @Test("a key restricted to a pid is not claimed by a later process that got the same pid")
    func recycledPidCannotClaim() throws {
        let broker = try TestBroker(["--system"])
        chmod(broker.directory, 0o755)
        let root = try broker.connect()
        // The intended claimer: alive when the key is made, then gone.
        let intended = try Child("/bin/sleep", ["60"])
        let pid = intended.pid
        let key = try root.share(try openFile("/etc/hostname", flags: O_RDONLY), timeout: .never, claimableBy: .pid(pid))
        intended.kill(SIGKILL)
        try intended.wait()
        // nobody's claimer is made to get that very pid (ns_last_pid), as a fork loop eventually
        // would. Other tests spawn processes too, so a try may miss the number; a few tries hit it.
        var landed = 0
        for _ in 0..<50 where landed == 0 {
            try writeFile("/proc/sys/kernel/ns_last_pid", "\(pid - 1)")
            let attempt = try Child("/usr/bin/setpriv", ["--reuid", "65534", "--regid", "65534", "--clear-groups",
                                                          patchbayCLI, "claim", key.text], environment: broker.environment)
            let output = try attempt.readLine()
            let termination = try attempt.wait()
            if attempt.pid == pid {
                landed += 1
                #expect(output == nil, "a process that recycled pid \(pid) claimed the key")
                #expect(termination == .exited(1))
            }
        }
        #expect(landed > 0, "no try got pid \(pid)")
        // The key is still there, for the process it was meant for (gone), so nobody has it.
        #expect(try root.status().keys == 1)
    }

    @Test("a key restricted to a running process is not claimed over a connection an earlier holder of its pid made")
    func orphanedConnectionCannotClaim() throws {
        let broker = try TestBroker(["--system"])
        chmod(broker.directory, 0o755)
        let root = try broker.connect()
        // nobody's child connects, hands the connection to its parent and exits: its pid is free.
        let attacker = try Child("/usr/bin/setpriv", ["--reuid", "65534", "--regid", "65534", "--clear-groups", testPeer,
                                                      "claim-through-orphaned-connection"], environment: broker.environment)
        defer { attacker.kill(SIGKILL); _ = try? attacker.wait() }
        let pid = try orphanedPid(of: attacker)
        // The key is restricted to root's process with that pid, alive.
        let victim = try #require(try rootProcess(withPid: pid), "no try got pid \(pid)")
        defer { victim.kill(SIGKILL); _ = try? victim.wait() }
        let key = try root.share(try openFile("/etc/hostname", flags: O_RDONLY), timeout: .never, claimableBy: .pid(pid))
        try attacker.writeLine("claim " + key.text)
        let outcome = try attacker.readLine()
        // Refused for not being sent by the connection's maker (EPERM), before the key is looked at.
        #expect(outcome == "refused EPERM", "\(String(describing: outcome))")
        #expect(try root.status().keys == 1)
    }

    @Test("a CAPS service sees nobody as nobody over a connection an earlier holder of a root process's pid made, never with root's real uid")
    func orphanedConnectionCannotBorrowRealUID() throws {
        let broker = try TestBroker(["--system"])
        chmod(broker.directory, 0o755)
        let root = try broker.connect()
        let service = try CapsService(root, name: "whoami", access: [.world], notifyConnections: true)
        let attacker = try Child("/usr/bin/setpriv", ["--reuid", "65534", "--regid", "65534", "--clear-groups", testPeer,
                                                      "claim-through-orphaned-connection"], environment: broker.environment)
        defer { attacker.kill(SIGKILL); _ = try? attacker.wait() }
        let pid = try orphanedPid(of: attacker)
        let holder = try #require(try rootProcess(withPid: pid), "no try got pid \(pid)")
        defer { holder.kill(SIGKILL); _ = try? holder.wait() }
        // The connection is not the sender's (the kernel says which process sent each frame): the
        // request is refused before anything reads the pid's credentials.
        try attacker.writeLine("caps-client whoami")
        #expect(try attacker.readLine() == "refused EPERM")
        #expect(try root.listServices().first { $0.name == "whoami" }?.clients == 0)
        withExtendedLifetime(service) {}
    }
}

@Suite("Two users: names", .enabled(if: twoUsersAvailable, "needs root, setpriv and a nobody user that can run the products"))
struct TwoUserNameTests {
    func openBroker(_ arguments: [String]) throws -> TestBroker {
        let broker = try TestBroker(["--system"] + arguments)
        chmod(broker.directory, 0o755)
        return broker
    }

    /// Starts `caps serve NAME --allow world --echo` as nobody and waits (bounded) until the
    /// broker lists the registration.
    func serveAsNobody(_ name: String, _ broker: TestBroker, root: Broker) throws -> Child {
        let child = try Child("/usr/bin/setpriv", ["--reuid", "65534", "--regid", "65534", "--clear-groups", patchbayCLI,
                                                    "caps", "serve", name, "--allow", "world", "--echo"],
                              environment: broker.environment)
        let deadline = monotonicNanoseconds() + 10_000_000_000
        while try !root.listServices().contains(where: { $0.name == name && $0.uid == Int32(otherUID) }),
              monotonicNanoseconds() < deadline {
            usleep(2_000)
        }
        return child
    }

    @Test("CAPS names: another uid cannot shadow a live registration, and a caller that names no uid never reaches another uid's service")
    func capsHijack() throws {
        let broker = try openBroker([])
        let root = try broker.connect()
        let service = try CapsService(root, name: "greeter", access: [.world])
        let environment = broker.environment
        // nobody tries to take root's name: EEXIST, naming the holder.
        let hijack = try runAsOtherUser(["caps", "serve", "greeter", "--allow", "world", "--echo"], environment: environment)
        #expect(hijack.standardError.hasPrefix("patchbay: caps serve: EEXIST: service greeter is registered by uid 0"),
                "\(hijack.standardError)")
        _ = consume service
        // nobody's own service: root, naming no uid, does not reach it...
        let theirs = try serveAsNobody("nobody.echo", broker, root: root)
        defer { theirs.kill(SIGTERM); _ = try? theirs.wait() }
        let untrusted = expectErrno(.noSuchFileOrDirectory) { () throws(PatchbayError) in
            _ = try CapsClient(root, name: "nobody.echo")
        }
        #expect(untrusted?.reason.contains("uid 65534's") == true, "\(String(describing: untrusted))")
        // ...unless it names the uid, which is asking for that user's service on purpose.
        let chosen = try CapsClient(root, name: "nobody.echo", uid: Int32(otherUID))
        #expect(try chosen.call(Array("hi".utf8)) == Array("hi".utf8))
    }

    @Test("a CAPS name root held when the broker died stays root's after the restart: nobody's registration is EEXIST until root registers it again or --caps-name-grace passes; a name root had let go is free at once; with a grace of 0 nothing is kept")
    func capsNamesAreKeptAcrossARestart() throws {
        let broker = try openBroker([])
        let generations = broker.directory + "/shm/state/caps-generations"
        /// Kills the broker (root's services stay up and hold their names) and starts another.
        func crashAndRestart(_ arguments: [String], killing pid: pid_t) throws -> pid_t {
            kill(pid, SIGKILL)
            _ = try waitForProcess(pid)
            return try spawnDaemon(socketPath: broker.socketPath, sharedMemoryDirectory: broker.directory + "/shm",
                                   ["--system"] + arguments)
        }
        func nobodyRegisters(_ name: String) throws -> String {
            let peer = try nobodyPeer(["caps-register", name], broker)
            let said = try peer.readLine() ?? ""
            _ = try peer.wait()
            return said
        }
        // Root's services never register again by themselves here (no reconnection), so what
        // nobody can do in the window before they would is seen plainly.
        var root: Broker? = try Broker(socketPath: broker.socketPath, reconnect: .never)
        var held: CapsService? = try CapsService(root!, name: "held.name", access: [.world])
        do { _ = try CapsService(root!, name: "let.go", access: [.world]) }
        while try root!.listServices().contains(where: { $0.name == "let.go" }) { sched_yield() }

        var daemon = try crashAndRestart([], killing: broker.pid)
        defer { kill(daemon, SIGTERM); _ = try? waitForProcess(daemon) }
        // (A registration that closes at once: one that held the name would not end the test.)
        let taken = try nobodyRegisters("held.name")
        #expect(taken.hasPrefix("error EEXIST: service held.name was registered by uid 0 when the broker last stopped"), "\(taken)")
        // A name root had let go before the crash is anyone's.
        #expect(try nobodyRegisters("let.go") == "generations 1")
        // Root registers it again, its generation going on; once root lets it go, it is free.
        held = nil
        root = try Broker(socketPath: broker.socketPath, reconnect: .never)
        do { #expect(try CapsService(root!, name: "held.name", access: [.world]).currentGeneration == 2) }
        while try root!.listServices().contains(where: { $0.name == "held.name" }) { sched_yield() }
        #expect(try nobodyRegisters("held.name") == "generations 1")

        // With a grace of 0, nothing is kept.
        held = try CapsService(root!, name: "held.again", access: [.world])
        daemon = try crashAndRestart(["--caps-name-grace", "0"], killing: daemon)
        #expect(try nobodyRegisters("held.again") == "generations 1")

        // With a short grace the broker releases the name by itself when it passes, and writes so
        // (the next restart does not keep it again): nobody, trying until then, gets it.
        root = try Broker(socketPath: broker.socketPath, reconnect: .never)
        held = try CapsService(root!, name: "held.brief", access: [.world])
        daemon = try crashAndRestart(["--caps-name-grace", "2s"], killing: daemon)
        let deadline = monotonicNanoseconds() + 20_000_000_000
        var said = ""
        while monotonicNanoseconds() < deadline {
            said = try nobodyRegisters("held.brief")
            if said.hasPrefix("generations") { break }
            #expect(said.contains("EEXIST"), "\(said)")
        }
        #expect(said == "generations 1")
        let text = String(decoding: try openFile(generations, flags: O_RDONLY).readToEnd(limit: 1 << 20), as: UTF8.self)
        let lines = text.split(separator: "\n").filter { $0.hasSuffix(" held.brief 0") }
        #expect(lines.last == "released held.brief 0", "\(lines)")
        _ = held
    }

    @Test("policy: a reserved CAPS, /net or shared memory name is taken only by its owners; a reserved name's owner (a uid, or a member of a group) is trusted by every caller")
    func policyReservations() throws {
        let policy = makeTemporaryDirectory()
        defer { removeTree(policy) }
        try writeFile(policy + "/10-test.conf", """
            # reserved for root
            caps  system.*      uid:0
            net   printer       uid:0       # the spooler's socket
            shm   /system.*     uid:0       # objects root makes at boot
            # nobody's, and trusted as such
            caps  shared.echo   uid:65534
            # a group's: any member's service is trusted
            caps  team.*        group:65534
            """)
        let broker = try openBroker(["--policy-directory", policy])
        let root = try broker.connect()
        let environment = broker.environment
        let capsTaken = try runAsOtherUser(["caps", "serve", "system.time", "--allow", "world", "--echo"], environment: environment)
        #expect(capsTaken.standardError.hasPrefix("patchbay: caps serve: EACCES: "), "\(capsTaken.standardError)")
        #expect(capsTaken.standardError.contains("reserved by the broker's policy for uid 0"), "\(capsTaken.standardError)")
        let netTaken = try runAsOtherUser(["net", "listen", "printer", "--echo"], environment: environment)
        #expect(netTaken.standardError.contains("EACCES"), "\(netTaken.standardError)")
        // nobody can put no object under a reserved shared memory name: not by creating it, not by
        // renaming its own onto it, not by exchanging its own with root's world-writable one.
        let shmTaken = try runAsOtherUser(["shm", "create", "/system.clock", "--mode", "0644"], environment: environment)
        #expect(shmTaken.standardError.hasPrefix("patchbay: shm create: EACCES: "), "\(shmTaken.standardError)")
        #expect(shmTaken.standardError.contains("reserved by the broker's policy for uid 0"), "\(shmTaken.standardError)")
        #expect(try runAsOtherUser(["shm", "create", "/mine", "--mode", "0666"], environment: environment).termination == .exited(0))
        let renamed = try runAsOtherUser(["shm", "mv", "/mine", "/system.clock"], environment: environment)
        #expect(renamed.standardError.hasPrefix("patchbay: shm mv: EACCES: "), "\(renamed.standardError)")
        // Root's world-writable object (umask 0): nobody may write it, and so rename it, but not
        // put its own object under its name.
        #expect(try run("/bin/sh", ["-c", "umask 0; exec \"$0\" shm create /system.shared --mode 0666 --size 4096", patchbayCLI],
                        environment: environment).termination == .exited(0))
        #expect(try root.statSharedMemory("/system.shared").mode == 0o666)
        let exchanged = try runAsOtherUser(["shm", "mv", "/mine", "/system.shared", "--exchange"], environment: environment)
        #expect(exchanged.standardError.hasPrefix("patchbay: shm mv: EACCES: "), "\(exchanged.standardError)")
        let reversed = try runAsOtherUser(["shm", "mv", "/system.shared", "/mine", "--exchange"], environment: environment)
        #expect(reversed.standardError.hasPrefix("patchbay: shm mv: EACCES: "), "\(reversed.standardError)")
        #expect(try root.statSharedMemory("/system.shared").uid == 0)
        expectErrno(.noSuchFileOrDirectory) { () throws(PatchbayError) in _ = try root.statSharedMemory("/system.clock") }
        // Root takes its own reserved names.
        _ = try CapsService(root, name: "system.time", access: [.world])
        _ = try Socket.listen(root, name: "printer")
        #expect(try root.openSharedMemory("/system.clock", options: [.create, .exclusive]).size == 0)
        // nobody's reserved service is trusted by root without naming the uid.
        let theirs = try serveAsNobody("shared.echo", broker, root: root)
        defer { theirs.kill(SIGTERM); _ = try? theirs.wait() }
        let client = try CapsClient(root, name: "shared.echo")
        #expect(try client.call(Array("ping".utf8)) == Array("ping".utf8))
        // A name reserved for a group: nobody, a member of it, registers; root trusts it too.
        let member = try serveAsNobody("team.echo", broker, root: root)
        defer { member.kill(SIGTERM); _ = try? member.wait() }
        let teamClient = try CapsClient(root, name: "team.echo")
        #expect(try teamClient.call(Array("pong".utf8)) == Array("pong".utf8))
    }

    @Test("a malformed policy stops the broker from starting, with the file and line, before it has made anything")
    func malformedPolicy() throws {
        let policy = makeTemporaryDirectory()
        defer { removeTree(policy) }
        try writeFile(policy + "/bad.conf", "caps ok uid:0\ncaps broken owner:0\n")
        let directory = makeTemporaryDirectory()
        defer { removeTree(directory) }
        let result = try run(patchbayDaemon, ["--system", "--socket", directory + "/s.sock", "--shm-directory", directory + "/shm",
                                              "--policy-directory", policy])
        #expect(result.termination == .exited(1))
        #expect(result.standardError.contains("bad.conf, line 2"), "\(result.standardError)")
        // Before it made anything: no store (nor its state tmpfs), no socket.
        #expect(access(directory + "/shm", F_OK) != 0 && access(directory + "/s.sock", F_OK) != 0)
    }
}

@Suite("Two users: who pays", .enabled(if: twoUsersAvailable, "needs root, setpriv and a nobody user that can run the products"))
struct TwoUserAccountingTests {
    func openBroker(_ arguments: [String]) throws -> TestBroker {
        let broker = try TestBroker(["--system"] + arguments)
        chmod(broker.directory, 0o755)
        chmod(broker.directory + "/net", 0o755)
        return broker
    }

    /// Runs Python as nobody: `script` gets the arguments after it, and its stdin stays open
    /// until the test closes it (the hold on what it made).
    func pythonAsNobody(_ script: String, _ arguments: [String]) throws -> Child {
        try Child("/usr/bin/setpriv", ["--reuid", "65534", "--regid", "65534", "--clear-groups", "/usr/bin/python3", "-c", script]
                  + arguments)
    }

    @Test("root's connections that nobody's listener accepted and keeps count against root only while root's end is open: closed, the broker lets them go (nobody still reads what root sent), and root's quota is whole")
    func deadAcceptedConnectionsLeaveTheTable() throws {
        let broker = try openBroker(["--max-sockets-per-uid", "8"])
        let root = try broker.connect()
        let acceptor = try Child("/usr/bin/setpriv", ["--reuid", "65534", "--regid", "65534", "--clear-groups", testPeer,
                                                      "net-accept-keep", "pin"], environment: broker.environment)
        defer { acceptor.closeInput(); _ = try? acceptor.wait() }
        #expect(try acceptor.readLine() == "listening")
        let path = try root.localSocketPath("pin")
        func sockets(of uid: uid_t) -> Int { Int((try? root.status().users.first { $0.uid == uid }?.sockets) ?? 0) }
        // Root connects straight to the socket file 6 times, says "bye" and closes each at once;
        // nobody accepts each through /net and keeps it.
        for _ in 0..<6 {
            do {
                let connection = try SeqpacketSocket()
                try connection.connect(path: path)
                try connection.send(Array("bye".utf8))
            }
            try acceptor.writeLine("accept")
            #expect(try acceptor.readLine() == "accepted")
        }
        // One more that root keeps open: root's while it is.
        let live = try SeqpacketSocket()
        try live.connect(path: path)
        try acceptor.writeLine("accept")
        #expect(try acceptor.readLine() == "accepted")
        #expect(try eventually { sockets(of: 0) == 1 && sockets(of: otherUID) == 1 },
                "root \(sockets(of: 0)), nobody \(sockets(of: otherUID))")
        try live.send(Array("bye".utf8))
        _ = consume live
        #expect(try eventually { sockets(of: 0) == 0 && sockets(of: otherUID) == 1 },
                "root \(sockets(of: 0)), nobody \(sockets(of: otherUID))")
        // nobody still has each connection's kernel socket, and what root sent.
        try acceptor.writeLine("read")
        #expect(try acceptor.readLine() == "read 7")
        // Root's quota is whole: 8 sockets of its own.
        var mine: [HeldSocket] = []
        for _ in 0..<8 { mine.append(HeldSocket(try Socket.open(root, type: .seqpacket))) }
        #expect(sockets(of: 0) == 8)
        // The broker holds nothing for the 7 any more: nobody's descriptors are its listener's 2
        // and its connection's 1.
        let metrics = try root.metrics()
        #expect(metrics.contains("patchbay_user_descriptors{uid=\"65534\"} 3\n"), "\(metrics)")
        withExtendedLifetime(mine) {}
    }

    @Test("nobody connecting to root's listener and closing, again and again, puts nothing on root: root accepts and keeps them all, and its quota stays whole")
    func connectAndCloseFloodCostsTheAcceptorNothing() throws {
        let broker = try openBroker(["--max-sockets-per-uid", "8"])
        let root = try broker.connect()
        let listener = try Socket.listen(root, name: "svc")
        let path = try root.localSocketPath("svc")
        func sockets(of uid: uid_t) -> Int { Int((try? root.status().users.first { $0.uid == uid }?.sockets) ?? 0) }
        var accepted: [HeldSocket] = []
        // Rounds of 6 (within nobody's quota of 8 while they wait to be accepted): nobody connects,
        // says "hi" and closes; root accepts each and keeps it.
        for _ in 0..<5 {
            let flood = try pythonAsNobody("""
                import socket, sys
                for _ in range(6):
                    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                    s.connect(sys.argv[1])
                    s.send(b"hi")
                    s.close()
                print("done", flush=True)
                """, [path])
            #expect(try flood.readLine() == "done")
            try flood.wait()
            for _ in 0..<6 { accepted.append(HeldSocket(try listener.accept(nonblocking: true))) }
            // None of them stays charged to anyone: root holds only its listener.
            #expect(try eventually { sockets(of: 0) == 1 && sockets(of: otherUID) == 0 },
                    "root \(sockets(of: 0)), nobody \(sockets(of: otherUID))")
        }
        #expect(accepted.count == 30)
        // Root reads what each said, and its quota is whole: 7 more sockets of its own.
        var said = 0
        for connection in accepted where try connection.socket.receive()?.bytes == Array("hi".utf8) { said += 1 }
        #expect(said == 30)
        var mine: [HeldSocket] = []
        for _ in 0..<7 { mine.append(HeldSocket(try Socket.open(root, type: .seqpacket))) }
        withExtendedLifetime((accepted, mine)) {}
    }

    @Test("after a crash, a socket nobody keeps under the path string of root's name does not keep root's stale socket file: the new broker removes it, and root binds its name again")
    func staleSocketFileIsToldByIdentityNotPath() throws {
        let broker = try openBroker([])
        let root = try broker.connect()
        // nobody binds "svc" first, keeps the kernel socket, lets the name go.
        let squatter = try Child("/usr/bin/setpriv", ["--reuid", "65534", "--regid", "65534", "--clear-groups", testPeer,
                                                      "net-bind-keep", "svc"], environment: broker.environment)
        defer { squatter.closeInput(); _ = try? squatter.wait() }
        #expect(try squatter.readLine() == "kept")
        // Root binds it now (a new socket file under the same path), and a second name it keeps
        // across the crash; the broker dies, then root's "svc" service.
        var service: Socket? = try Socket.listen(root, name: "svc")
        let alive = try Socket.listen(root, name: "alive")
        kill(broker.pid, SIGKILL)
        _ = try waitForProcess(broker.pid)
        service = nil
        #expect(service == nil && isSocketFile(atPath: broker.directory + "/net/svc") == true)
        // The next broker removes the file no socket is bound to, whatever path strings the
        // kernel lists, and keeps the one root's live listener is bound to.
        let restarted = try spawnDaemon(socketPath: broker.socketPath, sharedMemoryDirectory: broker.directory + "/shm", ["--system"])
        defer { kill(restarted, SIGTERM); _ = try? waitForProcess(restarted) }
        #expect(isSocketFile(atPath: broker.directory + "/net/svc") == nil)
        #expect(isSocketFile(atPath: broker.directory + "/net/alive") == true)
        let again = try Broker(socketPath: broker.socketPath)
        _ = try Socket.listen(again, name: "svc")
        _ = alive
    }

    @Test("root's datagram echo answers nobody only at nobody's own socket: not through a link nobody pointed at root's private socket after binding under it, and never waiting for a sender that does not read")
    func datagramEchoIsNoDeputy() throws {
        let broker = try openBroker([])
        let root = try broker.connect()
        // Root's private datagram socket, which nobody cannot reach itself (a directory of root's).
        let rootDirectory = broker.directory + "/private"
        mkdir(rootDirectory, 0o700)
        let target = try UnixSocket(.datagram)
        try target.bind(path: rootDirectory + "/s")
        let echo = try Child(patchbayCLI, ["net", "listen", "rootd", "--type", "dgram", "--echo"], environment: broker.environment)
        defer { echo.kill(SIGKILL); _ = try? echo.wait() }  // (one stuck in a send would not end on SIGTERM)
        #expect(try eventually { try root.listSockets().contains { $0.name == "rootd" } })
        let echoPath = try root.localSocketPath("rootd")
        let playground = broker.directory + "/nobodys"
        mkdir(playground, 0o755)
        chown(playground, 65534, 65534)
        // nobody binds under a link to a directory of its own, points the link at root's
        // directory, and sends; then, from a socket under no link, sends again and reads the
        // answer (the echo answers in order: the first was handled before it).
        let attacker = try pythonAsNobody("""
            import os, socket, sys
            base, private, echo = sys.argv[1], sys.argv[2], sys.argv[3]
            os.mkdir(base + "/real"); os.mkdir(base + "/plain")
            os.symlink(base + "/real", base + "/link")
            s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            s.bind(base + "/link/s")
            os.symlink(private, base + "/next"); os.rename(base + "/next", base + "/link")
            s.sendto(b"first", echo)
            t = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            t.bind(base + "/plain/t")
            # A sender that never reads: 40 datagrams fill its queue and the echo's answers.
            u = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            u.bind(base + "/plain/u")
            for _ in range(40):
                u.sendto(b"jam", echo)
            t.sendto(b"second", echo)
            t.settimeout(10)
            print(t.recv(64).decode(), flush=True)
            sys.stdin.read()
            """, [playground, rootDirectory, echoPath])
        defer { attacker.closeInput(); _ = try? attacker.wait() }
        #expect(try attacker.readLine() == "second")
        // Nothing reached root's private socket.
        var byte: UInt8 = 0
        #expect(recv(target.rawValue, &byte, 1, CInt(MSG_DONTWAIT)) == -1 && errno == EAGAIN)
    }

    @Test("a read-only handle of root's anonymous object, given to nobody, is not opened again read-write through /proc; nobody's own object (made by the broker) is nobody's")
    func readOnlyAnonymousHandleStaysReadOnly() throws {
        let broker = try openBroker([])
        let root = try broker.connect()
        for made in ["library", "broker"] {
            let object = made == "library" ? try SharedMemory.anonymous() : try root.newAnonymousSharedMemory()
            let mapping = try object.map(length: 4096)
            mapping.baseAddress.storeBytes(of: 7, as: UInt8.self)
            let readOnly = try object.readOnly()
            let key = try root.share(rawDescriptor: readOnly.descriptor.rawValue, timeout: .never)
            let reopen = try run("/usr/bin/setpriv", ["--reuid", "65534", "--regid", "65534", "--clear-groups", testPeer,
                                                      "reopen-writable", key.text], environment: broker.environment)
            #expect(reopen.standardOutput == "EACCES\n", "\(made): \(reopen.standardOutput) \(reopen.standardError)")
            _ = mapping
        }
        // An object nobody asks the broker for is nobody's: it may make a read-only handle of it.
        let own = try run("/usr/bin/setpriv", ["--reuid", "65534", "--regid", "65534", "--clear-groups", patchbayCLI,
                                               "shm", "new", "--size", "4k"], environment: broker.environment)
        #expect(own.termination == .exited(0), "\(own.standardError)")
    }

    @Test("connections another uid makes to root's listener count against that uid: root's quota is untouched and its accepts never fail")
    func connectionsChargedToTheirMaker() throws {
        let broker = try openBroker(["--max-sockets-per-uid", "8"])
        let root = try broker.connect()
        let listener = try Socket.listen(root, name: "svc", type: .stream)
        let path = try root.localSocketPath("svc")
        // nobody connects 20 times, straight to the socket file, and holds every connection.
        let holder = try pythonAsNobody("""
            import socket, sys
            held = []
            for _ in range(20):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(sys.argv[1])
                held.append(s)
            print(len(held), flush=True)
            sys.stdin.read()
            """, [path])
        #expect(try holder.readLine() == "20")
        // Root accepts until nothing is pending: nobody's first 8 connections (its quota), the
        // rest closed by the broker; never EDQUOT for root.
        var accepted: [HeldSocket] = []
        while true {
            do throws(PatchbayError) {
                accepted.append(HeldSocket(try listener.accept(nonblocking: true)))
            } catch {
                #expect(error.errno == .resourceTemporarilyUnavailable, "\(error)")
                break
            }
        }
        #expect(accepted.count == 8)
        let usage = try root.status().users
        #expect(usage.first { $0.uid == otherUID }?.sockets == 8)
        #expect(usage.first { $0.uid == 0 }?.sockets == 1)
        // Root's own quota is whole: it can still open sockets.
        _ = try Socket.open(root, type: .seqpacket)
        holder.closeInput()
        try holder.wait()
        _ = accepted
    }

    @Test("another uid that never reads its replies makes the broker hold a bounded queue, not one descriptor per request; root is served meanwhile")
    func unreadRepliesBounded() throws {
        let broker = try openBroker([])
        let root = try broker.connect()
        _ = try root.status()
        let before = try broker.descriptorCount()
        // nobody sends `open /dev/shmem/new` (each reply carries a new memfd) without ever reading,
        // until its socket takes no more, and keeps the connection open.
        let flooder = try pythonAsNobody("""
            import socket, struct, sys
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.connect(sys.argv[1])
            path = b"/dev/shmem/new"
            sent = 0
            while sent < 100000:
                frame = struct.pack("<2sBBHHQ", b"PB", 1, 1, 32, 0, sent + 1) + struct.pack("<H", len(path)) + path + struct.pack("<I", 0)
                try:
                    s.send(frame, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    break
                sent += 1
            print(sent, flush=True)
            sys.stdin.read()
            """, [broker.socketPath])
        let sent = Int(try #require(try flooder.readLine())) ?? 0
        #expect(sent > 0 && sent < 100_000)
        // Watched for a moment while nobody never reads: 64 queued descriptors, one turn of
        // requests read before the pause, its connection.
        var most = 0
        let deadline = monotonicNanoseconds() + 1_000_000_000
        while monotonicNanoseconds() < deadline {
            most = max(most, try broker.descriptorCount() - before)
            #expect(try root.status().clients == 2)
        }
        #expect(most <= 64 + 64 + 1, "the broker held \(most) descriptors for a client that never reads")
        flooder.closeInput()
        try flooder.wait()
        #expect(try broker.waitForDescriptorCount(before) == before)
    }

    @Test("a registration does not build, at once, a channel for each of nobody's 400 connects parked for its name: they connect a few per turn, root's requests served between, and all of them connect")
    func parkedConnectsConnectAFewPerTurn() throws {
        let broker = try openBroker([])
        let root = try broker.connect()
        func gauge(_ name: String) throws -> Int { Int(try metricValue(root, name)) }
        // Raw frames (PROTOCOL.md §5.7): capsClient with waitForService, then capsService.
        let parker = try pythonAsNobody("""
            import array, fcntl, os, socket, struct, sys
            def connect():
                s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                s.connect(sys.argv[1])
                return s
            def frame(op, payload, fds=()):
                data = struct.pack("<2sBBHHQ", b"PB", 1, 1, op, 0, 1) + payload
                return [data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
            name = struct.pack("<H", 9) + b"park.many"
            held = []
            for i in range(400):
                s = connect()
                s.sendmsg(*frame(61, name + struct.pack("<iiI", -1, -1, 4 | 16)))
                held.append(s)
            print("parked", flush=True)
            sys.stdin.readline()
            page = os.memfd_create("status", os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
            os.ftruncate(page, 4096)
            fcntl.fcntl(page, 1033, 0x17)
            service = connect()
            service.sendmsg(*frame(60, name + struct.pack("<iiII", -1, -1, 4, 0), [page]))
            reply = service.recv(4096)
            print("registered" if reply[3] == 2 else "refused", flush=True)
            sys.stdin.read()
            """, [broker.socketPath])
        #expect(try parker.readLine() == "parked")
        #expect(try eventually { try gauge("patchbay_caps_parked") == 400 })
        try parker.writeLine("go")
        #expect(try parker.readLine() == "registered")
        // Before, the registration's own request built all 400 channels before the broker read
        // anything else: none was left parked by the time root could ask.
        let parkedAtOnce = try gauge("patchbay_caps_parked")
        #expect(parkedAtOnce > 200, "\(parkedAtOnce) connects still parked when root's request was served")
        #expect(try eventually { try gauge("patchbay_caps_parked") == 0 && gauge("patchbay_caps_channels") == 400 })
        parker.closeInput()
        try parker.wait()
        #expect(try eventually { try root.status().clients == 1 })
    }

    @Test("nobody's thousand connections, each holding requests it never reads the answers to, do not make every turn of the loop look at each of them: root's requests are served in turns of a few events")
    func readyConnectionsCostWhatIsRead() throws {
        let broker = try openBroker([])
        let root = try broker.connect()
        func loopCounter(_ name: String) throws -> Double { try metricValue(root, name) }
        // 1,000 connections (within nobody's connection burst and descriptor share), 20 status
        // requests queued on each, no answer ever read.
        let flooder = try pythonAsNobody("""
            import resource, socket, struct, sys
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            held = []
            for i in range(1000):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                s.connect(sys.argv[1])
                held.append(s)
            for s in held:
                for k in range(20):
                    try:
                        s.send(struct.pack("<2sBBHHQ", b"PB", 1, 1, 1, 0, k + 1), socket.MSG_DONTWAIT)
                    except BlockingIOError:
                        break
            print(len(held), flush=True)
            sys.stdin.read()
            """, [broker.socketPath])
        #expect(try flooder.readLine() == "1000")
        let turns = try loopCounter("patchbay_loop_turns_total")
        let events = try loopCounter("patchbay_loop_events_total")
        for _ in 0..<300 { _ = try root.status() }
        let turnsTaken = try loopCounter("patchbay_loop_turns_total") - turns
        let eventsHandled = try loopCounter("patchbay_loop_events_total") - events
        // Before, each turn was handed every one of nobody's ready connections (about 1,000
        // events a turn, for as long as nobody kept them), so hundreds of events per request.
        #expect(eventsHandled / 300 < 50, "\(eventsHandled) events in \(turnsTaken) turns while root made 300 requests")
        #expect(try loopCounter("patchbay_loop_deferred_total") > 0)
        flooder.closeInput()
        try flooder.wait()
        #expect(try eventually { try root.status().clients == 1 })
    }

    @Test("one uid's idle connections stop at its share of the broker's descriptors; root's status and keys keep working")
    func descriptorShare() throws {
        // A broker with 2,048 descriptors: 64 its own, 256 in transit, root 1,728, all other uids
        // 1,296, any one of them 324.
        let broker = try TestBroker(["--system"], descriptorLimit: 2048)
        chmod(broker.directory, 0o755)
        let root = try broker.connect()
        _ = try root.status()  // the broker has accepted this connection: it is in the count
        let before = try broker.descriptorCount()
        // nobody opens connections until the broker refuses one, and holds them.
        let holder = try pythonAsNobody("""
            import resource, socket, struct, sys
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            status = b"PB\\x01\\x01\\x01\\x00\\x00\\x00" + struct.pack("<Q", 1)
            held = []
            refusal = "none"
            while len(held) < 20000:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                s.connect(sys.argv[1])
                try:
                    s.send(status)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # refused at once: the refusal frame is still queued for recv
                try:
                    reply = s.recv(65536)
                except ConnectionResetError:
                    # The broker closed with our request unread: its refusal frame is still queued.
                    try:
                        reply = s.recv(65536)
                    except OSError:
                        reply = b""
                if len(reply) < 16 or reply[3] != 2:
                    refusal = str(struct.unpack("<i", reply[16:20])[0]) if len(reply) >= 20 else "closed"
                    break
                held.append(s)
            print(len(held), refusal, flush=True)
            sys.stdin.read()
            """, [broker.socketPath])
        let answer = try #require(try holder.readLine()).split(separator: " ")
        let held = Int(answer[0]) ?? 0
        #expect(String(answer[1]) == "\(EDQUOT)", "the refusal was \(answer[1])")
        // Its share: a quarter of three quarters of what the broker may hold, far from all of it.
        #expect(held == 324, "nobody held \(held) connections")
        let during = try broker.descriptorCount()
        #expect(during - before >= held)
        // Root is not affected: status, and keys that each cost the broker a descriptor.
        #expect(try root.status().clients == UInt32(held + 1))
        for _ in 0..<100 {
            let key = try root.share(try openFile("/dev/null", flags: O_RDONLY), timeout: .never)
            _ = try root.claim(key)
        }
        holder.closeInput()
        try holder.wait()
        let after = try broker.waitForDescriptorCount(before, within: 10)
        #expect(after == before, "the broker holds \(after - before) descriptors more than before")
    }
}


@Suite("Two users: /net identity", .enabled(if: twoUsersAvailable, "needs root, setpriv and a nobody user that can run the products"))
struct TwoUserNetTests {
    func openBroker() throws -> TestBroker {
        let broker = try TestBroker(["--system"])
        chmod(broker.directory, 0o755)
        return broker
    }

    /// Waits (bounded) until `name` is LISTENING at the broker.
    func waitUntilListening(_ name: String, _ root: Broker) throws {
        let deadline = monotonicNanoseconds() + 10_000_000_000
        while try !root.listSockets().contains(where: { $0.name == name && $0.state == "LISTENING" }),
              monotonicNanoseconds() < deadline {
            usleep(2_000)
        }
    }

    @Test("a connection nobody makes through /net reaches a Patchbay-unaware root listener as nobody's process, never as the broker")
    func connectorIsSeen() throws {
        let broker = try openBroker()
        let root = try broker.connect()
        let path = try root.localSocketPath("root-raw")
        let listener = try UnixSocket(.seqpacket)
        try listener.bind(path: path)
        chmod(path, 0o666)
        try listener.listen(backlog: 8)
        let child = try Child("/usr/bin/setpriv", ["--reuid", "65534", "--regid", "65534", "--clear-groups", patchbayCLI,
                                                    "net", "connect", "root-raw"],
                              environment: broker.environment)
        var ready = pollfd(fd: listener.rawValue, events: Int16(POLLIN), revents: 0)
        #expect(poll(&ready, 1, 10_000) == 1)
        let accepted = try listener.accept()
        let peer = try accepted.peerCredentials()
        #expect(peer.uid == otherUID && peer.gid == 65534, "\(peer)")
        #expect(peer.pid == child.pid && peer.pid != broker.pid, "\(peer)")
        // The relay ends once its input is done (it shuts down writing) and the connection closes.
        child.closeInput()
        var byte: UInt8 = 0
        #expect(recv(accepted.rawValue, &byte, 1, 0) == 0)
        _ = consume accepted
        #expect(try child.wait() == .exited(0))
    }

    @Test("nobody's listener: its socket file is nobody's, and root's clients, raw or through /net, see nobody's process")
    func listenerIsSeen() throws {
        let broker = try openBroker()
        let root = try broker.connect()
        let child = try Child("/usr/bin/setpriv", ["--reuid", "65534", "--regid", "65534", "--clear-groups", patchbayCLI,
                                                    "net", "listen", "nobody-echo", "--echo"],
                              environment: broker.environment)
        defer { child.kill(SIGTERM); _ = try? child.wait() }
        try waitUntilListening("nobody-echo", root)
        let path = try root.localSocketPath("nobody-echo")
        var info = stat()
        #expect(lstat(path, &info) == 0)
        #expect(info.st_uid == otherUID && info.st_gid == 65534 && info.st_mode & 0o777 == 0o666)
        // A program that knows nothing of Patchbay.
        let raw = try UnixSocket(.seqpacket)
        try raw.connectWithoutBlocking(path: path)
        let rawPeer = try raw.peerCredentials()
        #expect(rawPeer.uid == otherUID && rawPeer.pid == child.pid, "\(rawPeer)")
        // A Patchbay client.
        let socket = try Socket.connect(root, to: "nobody-echo")
        let peer = try UnixSocket.peerCredentials(of: socket.dataDescriptor)
        #expect(peer.uid == otherUID && peer.pid == child.pid && peer.pid != broker.pid, "\(peer)")
        try socket.send(Array("ping".utf8))
        #expect(try socket.receive()?.bytes == Array("ping".utf8))
    }

    @Test("a name bound with mode 0600 keeps other users out at the kernel's own check")
    func modeKeepsOthersOut() throws {
        let broker = try openBroker()
        let root = try broker.connect()
        let listener = try Socket.listen(root, name: "root-only", mode: 0o600)
        _ = listener
        let attempt = try runAsOtherUser(["net", "connect", "root-only"], environment: broker.environment)
        #expect(attempt.termination == .exited(1))
        #expect(attempt.standardError.hasPrefix("patchbay: net connect: EACCES: "), "\(attempt.standardError)")
        // nobody asks for a mode that is not octal permission bits: EINVAL before anything is bound.
        let badMode = try runAsOtherUser(["net", "listen", "theirs", "--mode", "4777", "--echo"], environment: broker.environment)
        #expect(badMode.termination != .exited(0))
        #expect(try root.listSockets().allSatisfy { $0.name != "theirs" })
    }
}

extension TwoUserNetTests {
    /// SIGKILLs `broker` and starts a system broker on its socket and store, ready when this
    /// returns; its pid.
    func killAndRestartSystemBroker(_ broker: TestBroker) throws -> pid_t {
        kill(broker.pid, SIGKILL)
        _ = try waitForProcess(broker.pid)
        let ready = try Pipe()
        let restarted = try spawnProcess(
            path: patchbayDaemon,
            arguments: ["--system", "--socket", broker.socketPath, "--shm-directory", broker.directory + "/shm", "--ready-fd", "3"],
            environment: currentEnvironment(), descriptors: [3: ready.writeEnd.rawValue])
        _ = consume ready.writeEnd
        guard try ready.readEnd.readToEnd() == Array("ready\n".utf8) else {
            kill(restarted, SIGKILL)
            _ = try? waitForProcess(restarted)
            throw PatchbayError(.timedOut, "the restarted broker never said it was ready")
        }
        return restarted
    }

    @Test("nobody holding root's listener (shared to it) cannot take it as its own after a broker restart: EACCES; root's own listener takes it back")
    func adoptionIsTheOwners() throws {
        let broker = try openBroker()
        let root = try Broker(socketPath: broker.socketPath, reconnect: .forever)
        let listener = try Socket.listen(root, name: "root-svc")
        let key = try root.share(rawDescriptor: listener.kernelDescriptor)
        let thief = try Child("/usr/bin/setpriv", ["--reuid", "65534", "--regid", "65534", "--clear-groups", testPeer,
                                                    "adopt-claimed", key.text, "root-svc"],
                              environment: broker.environment)
        #expect(try thief.readLine() == "claimed")
        let restarted = try killAndRestartSystemBroker(broker)
        defer { kill(restarted, SIGTERM); _ = try? waitForProcess(restarted) }
        // nobody tries first, with root's kernel socket: the listener was put in listening mode
        // by root, and the socket file is root's.
        thief.closeInput()
        #expect(try thief.readLine() == "refused EACCES")
        #expect(try thief.wait() == .exited(0))
        // Root's own library takes it back at its next accept; a client connects through it.
        let box = ListenerBox(listener)
        let accepted = Mutex<Bool>(false)
        startThread {
            guard let connection = try? box.socket.accept() else { return }
            // Read to the end (nobody's relay shuts down writing when its input ends), then close.
            while case .some(.some) = try? connection.receive() {}
            accepted.withLock { $0 = true }
        }
        // (Watched on a connection of its own: the accept holds `root`'s while it waits.)
        try waitUntilListening("root-svc", try broker.connect())
        let client = try runAsOtherUser(["net", "connect", "root-svc"], environment: broker.environment, input: "hello\n")
        #expect(client.termination == .exited(0), "\(client.standardError)")
        let deadline = monotonicNanoseconds() + 10_000_000_000
        while !accepted.withLock({ $0 }), monotonicNanoseconds() < deadline { usleep(2_000) }
        #expect(accepted.withLock { $0 })
    }
}

extension TwoUserNetTests {
    @Test("nobody holding root's bound datagram socket (shared to it) cannot take it as its own after a broker restart: EACCES; root's own server, waiting in receive, has it taken back")
    func datagramAdoptionIsTheOwners() throws {
        let broker = try openBroker()
        let root = try Broker(socketPath: broker.socketPath, reconnect: .forever)
        var server = try Socket.open(root, type: .dgram)
        try server.bind("root-dg")
        try server.openData()
        let key = try root.share(rawDescriptor: server.kernelDescriptor)
        let thief = try Child("/usr/bin/setpriv", ["--reuid", "65534", "--regid", "65534", "--clear-groups", testPeer,
                                                    "adopt-claimed", key.text, "root-dg", "dgram"],
                              environment: broker.environment)
        #expect(try thief.readLine() == "claimed")
        // Root's server waits in receive, as a datagram server does, and answers one datagram.
        let box = ListenerBox(server)
        let answered = Mutex<[UInt8]?>(nil)
        startThread {
            var buffer = [UInt8](repeating: 0, count: 64)
            let count = buffer.withUnsafeMutableBytes { raw in (try? box.socket.receive(into: raw))?.count }
            answered.withLock { $0 = count.map { Array(buffer[0..<$0]) } }
        }
        let restarted = try killAndRestartSystemBroker(broker)
        defer { kill(restarted, SIGTERM); _ = try? waitForProcess(restarted) }
        // Whichever asks first, nobody is refused: the socket file is root's. (A datagram socket
        // has no kernel record of who bound it; the file is the proof.)
        thief.closeInput()
        #expect(try thief.readLine() == "refused EACCES")
        #expect(try thief.wait() == .exited(0))
        let watcher = try broker.connect()
        #expect(try eventually { try watcher.listSockets().contains { $0.name == "root-dg" && $0.ownerPID == getpid() && $0.state == "BOUND" } })
        // nobody reaches root's name as before.
        let sender = try runAsOtherUser(["net", "connect", "root-dg", "--type", "dgram"], environment: broker.environment,
                                        input: "hello\n")
        #expect(sender.termination == .exited(0), "\(sender.standardError)")
        #expect(try eventually { answered.withLock { $0 } != nil })
        #expect(answered.withLock { $0 } == Array("hello".utf8))
    }
}

@Suite("Two users: CAPS peers", .enabled(if: twoUsersAvailable, "needs root, setpriv and a nobody user that can run the products"))
struct TwoUserCapsPeerTests {
    @Test("a client of nobody's that ignores its in-flight limit gets refusals (ENOBUFS) past it; root's service holds only the limit")
    func inFlightLimitAtTheService() throws {
        let broker = try TestBroker(["--system"])
        chmod(broker.directory, 0o755)
        let root = try broker.connect()
        let service = try CapsService(root, name: "limited", access: [.world], maximumInFlight: 4)
        let child = try Child("/usr/bin/setpriv", ["--reuid", "65534", "--regid", "65534", "--clear-groups", testPeer,
                                                    "caps-flood", "limited", "20"],
                              environment: broker.environment)
        #expect(try child.readLine() == "sent 20 with a limit of 4")
        var held: [UInt64] = []
        var buffer = [UInt8](repeating: 0, count: 4096)
        while true {
            let next = buffer.withUnsafeMutableBytes { raw in
                Result { () throws(PatchbayError) -> CapsServiceMessage in try service.get(into: raw) }
            }
            guard case .success(let message) = next else {
                if case .failure(let error) = next { #expect(error.errno == .resourceTemporarilyUnavailable, "\(error)") }
                break
            }
            if message.kind == .request { held.append(message.messageID) }
        }
        #expect(held.count == 4)
        #expect(service.refusals.total == 16 && service.refusals.pastLimit == 16 && service.refusals.last?.euid == otherUID)
        #expect(try child.readLine() == "refused 16")
        // The requests it holds are answered as usual.
        for id in held { try service.reply(to: id, Array("ok".utf8)) }
        child.closeInput()
        #expect(try child.wait() == .exited(0))
    }

    @Test("nobody forges DISPOSEs of replies it has not consumed (kind 2 entries, a reply head past the service's tail or far off): root's service disposes of nothing until nobody consumes, then of each reply once, in order")
    func forgedDisposesAreIgnored() throws {
        let broker = try TestBroker(["--system"])
        chmod(broker.directory, 0o755)
        let root = try broker.connect()
        let service = try CapsService(root, name: "disposals", access: [.world])
        let child = try Child("/usr/bin/setpriv", ["--reuid", "65534", "--regid", "65534", "--clear-groups", testPeer,
                                                    "caps-forge-dispose", "disposals"],
                              environment: broker.environment)
        let put = try child.readLine() ?? ""
        let ids = put.split(separator: " ").dropFirst().compactMap { UInt64($0) }
        #expect(ids.count == 2, "\(put)")
        var buffer = [UInt8](repeating: 0, count: 4096)
        func next() throws -> CapsServiceMessage {
            try buffer.withUnsafeMutableBytes { raw in
                Result { () throws(PatchbayError) -> CapsServiceMessage in try service.wait(into: raw) }
            }.get()
        }
        for id in ids {
            let message = try next()
            #expect(message.kind == .request && message.messageID == id)
            try service.reply(to: id, Array(buffer[0..<message.length]))
        }
        try child.writeLine("go")
        #expect(try child.readLine() == "forged")
        // Only the honest request arrives: the forged entries and heads made no DISPOSE.
        let third = try next()
        #expect(third.kind == .request && String(decoding: buffer[0..<third.length], as: UTF8.self) == "three")
        let more = buffer.withUnsafeMutableBytes { raw in
            Result { () throws(PatchbayError) -> CapsServiceMessage in try service.get(into: raw) }
        }
        if case .success(let message) = more { Issue.record("unexpected \(message.kind) \(message.messageID)") }
        try service.reply(to: third.messageID, Array("three".utf8))
        // Consumed for real, each reply is disposed of once, in the order consumed.
        try child.writeLine("go")
        #expect(try child.readLine() == "consumed one two three")
        var disposed: [UInt64] = []
        while disposed.count < 3 {
            let message = try next()
            #expect(message.kind == .dispose, "\(message.kind)")
            disposed.append(message.messageID)
        }
        #expect(disposed == ids + [third.messageID])
        #expect(try child.wait() == .exited(0))
        #expect(service.refusals.total == 0)
    }

    @Test("nobody storms its own channel's service wake words (bump, flip the pending mark, wake) while root's client does thousands of sleeping round trips with root's service: every one answered")
    func wakeWordStormHurtsOnlyItsChannel() throws {
        let broker = try TestBroker(["--system"])
        chmod(broker.directory, 0o755)
        var environment = broker.environment
        environment["PATCHBAY_CAPS_SPIN_NS"] = "0"
        let service = try Child(patchbayCLI, ["caps", "serve", "stormed", "--allow", "world", "--echo"], environment: environment)
        defer { service.kill(SIGKILL); _ = try? service.wait() }
        let storm = try Child("/usr/bin/setpriv", ["--reuid", "65534", "--regid", "65534", "--clear-groups", testPeer,
                                                    "caps-wake-storm", "stormed"],
                              environment: environment)
        #expect(try storm.readLine() == "storming")
        // Root's client sleeps on every wait; it says "stalled" and fails after a minute.
        let honest = try Child(testPeer, ["caps-forced-sleep", "stormed", "3000", "2"], environment: environment)
        #expect(try honest.readLine() == "ok 3000")
        #expect(try honest.wait() == .exited(0))
        storm.closeInput()
        let rounds = try storm.readLine() ?? ""
        #expect(rounds.hasPrefix("rounds "), "\(rounds)")
        #expect(try storm.wait() == .exited(0))
        // The storm left the service as it was: still serving.
        let root = try broker.connect()
        #expect(try CapsClient(root, name: "stormed").call(Array("after".utf8)) == Array("after".utf8))
    }

    @Test("connect/disconnect churn by nobody against root's service that does not read its port: refusals for nobody, never a disconnected service")
    func churnNeverDisconnectsTheService() throws {
        let broker = try TestBroker(["--system", "--max-queued-messages", "16", "--max-caps-clients-per-uid", "1000"])
        chmod(broker.directory, 0o755)
        let root = try broker.connect()
        let service = try CapsService(root, name: "deaf", access: [.world])
        let churn = try Child("/usr/bin/setpriv", ["--reuid", "65534", "--regid", "65534", "--clear-groups", testPeer,
                                                    "caps-churn", "deaf", "600", "600"],
                              environment: broker.environment)
        let report = try churn.readLine() ?? ""
        #expect(try churn.wait() == .exited(0), "\(report)")
        // Past the limit, connecting clients were refused (EAGAIN, to them); while the service
        // reads nothing, so is every later one.
        let numbers = report.split(separator: " ").compactMap { Int($0) }
        #expect(numbers.count == 4 && numbers[0] >= 16 && numbers[1] > 0 && numbers[2] + numbers[3] == 600, "\(report)")
        // The service was never disconnected: it is still registered, and once it reads its
        // notices it serves root.
        #expect(try root.listServices().contains { $0.name == "deaf" && $0.uid == 0 })
        var buffer = [UInt8](repeating: 0, count: 4096)
        func drainNotices() {
            while (try? buffer.withUnsafeMutableBytes({ raw in
                Result { () throws(PatchbayError) -> CapsServiceMessage in try service.get(into: raw) }
            }).get()) != nil {}
        }
        var connected: CapsClient?
        let deadline = monotonicNanoseconds() + 10_000_000_000
        while connected == nil, monotonicNanoseconds() < deadline {
            drainNotices()
            do {
                connected = try CapsClient(root, name: "deaf")
            } catch {
                #expect(error.errno == .resourceTemporarilyUnavailable, "\(error)")
                usleep(1_000)
            }
        }
        let client = try #require(connected)
        let id = try client.put(Array("still here".utf8))
        while true {
            let message = try buffer.withUnsafeMutableBytes { raw in
                Result { () throws(PatchbayError) -> CapsServiceMessage in try service.wait(into: raw) }
            }.get()
            if message.kind == .request && message.messageID == id { break }
        }
        try service.reply(to: id, Array("yes".utf8))
        var reply = [UInt8](repeating: 0, count: 64)
        let answer = try reply.withUnsafeMutableBytes { raw in
            Result { () throws(PatchbayError) -> CapsReply in try client.wait(into: raw) }
        }.get()
        #expect(Array(reply[0..<answer.length]) == Array("yes".utf8))
    }

    @Test("nobody attaches a pipe and a memfd it shrinks as request payloads: root's service refuses both (EBADMSG to nobody) and keeps serving")
    func forgedAttachments() throws {
        let broker = try TestBroker(["--system"])
        chmod(broker.directory, 0o755)
        let root = try broker.connect()
        let service = try CapsService(root, name: "careful", access: [.world])
        let child = try Child("/usr/bin/setpriv", ["--reuid", "65534", "--regid", "65534", "--clear-groups", testPeer,
                                                    "caps-forge", "careful"],
                              environment: broker.environment)
        // The service answers what it receives (only the honest call reaches it).
        var buffer = [UInt8](repeating: 0, count: 4096)
        var served: [String] = []
        while served.isEmpty {
            let message = try buffer.withUnsafeMutableBytes { raw in
                Result { () throws(PatchbayError) -> CapsServiceMessage in try service.wait(into: raw) }
            }.get()
            guard message.kind == .request else { continue }
            served.append(String(decoding: buffer[0..<message.length], as: UTF8.self))
            try service.reply(to: message.messageID, Array(buffer[0..<message.length]))
        }
        #expect(served == ["honest"])
        #expect(try child.readLine() == "refused EBADMSG EBADMSG")
        #expect(try child.readLine() == "called honest")
        #expect(try child.wait() == .exited(0))
        #expect(service.refusals.total == 2 && service.refusals.last?.euid == otherUID)
    }
}

/// Kills `pid` after `seconds` unless the returned function is called first: a bound on a child
/// that might hang, so a test fails instead of waiting for ever.
func killing(_ pid: pid_t, after seconds: Int32) -> () -> Void {
    var ends: [CInt] = [-1, -1]
    guard pipe(&ends) == 0 else { return {} }
    let (cancel, watch) = (ends[1], ends[0])
    startThread {
        var poller = pollfd(fd: watch, events: Int16(POLLIN), revents: 0)
        if poll(&poller, 1, seconds * 1000) == 0 { kill(pid, SIGKILL) }
        close(watch)
    }
    return {
        var byte: UInt8 = 1
        _ = Glibc.write(cancel, &byte, 1)
        close(cancel)
    }
}

/// `setpriv`'s arguments to run a program as nobody.
let setprivNobody = ["--reuid", "65534", "--regid", "65534", "--clear-groups"]

/// `patchbayd` with `arguments` (as nobody with `asNobody`), saying "ready" on its stdout (its
/// ready descriptor), for a test that starts one on paths of its own choosing.
func daemonSayingReady(_ arguments: [String], asNobody nobody: Bool = false) throws -> Child {
    let shell = ["/bin/sh", "-c", "exec \"$0\" \"$@\" --ready-fd 3 3>&1", patchbayDaemon] + arguments
    return nobody ? try Child("/usr/bin/setpriv", setprivNobody + shell) : try Child(shell[0], Array(shell.dropFirst()))
}

/// The value of the unlabelled metric `name` in `broker`'s metrics text, -1 when it is missing.
func metricValue(_ broker: Broker, _ name: String) throws -> Double {
    let line = try broker.metrics().split(separator: "\n").first { $0.hasPrefix(name + " ") }
    return Double(line?.split(separator: " ").last ?? "") ?? -1
}
