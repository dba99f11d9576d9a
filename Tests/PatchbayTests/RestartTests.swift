// A broker killed with SIGKILL in the middle of traffic: every client learns of it from its next
// (or its blocked) call with an error, never a hang; each reconnects to the broker started in its
// place; the named objects, and the bytes the clients wrote into them, are intact.
import Glibc
import Patchbay
import PatchbayProtocol
import PatchbaySystem
import SystemPackage
import Synchronization
import Testing

/// How far past copies that may be behind a broker goes (CapsRegistry.idsPastADirtyCopy and
/// generationsPastADirtyCopy).
enum CapsRegistryMargins {
    static let ids: UInt64 = 1 << 20
    static let generations: UInt64 = 1 << 32
}

@Suite("Broker restarts")
struct RestartTests {
    @Test("SIGKILL under traffic: prompt errors, reconnection to the new broker, named memory intact")
    func restartUnderTraffic() throws {
        let broker = try TestBroker()
        let modes = ["busy", "busy", "busy", "accept"]
        let peers = try modes.map { try Child(testPeer, ["traffic", $0], environment: broker.environment) }
        // A hang must fail the test, not stall it: past the deadline the peers are killed.
        let finished = Atomic<Bool>(false)
        let pids = peers.map(\.pid)
        startThread {
            let deadline = monotonicNanoseconds() + 30_000_000_000
            while !finished.load(ordering: .acquiring), monotonicNanoseconds() < deadline { usleep(10_000) }
            if !finished.load(ordering: .acquiring) { for pid in pids { kill(pid, SIGKILL) } }
        }
        defer { finished.store(true, ordering: .releasing) }
        for peer in peers { #expect(try peer.readLine() == "running") }
        // The accept peer is blocked in its accept once its listener shows up.
        let client = try broker.connect()
        let waitDeadline = monotonicNanoseconds() + 30_000_000_000
        while try !client.listSockets().contains(where: { $0.waitingAccepts > 0 }), monotonicNanoseconds() < waitDeadline {
            usleep(2_000)
        }
        #expect(try client.listSockets().contains { $0.waitingAccepts > 0 })

        let killedAt = monotonicNanoseconds()
        kill(broker.pid, SIGKILL)
        _ = try waitForProcess(broker.pid)
        var detection: [UInt64] = []
        for (peer, mode) in zip(peers, modes) {
            let line = try peer.readLine() ?? "EOF"
            let words = line.split(separator: " ")
            #expect(words.count == 4 && words[0] == "error" && ["ECONNRESET", "EPIPE"].contains(String(words[1])),
                    "\(mode): \(line)")
            if words.count == 4, let at = UInt64(words[3]) { detection.append(at > killedAt ? at - killedAt : 0) }
        }
        // Every client noticed before any new broker existed: nobody was waiting for one.
        #expect(detection.count == peers.count)
        #expect(detection.allSatisfy { $0 < 5_000_000_000 }, "detection took \(detection) ns")

        let restarted = try spawnDaemon(socketPath: broker.socketPath, sharedMemoryDirectory: broker.directory + "/shm")
        defer { kill(restarted, SIGTERM); _ = try? waitForProcess(restarted) }
        for (peer, mode) in zip(peers, modes) {
            let line = try peer.readLine() ?? "EOF"
            let words = line.split(separator: " ")
            #expect(words.count == 3 && words[0] == "recovered" && words[1] == words[2], "\(mode): \(line)")
            #expect(try peer.wait() == .exited(0))
        }
        // They cleaned up after themselves on the new broker.
        #expect(try Broker(socketPath: broker.socketPath).listSharedMemory().isEmpty)
    }

    @Test("CAPS channels already made outlive the broker: the data plane never went through it")
    func capsChannelOutlivesBroker() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        let service = try CapsService(client, name: "survivor", access: [.world])
        let port = try CapsClient(client, name: "survivor")
        kill(broker.pid, SIGKILL)
        _ = try waitForProcess(broker.pid)
        // Request, reply and DISPOSE all travel through the channel's shared memory.
        let id = try port.put(Array("after the broker".utf8))
        let (request, bytes) = try serviceWait(service)
        #expect(request.kind == .request && request.messageID == id && bytes == Array("after the broker".utf8))
        try service.reply(to: id, Array("still here".utf8))
        let (reply, answer) = try clientWait(port)
        #expect(reply.messageID == id && answer == Array("still here".utf8))
        let (dispose, _) = try serviceWait(service)
        #expect(dispose.kind == .dispose && dispose.messageID == id)
        // Finding a service needs the broker: a new client cannot, and says why.
        do {
            _ = try CapsClient(try Broker(socketPath: broker.socketPath), name: "survivor")
            Issue.record("a new client reached a service with no broker")
        } catch {
            #expect([.connectionRefused, .connectionReset, .brokenPipe].contains(error.errno), "\(error)")
        }
    }

    @Test("a broker killed under a listener, a service and their clients: established traffic goes on, the names come back, nothing fails silently")
    func serversRideOutARestart() throws {
        let broker = try TestBroker()
        let listener = try Child(patchbayCLI, ["net", "listen", "echo1", "--echo"], environment: broker.environment)
        defer { listener.kill(SIGTERM); _ = try? listener.wait() }
        let server = try Child(patchbayCLI, ["caps", "serve", "svc", "--echo"], environment: broker.environment)
        defer { server.kill(SIGTERM); _ = try? server.wait() }
        let client = try broker.connect()
        let before = try waitUntilListening(client, "echo1")
        try waitUntilRegistered(client, "svc")

        // Established before the kill: a /net connection and a CAPS channel.
        let connection = try Socket.connect(client, to: "echo1")
        #expect(try connection.send(Array("one".utf8)) == 3)
        #expect(try connection.receive()?.bytes == Array("one".utf8))
        let port = try CapsClient(client, name: "svc")
        #expect(try port.call(Array("first".utf8)) == Array("first".utf8))

        kill(broker.pid, SIGKILL)
        _ = try waitForProcess(broker.pid)

        // With no broker: the established traffic flows, what needs a broker fails and says so.
        #expect(try connection.send(Array("two".utf8)) == 3)
        #expect(try connection.receive()?.bytes == Array("two".utf8))
        #expect(try port.call(Array("second".utf8)) == Array("second".utf8))
        let refused = try run(patchbayCLI, ["caps", "call", "svc", "x"], environment: broker.environment)
        #expect(refused.termination == .exited(69) && refused.standardOutput.isEmpty, "\(refused)")
        #expect(throws: PatchbayError.self) { try Broker(socketPath: broker.socketPath) }  // a first connection is not retried

        // A new broker on the same path and store: the servers take their names back by
        // themselves, and this process's Broker reconnects on its next call.
        let restarted = try spawnDaemon(socketPath: broker.socketPath, sharedMemoryDirectory: broker.directory + "/shm")
        var running = restarted
        defer { kill(running, SIGTERM); _ = try? waitForProcess(running) }
        let after = try waitUntilListening(client, "echo1")
        #expect(client.reconnections == 1)
        #expect(after.ownerPID == before.ownerPID)
        try waitUntilRegistered(client, "svc")
        // New clients reach both names; the old ones still work.
        let fresh = try Socket.connect(client, to: "echo1")
        #expect(try fresh.send(Array("three".utf8)) == 5)
        #expect(try fresh.receive()?.bytes == Array("three".utf8))
        #expect(try connection.send(Array("four".utf8)) == 4)
        #expect(try connection.receive()?.bytes == Array("four".utf8))
        #expect(try CapsClient(client, name: "svc").call(Array("new".utf8)) == Array("new".utf8))
        #expect(try port.call(Array("old".utf8)) == Array("old".utf8))
        let call = try run(patchbayCLI, ["caps", "call", "svc", "cli"], environment: broker.environment)
        #expect(call.termination == .exited(0) && call.standardOutput == "cli", "\(call)")
        // Both servers are still the same processes, and said what happened.
        #expect(listener.isRunning && server.isRunning)

        // Twice more with no connection in between, a clean stop then a kill: the accept made
        // again after one restart is taken back at the next (it ended the server there).
        for signal in [SIGTERM, SIGKILL] {
            kill(running, signal)
            _ = try waitForProcess(running)
            running = try spawnDaemon(socketPath: broker.socketPath, sharedMemoryDirectory: broker.directory + "/shm")
            #expect(try waitUntilListening(client, "echo1").ownerPID == before.ownerPID)
        }
        try waitUntilRegistered(client, "svc")
        let last = try Socket.connect(client, to: "echo1")
        #expect(try last.send(Array("five".utf8)) == 4)
        #expect(try last.receive()?.bytes == Array("five".utf8))
        #expect(try CapsClient(client, name: "svc").call(Array("again".utf8)) == Array("again".utf8))
        #expect(listener.isRunning && server.isRunning)
    }

    @Test("a datagram server outlives the broker: it answers while none runs, the broker that comes back has it again under its name (netAdopt, by the server itself), and a name whose socket closed before any broker took it back can be bound again")
    func datagramServerRidesOutARestart() throws {
        let broker = try TestBroker()
        let server = try Child(patchbayCLI, ["net", "listen", "dg1", "--type", "dgram", "--echo"], environment: broker.environment)
        defer { server.kill(SIGKILL); _ = try? server.wait() }
        let client = try broker.connect()
        func bound() throws -> NetSocketInfo? { try client.listSockets().first { $0.name == "dg1" } }
        #expect(try eventually { try bound() != nil })
        let before = try #require(try bound())
        let sender = try UnixSocket(.datagram)
        try sender.bind(path: broker.directory + "/sender")
        let path = try client.localSocketPath("dg1")
        try sender.connectWithoutBlocking(path: path)
        func echoed(_ text: String) -> String { datagramExchange(text, on: sender.rawValue) }
        #expect(echoed("one") == "one")

        kill(broker.pid, SIGKILL)
        _ = try waitForProcess(broker.pid)
        #expect(echoed("two") == "two")
        let second = try spawnDaemon(socketPath: broker.socketPath, sharedMemoryDirectory: broker.directory + "/shm")
        var secondRuns = true
        defer { if secondRuns { kill(second, SIGKILL); _ = try? waitForProcess(second) } }
        // The server finds out by itself (it makes no broker call while it receives) and is
        // taken back: the same process and socket file, BOUND, under a new id.
        #expect(try eventually { try bound() != nil })
        let after = try #require(try bound())
        #expect(after.ownerPID == before.ownerPID && after.state == "BOUND", "\(after)")
        #expect(echoed("three") == "three")
        #expect(server.isRunning)

        // Again, with the server stopped until the broker after this one has started, and
        // killed then: nobody takes the socket back, and its file is left behind with no socket
        // bound to it. Binding the name works all the same (before: EADDRINUSE until the next
        // broker start).
        kill(second, SIGKILL)
        _ = try waitForProcess(second)
        secondRuns = false
        server.kill(SIGSTOP)
        let third = try spawnDaemon(socketPath: broker.socketPath, sharedMemoryDirectory: broker.directory + "/shm")
        defer { kill(third, SIGTERM); _ = try? waitForProcess(third) }
        #expect(try bound() == nil)
        server.kill(SIGKILL)
        _ = try server.wait()
        #expect(access(path, F_OK) == 0)
        var fresh = try Socket.open(client, type: .dgram)
        try fresh.bind("dg1")
        #expect(try bound()?.ownerPID == getpid())
    }

    @Test("70 clients leave at once while no broker runs: a service sleeping on futex words is told of every one")
    func manyDeparturesWithoutTheBroker() throws {
        let broker = try TestBroker()
        let owner = try Broker(socketPath: broker.socketPath, reconnect: .forever)
        let service = try CapsService(owner, name: "crowd_svc", access: [.world], notifyConnections: true)
        let crowd = try Child(testPeer, ["caps-hold", "crowd_svc", "70"], environment: broker.environment)
        defer { crowd.kill(SIGKILL); _ = try? crowd.wait() }
        #expect(try crowd.readLine() == "holding 70")
        var connected = 0
        while connected < 70 {
            if try serviceWait(service).0.kind == .connected { connected += 1 }
        }
        kill(broker.pid, SIGKILL)
        _ = try waitForProcess(broker.pid)
        // A wait that hangs is cancelled after a minute, and fails the test instead.
        let watchdog = WatchdogBox(service)
        startThread {
            let deadline = monotonicNanoseconds() + 60_000_000_000
            while !watchdog.done.load(ordering: .relaxed), monotonicNanoseconds() < deadline { usleep(10_000) }
            if !watchdog.done.load(ordering: .relaxed) { watchdog.service.cancelWait() }
        }
        crowd.closeInput()
        #expect(try crowd.wait() == .exited(0))
        var departed = 0
        while departed < 70 {
            if try serviceWait(service).0.kind == .disconnected { departed += 1 }
        }
        watchdog.done.store(true, ordering: .relaxed)
        #expect(departed == 70)
    }

    @Test("a library service registers again and a library listener takes its socket back; a departed client is noticed without the broker")
    func libraryRidesOutARestart() throws {
        let broker = try TestBroker()
        let owner = try Broker(socketPath: broker.socketPath, reconnect: .forever)
        let service = try CapsService(owner, name: "lib_svc", access: [.world])
        let firstID = service.serviceID
        let listener = ListenerBox(try Socket.listen(owner, name: "lib-echo"))
        let kernelSocket = listener.socket.kernelDescriptor
        // A client in another process, connected before the kill, goes away while the broker is
        // down: the service learns it from the channel itself, and its requests become DISPOSEs.
        let peer = try Child(testPeer, ["caps-put-and-hang", "lib_svc"], environment: broker.environment)
        let sent = try #require(try peer.readLine())
        let ids = Set(sent.split(separator: " ").dropFirst().compactMap { UInt64($0) })
        #expect(ids.count == 3, "\(sent)")
        kill(broker.pid, SIGKILL)
        _ = try waitForProcess(broker.pid)
        peer.kill(SIGKILL)
        _ = try peer.wait()
        var disposed: Set<UInt64> = []
        while disposed != ids {
            let (message, _) = try serviceWait(service)
            if message.kind == .dispose { disposed.insert(message.messageID) }
        }

        let restarted = try spawnDaemon(socketPath: broker.socketPath, sharedMemoryDirectory: broker.directory + "/shm")
        defer { kill(restarted, SIGTERM); _ = try? waitForProcess(restarted) }
        // The listener takes its kernel socket back at its next accept: a connection waiting in
        // its backlog since before is not lost.
        let other = try Broker(socketPath: broker.socketPath)
        let accepted = Mutex<Bool>(false)
        let socketID = Mutex<UInt64>(0)
        startThread {
            if let connection = try? listener.socket.accept() {
                accepted.withLock { $0 = true }
                socketID.withLock { $0 = connection.id }
            }
        }
        _ = try waitUntilListening(other, "lib-echo")
        let caller = try Socket.connect(other, to: "lib-echo")
        _ = caller
        // The service is registered again, under a new id, and answers a new client.
        try waitUntilRegistered(other, "lib_svc")
        // The broker lists the registration as soon as it has made it; the service's own thread
        // records it once the answer is back: bounded wait for that.
        let recorded = monotonicNanoseconds() + 10_000_000_000
        while service.registrations < 2, monotonicNanoseconds() < recorded { usleep(1_000) }
        #expect(service.registrations == 2 && service.serviceID != firstID)
        let newClient = try CapsClient(other, name: "lib_svc")
        let id = try newClient.put(Array("hello".utf8))
        let (again, payload) = try serviceWait(service)
        #expect(again.kind == .request && again.messageID == id && payload == Array("hello".utf8))
        try service.reply(to: id, payload)
        #expect(try clientWait(newClient).1 == Array("hello".utf8))
        let deadline = monotonicNanoseconds() + 10_000_000_000
        while !accepted.withLock({ $0 }), monotonicNanoseconds() < deadline { usleep(2_000) }
        #expect(accepted.withLock { $0 })
        // The same kernel socket, taken back by the new broker.
        #expect(listener.socket.kernelDescriptor == kernelSocket && socketID.withLock { $0 } != 0)
    }

    @Test("a service driven by an event loop (poll its descriptor, get until EAGAIN) registers again after a broker restart, without spinning; one that cannot register again says so at every get and wait, never blocking")
    func eventLoopServiceRidesOutARestart() throws {
        let broker = try TestBroker()
        let owner = try Broker(socketPath: broker.socketPath, reconnect: .forever)
        let service = try CapsService(owner, name: "loop_svc", access: [.world])
        let fd = service.eventDescriptor
        kill(broker.pid, SIGKILL)
        _ = try waitForProcess(broker.pid)
        let restarted = try spawnDaemon(socketPath: broker.socketPath, sharedMemoryDirectory: broker.directory + "/shm")
        defer { kill(restarted, SIGTERM); _ = try? waitForProcess(restarted) }
        // The loop: poll, then get until EAGAIN, for 2 s; a new client's request is answered.
        let other = try Broker(socketPath: broker.socketPath)
        var wakeups = 0
        var answered = false
        var client: CapsClient?
        var requestID: UInt64 = 0
        let end = monotonicNanoseconds() + 2_000_000_000
        var buffer = [UInt8](repeating: 0, count: 64)
        while monotonicNanoseconds() < end {
            if client == nil, (try? other.listServices())?.contains(where: { $0.name == "loop_svc" }) == true {
                client = try CapsClient(other, name: "loop_svc")
                requestID = try client!.put(Array("hi".utf8))
            }
            var ready = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            guard poll(&ready, 1, 50) == 1 else { continue }
            wakeups += 1
            while true {
                let message: CapsServiceMessage
                do {
                    message = try buffer.withUnsafeMutableBytes { raw in
                        try Result { () throws(PatchbayError) -> CapsServiceMessage in try service.get(into: raw) }.get()
                    }
                } catch let error as PatchbayError where error.errno == .resourceTemporarilyUnavailable {
                    break
                }
                if message.kind == .request && message.messageID == requestID {
                    try service.reply(to: requestID, Array(buffer[0..<message.length]))
                    answered = true
                }
            }
        }
        #expect(answered)
        #expect(try clientWait(#require(client)).1 == Array("hi".utf8))
        #expect(service.registrations == 2)
        // Before: the descriptor stayed readable for good (about 400,000 wake-ups a second).
        #expect(wakeups < 200, "\(wakeups) wake-ups in 2 s")

        // A service whose broker does not come back within its policy: the failure is told, and
        // told again, by get and by wait alike.
        let once = try Broker(socketPath: broker.socketPath, reconnect: ReconnectPolicy(attempts: 2, initialDelay: 10))
        let doomed = try CapsService(once, name: "doomed_svc", access: [.world])
        _ = doomed.eventDescriptor
        // And one whose broker does not reconnect at all.
        let never = try CapsService(try Broker(socketPath: broker.socketPath, reconnect: .never), name: "never_svc", access: [.world])
        kill(restarted, SIGKILL)
        _ = try waitForProcess(restarted)
        var errors: [Errno] = []
        let deadline = monotonicNanoseconds() + 10_000_000_000
        while errors.isEmpty, monotonicNanoseconds() < deadline {
            do {
                _ = try buffer.withUnsafeMutableBytes { raw in
                    try Result { () throws(PatchbayError) -> CapsServiceMessage in try doomed.get(into: raw) }.get()
                }
            } catch let error as PatchbayError {
                if error.errno != .resourceTemporarilyUnavailable { errors.append(error.errno) }
            }
            usleep(5_000)
        }
        for _ in 0..<2 {
            do {
                _ = try buffer.withUnsafeMutableBytes { raw in
                    try Result { () throws(PatchbayError) -> CapsServiceMessage in try doomed.wait(into: raw) }.get()
                }
            } catch let error as PatchbayError { errors.append(error.errno) }
        }
        #expect(errors == [.connectionReset, .connectionReset, .connectionReset], "\(errors)")
        var neverErrors: [Errno] = []
        for _ in 0..<2 {
            do {
                _ = try buffer.withUnsafeMutableBytes { raw in
                    try Result { () throws(PatchbayError) -> CapsServiceMessage in try never.wait(into: raw) }.get()
                }
            } catch let error as PatchbayError { neverErrors.append(error.errno) }
        }
        #expect(neverErrors == [.connectionReset, .connectionReset], "\(neverErrors)")
    }

    @Test("a system broker started on a store whose journal and CAPS files an older broker left beside the objects moves them to the store's own state tmpfs and carries on from them: names, generations, ids", .enabled(if: geteuid() == 0, "needs root to mount"))
    func stateMovesToItsOwnFileSystem() throws {
        let broker = try TestBroker()
        let store = broker.directory + "/shm"
        do {
            let client = try broker.connect()
            try client.openSharedMemory("/older", options: .create).truncate(to: 4096)
            let service = try CapsService(client, name: "older")
            #expect(service.currentGeneration == 1)
        }
        try broker.stop()
        // A per-user broker keeps them in the store's own directory, as every broker once did.
        #expect(!isMountPoint(store + "/state"))
        for name in ["journal", "caps-ids", "caps-generations"] { #expect(access(store + "/" + name, F_OK) == 0, "\(name)") }
        let restarted = try spawnDaemon(socketPath: broker.socketPath, sharedMemoryDirectory: store, ["--system"])
        defer { kill(restarted, SIGTERM); _ = try? waitForProcess(restarted); withExtendedLifetime(broker) {} }
        #expect(isMountPoint(store + "/state"))
        #expect(access(store + "/journal", F_OK) != 0 && access(store + "/state/journal", F_OK) == 0)
        // The CAPS files stay as copies, marked as possibly behind while a broker runs.
        for name in ["caps-ids", "caps-generations"] {
            #expect(access(store + "/" + name, F_OK) != 0 && access(store + "/" + name + ".dirty", F_OK) == 0, "\(name)")
        }
        let client = try broker.connect()
        #expect(try client.statSharedMemory("/older").size == 4096)
        let service = try CapsService(client, name: "older")
        #expect(service.currentGeneration == 2)
        #expect(service.serviceID > 4096 && service.serviceID < 2 * 4096)  // past the block the older broker reserved
    }

    @Test("a system broker whose state tmpfs is lost between two runs (a service's private mount namespace, which systemctl stop ends) goes on from the copies of its CAPS generations and ids a clean stop leaves beside the store; after an unclean end (the copies marked as possibly behind) it goes well past them", .enabled(if: geteuid() == 0, "needs root to mount"))
    func capsCopiesOutliveTheState() throws {
        let broker = try TestBroker(["--system"])
        let store = broker.directory + "/shm"
        let client = try broker.connect()
        do { _ = try CapsService(client, name: "kept") }
        let second = try CapsService(client, name: "kept")
        #expect(second.currentGeneration == 2)
        let lastID = second.serviceID
        withExtendedLifetime(second) {}
        #expect(try broker.stop() == .exited(0))
        for name in ["caps-ids", "caps-generations"] {
            #expect(access(store + "/" + name, F_OK) == 0 && access(store + "/" + name + ".dirty", F_OK) != 0, "\(name)")
        }
        // The state goes with the namespace it was mounted in.
        try unmount(at: store + "/state")
        let clean = try spawnDaemon(socketPath: broker.socketPath, sharedMemoryDirectory: store, ["--system"])
        let third = try CapsService(try broker.connect(), name: "kept")
        #expect(third.currentGeneration == 3)  // exactly: the copies were whole
        #expect(third.serviceID > lastID && third.serviceID < CapsRegistryMargins.ids)
        let thirdID = third.serviceID
        withExtendedLifetime(third) {}
        // A crash, and the state lost too: the copies are the ones from before this run.
        kill(clean, SIGKILL)
        _ = try waitForProcess(clean)
        try unmount(at: store + "/state")
        let unclean = try spawnDaemon(socketPath: broker.socketPath, sharedMemoryDirectory: store, ["--system"])
        defer { kill(unclean, SIGTERM); _ = try? waitForProcess(unclean); withExtendedLifetime(broker) {} }
        let fourth = try CapsService(try broker.connect(), name: "kept")
        #expect(fourth.currentGeneration > CapsRegistryMargins.generations)
        #expect(fourth.serviceID > thirdID + CapsRegistryMargins.ids - 4096)
        let fresh = try CapsService(try broker.connect(), name: "never_seen")
        #expect(fresh.currentGeneration > CapsRegistryMargins.generations)  // no name's record could be missing
        withExtendedLifetime(fourth) {}
        withExtendedLifetime(fresh) {}
    }

    @Test("CAPS ids go on across a restart from caps-ids and end at 2^32 - 1 (a channel's is its messages' high half): past it, ENOSPC")
    func capsIDsRunOut() throws {
        let broker = try TestBroker()
        try broker.stop()
        // As if this broker's predecessors had handed out all ids but the last two.
        let store = broker.directory + "/shm"
        _ = mkdir(store, 0o700)
        try writeFile(store + "/caps-ids", "4294967294\n")
        let restarted = try spawnDaemon(socketPath: broker.socketPath, sharedMemoryDirectory: store)
        defer { kill(restarted, SIGTERM); _ = try? waitForProcess(restarted); withExtendedLifetime(broker) {} }
        let client = try broker.connect()
        let service = try CapsService(client, name: "last_ids", access: [.world])
        #expect(service.serviceID == 4_294_967_294)
        // The last id: its messages' ids are still its own.
        let caller = try CapsClient(client, name: "last_ids")
        let id = try caller.put(Array("last".utf8))
        #expect(id >> 32 == 4_294_967_295)
        let (request, bytes) = try serviceWait(service)
        #expect(request.messageID == id && request.channelID == 4_294_967_295 && bytes == Array("last".utf8))
        try service.reply(to: id, Array("answered".utf8))
        let (reply, answer) = try clientWait(caller)
        #expect(reply.messageID == id && answer == Array("answered".utf8))
        // None left: neither a connection nor a registration is made, and each says why.
        let refused = expectErrno(.noSpace) { () throws(PatchbayError) in _ = try CapsClient(client, name: "last_ids") }
        #expect(refused?.reason.contains("CAPS ids") == true, "\(String(describing: refused))")
        expectErrno(.noSpace) { () throws(PatchbayError) in _ = try CapsService(client, name: "one_more", access: [.world]) }
        // The service and its client are untouched.
        let again = try caller.put(Array("still".utf8))
        let (second, _) = try serviceWait(service)
        #expect(second.kind == .dispose && second.messageID == id)
        let (third, _) = try serviceWait(service)
        #expect(third.kind == .request && third.messageID == again)
    }

    func waitUntilRegistered(_ broker: Broker, _ name: String) throws {
        let deadline = monotonicNanoseconds() + 10_000_000_000
        while monotonicNanoseconds() < deadline {
            if try broker.listServices().contains(where: { $0.name == name }) { return }
            usleep(2_000)
        }
        throw PatchbayError(.timedOut, "\(name) never registered")
    }
}

/// A listener a thread can accept on.
final class ListenerBox: @unchecked Sendable {
    let socket: Socket
    init(_ socket: consuming Socket) { self.socket = socket }
}

/// What the departures test's watchdog thread needs: the service to cancel and the flag that
/// says the test is done.
private final class WatchdogBox: @unchecked Sendable {
    let service: CapsService
    let done = Atomic<Bool>(false)
    init(_ service: CapsService) { self.service = service }
}

/// Sends `text` on the connected datagram socket `socket` and returns the answer (at most 64
/// bytes), or says none came within 10 s.
func datagramExchange(_ text: String, on socket: CInt) -> String {
    let bytes = Array(text.utf8)
    _ = bytes.withUnsafeBytes { send(socket, $0.baseAddress, $0.count, 0) }
    var ready = pollfd(fd: socket, events: Int16(POLLIN), revents: 0)
    guard poll(&ready, 1, 10_000) == 1 else { return "(no answer within 10 s)" }
    var buffer = [UInt8](repeating: 0, count: 64)
    let count = buffer.withUnsafeMutableBytes { recv(socket, $0.baseAddress, $0.count, 0) }
    return String(decoding: buffer[0..<max(count, 0)], as: UTF8.self)
}
