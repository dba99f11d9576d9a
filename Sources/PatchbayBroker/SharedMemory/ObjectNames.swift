// The names of the named shared memory store, indexed three ways and kept together by one
// setter: a dictionary for lookups, a sorted array for listing pages (a binary search and a
// page, whatever the number of names), and per-owner counts and byte estimates for quotas, so no
// request ever walks every object in the event loop.

/// Names → objects, with the ordered and per-owner views a request needs.
struct ObjectNames: Sequence {
    private(set) var byName: [[UInt8]: SharedMemoryObject] = [:]
    /// Every name, sorted bytewise.
    private(set) var sortedNames: [[UInt8]] = []
    /// Objects (files, not names) per owner uid.
    private(set) var objectsByOwner: [UInt32: Int] = [:]
    /// The bytes each owner's objects held when last looked at (see `noteBytes`).
    private(set) var bytesByOwner: [UInt32: Int] = [:]
    /// Names referring to each file (1, or 2 for a moment during a rename) and its last-seen size.
    private var files: [String: (references: Int, uid: UInt32, bytes: Int)] = [:]

    var count: Int { byName.count }
    var values: Dictionary<[UInt8], SharedMemoryObject>.Values { byName.values }

    func makeIterator() -> Dictionary<[UInt8], SharedMemoryObject>.Iterator { byName.makeIterator() }

    subscript(name: [UInt8]) -> SharedMemoryObject? {
        get { byName[name] }
        set {
            let old = newValue.map { byName.updateValue($0, forKey: name) } ?? byName.removeValue(forKey: name)
            // Retain first: a name rebound to the same file keeps its file's record.
            if let newValue { retain(newValue) }
            if let old { release(old) }
            switch (old == nil, newValue == nil) {
            case (true, false): sortedNames.insert(name, at: Self.lowerBound(of: name, in: sortedNames))
            case (false, true): sortedNames.remove(at: Self.lowerBound(of: name, in: sortedNames))
            default: break
            }
        }
    }

    /// Up to `limit` names after `after` (all from the start when empty), and whether more follow.
    func page(after: [UInt8], limit: Int) -> (names: ArraySlice<[UInt8]>, more: Bool) {
        var start = after.isEmpty ? 0 : Self.lowerBound(of: after, in: sortedNames)
        if start < sortedNames.count, sortedNames[start] == after { start += 1 }
        let end = Swift.min(start + limit, sortedNames.count)
        return (sortedNames[start..<end], end < sortedNames.count)
    }

    /// Records what `object`'s file holds now, in bytes.
    mutating func noteBytes(_ bytes: Int, of object: SharedMemoryObject) {
        guard var file = files[object.id] else { return }
        bytesByOwner[file.uid, default: 0] += bytes - file.bytes
        file.bytes = bytes
        files[object.id] = file
    }

    private mutating func retain(_ object: SharedMemoryObject) {
        if var file = files[object.id] {
            file.references += 1
            files[object.id] = file
        } else {
            files[object.id] = (1, object.uid, 0)
            objectsByOwner[object.uid, default: 0] += 1
        }
    }

    private mutating func release(_ object: SharedMemoryObject) {
        guard var file = files[object.id] else { return }
        file.references -= 1
        if file.references > 0 {
            files[object.id] = file
            return
        }
        files[object.id] = nil
        Self.subtract(1, from: file.uid, in: &objectsByOwner)
        Self.subtract(file.bytes, from: file.uid, in: &bytesByOwner)
    }

    private static func subtract(_ amount: Int, from uid: UInt32, in table: inout [UInt32: Int]) {
        let remaining = (table[uid] ?? 0) - amount
        table[uid] = remaining != 0 ? remaining : nil
    }

    /// The index of the first name not before `name`.
    static func lowerBound(of name: [UInt8], in names: [[UInt8]]) -> Int {
        var low = 0
        var high = names.count
        while low < high {
            let middle = (low + high) / 2
            if names[middle].lexicographicallyPrecedes(name) { low = middle + 1 } else { high = middle }
        }
        return low
    }
}
