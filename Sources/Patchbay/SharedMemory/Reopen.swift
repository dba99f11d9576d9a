// Reopening a named object without the broker, when the broker has already said what the name
// refers to.
//
// `shm_open` of an existing object is a local `open`; through the broker it is a round trip plus
// the broker's own `openat`. So the library remembers, per name and access, the object a broker
// open gave it: the object file's path (read back from the descriptor) and its identity (device
// and inode), with the value of the namespace's change counter read *before* that open (opcode
// 45: a page the broker bumps on every create, unlink and rename, mapped read-only here). Opening
// the same name again with no create, exclusive or truncate flag then opens that path directly,
// and keeps the result only when all of this holds:
//
// - the counter still has the remembered value, before and after the `open`: no name changed
//   since the broker's answer, so the name still refers to that object;
// - the file opened is the remembered one (`fstat`: same device and inode);
// - the broker connection has not hung up (`poll`): a broker restarted meanwhile has a counter of
//   its own, so the old one, frozen, would prove nothing;
// - the effective uid and gid are the ones the broker checked.
//
// Anything else (the directory is not ours to open, as with the system broker; the object is
// gone; a counter that moved) drops the entry and asks the broker, which stays the authority on
// names and permissions. The broker granted this process this access to this object, and nothing
// it decides that on has changed, so the direct open answers what the broker would.

import Glibc
import PatchbayProtocol
import PatchbaySystem
import Synchronization

/// The remembered opens of one `Broker`, and its change counter page.
final class NamedObjectCache: Sendable {
    private struct Key: Hashable {
        var name: [UInt8]
        var readWrite: Bool
    }

    private struct Entry {
        var path: String
        var device: UInt64
        var inode: UInt64
        var counter: UInt64
        var euid: uid_t
        var egid: gid_t
    }

    /// The counter page, mapped read-only for as long as this lives.
    private final class Page: @unchecked Sendable {  // immutable once made
        let mapping: PatchbaySystem.Mapping
        init(_ mapping: consuming PatchbaySystem.Mapping) { self.mapping = mapping }
        var word: UnsafeMutablePointer<UInt64> { mapping.baseAddress.assumingMemoryBound(to: UInt64.self) }
    }

    private final class State {
        var page: Page?
        /// Pages of earlier brokers, kept mapped (one page per restart): a reader may still hold
        /// a pointer into one.
        var retired: [Page] = []
        /// The broker's reconnection count when `page` was fetched.
        var pageGeneration: UInt64 = 0
        /// The broker does not know opcode 45 (or the page cannot be mapped): no fast path.
        var unavailable = false
        var entries: [Key: Entry] = [:]
    }

    private let state = Mutex(State())
    /// Entries kept at most (an open of a 65th name forgets the others).
    private static let capacity = 64

    /// The counter's current value, fetching the page first if needed; nil without a fast path.
    func counter(for broker: Broker) -> UInt64? {
        let generation = broker.reconnections
        let page: UnsafeMutablePointer<UInt64>? = state.withLock { state in
            guard !state.unavailable else { return nil }
            if let page = state.page, state.pageGeneration == generation { return page.word }
            return nil
        }
        if let page { return SharedWord.load(page) }
        // Fetched outside the lock: a broker call may block.
        guard state.withLock({ !$0.unavailable }) else { return nil }
        do throws(PatchbayError) {
            var response = try broker.call(.sharedMemory(.watch))
            guard case .sharedMemory(.watch) = response.reply, let memory = response.takeDescriptor() else {
                throw PatchbayError(.protocolError, "no change counter came with the reply")
            }
            let mapping: PatchbaySystem.Mapping
            do {
                mapping = try PatchbaySystem.Mapping(memory, length: 4096, writable: false)
            } catch {
                throw PatchbayError(error, "cannot map the change counter")
            }
            let page = Page(mapping)
            let word = page.word
            state.withLock { state in
                if let old = state.page { state.retired.append(old) }
                state.page = page
                state.pageGeneration = generation
                state.entries = [:]
            }
            return SharedWord.load(word)
        } catch {
            // An older broker, or no memory to map: the broker answers every open, as before.
            state.withLock { $0.unavailable = true }
            return nil
        }
    }

    /// Remembers that the broker opened `name` with `access` as `handle`, the counter being
    /// `counter` before it asked.
    func remember(_ name: [UInt8], readWrite: Bool, handle: CInt, counter: UInt64) {
        var buffer = [CChar](repeating: 0, count: 4096)
        let length = readlink("/proc/self/fd/\(handle)", &buffer, buffer.count - 1)
        guard length > 0, length < buffer.count - 1 else { return }
        let path = String(decoding: buffer[0..<length].map { UInt8(bitPattern: $0) }, as: UTF8.self)
        var info = stat()
        guard path.hasPrefix("/"), !path.hasSuffix(" (deleted)"), fstat(handle, &info) == 0 else { return }
        let entry = Entry(path: path, device: UInt64(info.st_dev), inode: UInt64(info.st_ino), counter: counter,
                          euid: geteuid(), egid: getegid())
        state.withLock { state in
            if state.entries.count >= Self.capacity { state.entries = [:] }
            state.entries[Key(name: name, readWrite: readWrite)] = entry
        }
    }

    /// The object `name` refers to, opened directly, if what was remembered still holds; nil
    /// (and the entry forgotten) otherwise.
    func reopen(_ name: [UInt8], readWrite: Bool, broker: Broker) -> CInt? {
        let key = Key(name: name, readWrite: readWrite)
        let generation = broker.reconnections
        guard let (entry, word) = state.withLock({ state -> (Entry, UnsafeMutablePointer<UInt64>)? in
            guard let entry = state.entries[key], let page = state.page, state.pageGeneration == generation else { return nil }
            return (entry, page.word)
        }) else { return nil }
        guard SharedWord.load(word) == entry.counter, geteuid() == entry.euid, getegid() == entry.egid else {
            forget(key)
            return nil
        }
        let fd = Glibc.open(entry.path, (readWrite ? O_RDWR : O_RDONLY) | O_CLOEXEC | O_NOFOLLOW)
        guard fd >= 0 else {
            forget(key)
            return nil
        }
        var info = stat()
        guard fstat(fd, &info) == 0, UInt64(info.st_dev) == entry.device, UInt64(info.st_ino) == entry.inode,
              SharedWord.load(word) == entry.counter, broker.isConnectionAlive, broker.reconnections == generation
        else {
            close(fd)
            forget(key)
            return nil
        }
        return fd
    }

    private func forget(_ key: Key) {
        _ = state.withLock { $0.entries.removeValue(forKey: key) }
    }
}

extension Broker {
    /// Whether the broker has not hung up this connection (a `poll` that does not wait, once a
    /// call of another thread is done with the connection).
    var isConnectionAlive: Bool {
        connection.withLock { connection in
            guard !connection.isBroken else { return false }
            var entry = pollfd(fd: connection.socket.rawValue, events: Int16(POLLIN) | 0x2000 /* POLLRDHUP */, revents: 0)
            guard poll(&entry, 1, 0) >= 0 else { return false }
            // Nothing may arrive on an idle connection: readable means end of file.
            return entry.revents == 0
        }
    }
}
