// What the broker has done since it started, and what it holds now, in the Prometheus text
// exposition format (`patchbay metrics`, `patchbayd --metrics-file`).
//
// Counting costs the loop a dictionary increment per reply and one clock read per request:
// every reply and every error leaves through `SessionTable`, which counts it by opcode and
// outcome (the errno's name, or "ok"); the loop times each request's synchronous handling into
// a histogram. The rest (gauges) is read from the tables when someone asks.

import Glibc
import PatchbayProtocol
import PatchbaySystem

/// Cumulative counters since the broker started.
final class BrokerMetrics {
    struct Outcome: Hashable {
        let opcode: UInt16
        /// 0: answered; otherwise the errno of the error reply.
        let errno: Int32
    }

    private(set) var requests: [Outcome: UInt64] = [:]
    private(set) var keysExpired: UInt64 = 0
    /// Upper bounds, in seconds, of the broker's time per request.
    static let bounds: [Double] = [1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 5e-3, 2.5e-2, 1e-1]
    private(set) var buckets = [UInt64](repeating: 0, count: BrokerMetrics.bounds.count)
    private(set) var durationCount: UInt64 = 0
    private(set) var durationSum: Double = 0

    func count(opcode: UInt16, errno: Int32) {
        requests[Outcome(opcode: opcode, errno: errno), default: 0] &+= 1
    }

    func expired(_ count: Int) {
        keysExpired &+= UInt64(count)
    }

    func observe(nanoseconds: UInt64) {
        let seconds = Double(nanoseconds) / 1e9
        durationCount &+= 1
        durationSum += seconds
        for (index, bound) in Self.bounds.enumerated() where seconds <= bound {
            buckets[index] &+= 1
            break
        }
    }

    /// The answered requests of `opcode`.
    func answered(_ opcode: Opcode) -> UInt64 { requests[Outcome(opcode: opcode.rawValue, errno: 0)] ?? 0 }
}

/// Builds the exposition text: `# HELP`, `# TYPE`, then the samples, metric by metric.
struct MetricsText {
    private(set) var text = ""

    mutating func metric(_ name: String, _ type: String, _ help: String, _ samples: [(labels: String, value: String)]) {
        text += "# HELP \(name) \(help)\n# TYPE \(name) \(type)\n"
        for sample in samples { text += name + sample.labels + " " + sample.value + "\n" }
    }

    mutating func histogram(_ name: String, _ help: String, buckets: [(labels: String, value: String)], sum: Double, count: UInt64) {
        text += "# HELP \(name) \(help)\n# TYPE \(name) histogram\n"
        for bucket in buckets { text += name + "_bucket" + bucket.labels + " " + bucket.value + "\n" }
        text += name + "_sum " + "\(sum)" + "\n"
        text += name + "_count " + "\(count)" + "\n"
    }

    mutating func gauge(_ name: String, _ help: String, _ value: some BinaryInteger) {
        metric(name, "gauge", help, [("", "\(value)")])
    }

    /// A label set: values escaped as the format wants (backslash, quote, newline).
    static func labels(_ pairs: KeyValuePairs<String, String>) -> String {
        let inside = pairs.map { key, value in
            let escaped = value.replacingCharacters { $0 == "\\" ? "\\\\" : $0 == "\"" ? "\\\"" : $0 == "\n" ? "\\n" : String($0) }
            return "\(key)=\"\(escaped)\""
        }
        return "{" + inside.joined(separator: ",") + "}"
    }

    /// A sample value as the format writes floating-point numbers.
    static func number(_ value: Double) -> String {
        value == value.rounded() && abs(value) < 1e15 ? String(Int64(value)) : "\(value)"
    }
}

extension String {
    fileprivate func replacingCharacters(_ transform: (Character) -> String) -> String {
        var result = ""
        for character in self { result += transform(character) }
        return result
    }
}

extension Subsystem {
    /// The `subsystem` label.
    var label: String {
        switch self {
        case .broker: "broker"
        case .keys: "keys"
        case .namespace: "namespace"
        case .sharedMemory: "shm"
        case .net: "net"
        case .caps: "caps"
        }
    }
}

/// The broker's resident memory in bytes (from /proc/self/statm), or nil.
func residentMemoryBytes() -> Int? {
    guard let file = try? openFile("/proc/self/statm", flags: O_RDONLY), let bytes = try? file.readToEnd(limit: 256) else { return nil }
    let fields = String(decoding: bytes, as: UTF8.self).split(separator: " ")
    guard fields.count > 1, let pages = Int(fields[1]) else { return nil }
    return pages * pageSize
}
