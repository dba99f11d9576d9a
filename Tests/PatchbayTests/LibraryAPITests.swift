// The library's API as a user of swift-system and Swift concurrency meets it: FileDescriptor in and
// out, keys as text and JSON, one error type, async calls that keep the concurrency pool free.
import Foundation
import Glibc
import Patchbay
import PatchbaySystem
import SystemPackage
import Testing

@Suite("Library API")
struct LibraryAPITests {
    @Test("share a swift-system FileDescriptor, claim one back: the same open file, bytes intact")
    func fileDescriptorRoundTrip() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        let path = broker.directory + "/handed-over.txt"
        let contents = Array("bytes through a FileDescriptor\n".utf8)
        let writer = try FileDescriptor.open(FilePath(path), .writeOnly, options: [.create, .truncate], permissions: .ownerReadWrite)
        _ = try writer.closeAfter { try writer.writeAll(contents) }

        let original = try FileDescriptor.open(FilePath(path), .readOnly)
        // The open file description travels: an offset moved before sharing is seen by the claimer.
        var first = [UInt8](repeating: 0, count: 6)
        #expect(try first.withUnsafeMutableBytes { try original.read(into: $0) } == 6)
        let key = try client.share(original, timeout: .after(.seconds(30)))
        try original.close()  // the key holds the file

        let claimed: FileDescriptor = try client.claimFileDescriptor(key)
        defer { try? claimed.close() }
        #expect(claimed.rawValue >= 0)
        var rest = [UInt8](repeating: 0, count: 256)
        let count = try rest.withUnsafeMutableBytes { try claimed.read(into: $0) }
        #expect(first + rest[0..<count] == contents)
        #expect(Array(rest[0..<count]) == Array(contents[6...]))
        // One-time: the key is gone.
        expectErrno(.noSuchFileOrDirectory) { () throws(PatchbayError) in _ = try client.claimFileDescriptor(key) }

        // And an owned Descriptor hands its number over as a FileDescriptor the caller closes.
        let again = try client.share(claimed)
        let owned = try client.claim(again)
        let released: FileDescriptor = owned.release()
        #expect(fcntl(released.rawValue, F_GETFD) >= 0)
        try released.close()
        #expect(fcntl(released.rawValue, F_GETFD) < 0)
    }

    @Test("Key is LosslessStringConvertible, Hashable and Codable as its text; bad text is refused")
    func keyText() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        let null = try FileDescriptor.open("/dev/null", .readOnly)
        defer { try? null.close() }
        let key = try client.share(null)
        let other = try client.share(null)

        #expect(Key(key.description) == key)
        #expect(Key(key.text)?.text == key.text)
        #expect(try Key(parsing: key.text) == key)
        #expect(Set([key, other, Key(key.text)!]).count == 2)
        for bad in ["", "short", "-AAAAAAAAAAAAAAAAAAAAA", "E_____________________", key.text + "A", "AAAAAAAAAAAAAAAAAAAA+A"] {
            #expect(Key(bad) == nil, "\(bad) parsed as a key")
            expectErrno(.invalidArgument) { () throws(PatchbayError) in _ = try Key(parsing: bad) }
        }

        struct Envelope: Codable, Equatable {
            var key: Key
            var keys: [Key]
        }
        let envelope = Envelope(key: key, keys: [other, key])
        let json = try JSONEncoder().encode(envelope)
        let text = String(decoding: json, as: UTF8.self)
        #expect(text.contains("\"key\":\"\(key.text)\""))
        #expect(try JSONDecoder().decode(Envelope.self, from: json) == envelope)
        #expect(try JSONDecoder().decode([Key].self, from: Data("[\"\(other.text)\"]".utf8)) == [other])

        // Bad text is a DecodingError (dataCorrupted), never a key.
        for bad in ["[\"not a key\"]", "[\"E_____________________\"]", "[42]"] {
            #expect(throws: DecodingError.self) { try JSONDecoder().decode([Key].self, from: Data(bad.utf8)) }
        }
        do {
            _ = try JSONDecoder().decode([Key].self, from: Data("[\"not a key\"]".utf8))
        } catch DecodingError.dataCorrupted(let context) {
            #expect(context.debugDescription.contains("not a Patchbay key"))
        }

        // A key decoded from JSON claims the file.
        let decoded = try JSONDecoder().decode(Envelope.self, from: json)
        #expect(try client.claim(decoded.key).rawValue >= 0)
    }

    @Test("reads and writes on claimed descriptors throw PatchbayError with the kernel's errno")
    func descriptorErrors() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        let pipe = try PatchbaySystem.Pipe()
        // The write end, claimed: reading it is EBADF.
        let writeEnd = try client.claim(try client.share(rawDescriptor: pipe.writeEnd.rawValue))
        var buffer = [UInt8](repeating: 0, count: 16)
        let readError = expectErrno(.badFileDescriptor) { () throws(PatchbayError) in _ = try writeEnd.readToEnd() }
        #expect(readError?.reason.isEmpty == false)
        expectErrno(.badFileDescriptor) { () throws(PatchbayError) in
            _ = try buffer.withUnsafeMutableBytes { raw in
                Result { () throws(PatchbayError) -> Int in try writeEnd.read(into: raw) }
            }.get()
        }
        // The read end, claimed: writing it is EBADF; reading what the write end wrote works.
        let readEnd = try client.claim(try client.share(rawDescriptor: pipe.readEnd.rawValue))
        expectErrno(.badFileDescriptor) { () throws(PatchbayError) in try readEnd.writeAll(Array("no".utf8)) }
        try writeEnd.writeAll(Array("yes".utf8))
        let read = try buffer.withUnsafeMutableBytes { raw in
            Result { () throws(PatchbayError) -> Int in try readEnd.read(into: raw) }
        }.get()
        #expect(Array(buffer[0..<read]) == Array("yes".utf8))
        // With every write end closed, the reader sees end of file (the library's copies count).
        _ = consume writeEnd
        _ = consume pipe
        #expect(try readEnd.readToEnd() == [])

        // Mapping calls too: a write-only handle cannot be adopted, a read-only one cannot map
        // writable.
        let memory = try SharedMemory.anonymous()
        let reader = try memory.readOnly()
        expectErrno(.permissionDenied) { () throws(PatchbayError) in _ = try reader.map(length: 4096, writable: true) }
        let writeOnly = try openFile("/proc/self/fd/\(memory.descriptor.rawValue)", flags: O_WRONLY).release()
        expectErrno(.invalidArgument) { () throws(PatchbayError) in
            _ = try SharedMemory(adopting: Patchbay.Descriptor(adopting: writeOnly))
        }
    }

    @Test("async broker calls: keys, status, named shared memory, /net, CAPS listing")
    func asyncCalls() async throws {
        let broker = try TestBroker()
        let client = try broker.connect()

        let report = try await client.status()
        #expect(report.pid == broker.pid)

        let pipe = try PatchbaySystem.Pipe()
        // Keys that never expire: under the whole suite this test's awaits can wait for the
        // cooperative pool for longer than a key's default minute (one run took 37 s).
        let key = try await client.share(FileDescriptor(rawValue: pipe.writeEnd.rawValue), timeout: .never)
        let claimed = try await client.claim(key)
        try claimed.writeAll(Array("async".utf8))
        _ = consume claimed
        _ = consume pipe.writeEnd
        #expect(try pipe.readEnd.readToEnd() == Array("async".utf8))
        let rawKey = try await client.share(rawDescriptor: pipe.readEnd.rawValue, timeout: .never)
        let asFileDescriptor = try await client.claimFileDescriptor(rawKey)
        #expect(fcntl(asFileDescriptor.rawValue, F_GETFD) >= 0)
        try asFileDescriptor.close()
        do throws(PatchbayError) {
            _ = try await client.claim(rawKey)
            Issue.record("a claimed key was claimed again")
        } catch {
            #expect(error.errno == .noSuchFileOrDirectory)
        }

        let memory = try await client.openSharedMemory("/async/state", options: [.create, .exclusive], mode: 0o600)
        try memory.truncate(to: 8192)
        #expect(try await client.statSharedMemory("/async/state").size == 8192)
        try await client.renameSharedMemory(from: "/async/state", to: "/async/renamed", .noReplace)
        #expect(try await client.listSharedMemory().map(\.nameText) == ["/async/renamed"])
        try await client.unlinkSharedMemory("/async/renamed")
        #expect(try await client.listSharedMemory().isEmpty)
        do throws(PatchbayError) {
            try await client.unlinkSharedMemory("/async/renamed")
            Issue.record("unlinking a missing name succeeded")
        } catch {
            #expect(error.errno == .noSuchFileOrDirectory)
        }
        let anonymous = try await client.newAnonymousSharedMemory(sealable: true)
        #expect(anonymous.kind == .anonymous)

        var listener = try await Socket.open(client, type: .seqpacket)
        try await listener.bind("async.greeter")
        try await listener.listen()
        #expect(try await listener.state() == .listening)
        let path = try await client.localSocketPath("async.greeter")
        #expect(path.hasSuffix("/async.greeter"))
        let connector = try broker.connect()
        let connected = try await Socket.connect(connector, to: "async.greeter")
        let accepted = try await listener.accept()
        try connected.send(Array("hi".utf8))
        #expect(try accepted.receive()?.bytes == Array("hi".utf8))
        #expect(try await client.listSockets().count == 3)
        let names = try await client.openAddressList().readToEnd()
        #expect(String(decoding: names, as: UTF8.self).contains("async.greeter"))

        let service = try CapsService(client, name: "async.listed", access: [.world])
        #expect(try await client.listServices().map(\.name) == ["async.listed"])
        _ = service
    }

    @Test("blocking async calls wait on the brokers' queues, not on the concurrency pool",
          .timeLimit(.minutes(1)))
    func asyncCallsLeaveThePoolFree() async throws {
        let broker = try TestBroker()
        // More waiters than the pool has threads: each accept waits for a connection that only a
        // task on the pool makes. Were the waits on the pool, the connections could never come.
        let waiters = 2 * onlineCPUCount() + 2
        // A socket lives while a copy of its handle is open anywhere: these keep the listeners.
        var handles: [FileDescriptor] = []
        defer { for handle in handles { try? handle.close() } }
        let accepted = try await withThrowingTaskGroup(of: UInt64.self) { group in
            for index in 0..<waiters {
                // Each waiter has a broker connection of its own: a connection serialises its calls.
                let own = try broker.connect()
                let listener = try await Socket.listen(own, name: "pool.\(index)")
                handles.append(try listener.handle.duplicate().release())
                let id = listener.id
                group.addTask {
                    let connection = try await Socket.accept(own, socket: id, type: .seqpacket)
                    return connection.id
                }
            }
            do {
                let connector = try broker.connect()
                for index in 0..<waiters {
                    let socket = try await Socket.connect(connector, to: "pool.\(index)")
                    handles.append(try socket.handle.duplicate().release())
                }
            } catch {
                // Closing the listeners ends the waits (ECONNABORTED), so the group can finish.
                for handle in handles { try? handle.close() }
                handles = []
                throw error
            }
            var ids: Set<UInt64> = []
            for try await id in group { ids.insert(id) }
            return ids
        }
        #expect(accepted.count == waiters)
    }
}
