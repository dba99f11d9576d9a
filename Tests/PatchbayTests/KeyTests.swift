// Keys, end to end: real broker, real processes, real descriptors (SEMANTICS.md §1).
import Glibc
import Patchbay
import PatchbayProtocol
import PatchbaySystem
import SystemPackage
import Testing

@Suite("Keys: share and claim")
struct KeyTests {
    @Test("a file shared by one process is claimed by an unrelated one, with a shared offset")
    func shareAndClaimAcrossProcesses() throws {
        let broker = try TestBroker()
        let path = broker.directory + "/data.txt"
        try writeFile(path, "0123456789abcdef")

        // Another process opens the file, shares it and exits; this process claims it.
        let shared = try run(patchbayCLI, ["share", "--write", path], environment: broker.environment)
        #expect(shared.termination == .exited(0), "\(shared.standardError)")
        let keyText = shared.standardOutput.trimmed
        #expect(keyText.count == 22)
        let client = try broker.connect()
        let claimed = try client.claim(try Key(parsing: keyText))
        var head = [UInt8](repeating: 0, count: 4)
        let count = try head.withUnsafeMutableBytes { try claimed.read(into: $0) }
        #expect(count == 4 && head == Array("0123".utf8))

        // This process shares its descriptor (offset 4 now); a child claims it and reads from
        // the shared offset, then writes through it.
        let key = try client.share(claimed)
        // (The key from stdin: on a command line other users could read it from /proc.)
        let reader = try run(patchbayCLI, ["claim", "-"], environment: broker.environment, input: key.text + "\n")
        #expect(reader.termination == .exited(0), "\(reader.standardError)")
        #expect(reader.standardOutput == "456789abcdef")
        // The child's reads moved our offset too: we are at end of file.
        let rest = try claimed.readToEnd()
        #expect(rest.isEmpty)

        let key2 = try client.share(claimed)
        let writer = try run(patchbayCLI, ["claim", key2.text, "--", "/bin/sh", "-c",
                                           "test \"$PATCHBAY_FD\" = 3 && printf XYZ >&3"],
                             environment: broker.environment)
        #expect(writer.termination == .exited(0), "\(writer.standardError)")
        var contents = [UInt8](repeating: 0, count: 64)
        let total = contents.withUnsafeMutableBytes { pread(claimed.rawValue, $0.baseAddress, 64, 0) }
        #expect(String(decoding: contents[0..<total], as: UTF8.self) == "0123456789abcdefXYZ")
    }

    @Test("claimed descriptors refer to the same open file description, close-on-exec")
    func sameOpenFileDescription() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        let pipe = try Pipe()
        let key = try client.share(pipe.writeEnd)
        _ = consume pipe.writeEnd  // the key holds the file now
        // A child claims the write end and writes through it; we read it from our read end.
        let child = try run(patchbayCLI, ["claim", key.text, "--", "/bin/sh", "-c", "printf 'through the pipe' >&3"],
                            environment: broker.environment)
        #expect(child.termination == .exited(0), "\(child.standardError)")
        // Every write end is closed now (ours, the broker's after the claim, the child's), so
        // reading reaches end of file after the child's bytes.
        let received = try pipe.readEnd.readToEnd()
        #expect(String(decoding: received, as: UTF8.self) == "through the pipe")

        let eventCounter = try EventCounter(initialValue: 7)
        let eventKey = try client.share(eventCounter.descriptor)
        let claimed = try client.claim(eventKey)
        #expect(try claimed.system.isCloseOnExec())
        #expect(try claimed.system.fileKind() == .anonymous)
        #expect(try EventCounter(adopting: PatchbaySystem.Descriptor(adopting: claimed.release().rawValue)).consume() == 7)
    }

    @Test("many keys for one open file cost the broker one descriptor")
    func sameFileSharedManyTimes() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        _ = try client.status()
        let baseline = try broker.descriptorCount()
        let file = try openFile("/dev/null", flags: O_RDONLY)
        var keys: [Key] = []
        for _ in 0..<50 { keys.append(try client.share(file)) }
        // The duplicates are closed on the broker's closing thread, so the count settles shortly.
        #expect(try broker.waitForDescriptorCount(baseline + 1) == baseline + 1)
        // A separately opened file is a different open file description: a descriptor of its own.
        let other = try client.share(try openFile("/dev/null", flags: O_RDONLY))
        #expect(try broker.waitForDescriptorCount(baseline + 2) == baseline + 2)
        for key in keys { _ = try client.claim(key) }
        _ = try client.claim(other)
        #expect(try broker.waitForDescriptorCount(baseline) == baseline)
    }

    @Test("a key works once: the second claim is ENOENT")
    func secondClaimFails() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        let file = try openFile("/dev/null", flags: O_RDONLY)
        let key = try client.share(file)
        _ = try client.claim(key)
        let error = expectErrno(.noSuchFileOrDirectory) { () throws(PatchbayError) in _ = try client.claim(key) }
        #expect(error?.reason.contains("no such key") == true)
    }

    @Test("50 processes claim one key at the same moment: exactly one wins")
    func concurrentClaimsHaveOneWinner() throws {
        let broker = try TestBroker()
        let path = broker.directory + "/prize.txt"
        try writeFile(path, "prize")
        let client = try broker.connect()
        let key = try client.share(try openFile(path, flags: O_RDONLY))
        // Every claimer connects first and says "ready"; closing their stdin is the start gun.
        var claimers: [Child] = []
        for _ in 0..<50 {
            let child = try Child(testPeer, ["claim-on-eof", key.text], environment: broker.environment)
            #expect(try child.readLine() == "ready")
            claimers.append(child)
        }
        for child in claimers { child.closeInput() }
        var outcomes: [String] = []
        for child in claimers {
            outcomes.append(try child.readLine() ?? "no answer")
            #expect(try child.wait() == .exited(0))
        }
        #expect(outcomes.filter { $0 == "won prize" }.count == 1)
        #expect(outcomes.filter { $0 == "ENOENT" }.count == 49, "\(outcomes)")
    }

    @Test("an expired key is ENOENT and the broker closes the file within a second")
    func expiryClosesTheFile() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        _ = try client.status()  // the broker has accepted our connection: count it in the baseline
        let baseline = try broker.descriptorCount()
        let key: Key
        let sharedAt = monotonicNanoseconds()
        do {
            let file = try openFile("/dev/null", flags: O_RDONLY)
            key = try client.share(file, timeout: .after(.milliseconds(300)))
        }
        let held = try broker.descriptorCount()
        // Held until the deadline (unless this thread was descheduled past it).
        #expect(held == baseline + 1 || monotonicNanoseconds() - sharedAt > 300_000_000)
        // The drop must happen by itself, without anyone looking the key up.
        let after = try broker.waitForDescriptorCount(baseline, within: 3)
        let elapsed = Double(monotonicNanoseconds() - sharedAt) / 1e9
        #expect(after == baseline)
        #expect(elapsed >= 0.29 && elapsed < 1.4, "dropped after \(elapsed) s")
        expectErrno(.noSuchFileOrDirectory) { () throws(PatchbayError) in _ = try client.claim(key) }
    }

    @Test("zero or negative timeouts are EINVAL; never does not expire")
    func timeoutValidation() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        let file = try openFile("/dev/null", flags: O_RDONLY)
        expectErrno(.invalidArgument) { () throws(PatchbayError) in _ = try client.share(file, timeout: .after(.zero)) }
        expectErrno(.invalidArgument) { () throws(PatchbayError) in _ = try client.share(file, timeout: .after(.seconds(-1))) }
        let cli = try run(patchbayCLI, ["share", "--timeout", "0s", "/dev/null"], environment: broker.environment)
        #expect(cli.termination == .exited(64))
        #expect(cli.standardError.hasPrefix("patchbay: share: EINVAL: "))
        let key = try client.share(file, timeout: .never)
        #expect(try client.status().keys == 1)
        _ = try client.claim(key)
    }

    @Test("a restricted key is ENOENT for everyone else")
    func restrictions() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        let file = try openFile("/dev/null", flags: O_RDONLY)
        let otherUID = try client.share(file, claimableBy: .uid(getuid() &+ 4242))
        expectErrno(.noSuchFileOrDirectory) { () throws(PatchbayError) in _ = try client.claim(otherUID) }
        let otherGID = try client.share(file, claimableBy: .gid(getgid() &+ 4242))
        expectErrno(.noSuchFileOrDirectory) { () throws(PatchbayError) in _ = try client.claim(otherGID) }
        // A pid restriction: only the named process may claim it.
        let forChild = try run(patchbayCLI, ["share", "--for-pid", "\(getpid())", "/dev/null"],
                               environment: broker.environment)
        let mine = try Key(parsing: forChild.standardOutput.trimmed)
        let stranger = try run(patchbayCLI, ["claim", mine.text], environment: broker.environment)
        #expect(stranger.termination == .exited(1))
        #expect(stranger.standardError.hasPrefix("patchbay: claim: ENOENT: "))
        // The refused attempt did not consume it: the right claimer still gets it.
        _ = try client.claim(mine)
        _ = try client.claim(try client.share(file, claimableBy: .uid(getuid())))
        _ = try client.claim(try client.share(file, claimableBy: .gid(getgid())))
    }

    @Test("malformed key text is EINVAL, in the library and the CLI")
    func malformedKeys() throws {
        for text in ["", "short", "AAAAAAAAAAAAAAAAAAAAAAA", "AAAAAAAAAAAAAAAAAAAAA=", "AAAAAAAAAAAAAAAAAAAA/A",
                     "EAAAAAAAAAAAAAAAAAAAAA", "-AAAAAAAAAAAAAAAAAAAAA", "AAAAAAAAAAAAAAAAAAAA\u{0}A"] {
            expectErrno(.invalidArgument) { () throws(PatchbayError) in _ = try Key(parsing: text) }
        }
        let broker = try TestBroker()
        let cli = try run(patchbayCLI, ["claim", "not-a-key"], environment: broker.environment)
        #expect(cli.termination == .exited(64))  // a value on the command line that does not parse
        #expect(cli.standardError.hasPrefix("patchbay: claim: EINVAL: "))
        // Well-formed but unknown: ENOENT.
        let client = try broker.connect()
        expectErrno(.noSuchFileOrDirectory) { () throws(PatchbayError) in
            _ = try client.claim(try Key(parsing: "AAAAAAAAAAAAAAAAAAAAAA"))
        }
    }

    @Test("per-uid quota: EDQUOT beyond the limit, room again after a claim")
    func quota() throws {
        let broker = try TestBroker(["--max-keys-per-uid", "3"])
        let client = try broker.connect()
        let file = try openFile("/dev/null", flags: O_RDONLY)
        let first = try client.share(file)
        _ = try client.share(file)
        _ = try client.share(file)
        let error = expectErrno(.diskQuotaExceeded) { () throws(PatchbayError) in _ = try client.share(file) }
        #expect(error?.reason.contains("3") == true)
        _ = try client.claim(first)
        _ = try client.share(file)
        #expect(try client.status().keys == 3)
    }

    @Test("failed claims are rate-limited per uid (EAGAIN), and a valid key survives the limit")
    func failedClaimRateLimit() throws {
        let broker = try TestBroker(["--failed-claim-burst", "5", "--failed-claims-per-second", "2"])
        let client = try broker.connect()
        let valid = try client.share(try openFile("/dev/null", flags: O_RDONLY))
        let start = monotonicNanoseconds()
        var notFound = 0
        var limited = 0
        for attempt in 0..<40 {
            var bytes = [UInt8](repeating: 0, count: 16)
            bytes[0] = UInt8(attempt)
            do {
                _ = try client.claim(Key(token: KeyToken(bytes: bytes)!))
                Issue.record("a guessed key was claimed")
            } catch {
                if error.errno == .noSuchFileOrDirectory { notFound += 1 }
                if error.errno == .resourceTemporarilyUnavailable { limited += 1 }
            }
        }
        let elapsed = Double(monotonicNanoseconds() - start) / 1e9
        // The burst plus what refilled while we were guessing, and no more.
        #expect(notFound >= 5)
        #expect(Double(notFound) <= 5 + elapsed * 2 + 1, "\(notFound) guesses in \(elapsed) s")
        #expect(notFound + limited == 40)
        // While limited, the valid key is not even looked up: it is still there afterwards.
        if (try? client.claim(valid)) == nil {
            let recovered = try broker.connect()
            var claimed = false
            let deadline = monotonicNanoseconds() + 30_000_000_000
            while !claimed && monotonicNanoseconds() < deadline {
                do {
                    _ = try recovered.claim(valid)
                    claimed = true
                } catch {
                    #expect(error.errno == .resourceTemporarilyUnavailable)
                    usleep(100_000)
                }
            }
            #expect(claimed)
        }
    }

    @Test("EMFILE on claim keeps the key for that claimer: another process cannot claim it, the claimer can once it has room")
    func claimWithFullDescriptorTableKeepsKey() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        let path = broker.directory + "/kept.txt"
        try writeFile(path, "kept")
        let key = try client.share(try openFile(path, flags: O_RDONLY))
        let peer = try Child(testPeer, ["claim-with-full-table", key.text], environment: broker.environment)
        #expect(try peer.readLine() == "EMFILE")
        // The reply may have reached the claimer whatever it says: nobody else gets the file too.
        #expect(throws: PatchbayError.self) { _ = try client.claim(key) }
        peer.closeInput()
        #expect(try peer.readLine() == "claimed on retry")
        #expect(try peer.wait() == .exited(0))
    }

    @Test("a sharer killed with SIGKILL leaves the broker healthy and its key claimable")
    func sharerKilled() throws {
        let broker = try TestBroker()
        let client = try broker.connect()
        _ = try client.status()  // the broker has accepted our connection: count it in the baseline
        let baseline = try broker.descriptorCount()
        let path = broker.directory + "/orphan.txt"
        try writeFile(path, "orphaned but alive")
        let sharer = try Child(testPeer, ["share-and-hang", path, "60000"], environment: broker.environment)
        let keyText = try #require(try sharer.readLine())
        sharer.kill(SIGKILL)
        #expect(try sharer.wait() == .signaled(SIGKILL))
        // The dead client's connection is gone; the key's file is still held: baseline + 1.
        let afterKill = try broker.waitForDescriptorCount(baseline + 1)
        #expect(afterKill == baseline + 1, "baseline \(baseline), now \(afterKill)")
        #expect(try client.status().keys == 1)
        let claimed = try client.claim(try Key(parsing: keyText))
        #expect(try claimed.readToEnd() == Array("orphaned but alive".utf8))
        #expect(try broker.waitForDescriptorCount(baseline) == baseline)
    }

    @Test("a claimer killed before acknowledging gives the key back")
    func claimerKilledMidClaim() throws {
        // A raw client that claims and never acknowledges, then closes: the key must come back.
        let broker = try TestBroker()
        let client = try broker.connect()
        let key = try client.share(try openFile("/dev/null", flags: O_RDONLY))
        do {
            let raw = try SeqpacketSocket()
            try raw.connect(path: broker.socketPath)
            try raw.send(Request.keys(.claim(key.token)).encode(requestID: 9))
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 8)
            defer { buffer.deallocate() }
            let message = try raw.receive(into: buffer)
            let frame = try Frame.decode(Array(buffer[0..<message.length])[...])
            #expect(frame.kind == .reply)
            let descriptorsReceived = message.descriptors.count
            #expect(descriptorsReceived == 1)
            // The socket closes here without an acknowledgement.
        }
        // Our next request is served after the broker handled that close, on its one thread...
        // but on another connection, so wait for the observable outcome instead.
        let deadline = monotonicNanoseconds() + 30_000_000_000
        var claimed = false
        while !claimed && monotonicNanoseconds() < deadline {
            do {
                _ = try client.claim(key)
                claimed = true
            } catch {
                #expect(error.errno == .noSuchFileOrDirectory)
                usleep(5_000)
            }
        }
        #expect(claimed)
    }
}
