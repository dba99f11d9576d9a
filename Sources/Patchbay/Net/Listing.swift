// The `/net` namespace as a whole: its bound names, its sockets, where a name lives on disk.

public import PatchbayProtocol
import PatchbaySystem

/// A `/net` socket as `listSockets` shows it: id, family, type, state, name, owner.
public typealias NetSocketInfo = PatchbayProtocol.NetSocketInfo

extension Broker {
    /// Opens `/net/<family>/addrs`: the bound names, one per line, as a file to read.
    public func openAddressList(family: Socket.Family = .local) throws(PatchbayError) -> Descriptor {
        var response = try call(.namespace(.open(path: "/net/\(family.rawValue)/addrs", flags: [])))
        guard case .namespace(.open) = response.reply, let file = response.takeDescriptor() else {
            throw PatchbayError(.protocolError, "the broker's address list reply carried no descriptor")
        }
        return Descriptor(file)
    }

    /// Every `/net` socket: id, family, type, state, name, owner, in id order (page after page
    /// of the broker's listing, so sockets made meanwhile may or may not appear).
    public func listSockets() throws(PatchbayError) -> [NetSocketInfo] {
        var all: [NetSocketInfo] = []
        var after: UInt64 = 0
        while true {
            let page = try listSockets(after: after)
            all += page
            guard let last = page.last, page.count >= Self.socketListPage else { return all }
            after = last.id
        }
    }

    /// Sockets whose id is above `after`, in id order: at most one page (512).
    public func listSockets(after: UInt64) throws(PatchbayError) -> [NetSocketInfo] {
        let response = try call(.net(.list(after: after)))
        guard case .net(.list(let sockets)) = response.reply else {
            throw PatchbayError(.protocolError, "unexpected reply to a socket listing")
        }
        return sockets
    }

    /// The most sockets one listing reply holds.
    static let socketListPage = 512

    /// The filesystem path of a local name: where programs that know nothing of Patchbay connect.
    public func localSocketPath(_ name: String) throws(PatchbayError) -> String {
        let response = try call(.net(.path(name: name)))
        guard case .net(.path(let path)) = response.reply else {
            throw PatchbayError(.protocolError, "unexpected reply to a path request")
        }
        return path
    }

    /// `openAddressList` without blocking a Swift concurrency thread.
    public func openAddressList(family: Socket.Family = .local) async throws(PatchbayError) -> Descriptor {
        try await offThePool { [self] () throws(PatchbayError) in try openAddressList(family: family) }
    }

    /// `listSockets` without blocking a Swift concurrency thread.
    public func listSockets() async throws(PatchbayError) -> [NetSocketInfo] {
        try await offThePool { [self] () throws(PatchbayError) in try listSockets() }
    }

    /// `localSocketPath` without blocking a Swift concurrency thread.
    public func localSocketPath(_ name: String) async throws(PatchbayError) -> String {
        try await offThePool { [self] () throws(PatchbayError) in try localSocketPath(name) }
    }

    /// `netAdopt` by hand, for tests that try to take a listener that is not theirs: sends
    /// `listener` to be registered under `name` and returns the new socket's id (its handle is
    /// closed at once).
    package func adoptListener(_ listener: CInt, name: String, type kind: Socket.Kind) throws(PatchbayError) -> UInt64 {
        var response = try call(.net(.adopt(family: Socket.Family.local.rawValue, type: kind.rawValue, name: name)),
                                descriptors: [listener])
        guard case .net(.adopt(let id)) = response.reply, response.takeDescriptor() != nil else {
            throw PatchbayError(.protocolError, "the broker's adopt reply is malformed")
        }
        return id
    }
}
