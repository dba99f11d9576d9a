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
    if let problem = unrunnable(path) {
        fail(command, problem.errno, "cannot run \(name): \(problem.reason)", status: ExitStatus.cannotRun)
    }
    return path
}

/// What would make `execve` of an executable file fail, found by reading its start as the kernel
/// does: a script's interpreter (`#!`) that is missing or not executable, an ELF program's loader
/// (`PT_INTERP`) that is missing, or neither a script nor an ELF file (`ENOEXEC`: the library
/// starts programs with `posix_spawn`, which does not hand such a file to a shell). Nil when it
/// looks runnable (it may still fail: an ELF file for another machine).
func unrunnable(_ path: String) -> PatchbayError? {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { return nil }  // (execute-only: the kernel decides)
    defer { close(fd) }
    var head = [UInt8](repeating: 0, count: 256)
    let count = head.withUnsafeMutableBytes { pread(fd, $0.baseAddress, $0.count, 0) }
    guard count > 0 else { return PatchbayError(.execFormatError, "an empty file is not a program") }
    head.removeSubrange(count...)
    if head.starts(with: Array("#!".utf8)) {
        let line = head.dropFirst(2).prefix { $0 != UInt8(ascii: "\n") }
        let words = line.split(whereSeparator: { $0 == UInt8(ascii: " ") || $0 == UInt8(ascii: "\t") })
        guard let first = words.first else { return PatchbayError(.execFormatError, "its #! line names no interpreter") }
        let interpreter = String(decoding: first, as: UTF8.self)
        var info = stat()
        guard stat(interpreter, &info) == 0 else {
            return PatchbayError(.noSuchFileOrDirectory, "its interpreter \(interpreter) does not exist")
        }
        guard info.st_mode & S_IFMT == S_IFREG, access(interpreter, X_OK) == 0 else {
            return PatchbayError(.permissionDenied, "its interpreter \(interpreter) is not an executable file")
        }
        return nil
    }
    guard head.starts(with: [0x7F, 0x45, 0x4C, 0x46]) else {
        return PatchbayError(.execFormatError, "neither a script (#!) nor an ELF program")
    }
    // ELF64, little-endian (this machine's): the program headers, for a PT_INTERP naming the loader.
    guard head.count >= 64, head[4] == 2, head[5] == 1 else { return nil }
    func integer(_ bytes: ArraySlice<UInt8>) -> Int { bytes.reversed().reduce(0) { $0 << 8 | Int($1) } }
    let table = integer(head[0x20..<0x28]), entrySize = integer(head[0x36..<0x38]), entries = integer(head[0x38..<0x3A])
    guard entrySize >= 56, entries < 256, table > 0 else { return nil }
    var headers = [UInt8](repeating: 0, count: entrySize * entries)
    guard headers.withUnsafeMutableBytes({ pread(fd, $0.baseAddress, $0.count, off_t(table)) }) == headers.count else { return nil }
    for index in 0..<entries {
        let entry = headers[(index * entrySize)..<(index * entrySize + 56)]
        guard integer(entry.prefix(4)) == 3 else { continue }  // PT_INTERP
        let offset = integer(entry.dropFirst(8).prefix(8)), size = integer(entry.dropFirst(32).prefix(8))
        guard size > 1, size < 4096 else { return nil }
        var name = [UInt8](repeating: 0, count: size)
        guard name.withUnsafeMutableBytes({ pread(fd, $0.baseAddress, $0.count, off_t(offset)) }) == size else { return nil }
        let loader = String(decoding: name.prefix { $0 != 0 }, as: UTF8.self)
        if access(loader, X_OK) != 0 {
            return PatchbayError(.noSuchFileOrDirectory, "its loader \(loader) does not exist")
        }
    }
    return nil
}

/// Parses the command line and runs the command it names, as `ParsableCommand.main` does, but a
/// command line that is wrong is said the way every other failure is: `patchbay: <command>:
/// EINVAL: <what is wrong>`, the usage after it, and status 64.
public func runCommandLine(_ type: any ParsableCommand.Type, arguments: [String]? = nil) -> Never {
    do {
        var command = try type.parseAsRoot(arguments)
        let parsed = Swift.type(of: command)
        if !parsed.configuration.subcommands.isEmpty {
            // A group (`patchbay`, `patchbay shm`) named without one of its commands was asked to
            // do nothing: say so and show what it offers, on stderr, and fail as a usage error.
            // `--help` still prints the same text to stdout and succeeds.
            let group = parsed == type ? "" : "\(invokedCommandName): "
            writeStandardError("patchbay: \(group)EINVAL: name one of its commands\n\n" + type.helpMessage(for: parsed) + "\n")
            exit(ExitStatus.usage)
        }
        try command.run()
        exit(0)
    } catch {
        if type.exitCode(for: error) == .validationFailure {
            var text = type.fullMessage(for: error)
            if text.hasPrefix("Error: ") { text = "patchbay: \(invokedCommandName): EINVAL: " + text.dropFirst("Error: ".count) }
            writeStandardError(text.hasSuffix("\n") ? text : text + "\n")
            exit(ExitStatus.usage)
        }
        type.exit(withError: error)
    }
}

/// The command the arguments name (`caps call`), for a failure met where no command name is at
/// hand (a write to stdout).
let invokedCommandName: String = {
    var names: [String] = []
    var level = PatchbayCommand.configuration.subcommands
    for argument in CommandLine.arguments.dropFirst() {
        guard let next = level.first(where: { $0._commandName == argument }) else { break }
        names.append(argument)
        level = next.configuration.subcommands
    }
    if names.isEmpty { return CommandLine.arguments.first.map { $0.hasSuffix("patchbayd") } == true ? "daemon" : "output" }
    return names.joined(separator: " ")
}()

/// Holds each of descriptors 0, 1 and 2 the program was started without (`cmd >&-`, `<&-`) with
/// `/dev/null` opened the other way round (read-only for 1 and 2, write-only for 0), close-on-exec:
/// a write to the closed stdout still fails (`EBADF`), as does a read of the closed stdin, and
/// nothing else the command opens takes their numbers. Without it the broker connection, the
/// first descriptor a command opens, became descriptor 1 and received the command's output: a
/// key written there was lost while `share` exited 0.
public func holdClosedStandardDescriptors() {
    for fd: CInt in 0...2 where fcntl(fd, F_GETFD) < 0 {
        let held = open("/dev/null", (fd == 0 ? O_WRONLY : O_RDONLY) | O_CLOEXEC)
        guard held >= 0 else { return }
        if held != fd {
            dup2(held, fd)
            _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
            close(held)
        }
    }
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
        if n <= 0 { fail(invokedCommandName, n < 0 ? Errno.current : .ioError, "writing to stdout failed") }
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
