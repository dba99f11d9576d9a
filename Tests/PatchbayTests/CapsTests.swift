// CAPS (SEMANTICS.md §5): the DragonFly scenario, every errno, many client processes, kernel
// credentials, deaths on both sides, zero-copy payloads.
import Glibc
import Patchbay
import PatchbayProtocol
import PatchbaySystem
import SystemPackage
import Synchronization
import Testing

/// Waits for a message on `service`, copying into a fresh buffer.
func serviceWait(_ service: CapsService, capacity: Int = 1 << 16) throws -> (CapsServiceMessage, [UInt8]) {
    var buffer = [UInt8](repeating: 0, count: capacity)
    let message = try buffer.withUnsafeMutableBytes { raw in
        Result { () throws(PatchbayError) -> CapsServiceMessage in try service.wait(into: raw) }
    }.get()
    return (message, Array(buffer[0..<min(message.length, capacity)]))
}

func clientWait(_ client: CapsClient, capacity: Int = 1 << 16) throws -> (CapsReply, [UInt8]) {
    var buffer = [UInt8](repeating: 0, count: capacity)
    let reply = try buffer.withUnsafeMutableBytes { raw in
        Result { () throws(PatchbayError) -> CapsReply in try client.wait(into: raw) }
    }.get()
    return (reply, Array(buffer[0..<min(reply.length, capacity)]))
}

func clientGet(_ client: CapsClient, capacity: Int = 1 << 16) throws(PatchbayError) -> CapsReply {
    var buffer = [UInt8](repeating: 0, count: capacity)
    return try buffer.withUnsafeMutableBytes { raw in
        Result { () throws(PatchbayError) -> CapsReply in try client.get(into: raw) }
    }.get()
}

func serviceGet(_ service: CapsService, capacity: Int = 1 << 16) throws(PatchbayError) -> CapsServiceMessage {
    var buffer = [UInt8](repeating: 0, count: capacity)
    return try buffer.withUnsafeMutableBytes { raw in
        Result { () throws(PatchbayError) -> CapsServiceMessage in try service.get(into: raw) }
    }.get()
}

@Suite("CAPS")
struct CapsTests {
    @Test("a service with no free descriptor cannot take a new client: the client is told at once (ENOTCONN, or ECONNRESET for a call), never left waiting",
          .timeLimit(.minutes(1)))
    func serviceOutOfDescriptorsRefusesTheClient() throws {
        let broker = try TestBroker()
        let full = try Child(testPeer, ["caps-serve-full", "full.service"], environment: broker.environment)
        defer { full.closeInput(); _ = try? full.wait() }
        #expect(try full.readLine() == "full")
        let client = try CapsClient(try broker.connect(), name: "full.service")
        var caught: Errno?
        do {
            _ = try client.call([1])
        } catch {
            caught = error.errno
        }
        // ECONNRESET if the refusal came while the call waited, ENOTCONN if it came first.
        #expect(caught == .connectionReset || caught == .socketNotConnected)
        // Then every call says why.
        do {
            _ = try client.call([2])
            Issue.record("a refused client's call succeeded")
        } catch {
            #expect(error.errno == .socketNotConnected && error.description.contains("could not take this connection"), "\(error)")
        }
    }

    @Test("a Broker used by a fork child and its parent at once: the child makes a connection of its own, neither hangs or reads the other's replies",
          .timeLimit(.minutes(1)))
    func brokerAcrossFork() throws {
        let broker = try TestBroker()
        let forker = try Child(testPeer, ["broker-fork", "300"], environment: broker.environment)
        #expect(try forker.readLine() == "child ok")
        #expect(try forker.readLine() == "parent ok")
        _ = try forker.wait()
    }

    @Test("a fork child whose first call on its parent's Broker is a claim makes its own connection: it claims the key shared for its pid")
    func forkChildClaimsOnItsOwnConnection() throws {
        let broker = try TestBroker()
        let forker = try Child(testPeer, ["broker-fork-claim"], environment: broker.environment)
        #expect(try forker.readLine() == "child claimed")
        #expect(try forker.readLine() == "parent read x")
        #expect(try forker.wait() == .exited(0))
    }

    @Test("the DragonFly scenario: xyz → good, REPLY then DISPOSE with the same msgid, generations, fork")
    func dragonflyScenario() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        let service = try CapsService(client, name: "test.service", access: [.world])
        let port = try CapsClient(client, name: "test.service")
        let msgid = try port.put(Array("xyz".utf8))
        let (request, bytes) = try serviceWait(service)
        #expect(request.kind == .request && request.messageID == msgid && bytes == Array("xyz".utf8))
        try service.reply(to: msgid, Array("good".utf8))
        let (reply, answer) = try clientWait(port)
        #expect(reply.messageID == msgid && answer == Array("good".utf8) && reply.consumed && !reply.serviceClosed)
        let (dispose, _) = try serviceWait(service)
        #expect(dispose.kind == .dispose && dispose.messageID == msgid && dispose.length == 0)

        #expect(try port.generation() == 1)
        try service.setGeneration(7)
        #expect(try port.generation() == 7)

        // A forked child's inherited port answers ENOTCONN; it reconnects with waitForService.
        let forker = try Child(testPeer, ["caps-fork", "fork.service"], environment: broker.environment)
        let forkService = try CapsService(client, name: "fork.service", access: [.world])
        var replies = 0
        var messages: [String] = []
        while replies < 3 {
            let (message, payload) = try serviceWait(forkService)
            guard message.kind == .request else { continue }
            messages.append(String(decoding: payload, as: UTF8.self))
            try forkService.reply(to: message.messageID, Array("ok".utf8))
            replies += 1
        }
        #expect(try forker.readLine() == "child ENOTCONN")
        #expect(try forker.readLine() == "child reply ok")
        #expect(try forker.readLine() == "parent reply ok")
        #expect(messages.sorted() == ["after fork", "from child", "from parent"])
        #expect(try forker.wait() == .exited(0))
    }

    @Test("a client that marks a wake-up pending without sending it delays only its own requests")
    func pendingWakeMarkIsPerChannel() throws {
        let broker = try TestBroker()
        let service = try Child(patchbayCLI, ["caps", "serve", "pending.echo", "--allow", "world", "--echo"], environment: broker.environment)
        defer { service.kill(SIGKILL); _ = try? service.wait() }
        let client = try broker.connect()
        let hostile = try CapsClient(client, name: "pending.echo", waitForService: true)
        let honest = try CapsClient(client, name: "pending.echo")
        hostile.markServiceWakePending()
        let held = try hostile.put(Array("held".utf8))
        // The honest channel wakes the service whatever the other one claims.
        #expect(try honest.call(Array("ok".utf8)) == Array("ok".utf8))
        // Woken, the service looks at every ring: the held request is answered too.
        var buffer = [UInt8](repeating: 0, count: 16)
        let deadline = monotonicNanoseconds() + 30_000_000_000
        var answered: CapsReply?
        while answered == nil, monotonicNanoseconds() < deadline {
            answered = try? buffer.withUnsafeMutableBytes { raw in
                Result { () throws(PatchbayError) -> CapsReply in try hostile.get(into: raw) }
            }.get()
        }
        #expect(answered?.messageID == held && buffer.prefix(4) == Array("held".utf8)[...])
    }

    @Test("spinning off on both sides: every hop a wake-up, none lost over thousands of round trips, one window at a time")
    func forcedSleepLosesNoWakeUp() throws {
        let broker = try TestBroker()
        // Both ways a service sleeps: on its channels' futex words (the default), and in epoll on
        // its wake sockets.
        for mode in ["futex", "epoll"] {
            var environment = broker.environment
            environment["PATCHBAY_CAPS_SPIN_NS"] = "0"
            environment["PATCHBAY_CAPS_SERVICE_SLEEP"] = mode
            let name = "sleepy.\(mode)"
            let service = try Child(patchbayCLI, ["caps", "serve", name, "--allow", "world", "--echo"], environment: environment)
            defer { service.kill(SIGKILL); _ = try? service.wait() }
            // One client at a time: a second one's wake-ups would rescue a first one's lost wake-up.
            for window in [1, 4] {
                let client = try Child(testPeer, ["caps-forced-sleep", name, "5000", "\(window)"], environment: environment)
                #expect(try client.readLine() == "ok 5000", "\(mode), window \(window)")
                #expect(try client.wait() == .exited(0))
            }
        }
    }

    @Test("a port that woke its sleeping peer spins for it, before the peer even runs, instead of sleeping at once (peers that once fell asleep stayed asleep in step)")
    func wokenPeerCountsAsRunning() throws {
        // Spinning is only for a peer on another CPU: the two are pinned apart (with taskset),
        // which needs two.
        guard onlineCPUCount() >= 2, access("/usr/bin/taskset", X_OK) == 0 else { return }
        let broker = try TestBroker()
        let observer = try broker.connect()
        /// A thread's state letter, CPU time in clock ticks and voluntary context switches (a sleep
        /// on a futex is one; so is a stop).
        func thread(_ pid: pid_t) -> (state: Character, ticks: Int, switches: Int)? {
            func text(_ path: String) -> String? {
                guard let file = try? openFile(path, flags: O_RDONLY), let bytes = try? file.readToEnd(limit: 8192) else { return nil }
                return String(decoding: bytes, as: UTF8.self)
            }
            guard let stat = text("/proc/\(pid)/task/\(pid)/stat"), let close = stat.lastIndex(of: ")"),
                  let status = text("/proc/\(pid)/task/\(pid)/status"),
                  let line = status.split(separator: "\n").first(where: { $0.hasPrefix("voluntary_ctxt_switches:") }),
                  let switches = Int(String(line.filter(\.isNumber)))
            else { return nil }
            let fields = stat[stat.index(after: close)...].split(separator: " ")
            guard fields.count > 12, let state = fields[0].first, let user = Int(fields[11]), let system = Int(fields[12]) else { return nil }
            return (state, user + system, switches)
        }
        /// `program` with `arguments`, pinned to `cpu` from its start (its threads too).
        func pinned(_ cpu: Int, _ program: String, _ arguments: [String], _ environment: [String: String?]) throws -> Child {
            try Child("/usr/bin/taskset", ["-c", "\(cpu)", program] + arguments, environment: environment)
        }
        /// Polls `pid`'s main thread until `done` says so (10 s at most); its last look.
        func watch(_ pid: pid_t, until done: ((state: Character, ticks: Int, switches: Int)) -> Bool)
            -> (state: Character, ticks: Int, switches: Int)?
        {
            let deadline = monotonicNanoseconds() + 10_000_000_000
            var now = thread(pid)
            while let current = now, !done(current), monotonicNanoseconds() < deadline {
                usleep(2_000)
                now = thread(pid)
            }
            return now
        }
        /// Whether `pid`'s main thread, from `start`, gains a tenth of a second of CPU time without
        /// a voluntary context switch: it spins.
        func spins(_ pid: pid_t, from start: (state: Character, ticks: Int, switches: Int)) -> Bool {
            let tenth = max(Int(sysconf(Int32(_SC_CLK_TCK))) / 10, 1)
            let last = watch(pid) { $0.switches != start.switches || $0.ticks - start.ticks >= tenth }
            return last.map { $0.switches == start.switches && $0.ticks - start.ticks >= tenth } ?? false
        }

        // The client's side. The service sleeps as soon as it is idle, and is stopped asleep: its
        // running word stays 0 however it is woken.
        var environment = broker.environment
        environment["PATCHBAY_CAPS_SPIN_NS"] = "0"
        let service = try pinned(0, patchbayCLI, ["caps", "serve", "woken.client", "--allow", "world", "--echo"], environment)
        defer { service.kill(SIGKILL); _ = try? service.wait() }
        let port = try CapsClient(observer, name: "woken.client", waitForService: true)
        let asleep = monotonicNanoseconds() + 10_000_000_000
        while port.serviceSleepers != (epoll: 0, futex: 1) && monotonicNanoseconds() < asleep { usleep(1_000) }
        #expect(port.serviceSleepers == (epoll: 0, futex: 1))
        service.kill(SIGSTOP)
        let client = try pinned(1, testPeer, ["caps-woken-wait", "woken.client", "60000000000"], broker.environment)
        defer { client.kill(SIGKILL); _ = try? client.wait() }
        #expect(try client.readLine() == "ready")
        try client.writeLine("go")
        let waiting = try client.readLine() ?? ""
        let before = waiting.hasPrefix("waiting ") ? Int(waiting.dropFirst("waiting ".count)) : nil
        if let before, let start = thread(client.pid) {
            #expect(start.switches == before, "the client slept while its service, which it had woken, had not run yet")
            #expect(spins(client.pid, from: start), "the client did not spin for the service it woke")
        } else {
            Issue.record("client: \(waiting)")
        }
        service.kill(SIGCONT)
        #expect(try client.readLine() == "replied")
        #expect(try client.wait() == .exited(0))

        // The service's side: it wakes a client stopped asleep with its reply, then waits for the
        // next request, spinning. (It may have been stopped anywhere, even asleep, and may sleep
        // once more after it is let go, until it hears of the new client: its spin is looked for
        // from the moment it runs, not from the stop.)
        environment["PATCHBAY_CAPS_SPIN_NS"] = "60000000000"
        let spinner = try pinned(0, patchbayCLI, ["caps", "serve", "woken.service", "--allow", "world", "--echo"], environment)
        defer { spinner.kill(SIGKILL); _ = try? spinner.wait() }
        _ = try CapsClient(observer, name: "woken.service", waitForService: true)
        spinner.kill(SIGSTOP)
        _ = watch(spinner.pid) { $0.state == "T" }
        let sleeper = try pinned(1, testPeer, ["caps-woken-wait", "woken.service", "0"], broker.environment)
        defer { sleeper.kill(SIGKILL); _ = try? sleeper.wait() }
        #expect(try sleeper.readLine() == "ready")
        try sleeper.writeLine("go")
        let put = try sleeper.readLine() ?? ""
        // The client asleep for its reply (its switch count moved past the one it printed), then stopped.
        if put.hasPrefix("waiting "), let printed = Int(put.dropFirst("waiting ".count)) {
            _ = watch(sleeper.pid) { $0.switches > printed && $0.state == "S" }
        } else {
            Issue.record("client: \(put)")
        }
        sleeper.kill(SIGSTOP)
        _ = watch(sleeper.pid) { $0.state == "T" }
        if let stopped = thread(spinner.pid) {
            spinner.kill(SIGCONT)
            // Running, and gaining CPU time: it has answered and spins (asleep, it would gain none).
            let running = watch(spinner.pid) { $0.state == "R" && $0.ticks > stopped.ticks }
            if let running, running.state == "R", running.ticks > stopped.ticks {
                #expect(spins(spinner.pid, from: running), "the service slept after waking its client, which had not run yet")
            } else {
                Issue.record("the service did not run after waking its client: \(String(describing: running))")
            }
        } else {
            Issue.record("no service thread")
        }
        sleeper.kill(SIGCONT)
        #expect(try sleeper.readLine() == "replied")
        #expect(try sleeper.wait() == .exited(0))
    }

    @Test("a forked child that cancels and drops an inherited service port leaves the parent's port watching: a client that connects afterwards is served")
    func inheritedServiceLeavesTheParentAlone() throws {
        let broker = try TestBroker()
        var environment = broker.environment
        environment["PATCHBAY_CAPS_SPIN_NS"] = "0"
        let service = try Child(testPeer, ["caps-service-fork", "forked.service"], environment: environment)
        defer { service.kill(SIGKILL); _ = try? service.wait() }
        #expect(try service.readLine() == "ready")
        // A new client is announced to the sleeping service on its broker connection; only the
        // parent's watching thread turns that into a wake-up. (The peer gives up after a minute.)
        let client = try Child(testPeer, ["caps-forced-sleep", "forked.service", "100", "1"], environment: environment)
        #expect(try client.readLine() == "ok 100")
        #expect(try client.wait() == .exited(0))
    }

    @Test("a service sleeps on its channels' futex words by default, in epoll when told to or when watched through its descriptor, and is woken either way")
    func serviceSleepsAsItSays() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        /// Waits until the service behind `port` sleeps as `expected` says (it sleeps once idle).
        func awaitSleepers(_ port: CapsClient, _ expected: (epoll: UInt32, futex: UInt32)) -> Bool {
            let deadline = monotonicNanoseconds() + 10_000_000_000
            while monotonicNanoseconds() < deadline {
                if port.serviceSleepers == expected { return true }
                usleep(1_000)
            }
            return false
        }
        for (mode, expected) in [("futex", (epoll: UInt32(0), futex: UInt32(1))), ("epoll", (epoll: 1, futex: 0))] {
            var environment = broker.environment
            environment["PATCHBAY_CAPS_SPIN_NS"] = "0"
            environment["PATCHBAY_CAPS_SERVICE_SLEEP"] = mode
            let service = try Child(patchbayCLI, ["caps", "serve", "sleeps.\(mode)", "--allow", "world", "--echo"],
                                    environment: environment)
            defer { service.kill(SIGKILL); _ = try? service.wait() }
            let port = try CapsClient(client, name: "sleeps.\(mode)", waitForService: true)
            #expect(awaitSleepers(port, expected), "\(mode): \(port.serviceSleepers)")
            // Asleep that way, it is woken by requests (from a peer that gives up after a minute
            // rather than hang this test).
            let caller = try Child(testPeer, ["caps-forced-sleep", "sleeps.\(mode)", "100", "1"], environment: environment)
            #expect(try caller.readLine() == "ok 100", "\(mode)")
            #expect(try caller.wait() == .exited(0))
            #expect(awaitSleepers(port, expected), "\(mode) again: \(port.serviceSleepers)")
        }
        // With 127 channels it still sleeps on futex words (128 words, one of them the port's own:
        // futex_waitv's limit); past that in epoll, and on futex words again once they are fewer.
        var environment = broker.environment
        environment["PATCHBAY_CAPS_SPIN_NS"] = "0"
        let crowded = try Child(patchbayCLI, ["caps", "serve", "sleeps.crowded", "--allow", "world", "--echo"], environment: environment)
        defer { crowded.kill(SIGKILL); _ = try? crowded.wait() }
        var crowd = [try CapsClient(client, name: "sleeps.crowded", waitForService: true)]
        #expect(awaitSleepers(crowd[0], (epoll: 0, futex: 1)), "one client: \(crowd[0].serviceSleepers)")
        while crowd.count < 127 { crowd.append(try CapsClient(client, name: "sleeps.crowded")) }
        // The service learns of each new client on its broker connection, which wakes it from its
        // futex sleep.
        #expect(try crowd[126].call(Array("in".utf8)) == Array("in".utf8))
        #expect(awaitSleepers(crowd[0], (epoll: 0, futex: 1)), "127 clients: \(crowd[0].serviceSleepers)")
        crowd.append(try CapsClient(client, name: "sleeps.crowded"))
        #expect(try crowd[127].call(Array("in".utf8)) == Array("in".utf8))
        #expect(awaitSleepers(crowd[0], (epoll: 1, futex: 0)), "128 clients: \(crowd[0].serviceSleepers)")
        let caller = try Child(testPeer, ["caps-forced-sleep", "sleeps.crowded", "50", "1"], environment: environment)
        #expect(try caller.readLine() == "ok 50", "129 clients, in epoll")
        #expect(try caller.wait() == .exited(0))
        crowd.removeLast(100)
        #expect(try crowd[0].call(Array("out".utf8)) == Array("out".utf8))
        #expect(awaitSleepers(crowd[0], (epoll: 0, futex: 1)), "28 clients: \(crowd[0].serviceSleepers)")
        let again = try Child(testPeer, ["caps-forced-sleep", "sleeps.crowded", "50", "1"], environment: environment)
        #expect(try again.readLine() == "ok 50", "29 clients, on futex words again")
        #expect(try again.wait() == .exited(0))

        // Watched through its descriptor, a port holds one epoll count for good: clients wake its
        // sockets, which is what makes that descriptor readable.
        let watched = try CapsService(client, name: "sleeps.watched", access: [.world])
        let descriptor = watched.eventDescriptor
        let port = try CapsClient(client, name: "sleeps.watched")
        #expect(port.serviceSleepers == (epoll: 1, futex: 0))
        _ = try port.put(Array("seen".utf8))
        var ready = pollfd(fd: descriptor, events: Int16(POLLIN), revents: 0)
        #expect(poll(&ready, 1, 10_000) == 1)
        var buffer = [UInt8](repeating: 0, count: 64)
        let message = try buffer.withUnsafeMutableBytes { raw in
            Result { () throws(PatchbayError) -> CapsServiceMessage in try watched.get(into: raw) }
        }.get()
        #expect(message.kind == .request && buffer.prefix(4) == Array("seen".utf8)[...])
    }

    @Test("a restarted service is a new generation, seen by reconnecting clients")
    func restartBumpsGeneration() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        do {
            let first = try CapsService(client, name: "restart", access: [.world])
            #expect(first.currentGeneration == 1)
            #expect(try CapsClient(client, name: "restart").generation() == 1)
        }
        // The first service's port closed with its scope; the broker learns of it asynchronously.
        let deadline = monotonicNanoseconds() + 30_000_000_000
        while try !client.listServices().isEmpty, monotonicNanoseconds() < deadline { usleep(2_000) }
        let second = try CapsService(client, name: "restart", access: [.world])
        #expect(second.currentGeneration == 2)
        #expect(try CapsClient(client, name: "restart").generation() == 2)
    }

    @Test("service and client errnos: names, EPERM, EEXIST, ENOENT, EACCES")
    func rendezvousErrors() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        expectErrno(.invalidArgument) { () throws(PatchbayError) in _ = try CapsService(client, name: "") }
        expectErrno(.invalidArgument) { () throws(PatchbayError) in _ = try CapsService(client, name: "has space") }
        expectErrno(.invalidArgument) { () throws(PatchbayError) in _ = try CapsService(client, name: "slash/no") }
        expectErrno(.fileNameTooLong) { () throws(PatchbayError) in _ = try CapsService(client, name: String(repeating: "a", count: 64)) }
        _ = try CapsService(client, name: String(repeating: "b", count: 63), access: [.world])
        expectErrno(.invalidArgument) { () throws(PatchbayError) in _ = try CapsClient(client, name: "bad/name") }
        expectErrno(.noSuchFileOrDirectory) { () throws(PatchbayError) in _ = try CapsClient(client, name: "missing") }

        let exclusive = try CapsService(client, name: "only.one", exclusive: true)
        expectErrno(.fileExists) { () throws(PatchbayError) in _ = try CapsService(client, name: "only.one", exclusive: true) }
        _ = exclusive

        // Access needs a class on both sides. Root may register another uid, but gets no bypass.
        let foreign = try CapsService(client, name: "foreign", uid: 12345, gid: -1, access: [.user])
        expectErrno(.permissionDenied) { () throws(PatchbayError) in _ = try CapsClient(client, name: "foreign") }
        _ = foreign
        let worldOnly = try CapsService(client, name: "world.only", access: [.world])
        expectErrno(.permissionDenied) { () throws(PatchbayError) in _ = try CapsClient(client, name: "world.only", access: [.user]) }
        _ = try CapsClient(client, name: "world.only", access: [.world])
        _ = worldOnly
        let grouped = try CapsService(client, name: "grouped", uid: -1, gid: Int32(bitPattern: getegid()), access: [.group])
        _ = try CapsClient(client, name: "grouped", access: [.group])
        _ = grouped
        // uid/gid wildcards and filters on the client side.
        expectErrno(.noSuchFileOrDirectory) { () throws(PatchbayError) in _ = try CapsClient(client, name: "grouped", uid: 999) }

        // Shadowing: the newest registration serves new clients.
        let older = try CapsService(client, name: "shadow", access: [.world])
        let newer = try CapsService(client, name: "shadow", access: [.world])
        let port = try CapsClient(client, name: "shadow")
        let id = try port.put(Array("who?".utf8))
        #expect(try serviceWait(newer).0.messageID == id)
        expectErrno(.resourceTemporarilyUnavailable) { () throws(PatchbayError) in _ = try serviceGet(older) }
    }

    @Test("message errnos: EAGAIN, ENOBUFS, EINVAL for bad replies and wrong ports, short buffers, abort, cancellation")
    func messageErrors() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        let service = try CapsService(client, name: "strict", access: [.world], maximumInFlight: 2)
        let port = try CapsClient(client, name: "strict")
        expectErrno(.resourceTemporarilyUnavailable) { () throws(PatchbayError) in _ = try clientGet(port) }
        expectErrno(.resourceTemporarilyUnavailable) { () throws(PatchbayError) in _ = try serviceGet(service) }
        expectErrno(.invalidArgument) { () throws(PatchbayError) in _ = try service.put(Array("no".utf8)) }
        expectErrno(.invalidArgument) { () throws(PatchbayError) in _ = try service.generation() }
        expectErrno(.invalidArgument) { () throws(PatchbayError) in try port.reply(to: 1, []) }

        let first = try port.put(Array("a longer request".utf8))
        let second = try port.put(Array("two".utf8))
        let limit = expectErrno(.noBufferSpace) { () throws(PatchbayError) in _ = try port.put(Array("three".utf8)) }
        #expect(limit?.reason.contains("2") == true)
        // Replying to a message the service has not read: EINVAL.
        expectErrno(.invalidArgument) { () throws(PatchbayError) in try service.reply(to: first, []) }
        // A short buffer: the full length comes back, the message stays queued.
        let peeked = try serviceGet(service, capacity: 4)
        #expect(peeked.length == 16 && !peeked.consumed && peeked.messageID == first)
        let (whole, bytes) = try serviceWait(service)
        #expect(whole.messageID == first && whole.consumed && bytes == Array("a longer request".utf8))
        try service.reply(to: first, Array("reply one".utf8))
        expectErrno(.invalidArgument) { () throws(PatchbayError) in try service.reply(to: first, []) }
        expectErrno(.invalidArgument) { () throws(PatchbayError) in try service.reply(to: 0xDEAD_BEEF, []) }
        let shortReply = try clientGet(port, capacity: 2)
        #expect(shortReply.length == 9 && !shortReply.consumed)
        #expect(try clientWait(port).1 == Array("reply one".utf8))

        // Abort: not yet read → returned (the service never sees it); read → the service sees it
        // aborted and its reply vanishes.
        #expect(try port.abort(second) == .returned)
        expectErrno(.invalidArgument) { () throws(PatchbayError) in _ = try port.abort(second) }
        let (dispose, _) = try serviceWait(service)
        #expect(dispose.kind == .dispose && dispose.messageID == first)
        expectErrno(.invalidArgument) { () throws(PatchbayError) in try service.reply(to: first, []) }
        let third = try port.put(Array("taken".utf8))
        #expect(try serviceWait(service).0.messageID == third)
        #expect(try port.abort(third) == .atService)
        let (aborted, _) = try serviceWait(service)
        #expect(aborted.kind == .aborted && aborted.messageID == third)
        try service.reply(to: third, Array("nobody reads this".utf8))
        expectErrno(.resourceTemporarilyUnavailable) { () throws(PatchbayError) in _ = try clientGet(port) }
        #expect(port.requestsInFlight == 0)

        // wait is cancellable.
        let cancelled = Mutex<Errno?>(nil)
        let done = try Pipe()
        let signal = done.writeEnd.rawValue
        startThread {
            do { _ = try clientWait(port) } catch let error as PatchbayError { cancelled.withLock { $0 = error.errno } } catch {}
            var byte: UInt8 = 1
            _ = Glibc.write(signal, &byte, 1)
        }
        port.cancelWait()
        var byte: UInt8 = 0
        _ = try withUnsafeMutableBytes(of: &byte) { raw in Result { () throws(Errno) -> Int in try done.readEnd.read(into: raw) } }.get()
        #expect(cancelled.withLock { $0 } == .canceled)
    }

    @Test("32 client processes to one service, each getting only its own replies, with kernel credentials")
    func manyClients() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        let service = try CapsService(client, name: "busy", access: [.world])
        var children: [pid_t: Child] = [:]
        for _ in 0..<32 {
            let child = try Child(testPeer, ["caps-client", "busy", "20"], environment: broker.environment)
            children[child.pid] = child
        }
        var answered = 0
        var seenPIDs: Set<Int32> = []
        while answered < 32 * 20 {
            let (message, bytes) = try serviceWait(service)
            guard message.kind == .request else { continue }
            let text = String(decoding: bytes, as: UTF8.self)
            // The credentials come from the kernel and match the process that sent the message.
            #expect(text.hasPrefix("\(message.credentials.pid):"), "\(text) from pid \(message.credentials.pid)")
            #expect(message.credentials.euid == geteuid() && message.credentials.gid == getegid())
            #expect(message.credentials.uid == getuid())
            seenPIDs.insert(message.credentials.pid)
            try service.reply(to: message.messageID, Array(("echo:" + text).utf8))
            answered += 1
        }
        #expect(Set(children.keys) == seenPIDs)
        for child in children.values {
            #expect(try child.readLine() == "ok 20")
            #expect(try child.wait() == .exited(0))
        }
    }

    @Test("a service killed with SIGKILL mid-request: 0-byte REPLYs, then ENOTCONN; nothing leaks")
    func serviceKilled() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        _ = try client.status()
        let baseline = try broker.descriptorCount()
        do {
            let server = try Child(testPeer, ["caps-service-hang", "doomed"], environment: broker.environment)
            #expect(try server.readLine() == "ready")
            let port = try CapsClient(client, name: "doomed")
            let first = try port.put(Array("read, never answered".utf8))
            #expect(try server.readLine() == "got \(first)")
            let second = try port.put(Array("never read".utf8))
            server.kill(SIGKILL)
            _ = try server.wait()
            let (reply1, _) = try clientWait(port)
            let (reply2, _) = try clientWait(port)
            #expect([reply1.messageID, reply2.messageID] == [first, second])
            #expect(reply1.length == 0 && reply1.serviceClosed && reply2.length == 0 && reply2.serviceClosed)
            expectErrno(.socketNotConnected) { () throws(PatchbayError) in _ = try clientGet(port) }
            expectErrno(.socketNotConnected) { () throws(PatchbayError) in _ = try port.put(Array("late".utf8)) }
        }
        #expect(try broker.waitForDescriptorCount(baseline) == baseline)
        #expect(try client.listServices().isEmpty)
    }

    @Test("a client killed with SIGKILL: its requests become DISPOSEs at the service; nothing leaks")
    func clientKilled() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        _ = try client.status()
        let baseline = try broker.descriptorCount()
        do {
            let service = try CapsService(client, name: "survivor", access: [.world], notifyConnections: true)
            let peer = try Child(testPeer, ["caps-put-and-hang", "survivor"], environment: broker.environment)
            let sent = try #require(try peer.readLine())
            let ids = sent.split(separator: " ").dropFirst().compactMap { UInt64($0) }
            #expect(ids.count == 3)
            // Read one of the three (the others stay unread in the ring), then the client dies.
            var seen: [CapsMessageKind] = []
            var request: UInt64 = 0
            while request == 0 {
                let (message, _) = try serviceWait(service)
                seen.append(message.kind)
                if message.kind == .request { request = message.messageID }
                if message.kind == .connected { #expect(message.credentials.pid == peer.pid) }
            }
            #expect(seen.first == .connected && request == ids[0])
            peer.kill(SIGKILL)
            _ = try peer.wait()
            var disposed: [UInt64] = []
            var disconnected = false
            while !disconnected {
                let (message, _) = try serviceWait(service)
                if message.kind == .dispose { disposed.append(message.messageID) }
                if message.kind == .disconnected { disconnected = true }
            }
            #expect(disposed.sorted() == ids)
            expectErrno(.invalidArgument) { () throws(PatchbayError) in try service.reply(to: request, []) }
            #expect(service.clientCount == 0)
        }
        #expect(try broker.waitForDescriptorCount(baseline) == baseline)
    }

    @Test("4 MiB requests and replies travel in place, in the channel's shared memory; larger ones attach a memfd")
    func zeroCopyPayloads() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        let service = try CapsService(client, name: "bulk", access: [.world])
        let port = try CapsClient(client, name: "bulk")
        let size = 4 << 20
        let id = try port.put(length: size) { buffer in
            buffer.storeBytes(of: 0xC0FFEE, as: UInt64.self)
            buffer.storeBytes(of: 0xF00D, toByteOffset: size - 8, as: UInt64.self)
        }
        let seen = try service.receive { message, payload in
            (message.messageID, message.inPlace, message.length, message.descriptors == nil,
             payload.load(as: UInt64.self), payload.load(fromByteOffset: size - 8, as: UInt64.self))
        }
        // In place: the bytes were read where the client wrote them, no descriptor, no socket.
        #expect(seen.0 == id && seen.1 && seen.2 == size && seen.3 && seen.4 == 0xC0FFEE && seen.5 == 0xF00D)
        try service.reply(to: id, length: size) { buffer in buffer.storeBytes(of: 0xBEEF, toByteOffset: 1 << 21, as: UInt64.self) }
        let check = try port.waitReply { messageID, bytes in (messageID, bytes.count, bytes.load(fromByteOffset: 1 << 21, as: UInt64.self)) }
        #expect(check.0 == id && check.1 == size && check.2 == 0xBEEF)

        // Larger than the channel's payload space: its own shared memory object, attached.
        let huge = 20 << 20
        let big = try port.put(length: huge) { buffer in buffer.storeBytes(of: 42, toByteOffset: huge - 8, as: UInt64.self) }
        var attachedSeen = false
        while !attachedSeen {
            attachedSeen = try service.receive { message, payload in
                guard message.kind == .request else { return false }
                #expect(message.messageID == big && !message.inPlace && payload.load(fromByteOffset: huge - 8, as: UInt64.self) == 42)
                return true
            }
        }
        try service.reply(to: big, Array("fine".utf8))
        #expect(try clientWait(port).1 == Array("fine".utf8))
    }

    @Test("payloads of up to 88 bytes travel inline in the ring entry, longer ones in the arena; an oversized inline entry is refused")
    func inlinePayloads() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        let service = try CapsService(client, name: "inline", access: [.world])
        let port = try CapsClient(client, name: "inline")
        for length in [0, 1, 87, 88, 89, 200] {
            let bytes = (0..<length).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ length) }
            let id = try port.put(bytes)
            let (request, payload) = try serviceWait(service)
            #expect(request.kind == .request && request.messageID == id && request.inPlace && payload == bytes, "length \(length)")
            // Several replies queued before the client reads: each inline one stays intact in its slot.
            try service.reply(to: id, bytes.reversed())
            let (reply, answer) = try clientWait(port)
            #expect(reply.messageID == id && answer == bytes.reversed(), "length \(length)")
            let (dispose, _) = try serviceWait(service)
            #expect(dispose.kind == .dispose && dispose.messageID == id)
        }
        // Pipelined: 100 small requests, all put before any is read.
        var ids: [UInt64] = []
        for index in 0..<100 { ids.append(try port.put(Array(repeating: UInt8(index), count: index % 89))) }
        var answered = 0
        while answered < ids.count {
            let (message, payload) = try serviceWait(service)
            guard message.kind == .request else { continue }
            let index = ids.firstIndex(of: message.messageID)!
            #expect(payload == Array(repeating: UInt8(index), count: index % 89))
            try service.reply(to: message.messageID, payload)
            answered += 1
        }
        for index in 0..<ids.count {
            let (reply, answer) = try clientWait(port)
            #expect(reply.messageID == ids[index] && answer == Array(repeating: UInt8(index), count: index % 89))
        }
        // An entry that claims 200 inline bytes (an entry holds 88): EBADMSG, never read.
        let forged = try port.putForgedInline(length: 200)
        // The service reads on: the 100 DISPOSEs, then nothing (the forged request refused unread).
        var disposes = 0
        while let message = try? serviceGet(service) {
            #expect(message.kind == .dispose)
            disposes += 1
        }
        #expect(disposes == ids.count)
        let (refused, _) = try clientWait(port)
        #expect(refused.messageID == forged && refused.error == .badMessage)
        #expect(service.refusals.total == 1)
        // An entry that announces descriptors and sends none: EBADMSG too, not delivered without them.
        let announced = try port.putForgedAnnouncingDescriptors(length: 4)
        #expect((try? serviceGet(service)) == nil)
        // (The refusal is in the reply ring once the service's get returns: nothing to wait for.)
        let unsent = try? clientGet(port)
        #expect(unsent?.messageID == announced && unsent?.error == .badMessage)
        #expect(service.refusals.total == 2 && service.refusals.pastLimit == 0)
    }

    @Test("a client takes no reply to a request it did not make: forged ids are dropped unread, nothing is kept for them, and the true reply comes through")
    func repliesToNoRequestAreDropped() throws {
        let broker = try TestBroker()
        let connection = try broker.connect()
        let service = try CapsService(connection, name: "forger", access: [.world])
        let client = try CapsClient(connection, name: "forger")
        let id = try client.put(Array("real".utf8))
        let (request, _) = try serviceWait(service)
        #expect(request.kind == .request && request.messageID == id)
        // Ids on this client's channel that it never used, and one of another channel.
        for sequence in UInt64(1000)..<1040 {
            #expect(service.pushForgedReply(onChannel: client.channelID, messageID: client.channelID << 32 | sequence, length: 80))
        }
        #expect(service.pushForgedReply(onChannel: client.channelID, messageID: (client.channelID + 7) << 32 | 1, length: 80))
        try service.reply(to: id, Array("answer".utf8))
        // call's way (replies for other threads' calls are kept): only the true one is taken.
        var seen: [UInt64] = []
        try client.waitReply { (messageID: UInt64, _: UnsafeRawBufferPointer) in seen.append(messageID) }
        #expect(seen == [id])
        #expect(client.requestsInFlight == 0)
        #expect(throws: PatchbayError.self) { _ = try clientGet(client) }
    }

    @Test("a port closed by a process that forked a child (no exec): the child does not keep it alive; the client is answered as by any service that went, the service gets its DISPOSE")
    func forkChildDoesNotKeepPortAlive() throws {
        let broker = try TestBroker()
        let connection = try broker.connect()
        // The service's side.
        let server = try Child(testPeer, ["caps-fork-and-go", "forking_service", "service"], environment: broker.environment)
        #expect(try server.readLine() == "ready")
        let client = try CapsClient(connection, name: "forking_service")
        let id = try client.put(Array("question".utf8))
        let forked = try server.readLine() ?? ""
        #expect(forked.hasPrefix("closed "))
        let serviceChild = pid_t(forked.dropFirst("closed ".count)) ?? 0
        defer { if serviceChild > 0 { kill(serviceChild, SIGKILL) } }
        #expect(server.isRunning && kill(serviceChild, 0) == 0, "the service's process and its forked child are alive")
        // Gone from the broker (bounded: a child holding the registration would hold it forever)...
        let serviceGone = try eventually { try !connection.listServices().contains(where: { $0.name == "forking_service" }) }
        #expect(serviceGone)
        // ...and the client answered as when a service goes (a 0-byte reply, serviceClosed).
        if serviceGone {
            let (reply, _) = try clientWait(client)
            #expect(reply.messageID == id && reply.serviceClosed)
        }

        // The client's side: its request becomes a DISPOSE at the service once it goes.
        let service = try CapsService(connection, name: "forking_client", access: [.world])
        let caller = try Child(testPeer, ["caps-fork-and-go", "forking_client", "client"], environment: broker.environment)
        let put = try caller.readLine() ?? ""
        let callerForked = try caller.readLine() ?? ""
        let callerChild = pid_t(callerForked.dropFirst("closed ".count)) ?? 0
        defer { if callerChild > 0 { kill(callerChild, SIGKILL) } }
        #expect(caller.isRunning && kill(callerChild, 0) == 0, "the client's process and its forked child are alive")
        // Its request, left unread, comes back as a DISPOSE: the client is gone, though its child lives.
        let clientGone = try eventually { try !connection.listServices().contains(where: { $0.name == "forking_client" && $0.clients > 0 }) }
        #expect(clientGone)
        if clientGone {
            let (gone, _) = try serviceWait(service)
            #expect(gone.kind == .dispose && "put \(gone.messageID)" == put, "\(gone.kind) \(gone.messageID), \(put)")
        }
    }

    @Test("a call that reads past a put's reply keeps it for wait (not lost), copying at most the channel's payload space; past that it shows EMSGSIZE")
    func callKeepsPutReplies() throws {
        let broker = try TestBroker()
        let connection = try broker.connect()
        let service = try CapsService(connection, name: "keeper", access: [.world])
        let client = try CapsClient(connection, name: "keeper")
        // A call in another thread, while a put's reply comes first.
        func callWhile(_ putID: UInt64, replyingToPutWith length: Int) throws -> Result<[UInt8], PatchbayError>? {
            let outcome = Mutex<Result<[UInt8], PatchbayError>?>(nil)
            let done = try Pipe()
            let signal = done.writeEnd.rawValue
            startThread {
                let result = Result { () throws(PatchbayError) -> [UInt8] in try client.call(Array("call".utf8), maxReplyLength: 64) }
                outcome.withLock { $0 = result }
                var byte: UInt8 = 1
                _ = Glibc.write(signal, &byte, 1)
            }
            var callID: UInt64 = 0
            var seen = 0
            while seen < 2 {
                let (message, _) = try serviceWait(service)
                guard message.kind == .request else { continue }
                seen += 1
                if message.messageID != putID { callID = message.messageID }
            }
            try service.reply(to: putID, length: length) { buffer in
                if buffer.count >= 10 { buffer.copyMemory(from: Array("put answer".utf8).withUnsafeBytes { UnsafeRawBufferPointer($0) }) }
            }
            try service.reply(to: callID, Array("call answer".utf8))
            var byte: UInt8 = 0
            _ = try withUnsafeMutableBytes(of: &byte) { raw in Result { () throws(Errno) -> Int in try done.readEnd.read(into: raw) } }.get()
            return outcome.withLock { $0 }
        }
        let small = try client.put(Array("put".utf8))
        let first = try callWhile(small, replyingToPutWith: 10)
        #expect((try? first?.get()) == Array("call answer".utf8))
        // An event loop that asks for the port's descriptor only now is told of it at once
        // (before: only of replies still in the ring).
        var ready = pollfd(fd: client.eventDescriptor, events: Int16(POLLIN), revents: 0)
        #expect(poll(&ready, 1, 0) == 1)
        // There at once, for get (it never waits: a reply lost would fail here, not hang).
        var buffer = [UInt8](repeating: 0, count: 64)
        let kept = try buffer.withUnsafeMutableBytes { raw in Result { () throws(PatchbayError) -> CapsReply in try client.get(into: raw) } }.get()
        #expect(kept.messageID == small && kept.error == nil && Array(buffer[0..<kept.length]) == Array("put answer".utf8))
        // One longer than the channel's payload space (an attached memfd): not copied, EMSGSIZE.
        let large = try client.put(Array("put".utf8))
        let second = try callWhile(large, replyingToPutWith: CapsLayout.defaultArenaSize + 4096)
        #expect((try? second?.get()) == Array("call answer".utf8))
        let refused = try clientGet(client)
        #expect(refused.messageID == large && refused.error == .messageTooLong)
        #expect(client.requestsInFlight == 0)
    }

    @Test("a call in one thread, put and wait, get or waitReply in another, the call answered first: each reader gets its own reply, and the call returns", arguments: ["wait", "get", "waitReply"])
    func putReaderLeavesCallReplies(_ reader: String) throws {
        let broker = try TestBroker()
        let connection = try broker.connect()
        let service = try CapsService(connection, name: "mixed", access: [.world])
        let client = try CapsClient(connection, name: "mixed")
        for round in 0..<10 {
            let outcome = Mutex<Result<[UInt8], PatchbayError>?>(nil)
            let done = try Pipe()
            let signal = done.writeEnd.rawValue
            let putID = try client.put(Array("put \(round)".utf8))
            startThread {
                let result = Result { () throws(PatchbayError) -> [UInt8] in try client.call(Array("call \(round)".utf8)) }
                outcome.withLock { $0 = result }
                var byte: UInt8 = 1
                _ = Glibc.write(signal, &byte, 1)
            }
            var callID: UInt64 = 0
            while callID == 0 {
                let (message, _) = try serviceWait(service)
                if message.kind == .request && message.messageID != putID { callID = message.messageID }
            }
            // The call's reply first: the put's reader comes to it first in the ring.
            try service.reply(to: callID, Array("call answer \(round)".utf8))
            try service.reply(to: putID, Array("put answer \(round)".utf8))
            var got: (UInt64, [UInt8])?
            switch reader {
            case "wait":
                let (reply, bytes) = try clientWait(client)
                got = (reply.messageID, bytes)
            case "get":
                // The put's reply is there once the call's is: get never waits.
                try #require(try eventually { (try? clientGet(client)).map { got = ($0.messageID, []) } != nil })
            default:
                got = try Result { () throws(PatchbayError) -> (UInt64, [UInt8]) in
                    try client.waitReply { id, bytes in (id, Array(bytes)) }
                }.get()
            }
            #expect(got?.0 == putID, "round \(round): \(reader) showed \(String(describing: got?.0)), not the put's \(putID)")
            if reader != "get" { #expect(got?.1 == Array("put answer \(round)".utf8)) }
            var entry = pollfd(fd: done.readEnd.rawValue, events: Int16(POLLIN), revents: 0)
            #expect(poll(&entry, 1, 10_000) == 1, "round \(round): the call never returned (its reply went to \(reader))")
            #expect((try? outcome.withLock { $0 }?.get()) == Array("call answer \(round)".utf8))
            if entry.revents == 0 { return }  // its thread is stuck: not another round on this client
        }
        #expect(client.requestsInFlight == 0)
    }

    @Test("two threads calling, the later one answered with an error first: each call gets its own outcome, whichever thread reads it")
    func errorReplyForAnotherThreadsCall() throws {
        let broker = try TestBroker()
        let connection = try broker.connect()
        let service = try CapsService(connection, name: "crossed", access: [.world])
        let client = try CapsClient(connection, name: "crossed")
        for round in 0..<20 {
            let outcomes = Mutex<[String: String]>([:])
            let done = try Pipe()
            let signal = done.writeEnd.rawValue
            for name in ["first", "second"] {
                startThread {
                    let outcome: String
                    do { outcome = String(decoding: try client.call(Array(name.utf8)), as: UTF8.self) } catch let error as PatchbayError {
                        outcome = error.errno.name
                    } catch { outcome = "?" }
                    outcomes.withLock { $0[name] = outcome }
                    var byte: UInt8 = 1
                    _ = Glibc.write(signal, &byte, 1)
                }
            }
            var ids: [String: UInt64] = [:]
            while ids.count < 2 {
                let (message, bytes) = try serviceWait(service)
                if message.kind == .request { ids[String(decoding: bytes, as: UTF8.self)] = message.messageID }
            }
            try service.reply(to: ids["second"]!, error: .permissionDenied)
            try service.reply(to: ids["first"]!, Array("answer".utf8))
            // Both calls end (bounded: a call whose reply another thread kept in the wrong place
            // would wait for ever).
            var ended = 0
            var entry = pollfd(fd: done.readEnd.rawValue, events: Int16(POLLIN), revents: 0)
            while ended < 2, poll(&entry, 1, 10_000) == 1 {
                var byte: UInt8 = 0
                _ = Glibc.read(done.readEnd.rawValue, &byte, 1)
                ended += 1
            }
            #expect(ended == 2, "round \(round): a call never ended")
            #expect(outcomes.withLock { $0 } == ["first": "answer", "second": "EACCES"], "round \(round)")
            if ended < 2 { break }
        }
    }

    @Test("an error reply whose errno is not 1 to 4095 (a negative number, INT_MIN, past 4095) is EIO to the client, never a length or a success")
    func errorReplyOutOfRangeIsEIO() throws {
        let broker = try TestBroker()
        let connection = try broker.connect()
        let service = try CapsService(connection, name: "errno_forger", access: [.world])
        let client = try CapsClient(connection, name: "errno_forger")
        for flags: UInt32 in [0x8000_0000, 0xFFFF_FFFB, 0x8000_0001, 4096, 100_000] {
            let id = try client.put(Array("x".utf8))
            let (request, _) = try serviceWait(service)
            #expect(request.messageID == id)
            #expect(service.pushForgedErrorReply(onChannel: client.channelID, messageID: id, flags: flags))
            let (reply, bytes) = try clientWait(client)
            #expect(reply.messageID == id && reply.error == .ioError && bytes.isEmpty, "flags \(flags)")
        }
        // call's way (the one C's pb_caps_call takes): thrown as EIO.
        for flags: UInt32 in [0x8000_0000, 0xFFFF_FFFB] {
            let outcome = Mutex<Errno?>(nil)
            let done = try Pipe()
            let signal = done.writeEnd.rawValue
            startThread {
                do { _ = try client.call(Array("y".utf8)) } catch let error as PatchbayError { outcome.withLock { $0 = error.errno } } catch {}
                var byte: UInt8 = 1
                _ = Glibc.write(signal, &byte, 1)
            }
            let (request, _) = try serviceWait(service)
            #expect(service.pushForgedErrorReply(onChannel: client.channelID, messageID: request.messageID, flags: flags))
            var byte: UInt8 = 0
            _ = try withUnsafeMutableBytes(of: &byte) { raw in Result { () throws(Errno) -> Int in try done.readEnd.read(into: raw) } }.get()
            #expect(outcome.withLock { $0 } == .ioError, "flags \(flags)")
        }
    }

    @Test("generations stop growing at 2^63 - 1 instead of wrapping to 0: after a page showing 2^64 - 2, and through the floor of forgotten names")
    func generationsDoNotWrap() throws {
        let broker = try TestBroker(["--max-caps-names-per-uid", "1"])
        let connection = try broker.connect()
        func gone(_ name: String) throws {
            while try connection.listServices().contains(where: { $0.name == name }) { sched_yield() }
        }
        do {
            let high = try CapsService(connection, name: "high", access: [.world])
            try high.setGeneration(UInt64.max - 1)
        }
        try gone("high")
        let highest = UInt64(Int64.max)
        for _ in 0..<2 {
            do { #expect(try CapsService(connection, name: "high", access: [.world]).currentGeneration == highest) }
            try gone("high")
        }
        // One name remembered per uid: "high" is forgotten for "fresh", which then is for "newer",
        // which starts above every generation forgotten, not at 0.
        do { #expect(try CapsService(connection, name: "fresh", access: [.world]).currentGeneration == 1) }
        try gone("fresh")
        do { #expect(try CapsService(connection, name: "newer", access: [.world]).currentGeneration == highest) }
    }

    @Test("waitReply throws an error reply's errno, as call does, instead of showing it as an empty reply")
    func waitReplyThrowsErrorReplies() throws {
        let broker = try TestBroker()
        let connection = try broker.connect()
        let service = try CapsService(connection, name: "refuser", access: [.world])
        let client = try CapsClient(connection, name: "refuser")
        let id = try client.put(Array("please".utf8))
        let (request, _) = try serviceWait(service)
        try service.reply(to: request.messageID, error: .permissionDenied)
        var ran = false
        expectErrno(.permissionDenied) { () throws(PatchbayError) in try client.waitReply { (_: UInt64, _: UnsafeRawBufferPointer) in ran = true } }
        #expect(!ran)
        // Consumed all the same: DISPOSEd, and nothing left in flight.
        let (dispose, _) = try serviceWait(service)
        #expect(dispose.kind == .dispose && dispose.messageID == id)
        #expect(client.requestsInFlight == 0)
    }

    @Test("two clients are taken in turn; a DISPOSE comes before the request put after consuming its reply; short buffers keep a request queued, which an error reply refuses unread")
    func messageOrder() throws {
        // Inline requests go the service's one-pass path, arena ones and short buffers the
        // general path: both must give the same order, bytes and records.
        let broker = try TestBroker()
        let connection = try broker.connect()
        let service = try CapsService(connection, name: "order", access: [.world])
        let first = try CapsClient(connection, name: "order")
        let second = try CapsClient(connection, name: "order")
        let bigRequest = [UInt8](repeating: 2, count: 200)
        let a1 = try first.put(Array("a1".utf8))
        let b1 = try second.put(Array("b1".utf8))
        let a2 = try first.put(bigRequest)
        let b2 = try second.put(Array("b2".utf8))
        var seen: [(UInt64, [UInt8], UInt64)] = []
        for _ in 0..<4 {
            try service.receive { (message: CapsServiceMessage, payload: UnsafeRawBufferPointer) in
                #expect(message.kind == .request && message.credentials.pid == getpid() && message.consumed)
                seen.append((message.messageID, Array(payload), message.channelID))
                // Each request answered with its bytes reversed: inline, or in the arena for 200.
                try? service.reply(to: message.messageID, length: payload.count) { buffer in
                    for index in 0..<payload.count { buffer[index] = payload[payload.count - 1 - index] }
                }
            }
        }
        let ids = seen.map(\.0)
        #expect(ids == [a1, b1, a2, b2] || ids == [b1, a1, b2, a2], "taken in turn")
        #expect(seen.first { $0.0 == a2 }?.1 == bigRequest && seen.first { $0.0 == b2 }?.1 == Array("b2".utf8))
        #expect(Set(seen.map(\.2)).count == 2)

        // The first client consumes a1's reply and puts a3: the service sees a1's DISPOSE first.
        let (reply1, answer1) = try clientWait(first)
        #expect(reply1.messageID == a1 && answer1 == Array("1a".utf8))
        let a3 = try first.put(Array("a3x".utf8))
        // (`get`, not `wait`: everything asked for below is already there, and a wrong order must
        // fail the test rather than hang it.)
        let dispose1 = try serviceGet(service)
        #expect(dispose1.kind == .dispose && dispose1.messageID == a1)
        // A buffer too small: the request stays queued, then comes whole.
        let short = try serviceGet(service, capacity: 1)
        #expect(short.kind == .request && short.messageID == a3 && short.length == 3 && !short.consumed)
        var payload3 = [UInt8](repeating: 0, count: 16)
        let request3 = try payload3.withUnsafeMutableBytes { raw in
            Result { () throws(PatchbayError) -> CapsServiceMessage in try service.get(into: raw) }
        }.get()
        #expect(request3.messageID == a3 && request3.consumed && payload3.prefix(request3.length) == ArraySlice("a3x".utf8))
        try service.reply(to: a3, Array("ok".utf8))
        #expect(throws: PatchbayError.self) { try service.reply(to: a3, Array("twice".utf8)) }
        // One too long for the buffer can be refused without being read: it goes, and the caller
        // gets the errno.
        let a4 = try first.put(Array("far too long for the buffer".utf8))
        let long = try serviceGet(service, capacity: 4)
        #expect(long.kind == .request && long.messageID == a4 && !long.consumed)
        try service.reply(to: a4, error: .messageTooLong)
        #expect(throws: PatchbayError.self) { try service.reply(to: a4, error: .messageTooLong) }
        #expect(throws: PatchbayError.self) { try serviceGet(service, capacity: 64) }  // nothing queued any more

        let (reply2, answer2) = try clientWait(first)
        #expect(reply2.messageID == a2 && answer2 == bigRequest)
        let (reply3, answer3) = try clientWait(first)
        #expect(reply3.messageID == a3 && answer3 == Array("ok".utf8))
        var refusedBuffer = [UInt8](repeating: 0, count: 64)
        let refused = try refusedBuffer.withUnsafeMutableBytes { raw in
            Result { () throws(PatchbayError) -> CapsReply in try first.get(into: raw) }
        }.get()
        #expect(refused.messageID == a4 && refused.error == .messageTooLong, "\(refused)")
        for id in [b1, b2] {
            let (reply, _) = try clientWait(second)
            #expect(reply.messageID == id)
        }
        var disposed: Set<UInt64> = []
        while let message = try? serviceGet(service) {
            #expect(message.kind == .dispose)
            disposed.insert(message.messageID)
        }
        #expect(disposed == [a2, a3, a4, b1, b2])  // a4: the error reply its program chose is DISPOSEd like a reply
        #expect(first.requestsInFlight == 0 && second.requestsInFlight == 0)
    }

    @Test("an error reply reaches the client as its errno and, once consumed, is DISPOSEd like a reply; it takes its record with it")
    func errorRepliesAreDisposed() throws {
        let broker = try TestBroker()
        let connection = try broker.connect()
        let service = try CapsService(connection, name: "errors", access: [.world])
        let port = try CapsClient(connection, name: "errors")
        let failing = try port.put(Array("fail me".utf8))
        let (request, _) = try serviceWait(service)
        #expect(request.messageID == failing)
        try service.reply(to: failing, error: .permissionDenied)
        expectErrno(.invalidArgument) { () throws(PatchbayError) in try service.reply(to: failing, error: .ioError) }
        expectErrno(.invalidArgument) { () throws(PatchbayError) in try service.reply(to: failing, []) }
        // Nothing to dispose of before the client consumes it.
        expectErrno(.resourceTemporarilyUnavailable) { () throws(PatchbayError) in _ = try serviceGet(service) }
        let reply = try clientGet(port)
        #expect(reply.messageID == failing && reply.error == .permissionDenied && reply.length == 0)
        let dispose = try serviceGet(service)
        #expect(dispose.kind == .dispose && dispose.messageID == failing)
        expectErrno(.resourceTemporarilyUnavailable) { () throws(PatchbayError) in _ = try serviceGet(service) }
        // call throws the errno, and the next request goes through as usual.
        let caller = try CapsClient(connection, name: "errors")
        let done = try Pipe()
        let signal = done.writeEnd.rawValue
        startThread {
            if let (message, _) = try? serviceWait(service) { try? service.reply(to: message.messageID, error: .noSuchProcess) }
            if let (dispose, _) = try? serviceWait(service), dispose.kind == .dispose {
                var byte: UInt8 = 1
                _ = Glibc.write(signal, &byte, 1)
            }
        }
        expectErrno(.noSuchProcess) { () throws(PatchbayError) in _ = try caller.call(Array("x".utf8)) }
        var byte: UInt8 = 0
        _ = try withUnsafeMutableBytes(of: &byte) { raw in Result { () throws(Errno) -> Int in try done.readEnd.read(into: raw) } }.get()
        #expect(byte == 1, "the service saw no DISPOSE of the error reply call consumed")
        #expect(port.requestsInFlight == 0 && caller.requestsInFlight == 0)
    }

    @Test("a request aborted after its reply was pushed: the reply is discarded, never delivered, and still DISPOSEd")
    func abortAfterReply() throws {
        let broker = try TestBroker()
        let connection = try broker.connect()
        let service = try CapsService(connection, name: "late.abort", access: [.world])
        let port = try CapsClient(connection, name: "late.abort")
        let id = try port.put(Array("late".utf8))
        let request = try serviceGet(service)
        #expect(request.kind == .request && request.messageID == id)
        try service.reply(to: id, Array("too late".utf8))  // inline, in the ring, not read yet
        #expect(try port.abort(id) == .atService)
        #expect(throws: PatchbayError.self) { _ = try clientGet(port) }  // EAGAIN: discarded
        #expect(port.requestsInFlight == 0)
        // The ABORT of an answered request is dropped; the reply's slot is DISPOSEd.
        let dispose = try serviceGet(service)
        #expect(dispose.kind == .dispose && dispose.messageID == id)
        #expect(throws: PatchbayError.self) { _ = try serviceGet(service) }
    }

    @Test("a ring full of forged entries costs the service no stack: a service on a 64 KiB stack drops 1,023 of them in one receive and answers the request behind them")
    func forgedEntriesDroppedInALoop() throws {
        let broker = try TestBroker()
        let service = try Child(testPeer, ["caps-serve-small-stack", "forged.loop"], environment: broker.environment)
        defer { service.kill(SIGKILL); _ = try? service.wait() }
        #expect(try service.readLine() == "ready")
        let port = try CapsClient(try broker.connect(), name: "forged.loop")
        // Queued while the service does not read: ids naming another channel, which it drops
        // unread and silently, then one honest request (the ring holds 1,024).
        for _ in 0..<(CapsLayout.ringCapacity - 1) { try port.putForgedForeign() }
        let id = try port.put(Array("behind them".utf8))
        try service.writeLine("go")
        let (reply, bytes) = try clientWait(port)
        #expect(reply.messageID == id && bytes == Array("behind them".utf8))
        #expect(try service.readLine() == "served")
        #expect(try service.wait() == .exited(0))
    }

    @Test("a request whose arena payload lies outside the arena is refused unread (EBADMSG); one at its very end is read")
    func arenaBounds() throws {
        let broker = try TestBroker()
        let connection = try broker.connect()
        let service = try CapsService(connection, name: "arena.bounds", access: [.world])
        let port = try CapsClient(connection, name: "arena.bounds")
        let arena = UInt64(CapsLayout.defaultArenaSize)
        // Past the end, straddling it, and an offset so large that offset + length wraps.
        let forged = [(arena, UInt32(100)), (arena - 64, UInt32(128)), (UInt64.max - 10, UInt32(100))]
        var ids: [UInt64] = []
        for (offset, length) in forged { ids.append(try port.putForgedArenaPayload(offset: offset, length: length)) }
        // The last 100 bytes of the arena are inside it: read, and answered.
        let last = try port.putForgedArenaPayload(offset: arena - 100, length: 100)
        let (message, payload) = try serviceWait(service)
        #expect(message.kind == .request && message.messageID == last && payload.count == 100)
        try service.reply(to: last, Array("end".utf8))
        #expect(throws: PatchbayError.self) { _ = try serviceGet(service) }
        #expect(service.refusals.total == forged.count && service.refusals.pastLimit == 0)
        for id in ids {
            let refused = try clientGet(port)
            #expect(refused.messageID == id && refused.error == .badMessage)
        }
        let (answer, bytes) = try clientWait(port)
        #expect(answer.messageID == last && bytes == Array("end".utf8))
    }

    @Test("messages carry descriptors; ports plug into epoll")
    func descriptorsAndEpoll() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        let service = try CapsService(client, name: "files", access: [.world])
        let port = try CapsClient(client, name: "files")
        let serviceEvents = service.eventDescriptor
        let clientEvents = port.eventDescriptor
        var poller = pollfd(fd: serviceEvents, events: Int16(POLLIN), revents: 0)
        // The client's arrival is itself news (the broker's notice); once read, nothing is waiting.
        #expect(poll(&poller, 1, 5000) == 1)
        expectErrno(.resourceTemporarilyUnavailable) { () throws(PatchbayError) in _ = try serviceGet(service) }
        #expect(poll(&poller, 1, 0) == 0)
        let pipe = try Pipe()
        let id = try port.put(Array("a pipe for you".utf8), descriptors: [pipe.writeEnd.rawValue])
        #expect(poll(&poller, 1, 5000) == 1)
        let message = try serviceGet(service)
        #expect(message.messageID == id && message.descriptors?.count == 1)
        guard let writer = message.descriptors?.take() else {
            Issue.record("the attached descriptor did not arrive")
            return
        }
        try writer.writeAll(Array("through a CAPS attachment".utf8))
        _ = consume writer
        _ = consume pipe.writeEnd
        var clientPoller = pollfd(fd: clientEvents, events: Int16(POLLIN), revents: 0)
        #expect(poll(&clientPoller, 1, 0) == 0)
        try service.reply(to: id, Array("done".utf8))
        #expect(poll(&clientPoller, 1, 5000) == 1)
        #expect(try clientGet(port).length == 4)
        #expect(try pipe.readEnd.readToEnd() == Array("through a CAPS attachment".utf8))
    }

    @Test("the async API: requests as an AsyncSequence, calls that do not block the concurrency pool")
    func asyncAPI() async throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        let service = try CapsService(client, name: "async.svc", access: [.world])
        let server = Task {
            var served = 0
            for try await request in service.requests {
                try service.reply(to: request.messageID, request.bytes.reversed())
                served += 1
                if served == 3 { break }
            }
            return served
        }
        let port = try await CapsClient.connect(client, name: "async.svc")
        for word in ["abc", "hello", "caps"] {
            let reply = try await port.call(Array(word.utf8))
            #expect(reply == Array(word.utf8).reversed())
        }
        #expect(try await server.value == 3)
        // A connect that waits for a service that never comes can be cancelled.
        let waiting = Task { try await CapsClient.connect(client, name: "never.registered", waitForService: true) }
        waiting.cancel()
        do {
            _ = try await waiting.value
            Issue.record("a cancelled wait for a service returned a port")
        } catch let error as PatchbayError {
            #expect(error.errno == .canceled)
        }
    }

    @Test("a service may reply from inside receive; calls from several threads each get their own reply")
    func reentrancyAndThreads() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        let service = try CapsService(client, name: "reentrant", access: [.world])
        let port = try CapsClient(client, name: "reentrant")
        let stop = Atomic<Bool>(false)
        let served = Atomic<Int>(0)
        startThread {
            while !stop.load(ordering: .relaxed) {
                // Replying from inside the body must not deadlock on the port's own lock.
                try? service.receive { (message: CapsServiceMessage, payload: UnsafeRawBufferPointer) in
                    guard message.kind == .request else { return }
                    served.add(1, ordering: .relaxed)  // before the reply, which lets the caller finish
                    try? service.reply(to: message.messageID, Array("re:".utf8) + Array(payload))
                }
            }
        }
        let failures = Atomic<Int>(0)
        let done = try Pipe()
        let signal = done.writeEnd.rawValue
        for thread in 0..<4 {
            startThread {
                for index in 0..<50 {
                    let request = Array("\(thread)-\(index)".utf8)
                    if (try? port.call(request)) != Array("re:".utf8) + request { failures.add(1, ordering: .relaxed) }
                }
                var byte: UInt8 = 1
                _ = Glibc.write(signal, &byte, 1)
            }
        }
        var finished = 0
        while finished < 4 {
            var byte: UInt8 = 0
            finished += try withUnsafeMutableBytes(of: &byte) { raw in
                Result { () throws(Errno) -> Int in try done.readEnd.read(into: raw) }
            }.get()
        }
        #expect(failures.load(ordering: .relaxed) == 0)
        #expect(served.load(ordering: .relaxed) == 200)
        stop.store(true, ordering: .relaxed)
        service.cancelWait()
    }

    @Test("a call that gives up waiting (cancelled): its reply, when it comes, is disposed of unread, not kept; the next call gets its own")
    func abandonedCallsReplyIsDisposedOf() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        let service = try CapsService(client, name: "abandoned", access: [.world])
        let port = try CapsClient(client, name: "abandoned")
        let outcome = Mutex<Errno?>(nil)
        let done = try Pipe()
        let signal = done.writeEnd.rawValue
        startThread {
            do throws(PatchbayError) { _ = try port.call(Array("slow".utf8)) } catch { outcome.withLock { $0 = error.errno } }
            var byte: UInt8 = 1
            _ = Glibc.write(signal, &byte, 1)
        }
        // The service has the request; the call, waiting for its reply, gives up.
        var slow: UInt64 = 0
        while slow == 0 {
            try service.receive { (message: CapsServiceMessage, _: UnsafeRawBufferPointer) in
                if message.kind == .request { slow = message.messageID }
            }
        }
        port.cancelWait()
        var byte: UInt8 = 0
        _ = try withUnsafeMutableBytes(of: &byte) { raw in
            Result { () throws(Errno) -> Int in try done.readEnd.read(into: raw) }
        }.get()
        #expect(outcome.withLock { $0 } == .canceled)
        #expect(port.requestsInFlight == 1, "the request stays in flight until its reply comes")
        try service.reply(to: slow, Array("late".utf8))
        startThread {
            var answered = false
            while !answered {
                try? service.receive { (message: CapsServiceMessage, payload: UnsafeRawBufferPointer) in
                    guard message.kind == .request else { return }
                    try? service.reply(to: message.messageID, Array("re:".utf8) + Array(payload))
                    answered = true
                }
            }
        }
        // The next call meets the late reply first on the ring: disposed of, not kept for anyone.
        #expect(try port.call(Array("next".utf8)) == Array("re:next".utf8))
        #expect(port.repliesKeptForCalls == 0, "the abandoned call's reply was kept, for no one")
        #expect(port.requestsInFlight == 0)
    }

    @Test("a CAPS port opened with too few free descriptors for what the broker sends (0 to 7 spare): EMFILE, never EPROTO, and nothing left behind: the same port opens once there is room",
          arguments: ["client", "service"])
    func portOpenedWithoutRoomIsEMFILE(_ side: String) throws {
        let broker = try TestBroker()
        let service = try Child(patchbayCLI, ["caps", "serve", "roomy", "--allow", "world", "--echo"], environment: broker.environment)
        defer { service.kill(SIGKILL); _ = try? service.wait() }
        _ = try CapsClient(try broker.connect(), name: "roomy", waitForService: true)
        for spare in 0..<8 {
            let name = side == "client" ? "roomy" : "roomy.\(spare)"
            let peer = try Child(testPeer, ["caps-open-with-full-table", name, side, "\(spare)"], environment: broker.environment)
            let first = try peer.readLine() ?? ""
            #expect(first == "EMFILE" || first == "opened", "\(spare) spare: \(first)")
            #expect(try peer.readLine() == "opened on retry", "\(spare) spare")
            #expect(try peer.wait() == .exited(0))
        }
    }

    @Test("waitForService connects as soon as the service registers")
    func waitForService() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        let peer = try Child(testPeer, ["caps-client", "late.service", "3"], environment: broker.environment)
        // The client is parked at the broker until the service registers.
        let service = try CapsService(client, name: "late.service", access: [.world])
        var answered = 0
        while answered < 3 {
            let (message, bytes) = try serviceWait(service)
            guard message.kind == .request else { continue }
            try service.reply(to: message.messageID, Array("echo:".utf8) + bytes)
            answered += 1
        }
        #expect(try peer.readLine() == "ok 3")
        #expect(try peer.wait() == .exited(0))
    }

    @Test("the CLI: caps serve, call and ls")
    func commandLine() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        let echo = try Child(patchbayCLI, ["caps", "serve", "cli.echo", "--echo"], environment: broker.environment)
        let upper = try Child(patchbayCLI, ["caps", "serve", "cli.upper", "--allow", "world", "--exec", "/usr/bin/tr", "a-z", "A-Z"],
                              environment: broker.environment)
        let deadline = monotonicNanoseconds() + 10_000_000_000
        while try client.listServices().count < 2, monotonicNanoseconds() < deadline { usleep(2_000) }
        #expect(try run(patchbayCLI, ["caps", "call", "cli.echo", "ping"], environment: broker.environment).standardOutput == "ping")
        #expect(try run(patchbayCLI, ["caps", "call", "cli.upper"], environment: broker.environment, input: "quiet\n")
            .standardOutput == "QUIET\n")
        let listing = try run(patchbayCLI, ["caps", "ls", "--json"], environment: broker.environment).standardOutput
        #expect(listing.contains("\"name\": \"cli.echo\"") && listing.contains("\"flags\": \"world\""))
        // A name wider than its column is still apart from the uid after it.
        let long = try CapsService(client, name: "a.name.wider.than.its.column", access: [.world])
        let table = try run(patchbayCLI, ["caps", "ls"], environment: broker.environment).standardOutput
        #expect(table.contains("a.name.wider.than.its.column \(geteuid()) "), "\(table)")
        withExtendedLifetime(long) {}
        let missing = try run(patchbayCLI, ["caps", "call", "nobody", "x"], environment: broker.environment)
        #expect(missing.standardError.hasPrefix("patchbay: caps call: ENOENT: "))
        echo.kill(SIGTERM)
        upper.kill(SIGTERM)
        _ = try echo.wait()
        _ = try upper.wait()
    }

    @Test("caps serve --exec: a request its client aborts while it waits for a free program slot is never run, and is still answered (the reply the client discards frees its space there)")
    func execWithdrawsAnAbortedRequest() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        let started = broker.directory + "/started", release = broker.directory + "/release", ran = broker.directory + "/ran"
        #expect(mkfifo(started, 0o600) == 0 && mkfifo(release, 0o600) == 0)
        // Each program notes its request; "slow" says so through one FIFO and waits on another.
        let service = try Child(patchbayCLI, ["caps", "serve", "paced1", "--max-programs", "1", "--exec", "/bin/sh", "-c",
                                              "read x; echo \"$x\" >> \(ran); if [ \"$x\" = slow ]; then echo started > \(started); read y < \(release); fi; echo \"$x\""],
                                environment: broker.environment)
        defer { service.kill(SIGKILL); _ = try? service.wait() }
        let slow = try Child(patchbayCLI, ["caps", "call", "paced1", "--wait-for-service", "slow"], environment: broker.environment)
        defer { slow.kill(SIGKILL); _ = try? slow.wait() }
        let fifo = open(started, O_RDONLY | O_NONBLOCK | O_CLOEXEC)
        #expect(fifo >= 0)
        defer { close(fifo) }
        var ready = pollfd(fd: fifo, events: Int16(POLLIN), revents: 0)
        #expect(poll(&ready, 1, 30_000) == 1)
        // The one slot is taken: the next request waits, and its client takes it back.
        let port = try CapsClient(client, name: "paced1")
        let id = try port.put(Array("aborted\n".utf8))
        func count(_ direction: String, reaching expected: Double) throws -> Double {
            let sample = "patchbay_caps_messages_total{service=\"paced1\",uid=\"\(geteuid())\",direction=\"\(direction)\"}"
            let deadline = monotonicNanoseconds() + 20_000_000_000
            var seen = 0.0
            repeat {
                seen = Exposition(try client.metrics()).samples[sample] ?? 0
                if seen >= expected { break }
                usleep(5_000)
            } while monotonicNanoseconds() < deadline
            return seen
        }
        #expect(try count("to_service", reaching: 2) == 2)
        #expect(try port.abort(id) == .atService)
        // Answered while the slow program still runs: the service's only reply so far.
        #expect(try count("to_client", reaching: 1) == 1)
        let writer = open(release, O_WRONLY | O_CLOEXEC)
        #expect(writer >= 0)
        #expect(write(writer, "go\n", 3) == 3)
        close(writer)
        #expect(try slow.readLine() == "slow")
        #expect(try slow.wait() == .exited(0))
        // The slot is free again, and the aborted request was never run.
        #expect(try CapsClient(client, name: "paced1").call(Array("after\n".utf8)) == Array("after\n".utf8))
        #expect(try openFile(ran, flags: O_RDONLY).readToEnd(limit: 1 << 10) == Array("slow\nafter\n".utf8))
    }
}


@Suite("CAPS status page")
struct CapsStatusPageTests {
    @Test("a client cannot write the service's status page, even by reopening it read-write")
    func statusPageIsSealed() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        let service = try CapsService(client, name: "sealed", access: [.world])
        try service.setGeneration(41)
        // Connect as a raw client to hold the descriptors the broker hands a client.
        let raw = try SeqpacketSocket()
        try raw.connect(path: broker.socketPath)
        try raw.send(Request.caps(.client(name: "sealed", uid: -1, gid: -1, flags: .world)).encode(requestID: 1))
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 8)
        defer { buffer.deallocate() }
        var message = try raw.receive(into: buffer)
        let count = message.descriptors.count
        #expect(count == 5)
        _ = message.descriptors.takeFirst()  // the channel
        guard let status = message.descriptors.takeFirst() else {
            Issue.record("no status page in the connect reply")
            return
        }
        // Read-only as handed out, and sealed: a read-write reopen through /proc cannot write.
        let reopened = open("/proc/self/fd/\(status.rawValue)", O_RDWR | O_CLOEXEC)
        #expect(reopened >= 0)
        defer { close(reopened) }
        var value: UInt64 = 7
        #expect(pwrite(reopened, &value, 8, off_t(CapsLayout.statusGenerationOffset)) == -1)
        #expect(errno == EPERM)
        let writable = mmap(nil, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, reopened, 0)
        #expect(writable == MAP_FAILED)
        #expect(try CapsClient(client, name: "sealed").generation() == 41)
    }
}
