import ArgumentParser
import Glibc
import Patchbay
import PatchbaySystem
import SystemPackage

/// `patchbay share`: hands a file or an inherited descriptor to the broker, prints the key.
struct ShareCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "share",
        abstract: "Share a file (or an inherited descriptor) and print its one-time key.",
        discussion: "The key alone goes to stdout, so `key=$(patchbay share FILE)` works."
    )

    @Option(parsing: .unconditional, help: "How long the key stays claimable: 500ms, 30s, 5m, 1h or never.")
    var timeout = "60s"

    @Option(name: .customLong("for-uid"), parsing: .unconditional, help: ArgumentHelp("Only this user may claim the key.", valueName: "uid-or-name"))
    var forUser: String?

    @Option(name: .customLong("for-gid"), parsing: .unconditional, help: ArgumentHelp("Only members of this group may claim the key.", valueName: "gid-or-name"))
    var forGroup: String?

    @Option(name: .customLong("for-pid"), parsing: .unconditional, help: "Only this process may claim the key.")
    var forPID: Int32?

    @Option(parsing: .unconditional, help: "Share this already-open descriptor instead of opening a path.")
    var fd: Int32?

    @Flag(help: "Open PATH for reading and writing (default: read-only).")
    var write = false

    @Argument(help: "The file to share.")
    var path: String?

    func validate() throws {
        if (fd == nil) == (path == nil) {
            throw ValidationError("give either PATH or --fd N")
        }
        if [forUser != nil, forGroup != nil, forPID != nil].filter({ $0 }).count > 1 {
            throw ValidationError("--for-uid, --for-gid and --for-pid exclude each other")
        }
        if fd != nil && write {
            throw ValidationError("--write applies to PATH, not to --fd")
        }
        // Checked before the broker connection exists, which could otherwise be descriptor N.
        if let fd, fcntl(fd, F_GETFD) < 0 {
            fail("share", .badFileDescriptor, "descriptor \(fd) is not open in this process")
        }
    }

    func run() throws {
        let expiry = DurationText.parse(timeout, for: "share")
        let restriction: ClaimRestriction? =
            forUser.map { .uid(userID($0, for: "share")) } ?? forGroup.map { .gid(groupID($0, for: "share")) } ?? forPID.map { .pid($0) }
        let broker = connectBroker(for: "share")
        let key: Key
        do {
            if let fd {
                key = try broker.share(rawDescriptor: fd, timeout: expiry, claimableBy: restriction)
            } else {
                let file: PatchbaySystem.Descriptor
                do {
                    file = try openFile(path!, flags: write ? O_RDWR : O_RDONLY)
                } catch {
                    fail("share", error, "cannot open \(path!)")
                }
                key = try broker.share(rawDescriptor: file.rawValue, timeout: expiry, claimableBy: restriction)
            }
        } catch {
            fail("share", error)
        }
        writeStandardOutput(key.text + "\n")
    }
}

/// `patchbay claim KEY [-- COMMAND [ARGS...]]`.
struct ClaimCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "claim",
        abstract: "Claim a shared file by its key.",
        discussion: """
            With a command, runs it with the claimed file as descriptor 3 and PATCHBAY_FD=3 in its \
            environment. Without, copies the file's readable contents to stdout. A key on a command \
            line can be read by every local user (/proc/PID/cmdline) until it is claimed: give - \
            to read it from the first line of stdin instead.
            """
    )

    @Argument(help: "The key printed by `patchbay share`, or - to read it from stdin.")
    var key: String

    @Argument(parsing: .postTerminator, help: "A command to run with the file as descriptor 3.")
    var command: [String] = []

    func run() throws {
        let text = key == "-" ? (readLine(strippingNewline: true) ?? "") : key
        if key != "-" { scrubArgument(key) }
        let parsed: Key
        do {
            parsed = try Key(parsing: String(text.filter { $0 != " " && $0 != "\t" && $0 != "\r" }))
        } catch {
            // A key on the command line that does not parse is a usage error like any other
            // value's (64); one read from stdin is input, not the command line (1).
            fail("claim", error, status: key == "-" ? ExitStatus.failed : ExitStatus.usage)
        }
        // A program that cannot run is found before the key is spent.
        let program = command.first.map { resolveProgram($0, for: "claim") }
        let file = claimFile(parsed)
        if let program {
            execute(program, command, with: file)
        } else {
            refuseUncopyable(file)
            copyToStandardOutput(file)
            // Not closed here: the sharer chose the file, and its last close can wait (a socket
            // with SO_LINGER, or a local socket holding one). The process's exit closes it
            // without anyone waiting.
            _ = file.release()
        }
    }

    /// Blanks the key in this process's own argument memory, which other users can read through
    /// /proc/PID/cmdline: it narrows the window (from start until now) in which it shows there.
    private func scrubArgument(_ text: String) {
        for index in 0..<Int(CommandLine.argc) {
            guard let argument = CommandLine.unsafeArgv[index], String(cString: argument) == text else { continue }
            memset(argument, 0x2A, strlen(argument))  // '*'
        }
    }

    /// Without a command the file is copied to stdout; a directory cannot be. The key is spent by
    /// now, so say what arrived and how to use it next time.
    private func refuseUncopyable(_ file: borrowing Patchbay.Descriptor) {
        var info = stat()
        guard fstat(file.rawValue, &info) == 0, info.st_mode & S_IFMT == S_IFDIR else { return }
        fail("claim", .isDirectory,
             "the claimed file is a directory, which cannot be copied to stdout; the key is used up. Run a command with it instead: patchbay claim KEY -- ls -l /dev/fd/3")
    }

    /// Claims in a scope of its own, so the broker connection is closed before the file is
    /// moved to descriptor 3 (which the connection may well occupy).
    private func claimFile(_ key: Key) -> Patchbay.Descriptor {
        let broker = connectBroker(for: "claim")
        do {
            return try broker.claim(key)
        } catch {
            fail("claim", error)
        }
    }

    private func copyToStandardOutput(_ file: borrowing Patchbay.Descriptor) {
        var chunk = [UInt8](repeating: 0, count: 65536)
        // A local socket's messages can carry descriptors: a plain read would drop them, and their
        // last closes would happen in this thread (one can wait). They are received instead and
        // left open for the process's exit to close; a socket that carries too many is refused.
        let local = mayHoldDescriptors(file.rawValue)
        // A socket of messages (seqpacket, datagram): each is read whole, however long, and one
        // of 0 bytes is not the end; the end is the peer gone with no byte left.
        var type: CInt = 0
        var typeLength = socklen_t(MemoryLayout<CInt>.size)
        let messages = local && getsockopt(file.rawValue, SOL_SOCKET, SO_TYPE, &type, &typeLength) == 0
            && type != CInt(SOCK_STREAM.rawValue)
        var carried = 0
        while true {
            let count: Int
            if local {
                if messages {
                    let next = recv(file.rawValue, nil, 0, CInt(MSG_PEEK | MSG_TRUNC))
                    if next < 0 {
                        if errno == EINTR { continue }
                        fail("claim", Errno.current, "reading the claimed socket failed")
                    }
                    if next > chunk.count { chunk = [UInt8](repeating: 0, count: next) }
                }
                guard let received = chunk.withUnsafeMutableBytes({ SeqpacketSocket.receiveRaw(file.rawValue, $0) }) else {
                    if errno == EINTR { continue }
                    fail("claim", Errno.current, "reading the claimed socket failed")
                }
                count = received.length
                if received.truncated {
                    // Longer than its length a moment before: another holder of the socket read
                    // in between. The rest of it is lost, and the copy must not end as if whole.
                    fail("claim", .messageTooLong, "a message of the claimed socket was cut (another process reads it too); the copy is not whole")
                }
                carried += received.descriptors.count
                if carried > 512 {
                    fail("claim", .tooManyOpenFiles,
                         "the claimed socket's messages carried more than 512 descriptors; stopped reading it")
                }
                if count == 0 && messages && !Self.messagesEnded(file.rawValue) { continue }
            } else {
                do {
                    count = try chunk.withUnsafeMutableBytes { raw in
                        Result { () throws(PatchbayError) -> Int in try file.read(into: raw) }
                    }.get()
                } catch {
                    fail("claim", error.errno, "reading the claimed file failed")
                }
            }
            if count == 0 { return }
            var offset = 0
            while offset < count {
                let written = chunk[offset..<count].withUnsafeBytes { Glibc.write(1, $0.baseAddress, $0.count) }
                if written < 0 {
                    if errno == EINTR { continue }
                    fail("claim", Errno.current, "writing to stdout failed")
                }
                offset += written
            }
        }
    }

    /// After a read of 0 bytes from a socket of messages: whether that was its end (the peer gone,
    /// no byte left queued) rather than a message of 0 bytes.
    private static func messagesEnded(_ fd: CInt) -> Bool {
        let peerGone: Int16 = 0x2000  // POLLRDHUP, which Glibc's module leaves out (_GNU_SOURCE)
        var poller = pollfd(fd: fd, events: Int16(POLLIN) | peerGone, revents: 0)
        guard poll(&poller, 1, 0) == 1, poller.revents & (peerGone | Int16(POLLHUP)) != 0 else { return false }
        var queued: CInt = 0
        return ioctl(fd, UInt(FIONREAD), &queued) != 0 || queued == 0
    }

    private func execute(_ program: String, _ command: [String], with file: consuming Patchbay.Descriptor) -> Never {
        let raw = file.release().rawValue
        if raw == 3 {
            _ = fcntl(3, F_SETFD, 0)  // dup2 onto itself would leave close-on-exec set
        } else {
            if dup2(raw, 3) < 0 {
                fail("claim", Errno.current, "cannot place the claimed file at descriptor 3")
            }
            close(raw)
        }
        setenv("PATCHBAY_FD", "3", 1)
        let argv = command.map { strdup($0) } + [nil]
        execv(program, argv)
        let error = Errno.current
        fail("claim", error, "cannot run \(command[0])", status: ExitStatus.cannotRun)
    }
}
