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

/// One `ctl` command, its arguments checked.
public enum NetControlStep: Sendable, Equatable {
    /// `bind NAME [MODE]`: MODE is the octal permission of the name's socket file.
    case bind(name: String, mode: UInt32?)
    /// `listen [BACKLOG]`.
    case listen(backlog: Int32?)
    /// `connect NAME`.
    case connect(name: String)

    public var command: NetCommand {
        switch self {
        case .bind: .bind
        case .listen: .listen
        case .connect: .connect
        }
    }

    /// The command as a line of its own.
    public var line: String {
        switch self {
        case .bind(let name, let mode): mode.map { "bind \(name) 0\(String($0, radix: 8))" } ?? "bind \(name)"
        case .listen(let backlog): backlog.map { "listen \($0)" } ?? "listen"
        case .connect(let name): "connect \(name)"
        }
    }
}

/// A `ctl` line that does not parse: EINVAL, with the reason.
public struct NetControlSyntaxError: Error, Sendable, Equatable {
    public var reason: String
}

/// The `ctl` line grammar, shared by the broker and the library: commands joined by `&&`, words
/// separated by blanks. The whole line is checked here before anything runs.
public enum NetControlLine {
    /// The default backlog of `listen`.
    public static let defaultBacklog: Int32 = 128

    public static func parse(_ line: String) throws(NetControlSyntaxError) -> [NetControlStep] {
        var steps: [NetControlStep] = []
        for part in line.split(separator: "&&", omittingEmptySubsequences: false) {
            let words = part.split(whereSeparator: { $0 == " " || $0 == "\t" || $0 == "\n" })
            guard let word = words.first else {
                throw NetControlSyntaxError(reason: "empty command in \"\(line.prefix(120))\"")
            }
            guard let command = NetCommand(rawValue: String(word)) else {
                throw NetControlSyntaxError(reason: "unknown command \"\(word.prefix(40))\"; the commands are bind, listen and connect")
            }
            let arguments = words.dropFirst()
            switch command {
            case .bind:
                guard (1...2).contains(arguments.count) else {
                    throw NetControlSyntaxError(reason: "bind takes a name and an optional octal mode, e.g. \"bind my-service 0660\"")
                }
                let name = try localName(arguments.first!)
                var mode: UInt32?
                if arguments.count == 2 {
                    let text = arguments.last!
                    guard text.utf8.count <= 4, text.utf8.allSatisfy({ $0 >= 0x30 && $0 <= 0x37 }), let value = UInt32(text, radix: 8), value <= 0o777 else {
                        throw NetControlSyntaxError(reason: "the mode must be octal permission bits from 0 to 0777, not \"\(text.prefix(20))\"")
                    }
                    mode = value
                }
                steps.append(.bind(name: name, mode: mode))
            case .listen:
                guard arguments.count <= 1 else {
                    throw NetControlSyntaxError(reason: "listen takes at most one backlog number")
                }
                var backlog: Int32?
                if let text = arguments.first {
                    // Decimal digits only, as socket ids in paths (no sign, no spaces).
                    guard text.utf8.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }), let value = Int32(text), value > 0 else {
                        throw NetControlSyntaxError(reason: "the backlog must be a positive decimal number, not \"\(text.prefix(20))\"")
                    }
                    backlog = value
                }
                steps.append(.listen(backlog: backlog))
            case .connect:
                guard arguments.count == 1 else {
                    throw NetControlSyntaxError(reason: "connect takes one name, e.g. \"connect my-service\"")
                }
                steps.append(.connect(name: try localName(arguments.first!)))
            }
        }
        return steps
    }

    private static func localName(_ word: Substring) throws(NetControlSyntaxError) -> String {
        guard isValidLocalSocketName(word) else {
            throw NetControlSyntaxError(reason: "\"\(word.prefix(80))\" is not a local name: use 1 to 64 of A-Z a-z 0-9 . _ - (not . or ..)")
        }
        return String(word)
    }
}
