// Wake-up eventfds that two processes share (CAPS peers): whoever else holds the open file
// description may clear O_NONBLOCK and empty or fill the counter; neither must block this side.
import Glibc
import PatchbaySystem
import SystemPackage
import Testing

@Suite("Shared eventfds: never blocked by the other holder")
struct SharedEventCounterTests {
    @Test("draining an empty counter returns 0 at once even after the other side cleared O_NONBLOCK")
    func drainDoesNotBlock() throws {
        let counter = try EventCounter(nonblocking: false)  // as the other side could leave it
        #expect(try drainSharedEventCounter(counter.descriptor.rawValue) == 0)
        try counter.signal(3)
        #expect(try drainSharedEventCounter(counter.descriptor.rawValue) == 3)
        #expect(try drainSharedEventCounter(counter.descriptor.rawValue) == 0)
    }

    @Test("signalling a counter the other side filled and made blocking returns at once, adding nothing")
    func signalDoesNotBlock() throws {
        let counter = try EventCounter(nonblocking: false)
        try counter.signal(0xFFFF_FFFF_FFFF_FFFE)  // full: one more write would block
        signalSharedEventCounter(counter.descriptor.rawValue)
        #expect(try drainSharedEventCounter(counter.descriptor.rawValue) == 0xFFFF_FFFF_FFFF_FFFE)
        signalSharedEventCounter(counter.descriptor.rawValue)
        #expect(try drainSharedEventCounter(counter.descriptor.rawValue) == 1)
    }
}
