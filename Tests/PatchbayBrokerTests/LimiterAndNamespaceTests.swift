// The failed-claim limiter (a token bucket per uid) and the broker's namespace paths.
@testable import PatchbayBroker
import PatchbayProtocol
import SystemPackage
import Testing

private let second: UInt64 = 1_000_000_000

@Suite("UidTokenBucket")
struct UidTokenBucketTests {
    @Test("a full bucket allows `burst` failures, then refuses until a token refills")
    func burstThenRefuse() {
        let limiter = UidTokenBucket(burst: 3, refillPerSecond: 2)
        let t0: UInt64 = 50 * second
        for _ in 0..<3 {
            #expect(limiter.hasToken(uid: 7, now: t0))
            limiter.spendToken(uid: 7, now: t0)
        }
        #expect(!limiter.hasToken(uid: 7, now: t0))
        #expect(limiter.millisecondsUntilNextToken(uid: 7, now: t0) == 500)
        #expect(!limiter.hasToken(uid: 7, now: t0 + second / 4))
        #expect(limiter.millisecondsUntilNextToken(uid: 7, now: t0 + second / 4) == 250)
        #expect(limiter.hasToken(uid: 7, now: t0 + second / 2))
        #expect(limiter.millisecondsUntilNextToken(uid: 7, now: t0 + second / 2) == 0)
        // Only one token came back.
        limiter.spendToken(uid: 7, now: t0 + second / 2)
        #expect(!limiter.hasToken(uid: 7, now: t0 + second / 2))
    }

    @Test("refill stops at the burst, however long the uid stayed away")
    func refillCapsAtBurst() {
        let limiter = UidTokenBucket(burst: 2, refillPerSecond: 100)
        limiter.spendToken(uid: 1, now: 0)
        limiter.spendToken(uid: 1, now: 0)
        #expect(!limiter.hasToken(uid: 1, now: 0))
        let later: UInt64 = 3_600 * second
        limiter.spendToken(uid: 1, now: later)
        limiter.spendToken(uid: 1, now: later)
        #expect(!limiter.hasToken(uid: 1, now: later), "more than `burst` tokens accumulated")
    }

    @Test("failures on an empty bucket run up no debt")
    func noDebt() {
        let limiter = UidTokenBucket(burst: 1, refillPerSecond: 1)
        for _ in 0..<10 { limiter.spendToken(uid: 5, now: 0) }
        #expect(!limiter.hasToken(uid: 5, now: second / 2))
        #expect(limiter.hasToken(uid: 5, now: second))
    }

    @Test("each uid has its own bucket")
    func perUID() {
        let limiter = UidTokenBucket(burst: 1, refillPerSecond: 1)
        limiter.spendToken(uid: 1, now: 0)
        #expect(!limiter.hasToken(uid: 1, now: 0))
        #expect(limiter.hasToken(uid: 2, now: 0))
        #expect(limiter.millisecondsUntilNextToken(uid: 2, now: 0) == 0)
    }

    @Test("nonsense settings are clamped: burst at least 1, refill at least 0.001 per second")
    func clamping() {
        let limiter = UidTokenBucket(burst: 0, refillPerSecond: 0)
        #expect(limiter.burst == 1)
        #expect(limiter.refillPerSecond == 0.001)
        #expect(limiter.hasToken(uid: 3, now: 0))
        limiter.spendToken(uid: 3, now: 0)
        #expect(!limiter.hasToken(uid: 3, now: 0))
        #expect((999_999...1_000_001).contains(limiter.millisecondsUntilNextToken(uid: 3, now: 0)))
        #expect(!limiter.hasToken(uid: 3, now: 900 * second))
        #expect(limiter.hasToken(uid: 3, now: 2_000 * second))
    }

    @Test("fractional refill rates accumulate across calls")
    func fractionalRefill() {
        let limiter = UidTokenBucket(burst: 1, refillPerSecond: 0.5)
        limiter.spendToken(uid: 9, now: 0)
        // Asking in between must not lose the partial token.
        #expect(!limiter.hasToken(uid: 9, now: second))
        #expect(limiter.millisecondsUntilNextToken(uid: 9, now: second) == 1_000)
        #expect(!limiter.hasToken(uid: 9, now: 3 * second / 2))
        #expect(limiter.hasToken(uid: 9, now: 2 * second))
    }
}

@Suite("NamespacePath.parse")
struct NamespacePathTests {
    private func parse(_ text: String, flags: OpenFlags = []) throws(RequestError) -> (NamespacePath, Bool) {
        let (path, nonblock) = try NamespacePath.parse(text, flags: flags)
        return (path, nonblock)
    }

    @Test("/dev/shmem/new, with the nonblock flag or the :nonblock suffix")
    func anonymousSharedMemory() throws {
        #expect(try parse("/dev/shmem/new") == (.anonymousSharedMemory, false))
        #expect(try parse("/dev/shmem/new", flags: OpenFlags.nonblock) == (.anonymousSharedMemory, true))
        #expect(try parse("/dev/shmem/new:nonblock") == (.anonymousSharedMemory, true))
        #expect(try parse("/dev/shmem/new:nonblock", flags: OpenFlags.nonblock) == (.anonymousSharedMemory, true))
        // Other flag bits do not read as nonblock.
        #expect(try parse("/dev/shmem/new", flags: OpenFlags.sealable) == (.anonymousSharedMemory, false))
    }

    @Test("every socket type has a factory path, in any family")
    func factories() throws {
        for type in NetSocketType.allCases {
            #expect(try parse("/net/local/\(type.rawValue)") == (.netFactory(family: "local", type: type), false))
            #expect(try parse("/net/local/\(type.rawValue):nonblock") == (.netFactory(family: "local", type: type), true))
        }
        #expect(try parse("/net/other/stream") == (.netFactory(family: "other", type: .stream), false))
    }

    @Test("data, accept and addrs paths carry the family and the socket id")
    func socketPaths() throws {
        #expect(try parse("/net/local/42/data") == (.netData(family: "local", id: 42), false))
        #expect(try parse("/net/local/42/accept") == (.netAccept(family: "local", id: 42), false))
        #expect(try parse("/net/local/0/data:nonblock") == (.netData(family: "local", id: 0), true))
        #expect(try parse("/net/local/18446744073709551615/accept")
                == (.netAccept(family: "local", id: UInt64.max), false))
        #expect(try parse("/net/local/addrs") == (.netAddresses(family: "local"), false))
        #expect(try parse("/net/local/addrs:nonblock") == (.netAddresses(family: "local"), true))
    }

    @Test("ctl is EINVAL: it is written with a control request, not opened")
    func controlIsNotOpened() {
        expectRequestError(.invalidArgument) { () throws(RequestError) in _ = try parse("/net/local/3/ctl") }
        expectRequestError(.invalidArgument) { () throws(RequestError) in _ = try parse("/net/local/3/ctl:nonblock") }
    }

    @Test("anything else is ENOENT", arguments: [
        "", "/", ":nonblock", "dev/shmem/new", "/dev/shmem/new/", "/dev/shmem/old", "/dev/shmem", "/DEV/SHMEM/NEW",
        "/dev/shmem/new:nonblock:nonblock", "/dev/shmem/new:NONBLOCK", "/dev/shmem/new:nonblo",
        "/net", "/net/", "/net/local", "/net/local/", "/net/local/raw", "/net/local/42", "/net/local/42/",
        "/net/local/42/foo", "/net/local/42/data/more", "/net/local/x/data", "/net/local/-1/data",
        "/net/local/18446744073709551616/data", "/net/local/ 42/data", "net/local/42/data", "//net/local/42/data",
        "/net/local/stream/extra", "/net/local/addrs/1", "/net/local/042/data", "/net/local/+42/data",
        "/net/local/0x2a/accept",
    ])
    func unknownPaths(text: String) {
        expectRequestError(.noSuchFileOrDirectory) { () throws(RequestError) in _ = try parse(text) }
    }

    @Test("the error names the path, cut to 200 characters; a path past 1024 bytes is ENAMETOOLONG, unparsed")
    func reasonIsBounded() {
        let long = "/net/" + String(repeating: "z", count: 1_000)
        do {
            _ = try parse(long)
            Issue.record("a 1 kB path parsed")
        } catch {
            #expect(error.errno == .noSuchFileOrDirectory)
            #expect(error.reason.hasPrefix(String(long.prefix(200))))
            #expect(error.reason.count < 300)
        }
        do {
            _ = try parse("/net/" + String(repeating: "z", count: 10_000))
            Issue.record("a 10 kB path parsed")
        } catch {
            #expect(error.errno == .fileNameTooLong)
            #expect(error.reason.count < 300)
        }
    }
}
