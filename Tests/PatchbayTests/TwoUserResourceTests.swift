// Two users against one system broker, for what one uid can make the broker (or the other uid)
// pay: shared memory bytes enforced by the kernel per uid, names another uid planted, and the
// descriptors a uid can make the broker hold.
import Glibc
import Patchbay
import PatchbaySystem
import Testing

@Suite("Two users: resources", .enabled(if: twoUsersAvailable, "needs root, setpriv and a nobody user that can run the products"))
struct TwoUserResourceTests {
    func openBroker(_ arguments: [String]) throws -> TestBroker {
        let broker = try TestBroker(["--system"] + arguments)
        chmod(broker.directory, 0o755)
        return broker
    }

    @Test("shared memory bytes: a uid that grows its object through its own descriptor fills only its own tmpfs; root's objects keep working")
    func sharedMemoryBytesPerUid() throws {
        let broker = try openBroker(["--max-shm-bytes-per-uid", "1M"])
        let root = try broker.connect()
        // nobody creates a small object, then grows it far past its quota with ftruncate on its
        // own descriptor (the broker is not asked), and writes into it.
        let environment = broker.environment
        #expect(try runAsOtherUser(["shm", "create", "/big", "--size", "64M", "--mode", "0644"], environment: environment)
            .termination == .exited(0))
        let payload = String(repeating: "x", count: 2 << 20)
        let filled = try runAsOtherUser(["shm", "write", "/big"], environment: environment, input: payload)
        #expect(filled.termination != .exited(0), "nobody wrote 2 MiB with a 1 MiB quota")
        #expect(filled.standardError.contains("ENOSPC") || filled.standardError.contains("EDQUOT"), "\(filled.standardError)")
        let info = try root.statSharedMemory("/big")
        #expect(info.size == 64 << 20)
        #expect(info.blocks * 512 <= 1 << 20 + 4096, "nobody's object occupies \(info.blocks * 512) bytes")
        // Its next create is EDQUOT: its tmpfs is full.
        let more = try runAsOtherUser(["shm", "create", "/more", "--size", "4k"], environment: environment)
        #expect(more.standardError.contains("EDQUOT"), "\(more.standardError)")
        // Root's own object, in the same broker, fills half a megabyte as if nobody had done
        // anything: root's tmpfs is its own. (Writing through a mapping would SIGBUS this test
        // process if the memory were not there.)
        let mine = try root.openSharedMemory("/mine", options: .create, mode: 0o600)
        try mine.truncate(to: 512 << 10)
        let mapping = try mine.map()
        mapping.withUnsafeMutableBytes { bytes in
            for offset in stride(from: 0, to: bytes.count, by: 4096) { bytes[offset] = 1 }
        }
        #expect(try root.statSharedMemory("/mine").blocks * 512 >= 512 << 10)
    }

    @Test("a name another uid planted is not opened by create: root's create of nobody's object is EACCES")
    func squattedName() throws {
        let broker = try openBroker([])
        let root = try broker.connect()
        #expect(try runAsOtherUser(["shm", "create", "/app-state", "--mode", "0666", "--size", "4k"],
                                   environment: broker.environment).termination == .exited(0))
        let error = expectErrno(.permissionDenied) { () throws(PatchbayError) in
            _ = try root.openSharedMemory("/app-state", options: .create, mode: 0o600)
        }
        #expect(error?.reason.contains("belongs to uid 65534") == true, "\(String(describing: error))")
        // Opening it without create is still possible, on its mode: that is asking for it by name.
        _ = try root.openSharedMemory("/app-state", access: .readOnly)
        // And nobody may create-open root's objects (root is trusted), subject to their mode.
        _ = try root.openSharedMemory("/root-state", options: .create, mode: 0o644)
        let reopen = try runAsOtherUser(["shm", "create", "/root-state"], environment: broker.environment)
        #expect(reopen.standardError.hasPrefix("patchbay: shm create: EACCES: "), "\(reopen.standardError)")
    }
}

/// Whether the next pid can be chosen (`/proc/sys/kernel/ns_last_pid`, root with CAP_SYS_ADMIN).
let pidsCanBeSteered: Bool = access("/proc/sys/kernel/ns_last_pid", W_OK) == 0

@Suite("Two users: pid reuse", .enabled(if: twoUsersAvailable && pidsCanBeSteered, "needs root with CAP_SYS_ADMIN, setpriv and nobody"))
struct PidReuseTests {
    @Test("a key restricted to a pid is not claimed by a later process that got the same pid")
    func recycledPidCannotClaim() throws {
        let broker = try TestBroker(["--system"])
        chmod(broker.directory, 0o755)
        let root = try broker.connect()
        // The intended claimer: alive when the key is made, then gone.
        let intended = try Child("/bin/sleep", ["60"])
        let pid = intended.pid
        let key = try root.share(try openFile("/etc/hostname", flags: O_RDONLY), timeout: .never, claimableBy: .pid(pid))
        intended.kill(SIGKILL)
        try intended.wait()
        // nobody's claimer is made to get that very pid (ns_last_pid), as a fork loop eventually
        // would. Other tests spawn processes too, so a try may miss the number; a few tries hit it.
        var landed = 0
        for _ in 0..<50 where landed == 0 {
            try writeFile("/proc/sys/kernel/ns_last_pid", "\(pid - 1)")
            let attempt = try Child("/usr/bin/setpriv", ["--reuid", "65534", "--regid", "65534", "--clear-groups",
                                                          patchbayCLI, "claim", key.text], environment: broker.environment)
            let output = try attempt.readLine()
            let termination = try attempt.wait()
            if attempt.pid == pid {
                landed += 1
                #expect(output == nil, "a process that recycled pid \(pid) claimed the key")
                #expect(termination == .exited(1))
            }
        }
        #expect(landed > 0, "no try got pid \(pid)")
        // The key is still there, for the process it was meant for (gone), so nobody has it.
        #expect(try root.status().keys == 1)
    }
}
