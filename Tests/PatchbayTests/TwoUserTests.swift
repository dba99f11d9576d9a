// Two users, for real: the test (root) and `nobody` (65534), through setpriv. Skipped, with the
// reason shown, when not running as root or when `nobody` cannot run the built products.
import Glibc
import Patchbay
import PatchbayProtocol
import PatchbaySystem
import SystemPackage
import Synchronization
import Testing

let otherUID: uid_t = 65534

/// Whether a second user can be used: root, setpriv present, and `nobody` can run `patchbay`.
let twoUsersAvailable: Bool = {
    guard getuid() == 0, access("/usr/bin/setpriv", X_OK) == 0 else { return false }
    let probe = try? run("/usr/bin/setpriv", ["--reuid", "65534", "--regid", "65534", "--clear-groups",
                                              patchbayCLI, "--version"])
    return probe?.termination == .exited(0)
}()

/// Runs the CLI as `nobody`.
func runAsOtherUser(_ arguments: [String], environment: [String: String?], input: String = "") throws -> Finished {
    try run("/usr/bin/setpriv", ["--reuid", "65534", "--regid", "65534", "--clear-groups", patchbayCLI] + arguments,
            environment: environment, input: input)
}

@Suite("Two users", .enabled(if: twoUsersAvailable, "needs root, setpriv and a nobody user that can run the products"))
struct TwoUserTests {
    /// A broker in a directory other users can reach.
    func openBroker(_ arguments: [String]) throws -> TestBroker {
        let broker = try TestBroker(arguments)
        chmod(broker.directory, 0o755)
        return broker
    }

    @Test("a per-user broker refuses other uids")
    func perUserBrokerRefusesOthers() throws {
        let broker = try openBroker([])
        chmod(broker.socketPath, 0o666)  // let the connection reach the broker's own check
        let status = try runAsOtherUser(["status"], environment: broker.environment)
        #expect(status.termination == .exited(1))
        #expect(status.standardError.hasPrefix("patchbay: status: EACCES: this is the per-user broker of uid 0"),
                "\(status.standardError)")
    }

    @Test("a system broker enforces shared memory modes from kernel credentials")
    func systemBrokerModes() throws {
        let broker = try openBroker(["--system"])
        let root = try broker.connect()
        try root.openSharedMemory("/secret", options: .create, mode: 0o600).truncate(to: 4096)
        try root.openSharedMemory("/public", options: .create, mode: 0o644).truncate(to: 4096)
        let environment = broker.environment
        let secret = try runAsOtherUser(["shm", "read", "/secret"], environment: environment)
        #expect(secret.standardError.hasPrefix("patchbay: shm read: EACCES: "), "\(secret.standardError)")
        #expect(try runAsOtherUser(["shm", "read", "/public"], environment: environment).termination == .exited(0))
        let write = try runAsOtherUser(["shm", "write", "/public"], environment: environment, input: "x")
        #expect(write.standardError.hasPrefix("patchbay: shm write: EACCES: "), "\(write.standardError)")
        let remove = try runAsOtherUser(["shm", "rm", "/public"], environment: environment)
        #expect(remove.standardError.hasPrefix("patchbay: shm rm: EACCES: "), "\(remove.standardError)")
        // An object created by the other user is owned by its kernel identity, whatever it says.
        #expect(try runAsOtherUser(["shm", "create", "/theirs", "--mode", "0600"], environment: environment)
            .termination == .exited(0))
        let theirs = try root.statSharedMemory("/theirs")
        #expect(theirs.uid == otherUID && theirs.gid == 65534)
        // fstat on a descriptor says the same as the broker: nobody's object, nobody's mode.
        #expect(try runAsOtherUser(["shm", "create", "/theirs-public", "--mode", "0444"], environment: environment)
            .termination == .exited(0))
        let status = try root.openSharedMemory("/theirs-public", access: .readOnly).status()
        #expect(status.uid == otherUID && status.gid == 65534 && status.mode & 0o777 == 0o444, "\(status)")
        // Mode bits bind root too (no bypass).
        expectErrno(.permissionDenied) { () throws(PatchbayError) in _ = try root.openSharedMemory("/theirs") }
    }

    @Test("CAPS: registering someone else's uid or gid is EPERM for a non-root caller")
    func capsRegistrationPermission() throws {
        let broker = try openBroker(["--system"])
        let asRoot = try runAsOtherUser(["caps", "serve", "stolen", "--uid", "0", "--echo"], environment: broker.environment)
        #expect(asRoot.standardError.hasPrefix("patchbay: caps serve: EPERM: "), "\(asRoot.standardError)")
        let asGroup = try runAsOtherUser(["caps", "serve", "stolen", "--uid=-1", "--gid", "0", "--echo"],
                                         environment: broker.environment)
        #expect(asGroup.standardError.hasPrefix("patchbay: caps serve: EPERM: "), "\(asGroup.standardError)")
    }

    @Test("nobody claims root's key and says the file never came: root's own claim is refused (it learns of the theft), not given the file a second time")
    func stolenClaimIsNotGivenBack() throws {
        let broker = try TestBroker(["--system"])
        chmod(broker.directory, 0o755)
        let root = try broker.connect()
        let path = broker.directory + "/secret.txt"
        try writeFile(path, "secret")
        let key = try root.share(try openFile(path, flags: O_RDONLY))
        let thief = try Child("/usr/bin/setpriv", ["--reuid", "65534", "--regid", "65534", "--clear-groups", testPeer,
                                                   "claim-with-full-table", key.text], environment: broker.environment)
        #expect(try thief.readLine() == "EMFILE")
        #expect(throws: PatchbayError.self) { _ = try root.claim(key) }
        thief.closeInput()
        #expect(try thief.readLine() == "claimed on retry")
        _ = try thief.wait()
    }

    @Test("nobody may hold 5 connections to root's world service with --max-caps-clients-per-uid 5, not 6 (EDQUOT); root may hold more")
    func capsClientsPerUserAreBounded() throws {
        let broker = try TestBroker(["--system", "--max-caps-clients-per-uid", "5"])
        chmod(broker.directory, 0o755)
        let root = try broker.connect()
        let service = try CapsService(root, name: "crowded", access: [.world])
        let crowd = try Child("/usr/bin/setpriv", ["--reuid", "65534", "--regid", "65534", "--clear-groups", testPeer,
                                                   "caps-connect-many", "crowded", "50"], environment: broker.environment)
        defer { crowd.closeInput(); _ = try? crowd.wait() }
        #expect(try crowd.readLine() == "refused at 6 EDQUOT")
        let rootClients = try (0..<8).map { _ in try CapsClient(root, name: "crowded") }
        #expect(rootClients.count == 8)
        withExtendedLifetime(service) {}
    }

    @Test("CAPS access classes for another user: USER and GROUP by kernel identity, WORLD for anyone")
    func capsAccessClasses() throws {
        let broker = try openBroker(["--system"])
        let root = try broker.connect()
        // Root's USER-only service, a GROUP service for nobody's group, and a WORLD service.
        let services = [
            try CapsService(root, name: "root.user", access: [.user]),
            try CapsService(root, name: "nobody.group", uid: -1, gid: 65534, access: [.group]),
            try CapsService(root, name: "anyone.world", access: [.world]),
        ]
        let stop = Atomic<Bool>(false)
        for service in services {
            startThread {
                while !stop.load(ordering: .relaxed) {
                    try? service.receive { (message: CapsServiceMessage, payload: UnsafeRawBufferPointer) in
                        if message.kind == .request {
                            try? service.reply(to: message.messageID, Array("uid \(message.credentials.uid)".utf8))
                        }
                    }
                }
            }
        }
        defer {
            stop.store(true, ordering: .relaxed)
            for service in services { service.cancelWait() }
        }
        let environment = broker.environment
        let user = try runAsOtherUser(["caps", "call", "root.user", "hi"], environment: environment)
        #expect(user.standardError.hasPrefix("patchbay: caps call: EACCES: "), "\(user.standardError)")
        // The service sees the caller's kernel uid, whatever the caller might claim.
        let group = try runAsOtherUser(["caps", "call", "nobody.group", "hi"], environment: environment)
        #expect(group.standardOutput.hasPrefix("uid 65534"), "\(group.standardOutput)\(group.standardError)")
        let world = try runAsOtherUser(["caps", "call", "anyone.world", "hi"], environment: environment)
        #expect(world.standardOutput.hasPrefix("uid 65534"), "\(world.standardOutput)\(world.standardError)")
        // Asking for a service "of uid 65534" does not make root's service theirs.
        let forged = try runAsOtherUser(["caps", "call", "root.user", "--uid", "65534", "hi"], environment: environment)
        #expect(forged.standardError.hasPrefix("patchbay: caps call: ENOENT: "), "\(forged.standardError)")
    }

    @Test("share --for-uid: only that uid can claim")
    func claimRestrictedToAnotherUser() throws {
        let broker = try openBroker(["--system"])
        let root = try broker.connect()
        let path = broker.directory + "/for-nobody.txt"
        try writeFile(path, "for nobody only")
        chmod(path, 0o600)  // nobody cannot open it; only the key gets it there
        let key = try root.share(try openFile(path, flags: O_RDONLY), claimableBy: .uid(otherUID))
        let wrongKey = try root.share(try openFile(path, flags: O_RDONLY), claimableBy: .uid(0))
        let claimed = try runAsOtherUser(["claim", key.text], environment: broker.environment)
        #expect(claimed.standardOutput == "for nobody only", "\(claimed.standardError)")
        let refused = try runAsOtherUser(["claim", wrongKey.text], environment: broker.environment)
        #expect(refused.standardError.hasPrefix("patchbay: claim: ENOENT: "))
        _ = try root.claim(wrongKey)
    }
}
