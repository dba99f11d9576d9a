import ArgumentParser
import Glibc
import Patchbay
import PatchbaySystem
import SystemPackage

/// Prints `patchbay: <command>: <ERRNO>: <sentence>` to stderr and exits with status 1.
func fail(_ command: String, _ error: PatchbayError) -> Never {
    writeStandardError("patchbay: \(command): \(error.errno.name): \(error.reason)\n")
    exit(1)
}

func fail(_ command: String, _ errno: Errno, _ reason: String) -> Never {
    fail(command, PatchbayError(errno, reason))
}

func writeStandardError(_ text: String) {
    var bytes = Array(text.utf8)
    _ = bytes.withUnsafeMutableBytes { write(2, $0.baseAddress, $0.count) }
}

/// Writes to stdout unbuffered, so output interleaves correctly with child processes. A failed
/// write fails the command: `key=$(patchbay share ...)` must never get half a key and status 0.
func writeStandardOutput(_ text: String) {
    writeStandardOutput(bytes: Array(text.utf8))
}

/// Writes raw bytes to stdout, failing the command if stdout cannot take them.
func writeStandardOutput(bytes: [UInt8]) {
    var offset = 0
    while offset < bytes.count {
        let n = bytes[offset...].withUnsafeBytes { write(1, $0.baseAddress, $0.count) }
        if n < 0 && errno == EINTR { continue }
        if n <= 0 { fail("output", n < 0 ? Errno.current : .ioError, "writing to stdout failed") }
        offset += n
    }
}

/// A duration as people write it: `500ms`, `30s`, `5m`, `1h`, `250us`; or `never`.
enum DurationText {
    static func parse(_ text: String) throws(PatchbayError) -> Broker.Expiry {
        if text == "never" { return .never }
        let units: [(String, Double)] = [("ns", 1e-9), ("us", 1e-6), ("µs", 1e-6), ("ms", 1e-3), ("s", 1), ("m", 60), ("h", 3600)]
        for (suffix, scale) in units where text.hasSuffix(suffix) {
            let number = String(text.dropLast(suffix.count))
            if let value = Double(number), value.isFinite {
                guard value > 0 else {
                    throw PatchbayError(.invalidArgument, "the timeout must be positive (or never); got \(text)")
                }
                // Round up: a positive duration never becomes zero.
                return .after(.nanoseconds(Int64(min((value * scale * 1e9).rounded(.up), 9.2e18))))
            }
        }
        throw PatchbayError(.invalidArgument,
                            "\"\(text)\" is not a duration; write it like 500ms, 30s, 5m, 1h or never")
    }
}

/// Minimal JSON writing for `--json` output (numbers, strings, objects, arrays).
enum JSON {
    static func string(_ value: String) -> String {
        var out = "\""
        for scalar in value.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            case _ where scalar.value < 0x20: out += "\\u" + String(repeating: "0", count: 4 - String(scalar.value, radix: 16).count) + String(scalar.value, radix: 16)
            default: out.unicodeScalars.append(scalar)
            }
        }
        return out + "\""
    }

    static func object(_ fields: [(String, String)]) -> String {
        "{" + fields.map { "\(string($0.0)): \($0.1)" }.joined(separator: ", ") + "}"
    }

    static func array(_ items: [String]) -> String {
        "[" + items.joined(separator: ", ") + "]"
    }
}

/// Formats nanoseconds for people: `850 ns`, `12.3 µs`, `4.56 ms`, `1.2 s`, `3m 20s`.
func formatDuration(nanoseconds: UInt64) -> String {
    let value = Double(nanoseconds)
    switch nanoseconds {
    case ..<1_000: return "\(nanoseconds) ns"
    case ..<1_000_000: return String(format1(value / 1e3)) + " µs"
    case ..<1_000_000_000: return String(format1(value / 1e6)) + " ms"
    case ..<60_000_000_000: return String(format1(value / 1e9)) + " s"
    default:
        let seconds = nanoseconds / 1_000_000_000
        if seconds < 3600 { return "\(seconds / 60)m \(seconds % 60)s" }
        return "\(seconds / 3600)h \(seconds % 3600 / 60)m"
    }
}

private func format1(_ value: Double) -> String {
    let rounded = (value * 10).rounded() / 10
    return rounded == rounded.rounded() && rounded >= 100 ? String(Int(rounded)) : String(rounded)
}
