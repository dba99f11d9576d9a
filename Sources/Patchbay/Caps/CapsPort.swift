// CAPS (DragonFly BSD's Capability Application Programming Suite): ports that talk directly
// through shared memory once the broker has introduced them.
//
// The room: `CapsService` registers a name; each `CapsClient` that connects gets its own channel
// (Channel.swift: two rings and two payload arenas in one memfd the broker made), a direct socket
// pair to the service for descriptors and large payloads, and the service's status page (its
// generation, whether it sleeps, where it runs). Requests and replies never pass through the
// broker. This file is what both kinds of port share: the fork check, the stash of descriptors
// that arrived for a message not yet read, how a message is written (arena or attached memfd)
// and read, and the spin-then-sleep wait.
//
// Lifetime: a port lives while its object does; dropping it (or exiting) closes its broker
// connection, which is how the broker and the peer learn it is gone. A port inherited across
// `fork` refuses every call (`ENOTCONN`): two processes must never drive one ring end.
//
// Errors: every call throws `PatchbayError`; the errnos are listed on each call and in the
// README (CAPS section).

public import PatchbayProtocol
import Glibc
import PatchbaySystem
import SystemPackage

/// Who sent a CAPS message, from the kernel (`SO_PEERCRED`/`SO_PEERGROUPS` when the client
/// connected): pid, uid, euid, gid, up to 16 supplementary groups.
public typealias CapsCredentials = PatchbayProtocol.CapsCredentials

/// A registered service as `Broker.listServices()` shows it.
public typealias CapsServiceInfo = PatchbayProtocol.CapsServiceInfo

/// One channel's traffic as `Broker.capsTraffic()` shows it: the four ring words of its header.
public typealias CapsChannelTraffic = PatchbayProtocol.CapsChannelTraffic

/// Descriptors that came with a message. They are owned here: whatever is not taken is closed
/// when this goes away.
public final class CapsDescriptors: @unchecked Sendable {
    private var raw: [CInt]
    /// Whose they are: the peer they came from (a client's uid, or a client port's service), whose
    /// closing thread closes any that could make a close wait.
    private let peer: UInt64

    /// Takes ownership of `raw`, from `peer`.
    init(adopting raw: [CInt], from peer: UInt64) {
        self.raw = raw
        self.peer = peer
    }

    /// (Descriptors the peer chose: the port's thread never waits on one's last close.)
    deinit { for fd in raw { PeerDescriptors.close(fd, of: peer) } }

    /// How many descriptors are still held.
    public var count: Int { raw.count }

    /// Takes the next descriptor; the caller owns it.
    public func take() -> Descriptor? {
        raw.isEmpty ? nil : Descriptor(adopting: raw.removeFirst())
    }

    /// The first descriptor, still owned here.
    var first: CInt? { raw.first }

    /// Closes the first descriptor (an attached payload, once read).
    func dropFirst() {
        if !raw.isEmpty { PeerDescriptors.close(raw.removeFirst(), of: peer) }
    }

    /// The rest, handed on as a set of their own (nil when none is left).
    func remaining() -> CapsDescriptors? {
        guard !raw.isEmpty else { return nil }
        defer { raw = [] }
        return CapsDescriptors(adopting: raw, from: peer)
    }
}

/// Descriptors that arrived for a message not yet read to the end (a message that did not fit
/// the caller's buffer stays queued, and so do its descriptors). Dropping an entry closes it.
/// Used under the port's lock only.
final class AttachmentStash {
    @exclusivity(unchecked) private var waiting: [UInt64: CapsDescriptors] = [:]  // under the port lock, as `stash` is

    /// The descriptors sent with `messageID`: the kept ones, else those queued on `direct`, from
    /// `peer`.
    func take(_ messageID: UInt64, from direct: CInt, peer: UInt64) throws(PatchbayError) -> CapsDescriptors {
        if let kept = waiting.removeValue(forKey: messageID) { return kept }
        return try receiveAttachments(direct, messageID: messageID, peer: peer)
    }

    /// Keeps `descriptors` for the next read of `messageID`.
    func keep(_ descriptors: CapsDescriptors, for messageID: UInt64) {
        waiting[messageID] = descriptors
    }

    /// Closes what was kept for `messageID`, if anything.
    func discard(_ messageID: UInt64) {
        waiting[messageID] = nil
    }

    /// `discard`, at the cost of one load when nothing is kept (the common case, on the hot path).
    @inline(__always)
    func discardKept(_ messageID: UInt64) {
        if !waiting.isEmpty { waiting[messageID] = nil }
    }

    /// A service's rule: only the request at the head of a channel's ring is ever kept (read
    /// short, it stays there), so whatever is kept for another id of `channel` belongs to an
    /// entry its client rewrote (a new id over the old, which the service will never name again)
    /// and is closed. `current` nil: everything kept for the channel (its client is gone).
    @inline(__always)
    func discardStale(of channel: UInt64, keeping current: UInt64?) {
        guard !waiting.isEmpty else { return }
        for id in waiting.keys where capsChannel(of: id) == channel && id != current { waiting[id] = nil }
    }

    /// Closes the descriptors of a message nobody will read, kept or still queued on `direct`.
    func discard(_ entry: CapsEntry, from direct: CInt, peer: UInt64) {
        guard entry.flags & (CapsEntryFlags.attachedPayload | CapsEntryFlags.descriptors) != 0 else { return }
        if waiting.removeValue(forKey: entry.messageID) == nil {
            _ = try? receiveAttachments(direct, messageID: entry.messageID, peer: peer)
        }
    }
}

/// A message's payload, ready to read in place: in the sender's arena, or in its attached memfd
/// (mapped here for as long as this lives), plus every descriptor that came with it.
struct CapsPayload: ~Copyable {
    let bytes: UnsafeRawBufferPointer
    /// Keeps an attached payload mapped.
    let view: PatchbaySystem.Mapping?
    /// Everything sent with the message; an attached payload's memfd comes first.
    let attachments: CapsDescriptors?
    let isAttached: Bool

    /// The descriptors the sender attached, without the payload's memfd, for the reader to take.
    func carried() -> CapsDescriptors? {
        guard let attachments else { return nil }
        if isAttached { attachments.dropFirst() }
        return attachments.remaining()
    }
}

/// What a CAPS client port and a service port share. Owned by the port (a constant of it, so the
/// hot path pays no exclusivity check); every use of `stash` is under `lock`, which is recursive
/// so that a receive body may call its port again. The ports' own mutable state is used under the
/// same lock and marked `@exclusivity(unchecked)`: the lock is what keeps accesses apart, and the
/// runtime's dynamic check (a thread-local access set per access) cost more than the rest of a
/// message's bookkeeping.
struct CapsPortCore {
    /// Serialises the port's state; never held while sleeping.
    let lock = Lock()
    /// Descriptors of messages not yet read to the end.
    let stash = AttachmentStash()
    private let createdIn = forkGeneration()
    /// What the user should do instead, said when the port was inherited.
    private let anew: String

    init(anew: String) {
        self.anew = anew
    }

    /// Whether this port was inherited across `fork`: its descriptors and memory are shared with
    /// the parent's port, which must not be disturbed from here.
    var isInherited: Bool { forkGenerationSeen() != createdIn }

    /// `ENOTCONN` for a port inherited across `fork`.
    @inline(__always)
    func checkInherited() throws(PatchbayError) {
        // `createdIn` came from `forkGeneration()`, which installed the fork counter.
        if forkGenerationSeen() != createdIn {
            throw PatchbayError(.socketNotConnected, "this port was inherited across fork; close it and \(anew)")
        }
    }

    // MARK: Writing a message

    /// Writes a message of `length` bytes (`fill` writes them in place) into its ring entry when
    /// it fits there (`CapsLayout.inlineCapacity`), else into this side's arena of `channel`, or
    /// into a memfd of its own when the arena has no room; sends its descriptors to the peer, and
    /// publishes its entry on `ring`. Returns the arena offset (-1: inline or attached, no arena
    /// space). When it throws, nothing was published and the arena space is free again.
    static func publish(
        on channel: CapsChannel, _ ring: CapsChannel.Ring, allocator: inout ArenaAllocator, direct: CInt,
        messageID: UInt64, length: Int, descriptors: [CInt], what: String,
        fill: (UnsafeMutableRawBufferPointer) -> Void
    ) throws(PatchbayError) -> Int {
        let kind: CapsEntryKind = ring == .request ? .request : .reply
        if length <= CapsLayout.inlineCapacity {
            guard let slot = channel.reserve(ring) else {
                throw PatchbayError(.noBufferSpace, "the \(ring == .request ? "request" : "reply") ring is full")
            }
            fill(CapsChannel.inlineSpace(slot, length: length))
            if !descriptors.isEmpty { try sendAttachments(direct, messageID: messageID, descriptors: descriptors) }
            channel.commit(ring, slot, CapsEntry(messageID: messageID, offset: 0, length: UInt32(length), kind: kind,
                                                 flags: CapsEntryFlags.inlinePayload
                                                     | (descriptors.isEmpty ? 0 : CapsEntryFlags.descriptors)))
            return -1
        }
        let arena = ring == .request ? channel.requestArena : channel.replyArena
        if descriptors.isEmpty, length <= channel.arenaSize, let slot = allocator.allocate(length) {
            // The common case, in the arena with nothing attached: no descriptor list to build.
            fill(UnsafeMutableRawBufferPointer(start: arena.advanced(by: slot), count: length))
            guard channel.push(ring, CapsEntry(messageID: messageID, offset: UInt64(slot), length: UInt32(length), kind: kind, flags: 0))
            else {
                allocator.release(offset: slot, length: length)
                throw PatchbayError(.noBufferSpace, "the \(ring == .request ? "request" : "reply") ring is full")
            }
            return slot
        }
        var flags: UInt32 = descriptors.isEmpty ? 0 : CapsEntryFlags.descriptors
        var offset = -1
        if length <= channel.arenaSize, let slot = allocator.allocate(length) {
            offset = slot
            fill(UnsafeMutableRawBufferPointer(start: arena.advanced(by: slot), count: length))
            if !descriptors.isEmpty {
                do {
                    try sendAttachments(direct, messageID: messageID, descriptors: descriptors)
                } catch {
                    allocator.release(offset: offset, length: length)
                    throw error
                }
            }
        } else {
            let object = try attachedPayload(length: length, what: what, fill: fill)
            flags |= CapsEntryFlags.attachedPayload
            // Open until the peer has its own copy: its lifetime is extended over the send
            // explicitly (an optimised build otherwise closed it after its last use, before the
            // send, which then failed with EBADF).
            try withExtendedLifetime(object) { () throws(PatchbayError) in
                try sendAttachments(direct, messageID: messageID, descriptors: [object.rawValue] + descriptors)
            }
        }
        guard channel.push(ring, CapsEntry(messageID: messageID, offset: UInt64(max(offset, 0)), length: UInt32(length),
                                           kind: kind, flags: flags)) else {
            if offset >= 0 { allocator.release(offset: offset, length: length) }
            throw PatchbayError(.noBufferSpace, "the \(ring == .request ? "request" : "reply") ring is full")
        }
        return offset
    }

    /// A memfd holding a payload too large for the arena, written by `fill`.
    private static func attachedPayload(length: Int, what: String, fill: (UnsafeMutableRawBufferPointer) -> Void)
        throws(PatchbayError) -> PatchbaySystem.Descriptor
    {
        do {
            let object = try makeMemoryFile(name: "patchbay-caps-payload", sealable: true)
            try object.truncate(to: max(length, 1))
            let view = try PatchbaySystem.Mapping(object, length: max(length, 1), writable: true)
            fill(UnsafeMutableRawBufferPointer(start: view.baseAddress, count: length))
            // Its size sealed, so the peer can map it without fearing that it shrinks under its
            // reads (SIGBUS); the receiver refuses any attached payload that is not.
            try object.addSeals([.shrink, .grow])
            return object
        } catch {
            throw PatchbayError(error, "cannot make a shared memory object for a \(length)-byte \(what)")
        }
    }

    // MARK: Reading a message

    /// `CapsChannel.plainBytes` for a ring entry as `peek` copied it out.
    @inline(__always)
    static func plainPayload(_ entry: CapsEntry, in channel: CapsChannel, arena: UnsafeMutableRawPointer) -> UnsafeRawBufferPointer? {
        channel.plainBytes(flags: entry.flags, offset: entry.offset, length: entry.length, inline: entry.inlineBytes, arena: arena)
    }

    /// The payload of `entry`, read from the peer's side of `channel` (`arena`): nil when the
    /// peer could not have written it honestly (outside the arena, or announced descriptors that
    /// never came, or a memfd shorter than announced); such a message is never read.
    func payload(of entry: CapsEntry, in channel: CapsChannel, arena: UnsafeMutableRawPointer, direct: CInt, peer: UInt64)
        throws(PatchbayError) -> CapsPayload?
    {
        let length = Int(entry.length)
        if entry.flags & CapsEntryFlags.inlinePayload != 0 {
            // In the entry itself: at most `inlineCapacity` bytes, never with an attached payload.
            guard length <= CapsLayout.inlineCapacity, entry.flags & CapsEntryFlags.attachedPayload == 0,
                  let start = entry.inlineBytes else { return nil }
            let attachments: CapsDescriptors?
            if entry.flags & CapsEntryFlags.descriptors != 0 {
                // Sent before the entry was published: none queued means none was sent.
                guard let sent = try? stash.take(entry.messageID, from: direct, peer: peer) else { return nil }
                attachments = sent
            } else {
                attachments = nil
            }
            return CapsPayload(bytes: UnsafeRawBufferPointer(start: start, count: length), view: nil, attachments: attachments,
                               isAttached: false)
        }
        guard entry.flags & (CapsEntryFlags.attachedPayload | CapsEntryFlags.descriptors) != 0 else {
            guard channel.fitsArena(offset: entry.offset, length: entry.length) else { return nil }
            return CapsPayload(bytes: UnsafeRawBufferPointer(start: arena.advanced(by: Int(entry.offset)), count: length),
                               view: nil, attachments: nil, isAttached: false)
        }
        guard let attachments = try? stash.take(entry.messageID, from: direct, peer: peer),
              payloadIsSound(entry, channel: channel, attachments: attachments) else { return nil }
        guard entry.flags & CapsEntryFlags.attachedPayload != 0, let object = attachments.first else {
            return CapsPayload(bytes: UnsafeRawBufferPointer(start: arena.advanced(by: Int(entry.offset)), count: length),
                               view: nil, attachments: attachments, isAttached: false)
        }
        // Mapped from a duplicate: the memfd itself stays with the message until it is consumed.
        // A payload that cannot be mapped is dropped like any unsound one: it is the sender's
        // problem, never a reason for this port to fail.
        guard let view = try? PatchbaySystem.Mapping(PatchbaySystem.Descriptor(adopting: dup(object)),
                                                     length: max(length, 1), writable: false) else {
            return nil
        }
        return CapsPayload(bytes: UnsafeRawBufferPointer(start: view.baseAddress, count: length), view: view,
                           attachments: attachments, isAttached: true)
    }

    // MARK: Waiting

    /// Spin-then-sleep: tells the peer which CPU this thread runs on (in `cpuWord`), spins while
    /// `peer` runs on another CPU and `ready` is false, for at most the spin budget
    /// (`CapsTuning`), and otherwise calls `sleep`.
    @inline(__always)
    static func wait(
        publishingCPUIn cpuWord: UnsafeMutablePointer<UInt32>, peer: PeerActivity?, until ready: () -> Bool,
        orSleep sleep: () throws(PatchbayError) -> Void
    ) throws(PatchbayError) {
        let cpu = UInt32(bitPattern: currentCPU())
        if SharedWord.load(cpuWord) != cpu { SharedWord.store(cpuWord, cpu) }
        if var peer, spinUntil(ready, while: { peer.isRunningElsewhere() }) { return }
        try sleep()
    }
}

/// Where the peer of a port says it runs: its running flag and CPU words, in shared memory.
struct PeerActivity {
    let running: UnsafeMutablePointer<UInt32>
    let cpu: UnsafeMutablePointer<UInt32>
    /// This port woke the peer since its last wait: the peer is on its way to run, and its answer
    /// may come within the spin budget even though its running flag still says it sleeps, until
    /// the flag has been seen set (from then on the flag says all: a peer that ran and went back
    /// to sleep is not waited for). (Without this, two peers that once fell asleep stay in step
    /// asleep: each wakes the other and, seeing it not yet running, sleeps at once; every round
    /// trip then costs two wake-ups.)
    var woken = false

    /// The peer is running now, or was just woken and has not run yet, on another CPU than this
    /// thread: spinning can see its answer.
    @inline(__always)
    mutating func isRunningElsewhere() -> Bool {
        let running = SharedWord.load(running) != 0
        if running { woken = false }
        return (woken || running) && Int32(bitPattern: SharedWord.load(cpu)) != currentCPU()
    }
}

/// Whether a payload a peer announced can be read safely: inside the arena, or an attached payload
/// that passes `attachedPayloadIsSound`.
func payloadIsSound(_ entry: CapsEntry, channel: CapsChannel, attachments: CapsDescriptors) -> Bool {
    if entry.flags & CapsEntryFlags.attachedPayload != 0 {
        guard let object = attachments.first else { return false }
        return attachedPayloadIsSound(object, length: Int(entry.length))
    }
    return channel.fitsArena(offset: entry.offset, length: entry.length)
}

/// Whether an attached payload can be mapped and read without the sender being able to make the
/// reader fault: a memfd sealed against shrinking, at least as long as announced. A pipe, a socket
/// or an unsealed memfd (whose sender could truncate it while it is read: SIGBUS) is not.
func attachedPayloadIsSound(_ object: CInt, length: Int) -> Bool {
    guard let seals = seals(ofDescriptor: object), seals.contains(.shrink) else { return false }
    var info = stat()
    return fstat(object, &info) == 0 && Int(info.st_size) >= length
}

/// The message id: the channel's id in the high half, a per-client sequence number in the low
/// half, so ids are unique across all of a service's clients.
@inline(__always)
func capsMessageID(channel: UInt64, sequence: UInt32) -> UInt64 { channel << 32 | UInt64(sequence) }

@inline(__always)
func capsChannel(of messageID: UInt64) -> UInt64 { messageID >> 32 }

/// Sends descriptors (and, for attached payloads, the payload's memfd first) for one message on
/// the peers' direct socket, tagged with the message id.
func sendAttachments(_ socket: CInt, messageID: UInt64, descriptors: [CInt]) throws(PatchbayError) {
    var tag = messageID
    let sent = withUnsafeBytes(of: &tag) { raw in
        descriptors.withUnsafeBufferPointer { fds in
            SeqpacketSocket.sendRaw(socket, raw, fds, nonblocking: true)
        }
    }
    // Never wait on the peer: one that does not read its direct socket only hurts itself.
    if sent < 0 {
        let error = Errno.current
        throw PatchbayError(error == .resourceTemporarilyUnavailable ? .noBufferSpace : error,
                            "cannot send the message's descriptors to the peer")
    }
}

/// Receives the descriptors sent for `messageID`. They were sent before the ring entry, so they
/// are already queued; if not, the peer lied, and nothing waits for it. Descriptors of other
/// messages found on the way belong to messages nobody will read any more (aborted, or their
/// peer gone) and are closed.
func receiveAttachments(_ socket: CInt, messageID: UInt64, peer: UInt64) throws(PatchbayError) -> CapsDescriptors {
    var tag: UInt64 = 0
    while true {
        let received = withUnsafeMutableBytes(of: &tag) { raw in
            SeqpacketSocket.receiveRaw(socket, raw, nonblocking: true)
        }
        guard let received else {
            throw PatchbayError(.protocolError, "message \(messageID) announced descriptors its sender did not send")
        }
        let descriptors = CapsDescriptors(adopting: received.descriptors, from: peer)
        if received.length == 8 && tag == messageID { return descriptors }
        if received.length == 0 { throw PatchbayError(.connectionReset, "the peer's direct socket closed") }
        // Another message's, closed on the peer's closing thread. A peer that makes those closes
        // wait could otherwise have this loop take every descriptor it queued (253 a message):
        // past the bound, stop, and let the caller cut it off.
        _ = consume descriptors
        if PeerDescriptors.pastBound(of: peer) {
            throw PatchbayError(.noBufferSpace, "the peer's descriptors wait to be closed past the bound; message \(messageID)'s were not read")
        }
    }
}

extension Unmanaged {
    /// `body` with the instance, whose reference is not counted for it: the caller keeps it
    /// alive for the call (the guarantee `_withUnsafeGuaranteedRef` asks for), with typed throws.
    @inline(__always)
    func borrowing<R, E: Error>(_ body: (Instance) throws(E) -> R) throws(E) -> R {
        let result = _withUnsafeGuaranteedRef { instance in Result { () throws(E) -> R in try body(instance) } }
        return try result.get()
    }
}
