// Keys (PatchworkOS share/claim): `share` hands an open file to the broker and gets back a
// one-time key; `claim` turns the key into a new descriptor for the same open file description,
// in any process of any uid the sharer allowed.
//
// Lifetime: the broker holds the file from `share` until the key is claimed, expires, or the
// broker stops; the sharer may close its own descriptor at once, and its exit does not revoke the
// key. A claim is acknowledged, so a descriptor lost on the way (the claimer had no free slot)
// restores the key. Errors: `EINVAL` (key text, timeout), `ENOENT` (no such key, claimed,
// expired, or restricted to someone else: indistinguishable on purpose), `EMFILE` (the key stays
// valid), `EDQUOT` (too many outstanding keys), `EAGAIN` (too many failed claims).

import Glibc
public import PatchbayProtocol
public import SystemPackage
import PatchbaySystem

/// Who may claim a key (`.uid`, `.gid`, `.pid`); anyone else gets `ENOENT`, as if the key did not
/// exist.
public typealias ClaimRestriction = PatchbayProtocol.ClaimRestriction

extension Broker {
    /// How long a key stays claimable.
    public enum Expiry: Sendable, Equatable {
        /// Until claimed (or the broker stops).
        case never
        /// For a positive duration from the share; a claim after that is `ENOENT`.
        case after(Duration)
    }

    /// Hands `descriptor`'s open file to the broker and returns a one-time key for it. The caller
    /// keeps its own descriptor (and may close it at once: the key holds the file).
    ///
    /// - Throws: `EINVAL` for a timeout that is not positive; `EBADF` for a descriptor that is not
    ///   open; `EDQUOT` when this uid already has the maximum number of outstanding keys.
    public func share(
        _ descriptor: borrowing Descriptor, timeout: Expiry = .after(.seconds(60)),
        claimableBy restriction: ClaimRestriction? = nil
    ) throws(PatchbayError) -> Key {
        try share(rawDescriptor: descriptor.rawValue, timeout: timeout, claimableBy: restriction)
    }

    /// `share` for a swift-system `FileDescriptor`. The caller keeps owning it (and may close it
    /// at once: the key holds the file).
    public func share(
        _ descriptor: FileDescriptor, timeout: Expiry = .after(.seconds(60)), claimableBy restriction: ClaimRestriction? = nil
    ) throws(PatchbayError) -> Key {
        try share(rawDescriptor: descriptor.rawValue, timeout: timeout, claimableBy: restriction)
    }

    /// `share` for a raw descriptor this code does not own (for example one inherited at exec).
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
        guard fcntl(rawDescriptor, F_GETFD) >= 0 else {
            throw PatchbayError(.badFileDescriptor, "descriptor \(rawDescriptor) is not open; there is nothing to share")
        }
        let response = try call(.keys(.share(expiry: expiry, restriction: restriction)), descriptors: [rawDescriptor])
        guard case .keys(.share(let token)) = response.reply else { throw unexpected(response.reply) }
        return Key(token: token)
    }

    /// Claims the file behind `key`: a new descriptor (close-on-exec) for the same open file
    /// description the sharer had.
    ///
    /// The file is whatever the sharer chose, and the caller's close may be its last one, which
    /// can wait as long as the sharer likes (a TCP socket with `SO_LINGER`, a local socket holding
    /// one, a FUSE file). From a key you did not expect, close it on a thread that may wait, or
    /// leave it to the process's exit, which never waits on it.
    ///
    /// - Throws: `ENOENT` when the key does not exist, was claimed, expired or is restricted to
    ///   someone else; `EMFILE` when this process has no free descriptor (the key stays valid);
    ///   `EAGAIN` while this uid is rate-limited after too many failed claims.
    public func claim(_ key: Key) throws(PatchbayError) -> Descriptor {
        try connection.withLock { (connection) throws(PatchbayError) -> Descriptor in
            // (Not `call`: the acknowledgement must follow on the same connection. A claim that
            // may have reached the broker is never sent again.)
            try makeOwn(&connection)
            var response = try connection.call(.keys(.claim(key.token)))
            guard case .keys(.claim) = response.reply else { throw unexpected(response.reply) }
            // Tell the broker whether the descriptor arrived, so a lost one restores the key.
            if !response.descriptorLost, let descriptor = response.takeDescriptor() {
                try connection.post(.keys(.claimAcknowledge(key.token, received: true)))
                return Descriptor(descriptor)
            }
            try connection.post(.keys(.claimAcknowledge(key.token, received: false)))
            if response.descriptorLost {
                throw PatchbayError(.tooManyOpenFiles,
                                    "no free descriptor to receive the file; the key is still valid")
            }
            throw PatchbayError(.protocolError, "the broker's claim reply carried no descriptor")
        }
    }

    /// `claim`, handing the new descriptor over as a swift-system `FileDescriptor`: the caller owns
    /// it and must close it (`close()`), exactly once.
    ///
    /// - Throws: as `claim`.
    public func claimFileDescriptor(_ key: Key) throws(PatchbayError) -> FileDescriptor {
        try claim(key).release()
    }

    // MARK: Async

    /// `share` without blocking a Swift concurrency thread. The caller's borrow keeps
    /// `descriptor` open until the broker has its own copy.
    public func share(
        _ descriptor: borrowing Descriptor, timeout: Expiry = .after(.seconds(60)), claimableBy restriction: ClaimRestriction? = nil
    ) async throws(PatchbayError) -> Key {
        try await share(rawDescriptor: descriptor.rawValue, timeout: timeout, claimableBy: restriction)
    }

    /// `share` of a swift-system `FileDescriptor` without blocking a Swift concurrency thread.
    public func share(
        _ descriptor: FileDescriptor, timeout: Expiry = .after(.seconds(60)), claimableBy restriction: ClaimRestriction? = nil
    ) async throws(PatchbayError) -> Key {
        try await share(rawDescriptor: descriptor.rawValue, timeout: timeout, claimableBy: restriction)
    }

    /// `share(rawDescriptor:)` without blocking a Swift concurrency thread.
    public func share(
        rawDescriptor: CInt, timeout: Expiry = .after(.seconds(60)), claimableBy restriction: ClaimRestriction? = nil
    ) async throws(PatchbayError) -> Key {
        try await offThePool { [self] () throws(PatchbayError) in
            try share(rawDescriptor: rawDescriptor, timeout: timeout, claimableBy: restriction)
        }
    }

    /// `claim` without blocking a Swift concurrency thread.
    public func claim(_ key: Key) async throws(PatchbayError) -> Descriptor {
        try await offThePool { [self] () throws(PatchbayError) in try claim(key) }
    }

    /// `claimFileDescriptor` without blocking a Swift concurrency thread.
    public func claimFileDescriptor(_ key: Key) async throws(PatchbayError) -> FileDescriptor {
        try await offThePool { [self] () throws(PatchbayError) in try claimFileDescriptor(key) }
    }
}
