// The load command, short form: the full run (1,000 clients, 30 s) is in docs/RELIABILITY.md.
// Checks outcomes only (no errors, every operation kind ran, the slow client held back by
// back-pressure rather than growing the broker, nothing left behind); the latencies it prints are
// not asserted.
import Testing

@Suite("Load")
struct LoadTests {
    @Test("patchbay load: 200 clients of mixed operations and one that never reads; no errors, the slow one held back")
    func shortLoad() throws {
        // Two seconds: every client must get through each kind once, even on a loaded machine.
        let result = try run(patchbayCLI, ["load", "--clients", "200", "--threads", "2", "--seconds", "2"])
        #expect(result.termination == .exited(0), "\(result.standardOutput)\(result.standardError)")
        #expect(result.standardOutput.contains("errors: none"), "\(result.standardOutput)")
        #expect(result.standardOutput.contains("the broker stopped reading it"), "\(result.standardOutput)")
        // The observer and the slow client, which is not cut off: it is only ever made to wait.
        #expect(result.standardOutput.contains("broker after the run: 2 clients, 0 keys outstanding"), "\(result.standardOutput)")
        // Every operation kind ran, on every thread's connections.
        for label in ["status", "share + claim", "shm create + unlink", "/net socket open + close"] {
            let line = result.standardOutput.split(separator: "\n").first { $0.hasPrefix(label + " ") }
            let count = line.flatMap { $0.split(separator: " ", omittingEmptySubsequences: true).dropFirst(label.split(separator: " ").count).first }
            #expect((count.flatMap { Int($0) } ?? 0) >= 200, "\(label): \(line ?? "missing")")
        }
    }

    @Test("patchbay load --hostile: one uid floods the broker with all it can make it hold; the honest client of another uid sees no error and the broker gives everything back")
    func hostileLoad() throws {
        let result = try run(patchbayCLI, ["load", "--hostile", "--seconds", "1", "--clients", "20000"])
        #expect(result.termination == .exited(0), "\(result.standardOutput)\(result.standardError)")
        #expect(result.standardOutput.contains("honest client errors: none"), "\(result.standardOutput)")
        // The hostile uid was stopped by its share of the broker, not by the broker running out.
        #expect(result.standardOutput.contains("refused: EDQUOT"), "\(result.standardOutput)")
        // Every descriptor it made the broker hold is back once it is gone, but for what outlives
        // it by design: the one file its never-expiring keys hold (keys of one open file share a
        // descriptor) and its shared memory store's directory.
        let broker = result.standardOutput.split(separator: "\n").first { $0.hasPrefix("broker: ") } ?? ""
        let counts = broker.split(separator: ";").last?.split(separator: " ").compactMap { Int($0) } ?? []
        #expect(counts.count == 3 && counts[2] <= counts[0] + 3, "\(broker)")
    }
}
