import PatchbayProtocol
import PatchbaySystem

/// A descriptor kept alive while a reply that carries it waits in a send queue.
final class DescriptorBox {
    let descriptor: Descriptor
    init(_ descriptor: consuming Descriptor) { self.descriptor = descriptor }
}

/// One reply waiting for the client's socket to drain.
struct OutgoingFrame {
    var bytes: [UInt8]
    var attachment: DescriptorBox?
}

/// One connected client: its socket, who the kernel says it is, and what it has in progress.
final class Session {
    let id: UInt64
    let socket: SeqpacketSocket
    let credentials: PeerCredentials
    /// Replies the socket could not take yet, oldest first.
    var outgoing: [OutgoingFrame] = []
    var outgoingHead = 0
    /// Keys whose claim reply went to this client and await its acknowledgement.
    var claimsInFlight: Set<KeyToken> = []
    var wantsWritable = false

    init(id: UInt64, socket: consuming SeqpacketSocket, credentials: PeerCredentials) {
        self.id = id
        self.socket = socket
        self.credentials = credentials
    }

    var queuedReplies: Int { outgoing.count - outgoingHead }
}
