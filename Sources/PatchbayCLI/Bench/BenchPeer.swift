import ArgumentParser
import Glibc
import Patchbay
import PatchbaySystem
import SystemPackage

/// The other side of each benchmark, in a process of its own, pinned to its own CPU. Each role
/// prints "ready" on stdout once set up, then serves until told to stop (or its input closes).
struct BenchPeerCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "bench-peer", shouldDisplay: false)

    @Argument var role: String
    @Option var cpu: Int32 = 1
    @Option var size: Int = 64
    @Option var name: String = ""
    @Option var spin: UInt64 = 20_000

    func run() throws {
        try? pinToCPU(cpu)
        switch role {
        case "spin-echo": sharedMemoryEcho(sleeping: false)
        case "futex-echo": sharedMemoryEcho(sleeping: true)
        case "socket-echo": socketEcho(read: 3, write: 3, stream: false)
        case "stream-echo": socketEcho(read: 3, write: 3, stream: true)
        case "pipe-echo": socketEcho(read: 3, write: 4, stream: true)
        case "fd-receiver": descriptorReceiver()
        case "key-claimer": keyClaimer()
        case "caps-echo": capsEcho()
        case "net-echo": netEcho()
        default: fail("bench-peer", .invalidArgument, "unknown role \(role)")
        }
    }

    private func ready() { writeStandardOutput("ready\n") }

    /// Raw shared memory ping-pong: word `ping` at 0 (the client's), `pong` at 64 (ours).
    private func sharedMemoryEcho(sleeping: Bool) {
        guard let base = mmap(nil, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, 3, 0), base != MAP_FAILED else { return }
        let ping = base.assumingMemoryBound(to: UInt32.self)
        let pong = base.advanced(by: 64).assumingMemoryBound(to: UInt32.self)
        ready()
        var last: UInt32 = 0
        while true {
            var value = SharedWord.load(ping)
            while value == last {
                if sleeping { try? Futex.wait(ping, expected: last) } else { SharedWord.relax() }
                value = SharedWord.load(ping)
            }
            if value == .max { return }
            last = value
            SharedWord.store(pong, value)
            if sleeping { Futex.wake(pong) }
        }
    }

    private func socketEcho(read input: CInt, write output: CInt, stream: Bool) {
        var buffer = [UInt8](repeating: 0, count: max(size, 65536))
        ready()
        while true {
            var got = 0
            repeat {
                let n = buffer.withUnsafeMutableBytes { Glibc.read(input, $0.baseAddress! + got, (stream ? size : $0.count) - got) }
                if n <= 0 { return }
                got += n
            } while stream && got < size
            var sent = 0
            while sent < got {
                let n = buffer.withUnsafeBytes { Glibc.write(output, $0.baseAddress! + sent, got - sent) }
                if n <= 0 { return }
                sent += n
            }
        }
    }

    /// Receives a descriptor, closes it, acknowledges with one byte.
    private func descriptorReceiver() {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 64, alignment: 8)
        ready()
        while true {
            guard let received = SeqpacketSocket.receiveRaw(3, buffer), received.length > 0 else { return }
            for fd in received.descriptors { close(fd) }
            var ack: UInt8 = 1
            if Glibc.write(3, &ack, 1) != 1 { return }
        }
    }

    /// Receives a key as text, claims it through the broker, closes the file, acknowledges.
    private func keyClaimer() {
        guard let broker = try? Broker() else { return }
        var text = [UInt8](repeating: 0, count: 64)
        ready()
        while true {
            let n = text.withUnsafeMutableBytes { Glibc.read(3, $0.baseAddress, $0.count) }
            if n <= 0 { return }
            guard let key = try? Key(parsing: String(decoding: text[0..<n], as: UTF8.self)), (try? broker.claim(key)) != nil else {
                writeStandardError("bench-peer: claim failed\n")
                return
            }
            var ack: UInt8 = 1
            if Glibc.write(3, &ack, 1) != 1 { return }
        }
    }

    /// A CAPS echo: the reply has the request's length; small ones are copied back, large ones
    /// are left in place (zero copy both ways: only offsets move).
    private func capsEcho() {
        CapsTuning.spinNanoseconds = spin
        guard let broker = try? Broker(), let service = try? CapsService(broker, name: name, access: [.world]) else { return }
        ready()
        while true {
            do {
                // Replying inside the body: the request's payload is still in place there.
                try service.receive { (message: CapsServiceMessage, payload: UnsafeRawBufferPointer) in
                    guard message.kind == .request else { return }
                    let length = payload.count
                    try? service.reply(to: message.messageID, length: length) { buffer in
                        if length <= 4096, let source = payload.baseAddress {
                            buffer.baseAddress!.copyMemory(from: source, byteCount: length)
                        }
                    }
                }
            } catch {
                return
            }
        }
    }

    private func netEcho() {
        guard let broker = try? Broker(), let listener = try? Socket.listen(broker, name: name) else { return }
        ready()
        guard let connection = try? listener.accept() else { return }
        var buffer = [UInt8](repeating: 0, count: 1 << 17)
        let fd = connection.dataDescriptor
        while true {
            let n = buffer.withUnsafeMutableBytes { Glibc.recv(fd, $0.baseAddress, $0.count, 0) }
            if n <= 0 { return }
            let sent = buffer.withUnsafeBytes { Glibc.send(fd, $0.baseAddress, n, CInt(MSG_NOSIGNAL)) }
            if sent != n { return }
        }
    }
}
