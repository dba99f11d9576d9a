// The CLI never reports success when what it was asked to do did not happen, checks its input
// before acting on it, and exits with the documented statuses: 0 done, 1 the operation failed,
// 64 a wrong command line, 69 no broker, 127 a program that cannot run.
import Glibc
import Patchbay
import PatchbayProtocol
import PatchbaySystem
import SystemPackage
import Synchronization
import Testing

@Suite("CLI: honest exits")
struct CLIHonestyTests {
    func cli(_ broker: TestBroker, _ arguments: [String], input: String = "") throws -> Finished {
        try run(patchbayCLI, arguments, environment: broker.environment, input: input)
    }

    @Test("shm create of an existing object opens it as it is and says so on stderr (its mode and owner): --mode applied to nothing; --exclusive fails with EEXIST")
    func createOfAnExistingObjectSaysSo() throws {
        let broker = try TestBroker()
        let first = try cli(broker, ["shm", "create", "/said", "--mode", "0644"])
        #expect(first.termination == .exited(0) && first.standardError.isEmpty, "\(first.standardError)")
        let second = try cli(broker, ["shm", "create", "/said", "--mode", "0600"])
        #expect(second.termination == .exited(0))
        #expect(second.standardError.contains("/said already existed: opened it as it is (mode 0644, owner uid \(geteuid()))"),
                "\(second.standardError)")
        let exclusive = try cli(broker, ["shm", "create", "/said", "--exclusive"])
        #expect(exclusive.termination == .exited(1) && exclusive.standardError.contains("EEXIST"), "\(exclusive.standardError)")
    }

    @Test("caps serve --max-request: a larger request is refused unread (EMSGSIZE), a smaller one echoed; a hollow attachment costs the service no memory")
    func serveRefusesLargeRequests() throws {
        let broker = try TestBroker()
        let server = try Child(patchbayCLI, ["caps", "serve", "capped", "--echo", "--max-request", "64K"], environment: broker.environment)
        defer { server.kill(SIGKILL); _ = try? server.wait() }
        let client = try CapsClient(try broker.connect(), name: "capped", waitForService: true)
        #expect(try client.call(Array(repeating: 5, count: 1000)) == Array(repeating: 5, count: 1000))
        do {
            _ = try client.call(Array(repeating: 6, count: 100_000))
            Issue.record("a request past --max-request was answered")
        } catch {
            #expect(error.errno == .messageTooLong, "\(error)")
        }
        // 256 MiB, never written: in place, the refusal touches none of it.
        let before = try residentKiB(of: server.pid)
        _ = try client.put(length: 256 << 20) { _ in }
        let (reply, _) = try clientWait(client)
        #expect(reply.error == .messageTooLong, "\(reply)")
        #expect(try residentKiB(of: server.pid) - before < 32 << 10)
        #expect(try client.call([1, 2, 3]) == [1, 2, 3])
    }

    @Test("caps serve holds at most --max-reply-bytes-per-uid of replies a client uid has not consumed: past it EDQUOT, and room again once it consumes")
    func serveBoundsRepliesNotConsumed() throws {
        let broker = try TestBroker()
        let server = try Child(patchbayCLI, ["caps", "serve", "holder", "--echo", "--max-reply-bytes-per-uid", "1M"],
                               environment: broker.environment)
        defer { server.kill(SIGKILL); _ = try? server.wait() }
        let connection = try broker.connect()
        let holder = try CapsClient(connection, name: "holder", waitForService: true)
        let other = try CapsClient(connection, name: "holder")
        let request = [UInt8](repeating: 9, count: 400_000)
        _ = try holder.put(request)
        _ = try holder.put(request)
        // Until both replies are in the holder's ring (the broker reads the channel's words).
        while try connection.capsTraffic().first(where: { $0.channelID == holder.channelID })?.repliesPut != 2 { sched_yield() }
        // 800,000 bytes held for this uid, not consumed: one more 400,000 is past 1M, from any
        // connection of the uid.
        expectErrno(.diskQuotaExceeded) { () throws(PatchbayError) in _ = try other.call(request) }
        #expect(try other.call([1, 2, 3]) == [1, 2, 3])
        for _ in 0..<2 { _ = try clientWait(holder, capacity: 1 << 20) }
        // Consumed: the DISPOSEs come before this request, and there is room again.
        #expect(try holder.call(request) == request)
    }

    @Test("caps call --timeout gives up on a service that never answers, or never registers (--wait-for-service): ETIMEDOUT and exit 1, nothing printed; a service that answers in time is printed; a timeout that is not a positive duration is a usage error")
    func callTimesOut() throws {
        let broker = try TestBroker()
        let service = try CapsService(try broker.connect(), name: "mute", access: [.world])
        // Registered, and never reading a request.
        let silent = try cli(broker, ["caps", "call", "mute", "hello", "--timeout", "300ms"])
        #expect(silent.termination == .exited(1), "\(silent.standardError)")
        #expect(silent.standardError == "patchbay: caps call: ETIMEDOUT: no reply from the service mute within 300ms; the request is abandoned\n")
        #expect(silent.standardOutput.isEmpty)
        let absent = try cli(broker, ["caps", "call", "absent", "hello", "--wait-for-service", "--timeout", "300ms"])
        #expect(absent.termination == .exited(1), "\(absent.standardError)")
        #expect(absent.standardError == "patchbay: caps call: ETIMEDOUT: no reply from the service absent within 300ms (it was not there to take the request)\n")
        let echo = try Child(patchbayCLI, ["caps", "serve", "talker", "--echo"], environment: broker.environment)
        defer { echo.kill(SIGTERM); _ = try? echo.wait() }
        let answered = try cli(broker, ["caps", "call", "talker", "hello", "--wait-for-service", "--timeout", "60s"])
        #expect(answered.termination == .exited(0) && answered.standardOutput == "hello", "\(answered.standardError)")
        for bad in ["0s", "-1s", "soon"] {
            #expect(try cli(broker, ["caps", "call", "talker", "hello", "--timeout", bad]).termination == .exited(64), "\(bad)")
        }
        withExtendedLifetime(service) {}
    }

    @Test("caps call refuses a reply past --max-reply (default 64M) unread, with EMSGSIZE and exit 1; a small one is printed; the library's call(_:maxReplyLength:), blocking and async, refuses the same way")
    func callRefusesLargeReplies() async throws {
        let broker = try TestBroker()
        let service = try CapsService(try broker.connect(), name: "bloater", access: [.world])
        let stop = Atomic<Bool>(false)
        startThread {
            while !stop.load(ordering: .relaxed) {
                try? service.receive { (message: CapsServiceMessage, payload: UnsafeRawBufferPointer) in
                    guard message.kind == .request else { return }
                    // "big": 256 MiB in a memfd of its own, never written.
                    let length = payload.count == 3 && payload.elementsEqual("big".utf8) ? 256 << 20 : payload.count
                    try? service.reply(to: message.messageID, length: length) { buffer in
                        if length == payload.count, length > 0 { buffer.copyMemory(from: payload) }
                    }
                }
            }
        }
        defer {
            stop.store(true, ordering: .relaxed)
            service.cancelWait()
        }
        for arguments in [["caps", "call", "bloater", "big"], ["caps", "call", "bloater", "big", "--max-reply", "1M"]] {
            let out = try cli(broker, arguments)
            #expect(out.termination == .exited(1), "\(arguments)")
            #expect(out.standardError.hasPrefix("patchbay: caps call: EMSGSIZE: the reply to request ")
                    && out.standardError.contains(" is 268435456 bytes, more than the "), "\(out.standardError)")
            #expect(out.standardOutput.isEmpty)
        }
        let small = try cli(broker, ["caps", "call", "bloater", "small", "--max-reply", "5"])
        #expect(small.termination == .exited(0) && small.standardOutput == "small", "\(small.standardError)")
        let over = try cli(broker, ["caps", "call", "bloater", "small!", "--max-reply", "5"])
        #expect(over.termination == .exited(1) && over.standardError.contains("EMSGSIZE"), "\(over.standardError)")
        // The library's call with a limit: the same refusal, unread, and the client goes on.
        let client = try CapsClient(try broker.connect(), name: "bloater")
        #expect(throws: PatchbayError.self) { _ = try client.call(Array("big".utf8), maxReplyLength: 1 << 20) }
        do {
            _ = try client.call(Array("small!".utf8), maxReplyLength: 5)
            Issue.record("a 6-byte reply passed a limit of 5")
        } catch {
            #expect(error.errno == .messageTooLong && error.description.contains("6 bytes, more than the 5 allowed"), "\(error)")
        }
        #expect(try client.call(Array("small".utf8), maxReplyLength: 5) == Array("small".utf8))
        #expect(try await client.call(Array("async".utf8), maxReplyLength: 5) == Array("async".utf8))
        await #expect(throws: PatchbayError.self) { _ = try await client.call(Array("big".utf8), maxReplyLength: 1 << 20) }
    }

    @Test("claim without a command copies a seqpacket socket's messages whole: one of 0 bytes is not the end, one over 64 KiB is not cut")
    func claimCopiesMessagesWhole() throws {
        let broker = try TestBroker()
        var pair: [CInt] = [-1, -1]
        #expect(socketpair(AF_UNIX, CInt(SOCK_SEQPACKET.rawValue) | CInt(SOCK_CLOEXEC.rawValue), 0, &pair) == 0)
        let long = [UInt8](repeating: UInt8(ascii: "x"), count: 100_000)
        var sndbuf: CInt = 1 << 20
        _ = setsockopt(pair[0], SOL_SOCKET, SO_SNDBUF, &sndbuf, socklen_t(MemoryLayout<CInt>.size))
        for message in [Array("abc".utf8), [], Array("def".utf8), long, []] {
            #expect(message.withUnsafeBytes { send(pair[0], $0.baseAddress, $0.count, 0) } == message.count)
        }
        close(pair[0])
        let key = try broker.connect().share(rawDescriptor: pair[1])
        close(pair[1])
        let out = try cli(broker, ["claim", "-"], input: key.text + "\n")
        #expect(out.termination == .exited(0), "\(out.standardError)")
        #expect(out.standardOutput == "abcdef" + String(repeating: "x", count: 100_000), "\(out.standardOutput.count) bytes")
    }

    /// A process's resident memory in KiB (VmRSS).
    private func residentKiB(of pid: pid_t) throws -> Int {
        let status = String(decoding: try openFile("/proc/\(pid)/status", flags: O_RDONLY).readToEnd(), as: UTF8.self)
        let line = status.split(separator: "\n").first { $0.hasPrefix("VmRSS:") } ?? ""
        return Int(line.split(separator: " ").dropFirst().first ?? "") ?? 0
    }

    @Test("names with terminal control characters are printed escaped by shm ls and shm stat, never raw")
    func controlCharactersAreEscaped() throws {
        let broker = try TestBroker()
        let name = "/t\u{1B}]0;owned\u{07}\nforged\u{9B}2J"
        _ = try broker.connect().openSharedMemory(name, options: [.create])
        for arguments in [["shm", "ls"], ["shm", "stat", name]] {
            let out = try cli(broker, arguments)
            #expect(out.termination == .exited(0), "\(out.standardError)")
            let bytes = Array(out.standardOutput.utf8)
            #expect(!bytes.contains(0x1B) && !bytes.contains(0x07) && !out.standardOutput.unicodeScalars.contains("\u{9B}"),
                    "\(arguments): \(out.standardOutput)")
            #expect(out.standardOutput.contains("/t\\x1b]0;owned\\x07\\x0aforged\\u{9b}2J"), "\(out.standardOutput)")
        }
    }

    @Test("names with characters that show nothing or reorder the line (zero-width space, right-to-left override, no-break space) are printed escaped: one user's name cannot pass for another's")
    func invisibleCharactersAreEscaped() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        for name in ["/rootobj\u{200B}", "/x\u{202E}0:0 6660", "/a\u{00A0}b\u{FEFF}", "/etc\u{3164}passwd\u{034F}\u{2800}"] {
            _ = try client.openSharedMemory(name, options: [.create])
        }
        let out = try cli(broker, ["shm", "ls"])
        #expect(out.termination == .exited(0), "\(out.standardError)")
        for scalar in ["\u{200B}", "\u{202E}", "\u{00A0}", "\u{FEFF}", "\u{3164}", "\u{034F}", "\u{2800}"] as [Unicode.Scalar] {
            #expect(!out.standardOutput.unicodeScalars.contains(scalar), "\(out.standardOutput)")
        }
        for shown in ["/rootobj\\u{200b}", "/x\\u{202e}0:0 6660", "/a\\u{a0}b\\u{feff}", "/etc\\u{3164}passwd\\u{34f}\\u{2800}"] {
            #expect(out.standardOutput.contains(shown), "\(shown) in \(out.standardOutput)")
        }
        // Letters of other scripts are shown as they are.
        _ = try client.openSharedMemory("/café-данные", options: [.create])
        #expect(try cli(broker, ["shm", "ls"]).standardOutput.contains("/café-данные"))
    }

    @Test("caps call fails (ECONNRESET) when the service dies before answering, never prints an empty answer")
    func callToDyingService() throws {
        let broker = try TestBroker()
        let server = try Child(testPeer, ["caps-service-hang", "doomed"], environment: broker.environment)
        #expect(try server.readLine() == "ready")
        let caller = try Child(patchbayCLI, ["caps", "call", "doomed", "hello"], environment: broker.environment)
        #expect(try server.readLine()?.hasPrefix("got ") == true)
        server.kill(SIGKILL)
        _ = try server.wait()
        #expect(try caller.readLine() == nil)  // nothing on stdout
        #expect(try caller.wait() == .exited(1))
    }

    @Test("caps serve --exec: a missing program fails at start (127); a failing one is an error reply (EIO), not an empty answer")
    func servedProgramFailures() throws {
        let broker = try TestBroker()
        let missing = try cli(broker, ["caps", "serve", "ghost", "--exec", "/nonexistent/prog"])
        #expect(missing.termination == .exited(127))
        #expect(missing.standardError.hasPrefix("patchbay: caps serve: ENOENT: cannot run /nonexistent/prog"), "\(missing.standardError)")
        #expect(try broker.connect().listServices().isEmpty)
        for (option, value) in [("--max-programs", "0"), ("--max-programs", "1025"), ("--max-programs-per-uid", "0")] {
            let refused = try cli(broker, ["caps", "serve", "unstarted", option, value, "--exec", "/bin/cat"])
            #expect(refused.termination == .exited(64), "\(option) \(value)")
            #expect(refused.standardError.hasPrefix("patchbay: caps serve: EINVAL: \(option) must be"), "\(refused.standardError)")
        }
        #expect(try broker.connect().listServices().isEmpty)
        let server = try Child(patchbayCLI, ["caps", "serve", "failing", "--exec", "/bin/false"], environment: broker.environment)
        defer { server.kill(SIGTERM); _ = try? server.wait() }
        let call = try cli(broker, ["caps", "call", "failing", "--wait-for-service", "hello"])
        #expect(call.termination == .exited(1))
        #expect(call.standardOutput.isEmpty)
        #expect(call.standardError.hasPrefix("patchbay: caps call: EIO: the service answered request "), "\(call.standardError)")
        // The library sees the same error reply.
        let client = try CapsClient(try broker.connect(), name: "failing")
        expectErrno(.ioError) { () throws(PatchbayError) in _ = try client.call(Array("x".utf8)) }
    }

    @Test("caps serve --exec and net listen --exec whose starter is killed: what finds it gone fails (EIO for a request), then the command exits 1 instead of refusing everything from then on")
    func servedProgramStarterGone() throws {
        let broker = try TestBroker()
        let server = try Child(patchbayCLI, ["caps", "serve", "orphaned", "--exec", "/bin/cat"], environment: broker.environment)
        defer { server.kill(SIGKILL); _ = try? server.wait() }
        let client = try CapsClient(try broker.connect(), name: "orphaned", waitForService: true)
        #expect(try client.call(Array("first".utf8)) == Array("first".utf8))
        // The starter: the service's child running `patchbay exec-starter`.
        let starter = childProcesses(of: server.pid).first { processCommandLine(of: $0).contains("exec-starter /bin/cat") }
        guard let starter else {
            Issue.record("no exec-starter child of the service")
            return
        }
        kill(starter, SIGKILL)
        expectErrno(.ioError) { () throws(PatchbayError) in _ = try client.call(Array("second".utf8)) }
        let deadline = monotonicNanoseconds() + 10_000_000_000
        while server.isRunning && monotonicNanoseconds() < deadline { usleep(2_000) }
        #expect(!server.isRunning, "the service went on without its starter")
        if !server.isRunning { #expect(try server.wait() == .exited(1)) }

        // The same for net listen: the connection that finds the starter gone ends, and so does
        // the listener, failing.
        let listener = try Child(patchbayCLI, ["net", "listen", "orphaned", "--exec", "/bin/cat"], environment: broker.environment)
        defer { listener.kill(SIGKILL); _ = try? listener.wait() }
        let observer = try broker.connect()
        let listening = monotonicNanoseconds() + 10_000_000_000
        while try !observer.listSockets().contains(where: { $0.name == "orphaned" && $0.state == "LISTENING" }),
              monotonicNanoseconds() < listening { usleep(2_000) }
        guard let netStarter = childProcesses(of: listener.pid).first(where: { processCommandLine(of: $0).contains("exec-starter /bin/cat") })
        else {
            Issue.record("no exec-starter child of the listener")
            return
        }
        kill(netStarter, SIGKILL)
        let served = try cli(broker, ["net", "connect", "orphaned"], input: "hello\n")
        #expect(served.standardOutput.isEmpty, "\(served.standardOutput)")
        let stopped = monotonicNanoseconds() + 10_000_000_000
        while listener.isRunning && monotonicNanoseconds() < stopped { usleep(2_000) }
        #expect(!listener.isRunning, "the listener went on without its starter")
        if !listener.isRunning { #expect(try listener.wait() == .exited(1)) }
    }

    @Test("net listen --exec with a missing program fails at start (127), binding nothing")
    func listenWithMissingProgram() throws {
        let broker = try TestBroker()
        let listen = try cli(broker, ["net", "listen", "svc", "--exec", "/nonexistent/prog"])
        #expect(listen.termination == .exited(127))
        #expect(listen.standardError.hasPrefix("patchbay: net listen: ENOENT: "), "\(listen.standardError)")
        #expect(try broker.connect().listSockets().isEmpty)
    }

    @Test("an established net connect whose listener goes away exits 1 (ECONNRESET), not 0")
    func connectOutlivedByListener() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        var listener: Socket? = try Socket.listen(client, name: "shortlived")
        let relay = try Child(patchbayCLI, ["net", "connect", "shortlived"], environment: broker.environment)
        var accepted: Socket? = try listener!.accept()
        try accepted!.send(Array("bye".utf8))
        #expect(try relay.readLine() == "bye")
        accepted = nil
        listener = nil
        #expect(try relay.wait() == .exited(1))
        // A connection that ends after its input did is a success.
        let echo = try Child(patchbayCLI, ["net", "listen", "echoer", "--echo"], environment: broker.environment)
        defer { echo.kill(SIGTERM); _ = try? echo.wait() }
        let deadline = monotonicNanoseconds() + 10_000_000_000
        while try !client.listSockets().contains(where: { $0.name == "echoer" && $0.state == "LISTENING" }),
              monotonicNanoseconds() < deadline { usleep(2_000) }
        let done = try cli(broker, ["net", "connect", "echoer"], input: "one\ntwo\n")
        #expect(done.termination == .exited(0) && done.standardOutput == "one\ntwo\n", "\(done.standardError)")
    }

    @Test("net connect finds a stream listener's type by itself; names are checked before they reach a ctl line")
    func connectTypeAndNames() throws {
        let broker = try TestBroker()
        let echo = try Child(patchbayCLI, ["net", "listen", "streamer", "--type", "stream", "--echo"], environment: broker.environment)
        defer { echo.kill(SIGTERM); _ = try? echo.wait() }
        let client = try broker.connect()
        let deadline = monotonicNanoseconds() + 10_000_000_000
        while try !client.listSockets().contains(where: { $0.name == "streamer" && $0.state == "LISTENING" }),
              monotonicNanoseconds() < deadline { usleep(2_000) }
        let connect = try cli(broker, ["net", "connect", "streamer"], input: "flowing")
        #expect(connect.termination == .exited(0) && connect.standardOutput == "flowing", "\(connect.standardError)")
        for name in ["z && listen", "bad name!"] {
            let listen = try cli(broker, ["net", "listen", name, "--echo"])
            #expect(listen.termination == .exited(1))
            #expect(listen.standardError.contains("EINVAL: \"\(name)\" is not a local name"), "\(listen.standardError)")
        }
        #expect(try client.listSockets().allSatisfy { $0.name != "z" })
    }

    @Test("net path of an unbound name is ENOENT unless --unbound; net addrs --json")
    func pathAndAddresses() throws {
        let broker = try TestBroker()
        let unbound = try cli(broker, ["net", "path", "nothing-here"])
        #expect(unbound.termination == .exited(1))
        #expect(unbound.standardError.hasPrefix("patchbay: net path: ENOENT: nothing is bound to nothing-here"))
        let anyway = try cli(broker, ["net", "path", "nothing-here", "--unbound"])
        #expect(anyway.termination == .exited(0) && anyway.standardOutput.hasSuffix("/nothing-here\n"))
        let listener = try Socket.listen(try broker.connect(), name: "bound-one")
        _ = listener
        #expect(try cli(broker, ["net", "path", "bound-one"]).termination == .exited(0))
        let json = try cli(broker, ["net", "addrs", "--json"])
        #expect(json.standardOutput == "[\"bound-one\"]\n", "\(json.standardOutput)")
    }

    @Test("claim: a missing program fails before the key is spent (127); a directory without a command says how to use it")
    func claimHonesty() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        let directory = makeTemporaryDirectory()
        defer { removeTree(directory) }
        var key = try client.share(try openFile(directory, flags: O_RDONLY | O_DIRECTORY)).text
        let missing = try cli(broker, ["claim", key, "--", "/nonexistent/prog"])
        #expect(missing.termination == .exited(127))
        #expect(try client.status().keys == 1)  // not spent
        // Executable files exec would refuse: a script whose interpreter is missing, a file that
        // is neither a script nor an ELF program (posix_spawn hands it to no shell). Found before
        // the key is spent too.
        let programs = [("script", "#!/nonexistent/interpreter\necho hi\n", "ENOENT: cannot run \(directory)/script: its interpreter /nonexistent/interpreter does not exist"),
                        ("garbage", "this is not a program\n", "ENOEXEC: cannot run \(directory)/garbage: neither a script (#!) nor an ELF program")]
        for (name, text, said) in programs {
            let path = directory + "/" + name
            let file = try openFile(path, flags: O_WRONLY | O_CREAT, mode: 0o755)
            _ = Array(text.utf8).withUnsafeBytes { write(file.rawValue, $0.baseAddress, $0.count) }
            let refused = try cli(broker, ["claim", key, "--", path])
            #expect(refused.termination == .exited(127), "\(name)")
            #expect(refused.standardError == "patchbay: claim: \(said)\n", "\(refused.standardError)")
            #expect(try client.status().keys == 1)
        }
        // A script with an interpreter that exists, and an ELF program, run.
        let good = try cli(broker, ["claim", key, "--", "/bin/sh", "-c", "exit 0"])
        #expect(good.termination == .exited(0), "\(good.standardError)")
        #expect(try client.status().keys == 0)
        let again = try client.share(try openFile(directory, flags: O_RDONLY | O_DIRECTORY)).text
        let script = directory + "/good"
        do {  // (closed before it runs: a file open for writing is ETXTBSY to exec)
            let written = try openFile(script, flags: O_WRONLY | O_CREAT, mode: 0o755)
            _ = Array("#!/bin/sh\nexit 0\n".utf8).withUnsafeBytes { write(written.rawValue, $0.baseAddress, $0.count) }
        }
        let scripted = try cli(broker, ["claim", again, "--", script])
        #expect(scripted.termination == .exited(0), "\(scripted.standardError)")
        key = try client.share(try openFile(directory, flags: O_RDONLY | O_DIRECTORY)).text
        let plain = try cli(broker, ["claim", key])
        #expect(plain.termination == .exited(1))
        #expect(plain.standardError.hasPrefix("patchbay: claim: EISDIR: the claimed file is a directory"), "\(plain.standardError)")
        #expect(plain.standardError.contains("-- "))
    }

    @Test("values that look like options reach their validator; users and groups by name; T sizes; documented exit statuses")
    func inputChecks() throws {
        let broker = try TestBroker()
        let negative = try cli(broker, ["share", "--timeout", "-5s", "/dev/null"])
        #expect(negative.termination == .exited(64))
        #expect(negative.standardError.hasPrefix("patchbay: share: EINVAL: the timeout must be positive"), "\(negative.standardError)")
        let size = try cli(broker, ["shm", "new", "--size", "-1"])
        #expect(size.termination == .exited(64))
        #expect(size.standardError.hasPrefix("patchbay: shm new: EINVAL: \"-1\" is not a size"), "\(size.standardError)")
        let tera = try cli(broker, ["shm", "new", "--size", "1T"])
        #expect(!tera.standardError.contains("is not a size"), "\(tera.standardError)")
        let byName = try cli(broker, ["share", "--for-uid", "root", "--timeout", "5s", "/dev/null"])
        #expect(byName.termination == .exited(0), "\(byName.standardError)")
        let byGroup = try cli(broker, ["share", "--for-gid", "root", "--timeout", "5s", "/dev/null"])
        #expect(byGroup.termination == .exited(0), "\(byGroup.standardError)")
        let unknownUser = try cli(broker, ["share", "--for-uid", "no-such-user-here", "/dev/null"])
        #expect(unknownUser.termination == .exited(64))
        #expect(try cli(broker, ["share", "--frobnicate"]).termination == .exited(64))
        let noBroker = try run(patchbayCLI, ["shm", "ls"], environment: ["PATCHBAY_SOCKET": broker.directory + "/absent.sock"])
        #expect(noBroker.termination == .exited(69), "\(noBroker.standardError)")
        let version = try run(patchbayDaemon, ["--version"])
        #expect(version.termination == .exited(0) && version.standardOutput == patchbayVersion + "\n")
    }

    @Test("the library: names over 1023 bytes are ENAMETOOLONG before sending; a writable map of a write-sealed object explains EPERM")
    func libraryMessages() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        let long = expectErrno(.fileNameTooLong) { () throws(PatchbayError) in
            _ = try client.openSharedMemory("/" + String(repeating: "n", count: 1023), options: .create)
        }
        #expect(long?.reason.contains("at most 1023 bytes") == true)
        let object = try SharedMemory.anonymous(sealable: true)
        try object.truncate(to: 4096)
        try object.addSeals(.write)
        let sealed = expectErrno(.notPermitted) { () throws(PatchbayError) in _ = try object.map() }
        #expect(sealed?.reason.contains("sealed against writes") == true, "\(String(describing: sealed))")
    }

    @Test("fstat on a named object's descriptor reports the object's mode (after the umask) and owner")
    func namedObjectStatus() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        let previous = umask(0o027)
        defer { umask(previous) }
        let object = try client.openSharedMemory("/moded", options: .create, mode: 0o666)
        let status = try object.status()
        #expect(status.mode & 0o777 == 0o640, "\(String(status.mode, radix: 8))")
        #expect(status.uid == geteuid() && status.gid == getegid())
        #expect(try client.statSharedMemory("/moded").mode == 0o640)
    }

    @Test("doctor names the socket, store, log, lock and daemon, says what is wrong, and never starts a broker")
    func doctor() throws {
        let broker = try TestBroker()
        let healthy = try cli(broker, ["doctor", "--json"])
        #expect(healthy.termination == .exited(0), "\(healthy.standardOutput)")
        #expect(healthy.standardOutput.contains("a broker answers: pid \(broker.pid)"), "\(healthy.standardOutput)")
        let runtime = makeTemporaryDirectory()
        defer { removeTree(runtime) }
        #expect(mkdir(runtime + "/patchbay", 0o755) == 0)
        chmod(runtime + "/patchbay", 0o755)
        let unsafe = try run(patchbayCLI, ["doctor"], environment: ["XDG_RUNTIME_DIR": runtime, "PATCHBAY_SOCKET": nil])
        #expect(unsafe.termination == .exited(1))
        #expect(unsafe.standardOutput.contains("directory PROBLEM  \(runtime)/patchbay"), "\(unsafe.standardOutput)")
        #expect(access(runtime + "/patchbay/patchbay.sock", F_OK) != 0)
        // No broker, and none would start by itself: a problem, not "one starts on the first use".
        let quiet = makeTemporaryDirectory()
        defer { removeTree(quiet) }
        let off = try run(patchbayCLI, ["doctor"], environment: ["XDG_RUNTIME_DIR": quiet, "PATCHBAY_SOCKET": nil, "PATCHBAY_AUTOSTART": "0"])
        #expect(off.termination == .exited(1))
        #expect(off.standardOutput.contains("none starts by itself (PATCHBAY_AUTOSTART=0)"), "\(off.standardOutput)")
        let named = try run(patchbayCLI, ["doctor"], environment: ["PATCHBAY_SOCKET": quiet + "/elsewhere.sock"])
        #expect(named.termination == .exited(1))
        #expect(named.standardOutput.contains("none starts by itself (PATCHBAY_SOCKET names this path)"), "\(named.standardOutput)")
        let missingDaemon = try run(patchbayCLI, ["doctor"], environment: broker.environment.merging(["PATCHBAY_DAEMON": "/nonexistent/patchbayd"]) { $1 })
        #expect(missingDaemon.termination == .exited(1))
        #expect(missingDaemon.standardOutput.contains("daemon    PROBLEM  /nonexistent/patchbayd"), "\(missingDaemon.standardOutput)")
    }

    @Test("a wrong command line is said as every failure is (patchbay: <command>: EINVAL: ...), with the usage, and exits 64; values that look like options reach their validator")
    func usageErrorsInTheCommonFormat() throws {
        let broker = try TestBroker()
        let unknown = try cli(broker, ["status", "--bogus"])
        #expect(unknown.termination == .exited(64))
        #expect(unknown.standardError.hasPrefix("patchbay: status: EINVAL: Unknown option '--bogus'\nUsage: patchbay status"),
                "\(unknown.standardError)")
        let negative = try cli(broker, ["caps", "call", "x", "--timeout", "-5s"])
        #expect(negative.termination == .exited(64))
        #expect(negative.standardError.hasPrefix("patchbay: caps call: EINVAL: the timeout must be positive (or never); got -5s"),
                "\(negative.standardError)")
        let daemon = try run(patchbayDaemon, ["--nope"])
        #expect(daemon.termination == .exited(64))
        #expect(daemon.standardError.hasPrefix("patchbay: daemon: EINVAL: Unknown option '--nope'"), "\(daemon.standardError)")
        // `patchbayd daemon ...`, as autostart runs whichever program PATCHBAY_DAEMON names.
        let help = try run(patchbayDaemon, ["daemon", "--help"])
        #expect(help.termination == .exited(0) && help.standardOutput.contains("--shm-directory"), "\(help.standardError)")
        // A group named without one of its commands was asked to do nothing: usage, not success.
        let bare = try cli(broker, [])
        #expect(bare.termination == .exited(64) && bare.standardOutput.isEmpty)
        #expect(bare.standardError.hasPrefix("patchbay: EINVAL: name one of its commands\n"), "\(bare.standardError)")
        #expect(bare.standardError.contains("SUBCOMMANDS:") && bare.standardError.contains("claim"), "\(bare.standardError)")
        for group in ["shm", "net", "caps"] {
            let named = try cli(broker, [group])
            #expect(named.termination == .exited(64) && named.standardOutput.isEmpty, "\(group)")
            #expect(named.standardError.hasPrefix("patchbay: \(group): EINVAL: name one of its commands\n"), "\(named.standardError)")
            let asked = try cli(broker, [group, "--help"])
            #expect(asked.termination == .exited(0) && asked.standardOutput.contains("SUBCOMMANDS:"), "\(group)")
        }
        // A key on the command line that does not parse is a value that does not parse (64);
        // from stdin it is input (1).
        let badKey = try cli(broker, ["claim", "notakey"])
        #expect(badKey.termination == .exited(64), "\(badKey.standardError)")
        #expect(badKey.standardError.hasPrefix("patchbay: claim: EINVAL: "), "\(badKey.standardError)")
        let badKeyRead = try cli(broker, ["claim", "-"], input: "notakey\n")
        #expect(badKeyRead.termination == .exited(1), "\(badKeyRead.standardError)")
    }

    @Test("a command started with stdout or stdin closed fails (EBADF) instead of writing its output into, or reading its input from, its broker connection")
    func closedStandardDescriptors() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        let directory = makeTemporaryDirectory()
        defer { removeTree(directory) }
        let file = directory + "/f"
        _ = try openFile(file, flags: O_WRONLY | O_CREAT, mode: 0o600)
        // The broker connection was the first descriptor opened, so it became descriptor 1 and
        // took the key (a frame the broker refused as EPROTO), and share exited 0.
        let share = try run("/bin/sh", ["-c", "exec \"$0\" share \"$1\" >&-", patchbayCLI, file], environment: broker.environment)
        #expect(share.termination == .exited(1))
        #expect(share.standardError.hasPrefix("patchbay: share: EBADF: writing to stdout failed"), "\(share.standardError)")
        let status = try run("/bin/sh", ["-c", "exec \"$0\" status >&-", patchbayCLI], environment: broker.environment)
        #expect(status.termination == .exited(1))
        #expect(status.standardError.hasPrefix("patchbay: status: EBADF"), "\(status.standardError)")
        // Nothing reached the broker but whole requests.
        let refused = try client.metrics().split(separator: "\n").filter { $0.hasPrefix("patchbay_requests_total") && $0.contains("EPROTO") }
        #expect(refused.isEmpty, "\(refused)")
        // stdin closed, or unreadable: the request is never sent empty.
        let service = try CapsService(client, name: "stdin.check", access: [.world])
        defer { withExtendedLifetime(service) {} }
        let closed = try run("/bin/sh", ["-c", "exec \"$0\" caps call stdin.check <&-", patchbayCLI], environment: broker.environment)
        #expect(closed.termination == .exited(1))
        #expect(closed.standardError.hasPrefix("patchbay: caps call: EBADF: reading stdin failed"), "\(closed.standardError)")
        let unreadable = try run("/bin/sh", ["-c", "exec \"$0\" caps call stdin.check < \"$1\"", patchbayCLI, directory], environment: broker.environment)
        #expect(unreadable.termination == .exited(1))
        #expect(unreadable.standardError.hasPrefix("patchbay: caps call: EISDIR: reading stdin failed"), "\(unreadable.standardError)")
    }
}
