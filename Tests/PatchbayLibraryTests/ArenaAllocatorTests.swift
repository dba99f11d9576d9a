// The CAPS arena allocator and ring arithmetic: pure structures of the client library.
@testable import Patchbay
import Testing

@Suite("ArenaAllocator: first-fit allocation of a CAPS arena")
struct ArenaAllocatorTests {
    @Test("lengths round up to 64 bytes, and even an empty payload takes a block")
    func rounding() {
        #expect(ArenaAllocator.rounded(0) == 64)
        #expect(ArenaAllocator.rounded(1) == 64)
        #expect(ArenaAllocator.rounded(64) == 64)
        #expect(ArenaAllocator.rounded(65) == 128)
        #expect(ArenaAllocator.rounded(4096) == 4096)
        var arena = ArenaAllocator(size: 256)
        #expect(arena.allocate(0) == 0)
        #expect(arena.allocate(1) == 64)
        #expect(arena.allocate(100) == 128)
        #expect(arena.allocate(1) == nil, "the arena is full")
    }

    @Test("blocks are handed out in address order, never overlapping, until the arena is exhausted")
    func exhaustion() {
        let size = 64 * 1024
        var arena = ArenaAllocator(size: size)
        var blocks: [Range<Int>] = []
        let lengths = [1, 200, 64, 1000, 4096, 63, 129]
        var index = 0
        while true {
            let length = lengths[index % lengths.count]
            guard let offset = arena.allocate(length) else { break }
            blocks.append(offset..<offset + ArenaAllocator.rounded(length))
            index += 1
        }
        #expect(!blocks.isEmpty)
        for (previous, next) in zip(blocks, blocks.dropFirst()) {
            #expect(previous.upperBound == next.lowerBound, "first fit from a fresh arena is contiguous")
        }
        #expect(blocks.allSatisfy { $0.lowerBound % 64 == 0 && $0.upperBound <= size })
        let used = blocks.last!.upperBound
        // Nothing larger than what is left fits; what is left still does.
        let left = size - used
        #expect(arena.allocate(left + 1) == nil)
        if left > 0 { #expect(arena.allocate(left) == used) }
        #expect(arena.allocate(1) == nil)
    }

    @Test("first fit: a freed hole is reused by the next request it can hold")
    func firstFitReusesHoles() throws {
        var arena = ArenaAllocator(size: 1024)
        let offsets = [arena.allocate(128), arena.allocate(128), arena.allocate(256)]
        #expect(offsets == [0, 128, 256])
        let b = try #require(offsets[1])
        arena.release(offset: b, length: 128)
        // Too big for the hole: taken from the tail.
        #expect(arena.allocate(192) == 512)
        // Fits the hole: first fit takes it, below the tail.
        #expect(arena.allocate(100) == 128)
        #expect(arena.allocate(64) == 704)
    }

    @Test("freed neighbours merge, on either side, back into one block")
    func coalescing() throws {
        var arena = ArenaAllocator(size: 512)
        let blocks = (0..<8).map { _ in arena.allocate(64)! }
        #expect(blocks == stride(from: 0, to: 512, by: 64).map { $0 })
        #expect(arena.allocate(1) == nil)
        // Free 1 and 3, then 2 between them: one hole of 192 bytes at 64.
        arena.release(offset: 64, length: 64)
        arena.release(offset: 192, length: 64)
        #expect(arena.allocate(128) == nil, "two separate 64-byte holes do not hold 128")
        arena.release(offset: 128, length: 64)
        #expect(arena.allocate(192) == 64)
        #expect(arena.allocate(1) == nil)
        // Free everything in a scattered order: the whole arena is one block again.
        for offset in [448, 0, 320, 64, 384, 256] {
            arena.release(offset: offset, length: offset == 64 ? 192 : 64)
        }
        #expect(arena.allocate(512) == 0)
    }

    @Test("a release with the unrounded length frees the whole rounded block")
    func releaseRoundsToo() {
        var arena = ArenaAllocator(size: 256)
        let first = arena.allocate(10)!
        let second = arena.allocate(130)!
        #expect(second == 64)
        arena.release(offset: first, length: 10)
        arena.release(offset: second, length: 130)
        #expect(arena.allocate(256) == 0)
    }

    @Test("a random workload never hands out overlapping blocks and frees back to one block")
    func randomWorkload() {
        let size = 1 << 16
        var arena = ArenaAllocator(size: size)
        var live: [(offset: Int, length: Int)] = []
        var generator = SplitMix(seed: 0x5EED)
        for _ in 0..<5_000 {
            if !live.isEmpty && generator.next() % 3 == 0 {
                let victim = live.remove(at: Int(generator.next() % UInt64(live.count)))
                arena.release(offset: victim.offset, length: victim.length)
            } else {
                let length = Int(generator.next() % 3_000)
                if let offset = arena.allocate(length) {
                    let range = offset..<offset + ArenaAllocator.rounded(length)
                    #expect(range.upperBound <= size)
                    let overlapping = live.contains { other in
                        range.overlaps(other.offset..<other.offset + ArenaAllocator.rounded(other.length))
                    }
                    #expect(!overlapping, "block \(range) overlaps a live one")
                    if overlapping { return }
                    live.append((offset, length))
                }
            }
        }
        for block in live.reversed() { arena.release(offset: block.offset, length: block.length) }
        #expect(arena.allocate(size) == 0, "fragments did not merge back")
    }
}

@Suite("CAPS ring arithmetic")
struct CapsRingTests {
    @Test("a ring holds entries when head and tail differ by at most its capacity, across wrap-around")
    func holdsEntries() {
        #expect(!CapsChannel.holdsEntries(head: 5, tail: 5, capacity: 8))
        #expect(CapsChannel.holdsEntries(head: 5, tail: 6, capacity: 8))
        #expect(CapsChannel.holdsEntries(head: 5, tail: 13, capacity: 8))
        #expect(!CapsChannel.holdsEntries(head: 5, tail: 14, capacity: 8), "more than capacity: corrupt, read as empty")
        #expect(!CapsChannel.holdsEntries(head: 6, tail: 5, capacity: 8), "tail behind head: corrupt")
        #expect(CapsChannel.holdsEntries(head: UInt64.max, tail: 0, capacity: 8), "one entry across the wrap")
        #expect(CapsChannel.holdsEntries(head: UInt64.max - 3, tail: 4, capacity: 8))
        #expect(!CapsChannel.holdsEntries(head: UInt64.max - 3, tail: 5, capacity: 8))
    }

    @Test("message ids carry the channel in the high half and the sequence in the low half")
    func messageIDs() {
        let id = capsMessageID(channel: 0xABCD, sequence: 0xFFFF_FFFF)
        #expect(id == 0xABCD_FFFF_FFFF)
        #expect(capsChannel(of: id) == 0xABCD)
        #expect(capsChannel(of: capsMessageID(channel: 7, sequence: 0)) == 7)
        #expect(capsMessageID(channel: 1, sequence: 0) != capsMessageID(channel: 0, sequence: 0))
    }
}

/// A small deterministic generator, so a failure replays.
struct SplitMix {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
