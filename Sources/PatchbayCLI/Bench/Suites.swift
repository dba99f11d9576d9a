import Glibc
import Patchbay
import PatchbaySystem
import SystemPackage

extension Bench {
    private func printHeader() {
        if !json && rows.isEmpty { writeStandardOutput("\n" + Bench.header()) }
    }

    // MARK: CAPS

    func caps() throws {
        printHeader()
        let spinCount = iterations(200_000)
        let sleepCount = iterations(20_000)
        let broker = try Broker(socketPath: socketPath)
        let seqpacket = try socketPingPong(type: CInt(SOCK_SEQPACKET.rawValue), size: 64, count: sleepCount)

        CapsTuning.spinNanoseconds = 20_000
        let echo = try peer("caps-echo", ["--name", "bench.caps", "--spin", "20000"])
        defer { echo.stop() }
        let client = try CapsClient(broker, name: "bench.caps")
        func roundTrip(_ length: Int) throws {
            _ = try client.put(length: length) { buffer in
                if length <= 64 { buffer.initializeMemory(as: UInt8.self, repeating: 1) } else {
                    buffer.storeBytes(of: 1, as: UInt64.self)
                }
            }
            try client.waitReply { _, _ in }
        }
        // The floor and the round trip, alternating in rounds (the spinning echo peer runs only
        // during its own rounds: two spinners on one CPU would measure each other). Back to back,
        // 16 to a sample: a clock read between round trips costs more than a crossing, and gives
        // the service time to finish the last DISPOSE before the next request comes, which a
        // caller that calls again at once does not.
        let group = 16
        let spinPairs = try paired(count: spinCount / group,
                                   baseline: { count in try sharedMemoryPingPong(sleeping: false, count: count, grouping: group) },
                                   subject: { count in try measure(count, grouping: group) { try roundTrip(64) } })
        let caps64 = spinPairs.subject
        addPaired("CAPS round trip, 64 B, spinning peers", spinPairs, baseline: "shm pure-spin ping-pong", target: "≤ 2×", limit: 2)
        // The same, each round trip timed alone (how this row was measured until 2026-11-27).
        let onePairs = try paired(count: spinCount, baseline: { count in try sharedMemoryPingPong(sleeping: false, count: count) },
                                  subject: { count in try measure(count) { try roundTrip(64) } })
        var timedAlone = BenchRow(name: "CAPS round trip, 64 B, each timed alone", samples: onePairs.subject,
                                  baseline: "shm pure-spin, each timed alone", baselineSamples: onePairs.baseline,
                                  target: "(clock read in each)", met: nil)
        timedAlone.roundRatios = onePairs.ratios
        add(timedAlone)
        add(BenchRow(name: "CAPS round trip, 64 B, spinning peers", samples: caps64, baseline: "AF_UNIX seqpacket ping-pong",
                     baselineSamples: seqpacket, target: "≤ 0.02×", met: ratio(caps64, seqpacket) <= 0.02))
        // The software alone: both ports in this thread, so nothing crosses CPUs and nothing
        // waits. What the spinning round trip costs beyond this is the crossing itself.
        let selfService = try CapsService(broker, name: "bench.self", access: [.world])
        let selfClient = try CapsClient(broker, name: "bench.self")
        let software = try measure(spinCount / group, grouping: group) {
            _ = try selfClient.put(length: 64) { $0.initializeMemory(as: UInt8.self, repeating: 1) }
            try selfService.receive { (message: CapsServiceMessage, payload: UnsafeRawBufferPointer) -> Void in
                _ = try? selfService.reply(to: message.messageID, length: payload.count) { buffer in
                    buffer.baseAddress!.copyMemory(from: payload.baseAddress!, byteCount: payload.count)
                }
            }
            try selfClient.waitReply { _, _ in }
            try selfService.receive { (_: CapsServiceMessage, _: UnsafeRawBufferPointer) in }
        }
        add(BenchRow(name: "CAPS round trip, 64 B, one thread (software)", samples: software,
                     baseline: "CAPS 64 B round trip (spinning)", baselineSamples: caps64, target: "(software share)", met: nil))
        // The same round trip from C: pb_caps_call through libpatchbay's C ABI, which copies the
        // request in and the reply out; the Swift round trip it is compared with makes the same
        // copies (reading the reply costs a cache line that the in-place rows never read).
        // The rows compared with the 64 B round trip are paired with it too: the vCPUs' placement
        // can change between rows, and a ratio must compare figures taken under one placement.
        if let library = CLibrary.load() {
            let caller = try library.caller(socketPath: socketPath, service: "bench.caps", length: 64)
            let request = [UInt8](repeating: 1, count: 64)
            var reply = [UInt8](repeating: 0, count: 64)
            func copyingRoundTrip() throws {
                _ = try client.put(length: request.count) { buffer in request.withUnsafeBytes { buffer.copyMemory(from: $0) } }
                try reply.withUnsafeMutableBytes { out in
                    try client.waitReply { _, bytes in out.copyMemory(from: UnsafeRawBufferPointer(rebasing: bytes.prefix(out.count))) }
                }
            }
            let pairs = try paired(count: spinCount, baseline: { count in try measure(count) { try copyingRoundTrip() } },
                                   subject: { count in try measure(count) { try caller.roundTrip() } })
            addPaired("CAPS round trip, 64 B, from C (pb_caps_call)", pairs, baseline: "the Swift round trip, copying",
                      target: "≤ 1.2×", limit: 1.2)
        } else {
            writeStandardError("patchbay: bench: the C row is skipped: no libpatchbay (build it with swift build -c release, or set PATCHBAY_LIBRARY)\n")
        }
        for size in [1 << 20, 4 << 20] {
            let pairs = try paired(count: iterations(20_000), baseline: { count in try measure(count) { try roundTrip(64) } },
                                   subject: { count in try measure(count) { try roundTrip(size) } })
            addPaired("CAPS round trip, \(size >> 20) MiB in place", pairs, baseline: "CAPS 64 B round trip", target: "≤ 1.1×", limit: 1.1)
        }
        // A batch of 16 requests put at once, then their 16 replies: per message, against the
        // same pattern over a seqpacket socket pair.
        let batch = 16
        let batched = try measure(iterations(20_000)) {
            for _ in 0..<batch { try roundTripPut(client) }
            for _ in 0..<batch { try client.waitReply { _, _ in } }
        }
        let socketBatched = try seqpacketBatches(batch: batch, count: iterations(20_000))
        add(BenchRow(name: "CAPS batch of 16 requests, per message", samples: batched.perMessage(batch), baseline: "AF_UNIX seqpacket, batch of 16",
                     baselineSamples: socketBatched.perMessage(batch), target: "≤ 0.2×",
                     met: ratio(batched, socketBatched) <= 0.2))
        // Several clients of one service: 4 connections, one request in flight on each, against
        // one connection with 4 in flight (what the service's scan of its channels costs).
        let clients = try (0..<4).map { _ in try CapsClient(broker, name: "bench.caps") }
        let fourClients = try measure(iterations(50_000)) {
            for each in clients { try roundTripPut(each) }
            for each in clients { try each.waitReply { _, _ in } }
        }
        let oneClient = try measure(iterations(50_000)) {
            for _ in 0..<clients.count { try roundTripPut(client) }
            for _ in 0..<clients.count { try client.waitReply { _, _ in } }
        }
        add(BenchRow(name: "CAPS 4 clients, 1 request each, per round", samples: fourClients, baseline: "CAPS 1 client, 4 requests",
                     baselineSamples: oneClient, target: "≤ 1.5×", met: ratio(fourClients, oneClient) <= 1.5))
        // Pipelined: a window of 64 requests in flight.
        let total = iterations(400_000)
        let window = 64
        let capsRate = try throughput(total) { count in
            for _ in 0..<window { try roundTripPut(client) }
            for _ in 0..<(count - window) {
                try client.waitReply { _, _ in }
                try roundTripPut(client)
            }
            for _ in 0..<window { try client.waitReply { _, _ in } }
        }
        let socketRate = try seqpacketPipelined(total: total, window: window)
        add(BenchRow(name: "CAPS pipelined throughput, 64 B (window 64)", samples: Samples([capsRate]),
                     baseline: "AF_UNIX seqpacket pipelined", baselineSamples: Samples([socketRate]), target: "≥ 10×",
                     met: Double(capsRate) >= 10 * Double(socketRate), unit: "msg/s",
                     ratioOverride: Double(capsRate) / Double(max(socketRate, 1))))
        echo.stop()

        // Sleeping forced on both sides: every hop is a futex/epoll wake-up.
        CapsTuning.spinNanoseconds = 0
        defer { CapsTuning.spinNanoseconds = 20_000 }
        let sleeper = try peer("caps-echo", ["--name", "bench.sleep", "--spin", "0"])
        defer { sleeper.stop() }
        let sleepy = try CapsClient(broker, name: "bench.sleep")
        let sleepPairs = try paired(count: sleepCount, baseline: { count in try sharedMemoryPingPong(sleeping: true, count: count) },
                                    subject: { count in
                                        try measure(count) {
                                            _ = try sleepy.put(length: 64) { $0.initializeMemory(as: UInt8.self, repeating: 1) }
                                            try sleepy.waitReply { _, _ in }
                                        }
                                    })
        addPaired("CAPS round trip, 64 B, blocking wait forced", sleepPairs, baseline: "shm futex ping-pong", target: "≤ 1.1×",
                  limit: 1.1)
    }

    private func roundTripPut(_ client: CapsClient) throws {
        _ = try client.put(length: 64) { $0.initializeMemory(as: UInt8.self, repeating: 2) }
    }

    /// Runs `body(total)` once and returns operations per second.
    func throughput(_ total: Int, _ body: (Int) throws -> Void) rethrows -> UInt64 {
        try body(min(total / 10, 10_000))  // warm up
        let start = monotonicNanoseconds()
        try body(total)
        let elapsed = monotonicNanoseconds() - start
        return UInt64(Double(total) / (Double(elapsed) / 1e9))
    }

    /// Runs `body` with one end of a seqpacket pair whose other end an echo peer serves (messages
    /// of up to `size` bytes).
    private func withSeqpacketEcho<R>(size: Int, _ body: (CInt) throws -> R) throws -> R {
        var fds: [CInt] = [-1, -1]
        guard socketpair(AF_UNIX, CInt(SOCK_SEQPACKET.rawValue) | CInt(SOCK_CLOEXEC.rawValue), 0, &fds) == 0 else { throw Errno.current }
        let mine = PatchbaySystem.Descriptor(adopting: fds[0])
        let theirs = PatchbaySystem.Descriptor(adopting: fds[1])
        let echo = try peer("socket-echo", ["--size", "\(size)"], descriptors: [theirs.rawValue])
        _ = consume theirs
        defer { echo.stop() }
        return try body(mine.rawValue)
    }

    /// `withSeqpacketEcho` for 64-byte messages: `send` writes one, `receive` reads one back.
    private func withSeqpacketEcho<R>(_ body: (_ send: () throws -> Void, _ receive: () throws -> Void) throws -> R) throws -> R {
        try withSeqpacketEcho(size: 64) { fd in
            var buffer = [UInt8](repeating: 3, count: 64)
            func send() throws { guard buffer.withUnsafeBytes({ Glibc.write(fd, $0.baseAddress, 64) }) == 64 else { throw Errno.current } }
            func receive() throws { guard buffer.withUnsafeMutableBytes({ Glibc.read(fd, $0.baseAddress, 64) }) == 64 else { throw Errno.current } }
            return try body(send, receive)
        }
    }

    /// `batch` messages written, then `batch` read back, over a seqpacket pair with an echo peer.
    func seqpacketBatches(batch: Int, count: Int) throws -> Samples {
        try withSeqpacketEcho { send, receive in
            try measure(count) {
                for _ in 0..<batch { try send() }
                for _ in 0..<batch { try receive() }
            }
        }
    }

    func seqpacketPipelined(total: Int, window: Int) throws -> UInt64 {
        try withSeqpacketEcho { send, receive in
            try throughput(total) { count in
                for _ in 0..<window { try send() }
                for _ in 0..<(count - window) {
                    try receive()
                    try send()
                }
                for _ in 0..<window { try receive() }
            }
        }
    }

    func ratio(_ value: Samples, _ baseline: Samples) -> Double {
        baseline.median == 0 ? .infinity : Double(value.median) / Double(baseline.median)
    }

    // MARK: Keys

    func keys() throws {
        printHeader()
        let count = iterations(20_000)
        let broker = try Broker(socketPath: socketPath)
        let file = try openFile("/dev/null", flags: O_RDONLY)

        // Baseline: one descriptor over SCM_RIGHTS to the other process, which acknowledges.
        var fds: [CInt] = [-1, -1]
        guard socketpair(AF_UNIX, CInt(SOCK_SEQPACKET.rawValue) | CInt(SOCK_CLOEXEC.rawValue), 0, &fds) == 0 else { throw Errno.current }
        let mine = PatchbaySystem.Descriptor(adopting: fds[0])
        let theirs = PatchbaySystem.Descriptor(adopting: fds[1])
        let receiver = try peer("fd-receiver", descriptors: [theirs.rawValue])
        _ = consume theirs
        let fileNumber = file.rawValue
        let direct = try measure(count) {
            var byte: UInt8 = 0
            let sent = withUnsafeBytes(of: &byte) { raw in [fileNumber].withUnsafeBufferPointer { SeqpacketSocket.sendRaw(mine.rawValue, raw, $0) } }
            guard sent == 1, Glibc.read(mine.rawValue, &byte, 1) == 1 else { throw Errno.current }
        }
        receiver.stop()

        // Patchbay: share here, the key travels to the other process, which claims it.
        guard socketpair(AF_UNIX, CInt(SOCK_SEQPACKET.rawValue) | CInt(SOCK_CLOEXEC.rawValue), 0, &fds) == 0 else { throw Errno.current }
        let keyChannel = PatchbaySystem.Descriptor(adopting: fds[0])
        let claimerEnd = PatchbaySystem.Descriptor(adopting: fds[1])
        let claimer = try peer("key-claimer", descriptors: [claimerEnd.rawValue])
        _ = consume claimerEnd
        defer { claimer.stop() }
        let handoff = try measure(count) {
            let key = try broker.share(rawDescriptor: file.rawValue)
            let text = Array(key.text.utf8)
            var ack: UInt8 = 0
            guard text.withUnsafeBytes({ Glibc.write(keyChannel.rawValue, $0.baseAddress, $0.count) }) == text.count,
                  Glibc.read(keyChannel.rawValue, &ack, 1) == 1 else { throw Errno.current }
        }
        add(BenchRow(name: "share + claim of one fd between two processes", samples: handoff,
                     baseline: "SCM_RIGHTS hand-off between them", baselineSamples: direct, target: "≤ 3×",
                     met: ratio(handoff, direct) <= 3))

        // Claims with few and with many keys outstanding, in rounds like the CAPS rows: each round
        // shares keys up to the many and times claims, then claims back all but 10 and times
        // claims again (measured once each, a minute apart, the ratio moved with the vCPUs'
        // placement and missed on that alone).
        func claims(_ count: Int) throws -> Samples {
            var values: [UInt64] = []
            values.reserveCapacity(count)
            for _ in 0..<count {
                let key = try broker.share(rawDescriptor: file.rawValue)
                let start = monotonicNanoseconds()
                _ = try broker.claim(key)
                values.append(monotonicNanoseconds() - start)
            }
            return Samples(values)
        }
        var held: [Key] = []
        for _ in 0..<10 { held.append(try broker.share(rawDescriptor: file.rawValue, timeout: .never)) }
        // Each outstanding key holds a descriptor in the broker, and the broker's descriptors are
        // bounded by RLIMIT_NOFILE (20,000 here) less its reserve: 15,000 fit under any budget.
        let outstanding = quick ? 5_000 : 15_000
        var extra: [Key] = []
        var perKey: Double?
        let pairs = try paired(count: iterations(10_000), baseline: { each in
            for key in extra { _ = try? broker.claim(key) }
            extra.removeAll()
            return try claims(each)
        }, subject: { each in
            let before = Bench.residentKilobytes(brokerPID)
            while held.count + extra.count < outstanding {
                extra.append(try broker.share(rawDescriptor: file.rawValue, timeout: .never))
            }
            // The first round's growth: later rounds reuse memory the first one left.
            if perKey == nil { perKey = Double(max(Bench.residentKilobytes(brokerPID) - before, 0)) * 1024 / Double(outstanding - 10) }
            return try claims(each)
        })
        addPaired("claim with \(outstanding) keys outstanding", pairs, baseline: "claim with 10 outstanding", target: "≤ 1.2×",
                  limit: 1.2)
        let growth = perKey ?? 0
        add(BenchRow(name: "broker memory per outstanding key (RSS delta)", samples: Samples([UInt64(growth)]), baseline: "—",
                     baselineSamples: nil, target: "≤ 512 B", met: growth <= 512, unit: "B"))
        notes.append("per-key memory includes the kernel's file reference, not the open file itself (the sharer's file is shared)")
        for key in held + extra { _ = try? broker.claim(key) }
    }

    // MARK: Shared memory

    func sharedMemory() throws {
        printHeader()
        let count = iterations(20_000)
        let raw = try measure(count) {
            let fd = try makeMemoryFile(name: "bench", sealable: false)
            try fd.truncate(to: 4096)
            let mapping = try Mapping(fd, length: 4096, writable: true)
            _ = consume mapping
        }
        let anonymous = try measure(count) {
            let memory = try SharedMemory.anonymous()
            let mapping = try memory.map(length: 4096)
            _ = consume mapping
        }
        add(BenchRow(name: "anonymous object create + map, 4 KiB", samples: anonymous, baseline: "memfd_create + ftruncate + mmap",
                     baselineSamples: raw, target: "≤ 1.1×", met: ratio(anonymous, raw) <= 1.1))

        let broker = try Broker(socketPath: socketPath)
        try broker.openSharedMemory("/bench", options: .create).truncate(to: 4096)
        let path = "/patchbay-bench-\(getpid())"
        let created = shm_open(path, O_RDWR | O_CREAT, 0o600)
        guard created >= 0 else { throw Errno.current }
        ftruncate(created, 4096)
        close(created)
        defer { shm_unlink(path) }
        let plain = try measure(count) {
            let fd = shm_open(path, O_RDWR, 0)
            guard fd >= 0 else { throw Errno.current }
            let mapping = try Mapping(PatchbaySystem.Descriptor(adopting: fd), length: 4096, writable: true)
            _ = consume mapping
        }
        let named = try measure(count) {
            let memory = try broker.openSharedMemory("/bench", access: .readWrite)
            let mapping = try memory.map(length: 4096)
            _ = consume mapping
        }
        add(BenchRow(name: "named object open + map of an existing one", samples: named, baseline: "shm_open + mmap",
                     baselineSamples: plain, target: "≤ 2×", met: ratio(named, plain) <= 2))
    }

    // MARK: /net

    func net() throws {
        printHeader()
        let count = iterations(20_000)
        let broker = try Broker(socketPath: socketPath)
        // The raw socket pair and the /net socket, each with its echo peer (both asleep in recv
        // between messages), measured in rounds alternating back to back: the cost of a wake-up
        // on this guest moves between rows, and the ratio must compare one placement.
        try withSeqpacketEcho(size: 65536) { raw in
            let echo = try peer("net-echo", ["--name", "bench-net"])
            defer { echo.stop() }
            let socket = try Socket.connect(broker, to: "bench-net")
            let fd = socket.dataDescriptor
            var small = [UInt8](repeating: 1, count: 64)
            addPaired("/net seqpacket ping-pong, 64 B",
                      try paired(count: count, baseline: { count in try measure(count) { try exchange(raw, raw, &small) } },
                                 subject: { count in try measure(count) { try exchange(fd, fd, &small) } }),
                      baseline: "raw AF_UNIX seqpacket", target: "≤ 1.05× (≥ 0.95× speed)", limit: 1.0 / 0.95)
            var bulk = [UInt8](repeating: 2, count: 65536)
            addPaired("/net seqpacket bulk, 64 KiB round trip",
                      try paired(count: iterations(5_000), baseline: { count in try measure(count) { try exchange(raw, raw, &bulk) } },
                                 subject: { count in try measure(count) { try exchange(fd, fd, &bulk) } }),
                      baseline: "raw AF_UNIX seqpacket", target: "≤ 1.05×", limit: 1.0 / 0.95)
        }
    }

    // MARK: The broker under many clients

    func broker() throws {
        printHeader()
        let count = iterations(20_000)
        let broker = try Broker(socketPath: socketPath)
        DescriptorLimit.raiseToMaximum()
        // In rounds, like the CAPS rows: 999 idle connections opened, the control op timed, the
        // connections closed, the op timed alone. Measured a minute apart, the two read 15 µs or
        // 60 µs with the vCPUs' placement, and the row missed on that alone.
        var idle: [Broker] = []
        var perClient: Double?
        // Counted from what the broker has now (this connection, and any the suites before left).
        let present = try broker.status().clients
        let pairs = try paired(count: count, baseline: { each in
            idle.removeAll()
            // Wait until the broker has seen every one of them go.
            while try broker.status().clients > present { usleep(1_000) }
            return try measure(each) { _ = try broker.localSocketPath("bench") }
        }, subject: { each in
            let before = Bench.residentKilobytes(brokerPID)
            for _ in 0..<999 { idle.append(try Broker(socketPath: socketPath)) }
            // Wait until the broker has accepted every connection (it accepts 64 per wake-up).
            while try broker.status().clients < present + 999 { usleep(1_000) }
            // The first round's growth: later rounds reuse memory the first one left.
            if perClient == nil {
                perClient = Double(max(Bench.residentKilobytes(brokerPID) - before, 0)) * 1024 / 999
            }
            return try measure(each) { _ = try broker.localSocketPath("bench") }
        })
        idle.removeAll()
        addPaired("broker control op with 1,000 clients", pairs, baseline: "broker with 1 client", target: "≤ 1.5×", limit: 1.5)
        let growth = perClient ?? 0
        add(BenchRow(name: "broker memory per idle client (RSS delta)", samples: Samples([UInt64(growth)]), baseline: "—",
                     baselineSamples: nil, target: "≤ 32 KiB", met: growth <= 32 * 1024, unit: "B"))
    }
}

/// libpatchbay, opened with dlopen for the C row: $PATCHBAY_LIBRARY, else the library built beside
/// this program (libPatchbayC.so), else an installed one (../lib, then the loader's path).
struct CLibrary {
    typealias BrokerOpenAt = @convention(c) (UnsafeMutablePointer<OpaquePointer?>?, UnsafePointer<CChar>?) -> CInt
    typealias ClientOpen = @convention(c) (OpaquePointer?, UnsafePointer<CChar>?, CUnsignedInt, UnsafeMutablePointer<OpaquePointer?>?) -> CInt
    typealias Call = @convention(c) (OpaquePointer?, UnsafeRawPointer?, Int, UnsafeMutableRawPointer?, Int) -> Int
    typealias Close = @convention(c) (OpaquePointer?) -> Void
    typealias Reason = @convention(c) () -> UnsafePointer<CChar>?

    let brokerOpenAt: BrokerOpenAt
    let clientOpen: ClientOpen
    let call: Call
    let clientClose: Close
    let brokerClose: Close
    let reason: Reason

    static func load() -> CLibrary? {
        var candidates: [String] = []
        if let explicit = getenv("PATCHBAY_LIBRARY") { candidates.append(String(cString: explicit)) }
        if let executable = currentExecutablePath(), let slash = executable.lastIndex(of: "/") {
            let directory = String(executable[..<slash])
            candidates += [directory + "/libPatchbayC.so", directory + "/../lib/libpatchbay.so.0"]
        }
        candidates.append("libpatchbay.so.0")
        for candidate in candidates {
            guard let handle = dlopen(candidate, RTLD_NOW | RTLD_LOCAL) else { continue }
            func symbol<T>(_ name: String, _ type: T.Type) -> T? {
                dlsym(handle, name).map { unsafeBitCast($0, to: type) }
            }
            guard let brokerOpenAt = symbol("pb_broker_open_at", BrokerOpenAt.self),
                  let clientOpen = symbol("pb_caps_client_open", ClientOpen.self), let call = symbol("pb_caps_call", Call.self),
                  let clientClose = symbol("pb_caps_client_close", Close.self), let brokerClose = symbol("pb_broker_close", Close.self),
                  let reason = symbol("pb_last_reason", Reason.self)
            else { continue }
            return CLibrary(brokerOpenAt: brokerOpenAt, clientOpen: clientOpen, call: call, clientClose: clientClose,
                            brokerClose: brokerClose, reason: reason)
        }
        return nil
    }

    /// A CAPS client of `service` through the C ABI, sending `length`-byte requests.
    func caller(socketPath: String, service: String, length: Int) throws -> CCaller {
        try CCaller(self, socketPath: socketPath, service: service, length: length)
    }
}

/// One pb_caps_client and its buffers.
final class CCaller {
    let library: CLibrary
    let length: Int
    private var broker: OpaquePointer?
    private var client: OpaquePointer?
    private let request: UnsafeMutableRawBufferPointer
    private let reply: UnsafeMutableRawBufferPointer

    init(_ library: CLibrary, socketPath: String, service: String, length: Int) throws {
        self.library = library
        self.length = length
        request = .allocate(byteCount: length, alignment: 16)
        reply = .allocate(byteCount: length, alignment: 16)
        request.initializeMemory(as: UInt8.self, repeating: 1)
        guard library.brokerOpenAt(&broker, socketPath) == 0, library.clientOpen(broker, service, 0, &client) == 0 else {
            throw PatchbayError(.connectionRefused, "libpatchbay could not connect: \(lastReason)")
        }
    }

    private var lastReason: String { library.reason().map { String(cString: $0) } ?? "" }

    func roundTrip() throws {
        let answered = library.call(client, request.baseAddress, length, reply.baseAddress, length)
        guard answered == length else { throw PatchbayError(.ioError, "pb_caps_call returned \(answered): \(lastReason)") }
    }

    deinit {
        library.clientClose(client)
        library.brokerClose(broker)
        request.deallocate()
        reply.deallocate()
    }
}
