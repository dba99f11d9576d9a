// Helpers for the broker's unit tests: fake credentials, real descriptors, a temporary store.
import Glibc
import Logging
@testable import PatchbayBroker
import PatchbaySystem
import SystemPackage
import Testing

/// Credentials of a made-up client: the structures under test never ask the kernel.
func credentials(uid: UInt32, gid: UInt32? = nil, pid: Int32 = 4242, groups: [UInt32] = []) -> PeerCredentials {
    PeerCredentials(pid: pid, uid: uid, gid: gid ?? uid, groups: groups)
}

/// A logger that drops everything.
let quietLogger = Logger(label: "patchbay.broker-tests") { _ in SwiftLogNoOpLogHandler() }

/// Expects `body` to fail with a `RequestError` carrying `expected`.
func expectRequestError(
    _ expected: Errno, sourceLocation: SourceLocation = #_sourceLocation, _ body: () throws(RequestError) -> Void
) {
    do {
        try body()
        Issue.record("expected \(expected.name), but the call succeeded", sourceLocation: sourceLocation)
    } catch {
        #expect(error.errno == expected, "expected \(expected.name), got \(error.errno.name): \(error.reason)",
                sourceLocation: sourceLocation)
    }
}

/// Waits until every descriptor queued on the `DeferredCloser` so far has been closed: a pipe's
/// write end queued last reaches its reader as end of file once the closer got to it (it closes
/// in order).
func drainDeferredCloser(sourceLocation: SourceLocation = #_sourceLocation) throws {
    let sentinel = try Pipe()
    DeferredCloser.shared.close(sentinel.writeEnd, of: getuid())  // the tests' clients are this uid
    var poller = pollfd(fd: sentinel.readEnd.rawValue, events: Int16(POLLIN), revents: 0)
    var ready: CInt = 0
    repeat { ready = poll(&poller, 1, 10_000) } while ready < 0 && Errno.current == .interrupted
    #expect(ready == 1, "the deferred closer did not get through its queue", sourceLocation: sourceLocation)
}

/// Whether the pipe behind `readEnd` has lost its last writer (reads end of file at once).
func writerClosed(_ readEnd: CInt) -> Bool {
    var poller = pollfd(fd: readEnd, events: Int16(POLLIN), revents: 0)
    guard poll(&poller, 1, 0) == 1 else { return false }
    return poller.revents & Int16(POLLHUP) != 0
}

/// A pipe whose write end goes to the code under test; the test keeps the read end to watch it.
final class WatchedPipe {
    let readEnd: Descriptor
    private var writeEnd: Descriptor?

    init() throws {
        let pipe = try Pipe()
        readEnd = pipe.readEnd
        writeEnd = consume pipe.writeEnd
    }

    /// The write end, to hand over (once).
    func take() -> Descriptor { writeEnd.take()! }

    /// Whether a write end is still open now (a snapshot: closing is awaited with `closes`).
    var open: Bool { !writerClosed(readEnd.rawValue) }

    /// Waits up to 10 s for every write end to be closed. Closure is awaited, never sampled:
    /// while another thread of this process spawns a child, the child holds copies of all
    /// descriptors until its exec, so a closed writer can linger an instant.
    var closes: Bool {
        var poller = pollfd(fd: readEnd.rawValue, events: Int16(POLLIN), revents: 0)
        var ready: CInt = 0
        repeat { ready = poll(&poller, 1, 10_000) } while ready < 0 && Errno.current == .interrupted
        return ready == 1 && poller.revents & Int16(POLLHUP) != 0
    }
}

/// A fresh directory on tmpfs for one store, removed at the end of the test.
final class TemporaryStore {
    let directory: String
    var path: String { directory + "/store" }

    init() {
        var template = Array("/dev/shm/patchbay-brokertest-XXXXXX".utf8CString)
        let result = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
        precondition(result != nil, "mkdtemp failed")
        directory = String(decoding: template.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    deinit {
        precondition(directory.hasPrefix("/dev/shm/patchbay-brokertest-"))
        removeRecursively(directory)
    }

    /// Opens the store. A store closed a moment ago can still look locked (EADDRINUSE) while
    /// another thread of this process spawns a child, which holds a copy of the lock's descriptor
    /// until its exec: then this waits for the lock (blocking on it, not sleeping) and tries again.
    func open() throws -> SharedMemoryStore {
        for _ in 0..<20 {
            let errno: Errno
            do {
                return try SharedMemoryStore(path: path, logger: quietLogger)
            } catch {
                errno = error.errno
            }
            guard errno == .addressInUse else { break }
            _ = try? FileLock(path: path + "/lock", wait: true)
        }
        return try SharedMemoryStore(path: path, logger: quietLogger)
    }

    /// Names of the files in the store's `objects` directory.
    func objectFiles() -> Set<String> {
        guard let listing = opendir(path + "/objects") else { return [] }
        defer { closedir(listing) }
        var names: Set<String> = []
        while let entry = readdir(listing) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
            }
            if name != "." && name != ".." { names.insert(name) }
        }
        return names
    }

    func journalSize() -> Int {
        var info = stat()
        return lstat(path + "/journal", &info) == 0 ? Int(info.st_size) : -1
    }
}

/// Bytes of a name.
func name(_ text: String) -> [UInt8] { Array(text.utf8) }

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
