// Per-uid quotas for what a uid can make the broker hold: named shared memory (objects and the
// memory they occupy), /net sockets and CAPS services. Keys have theirs in KeyTests. Each limit
// answers EDQUOT with a reason naming it, and room comes back when the uid releases something.
import Glibc
import Patchbay
import PatchbayProtocol
import PatchbaySystem
import SystemPackage
import Testing

@Suite("Quotas")
struct QuotaTests {
    @Test("named shared memory: EDQUOT past the object count, room again after an unlink")
    func sharedMemoryObjects() throws {
        let broker = try TestBroker(["--max-shm-objects-per-uid", "3"])
        let client = try broker.connect()
        for index in 0..<3 { _ = try client.openSharedMemory("/quota-\(index)", options: [.create, .exclusive]) }
        let error = expectErrno(.diskQuotaExceeded) { () throws(PatchbayError) in
            _ = try client.openSharedMemory("/quota-3", options: [.create])
        }
        #expect(error?.reason.contains("3 named shared memory objects") == true)
        // Opening an existing object is not creating one.
        _ = try client.openSharedMemory("/quota-0", options: [.create])
        try client.unlinkSharedMemory("/quota-1")
        _ = try client.openSharedMemory("/quota-3", options: [.create, .exclusive])
    }

    @Test("named shared memory: EDQUOT once the uid's objects occupy the byte limit, room again when they shrink")
    func sharedMemoryBytes() throws {
        let broker = try TestBroker(["--max-shm-bytes-per-uid", "64k"])
        let client = try broker.connect()
        let big = try client.openSharedMemory("/big", options: [.create, .exclusive])
        // A sparse size occupies nothing, so it does not count...
        try big.truncate(to: 1 << 20)
        _ = try client.openSharedMemory("/small", options: [.create, .exclusive])
        // ...pages actually touched do.
        let mapping = try big.map(length: 128 << 10)
        mapping.withUnsafeMutableBytes { bytes in
            for page in stride(from: 0, to: bytes.count, by: 4096) { bytes[page] = 1 }
        }
        let error = expectErrno(.diskQuotaExceeded) { () throws(PatchbayError) in
            _ = try client.openSharedMemory("/third", options: [.create, .exclusive])
        }
        #expect(error?.reason.contains("65536") == true)
        try big.truncate(to: 0)
        _ = try client.openSharedMemory("/third", options: [.create, .exclusive])
    }

    @Test("/net: EDQUOT past the socket count, for opens and accepts; a refused accept loses no connection")
    func sockets() throws {
        let broker = try TestBroker(["--max-sockets-per-uid", "3"])
        let client = try broker.connect()
        let listener = try Socket.listen(client, name: "quota")
        let second = try Socket.connect(client, to: "quota")
        try second.send(Array("still here".utf8))
        do {
            let first = try Socket.connect(client, to: "quota")
            expectErrno(.diskQuotaExceeded) { () throws(PatchbayError) in _ = try Socket.connect(client, to: "quota") }
            expectErrno(.diskQuotaExceeded) { () throws(PatchbayError) in _ = try listener.accept() }
            #expect(first.id != second.id)
        }
        // Closing one socket makes room; the broker learns of it from the hang-up, so wait for the
        // table to show it.
        let deadline = monotonicNanoseconds() + 30_000_000_000
        while try client.listSockets().count > 2, monotonicNanoseconds() < deadline { usleep(2_000) }
        #expect(try client.listSockets().count == 2)
        // Both queued connections are still there: the second's, and the closed one's (EOF).
        var received: [String] = []
        for _ in 0..<2 {
            while try client.listSockets().count > 2, monotonicNanoseconds() < deadline { usleep(2_000) }
            let accepted = try listener.accept()
            received.append(try accepted.receive().map { String(decoding: $0.bytes, as: UTF8.self) } ?? "EOF")
        }
        #expect(received.sorted() == ["EOF", "still here"])
    }

    @Test("CAPS: EDQUOT past the service count, room again when a service closes")
    func services() throws {
        let broker = try TestBroker(["--max-services-per-uid", "2"])
        let client = try broker.connect()
        var first: CapsService? = try CapsService(client, name: "quota.one", access: [.world])
        #expect(first != nil)
        let second = try CapsService(client, name: "quota.two", access: [.world])
        let error = expectErrno(.diskQuotaExceeded) { () throws(PatchbayError) in
            _ = try CapsService(client, name: "quota.three", access: [.world])
        }
        #expect(error?.reason.contains("2 services") == true)
        first = nil
        let deadline = monotonicNanoseconds() + 30_000_000_000
        var third: CapsService?
        // The broker learns of the close from the hang-up; until then the answer is still EDQUOT.
        while third == nil, monotonicNanoseconds() < deadline {
            let attempt = Result { () throws(PatchbayError) in try CapsService(client, name: "quota.three", access: [.world]) }
            switch attempt {
            case .success(let service): third = service
            case .failure(let error) where error.errno == .diskQuotaExceeded: usleep(2_000)
            case .failure(let error): throw error
            }
        }
        #expect(third != nil && first == nil)
        _ = second
    }
}
