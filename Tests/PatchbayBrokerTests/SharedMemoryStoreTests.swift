// The named shared memory store on its own, in a fresh directory on tmpfs: operations, permissions,
// quotas, and above all what survives closing and reopening it (the journal's replay).
import Glibc
@testable import PatchbayBroker
import PatchbayProtocol
import PatchbaySystem
import SystemPackage
import Testing

private let alice = credentials(uid: 1000, gid: 100, pid: 601)
private let bob = credentials(uid: 1001, gid: 101, pid: 602, groups: [100])
private let carol = credentials(uid: 1002, gid: 102, pid: 603)

private let createFlag = SharedMemoryOpenFlags.create
private let exclusiveFlag = SharedMemoryOpenFlags.exclusive
private let truncateFlag = SharedMemoryOpenFlags.truncate

/// Creates `text` read-write and writes `contents` into it; returns what open reported.
@discardableResult
private func create(_ store: SharedMemoryStore, _ text: String, mode: UInt32 = 0o600, umask: UInt32 = 0,
                    by caller: PeerCredentials = alice, contents: [UInt8] = []) throws(RequestError) -> SharedMemoryInfo {
    let opened = try store.open(
        SharedMemoryOpenRequest(name: name(text), access: 1, flags: [createFlag, exclusiveFlag], mode: mode, umask: umask),
        by: caller)
    do {
        try opened.handle.writeAll(contents)
    } catch {
        throw RequestError(errno: error, reason: "the test could not write the object")
    }
    return opened.info
}

/// Opens `text` read-only and reads everything in it.
private func contents(_ store: SharedMemoryStore, _ text: String, by caller: PeerCredentials = alice) throws -> [UInt8] {
    let opened = try store.open(SharedMemoryOpenRequest(name: name(text), access: 0, flags: [], mode: 0, umask: 0),
                                by: caller)
    return try opened.handle.readToEnd()
}

/// The store's namespace as comparable text: name → file, owner, group, mode.
private func snapshot(_ store: SharedMemoryStore) -> [String: String] {
    var result: [String: String] = [:]
    for (key, object) in store.objects {
        result[String(decoding: key, as: UTF8.self)] =
            "\(object.id) uid \(object.uid) gid \(object.gid) mode \(String(object.mode, radix: 8))"
    }
    return result
}

/// The errno a store refused to open with.
private func startFailure(_ body: () throws(BrokerStartError) -> Void) -> Errno? {
    do {
        try body()
        return nil
    } catch {
        return error.errno
    }
}

@Suite("SharedMemoryStore: journal replay")
struct SharedMemoryReplayTests {
    @Test("names, owners, modes and contents come back when the store is reopened")
    func replayRestoresEverything() throws {
        let temporary = TemporaryStore()
        var store: SharedMemoryStore? = try temporary.open()
        let alpha = try create(store!, "/alpha", mode: 0o666, umask: 0o022, by: alice, contents: Array("alpha".utf8))
        #expect(alpha.mode == 0o644 && alpha.uid == alice.uid && alpha.gid == alice.gid && alpha.size == 0)
        try create(store!, "/nested/beta", mode: 0o660, umask: 0o027, by: bob, contents: Array("beta".utf8))
        try create(store!, "/ünïcødé name", mode: 0o1777, by: carol)
        let before = snapshot(store!)
        #expect(before.count == 3)
        #expect(before["/nested/beta"]?.hasSuffix("uid 1001 gid 101 mode 640") == true)
        #expect(before["/ünïcødé name"]?.hasSuffix("mode 777") == true, "mode keeps only the permission bits")
        store = nil

        store = try temporary.open()
        #expect(snapshot(store!) == before)
        #expect(try contents(store!, "/alpha") == Array("alpha".utf8))
        #expect(try contents(store!, "/nested/beta", by: bob) == Array("beta".utf8))
        let info = try store!.stat(name("/nested/beta"))
        #expect(info.uid == bob.uid && info.gid == bob.gid && info.mode == 0o640 && info.size == 4)
        #expect(temporary.objectFiles() == Set(store!.objects.values.map(\.id)))
        #expect(store!.countByOwner() == [alice.uid: 1, bob.uid: 1, carol.uid: 1])

        // The store's directories are private.
        for path in [temporary.path, temporary.path + "/objects"] {
            var status = stat()
            #expect(lstat(path, &status) == 0 && status.st_mode & 0o777 == 0o700)
        }
    }

    @Test("an unlink survives the replay; its file goes at once")
    func unlinkSurvives() throws {
        let temporary = TemporaryStore()
        var store: SharedMemoryStore? = try temporary.open()
        try create(store!, "/a")
        try create(store!, "/b")
        let aFile = try #require(store!.objects[name("/a")]?.id)
        try store!.unlink(name("/a"), by: alice)
        #expect(!temporary.objectFiles().contains(aFile))
        store = nil
        store = try temporary.open()
        #expect(Set(snapshot(store!).keys) == ["/b"])
        // A later create of the same name is a new object.
        try create(store!, "/a", contents: [1])
        #expect(store!.objects[name("/a")]?.id != aFile)
    }

    @Test("renames, replacing renames and exchanges survive the replay")
    func renamesSurvive() throws {
        let temporary = TemporaryStore()
        var store: SharedMemoryStore? = try temporary.open()
        for text in ["/src", "/dst", "/x", "/y", "/plain"] {
            try create(store!, text, contents: Array(text.utf8))
        }
        let ids = store!.objects.byName.mapValues(\.id)
        try store!.rename(from: name("/src"), to: name("/dst"), flags: [], by: alice)
        try store!.rename(from: name("/x"), to: name("/y"), flags: SharedMemoryRenameFlags.exchange, by: alice)
        try store!.rename(from: name("/plain"), to: name("/moved"), flags: SharedMemoryRenameFlags.noReplace, by: alice)
        // The replaced object's file is gone; the others are all still there.
        #expect(!temporary.objectFiles().contains(ids[name("/dst")]!))
        let after = snapshot(store!)
        #expect(Set(after.keys) == ["/dst", "/x", "/y", "/moved"])
        store = nil

        store = try temporary.open()
        #expect(snapshot(store!) == after)
        #expect(store!.objects[name("/dst")]?.id == ids[name("/src")])
        #expect(store!.objects[name("/x")]?.id == ids[name("/y")])
        #expect(store!.objects[name("/y")]?.id == ids[name("/x")])
        #expect(store!.objects[name("/moved")]?.id == ids[name("/plain")])
        #expect(try contents(store!, "/dst") == Array("/src".utf8))
        #expect(try contents(store!, "/x") == Array("/y".utf8))
        #expect(try contents(store!, "/moved") == Array("/plain".utf8))
        #expect(temporary.objectFiles().count == 4)
    }

    @Test("a file no name refers to is removed when the store opens")
    func orphanFilesRemoved() throws {
        let temporary = TemporaryStore()
        var store: SharedMemoryStore? = try temporary.open()
        try create(store!, "/keep", contents: [7])
        let keep = try #require(store!.objects[name("/keep")]?.id)
        store = nil
        // What a broker killed between creating a file and journaling it leaves behind.
        for orphan in ["0123456789abcdef0123456789abcdef", "stray"] {
            _ = try openFile(temporary.path + "/objects/" + orphan, flags: O_RDWR | O_CREAT)
        }
        #expect(temporary.objectFiles() == [keep, "0123456789abcdef0123456789abcdef", "stray"])
        store = try temporary.open()
        #expect(temporary.objectFiles() == [keep])
        #expect(try contents(store!, "/keep") == [7])
    }

    @Test("a name whose file is missing is dropped, for good")
    func missingFileDropped() throws {
        let temporary = TemporaryStore()
        var store: SharedMemoryStore? = try temporary.open()
        try create(store!, "/gone")
        try create(store!, "/stay", mode: 0o640)
        let gone = try #require(store!.objects[name("/gone")]?.id)
        let stay = try #require(store!.objects[name("/stay")])
        store = nil
        #expect(unlink(temporary.path + "/objects/" + gone) == 0)

        store = try temporary.open()
        #expect(Set(snapshot(store!).keys) == ["/stay"])
        // The journal was compacted to the live names: one bind record.
        let record = SharedMemoryStore.Record.bind(name: name("/stay"), object: stay).encode()
        #expect(temporary.journalSize() == record.count)
        store = nil
        store = try temporary.open()
        #expect(Set(snapshot(store!).keys) == ["/stay"])
    }

    @Test("a torn record at the end and a record of unknown type are skipped; the rest replays")
    func damagedJournal() throws {
        let temporary = TemporaryStore()
        var store: SharedMemoryStore? = try temporary.open()
        try create(store!, "/before")
        store = nil

        let injectedFile = "feedfacefeedfacefeedfacefeedface"
        _ = try openFile(temporary.path + "/objects/" + injectedFile, flags: O_RDWR | O_CREAT)
        let injected = SharedMemoryObject(id: injectedFile, uid: 5, gid: 6, mode: 0o604)
        let journal = try openFile(temporary.path + "/journal", flags: O_WRONLY | O_APPEND)
        try journal.writeAll([1, 0, 0, 0, 9])  // a complete record of an unknown type (lengths: little-endian)
        try journal.writeAll(SharedMemoryStore.Record.bind(name: name("/injected"), object: injected).encode())
        try journal.writeAll([50, 0, 0, 0, 1, 2, 3])  // torn: 50 bytes announced, 3 written
        _ = consume journal

        store = try temporary.open()
        let restored = snapshot(store!)
        #expect(Set(restored.keys) == ["/before", "/injected"])
        #expect(restored["/injected"] == "\(injectedFile) uid 5 gid 6 mode 604")
        // The store goes on working, and its journal is sound again.
        try create(store!, "/after")
        store = nil
        store = try temporary.open()
        #expect(Set(snapshot(store!).keys) == ["/before", "/injected", "/after"])
    }

    @Test("many changes keep the journal bounded (it is compacted) and the namespace right")
    func journalStaysBounded() throws {
        let temporary = TemporaryStore()
        var store: SharedMemoryStore? = try temporary.open()
        try create(store!, "/keep", contents: [1, 2, 3])
        var largest = 0
        let pairs = 6_000
        for _ in 0..<pairs {
            try create(store!, "/churn")
            try store!.unlink(name("/churn"), by: alice)
            largest = max(largest, temporary.journalSize())
        }
        // Without compaction the journal would hold every record written; it never reached half.
        let churn = SharedMemoryObject(id: String(repeating: "0", count: 32), uid: alice.uid, gid: alice.gid, mode: 0o600)
        let pair = SharedMemoryStore.Record.bind(name: name("/churn"), object: churn).encode().count
            + SharedMemoryStore.Record.unbind(name: name("/churn")).encode().count
        #expect(largest * 2 < pairs * pair, "largest journal \(largest) bytes for \(pairs * pair) bytes of records")
        store = nil
        store = try temporary.open()
        #expect(Set(snapshot(store!).keys) == ["/keep"])
        #expect(try contents(store!, "/keep") == [1, 2, 3])
        #expect(temporary.objectFiles().count == 1)
    }

    @Test("whatever change triggers a compaction (create, rename, unlink), the compacted journal holds it: a restart right after finds exactly the names there were")
    func compactionKeepsTheTriggeringChange() throws {
        let temporary = TemporaryStore()
        var store: SharedMemoryStore? = try temporary.open()
        var model: [String] = []
        var triggers: [String: Int] = [:]
        var previous = temporary.journalSize()
        var counter = 0
        // Names grow slowly while renames churn the journal, so every kind of change ends up
        // being the one that crosses the compaction threshold.
        for step in 0..<40_000 where triggers.count < 3 {
            let kind: String
            if step % 7 == 0 || model.isEmpty {
                counter += 1
                let text = "/n-\(counter)"
                try create(store!, text)
                model.append(text)
                kind = "create"
            } else if step % 11 == 0 {
                let text = model.remove(at: step % model.count)
                try store!.unlink(name(text), by: alice)
                kind = "unlink"
            } else {
                let index = step % model.count
                let from = model[index]
                counter += 1
                let to = "/n-\(counter)"
                try store!.rename(from: name(from), to: name(to), flags: [], by: alice)
                model[index] = to
                kind = "rename"
            }
            let size = temporary.journalSize()
            if size < previous {
                triggers[kind, default: 0] += 1
                // Restart right after the compaction: the namespace is what the model says.
                store = nil
                store = try temporary.open()
                #expect(Set(snapshot(store!).keys) == Set(model), "after a compaction triggered by \(kind)")
                #expect(temporary.objectFiles().count == model.count)
            }
            previous = temporary.journalSize()
        }
        #expect(triggers.keys.contains("create") || triggers.keys.contains("rename"), "\(triggers)")
    }

    @Test("one store per directory: a second is EADDRINUSE until the first is closed")
    func exclusiveStore() throws {
        let temporary = TemporaryStore()
        var first: SharedMemoryStore? = try temporary.open()
        #expect(startFailure { () throws(BrokerStartError) in _ = try SharedMemoryStore(path: temporary.path, logger: quietLogger) }
                == .addressInUse)
        withExtendedLifetime(first) {}
        first = nil
        let second = try temporary.open()
        #expect(second.objects.count == 0)
    }

    @Test("an unsafe store directory is refused: not private, or not a directory")
    func unsafeDirectories() throws {
        let temporary = TemporaryStore()
        #expect(mkdir(temporary.path, 0o755) == 0 && chmod(temporary.path, 0o755) == 0)
        #expect(startFailure { () throws(BrokerStartError) in _ = try SharedMemoryStore(path: temporary.path, logger: quietLogger) }
                == .permissionDenied)
        #expect(chmod(temporary.path, 0o700) == 0)
        _ = try temporary.open()

        let file = temporary.directory + "/file"
        _ = try openFile(file, flags: O_RDWR | O_CREAT)
        #expect(startFailure { () throws(BrokerStartError) in _ = try SharedMemoryStore(path: file, logger: quietLogger) }
                == .notDirectory)
        #expect(symlink(temporary.path, temporary.directory + "/link") == 0)
        #expect(startFailure { () throws(BrokerStartError) in
            _ = try SharedMemoryStore(path: temporary.directory + "/link", logger: quietLogger)
        } == .notDirectory)
    }

    @Test("a change whose journal record does not fit (the file system full) is undone from the journal too: the changes after it survive a reopen", .enabled(if: geteuid() == 0, "needs root to mount a small tmpfs"))
    func fullJournalLosesNothingAfter() throws {
        let temporary = TemporaryStore()
        // A tmpfs of 64 KiB of its own, so that it can be filled.
        try #require(mount("tmpfs", temporary.directory, "tmpfs", 0, "size=64k,mode=0700") == 0, "mount: \(errno)")
        defer { umount2(temporary.directory, Int32(MNT_DETACH)) }
        var store: SharedMemoryStore? = try temporary.open()
        try create(store!, "/before")
        // Everything but a few hundred bytes taken by a file outside the store.
        let filler = try fill(temporary.directory)
        // Creates until one is refused for want of room: its record was cut short (or not written).
        var refused: Errno?
        for index in 0..<1000 where refused == nil {
            do throws(RequestError) {
                try create(store!, "/filling-\(index)-" + String(repeating: "x", count: 200))
            } catch {
                refused = error.errno
            }
        }
        #expect(refused == .noSpace, "\(String(describing: refused))")
        // Room again: the next change is recorded after the failed one, and must come back.
        unlink(filler)
        try create(store!, "/after")
        let before = snapshot(store!)
        store = nil
        store = try temporary.open()
        #expect(snapshot(store!) == before)
        #expect(snapshot(store!)["/after"] != nil, "a change recorded after a failed one was lost")
        store = nil
    }

    /// Fills the file system of `directory` with a file there until a write fails; its path.
    private func fill(_ directory: String) throws -> String {
        let filler = directory + "/filler"
        let fd = open(filler, O_WRONLY | O_CREAT | O_CLOEXEC, 0o600)
        try #require(fd >= 0)
        defer { close(fd) }
        let chunk = [UInt8](repeating: 1, count: 4096)
        while chunk.withUnsafeBytes({ write(fd, $0.baseAddress, $0.count) }) > 0 {}
        return filler
    }

    @Test("a store opened on a full file system (a user filled /dev/shm) keeps its journal, cut back to its last whole record, instead of failing to start: a change recorded once there is room survives a reopen", .enabled(if: geteuid() == 0, "needs root to mount a small tmpfs"))
    func fullFileSystemAtOpenKeepsTheJournal() throws {
        let temporary = TemporaryStore()
        try #require(mount("tmpfs", temporary.directory, "tmpfs", 0, "size=64k,mode=0700") == 0, "mount: \(errno)")
        defer { umount2(temporary.directory, Int32(MNT_DETACH)) }
        var store: SharedMemoryStore? = try temporary.open()
        try create(store!, "/before")
        store = nil
        // A record torn by a crash at the journal's end, then the file system full.
        let journal = temporary.path + "/journal"
        var info = stat()
        try #require(stat(journal, &info) == 0)
        let whole = info.st_size
        let torn: [UInt8] = [0xE8, 0x03, 0, 0, 1, 2, 3]  // a length of 1000, then 3 bytes
        let fd = open(journal, O_WRONLY | O_APPEND | O_CLOEXEC)
        try #require(fd >= 0 && torn.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) } == torn.count)
        close(fd)
        let filler = try fill(temporary.directory)
        // Its rewrite fails for want of room: the store opens all the same, the torn end cut off.
        store = try temporary.open()
        #expect(snapshot(store!)["/before"] != nil)
        #expect(stat(journal, &info) == 0 && info.st_size == whole, "journal of \(info.st_size) bytes, \(whole) whole")
        #expect(access(temporary.path + "/journal.new", F_OK) != 0)
        unlink(filler)
        try create(store!, "/after")
        store = nil
        store = try temporary.open()
        #expect(snapshot(store!)["/after"] != nil, "a change recorded after the torn end was lost")
        store = nil
    }

}

@Suite("SharedMemoryStore: operations, permissions and quotas")
struct SharedMemoryOperationTests {
    @Test("mode bits decide: owner bits for the owner, group bits for members, other bits for the rest; no root bypass")
    func permissionBits() {
        let object = SharedMemoryObject(id: "x", uid: 1000, gid: 100, mode: 0o640)
        #expect(SharedMemoryStore.permits(object, alice, read: true, write: true))
        #expect(SharedMemoryStore.permits(object, bob, read: true, write: false), "bob is in group 100")
        #expect(!SharedMemoryStore.permits(object, bob, read: true, write: true))
        #expect(!SharedMemoryStore.permits(object, carol, read: true, write: false))
        #expect(!SharedMemoryStore.permits(object, credentials(uid: 0), read: true, write: false))
        // The owner's bits apply even when the group's would allow more.
        let odd = SharedMemoryObject(id: "y", uid: 1000, gid: 100, mode: 0o070)
        #expect(!SharedMemoryStore.permits(odd, alice, read: true, write: false))
        #expect(SharedMemoryStore.permits(odd, bob, read: true, write: true))
        let world = SharedMemoryObject(id: "z", uid: 1000, gid: 100, mode: 0o006)
        #expect(SharedMemoryStore.permits(world, carol, read: true, write: true))
        #expect(!SharedMemoryStore.permits(world, bob, read: true, write: false))
    }

    @Test("names: at most 1023 bytes (checked first), a leading slash, no NUL, valid UTF-8")
    func nameValidation() throws {
        try SharedMemoryStore.validate(name("/" + String(repeating: "n", count: 1022)))
        try SharedMemoryStore.validate(name("/"))
        try SharedMemoryStore.validate(name("/a/../b/./c"))
        expectRequestError(.fileNameTooLong) { () throws(RequestError) in
            try SharedMemoryStore.validate(name("/" + String(repeating: "n", count: 1023)))
        }
        expectRequestError(.fileNameTooLong) { () throws(RequestError) in
            try SharedMemoryStore.validate(Array(repeating: 0xFF, count: 2000))
        }
        expectRequestError(.invalidArgument) { () throws(RequestError) in try SharedMemoryStore.validate(name("noslash")) }
        expectRequestError(.invalidArgument) { () throws(RequestError) in try SharedMemoryStore.validate([]) }
        expectRequestError(.invalidArgument) { () throws(RequestError) in
            try SharedMemoryStore.validate([UInt8(ascii: "/"), 0, UInt8(ascii: "a")])
        }
        expectRequestError(.invalidArgument) { () throws(RequestError) in
            try SharedMemoryStore.validate([UInt8(ascii: "/"), 0xC3])
        }
    }

    @Test("open errors: EINVAL for access and flags, ENOENT, EEXIST before EACCES")
    func openErrors() throws {
        let temporary = TemporaryStore()
        let store = try temporary.open()
        try create(store, "/private", mode: 0o600, by: alice)
        func open(_ text: String, access: UInt8, flags: SharedMemoryOpenFlags, by caller: PeerCredentials) throws(RequestError) {
            _ = try store.open(SharedMemoryOpenRequest(name: name(text), access: access, flags: flags, mode: 0o600,
                                                       umask: 0), by: caller)
        }
        expectRequestError(.invalidArgument) { () throws(RequestError) in try open("/private", access: 2, flags: [], by: alice) }
        expectRequestError(.invalidArgument) { () throws(RequestError) in try open("/private", access: 3, flags: [], by: alice) }
        expectRequestError(.invalidArgument) { () throws(RequestError) in try open("/private", access: 0, flags: SharedMemoryOpenFlags(rawValue: 8), by: alice) }
        // FreeBSD's order: the access mode and the flags before the name (a name too long, or with
        // no leading slash, does not answer first).
        let tooLong = "/" + String(repeating: "n", count: 1100)
        expectRequestError(.invalidArgument) { () throws(RequestError) in try open(tooLong, access: 2, flags: [], by: alice) }
        expectRequestError(.invalidArgument) { () throws(RequestError) in try open(tooLong, access: 0, flags: SharedMemoryOpenFlags(rawValue: 8), by: alice) }
        expectRequestError(.fileNameTooLong) { () throws(RequestError) in try open(tooLong, access: 0, flags: [], by: alice) }
        expectRequestError(.noSuchFileOrDirectory) { () throws(RequestError) in try open("/none", access: 0, flags: [], by: alice) }
        expectRequestError(.fileExists) { () throws(RequestError) in
            try open("/private", access: 0, flags: [createFlag, exclusiveFlag], by: carol)
        }
        expectRequestError(.permissionDenied) { () throws(RequestError) in try open("/private", access: 0, flags: [], by: carol) }
        expectRequestError(.permissionDenied) { () throws(RequestError) in
            try open("/private", access: 0, flags: createFlag, by: carol)
        }
        expectRequestError(.permissionDenied) { () throws(RequestError) in try store.unlink(name("/private"), by: carol) }
        expectRequestError(.noSuchFileOrDirectory) { () throws(RequestError) in try store.unlink(name("/none"), by: alice) }
        #expect(store.objects.count == 1, "failed opens must not create anything")
        #expect(temporary.objectFiles().count == 1)
    }

    @Test("a read-only handle cannot write; truncate empties on a read-write open only")
    func handlesAndTruncate() throws {
        let temporary = TemporaryStore()
        let store = try temporary.open()
        try create(store, "/data", mode: 0o644, contents: Array(repeating: 1, count: 100))
        let reader = try store.open(SharedMemoryOpenRequest(name: name("/data"), access: 0, flags: truncateFlag,
                                                            mode: 0, umask: 0), by: bob)
        #expect(try reader.handle.accessMode() == O_RDONLY)
        #expect(reader.info.size == 100, "truncate must not apply to a read-only open")
        let writer = try store.open(SharedMemoryOpenRequest(name: name("/data"), access: 1, flags: truncateFlag,
                                                            mode: 0, umask: 0), by: alice)
        #expect(try writer.handle.accessMode() == O_RDWR)
        #expect(writer.info.size == 0)
        #expect(try reader.handle.size() == 0, "both handles are the same object")
    }

    @Test("rename errors: EINVAL for flags, ENOENT, EEXIST with noReplace before EACCES")
    func renameErrors() throws {
        let temporary = TemporaryStore()
        let store = try temporary.open()
        try create(store, "/mine", mode: 0o600, by: alice)
        try create(store, "/theirs", mode: 0o600, by: carol)
        let noReplace = SharedMemoryRenameFlags.noReplace
        let exchange = SharedMemoryRenameFlags.exchange
        expectRequestError(.invalidArgument) { () throws(RequestError) in
            try store.rename(from: name("/mine"), to: name("/x"), flags: [noReplace, exchange], by: alice)
        }
        expectRequestError(.invalidArgument) { () throws(RequestError) in
            try store.rename(from: name("/mine"), to: name("/x"), flags: SharedMemoryRenameFlags(rawValue: 4), by: alice)
        }
        expectRequestError(.invalidArgument) { () throws(RequestError) in
            try store.rename(from: name("/mine"), to: name("x"), flags: [], by: alice)
        }
        expectRequestError(.noSuchFileOrDirectory) { () throws(RequestError) in
            try store.rename(from: name("/none"), to: name("/x"), flags: [], by: alice)
        }
        expectRequestError(.fileExists) { () throws(RequestError) in
            try store.rename(from: name("/theirs"), to: name("/mine"), flags: noReplace, by: bob)
        }
        expectRequestError(.permissionDenied) { () throws(RequestError) in
            try store.rename(from: name("/theirs"), to: name("/x"), flags: [], by: alice)
        }
        expectRequestError(.permissionDenied) { () throws(RequestError) in
            try store.rename(from: name("/mine"), to: name("/theirs"), flags: [], by: alice)
        }
        // Renaming onto itself changes nothing.
        let before = snapshot(store)
        try store.rename(from: name("/mine"), to: name("/mine"), flags: [], by: alice)
        // An exchange with no target is a plain rename.
        try store.rename(from: name("/mine"), to: name("/new"), flags: exchange, by: alice)
        #expect(Set(snapshot(store).keys) == ["/new", "/theirs"])
        #expect(snapshot(store)["/new"] == before["/mine"])
    }

    @Test("quotas: EDQUOT past the object count or the bytes a uid's objects hold, per uid")
    func quotas() throws {
        let temporary = TemporaryStore()
        let store = try temporary.open()
        store.maximumObjectsPerUser = 2
        store.maximumBytesPerUser = 64 * 1024
        try create(store, "/one", by: alice)
        try create(store, "/two", by: alice)
        expectRequestError(.diskQuotaExceeded) { () throws(RequestError) in _ = try create(store, "/three", by: alice) }
        try create(store, "/other", by: bob)
        #expect(store.objects[name("/three")] == nil && temporary.objectFiles().count == 3)
        // Opening what exists is not creating.
        #expect(try contents(store, "/one").isEmpty)

        try store.unlink(name("/two"), by: alice)
        // Fill /one past the byte limit: pages really allocated count, not sparse sizes.
        let writer = try store.open(SharedMemoryOpenRequest(name: name("/one"), access: 1, flags: [], mode: 0, umask: 0),
                                    by: alice)
        try writer.handle.truncate(to: 1 << 30)  // sparse: costs nothing
        try create(store, "/sparse-ok", by: alice)
        try store.unlink(name("/sparse-ok"), by: alice)
        try writer.handle.writeAll([UInt8](repeating: 1, count: 64 * 1024))
        expectRequestError(.diskQuotaExceeded) { () throws(RequestError) in _ = try create(store, "/full", by: alice) }
        try create(store, "/fine", by: bob)
    }

    @Test("list pages through the names in byte order, after a given name")
    func listing() throws {
        let temporary = TemporaryStore()
        let store = try temporary.open()
        for text in ["/c", "/a", "/b/x", "/b", "/d"] { try create(store, text) }
        let (first, more) = store.list(after: [], limit: 2)
        #expect(first.map { String(decoding: $0.name, as: UTF8.self) } == ["/a", "/b"])
        #expect(more)
        let (rest, moreAgain) = store.list(after: name("/b"), limit: 10)
        #expect(rest.map { String(decoding: $0.name, as: UTF8.self) } == ["/b/x", "/c", "/d"])
        #expect(!moreAgain)
        #expect(store.list(after: name("/d"), limit: 10).0.isEmpty)
    }
}
