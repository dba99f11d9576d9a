// Keys: the requests. `share` puts a client's descriptor under a fresh key, `claim` sends it to
// the claimer and waits for its acknowledgement (two-phase, so a descriptor the claimer could not
// receive restores the key: docs/PROTOCOL.md §9), and a session that goes away mid-claim gives
// its keys back. The table itself (deadlines, quotas, rate limits) is KeyTable.swift.
//
// Errors: EINVAL (timeout), EDQUOT (keys per uid), ENOENT (unknown, claimed, expired or
// restricted: one answer for all), EAGAIN (too many failed claims).

import PatchbayProtocol
import PatchbaySystem

final class KeyRequests: SessionClosedHook {
    let table: KeyTable
    private let sessions: SessionTable
    /// Keys whose claim reply went to a session and await its acknowledgement.
    private var claimsInFlight: [UInt64: Set<KeyToken>] = [:]

    init(table: KeyTable, sessions: SessionTable) {
        self.table = table
        self.sessions = sessions
    }

    func handle(_ request: Request.Keys, descriptors: inout ReceivedDescriptors, _ context: RequestContext) {
        switch request {
        case .share(let expiry, let restriction):
            guard let file = descriptors.takeFirst() else { return }
            do {
                let token = try table.share(file, expiry: expiry, restriction: restriction,
                                            sharer: context.caller, now: context.now)
                sessions.reply(.keys(.share(token)), to: context)
            } catch {
                sessions.fail(error, context)
            }

        case .claim(let token):
            claim(token, context)

        case .claimAcknowledge(let token, let received):
            // One-way: no reply, whatever happens.
            finish(token, session: context.session.id, received: received, now: context.now)
        }
    }

    private func claim(_ token: KeyToken, _ context: RequestContext) {
        let entry: KeyEntry
        do {
            entry = try table.beginClaim(token, by: context.caller, sentBy: context.sender, session: context.session.id, now: context.now)
        } catch {
            sessions.fail(error, context)
            return
        }
        claimsInFlight[context.session.id, default: []].insert(token)
        var context = context
        if !sessions.monitors.isEmpty {
            // Described only now that the key is known to be the caller's to claim: a failed
            // guess shows nothing of the key it hit or missed.
            context.object = entry.fileKind.spoken
            context.detail = "shared by uid \(entry.ownerUID) pid \(entry.ownerPID), \(formatDuration(nanoseconds: context.now &- entry.createdAt)) ago"
            context.owners = [entry.ownerUID]
        }
        if !sessions.reply(.keys(.claim(fileKind: entry.fileKind.rawValue)), attaching: [entry.file], to: context) {
            // The client is gone (its hook already gave the key back) or unreachable.
            finish(token, session: context.session.id, received: false, now: context.now)
        }
    }

    private func finish(_ token: KeyToken, session: UInt64, received: Bool, now: UInt64) {
        guard claimsInFlight[session]?.remove(token) != nil else { return }
        if claimsInFlight[session]?.isEmpty == true { claimsInFlight[session] = nil }
        table.finishClaim(token, session: session, received: received, now: now)
    }

    /// A claimer that vanished before acknowledging: its keys go back on the table.
    func sessionClosed(_ session: Session) {
        guard let tokens = claimsInFlight.removeValue(forKey: session.id) else { return }
        let now = monotonicNanoseconds()
        for token in tokens {
            table.finishClaim(token, session: session.id, received: false, now: now)
        }
    }

    /// Drops every key whose deadline passed; the loop calls this after each wake-up. Monitors of
    /// the sharer's uid hear of each (its file's kind and age, never the key).
    /// Returns how many expired.
    @discardableResult
    func expire(now: UInt64) -> Int {
        guard !sessions.monitors.isEmpty else { return table.expire(now: now) }
        return table.expire(now: now) { entry in
            self.sessions.announce(.keys, pid: entry.ownerPID, uid: entry.ownerUID, object: entry.fileKind.spoken,
                              audience: [entry.ownerUID]) {
                MonitorEvent(time: 0, subsystem: "", operation: "keyExpiry", pid: entry.ownerPID, uid: entry.ownerUID,
                             command: "", object: entry.fileKind.spoken, outcome: "ok", elapsed: 0, lost: 0,
                             detail: "unclaimed for \(formatDuration(nanoseconds: now &- entry.createdAt))")
            }
        }
    }

    /// How long the loop may sleep before the next key expires (-1: no deadline).
    func millisecondsUntilNextDeadline(now: UInt64) -> CInt {
        guard let deadline = table.nextDeadline else { return -1 }
        if deadline <= now { return 0 }
        return CInt(min((deadline - now) / 1_000_000 + 1, 60_000))
    }
}
