// memfd: seals, mappings, status.
import Glibc
import PatchbaySystem
import SystemPackage
import Testing

@Suite("Memory files: seals and mappings")
struct MemoryFileTests {
    @Test("a memfd made without sealing carries F_SEAL_SEAL and refuses seals")
    func unsealable() throws {
        let memory = try makeMemoryFile(name: "patchbay-systest-plain", sealable: false)
        #expect(try memory.seals() == .seal)
        expectErrno(.notPermitted) { () throws(Errno) in try memory.addSeals(.grow) }
        // Still an ordinary, growable file.
        try memory.truncate(to: 3 * pageSize)
        #expect(try memory.size() == 3 * pageSize)
    }

    @Test("shrink and grow seals fix the size; seals accumulate; F_SEAL_SEAL freezes the set")
    func sizeSeals() throws {
        let memory = try makeMemoryFile(name: "patchbay-systest-size", sealable: true)
        #expect(try memory.seals() == [])
        try memory.truncate(to: 2 * pageSize)
        try memory.addSeals(.shrink)
        #expect(try memory.seals() == .shrink)
        expectErrno(.notPermitted) { () throws(Errno) in try memory.truncate(to: pageSize) }
        try memory.truncate(to: 4 * pageSize)  // growing is still allowed
        try memory.addSeals(.grow)
        #expect(try memory.seals() == [.shrink, .grow])
        expectErrno(.notPermitted) { () throws(Errno) in try memory.truncate(to: 5 * pageSize) }
        expectErrno(.notPermitted) { () throws(Errno) in try memory.truncate(to: pageSize) }
        try memory.truncate(to: 4 * pageSize)  // the same size is no change
        // Writing inside the size is fine; writing past the end would grow it.
        try write([UInt8](repeating: 1, count: 10), to: memory, at: 0)
        expectErrno(.notPermitted) { () throws(Errno) in
            try write([UInt8](repeating: 1, count: 10), to: memory, at: 4 * pageSize)
        }
        try memory.addSeals(.seal)
        #expect(try memory.seals() == [.shrink, .grow, .seal])
        expectErrno(.notPermitted) { () throws(Errno) in try memory.addSeals(.write) }
        #expect(try memory.size() == 4 * pageSize)
    }

    @Test("F_SEAL_WRITE needs every writable mapping gone, then forbids writes and writable maps")
    func writeSeal() throws {
        let memory = try makeMemoryFile(name: "patchbay-systest-write", sealable: true)
        try memory.truncate(to: pageSize)
        do {
            let writable = try Mapping(memory, length: pageSize, writable: true)
            writable.mutableBytes[0] = 0x5A
            expectErrno(.resourceBusy) { () throws(Errno) in try memory.addSeals(.write) }
        }
        // The mapping ended (munmap at deinit): now the seal goes on.
        try memory.addSeals(.write)
        #expect(try memory.seals() == .write)
        expectErrno(.notPermitted) { () throws(Errno) in _ = try Mapping(memory, length: pageSize, writable: true) }
        expectErrno(.notPermitted) { () throws(Errno) in try write([1], to: memory, at: 0) }
        let readable = try Mapping(memory, length: pageSize, writable: false)
        #expect(readable.bytes[0] == 0x5A)
        #expect(readable.count == pageSize)
    }

    @Test("F_SEAL_FUTURE_WRITE keeps existing writable mappings and refuses new writers")
    func futureWriteSeal() throws {
        let memory = try makeMemoryFile(name: "patchbay-systest-future", sealable: true)
        try memory.truncate(to: pageSize)
        let writable = try Mapping(memory, length: pageSize, writable: true)
        try memory.addSeals(.futureWrite)
        #expect(try memory.seals() == .futureWrite)
        writable.mutableBytes[1] = 0x77  // the existing mapping still writes
        expectErrno(.notPermitted) { () throws(Errno) in _ = try Mapping(memory, length: pageSize, writable: true) }
        expectErrno(.notPermitted) { () throws(Errno) in try write([1], to: memory, at: 0) }
        let readable = try Mapping(memory, length: pageSize, writable: false)
        #expect(readable.bytes[1] == 0x77)
    }

    @Test("status reports size, allocated blocks, owner, mode and link count of a memfd")
    func status() throws {
        let name = "patchbay-systest-status"
        let memory = try makeMemoryFile(name: name, sealable: false)
        #expect(memory.procLink() == "/memfd:\(name) (deleted)")
        try memory.truncate(to: 16 * pageSize)
        let sparse = try memory.status()
        #expect(sparse.size == 16 * pageSize)
        #expect(sparse.blocks == 0, "a truncated memfd allocates nothing")
        #expect(sparse.uid == geteuid())
        #expect(sparse.gid == getegid())
        #expect(sparse.mode & UInt32(S_IFMT) == UInt32(S_IFREG))
        #expect(sparse.linkCount == 0)

        // Touch two pages through a mapping: exactly those are allocated.
        let mapping = try Mapping(memory, length: 16 * pageSize, writable: true)
        mapping.mutableBytes[0] = 1
        mapping.mutableBytes[5 * pageSize] = 1
        let touched = try memory.status()
        #expect(touched.blocks * 512 == 2 * pageSize)
        #expect(touched.inode == sparse.inode && touched.device == sparse.device)
        let identity = try memory.identity()
        #expect(identity.inode == touched.inode && identity.device == touched.device)
    }

    @Test("a mapping at an offset sees the file's bytes at that offset; a mapping past the end fails")
    func mappingOffset() throws {
        let memory = try makeMemoryFile(name: "patchbay-systest-offset", sealable: false)
        try memory.truncate(to: 2 * pageSize)
        try write([9, 8, 7], to: memory, at: pageSize)
        let second = try Mapping(memory, length: pageSize, offset: pageSize, writable: false)
        #expect(Array(second.bytes.prefix(3)) == [9, 8, 7])
        expectErrno(.invalidArgument) { () throws(Errno) in
            _ = try Mapping(memory, length: pageSize, offset: 1, writable: false)
        }
        let pipe = try Pipe()
        expectErrno(.operationNotSupportedByDevice) { () throws(Errno) in _ = try Mapping(pipe.readEnd, length: pageSize, writable: false) }
    }
}

@Suite("File locks")
struct FileLockTests {
    @Test("FileLock is exclusive across open files, even in one process, until the value ends")
    func flockExclusion() throws {
        let directory = makeTemporaryDirectory()
        defer { removeTree(directory) }
        let path = directory + "/lock"
        do {
            let held = try FileLock(path: path, wait: false)
            expectErrno(.resourceTemporarilyUnavailable) { () throws(Errno) in _ = try FileLock(path: path, wait: false) }
            // Another open file description sees it held too.
            let other = try openFile(path, flags: O_RDONLY)
            #expect(flock(other.rawValue, LOCK_EX | LOCK_NB) == -1 && Errno.current == .wouldBlock)
            _ = consume held
            #expect(acquiresLock(other.rawValue), "the lock was not released at deinit")
            #expect(flock(other.rawValue, LOCK_UN) == 0)
        }
        _ = try FileLock(path: path, wait: false)
        // Created private, and never through a symbolic link.
        var info = stat()
        #expect(lstat(path, &info) == 0 && info.st_mode & 0o777 == 0o600)
        #expect(symlink(path, directory + "/link") == 0)
        expectErrno(.tooManySymbolicLinkLevels) { () throws(Errno) in _ = try FileLock(path: directory + "/link", wait: false) }
    }

    @Test("a waiting FileLock blocks until the holder lets go")
    func waitingLock() throws {
        let directory = makeTemporaryDirectory()
        defer { removeTree(directory) }
        let path = directory + "/lock"
        let order = try EventCounter(nonblocking: true)
        let orderNumber = order.descriptor.rawValue
        let started = try EventCounter()
        let startedNumber = started.descriptor.rawValue
        let finished = try EventCounter()
        let finishedNumber = finished.descriptor.rawValue
        do {
            let held = try FileLock(path: path, wait: false)
            startThread {
                var one: UInt64 = 1
                _ = write(startedNumber, &one, 8)
                let lock = try? FileLock(path: path, wait: true)
                // Reached only after the holder released: the order counter is 1 by then.
                var seen: UInt64 = 0
                _ = read(orderNumber, &seen, 8)
                var result: UInt64 = lock != nil && seen == 1 ? 1 : 2
                _ = write(finishedNumber, &result, 8)
            }
            _ = try started.consume()
            try order.signal(1)
            _ = consume held
        }
        #expect(try finished.consume() == 1)
    }

    @Test("POSIX record locks belong to the process: seen by OFD locks, released by any close of the file")
    func posixRecordLocks() throws {
        let directory = makeTemporaryDirectory()
        defer { removeTree(directory) }
        let path = directory + "/data"
        let file = try openFile(path, flags: O_RDWR | O_CREAT)
        let observer = try openFile(path, flags: O_RDWR)
        #expect(ofdProbe(observer.rawValue) == nil)

        try file.lockFile()
        // An open-file-description lock conflicts with the process's POSIX lock.
        let holder = ofdProbe(observer.rawValue)
        #expect(holder?.type == Int16(F_WRLCK))
        #expect(holder?.pid == getpid())
        #expect(ofdTryLock(observer.rawValue) == EAGAIN)
        // A second POSIX lock by the same process is no conflict.
        try observer.lockFile()

        file.unlockFile()
        #expect(ofdProbe(observer.rawValue) == nil)

        // The classic trap: closing any descriptor of the file drops the process's lock.
        try file.lockFile()
        #expect(ofdProbe(observer.rawValue) != nil)
        do { _ = try openFile(path, flags: O_RDONLY) }  // opened and closed again
        #expect(ofdProbe(observer.rawValue) == nil)
    }
}

/// Whether an exclusive `flock` on `fd` is granted within 10 s. Taken blocking, in a helper
/// thread: a lock released by a close can linger an instant while another thread of this process
/// spawns a child (the child holds copies of all descriptors until its exec).
private func acquiresLock(_ fd: CInt) -> Bool {
    guard let done = try? EventCounter() else { return false }
    let doneNumber = done.descriptor.rawValue
    startThread {
        var result: UInt64 = flock(fd, LOCK_EX) == 0 ? 1 : 2
        _ = write(doneNumber, &result, 8)
    }
    guard pollEvents(doneNumber, milliseconds: 10_000) != 0 else {
        _ = done.release()  // the helper may still write to it: leave it open
        return false
    }
    return (try? done.consume()) == 1
}

// F_OFD_GETLK / F_OFD_SETLK (Linux 3.15): not exported without _GNU_SOURCE.
private let fcntlOFDGetLock: CInt = 36
private let fcntlOFDSetLock: CInt = 37

/// Who holds a lock that would conflict with a write lock on the whole file, seen through `fd`'s
/// open file description; nil when nothing conflicts.
private func ofdProbe(_ fd: CInt) -> (type: Int16, pid: pid_t)? {
    var lock = flock()
    lock.l_type = Int16(F_WRLCK)
    lock.l_whence = Int16(SEEK_SET)
    guard fcntl(fd, fcntlOFDGetLock, &lock) == 0 else { return (-1, -1) }
    return lock.l_type == Int16(F_UNLCK) ? nil : (lock.l_type, lock.l_pid)
}

/// Tries an OFD write lock; 0 or the errno.
private func ofdTryLock(_ fd: CInt) -> CInt {
    var lock = flock()
    lock.l_type = Int16(F_WRLCK)
    lock.l_whence = Int16(SEEK_SET)
    return fcntl(fd, fcntlOFDSetLock, &lock) == 0 ? 0 : errno
}
