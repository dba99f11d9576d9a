// Shared memory (SEMANTICS.md §2 and §3): anonymous objects and named objects with FreeBSD's
// semantics, against the Swift API, with real processes on both sides.
import Glibc
import Patchbay
import PatchbayProtocol
import PatchbaySystem
import SystemPackage
import Testing

/// Runs `body` expecting `errno`; for calls whose result is ~Copyable or unused.
@discardableResult
func expectFailure(_ errno: Errno, sourceLocation: SourceLocation = #_sourceLocation,
                   _ body: () throws(PatchbayError) -> Void) -> PatchbayError? {
    expectErrno(errno, sourceLocation: sourceLocation, body)
}

func bytesAt(_ mapping: borrowing Patchbay.Mapping, _ offset: Int, _ count: Int) -> String {
    String(decoding: mapping.bytes[offset..<offset + count], as: UTF8.self)
}

func put(_ text: String, into mapping: borrowing Patchbay.Mapping, at offset: Int) {
    mapping.withUnsafeMutableBytes { bytes in
        let source = Array(text.utf8)
        bytes.baseAddress!.advanced(by: offset).copyMemory(from: source, byteCount: source.count)
    }
}

@Suite("Anonymous shared memory")
struct AnonymousSharedMemoryTests {
    @Test("the first mapping decides the size (page-rounded), zero-filled; later mappings fit inside")
    func firstMappingDecidesSize() throws {
        let memory = try SharedMemory.anonymous()
        #expect(try memory.size == 0)
        let first = try memory.map(length: 5000)
        #expect(first.count == 2 * pageSize)
        #expect(try memory.size == 2 * pageSize)
        #expect(first.bytes.allSatisfy { $0 == 0 })
        put("second page", into: first, at: pageSize)
        // A later mapping at a page offset sees the same bytes; no length maps to the end.
        let second = try memory.map(offset: pageSize)
        #expect(second.count == pageSize)
        #expect(bytesAt(second, 0, 11) == "second page")
        let whole = try memory.map()
        #expect(whole.count == 2 * pageSize)
        // Past the end, unaligned, zero-length: EINVAL. A longer "first" mapping is a later one now.
        expectFailure(.invalidArgument) { () throws(PatchbayError) in _ = try memory.map(length: 3 * pageSize) }
        expectFailure(.invalidArgument) { () throws(PatchbayError) in _ = try memory.map(length: pageSize + 1, offset: pageSize) }
        expectFailure(.invalidArgument) { () throws(PatchbayError) in _ = try memory.map(length: 10, offset: 100) }
        expectFailure(.invalidArgument) { () throws(PatchbayError) in _ = try memory.map(length: 10, offset: 2 * pageSize) }
        expectFailure(.invalidArgument) { () throws(PatchbayError) in _ = try memory.map(length: 0) }
        #expect(try memory.size == 2 * pageSize)
    }

    @Test("the first mapping must be at offset 0 and have a length")
    func firstMappingRules() throws {
        let memory = try SharedMemory.anonymous()
        expectFailure(.invalidArgument) { () throws(PatchbayError) in _ = try memory.map(length: pageSize, offset: pageSize) }
        expectFailure(.invalidArgument) { () throws(PatchbayError) in _ = try memory.map() }
        #expect(try memory.size == 0)
        // A read-only handle cannot fix the size.
        let readOnly = try memory.readOnly()
        expectFailure(.permissionDenied) { () throws(PatchbayError) in _ = try readOnly.map(length: pageSize, writable: false) }
    }

    @Test("a first mapping the kernel cannot make fixes nothing: the object keeps no size, and a later first mapping decides it",
          arguments: [false, true])  // true: shared first, so the sizing takes the object's lock
    func failedFirstMappingFixesNothing(shared: Bool) throws {
        let memory = try SharedMemory.anonymous()
        let broker = try TestBroker()
        if shared {
            _ = try broker.connect().share(memory.descriptor, timeout: .after(.seconds(5)))
        }
        expectFailure(.noMemory) { () throws(PatchbayError) in _ = try memory.map(length: 1 << 62) }
        #expect(try memory.size == 0)
        expectFailure(.invalidArgument) { () throws(PatchbayError) in _ = try memory.map(length: Int.max) }
        #expect(try memory.size == 0)
        let mapping = try memory.map(length: pageSize)
        #expect(mapping.count == pageSize)
        #expect(try memory.size == pageSize)
    }

    @Test("SHM_ANON style: truncate sets the size, shrinking zeroes the tail")
    func truncateStyle() throws {
        let memory = try SharedMemory.anonymous()
        try memory.truncate(to: 3 * pageSize)
        let mapping = try memory.map()
        #expect(mapping.count == 3 * pageSize)
        put("tail", into: mapping, at: 2 * pageSize)
        try memory.truncate(to: pageSize)
        try memory.truncate(to: 3 * pageSize)
        let again = try memory.map()
        #expect(again.bytes[2 * pageSize..<2 * pageSize + 4].allSatisfy { $0 == 0 })
        expectFailure(.invalidArgument) { () throws(PatchbayError) in try memory.truncate(to: -1) }
        expectFailure(.invalidArgument) { () throws(PatchbayError) in try memory.readOnly().truncate(to: pageSize) }
    }

    @Test("a read-only handle maps read-only, sees writes, and refuses writable mappings (EACCES)")
    func readOnlyHandle() throws {
        let memory = try SharedMemory.anonymous()
        let writer = try memory.map(length: pageSize)
        let reader = try memory.readOnly()
        let readerWritable = reader.isWritable
        #expect(!readerWritable)
        expectFailure(.permissionDenied) { () throws(PatchbayError) in _ = try reader.map() }
        let view = try reader.map(writable: false)
        put("shared", into: writer, at: 0)
        #expect(bytesAt(view, 0, 6) == "shared")
        #expect(try reader.descriptor.system.isCloseOnExec())
        #expect(try memory.descriptor.system.isCloseOnExec())
    }

    @Test("seals: refused unless created sealable; write seal vs a writable mapping is EBUSY; size seals are EPERM; the seal seal is final")
    func seals() throws {
        let plain = try SharedMemory.anonymous()
        expectFailure(.notPermitted) { () throws(PatchbayError) in try plain.addSeals(.write) }
        #expect(try plain.seals().contains(.seal))

        let sealable = try SharedMemory.anonymous(sealable: true)
        #expect(try sealable.seals() == [])
        do {
            let writable = try sealable.map(length: pageSize)
            expectFailure(.resourceBusy) { () throws(PatchbayError) in try sealable.addSeals(.write) }
            _ = consume writable
        }
        try sealable.addSeals([.grow, .shrink])
        expectFailure(.notPermitted) { () throws(PatchbayError) in try sealable.truncate(to: 2 * pageSize) }
        expectFailure(.notPermitted) { () throws(PatchbayError) in try sealable.truncate(to: 0) }
        try sealable.addSeals(.write)
        expectFailure(.notPermitted) { () throws(PatchbayError) in _ = try sealable.map() }
        let readable = try sealable.map(writable: false)
        #expect(readable.count == pageSize)
        // Seals belong to the object: another handle sees them.
        #expect(try sealable.readOnly().seals() == [.grow, .shrink, .write])
        try sealable.addSeals(.seal)
        expectFailure(.notPermitted) { () throws(PatchbayError) in try sealable.addSeals(.futureWrite) }
    }

    @Test("two unrelated processes write and read each other's bytes through an object handed over by key")
    func acrossProcessesByKey() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        let memory = try SharedMemory.anonymous()
        let mapping = try memory.map(length: 4096)
        put("ping", into: mapping, at: 0)
        let key = try client.share(memory.descriptor)
        let peer = try Child(testPeer, ["shm-exchange", key.text], environment: broker.environment)
        #expect(try peer.readLine() == "read ping")
        #expect(try peer.readLine() == "done")
        #expect(try peer.wait() == .exited(0))
        #expect(bytesAt(mapping, 2048, 4) == "pong")
    }

    @Test("an inherited descriptor works in the child like across fork")
    func inheritedByChild() throws {
        let memory = try SharedMemory.anonymous()
        let mapping = try memory.map(length: pageSize)
        put("inherited", into: mapping, at: 0)
        // The child reads the object through its fd 3 (read(2) works on memfds) and writes back.
        let output = try Pipe()
        let pid = try spawnProcess(
            path: "/bin/sh", arguments: ["-c", "head -c 9 <&3; printf back | dd of=/proc/self/fd/3 bs=1 seek=100 conv=notrunc 2>/dev/null"],
            environment: currentEnvironment(), descriptors: [1: output.writeEnd.rawValue, 3: memory.descriptor.rawValue])
        let reader = output.readEnd
        _ = consume output.writeEnd
        #expect(try reader.readToEnd() == Array("inherited".utf8))
        #expect(try waitForProcess(pid) == .exited(0))
        #expect(bytesAt(mapping, 100, 4) == "back")
    }

    @Test("two processes racing to map a fresh object agree on one size")
    func racingFirstMappings() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        for _ in 0..<5 {
            let memory = try SharedMemory.anonymous()
            let small = try Child(testPeer, ["shm-first-map", try client.share(memory.descriptor).text, "4096"],
                                  environment: broker.environment)
            let large = try Child(testPeer, ["shm-first-map", try client.share(memory.descriptor).text, "16384"],
                                  environment: broker.environment)
            #expect(try small.readLine() == "ready")
            #expect(try large.readLine() == "ready")
            small.closeInput()
            large.closeInput()
            let smallResult = try small.readLine() ?? ""
            let largeResult = try large.readLine() ?? ""
            let size = try memory.size
            #expect(size == 4096 || size == 16384)
            if size == 16384 {
                #expect(largeResult == "mapped 16384 size 16384")
                #expect(smallResult == "mapped 4096 size 16384")
            } else {
                #expect(smallResult == "mapped 4096 size 4096")
                #expect(largeResult == "EINVAL")
            }
            _ = try small.wait()
            _ = try large.wait()
        }
    }

    @Test("an object whose descriptor never left the process is sized without the lock; once shared, a peer's first mapping counts")
    func confinedAndShared() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        // Confined: the first mapping sizes it, a later one past the end is EINVAL, truncate moves the end.
        let mine = try SharedMemory.anonymous()
        let first = try mine.map(length: 5000)
        let firstSize = try mine.size
        #expect(first.count == 8192 && firstSize == 8192)
        #expect(throws: PatchbayError.self) { _ = try mine.map(length: 3 * 4096) }
        let second = try mine.map(length: 4096, offset: 4096)
        #expect(second.count == 4096)
        try mine.truncate(to: 4 * 4096)
        let grown = try mine.map(length: 4 * 4096)
        #expect(grown.count == 4 * 4096)
        // Shared before any mapping: the peer maps first (3 pages) and this process sees that size.
        let shared = try SharedMemory.anonymous()
        let peer = try Child(testPeer, ["shm-first-map", try client.share(shared.descriptor).text, "12288"],
                             environment: broker.environment)
        #expect(try peer.readLine() == "ready")
        peer.closeInput()
        #expect(try peer.readLine() == "mapped 12288 size 12288")
        _ = try peer.wait()
        // Were the descriptor still thought confined, this would be taken for the first mapping
        // and shrink the object to one page under the peer.
        let later = try shared.map(length: 4096)
        #expect(later.count == 4096)
        #expect(throws: PatchbayError.self, "not a first mapping of 4 pages: the peer's 3 stand") { _ = try shared.map(length: 4 * 4096) }
        let sharedSize = try shared.size
        #expect(sharedSize == 12288)
    }

    @Test("the broker's /dev/shmem/new makes a new object on every open")
    func brokerNamespace() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        let first = try client.newAnonymousSharedMemory()
        let second = try client.newAnonymousSharedMemory(sealable: true)
        #expect(first.kind == .anonymous)
        #expect(try first.status().inode != second.status().inode)
        _ = try first.map(length: 100)
        #expect(try first.size == pageSize)
        #expect(try second.size == 0)
        try second.addSeals(.grow)
        expectFailure(.notPermitted) { () throws(PatchbayError) in try first.addSeals(.grow) }
    }
}

@Suite("Named shared memory")
struct NamedSharedMemoryTests {
    /// How many opens of named objects the broker has answered (its metrics).
    private func brokerOpens(_ broker: Broker) throws -> Int {
        let text = try broker.metrics()
        let prefix = "patchbay_requests_total{subsystem=\"shm\",operation=\"sharedMemoryOpen\","
        return text.split(separator: "\n").filter { $0.hasPrefix(prefix) }
            .compactMap { Int($0.split(separator: " ").last ?? "") }.reduce(0, +)
    }

    @Test("reopening a name the broker opened before skips the broker while no name changed; a rename, an unlink or a new object is seen")
    func reopenWithoutBroker() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        let other = try broker.connect()
        let created = try client.openSharedMemory("/reopen", options: .create)
        try created.truncate(to: 4096)
        let inode = try created.status().inode
        _ = try client.openSharedMemory("/reopen")  // the broker answers, and this is remembered
        let asked = try brokerOpens(other)
        for _ in 0..<5 {
            let again = try client.openSharedMemory("/reopen")
            #expect(try again.status().inode == inode && (try again.size) == 4096)
        }
        #expect(try brokerOpens(other) == asked, "five reopens, none of them through the broker")
        // Read-only is remembered apart: the first goes to the broker.
        _ = try client.openSharedMemory("/reopen", access: .readOnly)
        #expect(try brokerOpens(other) == asked + 1)

        // Another client renames it away: the name is gone for this one too.
        try other.renameSharedMemory(from: "/reopen", to: "/moved")
        expectErrno(.noSuchFileOrDirectory) { () throws(PatchbayError) in _ = try client.openSharedMemory("/reopen") }
        #expect(try client.openSharedMemory("/moved").status().inode == inode)
        // Renamed back, then unlinked and made anew: the new object, never the old one.
        try other.renameSharedMemory(from: "/moved", to: "/reopen")
        #expect(try client.openSharedMemory("/reopen").status().inode == inode)
        #expect(try client.openSharedMemory("/reopen").status().inode == inode)
        try other.unlinkSharedMemory("/reopen")
        expectErrno(.noSuchFileOrDirectory) { () throws(PatchbayError) in _ = try client.openSharedMemory("/reopen") }
        let fresh = try other.openSharedMemory("/reopen", options: .create)
        #expect(try client.openSharedMemory("/reopen").status().inode == (try fresh.status().inode))
        #expect(try fresh.status().inode != inode)
    }

    @Test("a broker restarted under a remembered name is asked again: its namespace may differ")
    func reopenAfterRestart() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        let object = try client.openSharedMemory("/kept", options: .create)
        let inode = try object.status().inode
        _ = try client.openSharedMemory("/kept")
        #expect(try client.openSharedMemory("/kept").status().inode == inode)
        kill(broker.pid, SIGKILL)
        _ = try waitForProcess(broker.pid)
        let restarted = try spawnDaemon(socketPath: broker.socketPath, sharedMemoryDirectory: broker.directory + "/shm")
        defer { kill(restarted, SIGTERM); _ = try? waitForProcess(restarted) }
        // The new broker moves the name before this client calls it again (a rename keeps the
        // object's file where it was: only the broker knows the name moved).
        let other = try Broker(socketPath: broker.socketPath)
        try other.renameSharedMemory(from: "/kept", to: "/elsewhere")
        expectErrno(.noSuchFileOrDirectory) { () throws(PatchbayError) in _ = try client.openSharedMemory("/kept") }
    }

    @Test("create: size 0, owner from the kernel, mode masked by the umask; reopen sees the same bytes")
    func createAndReopen() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        let created = try client.openSharedMemory("/app/state", options: [.create, .exclusive], mode: 0o640)
        #expect(created.kind == .named)
        #expect(try created.size == 0)
        try created.truncate(to: 8192)
        let mapping = try created.map()
        put("named bytes", into: mapping, at: 4096)
        let reopened = try client.openSharedMemory("/app/state", access: .readOnly)
        let view = try reopened.map(writable: false)
        #expect(bytesAt(view, 4096, 11) == "named bytes")
        let info = try client.statSharedMemory("/app/state")
        #expect(info.size == 8192)
        #expect(info.uid == geteuid() && info.gid == getegid())
        #expect(info.mode == 0o640 & ~currentUmaskForTests())
        #expect(info.birthTime > 0 && info.birthTime <= info.changeTime)
        #expect(try created.descriptor.system.isCloseOnExec())
        // A umask set in the creating process is applied.
        let masked = try run("/bin/sh", ["-c", "umask 077; exec \"$0\" shm create /masked --mode 0666", patchbayCLI],
                             environment: broker.environment)
        #expect(masked.termination == .exited(0), "\(masked.standardError)")
        #expect(try client.statSharedMemory("/masked").mode == 0o600)
    }

    @Test("name rules: ENAMETOOLONG before the slash rule, EINVAL without a slash, anything may follow")
    func names() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        let longest = "/" + String(repeating: "x", count: 1022)
        _ = try client.openSharedMemory(longest, options: .create)
        expectFailure(.fileNameTooLong) { () throws(PatchbayError) in _ = try client.openSharedMemory(longest + "x", options: .create) }
        expectFailure(.fileNameTooLong) { () throws(PatchbayError) in _ = try client.openSharedMemory(String(repeating: "y", count: 1024), options: .create) }
        expectFailure(.fileNameTooLong) { () throws(PatchbayError) in try client.unlinkSharedMemory(longest + "x") }
        expectFailure(.invalidArgument) { () throws(PatchbayError) in _ = try client.openSharedMemory("no-slash", options: .create) }
        expectFailure(.invalidArgument) { () throws(PatchbayError) in _ = try client.openSharedMemory("/nul\u{0}byte", options: .create) }
        for name in ["/a/b/c", "/../..", "/.", "/with space", "/ünïcödé"] {
            _ = try client.openSharedMemory(name, options: [.create, .exclusive])
            #expect(try client.statSharedMemory(name).nameText == name)
        }
    }

    @Test("open flags: write-only and unknown flags are EINVAL, before the name is looked at; missing is ENOENT; exclusive is EEXIST")
    func openFlags() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        expectFailure(.invalidArgument) { () throws(PatchbayError) in _ = try client.openSharedMemory("/w", access: .writeOnly, options: .create) }
        // FreeBSD's order: the access mode and the flags before the name.
        let tooLong = "/" + String(repeating: "n", count: 5000)
        expectFailure(.invalidArgument) { () throws(PatchbayError) in _ = try client.openSharedMemory(tooLong, access: .writeOnly) }
        expectFailure(.invalidArgument) { () throws(PatchbayError) in
            _ = try client.openSharedMemory(tooLong, options: SharedMemoryOpenOptions(rawValue: 0x100))
        }
        expectFailure(.fileNameTooLong) { () throws(PatchbayError) in _ = try client.openSharedMemory(tooLong) }
        expectFailure(.invalidArgument) { () throws(PatchbayError) in
            _ = try client.openSharedMemory("/w", options: [.create, SharedMemoryOpenOptions(rawValue: 0x100)])
        }
        expectFailure(.noSuchFileOrDirectory) { () throws(PatchbayError) in _ = try client.openSharedMemory("/missing") }
        _ = try client.openSharedMemory("/once", options: [.create, .exclusive], mode: 0)
        // EEXIST comes before any permission check (mode 0 would refuse everything).
        expectFailure(.fileExists) { () throws(PatchbayError) in _ = try client.openSharedMemory("/once", options: [.create, .exclusive]) }
        expectFailure(.permissionDenied) { () throws(PatchbayError) in _ = try client.openSharedMemory("/once", access: .readOnly) }
    }

    @Test("truncate on open resets the size only with read-write access")
    func truncateOnOpen() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        try client.openSharedMemory("/t", options: .create).truncate(to: 3 * pageSize)
        _ = try client.openSharedMemory("/t", access: .readOnly, options: .truncate)
        #expect(try client.statSharedMemory("/t").size == UInt64(3 * pageSize))
        _ = try client.openSharedMemory("/t", access: .readWrite, options: .truncate)
        #expect(try client.statSharedMemory("/t").size == 0)
    }

    @Test("mode bits are checked for every caller: read for read-only, read and write for read-write, unlink and rename")
    func permissions() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        _ = try client.openSharedMemory("/ro", options: .create, mode: 0o400)
        _ = try client.openSharedMemory("/ro", access: .readOnly)
        expectFailure(.permissionDenied) { () throws(PatchbayError) in _ = try client.openSharedMemory("/ro", access: .readWrite) }
        expectFailure(.permissionDenied) { () throws(PatchbayError) in try client.unlinkSharedMemory("/ro") }
        expectFailure(.permissionDenied) { () throws(PatchbayError) in try client.renameSharedMemory(from: "/ro", to: "/elsewhere") }
        _ = try client.openSharedMemory("/rw", options: .create, mode: 0o600)
        expectFailure(.permissionDenied) { () throws(PatchbayError) in try client.renameSharedMemory(from: "/rw", to: "/ro") }
        // Nothing changed.
        #expect(try client.listSharedMemory().map(\.nameText) == ["/ro", "/rw"])
        // A read-only handle refuses a writable mapping and a resize.
        let readOnly = try client.openSharedMemory("/rw", access: .readOnly)
        expectFailure(.permissionDenied) { () throws(PatchbayError) in _ = try readOnly.map(length: pageSize) }
        expectFailure(.invalidArgument) { () throws(PatchbayError) in try readOnly.truncate(to: pageSize) }
    }

    @Test("unlink: handles and mappings keep working; the name is free for a new object")
    func unlinkKeepsHandles() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        let handle = try client.openSharedMemory("/gone", options: .create)
        try handle.truncate(to: pageSize)
        let mapping = try handle.map()
        put("still here", into: mapping, at: 0)
        try client.unlinkSharedMemory("/gone")
        expectFailure(.noSuchFileOrDirectory) { () throws(PatchbayError) in _ = try client.openSharedMemory("/gone") }
        expectFailure(.noSuchFileOrDirectory) { () throws(PatchbayError) in try client.unlinkSharedMemory("/gone") }
        // Remap after unlink, and after the handle itself is closed.
        let remapped = try handle.map()
        #expect(bytesAt(remapped, 0, 10) == "still here")
        _ = consume handle
        put("still writable", into: mapping, at: 0)
        #expect(bytesAt(remapped, 0, 14) == "still writable")
        let fresh = try client.openSharedMemory("/gone", options: .create)
        #expect(try fresh.size == 0)
    }

    @Test("rename: replace, noReplace, exchange, exchange with no target, to itself, missing source, bad flags")
    func rename() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        func make(_ name: String, _ size: Int) throws {
            try client.openSharedMemory(name, options: .create).truncate(to: size)
        }
        try make("/a", 1)
        try make("/b", 2)
        try client.renameSharedMemory(from: "/a", to: "/a")
        try client.renameSharedMemory(from: "/nothing", to: "/nothing")
        expectFailure(.noSuchFileOrDirectory) { () throws(PatchbayError) in try client.renameSharedMemory(from: "/nothing", to: "/c") }
        expectFailure(.invalidArgument) { () throws(PatchbayError) in try client.renameSharedMemory(from: "/a", to: "/b", .noReplaceAndExchange) }
        expectFailure(.fileExists) { () throws(PatchbayError) in try client.renameSharedMemory(from: "/a", to: "/b", .noReplace) }
        try client.renameSharedMemory(from: "/a", to: "/b", .exchange)
        #expect(try client.statSharedMemory("/a").size == 2)
        #expect(try client.statSharedMemory("/b").size == 1)
        try client.renameSharedMemory(from: "/a", to: "/c", .exchange)  // no target: a plain rename
        expectFailure(.noSuchFileOrDirectory) { () throws(PatchbayError) in _ = try client.statSharedMemory("/a") }
        #expect(try client.statSharedMemory("/c").size == 2)
        let replaced = try client.openSharedMemory("/b")
        try client.renameSharedMemory(from: "/c", to: "/b")
        #expect(try client.statSharedMemory("/b").size == 2)
        #expect(try replaced.size == 1)  // the replaced object lives on through its handle
        try client.renameSharedMemory(from: "/b", to: "/d", .noReplace)
        #expect(try client.listSharedMemory().map(\.nameText) == ["/d"])
        // EEXIST (noReplace) comes before EACCES: a source nobody may rename, onto an existing name.
        _ = try client.openSharedMemory("/locked", options: .create, mode: 0)
        expectFailure(.fileExists) { () throws(PatchbayError) in try client.renameSharedMemory(from: "/locked", to: "/d", .noReplace) }
        expectFailure(.permissionDenied) { () throws(PatchbayError) in try client.renameSharedMemory(from: "/locked", to: "/d") }
    }

    @Test("stat counts populated blocks as pages are touched")
    func populatedBlocks() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        let memory = try client.openSharedMemory("/sparse", options: .create)
        try memory.truncate(to: 256 * pageSize)
        #expect(try client.statSharedMemory("/sparse").blocks == 0)
        let mapping = try memory.map()
        for page in 0..<10 { mapping.mutableBytes[page * pageSize * 3] = 1 }
        #expect(try client.statSharedMemory("/sparse").blocks == UInt64(10 * pageSize / 512))
        #expect(try memory.status().blocks == 10 * pageSize / 512)
    }

    @Test("named objects are never sealable")
    func neverSealable() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        let memory = try client.openSharedMemory("/s", options: .create)
        #expect(try memory.seals() == .seal)
        expectFailure(.notPermitted) { () throws(PatchbayError) in try memory.addSeals(.write) }
    }

    @Test("mapping past the size is allowed; touching past the end raises SIGBUS",
          .enabled(if: getenv("PATCHBAY_SANITIZER") == nil, "sanitizer runtimes catch SIGBUS themselves"))
    func sigbusPastTheEnd() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        try client.openSharedMemory("/short", options: .create).truncate(to: pageSize)
        let peer = try Child(testPeer, ["shm-touch-past-end", "/short"], environment: broker.environment)
        #expect(try peer.readLine() == "mapped")
        #expect(try peer.wait() == .signaled(SIGBUS))
    }

    @Test("two unrelated processes exchange bytes through a named object")
    func acrossProcesses() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        let memory = try client.openSharedMemory("/exchange", options: .create)
        try memory.truncate(to: 4096)
        let mapping = try memory.map()
        put("ping", into: mapping, at: 0)
        let peer = try Child(testPeer, ["shm-named-exchange", "/exchange"], environment: broker.environment)
        #expect(try peer.readLine() == "read ping")
        #expect(try peer.readLine() == "done")
        #expect(try peer.wait() == .exited(0))
        #expect(bytesAt(mapping, 2048, 4) == "pong")
    }

    @Test("listing pages through many objects in name order")
    func listing() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        let names = (0..<120).map { "/object-\(String(1000 + $0))" }
        for name in names.shuffled() { _ = try client.openSharedMemory(name, options: .create) }
        #expect(try client.listSharedMemory().map(\.nameText) == names)
        #expect(try client.status().sharedMemoryObjects == 120)
        let cli = try run(patchbayCLI, ["shm", "ls", "--json"], environment: broker.environment)
        #expect(cli.standardOutput.contains("\"/object-1119\""))
    }

    @Test("a broker killed with SIGKILL and restarted finds every name, byte, size, owner and mode")
    func durableAcrossBrokerCrash() throws {
        let broker = try TestBroker()
        do {
            let client = try broker.connect()
            let first = try client.openSharedMemory("/durable/one", options: .create, mode: 0o640)
            try first.truncate(to: 3 * pageSize)
            put("survives a crash", into: try first.map(), at: pageSize)
            _ = try client.openSharedMemory("/durable/two", options: .create, mode: 0o604)
            try client.renameSharedMemory(from: "/durable/two", to: "/durable/three")
            _ = try client.openSharedMemory("/durable/gone", options: .create)
            try client.unlinkSharedMemory("/durable/gone")
        }
        kill(broker.pid, SIGKILL)
        _ = try waitForProcess(broker.pid)
        let restarted = try spawnDaemon(socketPath: broker.socketPath, sharedMemoryDirectory: broker.directory + "/shm")
        defer { kill(restarted, SIGTERM); _ = try? waitForProcess(restarted) }
        let client = try Broker(socketPath: broker.socketPath)
        let listed = try client.listSharedMemory()
        #expect(listed.map(\.nameText) == ["/durable/one", "/durable/three"])
        let one = try client.statSharedMemory("/durable/one")
        #expect(one.size == UInt64(3 * pageSize) && one.mode == 0o640 & ~currentUmaskForTests())
        #expect(one.uid == geteuid() && one.gid == getegid())
        #expect(try client.statSharedMemory("/durable/three").mode == 0o604 & ~currentUmaskForTests())
        let view = try client.openSharedMemory("/durable/one", access: .readOnly).map(writable: false)
        #expect(bytesAt(view, pageSize, 16) == "survives a crash")
    }

    @Test("memory is freed: no descriptor stays in the broker, unlinked objects leave no file")
    func freed() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        _ = try client.status()
        let baseline = try broker.descriptorCount()
        do {
            let memory = try client.openSharedMemory("/temp", options: .create)
            try memory.truncate(to: 1 << 20)
            _ = try memory.map()
            // The broker closes its copy of the handle right after sending it.
            let during = try broker.waitForDescriptorCount(baseline)
            let links = try descriptorLinks(broker.pid)
            #expect(during == baseline, "\(during) descriptors, baseline \(baseline): \(links)")
            #expect(try objectFiles(broker).count == 1)
            try client.unlinkSharedMemory("/temp")
            #expect(try objectFiles(broker).isEmpty)
        }
        #expect(try broker.descriptorCount() == baseline)
        #expect(try client.status().sharedMemoryObjects == 0)
    }

    @Test("the CLI: create, write, read, stat, mv, truncate, share, rm, new, with errors in the house format")
    func commandLine() throws {
        let broker = try TestBroker()
        let environment = broker.environment
        func cli(_ arguments: [String], input: String = "") throws -> Finished {
            try run(patchbayCLI, arguments, environment: environment, input: input)
        }
        #expect(try cli(["shm", "create", "/cli", "--size", "8k", "--mode", "0640"]).termination == .exited(0))
        #expect(try cli(["shm", "write", "/cli", "--offset", "4k"], input: "through the CLI").termination == .exited(0))
        #expect(try cli(["shm", "read", "/cli", "--offset", "4k", "--length", "15"]).standardOutput == "through the CLI")
        let stat = try cli(["shm", "stat", "/cli", "--json"]).standardOutput
        #expect(stat.contains("\"size\": 8192") && stat.contains("\"mode\": \"0640\""))
        #expect(try cli(["shm", "mv", "/cli", "/moved", "--no-replace"]).termination == .exited(0))
        #expect(try cli(["shm", "truncate", "/moved", "1M"]).termination == .exited(0))
        #expect(try broker.connect().statSharedMemory("/moved").size == 1 << 20)
        let key = try cli(["shm", "share", "/moved", "--read-only"]).standardOutput.trimmed
        let claimed = try SharedMemory(adopting: try broker.connect().claim(try Key(parsing: key)))
        let claimedWritable = claimed.isWritable
        #expect(!claimedWritable)
        #expect(bytesAt(try claimed.map(writable: false), 4096, 15) == "through the CLI")
        let anonymousKey = try cli(["shm", "new", "--size", "10000"]).standardOutput.trimmed
        let anonymous = try SharedMemory(adopting: try broker.connect().claim(try Key(parsing: anonymousKey)))
        #expect(anonymous.kind == .anonymous)
        #expect(try anonymous.size == 3 * pageSize)
        #expect(try cli(["shm", "rm", "/moved"]).termination == .exited(0))
        let missing = try cli(["shm", "rm", "/moved"])
        #expect(missing.termination == .exited(1))
        #expect(missing.standardError.hasPrefix("patchbay: shm rm: ENOENT: "))
        let exists = try cli(["shm", "create", "/x", "--exclusive"])
        #expect(exists.termination == .exited(0))
        #expect(try cli(["shm", "create", "/x", "--exclusive"]).standardError.hasPrefix("patchbay: shm create: EEXIST: "))
        #expect(try cli(["shm", "create", "x"]).standardError.hasPrefix("patchbay: shm create: EINVAL: "))
        // Both rename flags: a usage error that names the flags as they are written.
        let both = try cli(["shm", "mv", "/x", "/y", "--no-replace", "--exchange"])
        #expect(both.termination == .exited(64))
        #expect(both.standardError.contains("--no-replace and --exchange exclude each other"), "\(both.standardError)")
    }
}

/// The object files in a test broker's store.
func objectFiles(_ broker: TestBroker) throws -> [String] {
    try directoryEntries(broker.directory + "/shm/objects")
}

/// The names in a directory, without "." and "..".
func directoryEntries(_ path: String) throws -> [String] {
    guard let directory = opendir(path) else { throw Errno.current }
    defer { closedir(directory) }
    var names: [String] = []
    while let entry = readdir(directory) {
        let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        if name != "." && name != ".." { names.append(name) }
    }
    return names
}

/// The test process's umask, read without changing it.
func currentUmaskForTests() -> UInt32 {
    let status = (try? openFile("/proc/self/status", flags: O_RDONLY).readToEnd()) ?? []
    for line in String(decoding: status, as: UTF8.self).split(separator: "\n") where line.hasPrefix("Umask:") {
        return UInt32(String(line.dropFirst(6)).trimmed, radix: 8) ?? 0o022
    }
    return 0o022
}

/// Where each of a process's descriptors points, for failure messages.
func descriptorLinks(_ pid: pid_t) throws -> [String] {
    guard let directory = opendir("/proc/\(pid)/fd") else { throw Errno.current }
    defer { closedir(directory) }
    var links: [String] = []
    while let entry = readdir(directory) {
        let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        if name == "." || name == ".." { continue }
        var buffer = [CChar](repeating: 0, count: 4096)
        let length = readlink("/proc/\(pid)/fd/\(name)", &buffer, 4095)
        links.append(name + "->" + (length > 0 ? String(decoding: buffer[0..<length].map { UInt8(bitPattern: $0) }, as: UTF8.self) : "?"))
    }
    return links
}
