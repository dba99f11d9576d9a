// patchbay-testpeer: one awkward thing per run, in a process of its own, for the test suite.
// It connects to PATCHBAY_SOCKET and speaks through stdout lines so tests can follow it.
//
//   claim-on-eof KEY          connect, print "ready", wait for EOF on stdin, claim, print
//                             "won <contents>" or the errno name
//   claim-with-full-table KEY fill the descriptor table, claim, print the errno name (EMFILE)
//   share-and-hang PATH TIMEOUT_MS
//                             share PATH, print the key, block on stdin until killed
//   shm-exchange KEY          claim an anonymous object, map it, print "read <first 4 bytes>",
//                             write "pong" at offset 2048, print "done"
//   shm-named-exchange NAME   the same through a named object opened read-write
//   shm-first-map KEY LENGTH  claim, print "ready", wait for EOF, map LENGTH bytes, print
//                             "mapped <length> size <size>" or the errno name
//   shm-touch-past-end NAME   map two pages of NAME and touch the second (dies of SIGBUS when
//                             the object is one page)
import Glibc
import Patchbay

func say(_ line: String) {
    let bytes = Array((line + "\n").utf8)
    _ = bytes.withUnsafeBytes { write(1, $0.baseAddress, $0.count) }
}

func waitForEndOfInput() {
    var byte: UInt8 = 0
    while read(0, &byte, 1) > 0 {}
}

func claimOnEndOfInput(_ keyText: String) throws(PatchbayError) {
    let key = try Key(keyText)
    let broker = try Broker()
    say("ready")
    waitForEndOfInput()
    do {
        let file = try broker.claim(key)
        let contents = (try? file.readToEnd(limit: 4096)) ?? []
        say("won " + String(decoding: contents, as: UTF8.self))
    } catch {
        say(error.errno.name)
    }
}

func claimWithFullTable(_ keyText: String) throws(PatchbayError) {
    let key = try Key(keyText)
    let broker = try Broker()
    // A low limit keeps the filling quick; the fillers stay open while claiming.
    var current = rlimit()
    getrlimit(CInt(RLIMIT_NOFILE.rawValue), &current)
    var limit = rlimit(rlim_cur: 64, rlim_max: current.rlim_max)
    setrlimit(CInt(RLIMIT_NOFILE.rawValue), &limit)
    var fillers: [CInt] = []
    while true {
        let fd = open("/dev/null", O_RDONLY | O_CLOEXEC)
        if fd < 0 { break }
        fillers.append(fd)
    }
    do {
        _ = try broker.claim(key)
        say("claimed")
    } catch {
        say(error.errno.name)
    }
    for fd in fillers { close(fd) }
}

func shareAndHang(_ path: String, milliseconds: Int64) throws(PatchbayError) {
    let broker = try Broker()
    let file: Descriptor
    do {
        file = try openFile(path, flags: O_RDONLY)
    } catch {
        throw PatchbayError(error, "cannot open \(path)")
    }
    let key = try broker.share(file, timeout: .after(.milliseconds(milliseconds)))
    say(key.text)
    waitForEndOfInput()
}

/// Reads the first 4 bytes of the mapping, then writes "pong" at 2048: both directions.
func exchange(_ memory: borrowing SharedMemory) throws(PatchbayError) {
    let mapping = try memory.map()
    say("read " + String(decoding: mapping.bytes.prefix(4), as: UTF8.self))
    mapping.withUnsafeMutableBytes { bytes in
        bytes.baseAddress!.advanced(by: 2048).copyMemory(from: "pong", byteCount: 4)
    }
    say("done")
}

func sharedMemoryExchange(keyText: String) throws(PatchbayError) {
    let broker = try Broker()
    let memory = try SharedMemory(adopting: try broker.claim(try Key(keyText)))
    try exchange(memory)
}

func namedExchange(_ name: String) throws(PatchbayError) {
    let broker = try Broker()
    try exchange(try broker.openSharedMemory(name, access: .readWrite))
}

func firstMapping(keyText: String, length: Int) throws(PatchbayError) {
    let broker = try Broker()
    let memory = try SharedMemory(adopting: try broker.claim(try Key(keyText)))
    say("ready")
    waitForEndOfInput()
    do {
        let mapping = try memory.map(length: length)
        say("mapped \(mapping.count) size \(try memory.size)")
    } catch {
        say(error.errno.name)
    }
}

func touchPastEnd(_ name: String) throws(PatchbayError) {
    let broker = try Broker()
    let memory = try broker.openSharedMemory(name, access: .readWrite)
    let mapping = try memory.map(length: 2 * pageSize)
    say("mapped")
    mapping.mutableBytes[pageSize] = 1  // past the end of a one-page object: SIGBUS
    say("survived")
}

func main() -> CInt {
    let arguments = Array(CommandLine.arguments.dropFirst())
    do {
        switch arguments.first {
        case "claim-on-eof" where arguments.count == 2:
            try claimOnEndOfInput(arguments[1])
        case "claim-with-full-table" where arguments.count == 2:
            try claimWithFullTable(arguments[1])
        case "shm-exchange" where arguments.count == 2:
            try sharedMemoryExchange(keyText: arguments[1])
        case "shm-named-exchange" where arguments.count == 2:
            try namedExchange(arguments[1])
        case "shm-first-map" where arguments.count == 3:
            try firstMapping(keyText: arguments[1], length: Int(arguments[2]) ?? 0)
        case "shm-touch-past-end" where arguments.count == 2:
            try touchPastEnd(arguments[1])
        case "share-and-hang" where arguments.count == 3:
            try shareAndHang(arguments[1], milliseconds: Int64(arguments[2]) ?? 60_000)
        default:
            say("usage: patchbay-testpeer claim-on-eof KEY | claim-with-full-table KEY | share-and-hang PATH MS")
            return 2
        }
    } catch {
        say("error " + error.description)
        return 1
    }
    return 0
}

exit(main())
