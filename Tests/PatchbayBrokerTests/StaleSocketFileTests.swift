// The probe that decides whether a socket file in the broker's /net directory is dead: the
// socket table's word alone is not enough (its dump can miss a live socket: see
// `NetTable.liveness`).

import Glibc
@testable import PatchbayBroker
import PatchbaySystem
import Testing

@Suite("Stale socket files")
struct StaleSocketFileTests {
    @Test("a socket file is dead only when no socket is bound to it; a listener there is never connected to by the probe")
    func probeTellsLiveFromDead() throws {
        var template = Array("/tmp/pb-stale-XXXXXX".utf8CString)
        let directory = try #require(template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }.map { String(cString: $0) })
        defer {
            for name in ["dgram", "listener", "bound", "dead"] { unlink(directory + "/" + name) }
            rmdir(directory)
        }
        let datagram = try UnixSocket(.datagram)
        try datagram.bind(path: directory + "/dgram")
        let listener = try UnixSocket(.seqpacket)
        try listener.bind(path: directory + "/listener")
        try listener.listen(backlog: 4)
        let bound = try UnixSocket(.stream)  // bound, not listening
        try bound.bind(path: directory + "/bound")
        do {
            let gone = try UnixSocket(.datagram)
            try gone.bind(path: directory + "/dead")
        }  // closed: its file stays, with nothing bound to it
        #expect(!NetTable.dead(directory + "/dgram"))
        #expect(!NetTable.dead(directory + "/listener"))
        #expect(!NetTable.dead(directory + "/bound"))
        #expect(NetTable.dead(directory + "/dead"))
        #expect(!NetTable.dead(directory + "/missing"))
        // The listener's backlog is empty: the probe made no connection to it.
        try listener.descriptor.setNonblocking(true)
        #expect(accept(listener.rawValue, nil, nil) == -1 && errno == EAGAIN)
    }
}
