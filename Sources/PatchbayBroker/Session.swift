import DequeModule
import PatchbayProtocol
import PatchbaySystem

/// A descriptor kept alive while a reply that carries it waits in a send queue. It is a copy of
/// a client's file, so its close goes through the `DeferredCloser`.
final class DescriptorBox {
    let rawValue: CInt
    init(_ descriptor: consuming Descriptor) { rawValue = descriptor.release() }
    deinit { DeferredCloser.shared.close(raw: rawValue) }
}

/// One reply waiting for the client's socket to drain.
struct OutgoingFrame {
    var bytes: [UInt8]
    var attachments: [DescriptorBox]
}

/// One connected client: its socket, who the kernel says it is, and what it has in progress.
final class Session {
    let id: UInt64
    let socket: SeqpacketSocket
    let credentials: PeerCredentials
    /// Replies the socket could not take yet, oldest first. Each leaves (with its descriptor) as
    /// soon as it is sent.
    var outgoing = Deque<OutgoingFrame>()
    /// Keys whose claim reply went to this client and await its acknowledgement.
    var claimsInFlight: Set<KeyToken> = []
    var wantsWritable = false

    init(id: UInt64, socket: consuming SeqpacketSocket, credentials: PeerCredentials) {
        self.id = id
        self.socket = socket
        self.credentials = credentials
    }

    var queuedReplies: Int { outgoing.count }
}
