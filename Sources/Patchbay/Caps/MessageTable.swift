// What one side of a CAPS channel knows about its messages in flight, found by sequence number.
//
// A message id's low half is its channel's sequence number, which grows by one per request, so
// the requests in flight at once occupy a window of consecutive numbers. The table is an array of
// `capacity` slots (a power of two) indexed by `sequence & (capacity - 1)`: a lookup is a mask,
// a load and a compare, with no hashing, no allocation and no exclusivity check (the slots live
// in memory of the table's own, reached through a constant pointer). A message whose slot is
// still held by an older one (a request that outlived `capacity` later ones, or ids a hostile
// peer chose) goes to a dictionary beside it: correct, only slower, and never on the hot path of
// a well-behaved peer.
//
// Not thread-safe: each port uses its tables under its lock.

/// One message's record: its id and what its side must remember about it (arena space, state).
struct MessageRecord {
    var id: UInt64
    /// Arena offset of the space this side allocated for it (-1: attached, or none).
    var offset: Int
    var length: Int
    var state: UInt32
    /// A client's request made by `call`: the longest reply it takes (another thread that reads
    /// the reply first copies no more for it). 32 bits, in the record's padding (a reply is at
    /// most 4 GiB - 1 bytes, so a larger limit is the same as this one's largest).
    var replyLimit: UInt32 = 0
}

final class MessageTable {
    private let slots: UnsafeMutablePointer<MessageRecord>
    private let mask: UInt64
    /// `counters[0]`: records held; `counters[1]`: of which in `overflow`.
    private let counters: UnsafeMutablePointer<Int>
    private let spill = Spill()

    private final class Spill {
        var records: [UInt64: MessageRecord] = [:]
    }

    /// A table of `capacity` slots, rounded up to a power of two.
    init(capacity: Int) {
        var size = 8
        while size < capacity { size <<= 1 }
        slots = .allocate(capacity: size)
        // id 0 is never a message id (channel ids start at 1): it marks a free slot.
        slots.initialize(repeating: MessageRecord(id: 0, offset: -1, length: 0, state: 0), count: size)
        mask = UInt64(size - 1)
        counters = .allocate(capacity: 2)
        counters.initialize(repeating: 0, count: 2)
    }

    deinit {
        slots.deallocate()
        counters.deallocate()
    }

    /// Records held.
    @inline(__always) var count: Int { counters[0] }

    @inline(__always) private func slot(_ id: UInt64) -> UnsafeMutablePointer<MessageRecord> {
        slots + Int(id & mask)
    }

    /// The record of `id`, if held.
    @inline(__always)
    func find(_ id: UInt64) -> MessageRecord? {
        let slot = slot(id)
        if slot.pointee.id == id && id != 0 { return slot.pointee }
        return counters[1] == 0 ? nil : spill.records[id]
    }

    /// Whether `id` is held.
    @inline(__always)
    func contains(_ id: UInt64) -> Bool { find(id) != nil }

    /// Records `record` (its id must not be held yet).
    @inline(__always)
    func insert(_ record: MessageRecord) {
        let slot = slot(record.id)
        if slot.pointee.id == 0 {
            slot.pointee = record
        } else {
            spill.records[record.id] = record
            counters[1] += 1
        }
        counters[0] += 1
    }

    /// Changes the state of `id`'s record; false when `id` is not held.
    @discardableResult @inline(__always)
    func setState(_ id: UInt64, _ state: UInt32) -> Bool {
        let slot = slot(id)
        if slot.pointee.id == id && id != 0 {
            slot.pointee.state = state
            return true
        }
        guard counters[1] > 0, spill.records[id] != nil else { return false }
        spill.records[id]?.state = state
        return true
    }

    /// Replaces the record of `record.id`, which must be held, in place.
    @inline(__always)
    func replace(_ record: MessageRecord) {
        let slot = slot(record.id)
        if slot.pointee.id == record.id && record.id != 0 {
            slot.pointee = record
        } else {
            spill.records[record.id] = record
        }
    }

    /// Removes and returns `id`'s record.
    @discardableResult @inline(__always)
    func remove(_ id: UInt64) -> MessageRecord? {
        let slot = slot(id)
        if slot.pointee.id == id && id != 0 {
            let record = slot.pointee
            slot.pointee.id = 0
            counters[0] -= 1
            return record
        }
        guard counters[1] > 0, let record = spill.records.removeValue(forKey: id) else { return nil }
        counters[1] -= 1
        counters[0] -= 1
        return record
    }

    /// Every record held, in no particular order.
    func all() -> [MessageRecord] {
        var result: [MessageRecord] = []
        result.reserveCapacity(count)
        for index in 0...Int(mask) where slots[index].id != 0 { result.append(slots[index]) }
        result.append(contentsOf: spill.records.values)
        return result
    }
}
