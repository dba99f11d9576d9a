// The key table on its own: deadlines, claims, quotas and restrictions, with explicit `now` values.
import Glibc
@testable import PatchbayBroker
import PatchbayProtocol
import PatchbaySystem
import SystemPackage
import Testing

private let alice = credentials(uid: 1000, gid: 100, pid: 501)
private let bob = credentials(uid: 1001, gid: 101, pid: 502, groups: [100, 7])
private let carol = credentials(uid: 1002, gid: 102, pid: 503)

private func makeTable(keysPerUser: Int = 64, burst: Int = 100, acknowledgement: UInt64 = 10_000_000_000) -> KeyTable {
    KeyTable(maximumKeysPerUser: keysPerUser, limiter: UidTokenBucket(burst: burst, refillPerSecond: 1),
             acknowledgementTimeout: acknowledgement)
}

/// Shares a fresh memfd (the test does not watch it).
@discardableResult
private func shareMemory(_ table: KeyTable, expiry: KeyExpiry = .never, restriction: ClaimRestriction? = nil,
                         by sharer: PeerCredentials = alice, now: UInt64) throws(RequestError) -> KeyToken {
    let file: Descriptor
    do {
        file = try makeMemoryFile(name: "patchbay-brokertest-key", sealable: false)
    } catch {
        throw RequestError(errno: error, reason: "the test could not make a memfd")
    }
    return try table.share(file, expiry: expiry, restriction: restriction, sharer: sharer, now: now)
}

// The claims these tests make come from the process that made the connection.
extension KeyEntry {
    fileprivate func permitsClaim(by claimer: PeerCredentials) -> Bool { permitsClaim(by: claimer, sentBy: claimer.pid) }
}

extension KeyTable {
    fileprivate func beginClaim(_ token: KeyToken, by claimer: PeerCredentials, session: UInt64, now: UInt64)
        throws(RequestError) -> KeyEntry
    {
        try beginClaim(token, by: claimer, sentBy: claimer.pid, session: session, now: now)
    }
}

@Suite("KeyTable: expiry queue")
struct KeyExpiryTests {
    @Test("expire(now:) closes exactly the keys whose deadline passed; nextDeadline follows the earliest")
    func expiresExactlyTheExpired() throws {
        let table = makeTable()
        let base: UInt64 = 5_000_000
        let deadlines: [UInt64?] = [100, 200, 300, nil, 300]
        var pipes: [WatchedPipe] = []
        var tokens: [KeyToken] = []
        for deadline in deadlines {
            let pipe = try WatchedPipe()
            let expiry: KeyExpiry = deadline.map { .after(nanoseconds: $0) } ?? .never
            tokens.append(try table.share(pipe.take(), expiry: expiry, restriction: nil, sharer: alice, now: base))
            pipes.append(pipe)
        }
        #expect(Set(tokens).count == 5)
        #expect(table.count == 5)
        #expect(table.nextDeadline == base + 100)

        #expect(table.expire(now: base + 99) == 0)
        #expect(table.count == 5)
        #expect(table.expire(now: base + 200) == 2, "a deadline equal to now has passed")
        #expect(Set(table.entries.keys) == Set(tokens[2...]))
        #expect(table.nextDeadline == base + 300)
        try drainDeferredCloser()
        #expect(pipes[0].closes && pipes[1].closes)
        #expect(pipes[2].open && pipes[3].open && pipes[4].open)

        #expect(table.expire(now: base + 300) == 2)
        #expect(table.nextDeadline == nil)
        #expect(Set(table.entries.keys) == [tokens[3]])
        #expect(table.expire(now: .max) == 0, "a key without a deadline never expires")
        try drainDeferredCloser()
        #expect(pipes[2].closes && pipes[4].closes)
        #expect(pipes[3].open)
        #expect(table.usersWithKeys == [alice.uid: 1])
    }

    @Test("expiry order does not depend on share order")
    func outOfOrderShares() throws {
        let table = makeTable()
        var byDeadline: [UInt64: KeyToken] = [:]
        for offset: UInt64 in [700, 100, 500, 300, 900, 200] {
            byDeadline[offset] = try shareMemory(table, expiry: .after(nanoseconds: offset), now: 1_000)
        }
        var expected = byDeadline.keys.sorted()
        while let next = table.nextDeadline, let first = expected.first {
            #expect(next == 1_000 + first)
            #expect(table.expire(now: next) == 1)
            expected.removeFirst()
        }
        #expect(expected.isEmpty)
        #expect(table.count == 0)
        #expect(table.nextDeadline == nil)
    }

    @Test("a zero timeout is EINVAL, and the refused file is closed")
    func zeroTimeout() throws {
        let table = makeTable()
        let pipe = try WatchedPipe()
        expectRequestError(.invalidArgument) { () throws(RequestError) in
            _ = try table.share(pipe.take(), expiry: .after(nanoseconds: 0), restriction: nil, sharer: alice, now: 1)
        }
        #expect(table.count == 0)
        #expect(table.nextDeadline == nil)
        try drainDeferredCloser()
        #expect(pipe.closes)
    }

    @Test("a deadline past the end of the clock saturates instead of wrapping to the past")
    func deadlineOverflow() throws {
        let table = makeTable()
        let now = UInt64.max - 10
        try shareMemory(table, expiry: .after(nanoseconds: 100), now: now)
        #expect(table.nextDeadline == .max)
        #expect(table.expire(now: now) == 0)
        #expect(table.expire(now: .max - 1) == 0)
        #expect(table.expire(now: .max) == 1)
    }

    @Test("dropping the table closes every file it still holds")
    func tableDeinitClosesFiles() throws {
        let pipe = try WatchedPipe()
        do {
            let table = makeTable()
            _ = try table.share(pipe.take(), expiry: .never, restriction: nil, sharer: alice, now: 1)
            try drainDeferredCloser()
            #expect(pipe.open)
            withExtendedLifetime(table) {}
        }
        try drainDeferredCloser()
        #expect(pipe.closes)
    }

    @Test("stale deadlines of claimed keys stay queued until they dominate, then the queue is compacted")
    func compactionAfterClaims() throws {
        let acknowledgement: UInt64 = 1_000
        let table = makeTable(keysPerUser: 10_000, acknowledgement: acknowledgement)
        let base = monotonicNanoseconds()
        let far = base + 1_000_000_000_000
        let survivor = try WatchedPipe()
        let survivorToken = try table.share(survivor.take(), expiry: .after(nanoseconds: far - base),
                                            restriction: nil, sharer: alice, now: base)
        // Many keys for one open file: the table holds it once.
        let memory = try makeMemoryFile(name: "patchbay-brokertest-broadcast", sealable: false)
        let keyCount = 5_000
        var tokens: [KeyToken] = []
        for _ in 0..<keyCount {
            tokens.append(try table.share(try duplicateDescriptor(memory.rawValue), expiry: .never, restriction: nil,
                                          sharer: alice, now: base))
        }
        #expect(table.nextDeadline == far)

        var firstCompacted: Int?
        var staleAfterHundred: UInt64?
        for (index, token) in tokens.enumerated() {
            let now = base + UInt64(index)
            let entry = try table.beginClaim(token, by: bob, session: 1, now: now)
            #expect(entry.inFlightTo == 1)
            #expect(table.finishClaim(token, session: 1, received: true, now: now))
            if index == 100 { staleAfterHundred = table.nextDeadline }
            if firstCompacted == nil, table.nextDeadline == far { firstCompacted = index }
        }
        // Claimed keys leave their acknowledgement deadlines behind (removed lazily)...
        #expect(staleAfterHundred == base + acknowledgement)
        // ...until stale items dominate a large queue; then only live deadlines remain.
        let compacted = try #require(firstCompacted, "the expiry queue was never compacted")
        #expect(compacted >= 4_000 && compacted < keyCount)

        #expect(table.count == 1)
        #expect(table.expire(now: far - 1) == 0)
        #expect(table.nextDeadline == far)
        #expect(table.entries[survivorToken] != nil)
        #expect(table.expire(now: far) == 1)
        #expect(table.nextDeadline == nil)
        try drainDeferredCloser()
        #expect(survivor.closes)
    }

    @Test("compaction keeps a claim in flight, with a fresh acknowledgement deadline")
    func compactionKeepsClaimsInFlight() throws {
        let acknowledgement: UInt64 = 1_000_000_000_000
        let table = makeTable(keysPerUser: 10_000, acknowledgement: acknowledgement)
        let base = monotonicNanoseconds()
        let pending = try shareMemory(table, now: base)
        _ = try table.beginClaim(pending, by: bob, session: 7, now: base)
        #expect(table.nextDeadline == base + acknowledgement)

        let memory = try makeMemoryFile(name: "patchbay-brokertest-inflight", sealable: false)
        var compactedAt: Int?
        for index in 1...5_000 {
            let now = base + UInt64(index)
            let token = try table.share(try duplicateDescriptor(memory.rawValue), expiry: .never, restriction: nil,
                                        sharer: alice, now: now)
            _ = try table.beginClaim(token, by: bob, session: 1, now: now)
            table.finishClaim(token, session: 1, received: true, now: now)
            // The rebuilt queue gives the pending claim a full wait from the real clock, later
            // than anything queued so far.
            if compactedAt == nil, let next = table.nextDeadline, next > base + acknowledgement + 5_000 {
                compactedAt = index
            }
        }
        #expect(compactedAt != nil, "no compaction happened")
        #expect(table.count == 1)
        #expect(table.entries[pending]?.inFlightTo == 7)
        // The claim still ends by its acknowledgement deadline (the claim stands: not an expiry).
        #expect(table.expire(now: .max) == 0)
        #expect(table.count == 0)
        #expect(table.usersWithKeys.isEmpty)
    }
}

@Suite("KeyTable: claims, quotas and restrictions")
struct KeyClaimTests {
    @Test("a key is claimed once: in flight it is ENOENT for everyone, then it is gone")
    func oneTimeClaim() throws {
        let table = makeTable()
        let pipe = try WatchedPipe()
        let token = try table.share(pipe.take(), expiry: .never, restriction: nil, sharer: alice, now: 10)
        do {
            // (The entry keeps its file alive while the test holds it, as it does while a reply is sent.)
            let entry = try table.beginClaim(token, by: bob, session: 1, now: 11)
            #expect(entry.fileKind == .pipe)
            #expect(entry.ownerUID == alice.uid && entry.ownerPID == alice.pid)
            #expect(entry.createdAt == 10)
            #expect(entry.inFlightTo == 1)
        }
        expectRequestError(.noSuchFileOrDirectory) { () throws(RequestError) in
            _ = try table.beginClaim(token, by: carol, session: 2, now: 12)
        }
        expectRequestError(.noSuchFileOrDirectory) { () throws(RequestError) in
            _ = try table.beginClaim(token, by: bob, session: 1, now: 12)
        }
        #expect(!table.finishClaim(token, session: 2, received: true, now: 13), "only the claiming session finishes")
        #expect(table.finishClaim(token, session: 1, received: true, now: 13))
        #expect(table.count == 0)
        #expect(!table.finishClaim(token, session: 1, received: true, now: 14))
        expectRequestError(.noSuchFileOrDirectory) { () throws(RequestError) in
            _ = try table.beginClaim(token, by: bob, session: 1, now: 15)
        }
        try drainDeferredCloser()
        #expect(pipe.closes)
    }

    @Test("a descriptor lost on the way restores the key; once expired it is dropped instead")
    func lostDescriptorRestores() throws {
        let table = makeTable()
        let token = try shareMemory(table, expiry: .after(nanoseconds: 1_000), now: 0)
        _ = try table.beginClaim(token, by: bob, session: 1, now: 100)
        #expect(table.finishClaim(token, session: 1, received: false, now: 200))
        #expect(table.entries[token]?.inFlightTo == nil)
        // Given back to its claimer only: the reply may have reached it whatever it said.
        expectRequestError(.noSuchFileOrDirectory) { () throws(RequestError) in
            _ = try table.beginClaim(token, by: carol, session: 2, now: 250)
        }
        _ = try table.beginClaim(token, by: bob, session: 2, now: 300)
        // Lost again, but the deadline has passed meanwhile.
        #expect(table.finishClaim(token, session: 2, received: false, now: 1_000))
        #expect(table.count == 0)
        #expect(table.usersWithKeys.isEmpty)
    }

    @Test("an expired key cannot be claimed even before expire(now:) ran")
    func expiredButNotSwept() throws {
        let table = makeTable()
        let token = try shareMemory(table, expiry: .after(nanoseconds: 50), now: 1_000)
        expectRequestError(.noSuchFileOrDirectory) { () throws(RequestError) in
            _ = try table.beginClaim(token, by: bob, session: 1, now: 1_050)
        }
        #expect(table.count == 1)
        _ = try table.beginClaim(token, by: bob, session: 1, now: 1_049)
    }

    @Test("a key in flight still expires at its deadline; the late acknowledgement finds nothing")
    func inFlightExpires() throws {
        let table = makeTable()
        let token = try shareMemory(table, expiry: .after(nanoseconds: 100), now: 0)
        _ = try table.beginClaim(token, by: bob, session: 1, now: 50)
        #expect(table.expire(now: 100) == 1)
        #expect(!table.finishClaim(token, session: 1, received: true, now: 101))
    }

    @Test("an unacknowledged claim counts as received after the acknowledgement timeout")
    func acknowledgementTimeout() throws {
        let table = makeTable(acknowledgement: 500)
        let token = try shareMemory(table, now: 0)
        _ = try table.beginClaim(token, by: bob, session: 1, now: 1_000)
        #expect(table.nextDeadline == 1_500)
        #expect(table.expire(now: 1_499) == 0)
        #expect(table.count == 1)
        #expect(table.expire(now: 1_500) == 0, "a claim that stands is not an expiry")
        #expect(table.count == 0)
        #expect(table.usersWithKeys.isEmpty)
    }

    @Test("an old claim's acknowledgement deadline cannot end a later claim of the same key")
    func staleAcknowledgementDeadline() throws {
        let table = makeTable(acknowledgement: 500)
        let token = try shareMemory(table, now: 0)
        _ = try table.beginClaim(token, by: bob, session: 1, now: 1_000)
        #expect(table.finishClaim(token, session: 1, received: false, now: 1_100))
        _ = try table.beginClaim(token, by: bob, session: 2, now: 1_200)
        #expect(table.expire(now: 1_500) == 0)
        #expect(table.entries[token]?.inFlightTo == 2, "the first claim's deadline ended the second claim")
        #expect(table.expire(now: 1_700) == 0)
        #expect(table.count == 0)
    }

    @Test("more than maximumKeysPerUser outstanding keys is EDQUOT for that uid only; claims and expiry free quota")
    func quota() throws {
        let table = makeTable(keysPerUser: 3)
        let first = try shareMemory(table, now: 0)
        try shareMemory(table, expiry: .after(nanoseconds: 10), now: 0)
        try shareMemory(table, now: 0)
        let refused = try WatchedPipe()
        expectRequestError(.diskQuotaExceeded) { () throws(RequestError) in
            _ = try table.share(refused.take(), expiry: .never, restriction: nil, sharer: alice, now: 1)
        }
        try drainDeferredCloser()
        #expect(refused.closes, "a refused file must be closed")
        #expect(table.usersWithKeys == [alice.uid: 3])
        // Another uid has its own allowance.
        try shareMemory(table, by: bob, now: 1)
        #expect(table.usersWithKeys == [alice.uid: 3, bob.uid: 1])

        // A claim frees one slot...
        _ = try table.beginClaim(first, by: bob, session: 1, now: 2)
        expectRequestError(.diskQuotaExceeded) { () throws(RequestError) in
            try shareMemory(table, now: 2)  // in flight still counts
        }
        table.finishClaim(first, session: 1, received: true, now: 2)
        try shareMemory(table, now: 3)
        // ...and so does expiry.
        expectRequestError(.diskQuotaExceeded) { () throws(RequestError) in try shareMemory(table, now: 4) }
        #expect(table.expire(now: 10) == 1)
        try shareMemory(table, now: 11)
        #expect(table.usersWithKeys == [alice.uid: 3, bob.uid: 1])
    }

    @Test("restrictions: uid, gid (primary or supplementary) and pid; anyone else gets ENOENT")
    func restrictions() throws {
        let table = makeTable()
        let byUID = try shareMemory(table, restriction: .uid(bob.uid), now: 0)
        let byGID = try shareMemory(table, restriction: .gid(100), now: 0)
        // A pid restriction names a running process (this test's own).
        var runner = credentials(uid: carol.uid, gid: carol.gid, pid: getpid())
        let me = try ProcessHandle(pid: getpid())
        (runner.startTime, runner.processInode) = (me.startTime, me.inode)
        let byPID = try shareMemory(table, restriction: .pid(runner.pid), now: 0)
        let open = try shareMemory(table, now: 0)

        let uidEntry = try #require(table.entries[byUID])
        let gidEntry = try #require(table.entries[byGID])
        let pidEntry = try #require(table.entries[byPID])
        let openEntry = try #require(table.entries[open])
        #expect(uidEntry.permitsClaim(by: bob) && !uidEntry.permitsClaim(by: carol))
        #expect(!uidEntry.permitsClaim(by: credentials(uid: 0)), "root gets no bypass")
        // gid 100 is alice's primary group and one of bob's supplementary groups.
        #expect(gidEntry.permitsClaim(by: alice) && gidEntry.permitsClaim(by: bob))
        #expect(!gidEntry.permitsClaim(by: carol))
        #expect(pidEntry.permitsClaim(by: runner))
        // The same pid from an earlier or later process (another start, another pidfd inode), or
        // from a connection whose process could not be identified, is a stranger.
        var earlier = runner
        earlier.startTime = runner.startTime.map { $0 &- 1 }
        #expect(!pidEntry.permitsClaim(by: earlier))
        if let inode = runner.processInode {
            var other = runner
            other.processInode = inode &+ 1
            #expect(!pidEntry.permitsClaim(by: other))
        }
        #expect(!pidEntry.permitsClaim(by: credentials(uid: carol.uid, pid: runner.pid)))
        #expect(!pidEntry.permitsClaim(by: credentials(uid: carol.uid, pid: runner.pid + 1)))
        #expect(pidEntry.restrictedProcess?.hasExited == false)
        // Over the process's own connection, but sent by another process (one that inherited
        // the connection): a stranger. And one whose sender is unknown (0).
        #expect(!pidEntry.permitsClaim(by: runner, sentBy: runner.pid + 1))
        #expect(!pidEntry.permitsClaim(by: runner, sentBy: 0))
        // The sender matters only to a pid restriction.
        #expect(uidEntry.permitsClaim(by: bob, sentBy: 0) && openEntry.permitsClaim(by: carol, sentBy: 0))
        // A pid no process has is refused at share: the key could only ever go to a stranger
        // who later gets that number.
        expectRequestError(.noSuchProcess) { () throws(RequestError) in
            _ = try shareMemory(table, restriction: .pid(Int32.max), now: 0)
        }
        #expect(openEntry.permitsClaim(by: carol) && openEntry.permitsClaim(by: credentials(uid: 0)))

        expectRequestError(.noSuchFileOrDirectory) { () throws(RequestError) in
            _ = try table.beginClaim(byUID, by: carol, session: 1, now: 1)
        }
        #expect(table.entries[byUID]?.inFlightTo == nil, "a refused claim must not take the key")
        _ = try table.beginClaim(byUID, by: bob, session: 2, now: 1)
        expectRequestError(.noSuchFileOrDirectory) { () throws(RequestError) in
            _ = try table.beginClaim(byGID, by: carol, session: 1, now: 1)
        }
        _ = try table.beginClaim(byGID, by: bob, session: 2, now: 1)
        _ = try table.beginClaim(byPID, by: runner, session: 3, now: 1)
    }

    @Test("failed claims spend the uid's allowance: then every claim is EAGAIN, even of a valid key")
    func failedClaimsAreLimited() throws {
        let table = KeyTable(maximumKeysPerUser: 8, limiter: UidTokenBucket(burst: 2, refillPerSecond: 10))
        let valid = try shareMemory(table, now: 0)
        let unknown = KeyToken(high: 1, low: 2)
        for _ in 0..<2 {
            expectRequestError(.noSuchFileOrDirectory) { () throws(RequestError) in
                _ = try table.beginClaim(unknown, by: carol, session: 1, now: 0)
            }
        }
        expectRequestError(.resourceTemporarilyUnavailable) { () throws(RequestError) in
            _ = try table.beginClaim(valid, by: carol, session: 1, now: 0)
        }
        #expect(table.entries[valid]?.inFlightTo == nil)
        // Other uids are not affected; the allowance refills (10 per second: 100 ms per claim).
        let bobs = try shareMemory(table, now: 0)
        _ = try table.beginClaim(bobs, by: bob, session: 2, now: 0)
        expectRequestError(.resourceTemporarilyUnavailable) { () throws(RequestError) in
            _ = try table.beginClaim(valid, by: carol, session: 1, now: 99_999_999)
        }
        _ = try table.beginClaim(valid, by: carol, session: 1, now: 150_000_000)
    }

    @Test("the same open file shared many times is held once and closed with its last key")
    func sharedFileHeldOnce() throws {
        let table = makeTable()
        let pipe = try WatchedPipe()
        let original = pipe.take()
        let first = try table.share(try duplicateDescriptor(original.rawValue), expiry: .never, restriction: nil,
                                    sharer: alice, now: 0)
        let second = try table.share(original, expiry: .never, restriction: nil, sharer: alice, now: 0)
        do {
            let firstEntry = try #require(table.entries[first])
            let secondEntry = try #require(table.entries[second])
            if Descriptor.sameOpenFile(firstEntry.file, firstEntry.file) != nil {
                #expect(firstEntry.held === secondEntry.held, "kcmp works here, so the file should be held once")
                #expect(firstEntry.held.keys == 2)
            }
        }
        _ = try table.beginClaim(first, by: bob, session: 1, now: 1)
        table.finishClaim(first, session: 1, received: true, now: 1)
        try drainDeferredCloser()
        #expect(pipe.open, "the second key still needs the file")
        _ = try table.beginClaim(second, by: bob, session: 1, now: 2)
        table.finishClaim(second, session: 1, received: true, now: 2)
        try drainDeferredCloser()
        #expect(pipe.closes)
    }

    @Test("summary reports each uid's oldest key and counts by file kind")
    func summary() throws {
        let table = makeTable()
        try shareMemory(table, now: 100)
        try shareMemory(table, now: 300)
        try shareMemory(table, by: bob, now: 250)
        let pipe = try WatchedPipe()
        _ = try table.share(pipe.take(), expiry: .never, restriction: nil, sharer: bob, now: 400)
        let summary = table.summary(now: 1_000)
        #expect(summary.oldestByUser == [alice.uid: 900, bob.uid: 750])
        #expect(summary.byKind == [FileKind.regular.rawValue: 3, FileKind.pipe.rawValue: 1])
    }
}
