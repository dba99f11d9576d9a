// What a CAPS port accepts as an attached payload from its peer: only what the peer cannot turn
// against it. Real kernel objects: a pipe, an unsealed memfd, a sealed one.
import Glibc
@testable import Patchbay
import PatchbaySystem
import SystemPackage
import Testing

@Suite("CAPS: attached payloads a peer sends")
struct AttachedPayloadTests {
    @Test("a pipe is refused: it cannot be mapped, and reading it could block")
    func pipeRefused() throws {
        let pipe = try PatchbaySystem.Pipe()
        #expect(!attachedPayloadIsSound(pipe.readEnd.rawValue, length: 1))
    }

    @Test("a memfd its sender could still shrink is refused (a read after the shrink would SIGBUS)")
    func unsealedRefused() throws {
        let plain = try makeMemoryFile(name: "test-unsealed", sealable: false)
        try plain.truncate(to: 8192)
        #expect(!attachedPayloadIsSound(plain.rawValue, length: 4096))
        let sealableButOpen = try makeMemoryFile(name: "test-open", sealable: true)
        try sealableButOpen.truncate(to: 8192)
        try sealableButOpen.addSeals([.grow])
        #expect(!attachedPayloadIsSound(sealableButOpen.rawValue, length: 4096))
    }

    @Test("a memfd sealed against shrinking is accepted when it holds the announced length, refused when shorter")
    func sealedAccepted() throws {
        let sealed = try makeMemoryFile(name: "test-sealed", sealable: true)
        try sealed.truncate(to: 8192)
        try sealed.addSeals([.shrink, .grow])
        #expect(attachedPayloadIsSound(sealed.rawValue, length: 8192))
        #expect(!attachedPayloadIsSound(sealed.rawValue, length: 8193))
        // The sender really cannot shrink it any more.
        #expect(throws: Errno.self) { try sealed.truncate(to: 0) }
    }
}
