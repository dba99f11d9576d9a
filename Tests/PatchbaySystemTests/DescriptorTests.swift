// Descriptor ownership and the small file helpers, on real descriptors.
import Glibc
import PatchbaySystem
import SystemPackage
import Testing

@Suite("Descriptor: ownership and file helpers")
struct DescriptorTests {
    @Test("a Descriptor closes its file when the value ends, and only then")
    func closesOnDeinit() throws {
        var links: Set<String> = []
        do {
            let pipe = try Pipe()
            let pair = try SeqpacketSocket.pair()
            let memory = try makeMemoryFile(name: "patchbay-systest-deinit-\(getpid())-\(monotonicNanoseconds())",
                                            sealable: false)
            for link in [pipe.readEnd.procLink(), pipe.writeEnd.procLink(), pair.first.descriptor.procLink(),
                         pair.second.descriptor.procLink(), memory.procLink()] {
                let target = try #require(link)
                links.insert(target)
            }
            // A pipe's two ends share one inode link; the socket pair has two, the memfd one.
            #expect(links.count == 4)
            #expect(openCount(of: links) == 5)
        }
        #expect(openCount(of: links) == 0, "every descriptor closed when its value ended")
    }

    @Test("a descriptor passed by `consuming` is closed by its new owner; release() hands it over unclosed")
    func consumingAndRelease() throws {
        let pipe = try Pipe()
        let maybeLink = pipe.readEnd.procLink()
        let link = try #require(maybeLink)
        #expect(openCount(of: [link]) == 2)

        func takeAndDrop(_ descriptor: consuming Descriptor) {}
        takeAndDrop(pipe.writeEnd)
        #expect(openCount(of: [link]) == 1)
        // The write end is gone for good: the read end sees end of file.
        #expect(reachesEndOfFile(pipe.readEnd.rawValue))

        let raw = pipe.readEnd.release()
        #expect(openCount(of: [link]) == 1, "release() must not close")
        #expect(fcntl(raw, F_GETFD) >= 0)
        #expect(close(raw) == 0)
        #expect(openCount(of: [link]) == 0)
    }

    @Test("anonymous descriptors (eventfd, epoll) are closed at deinit: a duplicate stops matching them")
    func anonymousDescriptorsClose() throws {
        // kcmp compares open file descriptions; a duplicate made first keeps the file alive, so
        // the original number, once closed (or reused by a parallel test), no longer matches it.
        let eventNumber: CInt
        let eventWitness: Descriptor
        let epollNumber: CInt
        let epollWitness: Descriptor
        do {
            let counter = try EventCounter()
            let epoll = try Epoll()
            eventNumber = counter.descriptor.rawValue
            epollNumber = epoll.descriptorNumber
            eventWitness = try duplicateDescriptor(eventNumber)
            epollWitness = try duplicateDescriptor(epollNumber)
            let comparable = Descriptor.sameOpenFile(eventNumber, eventWitness.rawValue)
            try #require(comparable != nil, "kcmp is unavailable here")
            #expect(comparable == true)
            #expect(Descriptor.sameOpenFile(epollNumber, epollWitness.rawValue) == true)
            #expect(Descriptor.sameOpenFile(eventNumber, epollWitness.rawValue) == false)
        }
        #expect(Descriptor.sameOpenFile(eventNumber, eventWitness.rawValue) != true)
        #expect(Descriptor.sameOpenFile(epollNumber, epollWitness.rawValue) != true)
    }

    @Test("a spawned child gets exactly the descriptors mapped for it; openDescriptorCount counts its table")
    func descriptorsOfChild() throws {
        let input = try Pipe()
        let output = try Pipe()
        let extra = try makeMemoryFile(name: "patchbay-systest-extra-\(getpid())", sealable: false)
        let hidden = try makeMemoryFile(name: "patchbay-systest-hidden-\(getpid())", sealable: false)
        let links = [input.readEnd.procLink(), output.writeEnd.procLink(), extra.procLink(), hidden.procLink()]
        let inputLink = try #require(links[0])
        let outputLink = try #require(links[1])
        let extraLink = try #require(links[2])
        let hiddenLink = try #require(links[3])
        // cat gets stdin, stdout, stderr and one more at 7.
        let pid = try spawnProcess(
            path: "/bin/cat", arguments: [], environment: [],
            descriptors: [0: input.readEnd.rawValue, 1: output.writeEnd.rawValue, 2: output.writeEnd.rawValue,
                          7: extra.rawValue])
        _ = consume input.readEnd
        _ = consume output.writeEnd
        // One round trip: cat is past its start-up and blocked reading its stdin.
        try input.writeEnd.writeAll(Array("ping\n".utf8))
        var echoed: [UInt8] = []
        while echoed.count < 5 {
            let chunk = try read(5 - echoed.count, from: output.readEnd)
            try #require(!chunk.isEmpty)
            echoed += chunk
        }
        #expect(echoed == Array("ping\n".utf8))

        let table = descriptorTargets(pid: pid)
        #expect(table[0] == inputLink)
        #expect(table[1] == outputLink && table[2] == outputLink)
        #expect(table[7] == extraLink)
        // Close-on-exec descriptors stay behind. (The test harness may pass the child
        // descriptors it inherited without FD_CLOEXEC, so the table is not compared whole.)
        #expect(!table.values.contains(hiddenLink))
        #expect(table.values.filter { $0 == extraLink || $0 == inputLink }.count == 2, "no scratch copies left")
        #expect(try openDescriptorCount(pid: pid) == table.count)

        _ = consume input.writeEnd
        #expect(try waitForProcess(pid) == .exited(0))
        expectErrno(.noSuchFileOrDirectory) { () throws(Errno) in _ = try openDescriptorCount(pid: pid) }
    }

    @Test("duplicateDescriptor gives a close-on-exec descriptor for the same open file description")
    func duplicateSharesOffset() throws {
        let directory = makeTemporaryDirectory()
        defer { removeTree(directory) }
        let file = try openFile(directory + "/f", flags: O_RDWR | O_CREAT | O_EXCL)
        try file.writeAll(Array("0123456789".utf8))
        #expect(try file.isCloseOnExec())
        let copy = try duplicateDescriptor(file.rawValue)
        #expect(copy.rawValue != file.rawValue)
        #expect(try copy.isCloseOnExec())
        #expect(Descriptor.sameOpenFile(file.rawValue, copy.rawValue) == true)
        // One offset: seeking through the copy moves the original.
        #expect(lseek(copy.rawValue, 3, SEEK_SET) == 3)
        #expect(try read(4, from: file) == Array("3456".utf8))
        // A second open of the same path is another open file description.
        let other = try openFile(directory + "/f", flags: O_RDONLY)
        #expect(Descriptor.sameOpenFile(file.rawValue, other.rawValue) == false)
        #expect(try other.identity() == (try file.identity()))
        expectErrno(.badFileDescriptor) { () throws(Errno) in _ = try duplicateDescriptor(-1) }
    }

    @Test("close-on-exec can be cleared; non-blocking mode turns an empty read into EAGAIN")
    func flagsAndNonblocking() throws {
        let pipe = try Pipe()
        #expect(try pipe.readEnd.isCloseOnExec())
        try pipe.readEnd.clearCloseOnExec()
        #expect(try !pipe.readEnd.isCloseOnExec())

        try pipe.readEnd.setNonblocking(true)
        #expect(fcntl(pipe.readEnd.rawValue, F_GETFL) & O_NONBLOCK != 0)
        expectErrno(.resourceTemporarilyUnavailable) { () throws(Errno) in _ = try read(1, from: pipe.readEnd) }
        try pipe.writeEnd.writeAll([42])
        #expect(try read(1, from: pipe.readEnd) == [42])
        try pipe.readEnd.setNonblocking(false)
        #expect(fcntl(pipe.readEnd.rawValue, F_GETFL) & O_NONBLOCK == 0)
        #expect(try pipe.readEnd.accessMode() == O_RDONLY)
        #expect(try pipe.writeEnd.accessMode() == O_WRONLY)
    }

    @Test("fileKind tells every kind of descriptor apart")
    func fileKinds() throws {
        let directory = makeTemporaryDirectory()
        defer { removeTree(directory) }
        let pipe = try Pipe()
        let pair = try SeqpacketSocket.pair()
        let regular = try openFile(directory + "/f", flags: O_RDWR | O_CREAT)
        let folder = try openFile(directory, flags: O_RDONLY | O_DIRECTORY)
        let null = try openFile("/dev/null", flags: O_RDWR)
        let counter = try EventCounter()
        let memory = try makeMemoryFile(name: "kind", sealable: false)
        #expect(try pipe.readEnd.fileKind() == .pipe)
        #expect(try pair.first.descriptor.fileKind() == .socket)
        #expect(try regular.fileKind() == .regular)
        #expect(try folder.fileKind() == .directory)
        #expect(try null.fileKind() == .characterDevice)
        #expect(try counter.descriptor.fileKind() == .anonymous)
        #expect(try memory.fileKind() == .regular)
        #expect(FileKind(mode: S_IFLNK | 0o777) == .symbolicLink)
        #expect(FileKind(mode: S_IFBLK) == .blockDevice)
        #expect(Set(FileKind.allCases.map(\.name)).count == FileKind.allCases.count)
    }

    @Test("readToEnd honours its limit; writeAll, pread and pwrite move exactly the bytes asked")
    func readWriteHelpers() throws {
        let memory = try makeMemoryFile(name: "rw", sealable: false)
        let payload = (0..<200_000).map { UInt8(truncatingIfNeeded: $0 &* 31) }
        try memory.writeAll(payload)
        #expect(try memory.size() == payload.count)
        #expect(lseek(memory.rawValue, 0, SEEK_SET) == 0)
        #expect(try memory.readToEnd(limit: 70_000) == Array(payload[0..<70_000]))
        #expect(try memory.readToEnd() == Array(payload[70_000...]))

        let written = try write([1, 2, 3], to: memory, at: 10)
        #expect(written == 3)
        let back = try read(5, from: memory, at: 9)
        #expect(back == [payload[9], 1, 2, 3, payload[13]])
        // pread/pwrite left the offset at the end.
        #expect(lseek(memory.rawValue, 0, SEEK_CUR) == off_t(payload.count))
    }

    @Test("openFile reports ENOENT, EISDIR and EEXIST; openFile(in:) refuses symbolic links")
    func openErrors() throws {
        let directory = makeTemporaryDirectory()
        defer { removeTree(directory) }
        expectErrno(.noSuchFileOrDirectory) { () throws(Errno) in _ = try openFile(directory + "/missing", flags: O_RDONLY) }
        expectErrno(.isDirectory) { () throws(Errno) in _ = try openFile(directory, flags: O_WRONLY) }
        _ = try openFile(directory + "/f", flags: O_RDWR | O_CREAT | O_EXCL, mode: 0o640)
        expectErrno(.fileExists) { () throws(Errno) in _ = try openFile(directory + "/f", flags: O_RDWR | O_CREAT | O_EXCL) }
        var info = stat()
        #expect(lstat(directory + "/f", &info) == 0)
        #expect(info.st_mode & 0o777 == 0o640 & ~currentUmask())

        #expect(symlink(directory + "/f", directory + "/link") == 0)
        let folder = try openFile(directory, flags: O_RDONLY | O_DIRECTORY)
        expectErrno(.tooManySymbolicLinkLevels) { () throws(Errno) in _ = try openFile(in: folder, "link", flags: O_RDONLY) }
        let through = try openFile(in: folder, "f", flags: O_RDONLY)
        #expect(try through.fileKind() == .regular)
    }

    @Test("prepareDirectory creates private directories and refuses unsafe ones")
    func prepareDirectoryChecks() throws {
        let base = makeTemporaryDirectory()
        defer { removeTree(base) }
        try prepareDirectory(base + "/private", mode: 0o700, owner: geteuid(), private: true)
        var info = stat()
        #expect(lstat(base + "/private", &info) == 0 && info.st_mode & 0o7777 == 0o700)
        // Again, on the existing directory: fine.
        try prepareDirectory(base + "/private", mode: 0o700, owner: geteuid(), private: true)

        func problem(_ body: () throws(DirectoryProblem) -> Void) -> Errno? {
            do { try body(); return nil } catch { return error.errno }
        }
        #expect(mkdir(base + "/open", 0o755) == 0 && chmod(base + "/open", 0o755) == 0)
        #expect(problem { () throws(DirectoryProblem) in
            try prepareDirectory(base + "/open", mode: 0o700, owner: geteuid(), private: true)
        } == .permissionDenied)
        // Shared directories may be readable, not writable by others unless sticky.
        try prepareDirectory(base + "/open", mode: 0o755, owner: geteuid(), private: false)
        #expect(chmod(base + "/open", 0o777) == 0)
        #expect(problem { () throws(DirectoryProblem) in
            try prepareDirectory(base + "/open", mode: 0o755, owner: geteuid(), private: false)
        } == .permissionDenied)
        #expect(chmod(base + "/open", 0o1777) == 0)
        try prepareDirectory(base + "/open", mode: 0o755, owner: geteuid(), private: false)
        // Someone else's directory.
        #expect(problem { () throws(DirectoryProblem) in
            try prepareDirectory(base + "/open", mode: 0o755, owner: geteuid() &+ 12345, private: false)
        } == .permissionDenied)
        // A symbolic link in the way.
        #expect(symlink(base + "/private", base + "/link") == 0)
        #expect(problem { () throws(DirectoryProblem) in
            try prepareDirectory(base + "/link", mode: 0o700, owner: geteuid(), private: true)
        } == .notDirectory)
        #expect(problem { () throws(DirectoryProblem) in
            try prepareDirectory(base + "/missing/child", mode: 0o700, owner: geteuid(), private: true)
        } == .noSuchFileOrDirectory)
    }

    @Test("environment(applying:) overrides, adds and removes variables")
    func environmentOverrides() {
        setenv("PATCHBAY_SYSTEST_KEEP", "1", 1)
        setenv("PATCHBAY_SYSTEST_DROP", "2", 1)
        setenv("PATCHBAY_SYSTEST_CHANGE", "3", 1)
        let result = PatchbaySystem.environment(applying: [
            "PATCHBAY_SYSTEST_DROP": nil, "PATCHBAY_SYSTEST_CHANGE": "x=y", "PATCHBAY_SYSTEST_NEW": "4",
        ])
        #expect(result.contains("PATCHBAY_SYSTEST_KEEP=1"))
        #expect(!result.contains { $0.hasPrefix("PATCHBAY_SYSTEST_DROP=") })
        #expect(result.filter { $0.hasPrefix("PATCHBAY_SYSTEST_CHANGE=") } == ["PATCHBAY_SYSTEST_CHANGE=x=y"])
        #expect(result.contains("PATCHBAY_SYSTEST_NEW=4"))
    }

    @Test("Lock is recursive and keeps two threads' updates from interleaving")
    func recursiveLock() throws {
        let lock = Lock()
        let depth = lock.locked { lock.locked { lock.locked { 3 } } }
        #expect(depth == 3)

        // Two threads add to one plain (non-atomic) counter under the lock: no update is lost.
        let counter = Handoff(value: UnsafeMutablePointer<Int>.allocate(capacity: 1))
        counter.value.initialize(to: 0)
        defer { counter.value.deallocate() }
        let done = try EventCounter()
        let doneNumber = done.descriptor.rawValue
        for _ in 0..<2 {
            startThread {
                for _ in 0..<200_000 {
                    lock.locked { counter.value.pointee += 1 }
                }
                var one: UInt64 = 1
                _ = write(doneNumber, &one, 8)
            }
        }
        var finished: UInt64 = 0
        while finished < 2 { finished += try done.consume() }
        #expect(lock.locked { counter.value.pointee } == 400_000)
    }
}

/// This process's umask, read without changing it (`umask(2)` would race other tests).
private func currentUmask() -> mode_t {
    guard let file = fopen("/proc/self/status", "r") else { return 0o022 }
    defer { fclose(file) }
    var line = [CChar](repeating: 0, count: 512)
    while fgets(&line, CInt(line.count), file) != nil {
        let text = String(decoding: line.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        if text.hasPrefix("Umask:") {
            let digits = text.dropFirst("Umask:".count).trimmingPrefix(while: { $0 == " " || $0 == "\t" })
            return mode_t(digits.prefix { $0.isNumber }, radix: 8) ?? 0o022
        }
    }
    return 0o022
}
