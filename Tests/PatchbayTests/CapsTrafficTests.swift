// `patchbay caps top` and `Broker.capsTraffic()`: each channel's traffic, read by the broker from
// the channel headers' ring words, per service and client; and who may see which channels.
import Glibc
import Patchbay
import PatchbaySystem
import Testing

@Suite("CAPS traffic")
struct CapsTrafficTests {
    @Test("each channel's ring words, per client: requests, DISPOSEs and replies put and taken; the client's pid and uid; caps top")
    func trafficPerChannel() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        let service = try CapsService(client, name: "traffic.echo", access: [.world])
        let busy = try CapsClient(client, name: "traffic.echo")
        let idle = try CapsClient(client, name: "traffic.echo")
        for index in 0..<4 {
            let id = try busy.put(Array("call \(index)".utf8))
            let (request, payload) = try serviceWait(service)
            #expect(request.messageID == id)
            try service.reply(to: id, payload)
            _ = try clientWait(busy)
            let (dispose, _) = try serviceWait(service)
            #expect(dispose.kind == .dispose && dispose.messageID == id)
        }
        // One request put and not yet taken.
        _ = try busy.put(Array("waiting".utf8))
        let channels = try client.capsTraffic().filter { $0.service == "traffic.echo" }
        #expect(channels.count == 2)
        let busyRow = channels.first { $0.channelID == busy.channelID }
        #expect(busyRow?.requestsPut == 5, "4 REQUESTs, 1 REQUEST waiting (DISPOSEs are the reply head)")
        #expect(busyRow?.requestsTaken == 4 && busyRow?.repliesPut == 4 && busyRow?.repliesTaken == 4)
        #expect(busyRow?.clientPID == getpid() && busyRow?.clientUID == geteuid() && busyRow?.servicePID == getpid())
        let idleRow = channels.first { $0.channelID == idle.channelID }
        #expect(idleRow?.requestsPut == 0 && idleRow?.repliesPut == 0)

        // The command line, twice 50 ms apart: the second refresh has rates.
        let top = try run(patchbayCLI, ["caps", "top", "--count", "2", "--interval", "50ms", "--json"], environment: broker.environment)
        #expect(top.termination == .exited(0), "\(top.standardError)")
        let lines = top.standardOutput.split(separator: "\n").filter { $0.contains("\"traffic.echo\"") }
        #expect(lines.count == 4, "two channels, two refreshes: \(top.standardOutput)")
        #expect(lines.contains { $0.contains("\"channel\": \(busy.channelID)") && $0.contains("\"requests_waiting\"") == false
                                 && $0.contains("\"requests_put\": 5") && $0.contains("\"requests_per_second\": null") })
        #expect(lines.contains { $0.contains("\"refresh\": 1") && $0.contains("\"requests_per_second\": 0") })
        let table = try run(patchbayCLI, ["caps", "top", "--count", "1"], environment: broker.environment)
        #expect(table.standardOutput.hasPrefix("SERVICE") && table.standardOutput.contains("traffic.echo"))
        let bad = try run(patchbayCLI, ["caps", "top", "--interval", "soon"], environment: broker.environment)
        #expect(bad.termination == .exited(64) && bad.standardError.contains("not a duration"))
    }

    @Test("on a system broker, nobody sees neither root's channels nor their traffic; root sees them")
    func trafficIsOwn() throws {
        try #require(twoUsersAvailable)
        let broker = try TestBroker(["--system"])
        chmod(broker.directory, 0o755)
        let root = try broker.connect()
        let service = try CapsService(root, name: "roots.traffic", access: [.world])
        let port = try CapsClient(root, name: "roots.traffic")
        let id = try port.put([1])
        _ = try serviceWait(service)
        try service.reply(to: id, [2])
        _ = try clientWait(port)
        let seen = try runAsOtherUser(["caps", "top", "--count", "1", "--json"], environment: broker.environment)
        #expect(seen.termination == .exited(0), "\(seen.standardError)")
        #expect(!seen.standardOutput.contains("roots.traffic"), "nobody saw root's channel: \(seen.standardOutput)")
        #expect(try root.capsTraffic().contains { $0.service == "roots.traffic" && $0.repliesPut == 1 })
    }
}
