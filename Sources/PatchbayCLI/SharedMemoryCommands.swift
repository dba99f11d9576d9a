import ArgumentParser
import Glibc
import Patchbay
import PatchbaySystem
import SystemPackage

/// `patchbay shm ...`: anonymous and named shared memory.
struct SharedMemoryCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "shm",
        abstract: "Anonymous and named shared memory (FreeBSD shm_open semantics).",
        discussion: "Sizes accept suffixes: 4k, 16M, 1G (powers of 1024).",
        subcommands: [New.self, Create.self, Write.self, Read.self, Stat.self, List.self, Remove.self, Move.self,
                      Truncate.self, Share.self]
    )

    struct New: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Create an anonymous object of SIZE bytes and print a key that shares it.")

        @Option(parsing: .unconditional, help: "The size (the first mapping fixes it, rounded up to the page size).")
        var size: String

        @Flag(help: "Allow Linux memfd seals on the object.")
        var sealable = false

        @Option(parsing: .unconditional, help: "How long the key stays claimable: 500ms, 30s, 5m, 1h or never.")
        var timeout = "60s"

        func run() throws {
            let command = "shm new"
            let bytes = parseSize(size, command)
            let expiry = DurationText.parse(timeout, for: command)
            let broker = connectBroker(for: command)
            do {
                let memory = try SharedMemory.anonymous(sealable: sealable)
                _ = try memory.map(length: bytes)  // the first mapping fixes the size
                let key = try broker.share(memory.descriptor, timeout: expiry)
                writeStandardOutput(key.text + "\n")
            } catch {
                fail(command, error)
            }
        }
    }

    struct Create: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Create a named object (or open an existing one).")

        @Argument(help: "The name, starting with /.")
        var name: String

        @Option(parsing: .unconditional, help: "Set the size after opening.")
        var size: String?

        @Option(parsing: .unconditional, help: "Permission bits for a new object, in octal (masked by the umask).")
        var mode = "0600"

        @Flag(help: "Fail with EEXIST if the name exists.")
        var exclusive = false

        func run() throws {
            let command = "shm create"
            guard let bits = UInt32(mode, radix: 8), bits <= 0o7777 else {
                failUsage(command, "\"\(mode)\" is not an octal mode like 0600")
            }
            let bytes = size.map { parseSize($0, command) }
            let broker = connectBroker(for: command)
            do {
                // An existing object is opened as it is (POSIX's O_CREAT): said on stderr, so that
                // a --mode that did not apply is never taken for one that did.
                let existing = exclusive ? nil : try? broker.statSharedMemory(name)
                let memory = try broker.openSharedMemory(
                    name, access: .readWrite, options: exclusive ? [.create, .exclusive] : [.create], mode: bits)
                if let existing {
                    writeStandardError("patchbay: shm create: \(name) already existed: opened it as it is (mode 0\(String(existing.mode, radix: 8)), owner uid \(existing.uid)); --mode applies to a new object only, --exclusive makes sure it is new\n")
                }
                if let bytes { try memory.truncate(to: bytes) }
            } catch {
                fail(command, error)
            }
        }
    }

    struct Write: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Copy stdin into a named object at OFFSET, growing it if needed.")

        @Argument var name: String

        @Option(parsing: .unconditional, help: "Where to start writing.")
        var offset: String = "0"

        func run() throws {
            let command = "shm write"
            let start = parseSize(offset, command)
            let broker = connectBroker(for: command)
            let memory = attempt(command) { () throws(PatchbayError) in try broker.openSharedMemory(name, access: .readWrite) }
            var position = start
            var chunk = [UInt8](repeating: 0, count: 65536)
            while true {
                let count = chunk.withUnsafeMutableBytes { Glibc.read(0, $0.baseAddress, $0.count) }
                if count < 0 {
                    if errno == EINTR { continue }
                    fail(command, Errno.current, "reading stdin failed")
                }
                if count == 0 { break }
                var done = 0
                while done < count {
                    let written = chunk[done..<count].withUnsafeBytes { pwrite(memory.descriptor.rawValue, $0.baseAddress, $0.count, off_t(position)) }
                    if written < 0 {
                        if errno == EINTR { continue }
                        fail(command, Errno.current, "writing to \(name) failed")
                    }
                    done += written
                    position += written
                }
            }
        }
    }

    struct Read: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Copy a named object's bytes to stdout.")

        @Argument var name: String

        @Option(parsing: .unconditional, help: "Where to start reading.")
        var offset: String = "0"

        @Option(parsing: .unconditional, help: "How many bytes (default: to the end).")
        var length: String?

        func run() throws {
            let command = "shm read"
            let start = parseSize(offset, command)
            let limit = length.map { parseSize($0, command) }
            let broker = connectBroker(for: command)
            let memory = attempt(command) { () throws(PatchbayError) in try broker.openSharedMemory(name, access: .readOnly) }
            var position = start
            let end = limit.map { start + $0 } ?? Int.max
            var chunk = [UInt8](repeating: 0, count: 65536)
            while position < end {
                let want = min(chunk.count, end - position)
                let count = chunk.withUnsafeMutableBytes { pread(memory.descriptor.rawValue, $0.baseAddress, want, off_t(position)) }
                if count < 0 {
                    if errno == EINTR { continue }
                    fail(command, Errno.current, "reading \(name) failed")
                }
                if count == 0 { break }
                var done = 0
                while done < count {
                    let written = chunk[done..<count].withUnsafeBytes { Glibc.write(1, $0.baseAddress, $0.count) }
                    if written < 0 {
                        if errno == EINTR { continue }
                        fail(command, Errno.current, "writing to stdout failed")
                    }
                    done += written
                }
                position += count
            }
        }
    }

    struct Stat: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Show size, owner, mode, times and populated blocks of a named object.")

        @Argument var name: String

        @Flag(help: "Print JSON.")
        var json = false

        func run() throws {
            let broker = connectBroker(for: "shm stat")
            let info = attempt("shm stat") { () throws(PatchbayError) in try broker.statSharedMemory(name) }
            if json {
                writeStandardOutput(sharedMemoryJSON(info) + "\n")
            } else {
                writeStandardOutput("""
                    name    \(terminalSafe(info.nameText))
                    size    \(info.size)
                    owner   \(info.uid):\(info.gid)
                    mode    \(octal(info.mode))
                    blocks  \(info.blocks) (512-byte, populated)
                    access  \(timestamp(info.accessTime))
                    modify  \(timestamp(info.modifyTime))
                    change  \(timestamp(info.changeTime))
                    birth   \(timestamp(info.birthTime))

                    """)
            }
        }
    }

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "ls", abstract: "List named objects.")

        @Flag(help: "Print JSON.")
        var json = false

        func run() throws {
            let broker = connectBroker(for: "shm ls")
            let all = attempt("shm ls") { () throws(PatchbayError) in try broker.listSharedMemory() }
            if json {
                writeStandardOutput(JSON.array(all.map(sharedMemoryJSON)) + "\n")
                return
            }
            var out = "MODE  OWNER        SIZE        NAME\n"
            for info in all {
                let owner = "\(info.uid):\(info.gid)"
                out += octal(info.mode) + "  " + owner.padding(11) + "  " + "\(info.size)".padding(10) + "  " + terminalSafe(info.nameText) + "\n"
            }
            writeStandardOutput(out)
        }
    }

    struct Remove: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "rm", abstract: "Unlink a named object.")

        @Argument var name: String

        func run() throws {
            let broker = connectBroker(for: "shm rm")
            attempt("shm rm") { () throws(PatchbayError) in try broker.unlinkSharedMemory(name) }
        }
    }

    struct Move: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "mv", abstract: "Rename a named object, atomically.")

        @Argument var from: String
        @Argument var to: String

        @Flag(help: "Fail with EEXIST if TO exists.")
        var noReplace = false

        @Flag(help: "Swap the two names.")
        var exchange = false

        func validate() throws {
            if noReplace && exchange { throw ValidationError("--no-replace and --exchange exclude each other") }
        }

        func run() throws {
            let behaviour: SharedMemoryRename = switch (noReplace, exchange) {
            case (true, true): .noReplaceAndExchange
            case (true, false): .noReplace
            case (false, true): .exchange
            case (false, false): .replace
            }
            let broker = connectBroker(for: "shm mv")
            attempt("shm mv") { () throws(PatchbayError) in try broker.renameSharedMemory(from: from, to: to, behaviour) }
        }
    }

    struct Truncate: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Set a named object's size.")

        @Argument var name: String
        @Argument var size: String

        func run() throws {
            let bytes = parseSize(size, "shm truncate")
            let broker = connectBroker(for: "shm truncate")
            attempt("shm truncate") { () throws(PatchbayError) in
                try broker.openSharedMemory(name, access: .readWrite).truncate(to: bytes)
            }
        }
    }

    struct Share: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Print a key for a handle on a named object.")

        @Argument var name: String

        @Flag(help: "Share a read-only handle.")
        var readOnly = false

        @Option(parsing: .unconditional, help: "How long the key stays claimable: 500ms, 30s, 5m, 1h or never.")
        var timeout = "60s"

        func run() throws {
            let command = "shm share"
            let expiry = DurationText.parse(timeout, for: command)
            let broker = connectBroker(for: command)
            let key = attempt(command) { () throws(PatchbayError) -> Key in
                let memory = try broker.openSharedMemory(name, access: readOnly ? .readOnly : .readWrite)
                return try broker.share(memory.descriptor, timeout: expiry)
            }
            writeStandardOutput(key.text + "\n")
        }
    }
}

/// Runs `body`, failing the command with its error.
func attempt<T: ~Copyable>(_ command: String, _ body: () throws(PatchbayError) -> T) -> T {
    do {
        return try body()
    } catch {
        fail(command, error)
    }
}

/// `4096`, `4k`, `16M`, `1G`, `1T` (powers of 1024).
func parseSize(_ text: String, _ command: String) -> Int {
    let units: [Character: Int] = ["k": 1 << 10, "K": 1 << 10, "m": 1 << 20, "M": 1 << 20, "g": 1 << 30, "G": 1 << 30,
                                  "t": 1 << 40, "T": 1 << 40]
    var digits = Substring(text)
    var scale = 1
    if let last = digits.last, let unit = units[last] {
        scale = unit
        digits = digits.dropLast()
    }
    guard let value = Int(digits), value >= 0 else {
        failUsage(command, "\"\(text)\" is not a size; write it like 4096, 4k, 16M, 1G or 1T")
    }
    let (product, overflow) = value.multipliedReportingOverflow(by: scale)
    guard !overflow else { failUsage(command, "\(text) is too large") }
    return product
}

func octal(_ mode: UInt32) -> String {
    let digits = String(mode, radix: 8)
    return String(repeating: "0", count: max(0, 4 - digits.count)) + digits
}

/// `2026-11-22 06:13:02.123456789 UTC` from nanoseconds since the epoch.
func timestamp(_ nanoseconds: Int64) -> String {
    guard nanoseconds > 0 else { return "-" }
    var seconds = time_t(nanoseconds / 1_000_000_000)
    var parts = tm()
    gmtime_r(&seconds, &parts)
    func two(_ value: Int32) -> String { value < 10 ? "0\(value)" : "\(value)" }
    let fraction = String(nanoseconds % 1_000_000_000)
    return "\(parts.tm_year + 1900)-\(two(parts.tm_mon + 1))-\(two(parts.tm_mday)) \(two(parts.tm_hour)):\(two(parts.tm_min)):\(two(parts.tm_sec))."
        + String(repeating: "0", count: 9 - fraction.count) + fraction + " UTC"
}

func sharedMemoryJSON(_ info: SharedMemoryInfo) -> String {
    JSON.object([
        ("name", JSON.string(info.nameText)), ("size", "\(info.size)"), ("uid", "\(info.uid)"),
        ("gid", "\(info.gid)"), ("mode", JSON.string(octal(info.mode))), ("blocks", "\(info.blocks)"),
        ("access_time_ns", "\(info.accessTime)"), ("modify_time_ns", "\(info.modifyTime)"),
        ("change_time_ns", "\(info.changeTime)"), ("birth_time_ns", "\(info.birthTime)"),
    ])
}

extension String {
    /// Padded to a table column of `width`, the last of which is the gap to the next: a value
    /// as wide or wider (a 20-digit generation a service wrote, a long name) keeps one space.
    func padding(_ width: Int) -> String {
        count >= width ? self + " " : self + String(repeating: " ", count: width - count)
    }
}
