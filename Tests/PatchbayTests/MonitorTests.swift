// `patchbay monitor` and `BrokerMonitor`: one event per answered request, with the caller's pid,
// uid and command, the object, the outcome; filters; a monitor that does not read; two users.
import Glibc
import Patchbay
import PatchbaySystem
import Testing

/// How many monitors the broker has accepted so far (its metrics).
func monitorsAccepted(_ broker: Broker) throws -> Int {
    let prefix = "patchbay_requests_total{subsystem=\"broker\",operation=\"monitor\",outcome=\"ok\"} "
    return try broker.metrics().split(separator: "\n").first { $0.hasPrefix(prefix) }.flatMap { Int($0.dropFirst(prefix.count)) } ?? 0
}

/// Waits (at most 5 s) until the broker has accepted `count` monitors.
func waitForMonitors(_ broker: Broker, _ count: Int) throws {
    let deadline = monotonicNanoseconds() + 5_000_000_000
    while try monitorsAccepted(broker) < count, monotonicNanoseconds() < deadline { usleep(2_000) }
}

/// Events until `want` holds for one of them (returned with all seen), or 5 s without it.
private func events(_ monitor: BrokerMonitor, until want: (MonitorEvent) -> Bool) throws -> (found: MonitorEvent?, seen: [MonitorEvent]) {
    var seen: [MonitorEvent] = []
    let deadline = monotonicNanoseconds() + 5_000_000_000
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
        #expect(claims.found != nil && claims.seen.contains { $0.operation == "claim" && $0.outcome == "ok" })
        #expect(!claims.seen.contains { $0.object.contains(key) }, "a key's text never shows")

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
}
