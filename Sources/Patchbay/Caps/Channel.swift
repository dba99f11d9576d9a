// The shared-memory channel between one CAPS client and its service (layout: CapsLayout in
// PatchbayProtocol). Both processes map the same memfd; each ring has exactly one producer and
// one consumer, so a slot is published with a release store of the tail and claimed with a
// release store of the head, and nothing else needs a lock.

import Glibc
import PatchbayProtocol
import PatchbaySystem
import SystemPackage
import Synchronization

/// One ring entry, as copied out of shared memory.
struct CapsEntry {
    var messageID: UInt64
    var offset: UInt64
    var length: UInt32
    var kind: CapsEntryKind
    var flags: UInt32
    /// In a request entry: the low 32 bits of the client's reply head when it pushed the entry
    /// (layout 3), so the service learns of DISPOSEs from the line it reads anyway.
    var consumed: UInt32 = 0
    /// Where an inline payload is, in the ring slot (set by `peek`).
    var inlineBytes: UnsafeRawPointer? = nil
}

/// A mapped channel: header words, the two rings and the two arenas.
final class CapsChannel: @unchecked Sendable {
    let mapping: PatchbaySystem.Mapping
    let capacity: UInt64
    let arenaSize: Int
    /// Where each part of the mapping starts, worked out once: the message path only adds to
    /// these. `mask` is `capacity - 1` (a power of two).
    private let requestSlots: UnsafeMutableRawPointer
    private let replySlots: UnsafeMutableRawPointer
    let requestArena: UnsafeMutableRawPointer
    let replyArena: UnsafeMutableRawPointer
    private let claims: UnsafeMutablePointer<UInt64>
    private let mask: UInt64
    /// This side's private ring positions, per ring (request ring at 0, reply ring at 1): as
    /// producer, its tail and its last look at the consumer's head; as consumer, its head. The
    /// shared words are written for the peer (and observers) but never read back, so a peer
    /// that scribbles on them cannot move this side, and the consumer's head is read only when
    /// the known copy says the ring is full: its cache line stays with the consumer instead of
    /// crossing CPUs on every push.
    ///
    /// The service also keeps, for the reply ring, what its DISPOSEs come from (layout 3: the
    /// client's reply head is its DISPOSE of every REPLY before it): the head as last looked at,
    /// how far it has been believed (never backwards, never past this side's tail), and how far
    /// DISPOSEs were made of it.
    private let positions: UnsafeMutablePointer<UInt64>
    /// Where each of them is in `positions` (a ring's own word is at its index past these; the
    /// waiting service's `Probe` reads them by the same numbers).
    private enum Position {
        static let tail = 0, knownHead = 2, head = 4, consumedSeen = 6, consumed = 7, disposed = 8, cutOff = 9, count = 10
    }
    @inline(__always) private func tail(_ ring: Ring) -> UnsafeMutablePointer<UInt64> { positions + Position.tail + ring.index }
    @inline(__always) private func knownHead(_ ring: Ring) -> UnsafeMutablePointer<UInt64> { positions + Position.knownHead + ring.index }
    @inline(__always) private func head(_ ring: Ring) -> UnsafeMutablePointer<UInt64> { positions + Position.head + ring.index }
    @inline(__always) private var consumedSeen: UnsafeMutablePointer<UInt64> { positions + Position.consumedSeen }
    @inline(__always) private var consumed: UnsafeMutablePointer<UInt64> { positions + Position.consumed }
    @inline(__always) private var disposed: UnsafeMutablePointer<UInt64> { positions + Position.disposed }
    /// The service's record of its reply ring, by position: the message id of each REPLY pushed
    /// (0 for entries that get no DISPOSE: error and discarded replies). Private to the service,
    /// so a client that rewrites the ring cannot make it dispose of anything but what it sent.
    private let replyLog: UnsafeMutablePointer<UInt64>?
    /// Where the service counts the request-ring entries it consumes and the reply-ring entries
    /// it publishes (two u64 in its status page, §12.7, which its clients cannot write): nil on a
    /// client's side. Written under the service port's lock.
    var tally: UnsafeMutablePointer<UInt64>?

    /// Maps a channel. `tracksDisposals`: this is the service's side, which logs its REPLYs to
    /// make DISPOSEs of them when the client's reply head passes them.
    init(_ memory: borrowing PatchbaySystem.Descriptor, arenaSize expected: Int, tracksDisposals: Bool = false) throws(PatchbayError) {
        let header: (capacity: Int, arena: Int)
        do {
            let probe = try PatchbaySystem.Mapping(memory, length: CapsLayout.headerSize, writable: false)
            let base = probe.baseAddress
            guard base.load(fromByteOffset: CapsLayout.magicOffset, as: UInt32.self) == CapsLayout.magic,
                  base.load(fromByteOffset: CapsLayout.versionOffset, as: UInt32.self) == CapsLayout.version
            else { throw PatchbayError(.protocolError, "the CAPS channel has an unknown layout") }
            header = (Int(base.load(fromByteOffset: CapsLayout.ringCapacityOffset, as: UInt32.self)),
                      Int(base.load(fromByteOffset: CapsLayout.arenaSizeOffset, as: UInt64.self)))
        } catch let error as PatchbayError {
            throw error
        } catch {
            throw PatchbayError((error as? Errno) ?? .ioError, "cannot map the CAPS channel")
        }
        // Read once and checked: a peer could rewrite the header later, but nothing trusts it again.
        // The sizes come from the broker's message; the header (which a peer can write) must agree,
        // and the memfd must really be that large (it is sealed at its size by the broker).
        var info = stat()
        guard header.capacity == CapsLayout.ringCapacity, header.arena == expected,
              fstat(memory.rawValue, &info) == 0,
              Int(info.st_size) >= CapsLayout.channelSize(capacity: CapsLayout.ringCapacity, arenaSize: expected)
        else {
            throw PatchbayError(.protocolError, "the CAPS channel is not the one the broker described")
        }
        capacity = UInt64(header.capacity)
        arenaSize = header.arena
        positions = .allocate(capacity: Position.count)
        positions.initialize(repeating: 0, count: Position.count)
        if tracksDisposals {
            let log = UnsafeMutablePointer<UInt64>.allocate(capacity: header.capacity)
            log.initialize(repeating: 0, count: header.capacity)
            replyLog = log
        } else {
            replyLog = nil
        }
        do {
            mapping = try PatchbaySystem.Mapping(memory, length: CapsLayout.channelSize(capacity: header.capacity, arenaSize: header.arena),
                                  writable: true)
        } catch {
            throw PatchbayError(error, "cannot map the CAPS channel")
        }
        let base = mapping.baseAddress
        requestSlots = base.advanced(by: CapsLayout.requestRingOffset())
        replySlots = base.advanced(by: CapsLayout.replyRingOffset(capacity: header.capacity))
        requestArena = base.advanced(by: CapsLayout.requestArenaOffset(capacity: header.capacity))
        replyArena = base.advanced(by: CapsLayout.replyArenaOffset(capacity: header.capacity, arenaSize: header.arena))
        claims = base.advanced(by: CapsLayout.claimsOffset(capacity: header.capacity, arenaSize: header.arena))
            .assumingMemoryBound(to: UInt64.self)
        mask = UInt64(header.capacity - 1)
        // A new channel starts at 0; the peer's words are read once, here, and only its own
        // position is taken from them (each side then keeps its positions privately).
        for ring in [Ring.request, .reply] {
            SharedWord.store(tail(ring), SharedWord.load(word64(ring.tailOffset)))
            SharedWord.store(head(ring), SharedWord.load(word64(ring.headOffset)))
            SharedWord.store(knownHead(ring), SharedWord.load(head(ring)))
        }
        for word in [consumedSeen, consumed, disposed] { SharedWord.store(word, SharedWord.load(head(.reply))) }
    }

    deinit {
        positions.deallocate()
        replyLog?.deallocate()
    }

    @inline(__always) func word32(_ offset: Int) -> UnsafeMutablePointer<UInt32> {
        mapping.baseAddress.advanced(by: offset).assumingMemoryBound(to: UInt32.self)
    }

    @inline(__always) func word64(_ offset: Int) -> UnsafeMutablePointer<UInt64> {
        mapping.baseAddress.advanced(by: offset).assumingMemoryBound(to: UInt64.self)
    }

    /// Whether `offset` and `length` from a ring entry lie inside an arena. A peer writes them, so
    /// they are never used before this check: a bad pair would read outside the mapping.
    func fitsArena(offset: UInt64, length: UInt32) -> Bool {
        offset <= UInt64(arenaSize) && UInt64(length) <= UInt64(arenaSize) - offset
    }

    /// The service is gone for this side: the broker said so in the header, or this client cut it
    /// off (`cutOff`; kept in this process, where the service cannot undo it).
    var serviceClosed: Bool {
        SharedWord.load(word32(CapsLayout.serviceClosedOffset)) != 0 || positions[Position.cutOff] != 0
    }
    /// Whether this client cut the service off.
    var isCutOff: Bool { positions[Position.cutOff] != 0 }
    /// Treats the service as gone from now on (client side), whatever the header says.
    func cutOff() { positions[Position.cutOff] = 1 }
    /// The service is there, but could not take this client (the broker marked the channel so).
    var serviceRefused: Bool { SharedWord.load(word32(CapsLayout.serviceClosedOffset)) == CapsLayout.serviceRefusedClient }
    var clientClosed: Bool { SharedWord.load(word32(CapsLayout.clientClosedOffset)) != 0 }

    // MARK: Rings
    //
    // Each ring has one producer and one consumer. The producer fills a slot (its inline payload
    // first, if any, then the fields) and stores the slot's stamp last, with release ordering:
    // the entry at position p is there when its stamp reads p + 1. The consumer polls the stamp
    // of the slot at its head, so seeing an entry costs the entry's own cache line and nothing
    // else; it then stores its new head, which the producer reads only when the ring looks full.
    // The producer also stores its tail, for observers; neither side needs it.

    enum Ring {
        case request, reply

        var tailOffset: Int { self == .request ? CapsLayout.requestTailOffset : CapsLayout.replyTailOffset }
        var headOffset: Int { self == .request ? CapsLayout.requestHeadOffset : CapsLayout.replyHeadOffset }
        var index: Int { self == .request ? 0 : 1 }
    }

    @inline(__always) private func slot(_ ring: Ring, _ position: UInt64) -> UnsafeMutableRawPointer {
        (ring == .request ? requestSlots : replySlots) + Int(truncatingIfNeeded: (position & mask) &* UInt64(CapsLayout.entrySize))
    }

    @inline(__always) private static func stamp(_ slot: UnsafeMutableRawPointer) -> UnsafeMutablePointer<UInt64> {
        slot.advanced(by: CapsLayout.entryStamp).assumingMemoryBound(to: UInt64.self)
    }

    /// The slot of the next entry (producer side), for an inline payload to be written before
    /// `commit`; nil when the ring is full.
    @inline(__always)
    func reserve(_ ring: Ring) -> UnsafeMutableRawPointer? {
        let tail = SharedWord.load(tail(ring))
        // The service never reuses a reply slot whose DISPOSE it has not made yet.
        if ring == .reply, replyLog != nil, tail &- SharedWord.load(disposed) >= capacity { return nil }
        if tail &- SharedWord.load(knownHead(ring)) >= capacity {
            SharedWord.store(knownHead(ring), SharedWord.load(word64(ring.headOffset)))
            guard tail &- SharedWord.load(knownHead(ring)) < capacity else { return nil }
        }
        return slot(ring, tail)
    }

    /// Publishes the slot `reserve` gave with `entry`'s fields (producer side).
    /// (`forgedConsumed`: a reply head to announce instead of the true one, for the tests' hostile
    /// client only.)
    @inline(__always)
    func commit(_ ring: Ring, _ slot: UnsafeMutableRawPointer, _ entry: CapsEntry, forgedConsumed: UInt32? = nil) {
        let tail = SharedWord.load(tail(ring))
        slot.storeBytes(of: entry.messageID, toByteOffset: CapsLayout.entryMessageID, as: UInt64.self)
        slot.storeBytes(of: entry.offset, toByteOffset: CapsLayout.entryOffset, as: UInt64.self)
        slot.storeBytes(of: entry.length, toByteOffset: CapsLayout.entryLength, as: UInt32.self)
        slot.storeBytes(of: entry.kind.rawValue, toByteOffset: CapsLayout.entryKind, as: UInt32.self)
        slot.storeBytes(of: entry.flags, toByteOffset: CapsLayout.entryFlags, as: UInt32.self)
        if ring == .request {
            slot.storeBytes(of: forgedConsumed ?? UInt32(truncatingIfNeeded: SharedWord.load(head(.reply))),
                            toByteOffset: CapsLayout.entryConsumed, as: UInt32.self)
        }
        if ring == .reply, let replyLog {
            replyLog[Int(truncatingIfNeeded: tail & mask)] = entry.kind == .reply || entry.kind == .errorReply ? entry.messageID : 0
            if let tally { SharedWord.store(tally + 1, SharedWord.load(tally + 1) &+ 1) }
        }
        SharedWord.store(Self.stamp(slot), tail &+ 1)
        SharedWord.store(self.tail(ring), tail &+ 1)
        SharedWord.store(word64(ring.tailOffset), tail &+ 1)
    }

    /// Publishes an entry without inline payload (producer side). False when the ring is full.
    @inline(__always)
    func push(_ ring: Ring, _ entry: CapsEntry) -> Bool {
        guard let slot = reserve(ring) else { return false }
        commit(ring, slot, entry)
        return true
    }

    /// The payload space of a reserved slot.
    static func inlineSpace(_ slot: UnsafeMutableRawPointer, length: Int) -> UnsafeMutableRawBufferPointer {
        UnsafeMutableRawBufferPointer(start: slot.advanced(by: CapsLayout.entryInline), count: length)
    }

    /// The oldest entry not yet consumed (consumer side), without consuming it, and its position.
    @inline(__always)
    func peek(_ ring: Ring) -> (entry: CapsEntry, position: UInt64)? {
        let head = SharedWord.load(head(ring))
        let slot = slot(ring, head)
        guard SharedWord.load(Self.stamp(slot)) == head &+ 1 else { return nil }
        let kind = CapsEntryKind(rawValue: slot.load(fromByteOffset: CapsLayout.entryKind, as: UInt32.self)) ?? .discardedReply
        let entry = CapsEntry(
            messageID: slot.load(fromByteOffset: CapsLayout.entryMessageID, as: UInt64.self),
            offset: slot.load(fromByteOffset: CapsLayout.entryOffset, as: UInt64.self),
            length: slot.load(fromByteOffset: CapsLayout.entryLength, as: UInt32.self),
            kind: kind,
            flags: slot.load(fromByteOffset: CapsLayout.entryFlags, as: UInt32.self),
            consumed: slot.load(fromByteOffset: CapsLayout.entryConsumed, as: UInt32.self),
            inlineBytes: UnsafeRawPointer(slot.advanced(by: CapsLayout.entryInline)))
        return (entry, head)
    }

    /// The entry at a ring's head as the one-pass paths read it (consumer side): the fields they
    /// decide on, each loaded once from the slot.
    struct EntryAtHead {
        let position: UInt64
        let messageID: UInt64
        let offset: UInt64
        let length: Int
        let kind: UInt32
        let flags: UInt32
        /// In a request entry: the low half of the client's reply head (see `CapsEntry`).
        let consumed: UInt32
        /// Where an inline payload is: in the slot.
        let inlineBytes: UnsafeRawPointer

        /// Whether the payload is inline (else in the sender's arena).
        @inline(__always)
        var isInline: Bool { flags == CapsEntryFlags.inlinePayload }
    }

    /// The bytes of a payload with nothing attached, inline in its entry (no longer than an entry
    /// holds) or inside the sender's `arena`: the common cases, read in place. Nil for anything
    /// else, sound or not, which the general paths check and build (`CapsPortCore.payload`). The
    /// one rule for every path that reads a payload in place.
    @inline(__always)
    func plainBytes(flags: UInt32, offset: UInt64, length: UInt32, inline: UnsafeRawPointer?, arena: UnsafeMutableRawPointer)
        -> UnsafeRawBufferPointer?
    {
        if flags == CapsEntryFlags.inlinePayload {
            guard length <= UInt32(CapsLayout.inlineCapacity), let inline else { return nil }
            return UnsafeRawBufferPointer(start: inline, count: Int(length))
        }
        guard flags == 0, fitsArena(offset: offset, length: length) else { return nil }
        return UnsafeRawBufferPointer(start: arena.advanced(by: Int(offset)), count: Int(length))
    }

    /// `plainBytes` of an entry of `kind` at a ring's head; nil for an entry of another kind.
    @inline(__always)
    func plainPayload(_ entry: EntryAtHead, _ kind: CapsEntryKind, arena: UnsafeMutableRawPointer) -> UnsafeRawBufferPointer? {
        guard entry.kind == kind.rawValue else { return nil }
        return plainBytes(flags: entry.flags, offset: entry.offset, length: UInt32(truncatingIfNeeded: entry.length),
                          inline: entry.inlineBytes, arena: arena)
    }

    /// A ring's oldest entry (consumer side), without consuming it.
    @inline(__always)
    func entryAtHead(_ ring: Ring) -> EntryAtHead? {
        let head = SharedWord.load(head(ring))
        let slot = slot(ring, head)
        guard SharedWord.load(Self.stamp(slot)) == head &+ 1 else { return nil }
        return EntryAtHead(position: head,
                           messageID: slot.load(fromByteOffset: CapsLayout.entryMessageID, as: UInt64.self),
                           offset: slot.load(fromByteOffset: CapsLayout.entryOffset, as: UInt64.self),
                           length: Int(slot.load(fromByteOffset: CapsLayout.entryLength, as: UInt32.self)),
                           kind: slot.load(fromByteOffset: CapsLayout.entryKind, as: UInt32.self),
                           flags: slot.load(fromByteOffset: CapsLayout.entryFlags, as: UInt32.self),
                           consumed: ring == .request ? slot.load(fromByteOffset: CapsLayout.entryConsumed, as: UInt32.self) : 0,
                           inlineBytes: UnsafeRawPointer(slot.advanced(by: CapsLayout.entryInline)))
    }

    // MARK: Claims
    //
    // Who gets a REQUEST still in the ring, the service (taking it) or its client (taking it back
    // with `abort`), is decided by a compare-and-swap on the slot's claim word, in a region of
    // its own at the end of the channel. The client never writes it but to abort, so its cache
    // line stays with the service, and taking a request costs no cache-line transfer.

    @inline(__always) private func claimWord(_ position: UInt64) -> UnsafeMutablePointer<UInt64> {
        claims + Int(truncatingIfNeeded: position & mask)
    }

    /// The service claims the REQUEST at `position`: false when its client took it back first (or
    /// wrote anything else there).
    @inline(__always)
    func claimForService(_ position: UInt64) -> Bool {
        let word = claimWord(position)
        let taken = CapsLayout.claim(of: position, aborted: false)
        let current = SharedWord.load(word)
        if current == taken { return true }  // taken before and left queued (a buffer too small)
        if current == taken | 1 { return false }
        return SharedWord.compareExchange(word, expected: current, desired: taken)
    }

    /// The client takes back the REQUEST at `position`: false when the service took it first.
    func claimForAbort(_ position: UInt64) -> Bool {
        let word = claimWord(position)
        let aborted = CapsLayout.claim(of: position, aborted: true)
        let current = SharedWord.load(word)
        if current & ~1 == aborted & ~1 { return current == aborted }
        return SharedWord.compareExchange(word, expected: current, desired: aborted)
    }

    /// Whether the REQUEST at `position` was taken back by its client.
    func isAborted(_ position: UInt64) -> Bool {
        SharedWord.load(claimWord(position)) == CapsLayout.claim(of: position, aborted: true)
    }

    /// Consumes the oldest entry.
    @inline(__always)
    func advance(_ ring: Ring) {
        let head = SharedWord.load(head(ring)) &+ 1
        SharedWord.store(self.head(ring), head)
        SharedWord.store(word64(ring.headOffset), head)
        if ring == .request, let tally { SharedWord.store(tally, SharedWord.load(tally) &+ 1) }
    }

    /// Whether the client's reply head moved since the service last looked, or DISPOSEs made of
    /// it wait (service side): one load of the head's cache line.
    @inline(__always)
    var hasDisposals: Bool {
        SharedWord.load(word64(CapsLayout.replyHeadOffset)) != SharedWord.load(consumedSeen)
            || SharedWord.load(disposed) != SharedWord.load(consumed)
    }

    /// Takes the client's reply head as a request entry carried it (its low 32 bits, widened
    /// forwards from what the service believes), under the same rule as the shared word.
    @inline(__always)
    func noteConsumed(_ low: UInt32) {
        let believed = SharedWord.load(consumed)
        believe(believed &+ UInt64(low &- UInt32(truncatingIfNeeded: believed)))
    }

    /// The client's reply head is believed only forwards and up to this side's tail: a head
    /// moved anywhere else is ignored.
    @inline(__always)
    private func believe(_ head: UInt64) {
        let believed = SharedWord.load(consumed)
        if head &- believed <= SharedWord.load(tail(.reply)) &- believed { SharedWord.store(consumed, head) }
    }

    /// The message id of the next REPLY the client consumed and the service has not disposed of
    /// yet (service side), nil when none. `readingHead`: look at the shared reply head word too
    /// (a client that pushes nothing after consuming says it only there).
    @inline(__always)
    func nextDisposal(readingHead: Bool) -> UInt64? {
        guard let replyLog else { return nil }
        if readingHead {
            let head = SharedWord.load(word64(CapsLayout.replyHeadOffset))
            if head != SharedWord.load(consumedSeen) {
                SharedWord.store(consumedSeen, head)
                believe(head)
            }
        }
        let upTo = SharedWord.load(consumed)
        var position = SharedWord.load(disposed)
        while position != upTo {
            let id = replyLog[Int(truncatingIfNeeded: position & mask)]
            position &+= 1
            if id != 0 {
                SharedWord.store(disposed, position)
                return id
            }
        }
        SharedWord.store(disposed, position)
        return nil
    }

    /// What a waiting service polls on this channel, as raw addresses (copying it counts no
    /// reference): whether `hasEntries(.request) || hasDisposals`.
    struct Probe {
        let requestSlots: UnsafeMutableRawPointer
        let mask: UInt64
        let positions: UnsafeMutablePointer<UInt64>
        let replyHeadWord: UnsafeMutablePointer<UInt64>

        @inline(__always)
        var hasWork: Bool {
            let head = SharedWord.load(positions + Position.head + Ring.request.index)
            let slot = requestSlots + Int(truncatingIfNeeded: (head & mask) &* UInt64(CapsLayout.entrySize))
            // The entry's second line (the end of an inline payload) is asked for with the
            // stamp's, so both cross together instead of one after the other.
            SharedWord.prefetch(slot + 64)
            if SharedWord.load(slot.advanced(by: CapsLayout.entryStamp).assumingMemoryBound(to: UInt64.self)) == head &+ 1 {
                return true
            }
            return SharedWord.load(replyHeadWord) != SharedWord.load(positions + Position.consumedSeen)
                || SharedWord.load(positions + Position.disposed) != SharedWord.load(positions + Position.consumed)
        }
    }

    var probe: Probe {
        Probe(requestSlots: requestSlots, mask: mask, positions: positions, replyHeadWord: word64(CapsLayout.replyHeadOffset))
    }

    /// Whether a ring holds entries (consumer side): the slot at the head carries its stamp.
    @inline(__always)
    func hasEntries(_ ring: Ring) -> Bool {
        let head = SharedWord.load(head(ring))
        SharedWord.prefetch(slot(ring, head) + 64)  // as in `Probe.hasWork`
        return SharedWord.load(Self.stamp(slot(ring, head))) == head &+ 1
    }

    /// Whether the shared indices say a ring holds entries, as an observer reading only them
    /// would judge (indices a peer corrupted read as empty).
    @inline(__always)
    static func holdsEntries(head: UInt64, tail: UInt64, capacity: UInt64) -> Bool {
        head != tail && tail &- head <= capacity
    }

    /// Writes `messageID` over the id of the request entry at `position`, as a hostile client
    /// can: only for the project's tests.
    func rewriteRequestID(at position: UInt64, to messageID: UInt64) {
        slot(.request, position).storeBytes(of: messageID, toByteOffset: CapsLayout.entryMessageID, as: UInt64.self)
    }

    /// Every request entry still in the ring (between the service's head and this client's
    /// tail), newest last, with its position: for aborting in place.
    func pendingRequestSlots() -> [(messageID: UInt64, position: UInt64)] {
        let head = SharedWord.load(word64(Ring.request.headOffset))
        let tail = SharedWord.load(tail(.request))
        var result: [(UInt64, UInt64)] = []
        guard Self.holdsEntries(head: head, tail: tail, capacity: capacity) else { return result }
        var index = head
        while index != tail {
            let slot = slot(.request, index)
            if slot.load(fromByteOffset: CapsLayout.entryKind, as: UInt32.self) == CapsEntryKind.request.rawValue {
                result.append((slot.load(fromByteOffset: CapsLayout.entryMessageID, as: UInt64.self), index))
            }
            index &+= 1
        }
        return result
    }
}

/// First-fit allocation of one side's arena. The state lives in the allocating process only: a
/// peer never touches it, so nothing about it is shared or locked across processes. The free
/// blocks, by offset, are kept in memory of the allocator's own: an allocation and a release are a
/// short scan and a few stores, with no reference counting or uniqueness check (an array here
/// cost four atomic operations a message).
struct ArenaAllocator: ~Copyable {
    private struct Block {
        var offset: Int
        var length: Int
    }

    private var blocks: UnsafeMutablePointer<Block>
    private var count: Int
    private var capacity: Int
    static let alignment = 64

    init(size: Int) {
        capacity = 8
        blocks = .allocate(capacity: capacity)
        blocks.initialize(to: Block(offset: 0, length: size))
        count = 1
    }

    deinit { blocks.deallocate() }

    static func rounded(_ length: Int) -> Int {
        max(alignment, (length + alignment - 1) / alignment * alignment)
    }

    @inline(__always)
    mutating func allocate(_ length: Int) -> Int? {
        let size = Self.rounded(length)
        var index = 0
        while index < count && blocks[index].length < size { index += 1 }
        guard index < count else { return nil }
        let offset = blocks[index].offset
        if blocks[index].length == size {
            remove(at: index)
        } else {
            blocks[index].offset += size
            blocks[index].length -= size
        }
        return offset
    }

    /// Frees a block, joined with its free neighbours in place (the usual case, a block freed
    /// next to the free space it came from, moves no other block).
    @inline(__always)
    mutating func release(offset: Int, length: Int) {
        let size = Self.rounded(length)
        var index = 0
        while index < count && blocks[index].offset <= offset { index += 1 }
        let joinsPrevious = index > 0 && blocks[index - 1].offset + blocks[index - 1].length == offset
        let joinsNext = index < count && offset + size == blocks[index].offset
        switch (joinsPrevious, joinsNext) {
        case (true, true):
            blocks[index - 1].length += size + blocks[index].length
            remove(at: index)
        case (true, false):
            blocks[index - 1].length += size
        case (false, true):
            blocks[index] = Block(offset: offset, length: size + blocks[index].length)
        case (false, false):
            insert(Block(offset: offset, length: size), at: index)
        }
    }

    private mutating func remove(at index: Int) {
        (blocks + index).moveInitialize(from: blocks + index + 1, count: count - index - 1)
        count -= 1
    }

    private mutating func insert(_ block: Block, at index: Int) {
        if count == capacity {
            let larger = UnsafeMutablePointer<Block>.allocate(capacity: capacity * 2)
            larger.moveInitialize(from: blocks, count: count)
            blocks.deallocate()
            blocks = larger
            capacity *= 2
        }
        (blocks + index + 1).moveInitialize(from: blocks + index, count: count - index)
        (blocks + index).initialize(to: block)
        count += 1
    }
}

/// How long a CAPS waiter spins before sleeping, while its peer runs on another CPU.
public enum CapsTuning {
    private static let spin = Atomic<UInt64>({
        if let text = getenv("PATCHBAY_CAPS_SPIN_NS").map({ String(cString: $0) }), let value = UInt64(text) {
            return value
        }
        return 20_000
    }())

    /// 20 µs by default (a cross-CPU wake-up costs about that much here); the environment
    /// variable `PATCHBAY_CAPS_SPIN_NS` sets it at start; 0 sleeps at once.
    public static var spinNanoseconds: UInt64 {
        get { spin.load(ordering: .relaxed) }
        set { spin.store(newValue, ordering: .relaxed) }
    }
}

/// Spins while `keepSpinning` says the peer is on another CPU and `ready` is false, for at most
/// the spin budget. Returns true when `ready` became true.
@inline(__always)
func spinUntil(_ ready: () -> Bool, while keepSpinning: () -> Bool) -> Bool {
    if ready() { return true }
    let budget = CapsTuning.spinNanoseconds
    guard budget > 0 else { return false }
    // The clock is first read after 256 looks: most waits between spinning peers end before
    // that, and a clock read costs as much as several of them.
    var deadline = UInt64.max
    var rounds = 0
    while keepSpinning() {
        for _ in 0..<32 {
            if ready() { return true }
            SharedWord.relax()
        }
        rounds += 1
        if rounds & 7 == 0 {
            let now = monotonicNanoseconds()
            if deadline == .max { deadline = now &+ budget } else if now > deadline { break }
        }
    }
    return ready()
}
