// Keys: handing a file descriptor to an unrelated process (PatchworkOS `share`/`claim`).
//
// What it is. `share` gives the broker a descriptor and gets back a key: 128 bits from
// getrandom(2), shown as 22 characters of base64url. `claim` with that key gets a descriptor for
// the same open file description (shared offset, flags, access mode), exactly as SCM_RIGHTS would.
//
// Lifetime. The broker holds the file from `share` until the key is claimed or expires; the
// sharer may close its own descriptor at once and may even die: the key stays claimable until its
// deadline. Expiry is driven by the event loop's timeout (the earliest deadline in
// `expiryQueue`), so an expired file is closed within milliseconds, not when someone next looks.
//
// Claiming is two-phase so that nothing is lost. A claim moves the key to "in flight" and sends
// the descriptor; the claimer then acknowledges. If the kernel could not install the descriptor
// (the claimer was out of descriptors, EMFILE: the reply arrives with MSG_CTRUNC), the claimer
// says so and the key is restored; if the claimer vanishes before acknowledging, the key is
// restored too (unless its deadline has passed meanwhile). A restored key can be claimed again
// by that claiming process only: the reply may have reached it whatever it says, and a file
// given to one claimer must never silently go to a second. A claimer that stays connected but
// never acknowledges is taken at its word after `acknowledgementTimeout`: the key counts as
// claimed, so it cannot pin the sharer's quota or the file forever. While a key is in flight every other claim gets ENOENT, so of any number of
// concurrent claims exactly one wins.
//
// Errors. Malformed key text: EINVAL (in the client, before anything is sent). Unknown, claimed,
// expired or restricted to someone else: ENOENT, all alike. Zero timeout: EINVAL. More than
// `maximumKeysPerUser` outstanding for one uid: EDQUOT. Too many failed claims from one uid:
// EAGAIN until its allowance refills (see `UidTokenBucket`).

import DequeModule
import HeapModule
import PatchbayProtocol
import PatchbaySystem
import SystemPackage

/// One open file description the broker holds for one or more keys. Sharing the same open file
/// many times (a broadcast) costs the broker one descriptor, not one per key: the kernel's kcmp
/// tells whether a newly received descriptor is a file already held.
final class HeldFile {
    let descriptor: CInt
    let identity: FileIdentity
    let kind: FileKind
    /// Keys referring to this file.
    var keys = 0
    /// Who shared it first: its close is queued as that uid's.
    let uid: UInt32

    init(descriptor: CInt, identity: FileIdentity, kind: FileKind, uid: UInt32) {
        self.descriptor = descriptor
        self.identity = identity
        self.kind = kind
        self.uid = uid
    }

    /// Closed on the `DeferredCloser`'s thread: the last close of a file a client chose may block.
    deinit {
        DeferredCloser.shared.close(raw: descriptor, of: uid)
    }
}

struct FileIdentity: Hashable {
    var device: UInt64
    var inode: UInt64
}

/// A shared file waiting to be claimed.
final class KeyEntry {
    let held: HeldFile
    var file: CInt { held.descriptor }
    var fileKind: FileKind { held.kind }
    let ownerUID: UInt32
    let ownerPID: Int32
    let restriction: ClaimRestriction?
    /// For a pid restriction, the process itself (a pidfd): once it has exited, a later process
    /// with the same pid is someone else, and nobody can claim.
    let restrictedProcess: ProcessHandle?
    let createdAt: UInt64
    /// Monotonic deadline in nanoseconds, or nil for "never".
    let deadline: UInt64?
    /// The session a claim reply went to, until it acknowledges.
    var inFlightTo: UInt64?
    /// Which claim is in flight (each claim gets a new number), so a stale acknowledgement
    /// deadline cannot end a later claim.
    var claimNumber: UInt64 = 0
    /// Who the claim in flight is for.
    var inFlightClaimer: ClaimerProcess?
    /// After a claim that did not say it received the file (it said it lost it, or went away):
    /// that claimer, the only one who may claim the key again. The reply may have reached it all
    /// the same (a claimer can say anything), so nobody else gets the file too.
    var restoredFor: ClaimerProcess?

    init(held: HeldFile, ownerUID: UInt32, ownerPID: Int32,
         restriction: ClaimRestriction?, restrictedProcess: ProcessHandle? = nil, createdAt: UInt64, deadline: UInt64?) {
        self.held = held
        self.restrictedProcess = restrictedProcess
        self.ownerUID = ownerUID
        self.ownerPID = ownerPID
        self.restriction = restriction
        self.createdAt = createdAt
        self.deadline = deadline
    }

    /// Whether `claimer`'s connection may claim this key, with the claim sent by process `sender`
    /// (the kernel's record of who sent the frame: `RequestContext.sender`).
    func permitsClaim(by claimer: PeerCredentials, sentBy sender: Int32) -> Bool {
        if let earlier = restoredFor, !Self.sameProcess(earlier, claimer) { return false }
        return switch restriction {
        case nil: true
        case .uid(let uid)?: claimer.uid == uid
        case .gid(let gid)?: claimer.isMember(of: gid)
        case .pid(let pid)?:
            // The very process: its pid, and the start time read through a pidfd of the process
            // that connected, so a process given the pid since (or a connection kept from a
            // process that had it before) is a stranger. And the claim sent by that process
            // itself: a connection it made before it exec'd a set-uid program, kept by a child it
            // forked first, is that child's to use, not the program's (the child would otherwise
            // claim what was shared for the program). `isProcess` checks that the process is
            // still running (its pidfd says so): no other has had its pid since it sent the frame.
            claimer.pid == pid && sender == pid && restrictedProcess.map(claimer.isProcess) == true
        }
    }

    /// Whether a connection's peer is `claimer`'s process: uid, pid, and the start time and pidfd
    /// inode read when each connected (a later process given the pid differs in them).
    static func sameProcess(_ claimer: ClaimerProcess, _ other: PeerCredentials) -> Bool {
        claimer.uid == other.uid && claimer.pid == other.pid && claimer.startTime == other.startTime
            && claimer.processInode == other.processInode
    }
}

/// What a key remembers of a claimer: the process, as `KeyEntry.sameProcess` compares it. Boxed,
/// and made only when a claim starts: a key nobody has claimed yet (most of the broker's
/// outstanding keys) holds two empty references, not two copies of a connection's credentials
/// (which doubled the broker's memory per outstanding key, 115–128 B to 272–306 B).
final class ClaimerProcess {
    let uid: UInt32
    let pid: Int32
    let startTime: UInt64?
    let processInode: UInt64?

    init(_ credentials: PeerCredentials) {
        uid = credentials.uid
        pid = credentials.pid
        startTime = credentials.startTime
        processInode = credentials.processInode
    }
}

/// One deadline in the expiry queue: a key's expiry, or the end of the wait for a claim's
/// acknowledgement. Items are removed lazily: a popped item whose key is gone (claimed) or whose
/// claim has moved on is skipped.
struct ExpiryItem: Comparable {
    enum Purpose: Equatable {
        case expiry
        case acknowledgement(claimNumber: UInt64)
    }

    var deadline: UInt64
    var token: KeyToken
    var purpose: Purpose

    static func < (lhs: ExpiryItem, rhs: ExpiryItem) -> Bool { lhs.deadline < rhs.deadline }
}

/// The outstanding keys, their deadlines and the per-uid accounting.
final class KeyTable {
    private(set) var entries: [KeyToken: KeyEntry] = [:]
    private var expiryQueue = Heap<ExpiryItem>()
    /// How many entries have a deadline (the live part of `expiryQueue`).
    private var entriesWithDeadline = 0
    private var keysPerUser: [UInt32: Int] = [:]
    /// Keys by the kind of file they hold, and each uid's keys in the order they were made (a
    /// removed one is skipped, and dropped once at the front or when most are removed ones): so
    /// that `summary`, which every status request asks for, costs the uids, not every key (3,641
    /// keys of one uid made each status take 2.5 ms: eighteenth attack round).
    private var countByKind: [UInt8: UInt32] = [:]
    private var madeInOrder: [UInt32: Deque<(createdAt: UInt64, token: KeyToken)>] = [:]
    /// Files held for keys, by device and inode, to find the same open file shared again.
    private var heldFiles: [FileIdentity: [HeldFile]] = [:]
    /// False once kcmp proved unavailable (a seccomp filter, say).
    private var sameFileComparable = true
    private let maximumKeysPerUser: Int
    private var claimsStarted: UInt64 = 0
    let limiter: UidTokenBucket
    /// How long a claimer has to acknowledge before its claim counts as received.
    let acknowledgementTimeout: UInt64
    /// Where each key's file is charged, one descriptor per key, to the sharer's uid (nil: not
    /// charged, in unit tests). Keys for the same open file share one descriptor, so this may
    /// overcount; it never undercounts.
    var budget: DescriptorBudget?

    init(maximumKeysPerUser: Int, limiter: UidTokenBucket, acknowledgementTimeout: UInt64 = 10_000_000_000) {
        self.maximumKeysPerUser = maximumKeysPerUser
        self.limiter = limiter
        self.acknowledgementTimeout = acknowledgementTimeout
    }

    var count: Int { entries.count }

    /// Stores `file` under a fresh key. A refused file is closed on the closer thread: it is the
    /// client's, and its close may block.
    /// Where keys are kept across restarts (a service manager's fd store), when there is one.
    var fdStore: KeyFDStore?

    /// A key the service manager kept across a restart: back in the table with its token,
    /// deadline, owner and restriction (charged to its owner again). One whose deadline passed
    /// meanwhile, or that its owner's share cannot take, is dropped, and the store told.
    func restore(_ key: StoredKey, file: consuming Descriptor, now: UInt64) -> Bool {
        if let deadline = key.deadline, deadline <= now {
            DeferredCloser.shared.close(file, of: key.ownerUID)
            fdStore?.removed(key)
            return false
        }
        guard entries[key.token] == nil, (try? budget?.charge(1, to: key.ownerUID, for: "a restored key's file")) != nil else {
            DeferredCloser.shared.close(file, of: key.ownerUID)
            fdStore?.removed(key)
            return false
        }
        let held = hold(file, uid: key.ownerUID)
        held.keys += 1
        entries[key.token] = KeyEntry(held: held, ownerUID: key.ownerUID, ownerPID: 0, restriction: key.restriction,
                                      createdAt: now, deadline: key.deadline)
        keysPerUser[key.ownerUID, default: 0] += 1
        noteMade(key.token, by: key.ownerUID, kind: held.kind, at: now)
        if let deadline = key.deadline {
            expiryQueue.insert(ExpiryItem(deadline: deadline, token: key.token, purpose: .expiry))
            entriesWithDeadline += 1
        }
        return true
    }

    func share(
        _ file: consuming Descriptor, expiry: KeyExpiry, restriction: ClaimRestriction?,
        sharer: PeerCredentials, now: UInt64
    ) throws(RequestError) -> KeyToken {
        let deadline: UInt64?
        var process: ProcessHandle?
        do throws(RequestError) {
            deadline = try admitShare(expiry: expiry, sharer: sharer, now: now)
            if case .pid(let pid)? = restriction {
                process = try watch(pid)
            }
            // Charged once every check has passed: the file, and the pidfd of a pid restriction.
            try budget?.charge(process == nil ? 1 : 2, to: sharer.uid, for: "another key's file")
        } catch {
            DeferredCloser.shared.close(file, of: sharer.uid)
            throw error
        }
        let owned = keysPerUser[sharer.uid] ?? 0
        let held = hold(file, uid: sharer.uid)
        held.keys += 1
        var token: KeyToken
        repeat {
            token = Self.randomToken()
        } while entries[token] != nil
        entries[token] = KeyEntry(held: held, ownerUID: sharer.uid, ownerPID: sharer.pid,
                                  restriction: restriction, restrictedProcess: process, createdAt: now,
                                  deadline: deadline)
        keysPerUser[sharer.uid] = owned + 1
        noteMade(token, by: sharer.uid, kind: held.kind, at: now)
        if let deadline {
            expiryQueue.insert(ExpiryItem(deadline: deadline, token: token, purpose: .expiry))
            entriesWithDeadline += 1
        }
        fdStore?.stored(StoredKey(token: token, deadline: deadline, ownerUID: sharer.uid, restriction: restriction),
                        file: held.descriptor)
        return token
    }

    /// A handle on the process a key is restricted to; ESRCH if it is not running (a pid no
    /// process has could only ever let a stranger claim).
    private func watch(_ pid: Int32) throws(RequestError) -> ProcessHandle {
        do {
            guard pid > 0 else { throw Errno.noSuchProcess }
            let handle = try ProcessHandle(pid: pid)
            // A process that exited but is not reaped yet still has a pidfd: it will never claim.
            guard !handle.hasExited else { throw Errno.noSuchProcess }
            return handle
        } catch {
            throw RequestError(errno: .noSuchProcess,
                               reason: "there is no process \(pid) to restrict the key to; a pid restriction names a running process")
        }
    }

    /// The new key's deadline, or EINVAL (timeout not positive) or EDQUOT (the sharer's quota).
    private func admitShare(expiry: KeyExpiry, sharer: PeerCredentials, now: UInt64) throws(RequestError) -> UInt64? {
        var deadline: UInt64?
        if case .after(let nanoseconds) = expiry {
            guard nanoseconds > 0 else {
                throw RequestError(errno: .invalidArgument, reason: "the timeout must be positive (or never)")
            }
            let (sum, overflow) = now.addingReportingOverflow(nanoseconds)
            deadline = overflow ? UInt64.max : sum
        }
        let owned = keysPerUser[sharer.uid] ?? 0
        guard owned < maximumKeysPerUser else {
            throw RequestError(errno: .diskQuotaExceeded,
                               reason: "uid \(sharer.uid) already has \(owned) outstanding keys, the limit")
        }
        return deadline
    }

    /// Starts a claim: the entry goes in flight to `session` and its file is returned for sending.
    /// Unknown, in flight, expired or restricted: ENOENT, all alike.
    func beginClaim(_ token: KeyToken, by claimer: PeerCredentials, sentBy sender: Int32, session: UInt64, now: UInt64)
        throws(RequestError) -> KeyEntry
    {
        guard limiter.hasToken(uid: claimer.uid, now: now) else {
            throw RequestError(
                errno: .resourceTemporarilyUnavailable,
                reason: "too many failed claims from uid \(claimer.uid); try again in \(limiter.millisecondsUntilNextToken(uid: claimer.uid, now: now)) ms")
        }
        guard let entry = entries[token], entry.inFlightTo == nil, !isExpired(entry, now: now),
              entry.permitsClaim(by: claimer, sentBy: sender)
        else {
            limiter.spendToken(uid: claimer.uid, now: now)
            throw RequestError(errno: .noSuchFileOrDirectory,
                           reason: "no such key: it was never issued, was already claimed, has expired, or is not for this claimer")
        }
        entry.inFlightTo = session
        entry.inFlightClaimer = ClaimerProcess(claimer)
        claimsStarted += 1
        entry.claimNumber = claimsStarted
        expiryQueue.insert(ExpiryItem(deadline: now &+ acknowledgementTimeout, token: token,
                                      purpose: .acknowledgement(claimNumber: claimsStarted)))
        return entry
    }

    /// Ends a claim. `received` false (the descriptor was lost on the way, or the claimer went
    /// away before saying) restores the key for that claimer only. Returns false when the key was
    /// not in flight to `session`.
    @discardableResult
    func finishClaim(_ token: KeyToken, session: UInt64, received: Bool, now: UInt64) -> Bool {
        guard let entry = entries[token], entry.inFlightTo == session else { return false }
        if received || isExpired(entry, now: now) {
            remove(token)
        } else {
            entry.inFlightTo = nil
            entry.restoredFor = entry.inFlightClaimer
        }
        return true
    }

    /// Removes every key whose deadline has passed, closing the files they held.
    /// Returns how many expired.
    @discardableResult
    func expire(now: UInt64, reporting report: ((KeyEntry) -> Void)? = nil) -> Int {
        var expired = 0
        while let first = expiryQueue.min, first.deadline <= now {
            _ = expiryQueue.removeMin()
            guard let entry = entries[first.token] else { continue }
            switch first.purpose {
            case .expiry where entry.deadline == first.deadline:
                // A key in flight expires too: its claimer already holds the file, and if the
                // file got lost on the way the key would be restored only to be expired anyway.
                report?(entry)
                remove(first.token)
                expired += 1
            case .acknowledgement(let claimNumber) where entry.inFlightTo != nil && entry.claimNumber == claimNumber:
                // The claimer never said; it did receive the reply, so the claim stands.
                remove(first.token)
            default:
                break
            }
        }
        return expired
    }

    /// The earliest deadline still pending, for the event loop's timeout.
    var nextDeadline: UInt64? { expiryQueue.min?.deadline }

    /// Age of each uid's oldest key, and counts by file kind, for `status`.
    func summary(now: UInt64) -> (oldestByUser: [UInt32: UInt64], byKind: [UInt8: UInt32]) {
        var oldest: [UInt32: UInt64] = [:]
        for (uid, made) in madeInOrder {
            if let first = made.first { oldest[uid] = now &- first.createdAt }
        }
        return (oldest, countByKind)
    }

    private func noteMade(_ token: KeyToken, by uid: UInt32, kind: FileKind, at now: UInt64) {
        countByKind[kind.rawValue, default: 0] += 1
        madeInOrder[uid, default: []].append((now, token))
    }

    /// Drops from `uid`'s order the removed keys at its front, and all of them once they are
    /// most of it (each key is dropped once: constant time per key, taken together).
    private func dropRemovedKeys(of uid: UInt32) {
        guard var made = madeInOrder.removeValue(forKey: uid) else { return }
        func live(_ item: (createdAt: UInt64, token: KeyToken)) -> Bool { entries[item.token]?.createdAt == item.createdAt }
        while let first = made.first, !live(first) { made.removeFirst() }
        if made.count > 2 * (keysPerUser[uid] ?? 0) + 64 { made = Deque(made.filter(live)) }
        if !made.isEmpty { madeInOrder[uid] = made }
    }

    var usersWithKeys: [UInt32: Int] { keysPerUser }

    private func isExpired(_ entry: KeyEntry, now: UInt64) -> Bool {
        if let deadline = entry.deadline { return deadline <= now }
        return false
    }

    /// The held file for `file`: one already held if it is the same open file description (the
    /// new descriptor is then closed), else a new one.
    private func hold(_ file: consuming Descriptor, uid: UInt32) -> HeldFile {
        let kind = (try? file.fileKind()) ?? .unknown
        guard let (device, inode) = try? file.identity() else {
            return HeldFile(descriptor: file.release(), identity: FileIdentity(device: 0, inode: 0), kind: kind, uid: uid)
        }
        let identity = FileIdentity(device: device, inode: inode)
        if sameFileComparable {
            // Bounded work per share: only the most recent few files of one inode are compared.
            for candidate in (heldFiles[identity] ?? []).suffix(8).reversed() {
                switch Descriptor.sameOpenFile(file.rawValue, candidate.descriptor) {
                case true?:
                    DeferredCloser.shared.close(file, of: uid)
                    return candidate
                case false?:
                    continue
                case nil:
                    sameFileComparable = false  // kcmp is not allowed here: one descriptor per key
                }
                break
            }
        }
        let held = HeldFile(descriptor: file.release(), identity: identity, kind: kind, uid: uid)
        if sameFileComparable, (heldFiles[identity]?.count ?? 0) < 64 { heldFiles[identity, default: []].append(held) }
        return held
    }

    private func release(_ held: HeldFile) {
        held.keys -= 1
        guard held.keys == 0, var list = heldFiles[held.identity] else { return }
        list.removeAll { $0 === held }
        heldFiles[held.identity] = list.isEmpty ? nil : list
    }

    private func remove(_ token: KeyToken) {
        guard let entry = entries.removeValue(forKey: token) else { return }
        fdStore?.removed(StoredKey(token: token, deadline: entry.deadline, ownerUID: entry.ownerUID, restriction: entry.restriction))
        release(entry.held)
        budget?.release(entry.restrictedProcess == nil ? 1 : 2, from: entry.ownerUID)
        let remaining = (keysPerUser[entry.ownerUID] ?? 1) - 1
        keysPerUser[entry.ownerUID] = remaining > 0 ? remaining : nil
        let kind = entry.fileKind.rawValue
        countByKind[kind] = (countByKind[kind] ?? 1) > 1 ? countByKind[kind]! - 1 : nil
        dropRemovedKeys(of: entry.ownerUID)
        if entry.deadline != nil { entriesWithDeadline -= 1 }
        compactExpiryQueueIfMostlyStale()
    }

    /// Claimed keys leave their deadlines behind in the queue; rebuild it when those dominate so
    /// memory follows the live keys, not the history of shares.
    private func compactExpiryQueueIfMostlyStale() {
        guard expiryQueue.count > 4096, expiryQueue.count > 4 * (entriesWithDeadline + entries.count) else { return }
        var items: [ExpiryItem] = []
        for (token, entry) in entries {
            if let deadline = entry.deadline {
                items.append(ExpiryItem(deadline: deadline, token: token, purpose: .expiry))
            }
            if entry.inFlightTo != nil {
                // The exact wait already spent is not kept; a fresh full wait is the safe side.
                items.append(ExpiryItem(deadline: monotonicNanoseconds() &+ acknowledgementTimeout, token: token,
                                        purpose: .acknowledgement(claimNumber: entry.claimNumber)))
            }
        }
        expiryQueue = Heap(items)
    }

    private static func randomToken() -> KeyToken {
        var words: (UInt64, UInt64) = (0, 0)
        withUnsafeMutableBytes(of: &words) { raw in
            // getrandom(2) without GRND_NONBLOCK only fails for bad arguments; there is no weaker
            // fallback to take, so a failure here is a broken system.
            do { try secureRandomBytes(into: raw) } catch { fatalError("getrandom failed: \(error)") }
        }
        return KeyToken(high: words.0, low: words.1)
    }
}

/// A token bucket per uid, for what a uid may make the broker do only so often: each time spends
/// a token, and tokens come back at `refillPerSecond` up to `burst`. Failed claims use it: with
/// the bucket empty, every claim from that uid is answered EAGAIN without the key being looked
/// at, so guessing gains nothing. So do new `/net/local/addrs` snapshots.
final class UidTokenBucket {
    private struct Bucket {
        var tokens: Double
        var updatedAt: UInt64
    }

    let burst: Double
    let refillPerSecond: Double
    private var buckets: [UInt32: Bucket] = [:]

    init(burst: Int, refillPerSecond: Double) {
        self.burst = Double(max(burst, 1))
        self.refillPerSecond = max(refillPerSecond, 0.001)
    }

    func hasToken(uid: UInt32, now: UInt64) -> Bool {
        refill(uid: uid, now: now) >= 1
    }

    func spendToken(uid: UInt32, now: UInt64) {
        let tokens = refill(uid: uid, now: now)
        buckets[uid] = Bucket(tokens: max(tokens - 1, 0), updatedAt: now)
    }

    /// Spends a token if `uid` has one; false (nothing spent) if not.
    func take(uid: UInt32, now: UInt64) -> Bool {
        guard hasToken(uid: uid, now: now) else { return false }
        spendToken(uid: uid, now: now)
        return true
    }

    func millisecondsUntilNextToken(uid: UInt32, now: UInt64) -> Int {
        let missing = 1 - refill(uid: uid, now: now)
        return missing <= 0 ? 0 : Int((missing / refillPerSecond * 1000).rounded(.up))
    }

    private func refill(uid: UInt32, now: UInt64) -> Double {
        guard var bucket = buckets[uid] else { return burst }
        let elapsed = Double(now &- bucket.updatedAt) / 1e9
        bucket.tokens = min(burst, bucket.tokens + elapsed * refillPerSecond)
        bucket.updatedAt = now
        if bucket.tokens >= burst {
            buckets[uid] = nil  // full buckets need no memory
        } else {
            buckets[uid] = bucket
        }
        return bucket.tokens
    }
}

extension FileKind {
    /// The kind in words, as monitors show what a key holds.
    var spoken: String {
        switch self {
        case .regular: "regular file"
        case .directory: "directory"
        case .socket: "socket"
        case .pipe: "pipe"
        case .characterDevice: "character device"
        case .blockDevice: "block device"
        case .symbolicLink: "symbolic link"
        case .anonymous: "anonymous file (eventfd, epoll, ...)"
        case .unknown: "file"
        }
    }
}
