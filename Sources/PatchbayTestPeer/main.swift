// patchbay-testpeer: one awkward thing per run, in a process of its own, for the test suite.
// It connects to PATCHBAY_SOCKET and speaks through stdout lines so tests can follow it.
//
//   claim-on-eof KEY          connect, print "ready", wait for EOF on stdin, claim, print
//                             "won <contents>" or the errno name
//   claim-with-full-table KEY fill the descriptor table, claim, print the errno name (EMFILE);
//                             at EOF, claim again with room, print "claimed on retry"
//   share-and-hang PATH TIMEOUT_MS
//                             share PATH, print the key, block on stdin until killed
//   shm-exchange KEY          claim an anonymous object, map it, print "read <first 4 bytes>",
//                             write "pong" at offset 2048, print "done"
//   shm-named-exchange NAME   the same through a named object opened read-write
//   shm-first-map KEY LENGTH  claim, print "ready", wait for EOF, map LENGTH bytes, print
//                             "mapped <length> size <size>" or the errno name
//   caps-client NAME COUNT    COUNT calls to an echo service answering "echo:" + request; prints
//                             "ok COUNT" or the first mismatch
//   caps-put-and-hang NAME    puts 3 requests, prints "sent ID ID ID", waits to be killed
//   caps-woken-wait NAME SPIN_NS
//                             with that spin budget: connects, prints "ready", waits for "go",
//                             puts a request, prints "waiting N" (N: its thread's voluntary
//                             context switches so far), waits for the reply, prints "replied"
//   broker-fork N             one Broker, fork, N shm opens and unlinks in parent and child at
//                             once; prints "child ok" then "parent ok", or the first failure
//   caps-wedge-and-flood NAME PORT N
//                             blocks its closing thread in NAME, then N calls with 8 local
//                             sockets each; prints "cut off after I: ERRNO" or "sent N", then
//                             "again: ok" or "again: ERRNO" for a new connection
//   caps-wedge-and-churn NAME PORT N
//                             blocks its closing thread in NAME, then connects and leaves N
//                             times; prints "refused at I: ERRNO" or "connected N"
//   caps-serve-full NAME      registers NAME (world), fills its descriptor table, prints "full",
//                             serves until EOF
//   caps-connect-many NAME N  connects up to N clients to NAME, prints "connected N" or
//                             "refused at I ERRNO", keeps them until EOF
//   refuse-user-raw UID       sends capsRefuseUser for UID from a plain connection, prints "sent"
//   caps-stray-flood NAME PORT COUNT
//                             a service that sticks its client's closing thread, then sends COUNT
//                             stray messages of 252 descriptors (as many as fit); prints "ready",
//                             then "flooded N"
//   net-send-lingering NAME PORT
//                             listens on NAME, accepts one connection, sends it "hello" with a
//                             lingering TCP socket attached; prints "listening", then "sent"
//   net-handle-lingering PORT SECONDS
//                             opens a /net local socket and writes to its handle a packet carrying
//                             a local socket with a TCP socket lingering SECONDS in its queue; prints
//                             "sent" or "refused ERRNO", then waits for EOF
//   net-handle-shutdown       opens a /net local socket and shuts its handle's writing down;
//                             prints "shut", then waits for EOF
//   caps-fork-and-go NAME service|client
//                             a port whose process forks a child that lives on, then closes the
//                             port; prints "ready" / "put ID", then "closed PID"
//   caps-wake-lingering NAME PORT [SECONDS]
//                             sends a wake-up carrying a local socket with a lingering TCP socket
//                             (SECONDS, 2 by default) in its queue on NAME's wake socket; prints
//                             "sent" or "refused ERRNO" (given SECONDS, prints "connected" first,
//                             and sends on a line "go")
//   net-accept-many NAME N    listens on NAME and sends N blocking accepts on one plain
//                             connection, one at a time; prints "refused R of N-1 EINVAL, waiting W" (W: the
//                             accepts the broker keeps for the listener), then waits for EOF
//   flood-connections-behind-lingering PORT N
//                             wedges its closing thread in the broker, then sends one status frame
//                             with 253 descriptors on each of N new connections; prints "flooded K,
//                             answered A, cut off C" once the broker has answered or cut off each
//   admit-lingering PORT      opens connections until the broker refuses one (its share is full),
//                             then connects once more with a frame holding a lingering TCP socket
//                             queued before the broker reads it; prints "refused ERRNO with it
//                             queued", then waits for EOF
//   net-accept-with-full-table NAME SPARE
//                             listens on NAME ("listening"); at a line of input, fills its table
//                             but SPARE and accepts (the errno, or "accepted"), then with room
//                             accepts again: "retry: " and the connection's first packet
//   caps-open-with-full-table NAME client|service SPARE
//                             fills its descriptor table but SPARE, opens a CAPS port; prints the errno (or
//                             "opened"), then "opened on retry" (or "retry ERRNO") once it has room
//   pin-addrs N               changes a bound name and opens /net/local/addrs N times, keeping
//                             each list; prints "distinct D of N", then whether the last one
//                             reopens for writing ("reopen for writing: ERRNO"), then waits for EOF
//   wedge-broker PORT SECONDS  blocks its closing thread in the broker (a local socket holding a TCP
//                             socket lingering SECONDS, in a key that expires); prints "wedged",
//                             then waits for EOF
//   refused-behind-lingering PORT N
//                             wedges its closing thread in the broker, fills its share, then makes N
//                             connections refused with descriptors queued in each (every tenth a
//                             local socket holding a lingering TCP socket); prints "refused R with
//                             descriptors queued (W a lingering socket), of N", then waits for EOF
//   adopt-claimed KEY NAME [TYPE]
//                             claims KEY (a socket), says "claimed", and at end of input asks the
//                             broker to adopt it as NAME's socket of TYPE (seqpacket); prints
//                             "adopted ID" or "refused ERRNO"
//   adopt-lingering PORT      asks the broker to adopt a socket pair's end holding a lingering TCP
//                             socket; prints "refused ERRNO" or "adopted"
//   net-accept-left-behind NAME
//                             listens on NAME, parks a blocking accept on it from a second, plain
//                             connection, closes that connection, then the listener; prints
//                             "done" once the broker shows each step
//   caps-register NAME[=GEN]...
//                             registers and closes each NAME in turn (writing GEN to its page
//                             first when given), prints "generations G1 G2 ..."
//   caps-register-many PREFIX N
//                             registers and closes PREFIX.0 to PREFIX.(N-1) in turn, prints
//                             "generations G0 G1 ..."
//   caps-serve-wedging NAME PORT
//                             a hostile service: its first reply carries a local socket whose
//                             last close waits, every later one 8 local sockets; until EOF
//   caps-call-flood NAME N UID
//                             calls NAME (of UID) N times, prints "cut off after I: ERRNO" or
//                             "answered N", "descriptors +D", then "again: ok" or "again: ERRNO"
//   share-wrapped-lingering PORT SECONDS
//                             shares a local socket holding a lingering TCP socket, prints
//                             the key, waits for EOF
//   pipeline-metrics N K      N connections with K metrics requests each, unread; prints
//                             "queued", then on a line of input "answered A of N*K"
//   open-monitors N           opens up to N monitors, prints "opened N" or "refused at I ERRNO",
//                             keeps them until EOF
//   caps-service-hang NAME    registers NAME (world), prints "ready", reads one request, prints
//                             "got ID", never replies
//   caps-fork NAME            connects, forks: the child's inherited port must say ENOTCONN, the
//                             child reconnects and calls; prints what each side saw
//   chaos SERVICE             cycles through every subsystem until killed (see `chaos`)
//   traffic busy|accept       keeps the broker busy (or blocked in a /net accept) until it dies,
//                             then reconnects and checks its named object (see `traffic`)
//   shm-hold-lock KEY         claims KEY and holds a POSIX read lock on the whole file; prints
//                             "locked", then waits for EOF
//   shm-touch-past-end NAME   map two pages of NAME and touch the second (dies of SIGBUS when
//                             the object is one page)
import Glibc
import Patchbay
import PatchbayProtocol
import PatchbaySystem
import SystemPackage
import Synchronization

func say(_ line: String) {
    let bytes = Array((line + "\n").utf8)
    _ = bytes.withUnsafeBytes { write(1, $0.baseAddress, $0.count) }
}

func waitForEndOfInput() {
    var byte: UInt8 = 0
    while read(0, &byte, 1) > 0 {}
}

/// Claims `keyText` and takes a POSIX read lock on the whole file, as any holder of a readable
/// descriptor may (the anonymous first-mapping lock is a write lock); keeps it until EOF.
func holdReadLock(_ keyText: String) throws(PatchbayError) {
    let file = try Broker().claim(try Key(parsing: keyText))
    var lock = flock()
    lock.l_type = Int16(F_RDLCK)
    lock.l_whence = Int16(SEEK_SET)
    guard fcntl(file.rawValue, F_SETLK, &lock) == 0 else { throw PatchbayError(Errno.current, "F_SETLK") }
    say("locked")
    waitForEndOfInput()
    withExtendedLifetime(file) {}
}

func claimOnEndOfInput(_ keyText: String) throws(PatchbayError) {
    let key = try Key(parsing: keyText)
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

/// Claims `keyText` and tries to open the claimed file again through /proc/self/fd for reading
/// and writing: says "reopened" or the errno.
func reopenWritable(_ keyText: String) throws(PatchbayError) {
    let key = try Key(parsing: keyText)
    let broker = try Broker()
    let file = try broker.claim(key)
    let again = open("/proc/self/fd/\(file.rawValue)", O_RDWR | O_CLOEXEC)
    if again >= 0 {
        close(again)
        say("reopened")
    } else {
        say(Errno.current.name)
    }
}

func claimWithFullTable(_ keyText: String) throws(PatchbayError) {
    let key = try Key(parsing: keyText)
    let broker = try Broker()
    // A low limit keeps the filling quick; the fillers stay open while claiming.
    let fillers = fillDescriptorTable(leaving: 0)
    do {
        _ = try broker.claim(key)
        say("claimed")
    } catch {
        say(error.errno.name)
    }
    for fd in fillers { close(fd) }
    // Then, once input ends, again with room: the key lost on the way is this process's still.
    waitForEndOfInput()
    do {
        _ = try broker.claim(key)
        say("claimed on retry")
    } catch {
        say("retry " + error.errno.name)
    }
}

func shareAndHang(_ path: String, milliseconds: Int64) throws(PatchbayError) {
    let broker = try Broker()
    let file: PatchbaySystem.Descriptor
    do {
        file = try openFile(path, flags: O_RDONLY)
    } catch {
        throw PatchbayError(error, "cannot open \(path)")
    }
    let key = try broker.share(rawDescriptor: file.rawValue, timeout: .after(.milliseconds(milliseconds)))
    say(key.text)
    waitForEndOfInput()
}

/// The broker's socket path, as the library finds it (`PATCHBAY_SOCKET`), for raw clients.
func brokerSocketPath() throws(PatchbayError) -> String {
    guard let path = getenv("PATCHBAY_SOCKET").map({ String(cString: $0) }) else {
        throw PatchbayError(.invalidArgument, "PATCHBAY_SOCKET is not set")
    }
    return path
}

/// A raw seqpacket connection to the local socket at `path` (the broker's, or a /net name's file).
func connectSeqpacket(to path: String) throws(PatchbayError) -> SeqpacketSocket {
    do {
        let socket = try SeqpacketSocket()
        try socket.connect(path: path)
        return socket
    } catch {
        throw PatchbayError(error, "cannot connect to \(path)")
    }
}

/// A TCP socket whose last close would wait `seconds`: `SO_LINGER` on, connected to 127.0.0.1:`port`
/// (a listener that never reads), its send queue full.
///
/// 60 s by default: three times what a test waits for a thread that must not be held up
/// (`finishes`), so a close that does wait there is caught, but not an hour. A close the tests do
/// not control can be the last one: a process the test binary spawns holds a copy of every
/// descriptor the binary has open until it execs, and when the binary's own copy is closed
/// meanwhile, the child's close at exec is the last (a run was seen waiting there).
func lingeringSocket(port: UInt16, seconds: Int32 = 60) throws(PatchbayError) -> PatchbaySystem.Descriptor {
    let fd = socket(AF_INET, CInt(SOCK_STREAM.rawValue) | CInt(SOCK_CLOEXEC.rawValue), 0)
    guard fd >= 0 else { throw PatchbayError(Errno.current, "socket") }
    let descriptor = PatchbaySystem.Descriptor(adopting: fd)
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_port = port.bigEndian
    address.sin_addr.s_addr = UInt32(0x7F00_0001).bigEndian
    let connected = withUnsafePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
    }
    guard connected == 0 else { throw PatchbayError(Errno.current, "connect to port \(port)") }
    // (-1 is stored as "no timeout at all", and read back as a negative number.)
    var hour = linger(l_onoff: 1, l_linger: seconds)
    guard setsockopt(fd, SOL_SOCKET, SO_LINGER, &hour, socklen_t(MemoryLayout<linger>.size)) == 0 else {
        throw PatchbayError(Errno.current, "SO_LINGER")
    }
    let chunk = [UInt8](repeating: 7, count: 65536)
    while chunk.withUnsafeBytes({ send(fd, $0.baseAddress, $0.count, CInt(MSG_DONTWAIT)) }) > 0 {}
    return descriptor
}

/// Shares a lingering TCP socket for `milliseconds`, closes its own copy, and exits: when the key
/// expires, the broker holds the socket's last descriptor.
func shareLingering(port: UInt16, milliseconds: Int64, seconds: Int32) throws(PatchbayError) {
    let broker = try Broker()
    let socket = try lingeringSocket(port: port, seconds: seconds)
    _ = try broker.share(rawDescriptor: socket.rawValue, timeout: .after(.milliseconds(milliseconds)))
    say("shared")
}

/// Shares a local socket holding a lingering TCP socket (`wrappedLingeringSocket`), closes its own
/// copy, says the key, and waits for its input to end: whoever claims it holds the last copy.
func shareWrappedLingering(port: UInt16, seconds: Int32) throws(PatchbayError) {
    let broker = try Broker()
    let key: Key
    do {
        let socket = try wrappedLingeringSocket(port: port, seconds: seconds)
        key = try broker.share(rawDescriptor: socket.rawValue, timeout: .never)
    }
    say(key.text)
    waitForEndOfInput()
}

/// A local socket with a lingering TCP socket waiting in its queue (`SCM_RIGHTS`): whoever closes
/// it last closes that socket too.
/// (`bytes`: the message carrying it has 1 byte, or none: a queue of 0 bytes can hold descriptors.)
func wrappedLingeringSocket(port: UInt16, seconds: Int32 = 60, bytes: Int = 1) throws(PatchbayError) -> PatchbaySystem.Descriptor {
    var pair: [CInt] = [-1, -1]
    guard socketpair(AF_UNIX, CInt(SOCK_SEQPACKET.rawValue) | CInt(SOCK_CLOEXEC.rawValue), 0, &pair) == 0 else {
        throw PatchbayError(Errno.current, "socketpair")
    }
    let sender = PatchbaySystem.Descriptor(adopting: pair[0])
    let wrapper = PatchbaySystem.Descriptor(adopting: pair[1])
    let inner = try lingeringSocket(port: port, seconds: seconds)
    var byte: UInt8 = 1
    guard withUnsafeBytes(of: &byte, { raw in
        [inner.rawValue].withUnsafeBufferPointer { SeqpacketSocket.sendRaw(sender.rawValue, UnsafeRawBufferPointer(rebasing: raw.prefix(bytes)), $0) }
    }) == bytes
    else { throw PatchbayError(Errno.current, "sendmsg") }
    _ = consume sender
    _ = consume inner
    return wrapper
}

/// Hands a local socket to someone with `handOver`, closes this side's copy, and only then puts a
/// lingering TCP socket (to `port`, lingering `seconds`) in its queue: true when that worked, so
/// the receiver's copy is the last one and its close will wait. False when the receiver had
/// already closed it (the socket then refuses the TCP socket, whose own close here does not wait).
func handOverWedge(port: UInt16, seconds: Int32, _ handOver: (CInt) throws(PatchbayError) -> Void) throws(PatchbayError) -> Bool {
    let inner = try lingeringSocket(port: port, seconds: seconds)
    var pair: [CInt] = [-1, -1]
    guard socketpair(AF_UNIX, CInt(SOCK_SEQPACKET.rawValue) | CInt(SOCK_CLOEXEC.rawValue), 0, &pair) == 0 else {
        throw PatchbayError(Errno.current, "socketpair")
    }
    let sender = PatchbaySystem.Descriptor(adopting: pair[0])
    do {
        let wrapper = PatchbaySystem.Descriptor(adopting: pair[1])
        try handOver(wrapper.rawValue)
    }
    var byte: UInt8 = 1
    let queued = withUnsafeBytes(of: &byte) { raw in
        [inner.rawValue].withUnsafeBufferPointer { SeqpacketSocket.sendRaw(sender.rawValue, raw, $0) }
    } == 1
    if !queued {
        var now = linger(l_onoff: 1, l_linger: 0)
        _ = setsockopt(inner.rawValue, SOL_SOCKET, SO_LINGER, &now, socklen_t(MemoryLayout<linger>.size))
    }
    return queued
}

/// Puts one request to `service` with a lingering TCP socket attached (`wrapped`: inside a local
/// socket's queue), closes its own copy, and stays connected until its input ends: the service
/// holds the last descriptor.
func capsAttachLingering(service: String, port: UInt16, how: String) throws(PatchbayError) {
    let broker = try Broker()
    let client = try CapsClient(broker, name: service)
    do {
        switch how {
        case "direct":
            // Announced by no entry: a request first (so the service knows this client), then
            // the socket left on the direct socket, which the service closes when this client goes.
            _ = try client.put(Array("hello".utf8))
            let socket = try wrappedLingeringSocket(port: port)
            try client.sendUnannounced([socket.rawValue])
        case "wrapped", "wrapped-empty":
            let socket = try wrappedLingeringSocket(port: port, bytes: how == "wrapped" ? 1 : 0)
            _ = try client.put(Array("lingering".utf8), descriptors: [socket.rawValue])
        default:
            let socket = try lingeringSocket(port: port, seconds: -1)
            _ = try client.put(Array("lingering".utf8), descriptors: [socket.rawValue])
        }
    }
    say("put")
    waitForEndOfInput()
}

/// A hostile service: registers `service` (world), says "ready", takes two requests, then on
/// their client's direct socket sends a local socket with a lingering TCP socket in its queue (to
/// stick the client's closing thread for that service), then up to `messages` stray messages of
/// 252 local sockets each (as many as its queue takes), tagged with ids nobody waits for; then answers both requests, each with one
/// descriptor. Says "flooded N" (N: the stray messages the direct socket took), and stays until
/// its input ends.
func capsStrayFlood(service name: String, port: UInt16, messages: Int) throws(PatchbayError) {
    let broker = try Broker()
    let service = try CapsService(broker, name: name, access: [.world])
    say("ready")
    var requests: [CapsServiceMessage] = []
    while requests.count < 2 {
        try service.receive { message, _ in if message.kind == .request { requests.append(message) } }
    }
    guard let direct = service.directSocket(ofChannel: requests[0].channelID) else {
        throw PatchbayError(.invalidArgument, "no channel")
    }
    do {
        let wedge = try wrappedLingeringSocket(port: port)
        guard sendRights(direct, tag: 1 << 40, [wedge.rawValue]) else { throw PatchbayError(Errno.current, "sendmsg") }
    }
    var sent = 0
    for index in 0..<messages {
        var ends: [CInt] = []
        for _ in 0..<126 {
            var pair: [CInt] = [-1, -1]
            guard socketpair(AF_UNIX, CInt(SOCK_SEQPACKET.rawValue) | CInt(SOCK_CLOEXEC.rawValue), 0, &pair) == 0 else {
                throw PatchbayError(Errno.current, "socketpair")
            }
            ends += pair
        }
        defer { for fd in ends { close(fd) } }
        guard sendRights(direct, tag: (1 << 40) + 1 + UInt64(index), ends) else { break }  // the queue is full
        sent += 1
    }
    for request in requests {
        let null = open("/dev/null", O_RDONLY | O_CLOEXEC)
        defer { close(null) }
        try service.reply(to: request.messageID, Array("with one".utf8), descriptors: [null])
    }
    say("flooded \(sent)")
    waitForEndOfInput()
}

/// One message of `tag` (8 bytes) carrying `fds` (up to the kernel's 253), without waiting: what
/// the library never sends (it sends at most 16). False when it was not sent.
func sendRights(_ socket: CInt, tag: UInt64, _ fds: [CInt]) -> Bool {
    withUnsafeBytes(of: tag) { raw in fds.withUnsafeBufferPointer { SeqpacketSocket.sendRights(socket, raw, $0, nonblocking: true) } } == 8
}

/// Listens on `name` (says "listening"), accepts one connection, and sends it "hello" with a
/// lingering TCP socket (to `port`, 60 s) attached, this side's copy closed: the receiver holds
/// the last one. Says "sent", then stays until its input ends.
func netSendLingering(name: String, port: UInt16) throws(PatchbayError) {
    let broker = try Broker()
    let listener = try Socket.listen(broker, name: name, type: .seqpacket)
    say("listening")
    let connection = try listener.accept()
    say("accepted")
    guard Swift.readLine() == "go" else { return }
    let hello = Array("hello".utf8)
    let inner = try lingeringSocket(port: port)
    if hello.withUnsafeBytes({ raw in [inner.rawValue].withUnsafeBufferPointer { SeqpacketSocket.sendRaw(connection.dataDescriptor, raw, $0) } }) == hello.count {
        say("sent")
    } else {
        // The kernel refused the descriptor (SO_PASSRIGHTS off at root's end): the data alone.
        let refused = Errno.current
        _ = hello.withUnsafeBytes { raw in [CInt]().withUnsafeBufferPointer { SeqpacketSocket.sendRaw(connection.dataDescriptor, raw, $0) } }
        say("refused \(refused.name)")
    }
    waitForEndOfInput()
}

/// Opens a `/net` local seqpacket socket and writes to its handle a packet carrying a local socket
/// with a lingering TCP socket (to `port`, `seconds`) in its queue, this side's copy closed:
/// whoever closes the last copy waits. Says "sent", or "refused ERRNO" when the kernel refuses
/// descriptors there (this side's close is then the last, and waits); then stays (the socket
/// with it) until its input ends.
func netHandleLingering(port: UInt16, seconds: Int32) throws(PatchbayError) {
    let broker = try Broker()
    let socket = try Socket.open(broker, type: .seqpacket)
    let wrapped = try wrappedLingeringSocket(port: port, seconds: seconds)
    var byte: UInt8 = 1
    let sent = withUnsafeBytes(of: &byte) { raw in
        [wrapped.rawValue].withUnsafeBufferPointer { SeqpacketSocket.sendRaw(socket.handle.rawValue, raw, $0) }
    }
    let refused = sent == 1 ? nil : Errno.current
    say(refused.map { "refused \($0.name)" } ?? "sent")
    _ = consume wrapped
    waitForEndOfInput()
    withExtendedLifetime(socket) {}
}

/// Opens a `/net` local seqpacket socket and shuts its handle's writing down: the broker's end
/// reads end of file from then on. Says "shut", then stays until its input ends.
func netHandleShutdown() throws(PatchbayError) {
    let broker = try Broker()
    let socket = try Socket.open(broker, type: .seqpacket)
    guard shutdown(socket.handle.rawValue, CInt(SHUT_WR)) == 0 else { throw PatchbayError(Errno.current, "shutdown") }
    say("shut")
    waitForEndOfInput()
    withExtendedLifetime(socket) {}
}

/// Connects to `service` and sends, on its wake socket, a wake-up carrying a local socket with a
/// lingering TCP socket in its queue (this side's copy closed): says "sent", or "refused ERRNO"
/// when the kernel refuses descriptors there; then stays until its input ends.
func capsWakeLingering(service: String, port: UInt16, seconds: Int32 = 2, onGo: Bool = false) throws(PatchbayError) {
    let broker = try Broker()
    let client = try CapsClient(broker, name: service)
    if onGo {
        say("connected")
        guard Swift.readLine() == "go" else { return }
    }
    // (2 s by default: refused, this side's own close of it is the last, and waits that long.)
    let socket = try wrappedLingeringSocket(port: port, seconds: seconds)
    let refused = client.wakeServiceCarrying([socket.rawValue])
    if onGo && refused == nil {
        _ = consume socket  // the copy in the service's queue is the last
        say("sent")
        waitForEndOfInput()
        return
    }
    say(refused.map { "refused \($0.name)" } ?? "sent")
    waitForEndOfInput()
    _ = consume socket
}

/// Calls `service` `count` times, each request carrying a local socket with a lingering TCP
/// socket (to `port`) in its queue, this side's copy closed: the service closes the last copy of
/// each, while it may be starting a program for the next (`caps serve --exec`). Says "answered N"
/// or "failed at I: ERRNO".
func capsExecRace(_ service: String, port: UInt16, count: Int, seconds: Int32 = 30, pause: useconds_t = 0) throws(PatchbayError) {
    let broker = try Broker()
    let client = try CapsClient(broker, name: service)
    for index in 0..<count {
        if pause > 0 { usleep(pause) }
        do throws(PatchbayError) {
            let socket = try wrappedLingeringSocket(port: port, seconds: seconds).release()
            _ = try client.put(Array("race".utf8), descriptors: [socket]) { close(socket) }
            try client.waitReply { _, _ in }
        } catch {
            say("failed at \(index): \(error.errno.name)")
            return
        }
    }
    say("answered \(count)")
}

/// The pid-reuse attack on a pid-restricted key: a child connects to the broker, hands the
/// connection to this process and exits; says "orphaned PID" (the child's pid, free again); then
/// reads a key from its input and claims it over that connection, as the child's pid, and says
/// "claimed" or "refused ERRNO".
func claimThroughOrphanedConnection() throws(PatchbayError) {
    let path = try brokerSocketPath()
    var pair: [CInt] = [-1, -1]
    guard socketpair(AF_UNIX, CInt(SOCK_SEQPACKET.rawValue), 0, &pair) == 0 else { throw PatchbayError(Errno.current, "socketpair") }
    let child = fork()
    if child == 0 {
        // The child: plain system calls only, then _exit.
        guard let connection = try? connectSeqpacket(to: path) else { _exit(1) }
        var byte: UInt8 = 1
        let sent = withUnsafeBytes(of: &byte) { raw in [connection.rawValue].withUnsafeBufferPointer { SeqpacketSocket.sendRaw(pair[1], raw, $0) } }
        _exit(sent == 1 ? 0 : 1)
    }
    var buffer = [UInt8](repeating: 0, count: 8)
    guard child > 0, let received = buffer.withUnsafeMutableBytes({ SeqpacketSocket.receiveRaw(pair[0], $0) }),
          let connection = received.descriptors.first else {
        throw PatchbayError(.protocolError, "the child did not hand over its connection")
    }
    var status: CInt = 0
    _ = waitpid(child, &status, 0)
    say("orphaned \(child)")
    try answerCommand(over: connection)
}

/// A connection made by a process that then runs `program` (a set-uid one, say, keeping its pid),
/// kept by this process, which made it fork that one first: says "exec'd PID" once `program` runs
/// (its input a pipe this process holds, so it waits there), then answers a command as
/// `answerCommand` over that connection, and ends `program` when its own input ends.
func claimAfterExec(_ arguments: [String]) throws(PatchbayError) {
    let path = try brokerSocketPath()
    var pair: [CInt] = [-1, -1]
    var started: [CInt] = [-1, -1]  // close-on-exec: end of file once the program runs
    var input: [CInt] = [-1, -1]    // the program's standard input
    guard socketpair(AF_UNIX, CInt(SOCK_SEQPACKET.rawValue), 0, &pair) == 0, pipe(&started) == 0, pipe(&input) == 0,
          fcntl(started[1], F_SETFD, FD_CLOEXEC) == 0
    else { throw PatchbayError(Errno.current, "socketpair or pipe") }
    // Everything the child needs is made before the fork: it runs plain system calls only.
    let argv = arguments.map { strdup($0) } + [nil]
    let null = open("/dev/null", O_WRONLY | O_CLOEXEC)
    let child = fork()
    if child == 0 {
        guard let connection = try? connectSeqpacket(to: path) else { _exit(1) }
        var byte: UInt8 = 1
        let sent = withUnsafeBytes(of: &byte) { raw in [connection.rawValue].withUnsafeBufferPointer { SeqpacketSocket.sendRaw(pair[1], raw, $0) } }
        guard sent == 1, dup2(input[0], 0) == 0, dup2(null, 1) == 1, dup2(null, 2) == 2 else { _exit(1) }
        close(input[1])
        _ = argv.withUnsafeBufferPointer { execv(argv[0]!, $0.baseAddress!) }
        _exit(127)
    }
    close(input[0])
    close(started[1])
    var buffer = [UInt8](repeating: 0, count: 8)
    guard child > 0, let received = buffer.withUnsafeMutableBytes({ SeqpacketSocket.receiveRaw(pair[0], $0) }),
          let connection = received.descriptors.first else {
        throw PatchbayError(.protocolError, "the child did not hand over its connection")
    }
    var byte: UInt8 = 0
    while read(started[0], &byte, 1) > 0 {}
    say("exec'd \(child)")
    try answerCommand(over: connection)
    waitForEndOfInput()
    close(input[1])  // the program reads end of file and ends
    var status: CInt = 0
    _ = waitpid(child, &status, 0)
}

/// Reads one command and sends it as a request over `connection` (a raw broker connection),
/// saying what came back: "claim KEY" ("claimed", "refused ERRNO"), or "caps-client NAME" (a
/// connection to a CAPS service: its notice carries the credentials the broker gives this
/// connection; "connected").
func answerCommand(over connection: CInt) throws(PatchbayError) {
    guard let line = readLine() else { throw PatchbayError(.invalidArgument, "no command") }
    let request: Request
    if line.hasPrefix("claim "), let token = KeyToken(text: String(line.dropFirst(6))) {
        request = .keys(.claim(token))
    } else if line.hasPrefix("caps-client ") {
        request = .caps(.client(name: String(line.dropFirst(12)), uid: -1, gid: -1, flags: [.world]))
    } else if line.hasPrefix("caps-service ") {
        request = .caps(.service(name: String(line.dropFirst(13)), uid: -1, gid: -1, flags: [.world], maximumInFlight: 0))
    } else {
        throw PatchbayError(.invalidArgument, "unknown command \(line)")
    }
    let frame = request.encode(requestID: 1)
    guard frame.withUnsafeBytes({ raw in [CInt]().withUnsafeBufferPointer { SeqpacketSocket.sendRaw(connection, raw, $0) } }) == frame.count
    else { throw PatchbayError(Errno.current, "send") }
    var answer = [UInt8](repeating: 0, count: 65536)
    guard let reply = answer.withUnsafeMutableBytes({ SeqpacketSocket.receiveRaw(connection, $0) }),
          let decoded = try? Frame.decode(answer[0..<reply.length]) else {
        throw PatchbayError(.protocolError, "no answer to the claim")
    }
    if decoded.kind == .error, let error = try? ErrorReply.decode(decoded) {
        say("refused \(Errno(rawValue: error.errno).name)")
    } else if line.hasPrefix("claim ") {
        say(reply.descriptors.isEmpty ? "answered without a file" : "claimed")
    } else {
        say("connected")
    }
    for fd in reply.descriptors { close(fd) }
}

/// A `/net` listener of its own with a lingering TCP socket sent on a connection it never
/// accepts, then everything dropped: the broker's copy of the listener is the last, and closing
/// it closes that socket. Says "dropped" and stays until its input ends.
func netListenerWithLingering(port: UInt16) throws(PatchbayError) {
    let broker = try Broker()
    let path: String
    do {
        let listener = try Socket.listen(broker, name: "lingering.embryo", type: .seqpacket)
        // Its own listener: it may let its connections take descriptors again (they inherit it).
        WakeSocket.acceptDescriptors(listener.kernelDescriptor)
        path = try broker.localSocketPath("lingering.embryo")
        let connection = try connectSeqpacket(to: path)
        let inner = try lingeringSocket(port: port)
        var byte: UInt8 = 1
        guard withUnsafeBytes(of: &byte, { raw in [inner.rawValue].withUnsafeBufferPointer { SeqpacketSocket.sendRaw(connection.rawValue, raw, $0) } }) == 1
        else { throw PatchbayError(Errno.current, "sendmsg") }
        _ = consume connection
        _ = consume inner
        _ = consume listener
    }
    say("dropped")
    waitForEndOfInput()
}

/// One share frame carrying 17 descriptors (16 of /dev/null, then a lingering TCP socket), one
/// more than a request may: the broker must refuse it without its loop closing the socket (the
/// kernel closes what does not fit a receive's control buffer, in the receiving thread).
func sendSeventeenWithLingering(port: UInt16) throws(PatchbayError) {
    let connection = try connectSeqpacket(to: try brokerSocketPath())
    var descriptors = (0..<16).map { _ in open("/dev/null", O_RDONLY | O_CLOEXEC) }
    let lingering = try lingeringSocket(port: port)
    descriptors.append(lingering.rawValue)
    let frame = Request.keys(.share(expiry: .never, restriction: nil)).encode(requestID: 1)
    guard sendFrame(connection.rawValue, frame, descriptors) == frame.count else { throw PatchbayError(Errno.current, "sendmsg") }
    for descriptor in descriptors.dropLast() { close(descriptor) }
    _ = consume lingering
    say("sent")
    // The connection stays open (the broker must answer or refuse, not wait) until input ends.
    waitForEndOfInput()
    _ = consume connection
}

/// Sends one frame with `descriptors` (any number: more than the shim's 16 too) with sendmsg.
func sendFrame(_ fd: CInt, _ frame: [UInt8], _ descriptors: [CInt]) -> Int {
    var iov = iovec()
    let length = MemoryLayout<cmsghdr>.size + 4 * descriptors.count
    let control = UnsafeMutableRawPointer.allocate(byteCount: (length + 7) & ~7, alignment: 8)
    defer { control.deallocate() }
    control.initializeMemory(as: UInt8.self, repeating: 0, count: (length + 7) & ~7)
    let header = control.assumingMemoryBound(to: cmsghdr.self)
    header.pointee.cmsg_len = length
    header.pointee.cmsg_level = SOL_SOCKET
    header.pointee.cmsg_type = CInt(SCM_RIGHTS)
    descriptors.withUnsafeBytes { control.advanced(by: MemoryLayout<cmsghdr>.size).copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
    return frame.withUnsafeBytes { raw -> Int in
        iov.iov_base = UnsafeMutableRawPointer(mutating: raw.baseAddress)
        iov.iov_len = raw.count
        return withUnsafeMutablePointer(to: &iov) { iovPointer in
            var message = msghdr(msg_name: nil, msg_namelen: 0, msg_iov: iovPointer, msg_iovlen: 1, msg_control: control,
                                 msg_controllen: (length + 7) & ~7, msg_flags: 0)
            return sendmsg(fd, &message, CInt(MSG_NOSIGNAL))
        }
    }
}

/// Blocks this uid's closing thread in the broker (a local socket holding a lingering TCP socket,
/// in a key that expires), then keeps sending frames of 17 refused
/// descriptors, reading the broker's answers, until the broker hangs up or `limit` descriptors
/// have gone; four rounds of a wedge and its flood at most. Says how many went before the hang-up.
func floodBehindLingering(port: UInt16, limit: Int) throws(PatchbayError) {
    let connection = try connectSeqpacket(to: try brokerSocketPath())
    let fd = connection.rawValue
    var timeout = timeval(tv_sec: 10, tv_usec: 0)
    _ = setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
    let null = open("/dev/null", O_RDONLY | O_CLOEXEC)
    defer { close(null) }
    let frame = Request.keys(.share(expiry: .never, restriction: nil)).encode(requestID: 1)
    // The wedge: a key of 100 ms for the local socket, which the broker keeps (so its copy is
    // the last once this side's is closed and the lingering socket queued in it), and closes on
    // this uid's closing thread when the key expires; the flood starts once it has (the broker
    // lists no key). (A frame the broker refuses at once raced this side's close: under load the
    // broker sometimes closed first, 20 times in a row.)
    let wedgeFrame = Request.keys(.share(expiry: .after(nanoseconds: 100_000_000), restriction: nil)).encode(requestID: 2)
    let observer = try Broker()
    var sent = 0
    var answers = [UInt8](repeating: 0, count: 4096)
    for wedge in 1...4 {
        var blocking = false
        for _ in 0..<20 where !blocking {
            var hungUp = false
            blocking = try handOverWedge(port: port, seconds: 15) { (wrapper) throws(PatchbayError) in
                guard sendFrame(fd, wedgeFrame, [wrapper]) == wedgeFrame.count else {
                    let error = Errno.current
                    guard error == .brokenPipe || error == .connectionReset else { throw PatchbayError(error, "sendmsg") }
                    hungUp = true
                    return
                }
            }
            if hungUp {
                say("disconnected after \(sent) (at wedge \(wedge) of 4)")
                return
            }
        }
        guard blocking else {
            say("could not leave the broker the last copy (wedge \(wedge), after \(sent))")
            return
        }
        let expired = monotonicNanoseconds() + 5_000_000_000
        while (try? observer.status().keys) ?? 0 > 0, monotonicNanoseconds() < expired { usleep(5_000) }
        var flooded = 0
        while flooded < limit {
            // The broker's answers (EINVAL for each frame) are read, so its queue for this client
            // never fills: a hang-up can only be the rule on descriptors waiting to be closed.
            while answers.withUnsafeMutableBytes({ recv(fd, $0.baseAddress, $0.count, CInt(MSG_DONTWAIT)) }) > 0 {}
            guard sendFrame(fd, frame, Array(repeating: null, count: 17)) == frame.count else {
                let error = Errno.current
                if error == .brokenPipe || error == .connectionReset {
                    say("disconnected after \(sent) (wedge \(wedge) of 4)")
                    return
                }
                throw PatchbayError(error, "sendmsg")
            }
            sent += 17
            flooded += 17
        }
    }
    say("still connected after \(sent)")
    waitForEndOfInput()
}

/// Blocks this uid's closing thread in the broker (as `floodBehindLingering` does), then opens
/// `connections` connections and sends on each one `status` frame carrying 253 descriptors (the
/// kernel's most in one message), reading nothing. Says "flooded N" (the frames sent), then waits
/// for its input to end, every connection kept open.
/// Blocks this uid's closing thread in the broker: shares, in a key that expires in 100 ms, a local
/// socket whose queue holds the only copy of a TCP socket lingering `seconds` (to `port`), and
/// waits until the key has expired (the broker's close of it is then the last, and waits). False
/// if the broker's copy could not be made the last.
func wedgeBrokerClosingThread(port: UInt16, seconds: Int32) throws(PatchbayError) -> Bool {
    let wedging = try connectSeqpacket(to: try brokerSocketPath())
    let wedgeFrame = Request.keys(.share(expiry: .after(nanoseconds: 100_000_000), restriction: nil)).encode(requestID: 1)
    var blocking = false
    for _ in 0..<20 where !blocking {
        blocking = try handOverWedge(port: port, seconds: seconds) { (wrapper) throws(PatchbayError) in
            guard sendFrame(wedging.rawValue, wedgeFrame, [wrapper]) == wedgeFrame.count else {
                throw PatchbayError(Errno.current, "sendmsg")
            }
        }
    }
    guard blocking else { return false }
    let observer = try Broker()
    let expired = monotonicNanoseconds() + 5_000_000_000
    while (try? observer.status().keys) ?? 0 > 0, monotonicNanoseconds() < expired { usleep(5_000) }
    return true
}

/// `wedgeBrokerClosingThread` for `seconds`; says "wedged" (or "could not leave the broker the
/// last copy"), then waits for its input to end.
func wedgeBroker(port: UInt16, seconds: Int32) throws(PatchbayError) {
    say(try wedgeBrokerClosingThread(port: port, seconds: seconds) ? "wedged" : "could not leave the broker the last copy")
    waitForEndOfInput()
}

func floodConnectionsBehindLingering(port: UInt16, connections: Int) throws(PatchbayError) {
    guard try wedgeBrokerClosingThread(port: port, seconds: 30) else {
        say("could not leave the broker the last copy")
        return
    }
    let null = open("/dev/null", O_RDONLY | O_CLOEXEC)
    defer { close(null) }
    let frame = Request.status.encode(requestID: 2)
    var kept: [CInt] = []
    var flooded = 0
    for _ in 0..<connections {
        guard let connection = try? connectSeqpacket(to: try brokerSocketPath()) else { break }
        let fd = dup(connection.rawValue)  // kept open past the connection's scope
        kept.append(fd)
        if sendFrame(fd, frame, Array(repeating: null, count: 253)) == frame.count { flooded += 1 }
    }
    // Each connection's fate, once the broker has got to it: answered, or cut off.
    var answered = 0, cut = 0
    var answer = [UInt8](repeating: 0, count: 4096)
    for fd in kept {
        var timeout = timeval(tv_sec: 20, tv_usec: 0)
        _ = setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        let length = answer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
        if length > 0 { answered += 1 } else if length == 0 || errno == ECONNRESET { cut += 1 }
    }
    say("flooded \(flooded), answered \(answered), cut off \(cut)")
    waitForEndOfInput()
    for fd in kept { close(fd) }
}

/// One end of a local socket pair, `wrapper`, whose queue holds the only copy of a lingering TCP
/// socket (to `port`): handed over and closed here, the last close of `wrapper` is whoever's
/// closes it there, and waits. (`sender`, the other end, holds nothing.) Kept instead, `disarm`
/// takes the TCP socket back out and closes it at once.
struct LastCopyWrapper {
    let wrapper: CInt
    private let sender: CInt

    init(port: UInt16, seconds: Int32) throws(PatchbayError) {
        let inner = try lingeringSocket(port: port, seconds: seconds)
        var pair: [CInt] = [-1, -1]
        guard socketpair(AF_UNIX, CInt(SOCK_SEQPACKET.rawValue) | CInt(SOCK_CLOEXEC.rawValue), 0, &pair) == 0 else {
            throw PatchbayError(Errno.current, "socketpair")
        }
        var byte: UInt8 = 1
        let queued = withUnsafeBytes(of: &byte) { raw in
            [inner.rawValue].withUnsafeBufferPointer { SeqpacketSocket.sendRaw(pair[0], raw, $0) }
        } == 1
        guard queued else {
            let error = Errno.current
            var now = linger(l_onoff: 1, l_linger: 0)
            _ = setsockopt(inner.rawValue, SOL_SOCKET, SO_LINGER, &now, socklen_t(MemoryLayout<linger>.size))
            close(pair[0])
            close(pair[1])
            throw PatchbayError(error, "queueing the lingering socket")
        }
        _ = consume inner  // its only copy is now in the wrapper's queue
        sender = pair[0]
        wrapper = pair[1]
    }

    /// The wrapper was not handed over: takes the TCP socket out of it and closes both at once.
    func disarm() {
        var byte: UInt8 = 0
        let received = withUnsafeMutableBytes(of: &byte) { SeqpacketSocket.receiveRaw(wrapper, $0, nonblocking: true) }
        for fd in received?.descriptors ?? [] {
            var now = linger(l_onoff: 1, l_linger: 0)
            _ = setsockopt(fd, SOL_SOCKET, SO_LINGER, &now, socklen_t(MemoryLayout<linger>.size))
            close(fd)
        }
        close(wrapper)
        close(sender)
    }

    /// Handed over (a copy now travels or is held elsewhere): this side's copies are closed.
    func handedOver() {
        close(wrapper)
        close(sender)
    }
}

/// Fills this uid's share of the broker with connections, then makes one more and queues in it,
/// before the broker can refuse it, a frame carrying a local socket that holds a lingering TCP
/// socket (to `port`), this side's copies closed: the refused connection's close frees it.
func admitLingering(port: UInt16) throws(PatchbayError) {
    let path = try brokerSocketPath()
    var kept: [CInt] = []  // the admitted connections, kept open
    var answer = [UInt8](repeating: 0, count: 4096)
    /// The broker's first answer on `fd` to a status request: nil if it admitted the connection.
    func refusal(_ fd: CInt) -> ErrorReply? {
        var timeout = timeval(tv_sec: 10, tv_usec: 0)
        _ = setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        let length = answer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
        guard length > 0, let frame = try? Frame.decode(answer[0..<length]), frame.kind == .error else { return nil }
        return try? ErrorReply.decode(frame)
    }
    let status = Request.status.encode(requestID: 1)
    while kept.count < 10_000 {
        let connection = try connectSeqpacket(to: path)
        _ = sendFrame(connection.rawValue, status, [])
        if refusal(connection.rawValue) != nil { break }
        kept.append(dup(connection.rawValue))
    }
    // Made first: between the connect and the send, the broker may accept and refuse (then the
    // send fails, and the next connection tries again with the same wrapper).
    var wedge = try LastCopyWrapper(port: port, seconds: 60)
    for attempt in 1...1000 {
        let connection = try connectSeqpacket(to: path)
        let sent = sendFrame(connection.rawValue, status, [wedge.wrapper]) == status.count
        guard sent else { continue }
        wedge.handedOver()
        if let refused = refusal(connection.rawValue) {
            say("refused \(Errno(rawValue: refused.errno).name) with it queued (attempt \(attempt), after \(kept.count))")
            waitForEndOfInput()
            return
        }
        // Admitted after all (closes this uid had waiting, which count against its share,
        // finished meanwhile): kept, and another wrapper for the next connection.
        kept.append(dup(connection.rawValue))
        wedge = try LastCopyWrapper(port: port, seconds: 60)
    }
    wedge.disarm()
    say("could not queue it before the refusal")
    waitForEndOfInput()
}

/// Changes a bound name and opens `/net/local/addrs`, `count` times, keeping every list it got:
/// says "distinct D of N" (how many different files it holds), then waits for its input to end.
func pinAddressLists(count: Int) throws(PatchbayError) {
    let broker = try Broker()
    var socket = try Socket.open(broker, type: .dgram)
    var held: [CInt] = []
    var inodes: Set<UInt64> = []
    for index in 0..<count {
        socket = try Socket.open(broker, type: .dgram)
        try socket.bind("pin-\(index)-" + String(repeating: "x", count: 48))
        let list = try broker.openAddressList()
        var info = stat()
        if fstat(list.rawValue, &info) == 0 { inodes.insert(UInt64(info.st_ino)) }
        held.append(list.release().rawValue)
    }
    say("distinct \(inodes.count) of \(count)")
    // A list is everyone's who opens it while the names stay: never writable by a client.
    let writable = held.last.map { open("/proc/self/fd/\($0)", O_RDWR | O_CLOEXEC) } ?? -1
    say(writable >= 0 ? "reopened for writing" : "reopen for writing: \(Errno.current.name)")
    if writable >= 0 { close(writable) }
    waitForEndOfInput()
    for fd in held { close(fd) }
}

/// Wedges this uid's closing thread in the broker (as `floodConnectionsBehindLingering` does), fills
/// its share with connections, then makes `connections` more, each with a frame queued before the
/// broker can refuse it: one carrying /dev/null and a pipe's end, every tenth a local socket
/// holding a lingering TCP socket (to `port`) instead, this side's copies closed. Says "refused R
/// with descriptors queued (W a lingering socket), of N" once the broker has refused each, then
/// waits for its input to end, the admitted connections kept open.
func refusedBehindLingering(port: UInt16, connections: Int) throws(PatchbayError) {
    let path = try brokerSocketPath()
    guard try wedgeBrokerClosingThread(port: port, seconds: 30) else {
        say("could not leave the broker the last copy")
        return
    }
    var kept: [CInt] = []
    var answer = [UInt8](repeating: 0, count: 4096)
    /// Whether the broker's first answer on `fd` is a refusal.
    func refused(_ fd: CInt) -> Bool {
        var timeout = timeval(tv_sec: 10, tv_usec: 0)
        _ = setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        let length = answer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
        guard length > 0, let frame = try? Frame.decode(answer[0..<length]) else { return false }
        return frame.kind == .error
    }
    let status = Request.status.encode(requestID: 2)
    while kept.count < 10_000 {
        let connection = try connectSeqpacket(to: path)
        _ = sendFrame(connection.rawValue, status, [])
        if refused(connection.rawValue) { break }
        kept.append(dup(connection.rawValue))
    }
    let null = open("/dev/null", O_RDONLY | O_CLOEXEC)
    defer { close(null) }
    let pipe: PatchbaySystem.Pipe
    do { pipe = try PatchbaySystem.Pipe() } catch { throw PatchbayError(error, "pipe") }
    var count = 0, wrapped = 0
    for index in 0..<connections {
        let wrapping = index % 10 == 9
        var sent = false
        var connection: CInt = -1
        if wrapping {
            // Made before the connection (it takes a while): the broker refuses a connection at
            // once, and a send after that fails. Tried on new connections until one takes it.
            let wedge = try LastCopyWrapper(port: port, seconds: 60)
            for _ in 0..<100 where !sent {
                close(connection)
                let made = try connectSeqpacket(to: path)
                connection = dup(made.rawValue)
                sent = sendFrame(connection, status, [wedge.wrapper]) == status.count
            }
            if sent { wedge.handedOver() } else { wedge.disarm() }
        } else {
            // Likewise: on a loaded machine the broker may refuse the connection before the send.
            for _ in 0..<100 where !sent {
                close(connection)
                let made = try connectSeqpacket(to: path)
                connection = dup(made.rawValue)
                sent = sendFrame(connection, status, [null, pipe.readEnd.rawValue]) == status.count
            }
        }
        defer { close(connection) }
        if sent && refused(connection) {
            count += 1
            if wrapping { wrapped += 1 }
        }
    }
    say("refused \(count) with descriptors queued (\(wrapped) a lingering socket), of \(connections)")
    waitForEndOfInput()
    for fd in kept { close(fd) }
}

/// Asks the broker to adopt, as a listener, a local socket that is none: one end of a pair whose
/// queue holds a lingering TCP socket (to `port`), this side's copies closed, so the broker's
/// refusal holds the last one. Says "refused ERRNO" (or "adopted"), then waits for EOF.
func adoptLingering(port: UInt16) throws(PatchbayError) {
    let connection = try connectSeqpacket(to: try brokerSocketPath())
    let adoptID: UInt64 = 1000
    let frame = Request.net(.adopt(family: "local", type: "seqpacket", name: "adopt.lingering")).encode(requestID: adoptID)
    let wedge = try LastCopyWrapper(port: port, seconds: 60)
    // 256 status requests go first, so the broker reaches the adoption a good while after this
    // side has closed its copy (then the broker's is the last), not microseconds after.
    let status = Request.status.encode(requestID: 1)
    for _ in 0..<256 { _ = sendFrame(connection.rawValue, status, []) }
    guard sendFrame(connection.rawValue, frame, [wedge.wrapper]) == frame.count else {
        let error = Errno.current
        wedge.disarm()
        throw PatchbayError(error, "sendmsg")
    }
    wedge.handedOver()
    var answer = [UInt8](repeating: 0, count: 65536)
    while true {
        let length = answer.withUnsafeMutableBytes { recv(connection.rawValue, $0.baseAddress, $0.count, 0) }
        guard length > 0, let reply = try? Frame.decode(answer[0..<length]) else {
            say("disconnected")
            break
        }
        guard reply.requestID == adoptID else { continue }
        if reply.kind == .error, let error = try? ErrorReply.decode(reply) {
            say("refused \(Errno(rawValue: error.errno).name)")
        } else {
            say("adopted")
        }
        break
    }
    waitForEndOfInput()
}

/// Blocks this uid's closing thread in `client`'s service for 15 s: a request carrying a local
/// socket that holds a lingering TCP socket to `port`. The service's copy is the last one: this
/// side's is closed before the entry that lets the service take it is published.
func wedgeClosingThread(through client: CapsClient, port: UInt16) throws(PatchbayError) {
    let wedge = try wrappedLingeringSocket(port: port, seconds: 15).release()
    _ = try client.put(Array("wedge".utf8), descriptors: [wedge]) { close(wedge) }
    _ = try client.waitReply { _, _ in }
}

/// Blocks this uid's closing thread in service `name` (a request carrying a local socket with a
/// lingering TCP socket queued in it), then calls with 8 local sockets attached each time, up to
/// `count` calls: says "cut off after N: ERRNO" at the first failure, or "sent N"; then connects
/// again and calls with one attached: "again: ok" or "again: ERRNO".
func capsWedgeAndFlood(_ name: String, port: UInt16, count: Int) throws(PatchbayError) {
    let broker = try Broker()
    let client = try CapsClient(broker, name: name)
    try wedgeClosingThread(through: client, port: port)
    func pairs(_ count: Int) -> [CInt] {
        (0..<count).flatMap { _ -> [CInt] in
            var pair: [CInt] = [-1, -1]
            _ = socketpair(AF_UNIX, CInt(SOCK_SEQPACKET.rawValue) | CInt(SOCK_CLOEXEC.rawValue), 0, &pair)
            close(pair[1])
            return [pair[0]]
        }
    }
    var outcome = "sent \(count)"
    for index in 0..<count {
        let sockets = pairs(8)
        defer { for fd in sockets { close(fd) } }
        do {
            _ = try client.put(Array("flood".utf8), descriptors: sockets)
            _ = try client.waitReply { _, _ in }
        } catch {
            outcome = "cut off after \(index): \(error.errno.name)"
            break
        }
    }
    say(outcome)
    do {
        let again = try CapsClient(broker, name: name)
        let sockets = pairs(1)
        defer { for fd in sockets { close(fd) } }
        _ = try again.put(Array("again".utf8), descriptors: sockets)
        _ = try again.waitReply { _, _ in }
        say("again: ok")
    } catch {
        say("again: " + error.errno.name)
    }
    waitForEndOfInput()
}

/// A hostile service `name` (world): says "ready", then answers its first request with a local
/// socket whose last close will wait (it holds a lingering TCP socket to `port`, and this side's
/// copy is closed before the reply is published), and every later request with 8 local sockets.
/// Serves until its input ends.
func capsServeWedging(_ name: String, port: UInt16) throws(PatchbayError) {
    let broker = try Broker()
    let service = try CapsService(broker, name: name, access: [.world])
    var wedged = false
    say("ready")
    let done = Atomic<Bool>(false)
    startThread {
        waitForEndOfInput()
        done.store(true, ordering: .relaxed)
        service.cancelWait()
    }
    while !done.load(ordering: .relaxed) {
        do {
            try service.receive { (message: CapsServiceMessage, _: UnsafeRawBufferPointer) in
                guard message.kind == .request else { return }
                if !wedged {
                    // The client's copy is the last one: this side's is closed before the entry
                    // that lets the client take it is published.
                    guard let wedge = try? wrappedLingeringSocket(port: port, seconds: 10).release() else { return }
                    wedged = (try? service.reply(to: message.messageID, Array("wedge".utf8), descriptors: [wedge]) { close(wedge) }) != nil
                    return
                }
                let sockets = (0..<8).map { _ -> CInt in
                    var pair: [CInt] = [-1, -1]
                    _ = socketpair(AF_UNIX, CInt(SOCK_SEQPACKET.rawValue) | CInt(SOCK_CLOEXEC.rawValue), 0, &pair)
                    close(pair[1])
                    return pair[0]
                }
                try? service.reply(to: message.messageID, Array("flood".utf8), descriptors: sockets)
                for fd in sockets { close(fd) }
            }
        } catch {
            break
        }
    }
}

/// Calls `name` (registered by `uid`) up to `count` times; says "cut off after I: ERRNO" at the first failure (or
/// "answered N"), then "descriptors +D": how many more this process has open than before.
/// `waiting`: each call is a `put` and a `waitReply` (whose body must not run for a failure).
func capsCallFlood(_ name: String, count: Int, uid: Int32, waiting: Bool = false) throws(PatchbayError) {
    let broker = try Broker()
    let client = try CapsClient(broker, name: name, uid: uid)
    let before = (try? openDescriptorCount(pid: getpid())) ?? 0
    var outcome = "answered \(count)"
    for index in 0..<count {
        do throws(PatchbayError) {
            if waiting {
                _ = try client.put(Array("hello".utf8))
                var replies = 0
                try client.waitReply { _, _ in replies += 1 }
                guard replies == 1 else { throw PatchbayError(.ioError, "the reply body ran \(replies) times") }
            } else {
                _ = try client.call(Array("hello".utf8))
            }
        } catch {
            outcome = "cut off after \(index): \(error.errno.name)"
            break
        }
    }
    say(outcome)
    let after = (try? openDescriptorCount(pid: getpid())) ?? 0
    say("descriptors +\(after - before)")
    do {
        _ = try client.call(Array("again".utf8))
        say("again: ok")
    } catch {
        say("again: " + error.errno.name)
    }
}

/// Blocks its closing thread in `name` (as `capsWedgeAndFlood`), then connects and leaves up to
/// `count` times, one connection at a time: each departure leaves the service its channel's
/// sockets to close behind the stuck one. Says "refused at I: ERRNO" for the first connection
/// refused, or "connected N"; then waits for its input to end.
func capsWedgeAndChurn(_ name: String, port: UInt16, count: Int) throws(PatchbayError) {
    let broker = try Broker()
    let client = try CapsClient(broker, name: name)
    try wedgeClosingThread(through: client, port: port)
    var outcome = "connected \(count)"
    for index in 0..<count {
        do {
            let visitor = try CapsClient(broker, name: name)
            // Answered, or refused by the service (past the bound): either way it then leaves.
            _ = try? visitor.call(Array("hi".utf8))
        } catch {
            outcome = "refused at \(index): \(error.errno.name)"
            break
        }
    }
    say(outcome)
    waitForEndOfInput()
}

/// Fills this process's descriptor table but for `spare` descriptors (soft limit 64, its broker
/// connection made first), then opens a CAPS port (`side`: "client" of service `name`, or "service" registering it): says the
/// errno it got, or "opened"; then, with room again, tries once more and says "opened on retry" or
/// "retry ERRNO".
func capsOpenWithFullTable(_ name: String, side: String, spare: Int) throws(PatchbayError) {
    let broker = try Broker()
    _ = try broker.status()
    let fillers = fillDescriptorTable(leaving: spare)
    func openPort() throws(PatchbayError) {
        if side == "client" {
            _ = try CapsClient(broker, name: name, access: [.world])
        } else {
            _ = try CapsService(broker, name: name, access: [.world])
        }
    }
    do {
        try openPort()
        say("opened")
    } catch {
        say(error.errno.name)
    }
    for fd in fillers { close(fd) }
    do {
        try openPort()
        say("opened on retry")
    } catch {
        say("retry " + error.errno.name)
    }
}

/// Listens on NAME and says "listening"; once a line arrives on input (a connection is queued by
/// then), fills its descriptor table but SPARE and accepts: says the errno (or "accepted"); then,
/// with room again, accepts and says "retry: " and the first packet the connection brings (or
/// "retry ERRNO").
func netAcceptWithFullTable(_ name: String, spare: Int) throws(PatchbayError) {
    let broker = try Broker()
    let listener = try Socket.listen(broker, name: name, nonblocking: true)
    say("listening")
    _ = readLine()
    let fillers = fillDescriptorTable(leaving: spare)
    do {
        _ = try listener.accept()
        say("accepted")
    } catch {
        say(error.errno.name)
    }
    for fd in fillers { close(fd) }
    do {
        let connection = try listener.accept()
        let packet = try connection.receive()?.bytes ?? []
        say("retry: " + String(decoding: packet, as: UTF8.self))
    } catch {
        say("retry " + error.errno.name)
    }
}

/// Lowers the descriptor limit to 64 and fills the table but `spare`; returns the fillers.
func fillDescriptorTable(leaving spare: Int) -> [CInt] {
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
    for _ in 0..<spare { if let fd = fillers.popLast() { close(fd) } }
    return fillers
}

/// Registers a world service `name`, then fills this process's descriptor table (soft limit 256)
/// so that no new client's descriptors can arrive; says "full", then serves until input ends.
func capsServeFull(_ name: String) throws(PatchbayError) {
    let broker = try Broker()
    let service = try CapsService(broker, name: name, access: [.world])
    var limit = rlimit()
    getrlimit(CInt(RLIMIT_NOFILE.rawValue), &limit)
    limit.rlim_cur = 256
    guard setrlimit(CInt(RLIMIT_NOFILE.rawValue), &limit) == 0 else { throw PatchbayError(Errno.current, "setrlimit") }
    var filler: [CInt] = []
    while true {
        let fd = open("/dev/null", O_RDONLY | O_CLOEXEC)
        if fd < 0 { break }
        filler.append(fd)
    }
    say("full")
    startThread {
        waitForEndOfInput()
        exit(0)
    }
    while true {
        try service.receive { (message: CapsServiceMessage, _: UnsafeRawBufferPointer) in
            if message.kind == .request { try? service.reply(to: message.messageID, [1]) }
        }
    }
}

/// Connects up to `count` clients to service `name` and keeps them until input ends: says
/// "connected N", or "refused at N ERRNO" for the first connection the broker refused.
func capsConnectMany(_ name: String, count: Int) throws(PatchbayError) {
    let broker = try Broker()
    var clients: [CapsClient] = []
    for index in 1...count {
        do {
            clients.append(try CapsClient(broker, name: name, access: [.world]))
        } catch {
            say("refused at \(index) \(error.errno.name)")
            waitForEndOfInput()
            return
        }
    }
    say("connected \(clients.count)")
    waitForEndOfInput()
}

/// Opens `connections` broker connections and writes `each` `metrics` requests on every one
/// without reading a reply; says "queued", then on a line of input counts the replies that have
/// come (reading what is there, not waiting) and says "answered A of T", then waits for its input
/// to end.
func pipelineMetrics(connections: Int, each: Int) throws(PatchbayError) {
    let path = try brokerSocketPath()
    var sockets: [CInt] = []
    let frame = Request.metrics.encode(requestID: 1)
    for _ in 0..<connections {
        let connection = try connectSeqpacket(to: path)
        let socket = dup(connection.rawValue)  // kept open past the connection's scope
        sockets.append(socket)
        for _ in 0..<each {
            guard frame.withUnsafeBytes({ send(socket, $0.baseAddress, $0.count, CInt(MSG_NOSIGNAL)) }) == frame.count else {
                throw PatchbayError(Errno.current, "send")
            }
        }
    }
    say("queued")
    _ = readLine()
    var answered = 0
    var buffer = [UInt8](repeating: 0, count: 1 << 16)
    for socket in sockets {
        while buffer.withUnsafeMutableBytes({ recv(socket, $0.baseAddress, $0.count, CInt(MSG_DONTWAIT)) }) > 0 { answered += 1 }
    }
    say("answered \(answered) of \(connections * each)")
    waitForEndOfInput()
}

/// Sends `capsRefuseUser` for `uid` on a connection that is no service port, then a status
/// request, whose answer says the broker has handled the first; says "sent".
func refuseUserRaw(_ uid: UInt32) throws(PatchbayError) {
    let connection = try connectSeqpacket(to: try brokerSocketPath())
    for frame in [Request.caps(.refuseUser(uid: uid, refusing: true)).encode(requestID: 1), Request.status.encode(requestID: 2)] {
        guard frame.withUnsafeBytes({ send(connection.rawValue, $0.baseAddress, $0.count, CInt(MSG_NOSIGNAL)) }) == frame.count else {
            throw PatchbayError(Errno.current, "send")
        }
    }
    var buffer = [UInt8](repeating: 0, count: 1 << 16)
    guard buffer.withUnsafeMutableBytes({ recv(connection.rawValue, $0.baseAddress, $0.count, 0) }) > 0 else {
        throw PatchbayError(Errno.current, "recv")
    }
    say("sent")
}

/// A listener whose only waiting accept's connection leaves before the listener closes: the
/// order in which the broker must stop watching the listener when its waits are forgotten.
func netAcceptLeftBehind(_ name: String) throws(PatchbayError) {
    let broker = try Broker()
    func waitUntil(_ what: String, _ condition: () throws(PatchbayError) -> Bool) throws(PatchbayError) {
        let deadline = monotonicNanoseconds() + 10_000_000_000
        while try !condition() {
            guard monotonicNanoseconds() < deadline else { throw PatchbayError(.timedOut, "waiting for \(what)") }
            usleep(2_000)
        }
    }
    let listener = try Socket.listen(broker, name: name)
    let id = listener.id
    func waiting() throws(PatchbayError) -> UInt32 { try broker.listSockets().first(where: { $0.id == id })?.waitingAccepts ?? 0 }
    do {
        let waiter = try connectSeqpacket(to: try brokerSocketPath())
        let frame = Request.namespace(.open(path: "/net/local/\(id)/accept", flags: [])).encode(requestID: 1)
        guard frame.withUnsafeBytes({ send(waiter.rawValue, $0.baseAddress, $0.count, CInt(MSG_NOSIGNAL)) }) == frame.count else {
            throw PatchbayError(Errno.current, "send")
        }
        try waitUntil("the accept to be parked") { () throws(PatchbayError) in try waiting() == 1 }
    }
    try waitUntil("the accept to be forgotten") { () throws(PatchbayError) in try waiting() == 0 }
    _ = consume listener
    try waitUntil("the listener to close") { () throws(PatchbayError) in try !broker.listSockets().contains(where: { $0.id == id }) }
    say("done")
}

/// Listens on `name` and sends `count` blocking accepts for it on one plain connection: the
/// broker keeps the first waiting and must answer each of the others EINVAL at once. Says
/// "refused R of N-1 EINVAL, waiting W", W the accepts the broker lists as waiting, and keeps
/// the listener and the connection until its input ends.
func netAcceptMany(_ name: String, count: Int) throws(PatchbayError) {
    let broker = try Broker()
    let listener = try Socket.listen(broker, name: name)
    let waiter = try connectSeqpacket(to: try brokerSocketPath())
    // A broker that kept a second accept would never answer it: counted, not waited for.
    var timeout = timeval(tv_sec: 10, tv_usec: 0)
    _ = setsockopt(waiter.rawValue, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
    let id = listener.id
    func accept(_ requestID: UInt64) throws(PatchbayError) {
        let frame = Request.namespace(.open(path: "/net/local/\(id)/accept", flags: [])).encode(requestID: requestID)
        guard frame.withUnsafeBytes({ send(waiter.rawValue, $0.baseAddress, $0.count, CInt(MSG_NOSIGNAL)) }) == frame.count else {
            throw PatchbayError(Errno.current, "send")
        }
    }
    // One at a time, each answer read before the next is sent (a connection that sends without
    // reading is cut off by the system broker, which is another rule).
    try accept(1)
    var refused = 0
    var buffer = [UInt8](repeating: 0, count: 1 << 16)
    for requestID in 2...UInt64(count) {
        try accept(requestID)
        let length = buffer.withUnsafeMutableBytes { recv(waiter.rawValue, $0.baseAddress, $0.count, 0) }
        guard length > 0 else { break }
        if let frame = try? Frame.decode(buffer[0..<length]), frame.kind == .error,
           let reply = try? ErrorReply.decode(frame), reply.errno == EINVAL {
            refused += 1
        }
    }
    let waiting = try broker.listSockets().first(where: { $0.id == id })?.waitingAccepts ?? 0
    say("refused \(refused) of \(count - 1) EINVAL, waiting \(waiting)")
    waitForEndOfInput()
    withExtendedLifetime(waiter) {}
    _ = consume listener
}

/// Binds `name` through `/net` (a listener), keeps a copy of its kernel socket and closes the
/// socket's handle: the broker lets the name go and removes its file, while the kept socket stays
/// bound to that (now unlinked) file, under the same path string. Says "kept" once the name is
/// free, and holds the socket until its input ends.
func netBindKeep(_ name: String) throws(PatchbayError) {
    let broker = try Broker()
    let kept: CInt
    do {
        let socket = try Socket.listen(broker, name: name)
        kept = dup(socket.kernelDescriptor)
    }
    while try broker.listSockets().contains(where: { $0.name == name }) { usleep(1_000) }
    say("kept")
    waitForEndOfInput()
    close(kept)
}

/// A `/net` listener named `name` (seqpacket) that keeps what it accepts: says "listening", then
/// for each "accept" line accepts one connection (waiting for it) and says "accepted"; for "read",
/// reads one message from each connection kept and says "read N", N the ones that said "bye";
/// ends with its input, and only then lets the connections go.
func netAcceptKeep(_ name: String) throws(PatchbayError) {
    let broker = try Broker()
    let listener = try Socket.listen(broker, name: name)
    say("listening")
    final class Kept {
        let socket: Socket
        let next: Kept?
        init(_ socket: consuming Socket, _ next: Kept?) { self.socket = socket; self.next = next }
    }
    var kept: Kept?
    while let line = readLine() {
        if line == "accept" {
            kept = Kept(try listener.accept(), kept)
            say("accepted")
        } else if line == "read" {
            var count = 0
            var next = kept
            while let connection = next {
                if (try? connection.socket.receive())??.bytes == Array("bye".utf8) { count += 1 }
                next = connection.next
            }
            say("read \(count)")
        } else {
            break
        }
    }
    withExtendedLifetime(kept) {}
    _ = consume listener
}

/// Connects to the seqpacket listener `name` `count` times, keeping every connection, and on each
/// sends "hi" and reads the answer: says "echoed E ended N" (answered "hi"; closed by the
/// server unanswered), then keeps them all until its input ends.
func netConnectHold(_ name: String, count: Int) throws(PatchbayError) {
    final class Held {
        let socket: Socket
        let next: Held?
        init(_ socket: consuming Socket, _ next: Held?) { self.socket = socket; self.next = next }
    }
    let broker = try Broker()
    var held: Held?
    var echoed = 0
    var ended = 0
    for _ in 0..<count {
        let socket = try Socket.connect(broker, to: name)
        _ = try? socket.send(Array("hi".utf8))
        let answer = (try? socket.receive()) ?? nil
        if answer?.bytes == Array("hi".utf8) { echoed += 1 } else { ended += 1 }
        held = Held(socket, held)
    }
    say("echoed \(echoed) ended \(ended)")
    waitForEndOfInput()
    withExtendedLifetime(held) {}
}

/// Registers the CAPS names `prefix.0` to `prefix.(count-1)` one at a time, each closed (and gone
/// from the broker's list) before the next: says "generations G0 G1 ...", the generation each got.
func capsRegisterMany(_ prefix: String, count: Int) throws(PatchbayError) {
    try capsRegister((0..<count).map { "\(prefix).\($0)" })
}

/// Registers each of `names` in turn (`NAME=GENERATION`: then writes that generation to its page),
/// each closed and gone from the broker's list before the next: says "generations G1 G2 ...",
/// the generation each got.
func capsRegister(_ names: [String]) throws(PatchbayError) {
    let broker = try Broker()
    var generations: [UInt64] = []
    for entry in names {
        let parts = entry.split(separator: "=", maxSplits: 1)
        let name = String(parts[0])
        do {
            let service = try CapsService(broker, name: name, access: [.world])
            generations.append(service.currentGeneration)
            if parts.count == 2, let generation = UInt64(parts[1]) { try service.setGeneration(generation) }
        }
        // The broker handles each connection in turn: the close is seen when the list lacks it.
        while try broker.listServices().contains(where: { $0.name == name }) { sched_yield() }
    }
    say("generations " + generations.map(String.init).joined(separator: " "))
}

/// Opens up to `count` monitors of the broker and keeps them until input ends: says "opened N",
/// or "refused at N ERRNO" for the first one the broker refused.
func openMonitors(_ count: Int) throws(PatchbayError) {
    let broker = try Broker()
    var monitors: [BrokerMonitor] = []
    for index in 1...count {
        do {
            monitors.append(try BrokerMonitor(broker))
        } catch {
            say("refused at \(index) \(error.errno.name)")
            waitForEndOfInput()
            return
        }
    }
    say("opened \(monitors.count)")
    waitForEndOfInput()
}

/// Connects to the broker `count` times, one connection at a time, each asked for the status
/// and closed before the next: says "connected N", or "refused at N ERRNO: REASON" for the
/// first connection the broker refused.
/// Connects to the broker's socket without blocking until the kernel refuses (its listen
/// backlog full, while the broker does not accept), says how many got in and why the next did
/// not, and holds them until its input closes.
func connectFill() throws(PatchbayError) {
    let path = try brokerSocketPath()
    var held: [CInt] = []
    while held.count < 100_000 {
        var socket: SeqpacketSocket
        do {
            socket = try SeqpacketSocket()
        } catch {
            say("filled \(held.count) \(error.name)")
            break
        }
        do throws(Errno) {
            try UnixSocket.connectWithoutBlocking(on: socket.descriptor.rawValue, path: path)
        } catch {
            say("filled \(held.count) \(error.name)")
            break
        }
        held.append(socket.descriptor.release())
    }
    waitForEndOfInput()
    for fd in held { close(fd) }
}

/// A seqpacket listener at `path` that closes every connection it accepts at once, until its
/// input closes: a socket another user planted where a client might look for its broker.
func listenAndDrop(_ path: String) throws(PatchbayError) {
    do {
        let listener = try SeqpacketSocket(nonblocking: true)
        try listener.bind(path: path)
        chmod(path, 0o666)
        try listener.listen(backlog: 16)
        say("listening")
        var watched = [pollfd(fd: listener.descriptor.rawValue, events: Int16(POLLIN), revents: 0),
                       pollfd(fd: 0, events: Int16(POLLIN), revents: 0)]
        while true {
            _ = poll(&watched, 2, -1)
            if watched[1].revents != 0 { return }
            while let dropped = try? listener.accept(nonblocking: true) { _ = consume dropped }
        }
    } catch {
        throw PatchbayError(error, "cannot listen at \(path)")
    }
}

/// A seqpacket listener at `path` (mode 0666) that never accepts, its backlog of 0 filled by a
/// connection of its own: a blocking connect there waits until its input closes.
func listenFull(_ path: String) throws(PatchbayError) {
    do {
        let listener = try SeqpacketSocket()
        try listener.bind(path: path)
        chmod(path, 0o666)
        try listener.listen(backlog: 0)
        let filling = try SeqpacketSocket()
        try UnixSocket.connectWithoutBlocking(on: filling.descriptor.rawValue, path: path)
        say("listening full")
        waitForEndOfInput()
        _ = consume filling
    } catch {
        throw PatchbayError(error, "cannot listen at \(path)")
    }
}

/// One blocking connect to the local socket at `path`: "connected", or the errno's name. With
/// `times`, that many, each closed at once: "connected N", or the first errno's name.
func connectTo(_ path: String, times: Int? = nil) {
    for _ in 0..<(times ?? 1) {
        do {
            let socket = try SeqpacketSocket()
            try socket.connect(path: path)
        } catch {
            say(error.name)
            return
        }
    }
    say(times.map { "connected \($0)" } ?? "connected")
}

func connectChurn(_ count: Int) {
    for index in 1...count {
        do throws(PatchbayError) {
            let broker = try Broker(autostart: false, reconnect: .never)
            _ = try broker.status()
        } catch {
            say("refused at \(index) \(error.description)")
            return
        }
    }
    say("connected \(count)")
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
    let memory = try SharedMemory(adopting: try broker.claim(try Key(parsing: keyText)))
    try exchange(memory)
}

func namedExchange(_ name: String) throws(PatchbayError) {
    let broker = try Broker()
    try exchange(try broker.openSharedMemory(name, access: .readWrite))
}

func firstMapping(keyText: String, length: Int) throws(PatchbayError) {
    let broker = try Broker()
    let memory = try SharedMemory(adopting: try broker.claim(try Key(parsing: keyText)))
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

/// COUNT calls that each must come back as "echo:" + the request.
func capsClient(_ name: String, count: Int) throws(PatchbayError) {
    let broker = try Broker()
    let client = try CapsClient(broker, name: name, waitForService: true)
    for index in 0..<count {
        let request = "\(getpid()):\(index)"
        let reply = String(decoding: try client.call(Array(request.utf8)), as: UTF8.self)
        if reply != "echo:" + request {
            say("mismatch \(request) got \(reply)")
            return
        }
    }
    say("ok \(count)")
}

/// Round trips with spinning off (every wait sleeps), `window` requests in flight, each reply
/// checked against its request; says "ok COUNT", or "stalled" and exits 1 when a minute passes
/// (a wake-up lost somewhere would otherwise hang the test that runs this).
func capsForcedSleep(_ name: String, count: Int, window: Int) throws(PatchbayError) {
    CapsTuning.spinNanoseconds = 0
    startThread {
        sleep(60)
        say("stalled")
        exit(1)
    }
    let broker = try Broker()
    let client = try CapsClient(broker, name: name, waitForService: true)
    var expected: [UInt64: String] = [:]
    var sent = 0
    var received = 0
    while received < count {
        while sent < count && expected.count < window {
            let request = "\(getpid()):\(sent)"
            expected[try client.put(Array(request.utf8))] = request
            sent += 1
        }
        var mismatch: String?
        try client.waitReply { (id: UInt64, bytes: UnsafeRawBufferPointer) in
            let reply = String(decoding: bytes, as: UTF8.self)
            if expected.removeValue(forKey: id) != reply { mismatch = reply }
        }
        if let mismatch {
            say("mismatch \(mismatch)")
            return
        }
        received += 1
    }
    say("ok \(count)")
}

let stormEnded = Atomic<Bool>(false)

/// Connects to `name` and, until its input ends, scribbles its channel's service wake words:
/// bumps the futex word, flips the pending mark, wakes the word, in a tight loop. Says "storming"
/// once it started.
func capsWakeStorm(_ name: String) throws(PatchbayError) {
    let broker = try Broker()
    let client = try CapsClient(broker, name: name, waitForService: true)
    startThread {
        waitForEndOfInput()
        stormEnded.store(true, ordering: .relaxed)
    }
    say("storming")
    var round = 0
    while !stormEnded.load(ordering: .relaxed) {
        client.scribbleServiceWakeWords(round)
        round += 1
    }
    say("rounds \(round)")
}

/// A client that puts one request and waits for the reply, spinning up to `spin` ns. To a service
/// it finds asleep, its wait must spin (it just woke the service), not sleep, however long the
/// service takes to run; the test stops the service and watches this thread's context switches.
func capsWokenWait(_ name: String, spin: UInt64) throws(PatchbayError) {
    CapsTuning.spinNanoseconds = spin
    let broker = try Broker()
    let client = try CapsClient(broker, name: name, waitForService: true)
    say("ready")
    guard Swift.readLine() == "go" else { return }
    _ = try client.put(Array("woken".utf8))
    say("waiting \(voluntarySwitchesOfThisThread() ?? -1)")
    try client.waitReply { _, _ in }
    say("replied")
}

/// `voluntary_ctxt_switches` of the calling thread, from /proc (reading it does not block).
func voluntarySwitchesOfThisThread() -> Int? {
    guard let file = fopen("/proc/thread-self/status", "r") else { return nil }
    defer { fclose(file) }
    var line = [CChar](repeating: 0, count: 256)
    while fgets(&line, CInt(line.count), file) != nil {
        let text = String(cString: line)
        if text.hasPrefix("voluntary_ctxt_switches:") {
            return Int(String(text.dropFirst("voluntary_ctxt_switches:".count).filter(\.isNumber)))
        }
    }
    return nil
}

/// Puts three requests nobody will answer, says their ids, then waits to be killed.
func capsPutAndHang(_ name: String) throws(PatchbayError) {
    let broker = try Broker()
    let client = try CapsClient(broker, name: name, waitForService: true)
    let ids = try (0..<3).map { (index) throws(PatchbayError) -> UInt64 in try client.put(Array("left behind \(index)".utf8)) }
    say("sent " + ids.map(String.init).joined(separator: " "))
    waitForEndOfInput()
}

/// A client that ignores its in-flight limit (and makes every descriptor it holds blocking): puts
/// `count` requests at once, then waits until the
/// service has refused every one past the limit, and says how many were refused.
func capsFlood(_ name: String, _ count: Int) throws(PatchbayError) {
    let broker = try Broker()
    let client = try CapsClient(broker, name: name, waitForService: true)
    client.enforcesInFlightLimit = false
    // Every descriptor it holds made blocking, as a hostile client would try: nothing the
    // service holds shares an open file description with them.
    for fd in CInt(3)..<CInt(256) {
        let flags = fcntl(fd, F_GETFL)
        if flags >= 0 { _ = fcntl(fd, F_SETFL, flags & ~O_NONBLOCK) }
    }
    for index in 0..<count { _ = try client.put(Array("flood \(index)".utf8)) }
    say("sent \(count) with a limit of \(client.maximumInFlight)")
    var refused = 0
    var buffer = [UInt8](repeating: 0, count: 4096)
    while refused < count - client.maximumInFlight {
        let reply = try buffer.withUnsafeMutableBytes { raw in
            Result { () throws(PatchbayError) -> CapsReply in try client.wait(into: raw) }
        }.get()
        if reply.error == .noBufferSpace { refused += 1 }
    }
    say("refused \(refused)")
    waitForEndOfInput()
}

/// Connects `held` clients at once and keeps them, then drops them all, then connects and drops
/// one `cycles` times; reports how many connects were refused with EAGAIN.
func capsChurn(_ name: String, held: Int, cycles: Int) throws(PatchbayError) {
    let broker = try Broker()
    var clients: [CapsClient] = []
    var refusedHeld = 0
    for _ in 0..<held {
        do {
            clients.append(try CapsClient(broker, name: name))
        } catch {
            guard error.errno == .resourceTemporarilyUnavailable else { throw error }
            refusedHeld += 1
        }
    }
    clients.removeAll()
    var refusedCycles = 0
    for _ in 0..<cycles {
        do {
            _ = try CapsClient(broker, name: name)
        } catch {
            guard error.errno == .resourceTemporarilyUnavailable else { throw error }
            refusedCycles += 1
        }
    }
    say("held \(held - refusedHeld) refused \(refusedHeld) cycles \(cycles - refusedCycles) refused \(refusedCycles)")
}

/// `body`'s result, its failure as a PatchbayError.
func forgeable<T: ~Copyable>(_ body: () throws(Errno) -> T) throws(PatchbayError) -> T {
    do { return try body() } catch { throw PatchbayError(error, "cannot make the forged attachments") }
}

/// A client that attaches what a service must not read as a request's payload: a pipe, and a
/// memfd it could shrink under the service's reads (shrunk right after the put). Reports the
/// errno of each refusal, then makes one honest call and reports its answer.
func capsForge(_ name: String) throws(PatchbayError) {
    let broker = try Broker()
    let client = try CapsClient(broker, name: name, waitForService: true)
    let pipe = try forgeable { () throws(Errno) in try PatchbaySystem.Pipe() }
    let memory = try forgeable { () throws(Errno) in try makeMemoryFile(name: "forged", sealable: false) }
    try forgeable { () throws(Errno) in try memory.truncate(to: 1 << 20) }
    _ = try client.putForgedAttachment(pipe.readEnd.rawValue, length: 4096)
    _ = try client.putForgedAttachment(memory.rawValue, length: 1 << 20)
    try? memory.truncate(to: 0)
    var refusals: [String] = []
    var buffer = [UInt8](repeating: 0, count: 4096)
    while refusals.count < 2 {
        let reply = try buffer.withUnsafeMutableBytes { raw in
            Result { () throws(PatchbayError) -> CapsReply in try client.wait(into: raw) }
        }.get()
        refusals.append(reply.error?.name ?? "answered")
    }
    say("refused " + refusals.joined(separator: " "))
    let answer = try client.call(Array("honest".utf8))
    say("called " + String(decoding: answer, as: UTF8.self))
}

/// One honest call to `name`, then the service's words of the channel's header (request head,
/// reply tail) written with a value near 2^63, as a client that wants the service's counts
/// inflated would; says "scribbled" and waits for its stdin to close.
func capsScribbleServiceWords(_ name: String) throws(PatchbayError) {
    let broker = try Broker()
    let client = try CapsClient(broker, name: name, waitForService: true)
    _ = try client.call(Array("honest".utf8))
    client.scribbleServiceWords(1 << 62)
    say("scribbled")
    while Swift.readLine() != nil {}
}

/// Forges DISPOSEs: puts two requests ("one", "two") and says "put ID ID"; once told "go" (the
/// service replied to both), pushes DISPOSE entries for them and writes its reply head past the
/// service's tail, far off, and back, then puts "three" in an entry that announces a reply head
/// past the service's tail, and says "forged"; once told "go" again,
/// consumes the three replies and says "consumed".
func capsForgeDispose(_ name: String) throws(PatchbayError) {
    let broker = try Broker()
    let client = try CapsClient(broker, name: name, waitForService: true)
    let first = try client.put(Array("one".utf8))
    let second = try client.put(Array("two".utf8))
    say("put \(first) \(second)")
    guard Swift.readLine() == "go" else { return }
    try client.putForgedDispose(first)
    try client.putForgedDispose(second)
    for head: UInt64 in [1_000, 1 << 63, 0] { client.scribbleReplyHead(head) }
    _ = try client.putForgedConsumed(Array("three".utf8), consumed: 1_000)
    say("forged")
    guard Swift.readLine() == "go" else { return }
    var replies: [String] = []
    for _ in 0..<3 {
        try client.waitReply { (_: UInt64, bytes: UnsafeRawBufferPointer) in replies.append(String(decoding: bytes, as: UTF8.self)) }
    }
    say("consumed " + replies.joined(separator: " "))
}

/// This process's open descriptors for the memory files `caps-rewrite-kept` sends.
func openDescriptors() -> Int {
    guard let directory = opendir("/proc/self/fd") else { return -1 }
    defer { closedir(directory) }
    var count = 0
    var target = [CChar](repeating: 0, count: 64)
    while let entry = readdir(directory) {
        let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        let length = readlink("/proc/self/fd/" + name, &target, target.count - 1)
        if length > 0, String(decoding: target[0..<length].map { UInt8(bitPattern: $0) }, as: UTF8.self).contains("rewrite-kept") {
            count += 1
        }
    }
    return count
}

/// A WORLD service that reads with a 16-byte buffer, as a C service with a fixed buffer does:
/// says "ready N" (N: its open descriptors for `caps-rewrite-kept`'s memory files, 0); for each
/// request read short, "short ID", then waits for a line "go" and refuses it (`EMSGSIZE`), saying "refused" or the errno of the refusal; for
/// each DISPOSE, "dispose ID N" once its descriptors are back to the count at "ready" (or after
/// 5 s, whatever they are).
func capsShortReader(_ name: String) throws(PatchbayError) {
    let broker = try Broker()
    let service = try CapsService(broker, name: name, access: [.world])
    let ready = openDescriptors()
    say("ready \(ready)")
    var buffer = [UInt8](repeating: 0, count: 16)
    while true {
        let message = try buffer.withUnsafeMutableBytes { raw in
            Result { () throws(PatchbayError) -> CapsServiceMessage in try service.wait(into: raw) }
        }.get()
        switch message.kind {
        case .request where message.length > 16:
            say("short \(message.messageID)")
            guard Swift.readLine() == "go" else { return }
            do throws(PatchbayError) {
                try service.reply(to: message.messageID, error: .messageTooLong)
                say("refused")
            } catch {
                say(error.errno.name)
            }
        case .dispose:
            let deadline = monotonicNanoseconds() + 5_000_000_000
            while openDescriptors() > ready && monotonicNanoseconds() < deadline { usleep(1_000) }
            say("dispose \(message.messageID) \(openDescriptors())")
        default:
            break
        }
    }
}

/// A hostile client of `name`: puts a 100-byte request carrying 8 descriptors (memory files named
/// "rewrite-kept") and says "put ID"; on a line "rewrite", sends 8 more under a new id, writes that id over the request's entry and
/// says "rewritten ID"; leaves at the end of its input.
func capsRewriteKept(_ name: String) throws(PatchbayError) {
    let broker = try Broker()
    let client = try CapsClient(broker, name: name, waitForService: true)
    // Memory files of a name the service can count.
    func memoryFiles() -> [CInt] { (0..<8).map { _ in (try? makeMemoryFile(name: "rewrite-kept", sealable: false))?.release() ?? -1 } }
    let first = memoryFiles()
    let id = try client.put([UInt8](repeating: 0x61, count: 100), descriptors: first)
    first.forEach { close($0) }
    say("put \(id)")
    guard Swift.readLine() == "rewrite" else { return }
    let second = memoryFiles()
    let rewritten = try client.rewriteWaitingRequest(sending: second)
    second.forEach { close($0) }
    say("rewritten \(rewritten.map { "\($0)" } ?? "none")")
    waitForEndOfInput()
}

/// A service that reads one request and never answers; killed by the test.
func capsServiceHang(_ name: String) throws(PatchbayError) {
    let broker = try Broker()
    let service = try CapsService(broker, name: name, access: [.world])
    say("ready")
    var buffer = [UInt8](repeating: 0, count: 4096)
    while true {
        let message = try buffer.withUnsafeMutableBytes { raw in
            Result { () throws(PatchbayError) -> CapsServiceMessage in try service.wait(into: raw) }
        }.get()
        if message.kind == .request {
            say("got \(message.messageID)")
            break
        }
    }
    waitForEndOfInput()
}

/// Connects, forks; the child finds its inherited port dead, reconnects and calls.
func capsFork(_ name: String) throws(PatchbayError) {
    let broker = try Broker()
    let client = try CapsClient(broker, name: name, waitForService: true)
    _ = try client.call(Array("from parent".utf8))
    let child = fork()
    if child == 0 {
        do {
            _ = try client.put(Array("inherited".utf8))
            say("child put succeeded")
        } catch {
            say("child " + error.errno.name)
        }
        do {
            let fresh = try CapsClient(try Broker(), name: name, waitForService: true)
            say("child reply " + String(decoding: try fresh.call(Array("from child".utf8)), as: UTF8.self))
        } catch {
            say("child reconnect " + error.description)
        }
        _exit(0)
    }
    var status: CInt = 0
    waitpid(child, &status, 0)
    say("parent reply " + String(decoding: try client.call(Array("after fork".utf8)), as: UTF8.self))
}

/// Connects, makes one call, forks; parent and child then each make `count` calls on the same
/// `Broker` at once (each its own shared memory names). Says "parent ok" / "child ok", or the
/// first failure.
/// A CAPS port whose process forks a child that does not exec, then closes the port and lives
/// on (as does the child, until input ends): the child must not keep the port alive. `service`:
/// registers NAME, says "ready", waits for a request, forks, closes, says "closed PID".
/// `client`: connects to NAME, puts a request, says "put ID", forks, closes, says "closed PID".
func capsForkAndGo(_ name: String, side: String) throws(PatchbayError) {
    let broker = try Broker()
    var child: pid_t = -1
    func forkChild() {
        child = fork()
        if child == 0 {
            // Off the test's output pipe, which must end when the parent does.
            let null = open("/dev/null", O_WRONLY)
            dup2(null, 1)
            dup2(null, 2)
            waitForEndOfInput()
            _exit(0)
        }
    }
    if side == "service" {
        let service = try CapsService(broker, name: name, access: [.world])
        say("ready")
        try service.receive { _, _ in }
        forkChild()
        _ = consume service
    } else {
        let client = try CapsClient(broker, name: name)
        say("put \(try client.put(Array("from a parent that forks".utf8)))")
        forkChild()
        _ = consume client
    }
    say("closed \(child)")
    waitForEndOfInput()
}

func brokerFork(count: Int) throws(PatchbayError) {
    let broker = try Broker()
    _ = try broker.status()
    let child = fork()
    let who = child == 0 ? "child" : "parent"
    var outcome = "\(who) ok"
    do {
        for index in 0..<count {
            let name = "/fork-\(getpid())-\(index)"
            let memory = try broker.openSharedMemory(name, options: [.create, .exclusive])
            _ = consume memory
            try broker.unlinkSharedMemory(name)
        }
    } catch {
        outcome = "\(who) " + error.description
    }
    if child == 0 {
        say(outcome)
        _exit(0)
    }
    var status: CInt = 0
    waitpid(child, &status, 0)
    say(outcome)
}

/// Forks, then shares a pipe's write end for the child's pid only and passes the key text down
/// another pipe; the child's first call on the parent's `Broker` is the claim, through which it
/// writes "x". Says "child claimed" (or the child's error) and "parent read x".
func brokerForkClaim() throws(PatchbayError) {
    let broker = try Broker()
    _ = try broker.status()
    var data: [CInt] = [-1, -1], keys: [CInt] = [-1, -1]
    guard pipe(&data) == 0, pipe(&keys) == 0 else { throw PatchbayError(Errno.current, "pipe") }
    let child = fork()
    if child == 0 {
        var text = [UInt8](repeating: 0, count: 64)
        let count = read(keys[0], &text, text.count)
        var outcome = "child claimed"
        do throws(PatchbayError) {
            guard count > 0, let key = Key(String(decoding: text[..<count], as: UTF8.self)) else {
                throw PatchbayError(.invalidArgument, "no key came")
            }
            let claimed = try broker.claim(key)
            guard write(claimed.rawValue, "x", 1) == 1 else { throw PatchbayError(Errno.current, "write") }
        } catch {
            outcome = "child " + error.description
        }
        say(outcome)
        _exit(0)
    }
    let key = try broker.share(rawDescriptor: data[1], claimableBy: .pid(child))
    _ = key.text.withCString { write(keys[1], $0, strlen($0)) }
    var status: CInt = 0
    waitpid(child, &status, 0)
    close(data[1])
    // (Not waiting: the child wrote before it exited, or never will; an unclaimed key keeps the
    // write end open.)
    _ = fcntl(data[0], F_SETFL, O_NONBLOCK)
    var byte: UInt8 = 0
    say(read(data[0], &byte, 1) == 1 ? "parent read \(Character(UnicodeScalar(byte)))" : "parent read nothing")
}

/// Registers a service that sleeps at once (spinning off), forks a child that cancels the
/// inherited port's wait and drops it, waits for the child, says "ready", then echoes requests
/// until its input ends. The parent's port must not notice the child: a new client is announced
/// to it on its broker connection, which only its watching thread turns into a wake-up.
func capsServiceFork(_ name: String) throws(PatchbayError) {
    CapsTuning.spinNanoseconds = 0
    let broker = try Broker()
    var service: CapsService? = try CapsService(broker, name: name, access: [.world])
    // One wait that sleeps and is cancelled, so the watching thread runs before the fork.
    service!.cancelWait()
    do {
        try service!.receive { (_: CapsServiceMessage, _: UnsafeRawBufferPointer) in }
        say("not cancelled")
        return
    } catch {
        guard error.errno == .canceled else { throw error }
    }
    let child = fork()
    if child == 0 {
        service?.cancelWait()
        service = nil
        _exit(0)
    }
    var status: CInt = 0
    waitpid(child, &status, 0)
    startThread {
        waitForEndOfInput()
        exit(0)
    }
    say("ready")
    let port = service!
    while true {
        try port.receive { (message: CapsServiceMessage, payload: UnsafeRawBufferPointer) in
            guard message.kind == .request else { return }
            try? port.reply(to: message.messageID, length: payload.count) { $0.copyMemory(from: payload) }
        }
    }
}

/// Connects `count` clients to `name`, says "holding COUNT", and drops them all when its input
/// ends (then exits).
func capsHold(_ name: String, count: Int) throws(PatchbayError) {
    let broker = try Broker()
    var clients = [try CapsClient(broker, name: name, waitForService: true)]
    while clients.count < count { clients.append(try CapsClient(broker, name: name)) }
    say("holding \(clients.count)")
    waitForEndOfInput()
}

/// Cycles through operations of every subsystem until killed: keys (some left outstanding and
/// printed as "key <text>"), named and anonymous shared memory, /net sockets, CAPS calls to
/// `service`. Whatever instant the SIGKILL lands on, the broker must be left healthy.
func chaos(service: String) throws(PatchbayError) {
    let broker = try Broker()
    let client = try CapsClient(broker, name: service, waitForService: true)
    let null: PatchbaySystem.Descriptor
    do { null = try openFile("/dev/null", flags: O_RDONLY) } catch { throw PatchbayError(error, "no /dev/null") }
    var round = 0
    while true {
        round += 1
        // Keys: one claimed at once (short-lived, so a kill between share and claim leaves
        // nothing for long), one left for the test to claim.
        _ = try broker.claim(try broker.share(rawDescriptor: null.rawValue, timeout: .after(.milliseconds(300))))
        say("key " + (try broker.share(rawDescriptor: null.rawValue, timeout: .after(.seconds(120)))).text)
        // Shared memory.
        let name = "/chaos-\(getpid())-\(round)"
        let memory = try broker.openSharedMemory(name, options: [.create, .exclusive])
        try memory.truncate(to: 1 << 16)
        let mapping = try memory.map()
        mapping.mutableBytes[100] = 1
        try broker.unlinkSharedMemory(name)
        let anonymous = try SharedMemory.anonymous()
        _ = try anonymous.map(length: 8192)
        // /net: a listener and a connection to it, one packet each way.
        let address = "chaos-\(getpid())-\(round)"
        let listener = try Socket.listen(broker, name: address)
        let outgoing = try Socket.connect(broker, to: address)
        let incoming = try listener.accept()
        try outgoing.send(Array("ping".utf8))
        _ = try incoming.receive()
        // CAPS.
        _ = try client.call(Array("chaos \(round)".utf8))
    }
}

/// Traffic through a broker that gets killed: keys, a named object holding a counter, status
/// (`busy`), or one blocking /net accept (`accept`). Prints "running" once the first round is
/// done, then, when the broker dies, "error <errno> at <CLOCK_MONOTONIC ns>" for the first failed
/// call. It then reconnects (polling the socket until a new broker answers; a connection that
/// landed in the dying broker's listen backlog is reset, and is retried too), reopens its object
/// and prints "recovered <counter in the object> <counter it last wrote>".
func traffic(blockInAccept: Bool) -> Never {
    let name = "/traffic-\(getpid())"
    var written: UInt64 = 0
    do throws(PatchbayError) {
        let broker = try Broker()
        let null: PatchbaySystem.Descriptor
        do { null = try openFile("/dev/null", flags: O_RDONLY) } catch { throw PatchbayError(error, "no /dev/null") }
        let memory = try broker.openSharedMemory(name, options: [.create, .exclusive])
        try memory.truncate(to: 4096)
        let mapping = try memory.map()
        var announced = false
        while true {
            _ = try broker.claim(try broker.share(rawDescriptor: null.rawValue))
            written += 1
            mapping.mutableBytes.storeBytes(of: written, as: UInt64.self)
            _ = try broker.status()
            if !announced {
                announced = true
                say("running")
            }
            if blockInAccept {
                let listener = try Socket.listen(broker, name: "traffic-\(getpid())")
                _ = try listener.accept()
                say("accept returned a connection nobody made")
                exit(1)
            }
        }
    } catch {
        say("error \(error.errno.name) at \(monotonicNanoseconds())")
    }
    while true {
        let broker: Broker
        do { broker = try Broker() } catch {
            guard [.connectionRefused, .noSuchFileOrDirectory].contains(error.errno) else {
                say("reconnect failed: \(error)")
                exit(1)
            }
            usleep(1_000)
            continue
        }
        do {
            let memory = try broker.openSharedMemory(name)
            let view = try memory.map(writable: false)
            let found = view.bytes.load(as: UInt64.self)
            say("recovered \(found) \(written)")
            try broker.unlinkSharedMemory(name)
            exit(0)
        } catch {
            // Connected into the listen backlog of a broker still being torn down: try again.
            if [.connectionReset, .brokenPipe].contains(error.errno) { continue }
            say("reopening \(name) failed: \(error)")
            exit(1)
        }
    }
}

/// Claims KEY (a listener's kernel socket someone shared), says "claimed", and at the end of its
/// input tries to adopt it under NAME at the broker, saying "adopted ID" or "refused ERRNO".
func adoptClaimed(_ keyText: String, _ name: String, type kind: Socket.Kind = .seqpacket) throws(PatchbayError) {
    let claimed = try Broker().claim(try Key(parsing: keyText))
    say("claimed")
    waitForEndOfInput()
    do {
        say("adopted \(try Broker().adoptListener(claimed.rawValue, name: name, type: kind))")
    } catch {
        say("refused \(error.errno.name)")
    }
}

/// Registers service NAME, taps it with payloads, puts one request on it from a client of its
/// own, then reports that request `count` times (256 payload bytes each) as fast as it can;
/// says "flooded".
func capsTapFlood(_ name: String, count: Int) throws(PatchbayError) {
    let broker = try Broker()
    let service = try CapsService(broker, name: name, access: [.world])
    let client = try CapsClient(broker, name: name)
    let id = try client.put(Array(repeating: 0x41, count: 256))
    let tap = try CapsTap(broker, serviceID: service.serviceID, mode: .payloads)
    let head = [UInt8](repeating: 0x42, count: CapsTapRecord.payloadLimit)
    for _ in 0..<count { tap.record(.request, id, length: 256, head: head) }
    say("flooded")
}

/// Tries to become the tap of service ID (someone else's), saying "tapped" or "refused ERRNO".
func capsTap(_ id: UInt64) {
    do {
        _ = try CapsTap(try Broker(), serviceID: id, mode: .payloads)
        say("tapped")
    } catch {
        say("refused \(error.errno.name)")
    }
}

/// A CAPS service (world) NAME whose receiving thread has a stack of 64 KiB: says "ready", waits
/// for "go" on stdin, then answers one request with its own bytes and says "served". Whatever a
/// client queued before "go" is taken in one go: entries the service drops must not each cost it
/// a stack frame (a client could otherwise crash it).
func capsServeOnSmallStack(_ name: String) throws(PatchbayError) {
    let service = try CapsService(try Broker(), name: name, access: [.world])
    say("ready")
    guard readLine() == "go" else { return }
    final class Outcome: @unchecked Sendable { var text = "none" }
    let outcome = Outcome()
    let box = Unmanaged.passRetained(Box { () in
        do {
            try service.receive { (message: CapsServiceMessage, payload: UnsafeRawBufferPointer) in
                guard message.kind == .request else { outcome.text = "unexpected \(message.kind)"; return }
                do { try service.reply(to: message.messageID, Array(payload)); outcome.text = "served" } catch {
                    outcome.text = "reply failed: \(error)"
                }
            }
        } catch {
            outcome.text = "receive failed: \(error)"
        }
    })
    var attributes = pthread_attr_t()
    pthread_attr_init(&attributes)
    pthread_attr_setstacksize(&attributes, 64 << 10)
    var thread = pthread_t()
    let created = pthread_create(&thread, &attributes, { raw in
        Unmanaged<Box>.fromOpaque(raw!).takeRetainedValue().body()
        return nil
    }, box.toOpaque())
    pthread_attr_destroy(&attributes)
    guard created == 0 else { throw PatchbayError(Errno(rawValue: created), "pthread_create") }
    pthread_join(thread, nil)
    say(outcome.text)
}

private final class Box: @unchecked Sendable {
    let body: () -> Void
    init(_ body: @escaping () -> Void) { self.body = body }
}

func main() -> CInt {
    let arguments = Array(CommandLine.arguments.dropFirst())
    do {
        switch arguments.first {
        case "claim-on-eof" where arguments.count == 2:
            try claimOnEndOfInput(arguments[1])
        case "reopen-writable" where arguments.count == 2:
            try reopenWritable(arguments[1])
        case "claim-with-full-table" where arguments.count == 2:
            try claimWithFullTable(arguments[1])
        case "shm-exchange" where arguments.count == 2:
            try sharedMemoryExchange(keyText: arguments[1])
        case "shm-named-exchange" where arguments.count == 2:
            try namedExchange(arguments[1])
        case "shm-first-map" where arguments.count == 3:
            try firstMapping(keyText: arguments[1], length: Int(arguments[2]) ?? 0)
        case "shm-hold-lock" where arguments.count == 2:
            try holdReadLock(arguments[1])
        case "shm-touch-past-end" where arguments.count == 2:
            try touchPastEnd(arguments[1])
        case "caps-client" where arguments.count == 3:
            try capsClient(arguments[1], count: Int(arguments[2]) ?? 1)
        case "caps-forced-sleep" where arguments.count == 4 && Int(arguments[2]) != nil && Int(arguments[3]) != nil:
            try capsForcedSleep(arguments[1], count: Int(arguments[2])!, window: Int(arguments[3])!)
        case "caps-short-reader" where arguments.count == 2:
            try capsShortReader(arguments[1])
        case "caps-rewrite-kept" where arguments.count == 2:
            try capsRewriteKept(arguments[1])
        case "caps-scribble-service-words" where arguments.count == 2:
            try capsScribbleServiceWords(arguments[1])
        case "caps-forge-dispose" where arguments.count == 2:
            try capsForgeDispose(arguments[1])
        case "caps-service-fork" where arguments.count == 2:
            try capsServiceFork(arguments[1])
        case "caps-serve-small-stack" where arguments.count == 2:
            try capsServeOnSmallStack(arguments[1])
        case "caps-hold" where arguments.count == 3 && Int(arguments[2]) != nil:
            try capsHold(arguments[1], count: Int(arguments[2])!)
        case "caps-wake-storm" where arguments.count == 2:
            try capsWakeStorm(arguments[1])
        case "caps-woken-wait" where arguments.count == 3 && UInt64(arguments[2]) != nil:
            try capsWokenWait(arguments[1], spin: UInt64(arguments[2])!)
        case "caps-put-and-hang" where arguments.count == 2:
            try capsPutAndHang(arguments[1])
        case "caps-flood" where arguments.count == 3 && Int(arguments[2]) != nil:
            try capsFlood(arguments[1], Int(arguments[2])!)
        case "caps-churn" where arguments.count == 4 && Int(arguments[2]) != nil && Int(arguments[3]) != nil:
            try capsChurn(arguments[1], held: Int(arguments[2])!, cycles: Int(arguments[3])!)
        case "caps-forge" where arguments.count == 2:
            try capsForge(arguments[1])
        case "caps-service-hang" where arguments.count == 2:
            try capsServiceHang(arguments[1])
        case "caps-tap-flood" where arguments.count == 3 && Int(arguments[2]) != nil:
            try capsTapFlood(arguments[1], count: Int(arguments[2])!)
        case "caps-tap" where arguments.count == 2 && UInt64(arguments[1]) != nil:
            capsTap(UInt64(arguments[1])!)
        case "caps-fork" where arguments.count == 2:
            try capsFork(arguments[1])
        case "traffic" where arguments.count == 2 && ["busy", "accept"].contains(arguments[1]):
            traffic(blockInAccept: arguments[1] == "accept")
        case "chaos" where arguments.count == 2:
            try chaos(service: arguments[1])
        case "adopt-claimed" where arguments.count == 3:
            try adoptClaimed(arguments[1], arguments[2])
        case "adopt-claimed" where arguments.count == 4 && Socket.Kind(rawValue: arguments[3]) != nil:
            try adoptClaimed(arguments[1], arguments[2], type: Socket.Kind(rawValue: arguments[3])!)
        case "share-wrapped-lingering" where arguments.count == 3 && UInt16(arguments[1]) != nil && Int32(arguments[2]) != nil:
            try shareWrappedLingering(port: UInt16(arguments[1])!, seconds: Int32(arguments[2])!)
        case "share-lingering" where arguments.count == 4 && UInt16(arguments[1]) != nil && Int64(arguments[2]) != nil
                                      && Int32(arguments[3]) != nil:
            try shareLingering(port: UInt16(arguments[1])!, milliseconds: Int64(arguments[2])!, seconds: Int32(arguments[3])!)
        case "caps-fork-and-go" where arguments.count == 3 && ["service", "client"].contains(arguments[2]):
            try capsForkAndGo(arguments[1], side: arguments[2])
        case "caps-stray-flood" where arguments.count == 4 && UInt16(arguments[2]) != nil && Int(arguments[3]) != nil:
            try capsStrayFlood(service: arguments[1], port: UInt16(arguments[2])!, messages: Int(arguments[3])!)
        case "net-send-lingering" where arguments.count == 3 && UInt16(arguments[2]) != nil:
            try netSendLingering(name: arguments[1], port: UInt16(arguments[2])!)
        case "net-accept-many" where arguments.count == 3 && Int(arguments[2]).map({ $0 > 1 }) == true:
            try netAcceptMany(arguments[1], count: Int(arguments[2])!)
        case "net-handle-lingering" where arguments.count == 3 && UInt16(arguments[1]) != nil && Int32(arguments[2]) != nil:
            try netHandleLingering(port: UInt16(arguments[1])!, seconds: Int32(arguments[2])!)
        case "net-handle-shutdown" where arguments.count == 1:
            try netHandleShutdown()
        case "caps-wake-lingering" where arguments.count == 3 && UInt16(arguments[2]) != nil:
            try capsWakeLingering(service: arguments[1], port: UInt16(arguments[2])!)
        case "caps-wake-lingering" where arguments.count == 4 && UInt16(arguments[2]) != nil && Int32(arguments[3]) != nil:
            try capsWakeLingering(service: arguments[1], port: UInt16(arguments[2])!, seconds: Int32(arguments[3])!, onGo: true)
        case "caps-attach-lingering" where arguments.count == 4 && UInt16(arguments[2]) != nil:
            try capsAttachLingering(service: arguments[1], port: UInt16(arguments[2])!, how: arguments[3])
        case "net-listener-with-lingering" where arguments.count == 2 && UInt16(arguments[1]) != nil:
            try netListenerWithLingering(port: UInt16(arguments[1])!)
        case "flood-connections-behind-lingering" where arguments.count == 3 && UInt16(arguments[1]) != nil && Int(arguments[2]) != nil:
            try floodConnectionsBehindLingering(port: UInt16(arguments[1])!, connections: Int(arguments[2])!)
        case "admit-lingering" where arguments.count == 2 && UInt16(arguments[1]) != nil:
            try admitLingering(port: UInt16(arguments[1])!)
        case "pin-addrs" where arguments.count == 2 && Int(arguments[1]) != nil:
            try pinAddressLists(count: Int(arguments[1])!)
        case "wedge-broker" where arguments.count == 3 && UInt16(arguments[1]) != nil && Int32(arguments[2]) != nil:
            try wedgeBroker(port: UInt16(arguments[1])!, seconds: Int32(arguments[2])!)
        case "refused-behind-lingering" where arguments.count == 3 && UInt16(arguments[1]) != nil && Int(arguments[2]) != nil:
            try refusedBehindLingering(port: UInt16(arguments[1])!, connections: Int(arguments[2])!)
        case "adopt-lingering" where arguments.count == 2 && UInt16(arguments[1]) != nil:
            try adoptLingering(port: UInt16(arguments[1])!)
        case "flood-behind-lingering" where arguments.count == 3 && UInt16(arguments[1]) != nil && Int(arguments[2]) != nil:
            try floodBehindLingering(port: UInt16(arguments[1])!, limit: Int(arguments[2])!)
        case "broker-fork" where arguments.count == 2 && Int(arguments[1]) != nil:
            try brokerFork(count: Int(arguments[1])!)
        case "caps-wedge-and-flood" where arguments.count == 4 && UInt16(arguments[2]) != nil && Int(arguments[3]) != nil:
            try capsWedgeAndFlood(arguments[1], port: UInt16(arguments[2])!, count: Int(arguments[3])!)
        case "caps-wedge-and-churn" where arguments.count == 4 && UInt16(arguments[2]) != nil && Int(arguments[3]) != nil:
            try capsWedgeAndChurn(arguments[1], port: UInt16(arguments[2])!, count: Int(arguments[3])!)
        case "caps-open-with-full-table" where arguments.count == 4 && ["client", "service"].contains(arguments[2]) && Int(arguments[3]) != nil:
            try capsOpenWithFullTable(arguments[1], side: arguments[2], spare: Int(arguments[3])!)
        case "net-accept-with-full-table" where arguments.count == 3 && Int(arguments[2]) != nil:
            try netAcceptWithFullTable(arguments[1], spare: Int(arguments[2])!)
        case "caps-serve-full" where arguments.count == 2:
            try capsServeFull(arguments[1])
        case "caps-connect-many" where arguments.count == 3 && Int(arguments[2]) != nil:
            try capsConnectMany(arguments[1], count: Int(arguments[2])!)
        case "caps-exec-paced" where arguments.count == 4 && UInt16(arguments[2]) != nil && Int(arguments[3]) != nil:
            try capsExecRace(arguments[1], port: UInt16(arguments[2])!, count: Int(arguments[3])!, seconds: 1, pause: 1_200_000)
        case "caps-exec-race" where arguments.count == 4 && UInt16(arguments[2]) != nil && Int(arguments[3]) != nil:
            try capsExecRace(arguments[1], port: UInt16(arguments[2])!, count: Int(arguments[3])!)
        case "net-bind-keep" where arguments.count == 2:
            try netBindKeep(arguments[1])
        case "net-accept-keep" where arguments.count == 2:
            try netAcceptKeep(arguments[1])
        case "net-accept-left-behind" where arguments.count == 2:
            try netAcceptLeftBehind(arguments[1])
        case "refuse-user-raw" where arguments.count == 2 && UInt32(arguments[1]) != nil:
            try refuseUserRaw(UInt32(arguments[1])!)
        case "caps-register" where arguments.count >= 2:
            try capsRegister(Array(arguments.dropFirst()))
        case "caps-register-many" where arguments.count == 3 && Int(arguments[2]) != nil:
            try capsRegisterMany(arguments[1], count: Int(arguments[2])!)
        case "caps-serve-wedging" where arguments.count == 3 && UInt16(arguments[2]) != nil:
            try capsServeWedging(arguments[1], port: UInt16(arguments[2])!)
        case "caps-call-flood" where (arguments.count == 4 || arguments.count == 5 && arguments[4] == "wait-reply")
                                      && Int(arguments[2]) != nil && Int32(arguments[3]) != nil:
            try capsCallFlood(arguments[1], count: Int(arguments[2])!, uid: Int32(arguments[3])!, waiting: arguments.count == 5)
        case "pipeline-metrics" where arguments.count == 3 && Int(arguments[1]) != nil && Int(arguments[2]) != nil:
            try pipelineMetrics(connections: Int(arguments[1])!, each: Int(arguments[2])!)
        case "open-monitors" where arguments.count == 2 && Int(arguments[1]) != nil:
            try openMonitors(Int(arguments[1])!)
        case "send-17-with-lingering" where arguments.count == 2 && UInt16(arguments[1]) != nil:
            try sendSeventeenWithLingering(port: UInt16(arguments[1])!)
        case "claim-through-orphaned-connection" where arguments.count == 1:
            try claimThroughOrphanedConnection()
        case "net-connect-hold" where arguments.count == 3 && Int(arguments[2]) != nil:
            try netConnectHold(arguments[1], count: Int(arguments[2])!)
        case "connect-fill" where arguments.count == 1:
            try connectFill()
        case "listen-full" where arguments.count == 2:
            try listenFull(arguments[1])
        case "listen-and-drop" where arguments.count == 2:
            try listenAndDrop(arguments[1])
        case "connect-to" where arguments.count == 2 || (arguments.count == 3 && Int(arguments[2]) != nil):
            connectTo(arguments[1], times: arguments.count == 3 ? Int(arguments[2])! : nil)
        case "connect-churn" where arguments.count == 2 && Int(arguments[1]) != nil:
            connectChurn(Int(arguments[1])!)
        case "broker-fork-claim" where arguments.count == 1:
            try brokerForkClaim()
        case "claim-after-exec" where arguments.count >= 2 && arguments[1].hasPrefix("/"):
            try claimAfterExec(Array(arguments.dropFirst()))
        case "mkdir-loop" where arguments.count == 2:
            // Makes the directory, says so, and makes it again whenever it is gone, until killed.
            _ = mkdir(arguments[1], 0o777)
            say("looping")
            while true { _ = mkdir(arguments[1], 0o777) }
        case "lease-own-proc-and-connect" where arguments.count == 2:
            try leaseOwnProcAndConnect(arguments[1])
        case "shm-lease" where arguments.count == 2:
            try sharedMemoryLease(arguments[1])
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

private func connectedSocket(_ path: String) throws(PatchbayError) -> SeqpacketSocket {
    do throws(Errno) {
        let socket = try SeqpacketSocket()
        try socket.connect(path: path)
        return socket
    } catch {
        throw PatchbayError(error, "cannot connect to \(path)")
    }
}

/// Holds write leases on this process's own `/proc/self/stat`, `comm` and `status` (its user's
/// files), says "leased", then connects a plain socket to the broker at `path` (which reads
/// those files of the process that connected when it accepts) and says "connected"; on
/// "release?" it says whether it still holds all three ("held 3"), and lets them go.
func leaseOwnProcAndConnect(_ path: String) throws(PatchbayError) {
    let F_SETLEASE: CInt = 1024, F_GETLEASE: CInt = 1025
    signal(SIGIO, SIG_IGN)
    var leased: [CInt] = []
    for name in ["stat", "comm", "status"] {
        let fd = open("/proc/self/\(name)", O_RDONLY | O_CLOEXEC)
        guard fd >= 0, fcntl(fd, F_SETLEASE, CInt(F_WRLCK)) == 0 else { throw PatchbayError(Errno.current, "cannot lease /proc/self/\(name)") }
        leased.append(fd)
    }
    say("leased")
    let socket = try connectedSocket(path)
    say("connected")
    while let line = readLine(), line == "release?" {
        // A lease being broken still answers F_GETLEASE with the type it is broken to; one the
        // kernel removed (its break time passed) answers F_UNLCK.
        let held = leased.filter { fcntl($0, F_GETLEASE) != CInt(F_UNLCK) }.count
        for fd in leased { _ = fcntl(fd, F_SETLEASE, CInt(F_UNLCK)) }
        say("held \(held)")
    }
    withExtendedLifetime(socket) {}
}

/// Makes the named object `name` (mode 0644) and holds a write lease on its file (`F_SETLEASE`,
/// its owner's right): says "leased", then for each line on stdin says "lease TYPE" (what
/// `F_GETLEASE` reports: the type the lease is being broken to, once an open by someone else
/// conflicted with it: `F_RDLCK` for a read-only open, `F_UNLCK` for a read-write one),
/// and on "release" lets the lease go ("released").
func sharedMemoryLease(_ name: String) throws(PatchbayError) {
    let F_SETLEASE: CInt = 1024, F_GETLEASE: CInt = 1025  // fcntl.h's, with _GNU_SOURCE
    signal(SIGIO, SIG_IGN)  // a lease break's notice, which would otherwise end the process
    let broker = try Broker()
    // The broker keeps no copy: this process's descriptor is the file's only open one.
    _ = try broker.openSharedMemory(name, options: [.create, .exclusive], mode: 0o644)
    let object = try broker.openSharedMemory(name)
    let fd = object.descriptor.rawValue
    guard fcntl(fd, F_SETLEASE, CInt(F_WRLCK)) == 0 else { throw PatchbayError(Errno.current, "F_SETLEASE failed") }
    say("leased")
    while let line = readLine() {
        if line == "release" {
            guard fcntl(fd, F_SETLEASE, CInt(F_UNLCK)) == 0 else { throw PatchbayError(Errno.current, "F_SETLEASE failed") }
            say("released")
            continue
        }
        let type = fcntl(fd, F_GETLEASE)
        say("lease " + (type == CInt(F_WRLCK) ? "F_WRLCK" : type == CInt(F_RDLCK) ? "F_RDLCK" : type == CInt(F_UNLCK) ? "F_UNLCK" : "error"))
    }
    withExtendedLifetime(object) {}
}

exit(main())
