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
        let waitDeadline = monotonicNanoseconds() + 5_000_000_000
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
}
