// The shape of a CAPS channel: the shared memory that one client and one service use directly,
// without the broker. The broker creates it and touches only the header's closed flags and the
// client's wake word; everything else belongs to the two peers. Documented in docs/PROTOCOL.md §12.
//
// Channel memory (one memfd per client connection):
//
//   0                  header (one page), fields below, each on its own cache line where it
//                      is written by one side only
//   4096               request ring: `ringCapacity` entries of 128 bytes (client → service)
//   ...                reply ring: `ringCapacity` entries of 128 bytes (service → client)
//   page-aligned       request arena: `arenaSize` bytes, allocated by the client
//   page-aligned       reply arena: `arenaSize` bytes, allocated by the service
//   after it           request claims: `ringCapacity` u64 words, one per request-ring slot,
//                      where the service takes a REQUEST or its client takes it back
//
// Status page (one memfd per service; the service maps it writable, clients read-only): the
// generation, and whether the service is asleep or running (and on which CPU).

public enum CapsLayout {
    public static let magic: UInt32 = 0x5350_4143  // "CAPS"
    /// 3: a service may sleep on futex words in the channel header (`serviceWakeWordOffset`)
    /// instead of its wake sockets, and says so in its status page (`statusFutexSleepingOffset`);
    /// clients wake it the way it sleeps. Version 2 brought 128-byte entries that carry a sequence
    /// stamp (the consumer polls the entry, not the tail) and payloads of up to `inlineCapacity`
    /// bytes inline; version 1 had 32-byte entries published by the tail alone.
    public static let version: UInt32 = 3
    public static let headerSize = 4096
    public static let entrySize = 128
    /// The most payload bytes an entry carries itself (`CapsEntryFlags.inlinePayload`).
    public static let inlineCapacity = entrySize - entryInline
    public static let ringCapacity = 1024
    /// Payload space per direction. The memfd is sparse: untouched space costs nothing.
    public static let defaultArenaSize = 16 << 20

    // Header offsets.
    public static let magicOffset = 0
    public static let versionOffset = 4
    public static let ringCapacityOffset = 8
    public static let arenaSizeOffset = 16
    public static let requestTailOffset = 64      // written by the client
    public static let requestHeadOffset = 128     // written by the service
    public static let replyTailOffset = 192       // written by the service
    public static let replyHeadOffset = 256       // written by the client
    public static let clientWakeOffset = 320      // futex word the client sleeps on
    public static let clientSleepingOffset = 324  // 1 while the client is (about to be) asleep
    public static let clientWatchingOffset = 328  // 1 when the client waits through its eventfd
    public static let serviceWakePendingOffset = 332  // 1: the client woke the service's socket and it has not run since
    public static let serviceWakeWordOffset = 336     // futex word a service sleeping on futexes waits on; bumped by the client
    public static let serviceFutexPendingOffset = 340 // 1: the client bumped the word and the service has not slept since
    public static let clientRunningOffset = 384   // 1 while the client runs; its CPU beside it
    public static let clientCPUOffset = 388
    public static let serviceClosedOffset = 448   // set by the broker when the service is gone (1) or refused this client (2)
    /// `serviceClosedOffset`'s value when the service could not take this client.
    public static let serviceRefusedClient: UInt32 = 2
    public static let clientClosedOffset = 452    // set by the broker when the client is gone

    public static func requestRingOffset() -> Int { headerSize }
    public static func replyRingOffset(capacity: Int = ringCapacity) -> Int { headerSize + capacity * entrySize }
    public static func requestArenaOffset(capacity: Int = ringCapacity) -> Int {
        roundUpToPage(headerSize + 2 * capacity * entrySize)
    }
    public static func replyArenaOffset(capacity: Int = ringCapacity, arenaSize: Int = defaultArenaSize) -> Int {
        requestArenaOffset(capacity: capacity) + arenaSize
    }
    /// The request claims: one u64 per request-ring slot (layout 3).
    public static func claimsOffset(capacity: Int = ringCapacity, arenaSize: Int = defaultArenaSize) -> Int {
        replyArenaOffset(capacity: capacity, arenaSize: arenaSize) + arenaSize
    }
    public static func channelSize(capacity: Int = ringCapacity, arenaSize: Int = defaultArenaSize) -> Int {
        claimsOffset(capacity: capacity, arenaSize: arenaSize) + capacity * 8
    }

    /// The claim word's value once the REQUEST at ring `position` is taken by the service or, with
    /// `aborted`, taken back by its client. Any other value is an older position's (or 0, none):
    /// the request is unclaimed, and a compare-and-swap from that value decides who gets it.
    @inline(__always)
    public static func claim(of position: UInt64, aborted: Bool) -> UInt64 {
        (position &+ 1) << 1 | (aborted ? 1 : 0)
    }

    // Ring entry layout (128 bytes, two cache lines; the first holds everything but the end of
    // an inline payload).
    public static let entryStamp = 0       // u64: the entry's ring position + 1, stored last
    public static let entryMessageID = 8   // u64
    public static let entryOffset = 16     // u64: offset in the sender's arena
    public static let entryLength = 24     // u32
    public static let entryKind = 28       // u32: EntryKind
    /// u32, request entries: the low 32 bits of the client's reply head when it pushed the entry
    /// (layout 3; layout 2 had the entry's state here, which the claims replace).
    public static let entryConsumed = 32
    public static let entryFlags = 36      // u32: EntryFlags
    public static let entryInline = 40     // the inline payload, up to `inlineCapacity` bytes

    // Status page.
    public static let statusSize = 4096
    public static let statusGenerationOffset = 8     // u64
    public static let statusSleepingOffset = 64      // u32: threads sleeping in epoll (wake sockets)
    public static let statusFutexSleepingOffset = 68 // u32: threads sleeping on the channels' futex words
    public static let statusRunningOffset = 128      // u32
    public static let statusCPUOffset = 132          // u32
    /// u64 each, on a line of their own: what the service consumed of its channels' request rings
    /// and published in their reply rings, counted where only it can write (the broker's
    /// per-service message counts; a channel's header words can be written by its client too).
    public static let statusRequestsTakenOffset = 192
    public static let statusRepliesPutOffset = 200
    // The notices page (a separate memfd the broker writes and the service reads) holds one u32
    // at offset 0: bumped after the broker queues an event on the service's connection, so the
    // service reads that connection only when something is there (no system call on the hot path).

    static func roundUpToPage(_ value: Int) -> Int { (value + 4095) / 4096 * 4096 }
}

/// What a ring entry is.
public enum CapsEntryKind: UInt32, Sendable {
    case request = 1
    case dispose = 2
    case abort = 3
    case reply = 4
    /// A reply to a request the client aborted: frees the request's space, shown to nobody.
    case discardedReply = 5
    /// The service's answer with an errno instead of bytes (the errno in the entry's flags): a
    /// request it refused unread (`ENOBUFS` past the in-flight limit, `EBADMSG` a payload it could
    /// not read safely), or one it failed to answer (`CapsService.reply(to:error:)`). No payload;
    /// the request's space is free again and the caller sees the errno. Once the client consumes
    /// it, the service sees a DISPOSE, as for a REPLY (none for a refusal: its program never saw
    /// the request).
    case errorReply = 6
}

public enum CapsEntryFlags {
    /// The payload did not fit the arena: it travels as a memfd on the peers' direct socket.
    public static let attachedPayload: UInt32 = 1
    /// Descriptors ride along on the peers' direct socket.
    public static let descriptors: UInt32 = 2
    /// The payload is in the entry itself, at `CapsLayout.entryInline` (offset unused).
    public static let inlinePayload: UInt32 = 4
}
