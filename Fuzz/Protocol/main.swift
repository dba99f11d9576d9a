// libFuzzer target: the wire decoder must be total on hostile bytes (decode or throw, never trap).
import Glibc
import PatchbayProtocol

@_silgen_name("LLVMFuzzerRunDriver")
func LLVMFuzzerRunDriver(
    _ argc: UnsafeMutablePointer<Int32>,
    _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>>,
    _ callback: @convention(c) (UnsafePointer<UInt8>?, Int) -> Int32
) -> Int32

let callback: @convention(c) (UnsafePointer<UInt8>?, Int) -> Int32 = { data, size in
    let bytes = size == 0 ? [] : Array(UnsafeBufferPointer(start: data, count: size))
    guard let frame = try? Frame.decode(bytes[...]) else { return 0 }
    switch frame.kind {
    case .request:
        if let request = try? Request.decode(frame) {
            // What decodes must encode back to a frame that decodes to the same request.
            let again = try? Request.decode(try Frame.decode(request.encode(requestID: frame.requestID)[...]))
            precondition(again == request, "a decoded request does not survive re-encoding")
        }
    case .reply: _ = try? Reply.decode(frame)
    case .error: _ = try? ErrorReply.decode(frame)
    case .event: _ = try? Event.decode(frame)
    }
    _ = KeyToken(text: String(decoding: bytes.prefix(64), as: UTF8.self))
    return 0
}

var argc = CommandLine.argc
var argv = CommandLine.unsafeArgv
exit(LLVMFuzzerRunDriver(&argc, &argv, callback))

