import PatchbaySystem

/// The broker's closing threads, one per uid: everything a client gave the broker (shared files,
/// descriptors attached to refused requests, the last close of sockets a client can write
/// descriptors into) is closed there, never on the event loop, and what waits to be closed counts
/// against the uid's descriptor share (`DescriptorBudget`).
enum DeferredCloser {
    static let shared = ClosingThreads()
    /// The owner a connection whose uid is not known is closed for.
    static let unknownPeer = UInt64.max
}

extension ClosingThreads {
    func close(_ descriptor: consuming Descriptor, of uid: UInt32) { close(descriptor, of: UInt64(uid)) }
    func close(raw: CInt, of uid: UInt32) { close(raw: raw, of: UInt64(uid)) }
    func closeLast(of fd: CInt, for uid: UInt32) { closeLast(of: fd, for: UInt64(uid)) }
    /// A client connection refused before it was read (`closeRefused`).
    func closeRefused(_ socket: consuming SeqpacketSocket, of uid: UInt32) {
        closeRefused(socket.descriptor.release(), of: UInt64(uid))
    }

    func outstanding(of uid: UInt32) -> Int { outstanding(of: UInt64(uid)) }
    func outstanding(ofAllBut uid: UInt32) -> Int { outstanding(ofAllBut: UInt64(uid)) }
}
