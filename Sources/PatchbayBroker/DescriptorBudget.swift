// The broker's descriptors, shared out. Everything a client can make the broker hold costs
// descriptors (its connection, a key's file, a reply waiting with a descriptor in it, a `/net`
// socket, a CAPS service's pages, a channel's wake-up), and each is charged to the uid that
// caused it. The shares come from the broker's real `RLIMIT_NOFILE`:
//
//   limit  = the soft limit after raising it (20,000 on a machine whose hard limit is that)
//   own    = what the broker needs for itself (listener, epoll, signalfd, store, spare, ...)
//   slack  = room for descriptors in transit (frames being received, replies being built):
//            512, or an eighth of a small limit
//   privileged uid (root; in per-user mode, the user): limit − own − slack
//   all other uids together: 3/4 of that, so root always keeps a quarter
//   any one other uid: 1/4 of that, so a single uid cannot starve the others
//
// A charge beyond a share is EDQUOT with a sentence naming the numbers.

import PatchbaySystem

final class DescriptorBudget {
    /// The descriptors the broker may have open (its soft `RLIMIT_NOFILE`).
    let limit: Int
    /// The uid that keeps the reserve: root for the system broker, the user for a per-user one.
    let privilegedUID: UInt32
    /// What the privileged uid may hold.
    let privilegedShare: Int
    /// What all other uids together may hold.
    let othersShare: Int
    /// What any one other uid may hold.
    let perUserShare: Int

    private(set) var held: [UInt32: Int] = [:]
    private(set) var heldByOthers = 0

    /// The broker's own descriptors, and those in transit at any moment (at most 512, an eighth of
    /// a small limit), kept out of every share.
    static let ownDescriptors = 64
    let transitSlack: Int

    init(limit: Int, privilegedUID: UInt32) {
        self.limit = limit
        self.privilegedUID = privilegedUID
        transitSlack = min(512, limit / 8)
        privilegedShare = max(limit - Self.ownDescriptors - transitSlack, 16)
        othersShare = privilegedShare * 3 / 4
        perUserShare = max(othersShare / 4, 8)
    }

    /// The share of `uid`.
    func share(of uid: UInt32) -> Int {
        uid == privilegedUID ? privilegedShare : perUserShare
    }

    /// Whether `count` more descriptors for `uid` fit its share (and the others' together).
    /// Descriptors a uid handed over that wait to be closed count against its share too.
    func fits(_ count: Int, for uid: UInt32) -> Bool {
        let mine = (held[uid] ?? 0) + DeferredCloser.shared.outstanding(of: uid)
        if uid == privilegedUID { return mine + count <= privilegedShare }
        return mine + count <= perUserShare
            && heldByOthers + DeferredCloser.shared.outstanding(ofAllBut: privilegedUID) + count <= othersShare
    }

    /// Charges `count` descriptors to `uid`, or throws EDQUOT saying whose share is full.
    func charge(_ count: Int, to uid: UInt32, for what: String) throws(RequestError) {
        guard fits(count, for: uid) else {
            let mine = held[uid] ?? 0
            let reason = uid != privilegedUID && heldByOthers + count > othersShare
                ? "the broker's descriptors for users other than uid \(privilegedUID) are all in use (\(heldByOthers) of \(othersShare)); cannot hold \(what)"
                : "uid \(uid) already holds \(mine) of its \(share(of: uid)) descriptors in the broker; cannot hold \(what)"
            throw RequestError(errno: .diskQuotaExceeded, reason: reason)
        }
        held[uid, default: 0] += count
        if uid != privilegedUID { heldByOthers += count }
    }

    /// Gives back descriptors charged to `uid`.
    func release(_ count: Int, from uid: UInt32) {
        let remaining = (held[uid] ?? 0) - count
        precondition(remaining >= 0, "released more descriptors than uid \(uid) was charged")
        held[uid] = remaining > 0 ? remaining : nil
        if uid != privilegedUID { heldByOthers -= count }
    }
}

/// A charge that gives itself back when it ends: held by whatever holds the descriptors.
final class DescriptorCharge {
    private let budget: DescriptorBudget
    let uid: UInt32
    let count: Int

    /// Charges `count` to `uid` now.
    init(_ count: Int, to uid: UInt32, in budget: DescriptorBudget, for what: String) throws(RequestError) {
        try budget.charge(count, to: uid, for: what)
        self.budget = budget
        self.uid = uid
        self.count = count
    }

    deinit {
        budget.release(count, from: uid)
    }
}
