// patchbay-testpeer: one awkward thing per run, in a process of its own, for the test suite.
// It connects to PATCHBAY_SOCKET and speaks through stdout lines so tests can follow it.
//
//   claim-on-eof KEY          connect, print "ready", wait for EOF on stdin, claim, print
//                             "won <contents>" or the errno name
//   claim-with-full-table KEY fill the descriptor table, claim, print the errno name (EMFILE)
//   share-and-hang PATH TIMEOUT_MS
//                             share PATH, print the key, block on stdin until killed
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

func main() -> CInt {
    let arguments = Array(CommandLine.arguments.dropFirst())
    do {
        switch arguments.first {
        case "claim-on-eof" where arguments.count == 2:
            try claimOnEndOfInput(arguments[1])
        case "claim-with-full-table" where arguments.count == 2:
            try claimWithFullTable(arguments[1])
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
