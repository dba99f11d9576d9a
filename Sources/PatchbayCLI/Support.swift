import ArgumentParser
import Glibc
import Patchbay
import PatchbaySystem
import SystemPackage

/// The exit statuses of `patchbay` and `patchbayd` (sysexits where one fits; README has the table).
enum ExitStatus {
    /// What was asked did not happen: the broker, the kernel or the peer said no (the errno says
    /// why).
    static let failed: Int32 = 1
    /// The command line is wrong: an unknown option, a missing argument, a value that does not
    /// parse (`EX_USAGE`).
    static let usage: Int32 = 64
    /// No broker could be reached or started (`EX_UNAVAILABLE`).
    static let unavailable: Int32 = 69
    /// The program to run (`claim -- COMMAND`, `--exec`) does not exist or cannot be run.
    static let cannotRun: Int32 = 127
}

/// Prints `patchbay: <command>: <ERRNO>: <sentence>` to stderr and exits (status 1 unless told).
func fail(_ command: String, _ error: PatchbayError, status: Int32 = ExitStatus.failed) -> Never {
    writeStandardError("patchbay: \(command): \(error.errno.name): \(error.reason)\n")
    exit(status)
}

func fail(_ command: String, _ errno: Errno, _ reason: String, status: Int32 = ExitStatus.failed) -> Never {
    fail(command, PatchbayError(errno, reason), status: status)
}

/// A value on the command line that does not parse: `EINVAL`, exit status 64.
func failUsage(_ command: String, _ reason: String) -> Never {
    fail(command, .invalidArgument, reason, status: ExitStatus.usage)
}

/// The program a command would run, resolved through `PATH` and checked to be executable, or
/// the command fails at once (status 127) rather than at its first use.
func resolveProgram(_ name: String, for command: String) -> String {
    let path = name.contains("/") ? name : (searchPath(name) ?? name)
    var info = stat()
    guard stat(path, &info) == 0 else {
        fail(command, .noSuchFileOrDirectory, "cannot run \(name): no such program", status: ExitStatus.cannotRun)
    }
    guard info.st_mode & S_IFMT != S_IFDIR, access(path, X_OK) == 0 else {
        fail(command, .permissionDenied, "cannot run \(name): not an executable file", status: ExitStatus.cannotRun)
    }
    return path
}

func writeStandardError(_ text: String) {
    var bytes = Array(text.utf8)
    _ = bytes.withUnsafeMutableBytes { write(2, $0.baseAddress, $0.count) }
}

/// Writes to stdout unbuffered, so output interleaves correctly with child processes. A failed
/// write fails the command: `key=$(patchbay share ...)` must never get half a key and status 0.
/// `text` as it may go to a terminal: control characters (C0, DEL, C1), with which a name or a
/// command another user chose could move the cursor, retitle the window or forge lines, shown as
/// `\xNN` or `\u{NNNN}`, and `\` as `\\` so that nothing reads as one of those.
func terminalSafe(_ text: String) -> String {
    var out = ""
    for scalar in text.unicodeScalars {
        switch scalar.value {
        case 0x5C: out += "\\\\"
        case 0..<0x20, 0x7F: out += "\\x" + String(scalar.value, radix: 16).leftPadded(2)
        case 0x80..<0xA0: out += "\\u{" + String(scalar.value, radix: 16) + "}"
        // Characters that show nothing, or move or reorder what follows, and spaces that are
        // not U+0020: another user's name must not pass for yours ("/rootobj" + U+200B) nor
        // rearrange the row it is printed in (U+202E).
        case _ where isDeceptiveScalar(scalar): out += "\\u{" + String(scalar.value, radix: 16) + "}"
        default: out.unicodeScalars.append(scalar)
        }
    }
    return out
}

/// Format characters (zero-width, direction overrides and isolates, the BOM), other characters
/// meant to be invisible (Unicode's default-ignorable code points: the Hangul fillers, variation
/// selectors, the combining grapheme joiner), the blank Braille pattern, line and paragraph
/// separators, and space separators other than U+0020.
private func isDeceptiveScalar(_ scalar: Unicode.Scalar) -> Bool {
    if scalar.properties.isDefaultIgnorableCodePoint || scalar.value == 0x2800 { return true }
    switch scalar.properties.generalCategory {
    case .format, .lineSeparator, .paragraphSeparator: return true
    case .spaceSeparator: return scalar.value != 0x20
    default: return false
    }
}

extension String {
    fileprivate func leftPadded(_ width: Int) -> String {
        count >= width ? self : String(repeating: "0", count: width - count) + self
    }
}

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
            if let value = Double(number), value.isFinite, number.first.map({ $0.isNumber || $0 == "." || $0 == "-" }) == true {
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

    /// `parse`, or the command fails as a usage error (status 64).
    static func parse(_ text: String, for command: String) -> Broker.Expiry {
        do { return try parse(text) } catch { failUsage(command, error.reason) }
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

/// A user named by uid or by name (`getpwnam`), or the command fails as a usage error.
func userID(_ text: String, for command: String) -> UInt32 {
    if let uid = UInt32(text) { return uid }
    guard !text.isEmpty, let entry = getpwnam(text) else { failUsage(command, "\"\(text)\" is neither a uid nor a user name") }
    return entry.pointee.pw_uid
}

/// A group named by gid or by name (`getgrnam`), or the command fails as a usage error.
func groupID(_ text: String, for command: String) -> UInt32 {
    if let gid = UInt32(text) { return gid }
    guard !text.isEmpty, let entry = getgrnam(text) else { failUsage(command, "\"\(text)\" is neither a gid nor a group name") }
    return entry.pointee.gr_gid
}
