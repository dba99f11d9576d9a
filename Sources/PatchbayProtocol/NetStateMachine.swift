// The /net socket state machine of SEMANTICS.md §4, as data: the one table both the broker and
// the tests read. Every command is a transition; anything the table does not allow is EINVAL,
// including a transition to the state the socket is already in.

/// The states of a `/net` socket.
public enum NetSocketState: String, Sendable, CaseIterable {
    case new = "NEW"
    case bound = "BOUND"
    case listening = "LISTENING"
    case connecting = "CONNECTING"
    case connected = "CONNECTED"
    case closing = "CLOSING"
    case closed = "CLOSED"

    /// Allowed transitions. CONNECTING falls back to where it came from when a connect fails;
    /// LISTENING → CONNECTED is what each accepted connection does (the new socket is born
    /// CONNECTED; the listener stays LISTENING).
    public static let transitions: [NetSocketState: Set<NetSocketState>] = [
        .new: [.bound, .connecting, .closed],
        .bound: [.listening, .connecting, .connected, .closed],
        .listening: [.connected, .closed],
        .connecting: [.connected, .new, .bound],
        .connected: [.closing],
        .closing: [.closed],
        .closed: [],
    ]

    public func canTransition(to next: NetSocketState) -> Bool {
        next != self && (Self.transitions[self]?.contains(next) ?? false)
    }
}

/// The `ctl` commands and the state each one moves a socket to.
public enum NetCommand: String, Sendable, CaseIterable {
    case bind
    case listen
    case connect

    /// The state the command moves the socket to (connect passes through CONNECTING).
    public var target: NetSocketState {
        switch self {
        case .bind: .bound
        case .listen: .listening
        case .connect: .connecting
        }
    }
}

/// Local socket names: 1 to 64 characters of `[A-Za-z0-9._-]`, and not `.` or `..`.
public func isValidLocalSocketName(_ name: some StringProtocol) -> Bool {
    guard (1...64).contains(name.utf8.count), name != ".", name != ".." else { return false }
    return name.utf8.allSatisfy { byte in
        (byte >= 0x30 && byte <= 0x39) || (byte >= 0x41 && byte <= 0x5A) || (byte >= 0x61 && byte <= 0x7A)
            || byte == UInt8(ascii: ".") || byte == UInt8(ascii: "_") || byte == UInt8(ascii: "-")
    }
}
