import ArgumentParser
import Glibc
import Patchbay
import PatchbayProtocol
import PatchbaySystem
import Synchronization
import SystemPackage

/// `patchbay caps ...`: DragonFly BSD's CAPS request/reply services.
struct CapsCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "caps",
        abstract: "Named request/reply services (DragonFly BSD CAPS).",
        subcommands: [Serve.self, Call.self, List.self, Top.self]
    )

    struct Serve: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Register NAME and answer every request.",
            discussion: "--echo replies with the request's bytes; --exec runs COMMAND per request, request on its stdin, reply from its stdout, and the client's credentials (the kernel's) in its environment: PATCHBAY_CAPS_CLIENT_PID, PATCHBAY_CAPS_CLIENT_UID, PATCHBAY_CAPS_CLIENT_EUID, PATCHBAY_CAPS_CLIENT_GID, and PATCHBAY_CAPS_MESSAGE_ID.")

        @Argument var name: String

        @Option(parsing: .unconditional, help: "Register under this uid (default: yours; -1: none).")
        var uid: Int32?

        @Option(parsing: .unconditional, help: "Register under this gid (default: none).")
        var gid: Int32 = -1

        @Option(parsing: .unconditional, help: "Access classes, comma-separated: user, group, world.")
        var allow: String = "user"

        @Flag(help: "Fail with EEXIST if a matching service is registered.")
        var exclusive = false

        @Flag(help: "Reply with the request's bytes.")
        var echo = false

        @Flag(help: "Show every message this service takes and answers to monitors of your uid (patchbay monitor): id, kind, length, client.")
        var tap = false

        @Flag(help: "As --tap, with each payload's first 256 bytes.")
        var tapPayload = false

        @Option(parsing: .unconditional, help: "Refuse requests larger than this unread, with EMSGSIZE (e.g. 64M, 512K).")
        var maxRequest: String = "64M"

        @Option(parsing: .unconditional, help: "Replies a client uid has not consumed yet may hold this much (e.g. 256M); past it, requests of that uid get EDQUOT.")
        var maxReplyBytesPerUid: String = "256M"

        @Option(parsing: .unconditional, help: "With --exec: a program that writes more than this is not read further and its request gets EMSGSIZE (e.g. 64M).")
        var maxReply: String = "64M"

        @Option(parsing: .unconditional, help: "With --exec: a program still running after this long is killed and its request gets ETIMEDOUT (e.g. 500ms, 30s, 5m, or never).")
        var execTimeout: String = "30s"

        @Option(parsing: .unconditional, help: "With --exec: programs run at once; more requests wait, each uid taking its turn.")
        var maxPrograms = 4

        @Option(parsing: .unconditional, help: "With --exec: programs run at once for one uid other than this service's (default: half of --max-programs, rounded up); its other requests wait.")
        var maxProgramsPerUid: Int?

        @Option(parsing: .remaining, help: "Run this command per request.")
        var exec: [String] = []

        func validate() throws {
            guard echo != !exec.isEmpty else { throw ValidationError("give exactly one of --echo and --exec COMMAND") }
        }

        func run() throws {
            let command = "caps serve"
            let access = parseAccess(allow, command)
            // (Each program has a thread of the service's waiting for it.)
            if !(1...1024).contains(maxPrograms) { failUsage(command, "--max-programs must be 1 to 1024") }
            let perUID = maxProgramsPerUid ?? (maxPrograms + 1) / 2
            if perUID < 1 { failUsage(command, "--max-programs-per-uid must be at least 1") }
            // A program that cannot run is found now, not at the first request.
            let program = exec.first.map { resolveProgram($0, for: command) }
            // A program that exits without reading its request must not kill the service.
            signal(SIGPIPE, SIG_IGN)
            // The program is started from a process started now, before anything from a client
            // is taken (ExecStarter says why).
            let starter = program.map { startExecStarter($0, arguments: Array(exec.dropFirst()), for: command) }
            // A server outlives broker restarts: it registers again when the broker is back.
            let broker = connectBroker(for: command, reconnect: .forever)
            let service = attempt(command) { () throws(PatchbayError) -> CapsService in
                try CapsService(broker, name: name, uid: uid ?? Int32(bitPattern: geteuid()), gid: gid, access: access,
                                exclusive: exclusive, tap: tapPayload ? .payloads : tap ? .headers : nil)
            }
            // Refused requests (a client past its in-flight limit) are reported once a second
            // at most, never once per request.
            startThread {
                var reported = (total: 0, pastLimit: 0)
                var registrations = 1
                while true {
                    sleep(1)
                    let now = service.registrations
                    if now != registrations {
                        registrations = now
                        writeStandardError("patchbay: caps serve: the broker restarted; \(name) is registered again (service \(service.serviceID))\n")
                    }
                    let refusals = service.refusals
                    guard refusals.total > reported.total else { continue }
                    let who = refusals.last.map { "; the last from pid \($0.pid), uid \($0.uid)" } ?? ""
                    let pastLimit = refusals.pastLimit - reported.pastLimit
                    let unreadable = refusals.total - reported.total - pastLimit
                    let reasons = [pastLimit > 0 ? "\(pastLimit) past a client's limit of \(service.maximumInFlight) in flight (ENOBUFS)" : nil,
                                   unreadable > 0 ? "\(unreadable) with a payload it could not read safely (EBADMSG)" : nil]
                    writeStandardError("patchbay: caps serve: refused \(reasons.compactMap { $0 }.joined(separator: " and "))\(who)\n")
                    reported = (refusals.total, refusals.pastLimit)
                }
            }
            let limit = parseSize(maxRequest, command)
            if limit <= 0 { failUsage(command, "--max-request must be positive") }
            let heldLimit = parseSize(maxReplyBytesPerUid, command)
            if heldLimit <= 0 { failUsage(command, "--max-reply-bytes-per-uid must be positive") }
            let replyLimit = parseSize(maxReply, command)
            if replyLimit < 0 { failUsage(command, "--max-reply must not be negative") }
            let timeout: UInt64 = switch DurationText.parse(execTimeout, for: command) {
            case .never: 0
            case .after(let duration): nanoseconds(duration)
            }
            let limits = FilterLimits(output: replyLimit, nanoseconds: timeout)
            let books = Mutex(HeldReplies(limit: heldLimit))
            let jobs = starter.map { starter in
                ExecJobs(slots: maxPrograms, perUID: perUID) { job in
                    Self.run(job, starter: starter, limits: limits, books: books, service: service)
                }
            }
            while true {
                do {
                    // In place: an attached payload is read where it is mapped, so a request is
                    // copied once, and one past --max-request is refused unread (a peer's hollow
                    // memfd of gigabytes costs it nothing, and this service no memory).
                    try service.receive { (message: CapsServiceMessage, payload: UnsafeRawBufferPointer) in
                        switch message.kind {
                        case .request:
                            answer(message, payload, limit: limit, books: books, service: service, jobs: jobs)
                        case .dispose, .aborted:
                            // A reply consumed; or a request its client took back or left behind
                            // (then a DISPOSE too), which need not run if it has not started.
                            let withdrawn = jobs?.withdraw(message.messageID, of: message.credentials.uid)
                            books.withLock { held in
                                held.consumed(message.messageID)
                                if let withdrawn { held.release(withdrawn.request.count, of: withdrawn.uid) }
                            }
                            // An aborted request is still this service's to answer: the reply,
                            // discarded unseen, frees the request's space at its client. (One
                            // whose client left gets none: it is DISPOSEd already.)
                            if message.kind == .aborted, withdrawn != nil {
                                try? service.reply(to: message.messageID, error: .canceled)
                            }
                        default:
                            break
                        }
                    }
                } catch {
                    fail(command, error)
                }
            }
        }

        /// A request taken off the ring: refused, echoed, or filed for its program.
        private func answer(_ message: CapsServiceMessage, _ payload: UnsafeRawBufferPointer, limit: Int,
                            books: borrowing Mutex<HeldReplies>, service: CapsService, jobs: ExecJobs?) {
            let uid = message.credentials.uid
            do {
                guard payload.count <= limit else {
                    writeStandardError("patchbay: caps serve: request \(message.messageID): \(payload.count) bytes, more than --max-request (\(limit)); refused with EMSGSIZE\n")
                    try service.reply(to: message.messageID, error: .messageTooLong)
                    return
                }
                // An echo's reply is as long as its request, and a request waiting for its
                // program is held as long as it waits: either is refused before the copy is made
                // (a program's reply is checked once it is known, in `run`).
                let (admitted, holding, bound) = books.withLock { held in
                    let admitted = held.admits(payload.count, of: uid)
                    if admitted, jobs != nil { held.hold(payload.count, for: uid) }
                    return (admitted, held.bytes(of: uid), held.limit)
                }
                guard admitted else {
                    writeStandardError("patchbay: caps serve: request \(message.messageID): uid \(uid)'s replies not consumed yet and requests waiting hold \(holding) bytes, --max-reply-bytes-per-uid is \(bound); refused with EDQUOT\n")
                    try service.reply(to: message.messageID, error: .diskQuotaExceeded)
                    return
                }
                let request = Array(payload)
                guard let jobs else {
                    try service.reply(to: message.messageID, request)
                    books.withLock { $0.replied(message.messageID, request.count, to: uid) }
                    return
                }
                let client = message.credentials
                jobs.submit(ExecJobs.Job(origin: ProgramPeer(pid: client.pid, uid: client.uid, euid: client.euid, gid: client.gid,
                                                             messageID: message.messageID),
                                         request: request))
            } catch {
                writeStandardError("patchbay: caps serve: \(error.errno.name): \(error.reason)\n")
            }
        }

        /// A request's program, on a slot's thread, and its answer.
        private static func run(_ job: ExecJobs.Job, starter: ExecStarter, limits: FilterLimits,
                                books: borrowing Mutex<HeldReplies>, service: CapsService) {
            let answer = runFilter(starter, input: job.request, limits: limits, origin: job.origin)
            do throws(PatchbayError) {
                // Booked before it is sent: its DISPOSE may come back before `reply` returns.
                let admitted = books.withLock { held in
                    held.release(job.request.count, of: job.uid)
                    guard case .success(let bytes) = answer else { return true }
                    guard held.admits(bytes.count, of: job.uid) else { return false }
                    held.replied(job.messageID, bytes.count, to: job.uid)
                    return true
                }
                switch answer {
                case .success(let bytes) where !admitted:
                    writeStandardError("patchbay: caps serve: request \(job.messageID): a \(bytes.count)-byte reply would take uid \(job.uid)'s replies not consumed yet past --max-reply-bytes-per-uid; refused with EDQUOT\n")
                    try service.reply(to: job.messageID, error: .diskQuotaExceeded)
                case .success(let bytes):
                    do throws(PatchbayError) {
                        try service.reply(to: job.messageID, bytes)
                    } catch {
                        books.withLock { $0.consumed(job.messageID) }  // no DISPOSE will come
                        throw error
                    }
                case .failure(let failure):
                    // Never an empty reply the caller would take for an answer: an error
                    // reply (EIO, ETIMEDOUT or EMSGSIZE), and the reason here.
                    writeStandardError("patchbay: caps serve: request \(job.messageID): \(failure.reason); refused with \(failure.errno.name)\n")
                    try service.reply(to: job.messageID, error: failure.errno)
                }
            } catch {
                // (A request its client aborted, or whose client left, while it ran: EINVAL.)
                writeStandardError("patchbay: caps serve: \(error.errno.name): \(error.reason)\n")
            }
            // Without its starter the service can answer nothing again: it stops, failing,
            // rather than refuse every request from now on. Here, on the slot's thread, once the
            // request that found it gone has had its error reply (the service's own thread could
            // see the starter gone first, and exit before that reply went).
            if starter.isGone {
                fail("caps serve", .ioError, "the process that runs \(starter.program) is gone; no request can be answered any more")
            }
        }
    }

    struct Call: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Send DATA (or stdin) to service NAME and print the reply.")

        @Argument var name: String

        @Argument(help: "The request (default: stdin).")
        var data: String?

        @Option(parsing: .unconditional, help: "Only a service registered under this uid.")
        var uid: Int32 = -1

        @Option(parsing: .unconditional, help: "Only a service registered under this gid.")
        var gid: Int32 = -1

        @Option(parsing: .unconditional, help: "Access classes, comma-separated: user, group, world.")
        var allow: String = "user,group,world"

        @Flag(help: "Wait for the service to register instead of failing with ENOENT.")
        var waitForService = false

        @Option(parsing: .unconditional, help: "Refuse a reply larger than this, unread, with EMSGSIZE (e.g. 64M, 512K).")
        var maxReply: String = "64M"

        @Option(parsing: .unconditional, help: "Give up when the reply has not come this long after the command began, waiting for the service included (e.g. 500ms, 2s): ETIMEDOUT. Default: never.")
        var timeout: String = "never"

        func run() throws {
            let command = "caps call"
            let access = parseAccess(allow, command)
            let limit = parseSize(maxReply, command)
            if limit <= 0 { failUsage(command, "--max-reply must be positive") }
            let patience = DurationText.parse(timeout, for: command)
            let request = data.map { Array($0.utf8) } ?? readStandardInput(for: "caps call")
            let broker = connectBroker(for: command)
            // A service that does not register, or never answers (stopped, or another user's that
            // chooses not to), is given up on at the deadline: the wait for it, or for its reply,
            // is cancelled (the request abandoned: its reply, if one comes, is disposed of unread)
            // and the process exits.
            let deadline = CallDeadline()
            if case .after(let duration) = patience {
                startThread {
                    let (seconds, attoseconds) = duration.components
                    var pause = timespec(tv_sec: Int(seconds), tv_nsec: Int(attoseconds / 1_000_000_000))
                    var left = timespec()
                    while nanosleep(&pause, &left) != 0 && errno == EINTR { pause = left }
                    deadline.expire()
                }
            }
            func timedOut() -> Never {
                fail(command, .timedOut, "no reply from the service \(name) within \(timeout)"
                     + (deadline.connected ? "; the request is abandoned" : " (it was not there to take the request)"))
            }
            let client: CapsClient
            do {
                client = try CapsClient(broker, name: name, uid: uid, gid: gid, access: access, waitForService: waitForService,
                                        attempt: deadline.attempt)
            } catch where error.errno == .canceled && patience != .never {
                timedOut()
            } catch {
                fail(command, error)
            }
            deadline.connect(client)
            // Read in place and copied once, after its length is checked: a service's attached
            // reply of gigabytes it never wrote costs it nothing, and this process nothing either.
            let reply: [UInt8]
            do {
                reply = try client.call(request, maxReplyLength: limit)
                deadline.answered()
            } catch where error.errno == .canceled && patience != .never {
                timedOut()
            } catch {
                fail(command, error)
            }
            writeStandardOutput(bytes: reply)
        }
    }

    /// `caps call --timeout`: at the deadline, the command's wait for its service, or for the
    /// reply, whichever it is in, is cancelled (nothing once the reply is in).
    final class CallDeadline: Sendable {
        let attempt = CapsConnectAttempt()
        private let state = Mutex<(client: CapsClient?, expired: Bool, answered: Bool)>((nil, false, false))

        var connected: Bool { state.withLock { $0.client != nil } }

        func connect(_ client: CapsClient) {
            state.withLock { state in
                state.client = client
                // Expired while the connection was being made: the call's wait ends at once.
                if state.expired { client.cancelWait() }
            }
        }

        func answered() { state.withLock { $0.answered = true } }

        func expire() {
            let waiting = state.withLock { state -> Bool in
                guard !state.answered else { return false }
                state.expired = true
                state.client?.cancelWait()
                return state.client == nil
            }
            if waiting { attempt.cancel() }
        }
    }

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "ls", abstract: "List services.")

        @Flag(help: "Print JSON.")
        var json = false

        func run() throws {
            let broker = connectBroker(for: "caps ls")
            let services = attempt("caps ls") { () throws(PatchbayError) in try broker.listServices() }
            if json {
                writeStandardOutput(JSON.array(services.map { service in
                    JSON.object([
                        ("name", JSON.string(service.name)), ("uid", "\(service.uid)"), ("gid", "\(service.gid)"),
                        ("flags", JSON.string(flagNames(service.flags))), ("clients", "\(service.clients)"),
                        ("generation", "\(service.generation)"), ("pid", "\(service.pid)"),
                    ])
                }) + "\n")
                return
            }
            var out = "NAME                 UID     GID     FLAGS             CLIENTS  GENERATION  PID\n"
            for service in services {
                out += service.name.padding(21) + "\(service.uid)".padding(8) + "\(service.gid)".padding(8)
                    + flagNames(service.flags).padding(18) + "\(service.clients)".padding(9)
                    + "\(service.generation)".padding(12) + "\(service.pid)\n"
            }
            writeStandardOutput(out)
        }
    }
}

extension CapsCommand {
    /// `patchbay caps top`: every channel's traffic, refreshed, from the rings' words.
    struct Top: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Show CAPS traffic per service and client, refreshed (from the channels' ring words).",
            discussion: """
            Per channel: the service, the client's pid and uid, the request-ring entries the \
            service took and the replies it put since the client connected, both per second over \
            the last interval, and what is in flight: requests put and not yet taken by the \
            service, replies put and not yet taken by the client. Counts are ring entries (the \
            request ring also carries ABORTs; a DISPOSE is the client's reply head moving past a \
            reply, so replies taken count them), read by the broker from the channel \
            headers, never from the messages; each side writes its own words. Root sees every \
            channel; another user of the system broker, those of its services and its clients.
            """)

        @Option(parsing: .unconditional, help: "Time between refreshes: 500ms, 1s, 2s.")
        var interval = "1s"

        @Option(parsing: .unconditional, help: "Stop after this many refreshes (default: until interrupted).")
        var count: Int?

        @Flag(help: "Print one JSON object per channel per refresh instead of the table.")
        var json = false

        func run() throws {
            guard case .after(let period) = DurationText.parse(interval, for: "caps top"), period >= .milliseconds(10) else {
                failUsage("caps top", "--interval must be a duration of at least 10ms, such as 500ms or 1s")
            }
            if let count, count < 1 { failUsage("caps top", "--count must be at least 1") }
            let broker = connectBroker(for: "caps top")
            let seconds = Double(period.components.seconds) + Double(period.components.attoseconds) / 1e18
            let terminal = !json && isatty(STDOUT_FILENO) == 1
            var previous: [UInt64: CapsChannelTraffic] = [:]
            var previousTime: UInt64 = 0
            var refresh = 0
            while count.map({ refresh < $0 }) ?? true {
                if refresh > 0 { usleep(useconds_t(seconds * 1e6)) }
                let channels = attempt("caps top") { () throws(PatchbayError) in try broker.capsTraffic() }
                let now = monotonicNanoseconds()
                let elapsed = previousTime == 0 ? 0 : Double(now - previousTime) / 1e9
                var out = terminal ? "\u{1B}[H\u{1B}[2J" : ""
                if !json {
                    out += "SERVICE              CHANNEL     CLIENT PID  UID     TAKEN      REPLIED    REQ/S      REP/S      REQ WAITING  REP WAITING\n"
                }
                for channel in channels {
                    let before = previous[channel.channelID]
                    func rate(_ now: UInt64, _ then: UInt64?) -> String {
                        guard let then, elapsed > 0, now >= then else { return "—" }
                        return "\(Int((Double(now - then) / elapsed).rounded()))"
                    }
                    let requestRate = rate(channel.requestsTaken, before?.requestsTaken)
                    let replyRate = rate(channel.repliesPut, before?.repliesPut)
                    let waitingRequests = channel.requestsPut >= channel.requestsTaken ? channel.requestsPut - channel.requestsTaken : 0
                    let waitingReplies = channel.repliesPut >= channel.repliesTaken ? channel.repliesPut - channel.repliesTaken : 0
                    if json {
                        out += JSON.object([
                            ("refresh", "\(refresh)"), ("service", JSON.string(channel.service)),
                            ("service_uid", "\(channel.serviceUID)"), ("service_pid", "\(channel.servicePID)"),
                            ("channel", "\(channel.channelID)"), ("client_pid", "\(channel.clientPID)"),
                            ("client_uid", "\(channel.clientUID)"), ("requests_put", "\(channel.requestsPut)"),
                            ("requests_taken", "\(channel.requestsTaken)"), ("replies_put", "\(channel.repliesPut)"),
                            ("replies_taken", "\(channel.repliesTaken)"),
                            ("requests_per_second", requestRate == "—" ? "null" : requestRate),
                            ("replies_per_second", replyRate == "—" ? "null" : replyRate),
                        ]) + "\n"
                    } else {
                        out += channel.service.padding(21) + "\(channel.channelID)".padding(12) + "\(channel.clientPID)".padding(12)
                            + "\(channel.clientUID)".padding(8) + "\(channel.requestsTaken)".padding(11)
                            + "\(channel.repliesPut)".padding(11) + requestRate.padding(11) + replyRate.padding(11)
                            + "\(waitingRequests)".padding(13) + "\(waitingReplies)\n"
                    }
                }
                if !json && !terminal { out += "\n" }
                writeStandardOutput(out)
                previous = Dictionary(channels.map { ($0.channelID, $0) }, uniquingKeysWith: { first, _ in first })
                previousTime = now
                refresh += 1
            }
        }
    }
}

func parseAccess(_ text: String, _ command: String) -> CapsAccess {
    var access: CapsAccess = []
    for word in text.split(separator: ",") {
        switch word {
        case "user": access.insert(.user)
        case "group": access.insert(.group)
        case "world": access.insert(.world)
        default: failUsage(command, "\"\(word)\" is not an access class; use user, group, world")
        }
    }
    return access
}

func flagNames(_ flags: UInt32) -> String {
    var names: [String] = []
    let flags = CapsFlags(rawValue: flags)
    if flags.contains(.user) { names.append("user") }
    if flags.contains(.group) { names.append("group") }
    if flags.contains(.world) { names.append("world") }
    if flags.contains(.exclusive) { names.append("exclusive") }
    return names.joined(separator: ",")
}

/// All of stdin, or the command fails (a read error is never taken for the end of the input:
/// `caps call NAME < /tmp` sent an empty request and exited 0).
func readStandardInput(for command: String) -> [UInt8] {
    var result: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 65536)
    while true {
        let count = chunk.withUnsafeMutableBytes { Glibc.read(0, $0.baseAddress, $0.count) }
        if count < 0 && errno == EINTR { continue }
        if count < 0 { fail(command, Errno.current, "reading stdin failed") }
        if count == 0 { return result }
        result += chunk[0..<count]
    }
}

/// Runs `command` with `input` on its stdin and returns its stdout.
/// Why `--exec`'s program gave no answer.
struct FilterFailure: Error {
    var reason: String
    /// The errno of the error reply: `EIO` unless the program ran out of time (`ETIMEDOUT`) or
    /// wrote more than a reply may hold (`EMSGSIZE`).
    var errno: Errno = .ioError
}

/// How much a `--exec` program may write and how long it may run, for one request.
struct FilterLimits {
    var output: Int
    var nanoseconds: UInt64
}

/// Runs the starter's program with `input` on its stdin; its stdout is the answer, if it exits 0
/// within `limits`. A program that writes more than `limits.output` bytes is not read further (its
/// next write fails, `EPIPE`), and one that runs longer than `limits.nanoseconds` is killed by
/// the starter; this side stops reading at that deadline too, so that a process the program left
/// behind holding its stdout cannot hold the service.
func runFilter(_ starter: ExecStarter, input: [UInt8], limits: FilterLimits,
               origin: ProgramPeer? = nil) -> Result<[UInt8], FilterFailure> {
    let program = starter.program
    guard let stdin = try? Pipe(), let stdout = try? Pipe() else {
        return .failure(FilterFailure(reason: "cannot make pipes for \(program)"))
    }
    let writer = stdin.writeEnd
    let reader = stdout.readEnd
    // (The program's ends are closed here once sent: the program's output ends when it exits.)
    let tag = starter.start(stdin: stdin.readEnd.rawValue, stdout: stdout.writeEnd.rawValue, limit: limits.nanoseconds,
                            peer: origin)
    _ = consume stdin.readEnd
    stdout.writeEnd.close()
    guard let tag else { return .failure(FilterFailure(reason: "cannot run \(program): its starter is gone")) }
    // Feed the input from a thread so a command that writes before reading all cannot deadlock.
    let fd = dup(writer.rawValue)
    _ = consume writer
    let payload = input
    startThread {
        let sink = PatchbaySystem.Descriptor(adopting: fd)
        try? sink.writeAll(payload)
    }
    // A second past the starter's deadline: its kill, and the end of the output, come first.
    // No deadline when the program may run for ever.
    let readingEnds = limits.nanoseconds == 0 ? UInt64.max : deadline(afterNanoseconds: limits.nanoseconds &+ 1_000_000_000)
    let output = readOutput(reader, limit: limits.output, deadline: readingEnds)
    _ = consume reader
    let ended = starter.wait(tag)
    switch (output, ended) {
    case (_, .failure(let failure)):
        return .failure(failure)
    case (.tooLong, _):
        return .failure(FilterFailure(reason: "\(program) wrote more than --max-reply (\(limits.output) bytes)", errno: .messageTooLong))
    case (.late, _):
        return .failure(FilterFailure(reason: "\(program)'s output did not end within --exec-timeout", errno: .timedOut))
    case (_, .success(let termination)) where termination != .exited(0):
        return .failure(FilterFailure(reason: "\(program) \(termination)"))
    case (.bytes(let bytes), .success):
        return .success(bytes)
    }
}

/// What `readOutput` got.
enum FilterOutput {
    case bytes([UInt8])
    /// More than the limit: reading stopped there.
    case tooLong
    /// No end of the output by the deadline.
    case late
}

/// Reads `reader` to its end, at most `limit` bytes and until `deadline` (monotonic).
func readOutput(_ reader: borrowing PatchbaySystem.Descriptor, limit: Int, deadline: UInt64) -> FilterOutput {
    var output: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 65536)
    while true {
        guard waitReadable(reader.rawValue, until: deadline) else { return .late }
        let count = chunk.withUnsafeMutableBytes { Glibc.read(reader.rawValue, $0.baseAddress, $0.count) }
        if count < 0 && (errno == EINTR || errno == EAGAIN) { continue }
        if count <= 0 { return .bytes(output) }
        guard output.count + count <= limit else { return .tooLong }
        output += chunk[0..<count]
    }
}

/// What `caps serve`'s replies not consumed yet hold, per client uid: a reply's memory (in the
/// channel's arena, or a memfd of its own) is this service's until its client consumes it (its
/// DISPOSE), so a client that never does could otherwise make the service hold gigabytes.
struct HeldReplies {
    let limit: Int
    private var replies: [UInt64: (uid: UInt32, bytes: Int)] = [:]
    private var perUid: [UInt32: Int] = [:]

    init(limit: Int) {
        self.limit = limit
    }

    func bytes(of uid: UInt32) -> Int { perUid[uid] ?? 0 }

    /// Whether a reply of `bytes` more keeps `uid` within the limit.
    func admits(_ bytes: Int, of uid: UInt32) -> Bool { bytes <= limit - self.bytes(of: uid) }

    mutating func replied(_ messageID: UInt64, _ bytes: Int, to uid: UInt32) {
        replies[messageID] = (uid, bytes)
        hold(bytes, for: uid)
    }

    /// A request's copy, waiting for its program: held for `uid` until `release`.
    mutating func hold(_ bytes: Int, for uid: UInt32) {
        perUid[uid, default: 0] += bytes
    }

    mutating func release(_ bytes: Int, of uid: UInt32) {
        let left = (perUid[uid] ?? 0) - bytes
        perUid[uid] = left > 0 ? left : nil
    }

    /// A DISPOSE (the client consumed the reply, or went away without).
    mutating func consumed(_ messageID: UInt64) {
        guard let reply = replies.removeValue(forKey: messageID) else { return }
        release(reply.bytes, of: reply.uid)
    }
}
