// SOCK_SEQPACKET sockets: message boundaries, SCM_RIGHTS, truncation flags, peer credentials.
import Glibc
import PatchbaySystem
import SystemPackage
import Testing

@Suite("SeqpacketSocket: messages and descriptor passing")
struct SeqpacketTests {
    @Test("a pipe's write end sent with SCM_RIGHTS writes into the sender's pipe")
    func passPipe() throws {
        let pair = try SeqpacketSocket.pair()
        let pipe = try Pipe()
        try pair.first.send(Array("here".utf8), descriptors: [pipe.writeEnd.rawValue])
        _ = consume pipe.writeEnd  // the sender's copy is gone; only the one in flight remains

        let buffer = Buffer(64)
        var message = try pair.second.receive(into: buffer.raw)
        let summary = message.summary
        #expect(summary == MessageSummary(length: 4, descriptors: 1))
        #expect(buffer.prefix(4) == Array("here".utf8))
        let writer = try required(message.descriptors.takeFirst())
        let left = message.descriptors.count
        let another = message.descriptors.takeFirst() != nil
        #expect(left == 0 && !another)
        // MSG_CMSG_CLOEXEC: the received descriptor does not leak into children.
        #expect(try writer.isCloseOnExec())
        #expect(try writer.fileKind() == .pipe)
        #expect(try writer.accessMode() == O_WRONLY)

        try writer.writeAll(Array("through the socket".utf8))
        _ = consume writer
        #expect(try pipe.readEnd.readToEnd() == Array("through the socket".utf8))
    }

    @Test("a memfd passed across: bytes written through one side's mapping are read on the other")
    func passMemoryFile() throws {
        let pair = try SeqpacketSocket.pair()
        let memory = try makeMemoryFile(name: "patchbay-systest-pass", sealable: true)
        try memory.truncate(to: pageSize)
        try pair.first.send([1], descriptors: [memory.rawValue])

        let buffer = Buffer(8)
        var message = try pair.second.receive(into: buffer.raw)
        let received = try required(message.descriptors.takeFirst())
        #expect(received.rawValue != memory.rawValue)
        #expect(Descriptor.sameOpenFile(received.rawValue, memory.rawValue) == true)
        #expect(try received.size() == pageSize)

        let mapping = try Mapping(received, length: pageSize, writable: true)
        let text = Array("shared pages".utf8)
        mapping.mutableBytes.copyBytes(from: text)
        #expect(try read(text.count, from: memory, at: 0) == text)
    }

    @Test("up to 16 descriptors travel in order; a 17th is EINVAL before anything is sent")
    func manyDescriptors() throws {
        let pair = try SeqpacketSocket.pair()
        let memory = try makeMemoryFile(name: "patchbay-systest-many", sealable: false)
        // 16 copies of distinct open files: pipes' write ends, each told apart by what it writes.
        var readEnds: [CInt] = []
        var writeEnds: [CInt] = []
        for _ in 0..<maximumDescriptorsPerMessage {
            let pipe = try Pipe()
            readEnds.append(pipe.readEnd.release())
            writeEnds.append(pipe.writeEnd.release())
        }
        defer { for fd in readEnds + writeEnds { close(fd) } }

        expectErrno(.invalidArgument) { () throws(Errno) in
            try pair.first.send([0], descriptors: writeEnds + [memory.rawValue])
        }
        // Nothing was sent by the refused call.
        #expect(readNow(pair.second.rawValue) == nil)

        try pair.first.send([7], descriptors: writeEnds)
        let buffer = Buffer(8)
        var message = try pair.second.receive(into: buffer.raw)
        let summary = message.summary
        #expect(summary == MessageSummary(length: 1, descriptors: 16))
        var index = 0
        while let writer = message.descriptors.takeFirst() {
            try writer.writeAll([UInt8(index)])
            index += 1
        }
        #expect(index == 16)
        for (position, readEnd) in readEnds.enumerated() {
            #expect(readNow(readEnd) == [UInt8(position)], "descriptor \(position) arrived out of order")
        }
    }

    @Test("descriptors a message still holds are closed when the message ends")
    func unclaimedDescriptorsClose() throws {
        let pair = try SeqpacketSocket.pair()
        let first = try Pipe()
        let second = try Pipe()
        let third = try Pipe()
        try pair.first.send([1], descriptors: [first.writeEnd.rawValue, second.writeEnd.rawValue,
                                               third.writeEnd.rawValue])
        _ = consume first.writeEnd
        _ = consume second.writeEnd
        _ = consume third.writeEnd
        let buffer = Buffer(8)
        let kept: Descriptor
        do {
            var message = try pair.second.receive(into: buffer.raw)
            kept = try required(message.descriptors.takeFirst())
            // The two still in the message are open: their pipes have a writer.
            #expect(readNow(second.readEnd.rawValue) == nil)
            #expect(readNow(third.readEnd.rawValue) == nil)
        }
        #expect(reachesEndOfFile(second.readEnd.rawValue), "ReceivedDescriptors must close what it still holds")
        #expect(reachesEndOfFile(third.readEnd.rawValue))
        #expect(readNow(first.readEnd.rawValue) == nil, "the descriptor taken out stays open")
        _ = consume kept
        #expect(reachesEndOfFile(first.readEnd.rawValue))
    }

    @Test("more descriptors than a request may carry: all of them arrive (none closed by the kernel inside recvmsg, in the receiving thread), and are closed with the message")
    func descriptorsBeyondTheRequestLimit() throws {
        let pair = try SeqpacketSocket.pair()
        let total = 20
        var readEnds: [CInt] = []
        var writeEnds: [CInt] = []
        for _ in 0..<total {
            let pipe = try Pipe()
            readEnds.append(pipe.readEnd.release())
            writeEnds.append(pipe.writeEnd.release())
        }
        defer { for fd in readEnds { close(fd) } }
        // The library refuses to send more than 16, so this sender writes its own SCM_RIGHTS.
        try sendRawRights(pair.first.rawValue, payload: [9, 9, 9], descriptors: writeEnds)
        for fd in writeEnds { close(fd) }

        let buffer = Buffer(8)
        do {
            let message = try pair.second.receive(into: buffer.raw)
            let summary = message.summary
            #expect(summary == MessageSummary(length: 3, descriptorsTruncated: false, descriptors: total))
            for index in 0..<total {
                #expect(readNow(readEnds[index]) == nil, "pipe \(index) should still have its writer")
            }
        }
        for index in 0..<total {
            #expect(reachesEndOfFile(readEnds[index]), "pipe \(index)'s writer leaked")
        }
    }

    @Test("a message longer than the buffer is cut (MSG_TRUNC); boundaries are kept")
    func messageTruncationAndBoundaries() throws {
        let pair = try SeqpacketSocket.pair()
        try pair.first.send(Array(repeating: 0xAB, count: 100))
        try pair.first.send([1, 2, 3])
        try pair.first.send([])
        try pair.first.send([4])

        let buffer = Buffer(10)
        let long = try pair.second.receive(into: buffer.raw)
        let longSummary = long.summary
        #expect(longSummary == MessageSummary(length: 10, truncated: true))
        #expect(buffer.prefix(10) == Array(repeating: 0xAB, count: 10))
        // The rest of the long message is gone: the next receive is the next message.
        let short = try pair.second.receive(into: buffer.raw)
        let shortSummary = short.summary
        #expect(shortSummary == MessageSummary(length: 3))
        #expect(buffer.prefix(3) == [1, 2, 3])
        let empty = try pair.second.receive(into: buffer.raw)
        let emptySummary = empty.summary
        #expect(emptySummary == MessageSummary(length: 0))
        let last = try pair.second.receive(into: buffer.raw)
        let lastSummary = last.summary
        #expect(lastSummary == MessageSummary(length: 1))
        #expect(buffer.prefix(1) == [4])
    }

    @Test("nothing queued: a non-blocking receive is EAGAIN; after the peer closes it reads 0")
    func emptyAndClosed() throws {
        let pair = try SeqpacketSocket.pair()
        let buffer = Buffer(8)
        expectErrno(.resourceTemporarilyUnavailable) { () throws(Errno) in
            _ = try pair.second.receive(into: buffer.raw, nonblocking: true).length
        }
        let second = pair.second
        _ = consume pair.first
        let closed = try second.receive(into: buffer.raw)
        let closedSummary = closed.summary
        #expect(closedSummary == MessageSummary(length: 0))
        #expect(UnixSocket.peerHasShutDown(second.rawValue))
        // Sending to a closed peer is EPIPE, with no SIGPIPE to kill this process.
        expectErrno(.brokenPipe) { () throws(Errno) in try second.send([1]) }
    }

    @Test("a full socket makes a non-blocking send EAGAIN")
    func fullSocket() throws {
        let pair = try SeqpacketSocket.pair()
        let chunk = [UInt8](repeating: 1, count: 4096)
        var sent = 0
        var failure: Errno?
        while failure == nil && sent < 100_000 {
            do throws(Errno) {
                try pair.first.send(chunk, nonblocking: true)
                sent += 1
            } catch {
                failure = error
            }
        }
        #expect(failure == .resourceTemporarilyUnavailable)
        #expect(sent > 0)
    }

    @Test("raw send and receive on borrowed numbers carry bytes and descriptors")
    func rawSendAndReceive() throws {
        let pair = try SeqpacketSocket.pair()
        let pipe = try Pipe()
        let payload: [UInt8] = [5, 6, 7, 8]
        let fds = [pipe.writeEnd.rawValue]
        let sent = payload.withUnsafeBytes { raw in
            fds.withUnsafeBufferPointer { SeqpacketSocket.sendRaw(pair.first.rawValue, raw, $0) }
        }
        #expect(sent == 4)
        let buffer = Buffer(16)
        let received = SeqpacketSocket.receiveRaw(pair.second.rawValue, buffer.raw)
        let got = try #require(received)
        #expect(got.length == 4 && buffer.prefix(4) == payload)
        #expect(got.descriptors.count == 1)
        for fd in got.descriptors { #expect(close(fd) == 0) }
        let nothing = SeqpacketSocket.receiveRaw(pair.second.rawValue, buffer.raw, nonblocking: true)
        #expect(nothing == nil && Errno.current == .resourceTemporarilyUnavailable)
    }
}

@Suite("SeqpacketSocket: addresses and peer credentials")
struct SeqpacketAddressTests {
    @Test("a listener at a path accepts; both ends see this process's pid, uid, gid and groups")
    func peerCredentialsOverPath() throws {
        let directory = makeTemporaryDirectory()
        defer { removeTree(directory) }
        let path = directory + "/socket"
        let listener = try SeqpacketSocket()
        #expect(try !listener.isListening())
        try listener.bind(path: path)
        try listener.listen(backlog: 4)
        #expect(try listener.isListening())
        #expect(try listener.socketType() == CInt(SOCK_SEQPACKET.rawValue))

        let client = try SeqpacketSocket()
        try client.connect(path: path)
        let server = try listener.accept(nonblocking: false)
        #expect(try server.descriptor.isCloseOnExec())
        #expect(try !server.isListening())

        for credentials in [try server.peerCredentials(), try client.peerCredentials()] {
            #expect(credentials.pid == getpid())
            #expect(credentials.uid == geteuid())
            #expect(credentials.gid == getegid())
            #expect(Set(credentials.groups) == Set(currentGroups()))
            #expect(credentials.isMember(of: getegid()))
        }
        try client.send(Array("hello".utf8))
        let buffer = Buffer(16)
        let message = try server.receive(into: buffer.raw)
        let summary = message.summary
        #expect(summary == MessageSummary(length: 5))
        #expect(buffer.prefix(5) == Array("hello".utf8))

        // `nonblocking` is the new socket's mode; EAGAIN needs a non-blocking listener.
        try client2Connect(path)
        let second = try listener.accept(nonblocking: true)
        #expect(fcntl(second.rawValue, F_GETFL) & O_NONBLOCK != 0)
        #expect(fcntl(server.rawValue, F_GETFL) & O_NONBLOCK == 0)
        try listener.descriptor.setNonblocking(true)
        expectErrno(.resourceTemporarilyUnavailable) { () throws(Errno) in _ = try listener.accept(nonblocking: false) }
    }

    @Test("socketpair peers report this process too")
    func peerCredentialsOfPair() throws {
        let pair = try SeqpacketSocket.pair()
        let credentials = try pair.first.peerCredentials()
        #expect(credentials == PeerCredentials(pid: getpid(), uid: geteuid(), gid: getegid(),
                                               groups: credentials.groups, startTime: processStartTime(of: getpid()),
                                               processInode: credentials.processInode, command: credentials.command))
        #expect(credentials.command == processStat(of: getpid())?.command)
        #expect(credentials.startTime != nil)
        #expect(Set(credentials.groups) == Set(currentGroups()))
    }

    @Test("peer credentials of a socket that is no socket, or unconnected, fail with the kernel's errno")
    func peerCredentialsErrors() throws {
        let pipe = try Pipe()
        let notSocket = SeqpacketSocket(adopting: pipe.readEnd)
        expectErrno(.notSocket) { () throws(Errno) in _ = try notSocket.peerCredentials() }
        expectErrno(.notSocket) { () throws(Errno) in _ = try notSocket.socketType() }
        // An unconnected socket has no peer: SO_PEERGROUPS reports ENODATA.
        let unconnected = try SeqpacketSocket()
        expectErrno(Errno(rawValue: ENODATA)) { () throws(Errno) in _ = try unconnected.peerCredentials() }
    }

    @Test("isMember covers the primary group and the supplementary ones, nothing else")
    func membership() {
        let credentials = PeerCredentials(pid: 1, uid: 1000, gid: 100, groups: [10, 20])
        #expect(credentials.isMember(of: 100))
        #expect(credentials.isMember(of: 10) && credentials.isMember(of: 20))
        #expect(!credentials.isMember(of: 1000))
        #expect(!credentials.isMember(of: 0))
    }

    @Test("addressing errors: ENOENT, ECONNREFUSED, EADDRINUSE, ENAMETOOLONG, EINVAL")
    func addressErrors() throws {
        let directory = makeTemporaryDirectory()
        defer { removeTree(directory) }
        let socket = try SeqpacketSocket()
        expectErrno(.noSuchFileOrDirectory) { () throws(Errno) in try socket.connect(path: directory + "/nobody") }

        // Bound but not listening: refused.
        let bound = try SeqpacketSocket()
        try bound.bind(path: directory + "/bound")
        let caller = try SeqpacketSocket()
        expectErrno(.connectionRefused) { () throws(Errno) in try caller.connect(path: directory + "/bound") }
        let again = try SeqpacketSocket()
        expectErrno(.addressInUse) { () throws(Errno) in try again.bind(path: directory + "/bound") }

        // sun_path holds 107 bytes and a NUL.
        let longest = directory + "/" + String(repeating: "x", count: 107 - directory.utf8.count - 1)
        #expect(longest.utf8.count == 107)
        let fits = try SeqpacketSocket()
        try fits.bind(path: longest)
        let tooLong = try SeqpacketSocket()
        expectErrno(.fileNameTooLong) { () throws(Errno) in try tooLong.bind(path: longest + "y") }
        expectErrno(.fileNameTooLong) { () throws(Errno) in try tooLong.connect(path: longest + "y") }
        expectErrno(.invalidArgument) { () throws(Errno) in try tooLong.bind(path: "") }
        expectErrno(.invalidArgument) { () throws(Errno) in try tooLong.bind(path: directory + "/a\u{0}b") }
    }

    @Test("a stream UnixSocket reports end of file only after the peer shut down and the data was read")
    func streamShutdown() throws {
        let directory = makeTemporaryDirectory()
        defer { removeTree(directory) }
        let listener = try UnixSocket(.stream)
        try listener.bind(path: directory + "/s")
        try listener.listen(backlog: 1)
        let client = try UnixSocket(.stream)
        try client.connectWithoutBlocking(path: directory + "/s")
        let server = try listener.accept()
        #expect(!UnixSocket.peerHasShutDown(server.rawValue))
        try write([1, 2, 3], to: client.descriptor)
        try client.shutdownWriting()
        #expect(UnixSocket.peerHasShutDown(server.rawValue))
        let buffer = Buffer(8)
        let data = try server.receive(into: buffer.raw)
        #expect(data.count == 3 && data.messageLength == 3)
        let end = try server.receive(into: buffer.raw)
        #expect(end.count == 0)
        #expect(UnixSocket.zeroLengthReadIsEndOfFile(server.rawValue))
    }
}

/// Connects a throwaway client to `path` (the listener keeps the connection queued).
private func client2Connect(_ path: String) throws {
    let socket = try SeqpacketSocket()
    try socket.connect(path: path)
}

/// `sendmsg` with one SCM_RIGHTS message of up to 253 descriptors (the library caps at 16).
func sendRawRights(_ socket: CInt, payload: [UInt8], descriptors: [CInt]) throws {
    let sent = payload.withUnsafeBytes { raw in descriptors.withUnsafeBufferPointer { SeqpacketSocket.sendRights(socket, raw, $0) } }
    if sent < 0 { throw Errno.current }
}

@Suite("NetHandleTests: discarding what is written to a handle")
struct NetHandleTests {
    @Test("discarding packets reads each one and hands the descriptors any carried to the caller (to close on a thread of its choosing) instead of letting the kernel close them in the reading thread")
    func discardHandsDescriptorsOver() throws {
        let pair = try SeqpacketSocket.pair()
        var ends: [CInt] = [-1, -1]
        #expect(pipe(&ends) == 0)
        defer { close(ends[0]); close(ends[1]) }
        var pipeInfo = stat()
        #expect(fstat(ends[0], &pipeInfo) == 0)
        let writer = pair.second.descriptor.rawValue
        let byte: [UInt8] = [1]
        for carried in [[ends[0]], [], [ends[0], ends[1]]] {
            let sent = byte.withUnsafeBytes { raw in carried.withUnsafeBufferPointer { SeqpacketSocket.sendRaw(writer, raw, $0) } }
            #expect(sent == 1)
        }
        var handed: [CInt] = []
        #expect(pair.first.descriptor.discardPendingPackets(maximumPackets: 64) { handed.append($0) } == 3)
        #expect(handed.count == 3)
        for fd in handed {
            var info = stat()
            #expect(fstat(fd, &info) == 0 && info.st_ino == pipeInfo.st_ino && info.st_dev == pipeInfo.st_dev)
            #expect(fcntl(fd, F_GETFD) & FD_CLOEXEC != 0)
            close(fd)
        }
        // Nothing left, and an empty end returns at once.
        #expect(pair.first.descriptor.discardPendingPackets(maximumPackets: 64) { _ in Issue.record("a descriptor from nowhere") } == 0)
    }
}
