// Anonymous shared memory: memfds, made in this process or by the broker (`/dev/shmem/new`).

import PatchbayProtocol
import PatchbaySystem

extension SharedMemory {
    /// A new anonymous object, created in this process (no broker round trip): the
    /// `SHM_ANON`/`/dev/shmem/new` object. `sealable` allows Linux memfd seals on it.
    public static func anonymous(sealable: Bool = false) throws(PatchbayError) -> SharedMemory {
        do {
            return SharedMemory(descriptor: Descriptor(try makeMemoryFile(name: "patchbay-anonymous", sealable: sealable)),
                                kind: .anonymous, isWritable: true, confined: true)
        } catch {
            throw PatchbayError(error, "cannot create an anonymous shared memory object")
        }
    }
}

extension Broker {
    /// A new anonymous object made by the broker (opening `/dev/shmem/new` in its namespace).
    /// `SharedMemory.anonymous` does the same without a round trip.
    public func newAnonymousSharedMemory(sealable: Bool = false) throws(PatchbayError) -> SharedMemory {
        var response = try call(.namespace(.open(path: "/dev/shmem/new", flags: sealable ? .sealable : [])))
        guard case .namespace(.open) = response.reply, let handle = response.takeDescriptor() else {
            throw PatchbayError(.protocolError, "the broker's open reply carried no descriptor")
        }
        return SharedMemory(descriptor: Descriptor(handle), kind: .anonymous, isWritable: true)
    }

    /// `newAnonymousSharedMemory` without blocking a Swift concurrency thread.
    public func newAnonymousSharedMemory(sealable: Bool = false) async throws(PatchbayError) -> SharedMemory {
        try await offThePool { [self] () throws(PatchbayError) in try newAnonymousSharedMemory(sealable: sealable) }
    }
}
