// `patchbay metrics` and `patchbayd --metrics-file`: the Prometheus text exposition format, checked
// by a parser of its grammar here, and the values before and after real operations.
import Glibc
import Patchbay
import PatchbaySystem
import Testing

/// A parsed exposition: samples by name and label set, and each metric's type.
struct Exposition {
    var samples: [String: Double] = [:]
    var types: [String: String] = [:]

    /// Parses `text`, recording an issue for every line that breaks the format.
    init(_ text: String) {
        #expect(text.hasSuffix("\n"), "the exposition ends with a newline")
        var helped: Set<String> = []
        for line in text.split(separator: "\n", omittingEmptySubsequences: false).dropLast() {
            if line.hasPrefix("# HELP ") {
                let name = line.dropFirst(7).prefix { $0 != " " }
                #expect(Self.isName(name), "bad HELP name: \(line)")
                helped.insert(String(name))
            } else if line.hasPrefix("# TYPE ") {
                let parts = line.dropFirst(7).split(separator: " ")
                #expect(parts.count == 2 && ["counter", "gauge", "histogram", "summary", "untyped"].contains(String(parts[1])),
                        "bad TYPE line: \(line)")
                if parts.count == 2 {
                    #expect(types[String(parts[0])] == nil, "a second TYPE for \(parts[0])")
                    types[String(parts[0])] = String(parts[1])
                    #expect(helped.contains(String(parts[0])), "TYPE before HELP for \(parts[0])")
                }
            } else {
                let name = line.prefix { $0 != "{" && $0 != " " }
                #expect(Self.isName(name) && name.hasPrefix("patchbay_"), "bad metric name in: \(line)")
                var rest = line.dropFirst(name.count)
                var labels = ""
                if rest.first == "{" {
                    guard let close = rest.firstIndex(of: "}") else { Issue.record("unclosed labels: \(line)"); continue }
                    labels = String(rest[...close])
                    #expect(Self.areLabels(labels.dropFirst().dropLast()), "bad labels in: \(line)")
                    rest = rest[rest.index(after: close)...]
                }
                guard rest.first == " ", let value = Double(rest.dropFirst()) ?? (rest.dropFirst() == "+Inf" ? .infinity : nil) else {
                    Issue.record("bad value in: \(line)")
                    continue
                }
                let family = ["_bucket", "_sum", "_count"].first { name.hasSuffix($0) }.map { String(name.dropLast($0.count)) } ?? String(name)
                #expect(types[family] != nil || types[String(name)] != nil, "a sample before its TYPE: \(line)")
                #expect(samples[String(name) + labels] == nil, "a duplicate sample: \(line)")
                samples[String(name) + labels] = value
            }
        }
        // Counters end in _total (Prometheus naming).
        for (name, type) in types where type == "counter" { #expect(name.hasSuffix("_total"), "counter \(name) lacks _total") }
    }

    static func isName(_ name: Substring) -> Bool {
        guard let first = name.first, first.isLetter || first == "_" || first == ":" else { return false }
        return name.allSatisfy { $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "_" || $0 == ":") }
    }

    /// `name="value",...` with escaped values.
    static func areLabels(_ text: Substring) -> Bool {
        var rest = text
        while !rest.isEmpty {
            let name = rest.prefix { $0 != "=" }
            guard isName(name), rest.dropFirst(name.count).hasPrefix("=\"") else { return false }
            rest = rest.dropFirst(name.count + 2)
            var escaped = false
            var closed = false
            while let character = rest.first {
                rest = rest.dropFirst()
                if escaped { escaped = false; continue }
                if character == "\\" { escaped = true; continue }
                if character == "\"" { closed = true; break }
            }
            guard closed else { return false }
            if rest.first == "," { rest = rest.dropFirst() } else if !rest.isEmpty { return false }
        }
        return true
    }

    func value(_ key: String) -> Double { samples[key] ?? 0 }
}

@Suite("Metrics")
struct MetricsTests {
    @Test("patchbay metrics: valid exposition format; requests by operation and outcome, keys and gauges move with real operations")
    func countersAndGauges() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        let before = Exposition(try client.metrics())
        #expect(before.types["patchbay_requests_total"] == "counter")
        #expect(before.types["patchbay_request_duration_seconds"] == "histogram")
        #expect(before.types["patchbay_keys_outstanding"] == "gauge" && before.types["patchbay_clients"] == "gauge")

        let file = try openFile("/dev/null", flags: O_RDONLY)
        let keys = try (0..<3).map { _ in try client.share(file) }
        _ = try client.claim(keys[0])
        #expect(throws: PatchbayError.self) { _ = try client.claim(keys[0]) }  // ENOENT
        let shared = try client.share(file, timeout: .after(.milliseconds(1)))
        while (try? client.claim(shared)) != nil {}  // expires (ENOENT once it has)
        let other = try broker.connect()
        _ = try other.status()

        let after = Exposition(try client.metrics())
        let share = "patchbay_requests_total{subsystem=\"keys\",operation=\"share\",outcome=\"ok\"}"
        let claimed = "patchbay_requests_total{subsystem=\"keys\",operation=\"claim\",outcome=\"ok\"}"
        let missing = "patchbay_requests_total{subsystem=\"keys\",operation=\"claim\",outcome=\"ENOENT\"}"
        #expect(after.value(share) - before.value(share) == 4)
        #expect(after.value(claimed) - before.value(claimed) >= 1)
        #expect(after.value(missing) - before.value(missing) >= 2)
        #expect(after.value("patchbay_keys_shared_total") - before.value("patchbay_keys_shared_total") == 4)
        #expect(after.value("patchbay_keys_outstanding") == 2)
        #expect(after.value("patchbay_clients") == 2)
        #expect(after.types["patchbay_keys_expired_total"] == "counter")
        // The histogram: cumulative buckets, +Inf equal to the count, the count grown.
        let count = after.value("patchbay_request_duration_seconds_count")
        #expect(count > before.value("patchbay_request_duration_seconds_count"))
        #expect(after.value("patchbay_request_duration_seconds_bucket{le=\"+Inf\"}") == count)
        #expect(after.value("patchbay_request_duration_seconds_sum") > 0)
        #expect(after.value("patchbay_user_keys{uid=\"\(getuid())\"}") == 2)
        #expect(after.value("patchbay_broker_descriptors") > 0 && after.value("patchbay_resident_memory_bytes") > 0)
        // The CLI prints the same thing, and exits 69 with no broker.
        let printed = try run(patchbayCLI, ["metrics"], environment: broker.environment)
        #expect(printed.termination == .exited(0) && Exposition(printed.standardOutput).value("patchbay_keys_outstanding") == 2)
        let none = try run(patchbayCLI, ["metrics"], environment: ["PATCHBAY_SOCKET": broker.directory + "/nothing.sock"])
        #expect(none.termination == .exited(69) && none.standardOutput.isEmpty)
    }

    @Test("CAPS messages per service from the ring words, kept after a client leaves; shared memory objects created")
    func capsAndSharedMemoryCounters() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        let service = try CapsService(client, name: "counted", access: [.world])
        let key = "patchbay_caps_messages_total{service=\"counted\",uid=\"\(geteuid())\",direction="
        do {
            let port = try CapsClient(client, name: "counted")
            for index in 0..<5 {
                let id = try port.put(Array("call \(index)".utf8))
                let (request, _) = try serviceWait(service)
                #expect(request.messageID == id)
                try service.reply(to: id, Array("ok".utf8))
                _ = try clientWait(port)
                let (dispose, _) = try serviceWait(service)
                #expect(dispose.kind == .dispose)
            }
            let live = Exposition(try client.metrics())
            #expect(live.samples[key + "\"to_service\"}"] == 5, "5 REQUESTs consumed (DISPOSEs are the reply head)")
            #expect(live.samples[key + "\"to_client\"}"] == 5, "5 REPLYs published")
        }
        // The client is gone (its port closed): the service's counts stay.
        let deadline = monotonicNanoseconds() + 30_000_000_000
        while try client.listServices().first(where: { $0.name == "counted" })?.clients != 0, monotonicNanoseconds() < deadline {
            usleep(2_000)
        }
        let after = Exposition(try client.metrics())
        #expect(after.samples[key + "\"to_service\"}"] == 5 && after.samples[key + "\"to_client\"}"] == 5)
        #expect(after.types["patchbay_caps_messages_total"] == "counter")

        let created = after.samples["patchbay_shm_objects_created_total"] ?? -1
        _ = try client.openSharedMemory("/counted-1", options: .create)
        _ = try client.openSharedMemory("/counted-2", options: .create)
        _ = try client.openSharedMemory("/counted-1", options: .create)  // exists: not created again
        #expect(Exposition(try client.metrics()).samples["patchbay_shm_objects_created_total"] == created + 2)
    }

    @Test("patchbayd --metrics-file writes the exposition atomically and keeps it current")
    func metricsFile() throws {
        let directory = makeTemporaryDirectory()
        defer { removeTree(directory) }
        let path = directory + "/patchbay.prom"
        let broker = try TestBroker(["--metrics-file", path, "--metrics-interval", "20ms"])
        let client = try broker.connect()
        _ = try client.share(try openFile("/dev/null", flags: O_RDONLY))
        // Bounded: the writer runs every 20 ms; wait until it has seen the key.
        let deadline = monotonicNanoseconds() + 10_000_000_000
        var seen = 0.0
        while seen != 1, monotonicNanoseconds() < deadline {
            if let file = try? openFile(path, flags: O_RDONLY), let bytes = try? file.readToEnd() {
                seen = Exposition(String(decoding: bytes, as: UTF8.self)).value("patchbay_keys_outstanding")
            }
            if seen != 1 { usleep(5_000) }
        }
        #expect(seen == 1)
        let relative = try run(patchbayDaemon, ["--socket", directory + "/x.sock", "--metrics-file", "relative.prom"])
        #expect(relative.termination == .exited(64))
    }
}

@Suite("Two users: metrics", .enabled(if: twoUsersAvailable, "needs root, setpriv and a nobody user that can run the products"))
struct TwoUserMetricsTests {
    @Test("on a system broker, nobody's metrics carry nobody's per-uid rows only; root's carry every uid")
    func perUserRowsAreOwn() throws {
        let broker = try TestBroker(["--system"])
        chmod(broker.directory, 0o755)
        let root = try broker.connect()
        _ = try root.share(try openFile("/dev/null", flags: O_RDONLY))
        // Root's CAPS service and its traffic: root sees its counts, nobody does not.
        let service = try CapsService(root, name: "roots_own", access: [.world])
        let port = try CapsClient(root, name: "roots_own")
        let id = try port.put([1])
        _ = try serviceWait(service)
        try service.reply(to: id, [2])
        _ = try clientWait(port)
        let seen = try runAsOtherUser(["metrics"], environment: broker.environment)
        #expect(seen.termination == .exited(0), "\(seen.standardError)")
        let theirs = Exposition(seen.standardOutput)
        #expect(theirs.value("patchbay_user_clients{uid=\"\(otherUID)\"}") == 1)
        #expect(!seen.standardOutput.contains("uid=\"0\""), "nobody saw root's rows")
        #expect(!seen.standardOutput.contains("roots_own"), "nobody saw root's service traffic")
        let all = Exposition(try root.metrics())
        #expect(all.value("patchbay_user_keys{uid=\"0\"}") == 1)
        #expect(all.value("patchbay_caps_messages_total{service=\"roots_own\",uid=\"0\",direction=\"to_client\"}") == 1)
    }

    @Test("nobody, a client of root's service, writes the service's words of its channel's header (request head, reply tail) near 2^62: root's per-service message counts are the service's own, unchanged, before and after nobody leaves")
    func clientCannotInflateServiceCounts() throws {
        let broker = try TestBroker(["--system"])
        chmod(broker.directory, 0o755)
        let service = try Child(patchbayCLI, ["caps", "serve", "roots_counted", "--allow", "world", "--echo"], environment: broker.environment)
        defer { service.kill(SIGTERM); _ = try? service.wait() }
        let root = try broker.connect()
        let port = try CapsClient(root, name: "roots_counted", waitForService: true)
        for index in 0..<2 { #expect(try port.call([UInt8(index)]) == [UInt8(index)]) }
        let attacker = try nobodyPeer(["caps-scribble-service-words", "roots_counted"], broker)
        #expect(try attacker.readLine() == "scribbled")
        let key = "patchbay_caps_messages_total{service=\"roots_counted\",uid=\"0\",direction="
        func counts() throws -> [Double?] {
            let metrics = Exposition(try root.metrics())
            return [metrics.samples[key + "\"to_service\"}"], metrics.samples[key + "\"to_client\"}"]]
        }
        #expect(try counts() == [3, 3], "2 of root's requests and nobody's one, consumed and answered")
        attacker.closeInput()
        #expect(try attacker.wait() == .exited(0))
        let deadline = monotonicNanoseconds() + 10_000_000_000
        while try root.listServices().first(where: { $0.name == "roots_counted" })?.clients != 1, monotonicNanoseconds() < deadline {
            usleep(2_000)
        }
        #expect(try counts() == [3, 3])
    }

    @Test("a system broker's --metrics-file (every uid's rows) is 0600 unless told otherwise: nobody cannot read it")
    func metricsFileIsPrivate() throws {
        let directory = makeTemporaryDirectory()
        defer { removeTree(directory) }
        chmod(directory, 0o755)
        // A temporary file an earlier run left, world-readable: it must not be written into.
        let path = directory + "/patchbay.prom"
        let stale = try openFile(path + ".tmp", flags: O_WRONLY | O_CREAT, mode: 0o644)
        fchmod(stale.rawValue, 0o644)
        let broker = try TestBroker(["--system", "--metrics-file", path, "--metrics-interval", "20ms"])
        chmod(broker.directory, 0o755)
        let root = try broker.connect()
        _ = try root.share(try openFile("/dev/null", flags: O_RDONLY))
        let deadline = monotonicNanoseconds() + 10_000_000_000
        var status = stat()
        while stat(path, &status) != 0, monotonicNanoseconds() < deadline { usleep(5_000) }
        #expect(status.st_mode & 0o7777 == 0o600)
        var staleStatus = stat()
        #expect(fstat(stale.rawValue, &staleStatus) == 0 && staleStatus.st_size == 0, "the stale temporary file was written into")
        let read = try run("/usr/bin/setpriv", ["--reuid", "65534", "--regid", "65534", "--clear-groups", "/bin/cat", path], environment: [:])
        #expect(read.termination != .exited(0) && read.standardOutput.isEmpty && read.standardError.contains("Permission denied"))

        let shared = directory + "/shared.prom"
        let open = try TestBroker(["--system", "--metrics-file", shared, "--metrics-file-mode", "0640", "--metrics-interval", "20ms"])
        _ = try open.connect()
        while stat(shared, &status) != 0, monotonicNanoseconds() < deadline { usleep(5_000) }
        #expect(status.st_mode & 0o7777 == 0o640)

        for bad in ["0755", "4600", "rw", "-1"] {
            let refused = try run(patchbayDaemon, ["--socket", directory + "/x.sock", "--metrics-file", directory + "/y.prom",
                                                   "--metrics-file-mode", bad])
            #expect(refused.termination == .exited(64), "\(bad)")
        }
    }
}
