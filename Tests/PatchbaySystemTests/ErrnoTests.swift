// errno: names, the EINTR retry loop, and what failing calls report.
import Glibc
import PatchbaySystem
import SystemPackage
import Testing

@Suite("Errno mapping")
struct ErrnoTests {
    @Test("every errno the broker reports has its C name; unknown ones print as E<number>")
    func names() {
        let expected: [(CInt, String)] = [
            (EPERM, "EPERM"), (ENOENT, "ENOENT"), (EINTR, "EINTR"), (EBADF, "EBADF"), (EAGAIN, "EAGAIN"),
            (ENOMEM, "ENOMEM"), (EACCES, "EACCES"), (EEXIST, "EEXIST"), (ENOTDIR, "ENOTDIR"),
            (EISDIR, "EISDIR"), (EINVAL, "EINVAL"), (EMFILE, "EMFILE"), (ENFILE, "ENFILE"), (ENOSPC, "ENOSPC"),
            (EPIPE, "EPIPE"), (ENAMETOOLONG, "ENAMETOOLONG"), (ENOSYS, "ENOSYS"), (ENOTSOCK, "ENOTSOCK"),
            (EMSGSIZE, "EMSGSIZE"), (EADDRINUSE, "EADDRINUSE"), (ECONNRESET, "ECONNRESET"),
            (ENOBUFS, "ENOBUFS"), (ENOTCONN, "ENOTCONN"), (ETIMEDOUT, "ETIMEDOUT"),
            (ECONNREFUSED, "ECONNREFUSED"), (EDQUOT, "EDQUOT"), (EPROTO, "EPROTO"), (ECANCELED, "ECANCELED"),
            (EOVERFLOW, "EOVERFLOW"), (EBADMSG, "EBADMSG"), (EFBIG, "EFBIG"), (EBUSY, "EBUSY"),
        ]
        for (code, name) in expected {
            #expect(Errno(rawValue: code).name == name)
        }
        // EWOULDBLOCK is EAGAIN on Linux, and prints as such.
        #expect(Errno.wouldBlock.name == "EAGAIN")
        #expect(Errno(rawValue: 4095).name == "E4095")
    }

    @Test("Errno.current is the calling thread's errno after a failed call")
    func current() {
        #expect(close(-1) == -1)
        #expect(Errno.current == .badFileDescriptor)
        #expect(access("/nonexistent/patchbay", F_OK) == -1)
        #expect(Errno.current == .noSuchFileOrDirectory)
    }

    @Test("errno is per thread")
    func perThread() throws {
        errno = EDQUOT
        let done = try EventCounter()
        let number = done.descriptor.rawValue
        startThread {
            errno = EPROTO
            var value: UInt64 = errno == EPROTO ? 1 : 2
            _ = write(number, &value, 8)
        }
        #expect(try done.consume() == 1)
        #expect(Errno.current == .diskQuotaExceeded)
    }

    @Test("syscallRetrying retries EINTR, throws any other errno, and returns a success untouched")
    func retrying() {
        var calls = 0
        let result = try? syscallRetrying { () -> CInt in
            calls += 1
            if calls < 3 {
                errno = EINTR
                return -1
            }
            return 17
        }
        #expect(result == 17)
        #expect(calls == 3)

        calls = 0
        expectErrno(.messageTooLong) { () throws(Errno) in
            _ = try syscallRetrying { () -> Int in
                calls += 1
                errno = EMSGSIZE
                return -1
            }
        }
        #expect(calls == 1, "only EINTR is retried")

        // Other negative values are results, not failures (only -1 is).
        #expect((try? syscallRetrying { () -> Int in -2 }) == -2)
        #expect((try? syscallRetrying { () -> Int in 0 }) == 0)
    }

    @Test("failing wrappers surface the kernel's errno unchanged")
    func wrappersReportErrno() throws {
        let directory = makeTemporaryDirectory()
        defer { removeTree(directory) }
        expectErrno(.noSuchFileOrDirectory) { () throws(Errno) in _ = try openFile(directory + "/no/such", flags: O_RDONLY) }
        expectErrno(.notDirectory) { () throws(Errno) in _ = try openFile("/dev/null", flags: O_RDONLY | O_DIRECTORY) }
        expectErrno(.invalidArgument) { () throws(Errno) in _ = try makeMemoryFile(name: String(repeating: "n", count: 300), sealable: false) }
        let pipe = try Pipe()
        expectErrno(.invalidArgument) { () throws(Errno) in try pipe.readEnd.truncate(to: 0) }
        expectErrno(.illegalSeek) { () throws(Errno) in try write([1], to: pipe.writeEnd, at: 0) }
        expectErrno(.badFileDescriptor) { () throws(Errno) in try write([1], to: pipe.readEnd) }
        expectErrno(.invalidArgument) { () throws(Errno) in _ = try pipe.readEnd.seals() }
    }

    @Test("secureRandomBytes fills the whole buffer")
    func randomBytes() throws {
        var first = [UInt8](repeating: 0, count: 4096)
        var second = [UInt8](repeating: 0, count: 4096)
        try first.withUnsafeMutableBytes { raw in try secureRandomBytes(into: raw) }
        try second.withUnsafeMutableBytes { raw in try secureRandomBytes(into: raw) }
        #expect(first != second)
        // Every 64-byte stretch got bytes (all zero by chance: 2^-512).
        for start in stride(from: 0, to: 4096, by: 64) {
            #expect(first[start..<start + 64].contains { $0 != 0 })
        }
    }
}
