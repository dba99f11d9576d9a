// Shared memory: the requests. Named objects (`shm_open`, `shm_unlink`, `shm_rename`, stat and a
// paged listing) are answered from the store (SharedMemoryStore.swift); an anonymous object is a
// new memfd on every open of `/dev/shmem/new`, for clients that cannot make one themselves. The
// broker keeps no descriptor of either: it sends the handle and closes its copy.
//
// Errors: EINVAL, ENAMETOOLONG, ENOENT, EEXIST, EACCES, EDQUOT, ENOSPC, as SEMANTICS.md §2–3 say.

import Glibc
import PatchbayProtocol
import PatchbaySystem

final class SharedMemoryRequests {
    let store: SharedMemoryStore
    private let sessions: SessionTable

    /// Names per listing page: 48 entries of at most ~1.1 KB each stay inside one frame.
    static let listPageSize = 48

    init(store: SharedMemoryStore, sessions: SessionTable) {
        self.store = store
        self.sessions = sessions
    }

    func handle(_ request: Request.SharedMemory, _ context: RequestContext) {
        do throws(RequestError) {
            switch request {
            case .open(let open):
                let opened = try store.open(open, by: context.caller)
                sessions.reply(.sharedMemory(.open(opened.info)), attaching: [opened.handle.rawValue], to: context)
            case .unlink(let name):
                try store.unlink(name, by: context.caller)
                sessions.reply(.sharedMemory(.unlink), to: context)
            case .rename(let from, let to, let flags):
                try store.rename(from: from, to: to, flags: flags, by: context.caller)
                sessions.reply(.sharedMemory(.rename), to: context)
            case .stat(let name):
                sessions.reply(.sharedMemory(.stat(try store.stat(name))), to: context)
            case .list(let after):
                let (page, more) = store.list(after: after, limit: Self.listPageSize)
                sessions.reply(.sharedMemory(.list(page, more: more)), to: context)
            case .watch:
                // Only for the broker's own uid (the per-user broker's user, or root on the system
                // broker): another uid could not open the store's files anyway, and the counter
                // would tell it how often other users change their names.
                guard context.caller.uid == geteuid() else {
                    throw RequestError(errno: .permissionDenied,
                                       reason: "the namespace's change counter is for uid \(geteuid()), the broker's own")
                }
                sessions.reply(.sharedMemory(.watch), attaching: [store.changes.descriptor.rawValue], to: context)
            }
        } catch {
            sessions.fail(error, context)
        }
    }

    /// `/dev/shmem/new`: a memfd of size 0 whose first mapping decides its size.
    func openAnonymous(flags: OpenFlags, _ context: RequestContext) throws(RequestError) {
        guard flags.isSubset(of: [.sealable, .nonblock]) else {
            throw RequestError(errno: .invalidArgument, reason: "/dev/shmem/new takes only the sealable flag")
        }
        let memory: Descriptor
        do {
            memory = try makeMemoryFile(name: "patchbay-anonymous", sealable: flags.contains(.sealable))
        } catch {
            throw RequestError(errno: error, reason: "cannot create an anonymous object: \(error.name)")
        }
        // The caller's object, mode 0600 (`makeMemoryFile`): it may reopen it (a read-only
        // handle), another user given a handle may not reopen it for more access.
        if context.caller.uid != geteuid(), fchown(memory.rawValue, context.caller.uid, context.caller.gid) != 0 {
            throw RequestError(errno: .current, reason: "cannot give the anonymous object to uid \(context.caller.uid)")
        }
        sessions.reply(.namespace(.open(objectKind: OpenedObjectKind.anonymousSharedMemory.rawValue, id: 0)),
                       attaching: [memory.rawValue], to: context)
    }
}
