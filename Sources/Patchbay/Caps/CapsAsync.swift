// The async face of CAPS. Waiting blocks a thread (spinning, then a futex or epoll), so it runs
// on a dispatch queue of each port's own, never on the Swift concurrency pool.

public import PatchbayProtocol
import Dispatch
import PatchbaySystem

/// A request as the async stream delivers it: the bytes copied out, and the id to reply to.
public struct CapsRequest: Sendable {
    /// The id to reply to.
    public var messageID: UInt64
    /// The payload, copied out of shared memory.
    public var bytes: [UInt8]
    /// The sender, from the kernel.
    public var credentials: CapsCredentials
    /// The client connection the request came on.
    public var channelID: UInt64
}

/// The REQUESTs of a service port, as they arrive (`CapsService.requests`). Iteration throws
/// `PatchbayError`.
public struct CapsRequests: AsyncSequence, Sendable {
    /// Each request, copied out.
    public typealias Element = CapsRequest
    /// What iteration throws.
    public typealias Failure = PatchbayError

    let stream: AsyncThrowingStream<CapsRequest, any Error>

    /// An iterator over the requests.
    public func makeAsyncIterator() -> AsyncIterator {
        AsyncIterator(base: stream.makeAsyncIterator())
    }

    /// Iterates the requests; ends when the port's wait is cancelled.
    public struct AsyncIterator: AsyncIteratorProtocol {
        var base: AsyncThrowingStream<CapsRequest, any Error>.Iterator

        /// The next request; nil once the wait was cancelled or the iteration ended.
        public mutating func next() async throws(PatchbayError) -> CapsRequest? {
            do { return try await base.next() } catch { throw Self.patchbayError(error) }
        }

        /// `next()`, on the caller's actor.
        public mutating func next(isolation actor: isolated (any Actor)?) async throws(PatchbayError) -> CapsRequest? {
            do { return try await base.next(isolation: actor) } catch { throw Self.patchbayError(error) }
        }

        /// The stream only ever finishes with a `PatchbayError` (see `CapsService.requests`).
        private static func patchbayError(_ error: any Error) -> PatchbayError {
            error as? PatchbayError ?? PatchbayError(.ioError, "\(error)")
        }
    }
}

extension CapsService {
    /// Every REQUEST, as it arrives (DISPOSEs and notices are consumed quietly). Ending the
    /// iteration (or cancelling its task) stops the waiting.
    ///
    ///     for try await request in service.requests {
    ///         try service.reply(to: request.messageID, handle(request.bytes))
    ///     }
    public var requests: CapsRequests {
        CapsRequests(stream: AsyncThrowingStream { continuation in
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
        })
    }
}

extension CapsClient {
    /// Sends `bytes` and waits for the reply without blocking a Swift concurrency thread.
    /// Cancelling the task cancels the wait (`ECANCELED`); the request stays in flight until its
    /// reply comes, which is then disposed of unread.
    /// (`maxReplyLength`: as in the blocking `call(_:maxReplyLength:)`; nil: no limit.)
    public func call(_ bytes: [UInt8], maxReplyLength: Int? = nil) async throws(PatchbayError) -> [UInt8] {
        // One queue per port: concurrent calls take turns, so each reads its own reply.
        let queue = callQueue
        return try await withTaskCancellationHandler {
            await withCheckedContinuation { (continuation: CheckedContinuation<Result<[UInt8], PatchbayError>, Never>) in
                queue.async { [self] in
                    continuation.resume(returning: Result { () throws(PatchbayError) in
                        try call(bytes, maxReplyLength: maxReplyLength ?? .max)
                    })
                }
            }
        } onCancel: { [self] in
            cancelWait()
        }.get()
    }

    /// Connects, waiting for the service to register if need be, without blocking a Swift
    /// concurrency thread; cancelling the task cancels the wait.
    public static func connect(_ broker: Broker, name: String, uid: Int32 = -1, gid: Int32 = -1,
                               access: CapsAccess = [.user, .group, .world], waitForService: Bool = false)
        async throws(PatchbayError) -> CapsClient
    {
        let attempt = CapsConnectAttempt()
        let queue = DispatchQueue(label: "patchbay.caps.connect.\(name)")
        return try await withTaskCancellationHandler {
            await withCheckedContinuation { (continuation: CheckedContinuation<Result<CapsClient, PatchbayError>, Never>) in
                queue.async {
                    continuation.resume(returning: Result { () throws(PatchbayError) in
                        try CapsClient(broker, name: name, uid: uid, gid: gid, access: access,
                                       waitForService: waitForService, attempt: attempt)
                    })
                }
            }
        } onCancel: {
            attempt.cancel()
        }.get()
    }
}
