// Helpers for the syscall-layer tests. Everything here works on this process's own kernel
// objects, and never on descriptor counts of the whole process: other suites run in parallel in
// the same process, so only objects a test made itself can be counted.
import Glibc
import PatchbaySystem
import SystemPackage
import Testing

/// Expects `body` to fail with exactly `expected`.
func expectErrno(
    _ expected: Errno, _ comment: Comment? = nil, sourceLocation: SourceLocation = #_sourceLocation,
    _ body: () throws(Errno) -> Void
) {
    do {
        try body()
        Issue.record("expected \(expected.name), but the call succeeded. \(comment?.rawValue ?? "")",
                     sourceLocation: sourceLocation)
    } catch {
        #expect(error == expected, "expected \(expected.name), got \(error.name). \(comment?.rawValue ?? "")",
                sourceLocation: sourceLocation)
    }
}

/// A fresh private directory under `base`, removed by `removeTree`.
func makeTemporaryDirectory(base: String = "/tmp") -> String {
    var template = Array("\(base)/patchbay-systest-XXXXXX".utf8CString)
    let result = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
    precondition(result != nil, "mkdtemp failed")
    return String(cString: result!)
}

func removeTree(_ path: String) {
    precondition(path.contains("/patchbay-systest-"))
    removeRecursively(path)
}

/// Removes `path` and everything under it, in this process (a child process would hold copies
/// of every descriptor of this one until its exec, which other tests would notice).
func removeRecursively(_ path: String) {
    var info = stat()
    guard lstat(path, &info) == 0 else { return }
    if info.st_mode & S_IFMT == S_IFDIR {
        if let directory = opendir(path) {
            var names: [String] = []
            while let entry = readdir(directory) {
                let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                    String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
                }
                if name != "." && name != ".." { names.append(name) }
            }
            closedir(directory)
            for name in names { removeRecursively(path + "/" + name) }
        }
        rmdir(path)
    } else {
        unlink(path)
    }
}

/// Waits up to `milliseconds` for end of file on `fd` (every writer gone, nothing left to read).
/// Closure is awaited, never sampled: while another thread of this process spawns a child, the
/// child holds copies of all descriptors until its exec, so a closed writer can linger an instant.
func reachesEndOfFile(_ fd: CInt, milliseconds: CInt = 10_000) -> Bool {
    guard pollEvents(fd, Int16(POLLIN), milliseconds: milliseconds) != 0 else { return false }
    return readNow(fd) == []
}

/// Where each descriptor of this process (or of `pid`) points now (`/proc/PID/fd`), by number.
func descriptorTargets(pid: pid_t? = nil) -> [CInt: String] {
    let base = pid.map { "/proc/\($0)/fd" } ?? "/proc/self/fd"
    guard let directory = opendir(base) else { return [:] }
    defer { closedir(directory) }
    var result: [CInt: String] = [:]
    while let entry = readdir(directory) {
        let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
            String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
        }
        guard let number = CInt(name) else { continue }
        var buffer = [CChar](repeating: 0, count: 4096)
        let length = readlink("\(base)/\(number)", &buffer, buffer.count - 1)
        if length > 0 {
            result[number] = String(decoding: buffer[0..<length].map { UInt8(bitPattern: $0) }, as: UTF8.self)
        }
    }
    return result
}

/// How many descriptors of this process point at one of `targets` (links such as `pipe:[123]`,
/// unique to objects this test made).
func openCount(of targets: Set<String>) -> Int {
    descriptorTargets().values.filter { targets.contains($0) }.count
}

/// Waits up to `milliseconds` for `events` on `fd` (`poll`); returns the events seen (0: none).
@discardableResult
func pollEvents(_ fd: CInt, _ events: Int16 = Int16(POLLIN), milliseconds: CInt) -> Int16 {
    var poller = pollfd(fd: fd, events: events, revents: 0)
    while true {
        let result = poll(&poller, 1, milliseconds)
        if result < 0 && Errno.current == .interrupted { continue }
        return result > 0 ? poller.revents : 0
    }
}

/// Reads what is there without blocking: the bytes, `[]` at end of file, nil when nothing is
/// ready (`EAGAIN`).
func readNow(_ fd: CInt, count: Int = 256) -> [UInt8]? {
    var buffer = [UInt8](repeating: 0, count: count)
    let n = buffer.withUnsafeMutableBytes { recvOrRead(fd, $0) }
    return n < 0 ? nil : Array(buffer[0..<n])
}

private func recvOrRead(_ fd: CInt, _ buffer: UnsafeMutableRawBufferPointer) -> Int {
    // Non-blocking for this call only, whatever the descriptor's own mode.
    let flags = fcntl(fd, F_GETFL)
    _ = fcntl(fd, F_SETFL, flags | O_NONBLOCK)
    defer { _ = fcntl(fd, F_SETFL, flags) }
    return Glibc.read(fd, buffer.baseAddress, buffer.count)
}

/// The supplementary groups of this process.
func currentGroups() -> [gid_t] {
    let count = getgroups(0, nil)
    guard count > 0 else { return [] }
    var groups = [gid_t](repeating: 0, count: Int(count))
    let filled = getgroups(count, &groups)
    return Array(groups.prefix(Int(max(filled, 0))))
}

/// A value to hand to another thread: a raw pointer or descriptor number, which the test keeps
/// valid until the thread has finished.
struct Handoff<T>: @unchecked Sendable {
    var value: T
}

/// Milliseconds elapsed since `start` (monotonic nanoseconds).
func millisecondsSince(_ start: UInt64) -> Double {
    Double(monotonicNanoseconds() - start) / 1e6
}

/// A receive buffer that outlives the call (results such as `ReceivedMessage` are `~Copyable`,
/// which the `withUnsafe…` closures of Array cannot return).
final class Buffer {
    let raw: UnsafeMutableRawBufferPointer

    init(_ count: Int) {
        raw = .allocate(byteCount: count, alignment: 16)
        raw.initializeMemory(as: UInt8.self, repeating: 0)
    }

    deinit { raw.deallocate() }

    func prefix(_ count: Int) -> [UInt8] { Array(raw.prefix(count)) }
}

struct MissingValue: Error {}

/// Unwraps a `~Copyable` optional (which `#require` cannot take), recording an issue when nil.
func required(
    _ value: consuming Descriptor?, _ what: String = "descriptor", sourceLocation: SourceLocation = #_sourceLocation
) throws -> Descriptor {
    switch consume value {
    case .some(let descriptor):
        return descriptor
    case .none:
        Issue.record("\(what) is missing", sourceLocation: sourceLocation)
        throw MissingValue()
    }
}

/// `pwrite` of an array, with the typed error the wrappers throw.
@discardableResult
func write(_ bytes: [UInt8], to descriptor: borrowing Descriptor, at offset: Int) throws(Errno) -> Int {
    try bytes.withUnsafeBytes { raw in
        Result { () throws(Errno) -> Int in try descriptor.write(raw, at: offset) }
    }.get()
}

/// `write` of an array, with the typed error the wrappers throw.
@discardableResult
func write(_ bytes: [UInt8], to descriptor: borrowing Descriptor) throws(Errno) -> Int {
    try bytes.withUnsafeBytes { raw in
        Result { () throws(Errno) -> Int in try descriptor.write(raw) }
    }.get()
}

/// What a `ReceivedMessage` (`~Copyable`, which `#expect` cannot take apart) reported.
struct MessageSummary: Equatable, CustomStringConvertible {
    var length: Int
    var truncated = false
    var descriptorsTruncated = false
    var descriptors = 0

    var description: String {
        "length \(length), truncated \(truncated), descriptorsTruncated \(descriptorsTruncated), descriptors \(descriptors)"
    }
}

extension ReceivedMessage {
    var summary: MessageSummary {
        MessageSummary(length: length, truncated: truncated, descriptorsTruncated: descriptorsTruncated,
                       descriptors: descriptors.count)
    }
}

/// One `read` (or `pread` at `offset`) of up to `count` bytes, with the typed error.
func read(_ count: Int, from descriptor: borrowing Descriptor, at offset: Int? = nil) throws(Errno) -> [UInt8] {
    let buffer = Buffer(count)
    let n: Int
    if let offset {
        n = try descriptor.read(into: buffer.raw, at: offset)
    } else {
        n = try descriptor.read(into: buffer.raw)
    }
    return buffer.prefix(n)
}
