// The per-channel table of messages in flight, indexed by sequence number.
@testable import Patchbay
import Testing

@Suite("MessageTable: messages in flight by sequence number")
struct MessageTableTests {
    private func id(_ sequence: UInt32, channel: UInt64 = 7) -> UInt64 { channel << 32 | UInt64(sequence) }

    @Test("insert, find, change state, remove; counts follow")
    func basics() {
        let table = MessageTable(capacity: 16)
        #expect(table.count == 0)
        #expect(table.find(id(1)) == nil)
        table.insert(MessageRecord(id: id(1), offset: 64, length: 10, state: 0))
        table.insert(MessageRecord(id: id(2), offset: -1, length: 5, state: 0))
        #expect(table.count == 2)
        #expect(table.find(id(1))?.offset == 64)
        #expect(table.find(id(2))?.length == 5)
        #expect(table.setState(id(2), 3))
        #expect(table.find(id(2))?.state == 3)
        #expect(!table.setState(id(3), 1), "an id not held")
        #expect(table.remove(id(1))?.length == 10)
        #expect(table.remove(id(1)) == nil, "removed once")
        #expect(table.count == 1)
        #expect(table.find(0) == nil, "id 0 marks a free slot and is never found")
    }

    @Test("ids whose slot is taken (same sequence modulo the size, or another channel) spill over and stay exact")
    func collisions() {
        let table = MessageTable(capacity: 8)
        // 8 slots: sequences 1, 9, 17 share one; channel 8's sequence 1 too.
        let ids = [id(1), id(9), id(17), id(1, channel: 8)]
        for (index, each) in ids.enumerated() {
            table.insert(MessageRecord(id: each, offset: index, length: index, state: UInt32(index)))
        }
        #expect(table.count == 4)
        for (index, each) in ids.enumerated() {
            #expect(table.find(each)?.offset == index)
            #expect(table.setState(each, UInt32(10 + index)))
        }
        #expect(Set(table.all().map(\.id)) == Set(ids))
        #expect(table.remove(id(9))?.state == 11)
        #expect(table.remove(id(1))?.state == 10, "the slot's own record")
        #expect(table.find(id(17))?.state == 12, "a spilled record is still found after its slot freed")
        table.insert(MessageRecord(id: id(25), offset: 0, length: 0, state: 0))
        #expect(table.count == 3)
        #expect(Set(table.all().map(\.id)) == [id(17), id(1, channel: 8), id(25)])
        for each in [id(17), id(1, channel: 8), id(25)] { #expect(table.remove(each) != nil) }
        #expect(table.count == 0 && table.all().isEmpty)
    }

    @Test("a long run of requests, each replied in turn, with one that stays in flight throughout")
    func window() {
        let table = MessageTable(capacity: 16)
        table.insert(MessageRecord(id: id(1), offset: 0, length: 1, state: 0))
        for sequence in UInt32(2)..<1000 {
            table.insert(MessageRecord(id: id(sequence), offset: Int(sequence), length: 0, state: 0))
            #expect(table.remove(id(sequence))?.offset == Int(sequence))
        }
        #expect(table.count == 1)
        #expect(table.find(id(1))?.length == 1)
    }
}
