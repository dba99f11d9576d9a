// libFuzzer target: arbitrary frames, some with descriptors attached, fed to a live broker (one
// session per input). The broker must answer a status request after every input: never crash,
// never stall. The broker runs in its own process: PATCHBAY_SOCKET names it (scripts/fuzz starts it).
import Glibc
import PatchbayProtocol
import PatchbaySystem

@_silgen_name("LLVMFuzzerRunDriver")
func LLVMFuzzerRunDriver(
    _ argc: UnsafeMutablePointer<Int32>,
    _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>>,
    _ callback: @convention(c) (UnsafePointer<UInt8>?, Int) -> Int32
) -> Int32

let socketPath = getenv("PATCHBAY_SOCKET").map { String(cString: $0) } ?? ""
let devNull = open("/dev/null", O_RDONLY | O_CLOEXEC)

func alive() -> Bool {
    guard let probe = try? SeqpacketSocket() else { return false }
    guard (try? probe.connect(path: socketPath)) != nil else { return false }
    guard (try? probe.send(Request.status.encode(requestID: 1))) != nil else { return false }
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 65536, alignment: 8)
    defer { buffer.deallocate() }
    guard let message = try? probe.receive(into: buffer), message.length > 0 else { return false }
    return (try? Frame.decode(Array(buffer[0..<message.length])[...]))?.kind == .reply
}

let callback: @convention(c) (UnsafePointer<UInt8>?, Int) -> Int32 = { data, size in
    guard size > 0, let data else { return 0 }
    let bytes = Array(UnsafeBufferPointer(start: data, count: size))
    guard let socket = try? SeqpacketSocket() else { return 0 }
    guard (try? socket.connect(path: socketPath)) != nil else { fatalError("the broker is gone") }
    // The first byte picks how many frames and descriptors; the rest is split into frames.
    let control = bytes[0]
    let frames = max(1, Int(control & 7))
    let chunk = max(1, (bytes.count - 1) / frames)
    var offset = 1
    for index in 0..<frames where offset < bytes.count {
        let end = min(bytes.count, offset + chunk)
        let attach: [CInt] = (control >> 3) & 3 > index ? [devNull] : []
        try? socket.send(Array(bytes[offset..<end]), descriptors: attach, nonblocking: true)
        offset = end
    }
    precondition(alive(), "the broker stopped answering after an input")
    return 0
}

var argc = CommandLine.argc
var argv = CommandLine.unsafeArgv
exit(LLVMFuzzerRunDriver(&argc, &argv, callback))
