// The async face of CAPS. Waiting blocks a thread (spinning, then a futex or epoll), so it runs
// on a dispatch queue of each port's own, never on the Swift concurrency pool.

import Dispatch
import PatchbayProtocol
import PatchbaySystem

/// A request as the async stream delivers it: the bytes copied out, and the id to reply to.
public struct CapsRequest: Sendable {
    public var messageID: UInt64
    public var bytes: [UInt8]
    public var credentials: CapsCredentials
    public var channelID: UInt64
}

extension CapsService {
    /// Every REQUEST, as it arrives (DISPOSEs and notices are consumed quietly). Ending the
    /// iteration (or cancelling its task) stops the waiting.
    ///
    ///     for try await request in service.requests {
    ///         try service.reply(to: request.messageID, handle(request.bytes))
    ///     }
    public var requests: AsyncThrowingStream<CapsRequest, any Error> {
        AsyncThrowingStream { continuation in
            let queue = DispatchQueue(label: "patchbay.caps.service.\(name)")
            queue.async { [self] in
                while true {
                    // Read in place and copy exactly the payload: no buffer sized by what a client
                    // claims, no second read of a length a client could change.
                    let outcome = Result { () throws(PatchbayError) -> CapsRequest? in
                        try receive { message, payload in
                            message.kind == .request
                                ? CapsRequest(messageID: message.messageID, bytes: Array(payload),
                                              credentials: message.credentials, channelID: message.channelID)
                                : nil
                        }
                    }
                    switch outcome {
                    case .failure(let error):
                        continuation.finish(throwing: error.errno == .canceled ? nil : error)
                        return
                    case .success(let request?):
                        if case .terminated = continuation.yield(request) { return }
                    case .success(nil):
                        continue
                    }
                }
            }
            continuation.onTermination = { [self] _ in cancelWait() }
        }
    }
}

extension CapsClient {
    /// Sends `bytes` and waits for the reply without blocking a Swift concurrency thread.
    /// Cancelling the task cancels the wait (`ECANCELED`); the request stays in flight.
    public func call(_ bytes: [UInt8]) async throws -> [UInt8] {
        // One queue per port: concurrent calls take turns, so each reads its own reply.
        let queue = callQueue
        return try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<[UInt8], any Error>) in
                queue.async { [self] in
                    do {
                        continuation.resume(returning: try call(bytes))
                    } catch {
                        continuation.resume(throwing: error)
                    }
                }
            }
        } onCancel: { [self] in
            cancelWait()
        }
    }

    /// Connects, waiting for the service to register if need be, without blocking a Swift
    /// concurrency thread; cancelling the task cancels the wait.
    public static func connect(_ broker: Broker, name: String, uid: Int32 = -1, gid: Int32 = -1,
                               access: CapsAccess = [.user, .group, .world], waitForService: Bool = false)
        async throws -> CapsClient
    {
        let attempt = CapsConnectAttempt()
        let queue = DispatchQueue(label: "patchbay.caps.connect.\(name)")
        return try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<CapsClient, any Error>) in
                queue.async {
                    do {
                        continuation.resume(returning: try CapsClient(broker, name: name, uid: uid, gid: gid, access: access,
                                                                      waitForService: waitForService, attempt: attempt))
                    } catch {
                        continuation.resume(throwing: error)
                    }
                }
            }
        } onCancel: {
            attempt.cancel()
        }
    }
}
