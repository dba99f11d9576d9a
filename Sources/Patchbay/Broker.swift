@_exported public import PatchbaySystem
@_exported public import PatchbayProtocol
@_exported public import SystemPackage
import Glibc
import Synchronization

/// A connection to a Patchbay broker: the handle every Patchbay operation goes through.
///
/// `Broker()` connects to `PATCHBAY_SOCKET` if set, else to the per-user broker, which it starts
/// itself when none answers (race-free: concurrent starters serialise on a lock file and all end
/// up on the one broker that won). One `Broker` may be shared by many threads; their requests are
/// serialised on its one connection.
public final class Broker: Sendable {
    /// The socket this connection is attached to.
    public let socketPath: String
    private let connection: Mutex<Connection>

    /// Connects to `socketPath`, or with nil to the default broker (see the type's summary).
    /// `autostart` applies only to the per-user default path.
    public init(socketPath: String? = nil, autostart: Bool = true) throws(PatchbayError) {
        let explicit = socketPath ?? getenv("PATCHBAY_SOCKET").map { String(cString: $0) }
        let path: String
        let socket: SeqpacketSocket
        if let explicit, !explicit.isEmpty {
            path = explicit
            socket = try Autostart.connect(path: path)
        } else {
            path = Autostart.defaultUserSocketPath()
            let allowed = autostart && getenv("PATCHBAY_AUTOSTART").map { String(cString: $0) } != "0"
            socket = allowed ? try Autostart.connectOrStart(path: path) : try Autostart.connect(path: path)
        }
        self.socketPath = path
        connection = Mutex(Connection(socket: socket))
    }

    /// The broker's pid, version, uptime, clients and object counts per uid.
    public func status() throws(PatchbayError) -> StatusReport {
        let response = try call(.status)
        guard case .status(let report) = response.reply else { throw unexpected(response.reply) }
        return report
    }

    // MARK: Keys

    /// How long a key stays claimable.
    public enum Expiry: Sendable, Equatable {
        case never
        case after(Duration)
    }

    /// Hands `descriptor`'s open file to the broker and returns a one-time key for it. The caller
    /// keeps its own descriptor (and may close it at once: the key holds the file).
    ///
    /// - Throws: `EINVAL` for a timeout that is not positive; `EDQUOT` when this uid already has
    ///   the maximum number of outstanding keys.
    public func share(
        _ descriptor: borrowing Descriptor, timeout: Expiry = .after(.seconds(60)),
        claimableBy restriction: ClaimRestriction? = nil
    ) throws(PatchbayError) -> Key {
        try share(rawDescriptor: descriptor.rawValue, timeout: timeout, claimableBy: restriction)
    }

    /// `share` for a descriptor this code does not own (for example one inherited at exec).
    public func share(
        rawDescriptor: CInt, timeout: Expiry = .after(.seconds(60)), claimableBy restriction: ClaimRestriction? = nil
    ) throws(PatchbayError) -> Key {
        let expiry: KeyExpiry
        switch timeout {
        case .never:
            expiry = .never
        case .after(let duration):
            guard duration > .zero else {
                throw PatchbayError(.invalidArgument, "the timeout must be positive (or never)")
            }
            let (seconds, attoseconds) = duration.components
            let nanoseconds = seconds > Int64(UInt64.max / 1_000_000_000) - 1
                ? UInt64.max
                : UInt64(seconds) * 1_000_000_000 + UInt64(attoseconds / 1_000_000_000)
            expiry = .after(nanoseconds: max(nanoseconds, 1))
        }
        let response = try call(.keys(.share(expiry: expiry, restriction: restriction)), descriptors: [rawDescriptor])
        guard case .keys(.share(let token)) = response.reply else { throw unexpected(response.reply) }
        return Key(token: token)
    }

    /// Claims the file behind `key`: a new descriptor (close-on-exec) for the same open file
    /// description the sharer had.
    ///
    /// - Throws: `ENOENT` when the key does not exist, was claimed, expired or is restricted to
    ///   someone else; `EMFILE` when this process has no free descriptor (the key stays valid);
    ///   `EAGAIN` while this uid is rate-limited after too many failed claims.
    public func claim(_ key: Key) throws(PatchbayError) -> Descriptor {
        try connection.withLock { (connection) throws(PatchbayError) -> Descriptor in
            var response = try connection.call(.keys(.claim(key.token)))
            guard case .keys(.claim) = response.reply else { throw unexpected(response.reply) }
            // Tell the broker whether the descriptor arrived, so a lost one restores the key.
            if !response.descriptorLost, let descriptor = response.takeDescriptor() {
                try connection.post(.keys(.claimAcknowledge(key.token, received: true)))
                return descriptor
            }
            try connection.post(.keys(.claimAcknowledge(key.token, received: false)))
            if response.descriptorLost {
                throw PatchbayError(.tooManyOpenFiles,
                                    "no free descriptor to receive the file; the key is still valid")
            }
            throw PatchbayError(.protocolError, "the broker's claim reply carried no descriptor")
        }
    }

    // MARK: Plumbing

    func call(_ request: Request, descriptors: [CInt] = []) throws(PatchbayError) -> Response {
        try connection.withLock { (connection) throws(PatchbayError) -> Response in
            try connection.call(request, descriptors: descriptors)
        }
    }

    private func unexpected(_ reply: Reply) -> PatchbayError {
        PatchbayError(.protocolError, "unexpected reply \(reply.opcode) from the broker")
    }
}

/// A one-time key naming a shared file: 128 random bits, written as 22 base64url characters
/// that never start with `-` (docs/PROTOCOL.md §6).
public struct Key: Sendable, Hashable, CustomStringConvertible {
    public let token: KeyToken

    public init(token: KeyToken) {
        self.token = token
    }

    /// Parses key text. Anything but 22 canonical base64url characters is `EINVAL`.
    public init(_ text: String) throws(PatchbayError) {
        guard let token = KeyToken(text: text) else {
            throw PatchbayError(.invalidArgument,
                                "a key is 22 characters of A-Z, a-z, 0-9, '-' and '_', starting with A, B, C or D; \"\(text.prefix(64))\" is not one")
        }
        self.token = token
    }

    /// The key text, e.g. `"q3KxW0f6tQ2aN8c1Zb7sYg"`.
    public var text: String { token.text }
    public var description: String { text }
}
