// CAPS (DragonFly BSD): named services, many clients to one service, REQUEST → REPLY → DISPOSE.
//
// What the broker does. Only the rendezvous. A service registers (name, uid, gid, flags); a
// client connects (name, uid, gid, flags; -1 is a wildcard on the client side), and the broker
// checks names, EPERM for registering someone else's uid or gid, shadowing (the newest matching
// registration serves new clients), `exclusive`, and access: a class flag set on both sides, USER
// (service uid == client euid), GROUP (client in the service gid) or WORLD, with no root bypass.
//
// Then it builds the channel and steps aside: one memfd per client connection (rings and payload
// arenas, CapsLayout), an eventfd that wakes the service and one that wakes the client, and a
// socket pair between the two peers for descriptors that ride along with messages. The client gets
// its half in the connect reply, the service in a `capsConnected` event on its port's connection.
// Requests and replies then go between the two processes without the broker.
//
// Lifetime. The broker keeps, per channel, only the header page mapped and the client's eventfd,
// because it is the one that learns of deaths (a port's connection closes): a service that goes
// away gets every channel marked service-closed and every client woken (their pending requests
// come back as 0-byte replies, later puts are ENOTCONN); a client that goes away gets its channel
// marked client-closed and the service told (its requests become DISPOSEs there).
//
// Errors: EINVAL (bad name or flags), ENAMETOOLONG, EPERM, EEXIST (exclusive), ENOENT (no match,
// unless waiting), EACCES.

import Glibc
import Logging
import OrderedCollections
import PatchbayProtocol
import PatchbaySystem
import SystemPackage

final class CapsServiceRecord {
    let id: UInt64
    let name: String
    let uid: Int32
    let gid: Int32
    let flags: CapsFlags
    let maximumInFlight: UInt32
    let session: UInt64
    let owner: PeerCredentials
    /// The status page, made by the service and sealed against writes by anyone else
    /// (F_SEAL_FUTURE_WRITE after the service mapped it): the broker maps it read-only to read the
    /// generation, and reopens it read-only for clients.
    let status: Descriptor
    let statusMapping: Mapping
    /// The notices page: the broker's own (written here, read by the service).
    let notices: Descriptor
    let noticesMapping: Mapping
    var channels: Set<UInt64> = []
    /// The generation the registration started at (`initialGeneration`), saved before it was
    /// admitted.
    var initialGeneration: UInt64 = 0
    /// Uids whose new connections the service takes no more for now (`capsRefuseUser`), at most
    /// `CapsRegistry.maximumRefusedUsers`.
    var refusedUsers: Set<UInt32> = []
    /// The two pages' descriptors, charged to the registering uid.
    private let charge: DescriptorCharge?

    init(id: UInt64, name: String, uid: Int32, gid: Int32, flags: CapsFlags, maximumInFlight: UInt32, session: UInt64,
         owner: PeerCredentials, pages: consuming ServicePages, charge: DescriptorCharge?) {
        self.charge = charge
        self.id = id
        self.name = name
        self.uid = uid
        self.gid = gid
        self.flags = flags
        self.maximumInFlight = maximumInFlight
        self.session = session
        self.owner = owner
        status = pages.status
        statusMapping = pages.statusMapping
        notices = pages.notices
        noticesMapping = pages.noticesMapping
    }

    /// The generation the service published in its status page.
    var generation: UInt64 {
        SharedWord.load(statusMapping.baseAddress.advanced(by: CapsLayout.statusGenerationOffset).assumingMemoryBound(to: UInt64.self))
    }

    /// The messages the service counted in its status page (PROTOCOL.md §12.7): request-ring
    /// entries it consumed (REQUESTs and ABORTs) and reply-ring entries it published, on all its
    /// channels. Only the service writes that page; a channel's header words, which its client
    /// can write as well, are not used.
    var messages: (toService: UInt64, toClient: UInt64) {
        let base = statusMapping.baseAddress
        return (SharedWord.load(base.advanced(by: CapsLayout.statusRequestsTakenOffset).assumingMemoryBound(to: UInt64.self)),
                SharedWord.load(base.advanced(by: CapsLayout.statusRepliesPutOffset).assumingMemoryBound(to: UInt64.self)))
    }

    /// Tells the service that an event is queued on its connection.
    func noteEventQueued() {
        SharedWord.increment(noticesMapping.baseAddress.assumingMemoryBound(to: UInt32.self))
    }

    var info: CapsServiceInfo {
        CapsServiceInfo(name: name, uid: uid, gid: gid, flags: flags.rawValue, clients: UInt32(channels.count),
                        generation: generation, pid: owner.pid)
    }
}

final class CapsChannelRecord {
    let id: UInt64
    let serviceID: UInt64
    let clientSession: UInt64
    /// The client's uid (`maximumClientsPerUser` counts by it).
    let clientUID: UInt32
    let header: Mapping
    let clientWake: Descriptor
    /// The client wake-up the broker keeps, charged to the client's uid.
    private let charge: DescriptorCharge?
    /// Whether the service's connection notice went out (sent or queued): only then is it told
    /// of the client's departure.
    var announced = false

    init(id: UInt64, serviceID: UInt64, clientSession: UInt64, clientUID: UInt32, header: consuming Mapping,
         clientWake: consuming Descriptor, charge: DescriptorCharge?) {
        self.charge = charge
        self.clientUID = clientUID
        self.id = id
        self.serviceID = serviceID
        self.clientSession = clientSession
        self.header = header
        self.clientWake = clientWake
    }

    private func word(_ offset: Int) -> UnsafeMutablePointer<UInt32> {
        header.baseAddress.advanced(by: offset).assumingMemoryBound(to: UInt32.self)
    }

    /// The service is gone (or, `refused`, could not take this client): mark it and wake the
    /// client wherever it waits.
    func markServiceClosed(refused: Bool = false) {
        SharedWord.store(word(CapsLayout.serviceClosedOffset), refused ? CapsLayout.serviceRefusedClient : 1)
        SharedWord.increment(word(CapsLayout.clientWakeOffset))
        Futex.wake(word(CapsLayout.clientWakeOffset))
        // A copy of the writer's end the service holds: the send never waits, whatever its flags.
        WakeSocket.wake(clientWake.rawValue)
    }

    func markClientClosed() {
        SharedWord.store(word(CapsLayout.clientClosedOffset), 1)
    }

    /// The four ring words of the header, as the peers published them.
    var ringWords: (requestTail: UInt64, requestHead: UInt64, replyTail: UInt64, replyHead: UInt64) {
        func load(_ offset: Int) -> UInt64 {
            SharedWord.load(header.baseAddress.advanced(by: offset).assumingMemoryBound(to: UInt64.self))
        }
        return (load(CapsLayout.requestTailOffset), load(CapsLayout.requestHeadOffset), load(CapsLayout.replyTailOffset),
                load(CapsLayout.replyHeadOffset))
    }

}

/// A service's two pages: its status page (checked, mapped read-only) and the notices page the
/// broker makes for it.
struct ServicePages: ~Copyable {
    var status: Descriptor
    var statusMapping: Mapping
    var notices: Descriptor
    var noticesMapping: Mapping

    static func make(status page: consuming Descriptor, of uid: UInt32) throws(RequestError) -> ServicePages {
        let required: Seals = [.futureWrite, .shrink, .grow, .seal]
        guard let seals = try? page.seals(), seals.contains(required), (try? page.size()) == CapsLayout.statusSize else {
            // Not a sealed memfd, so it may be anything of the client's: close it off the loop.
            DeferredCloser.shared.close(page, of: uid)
            throw RequestError(errno: .invalidArgument,
                               reason: "a service's status page must be a \(CapsLayout.statusSize)-byte memfd sealed with future-write, shrink, grow and seal")
        }
        do {
            return try build(page)
        } catch {
            throw RequestError(errno: error, reason: "cannot map the service's pages")
        }
    }

    private static func build(_ page: consuming Descriptor) throws(Errno) -> ServicePages {
        let statusMapping = try Mapping(page, length: CapsLayout.statusSize, writable: false)
        let memory = try makeMemoryFile(name: "patchbay-caps-notices", sealable: true)
        try memory.truncate(to: 4096)
        // Sealed at its size: the service could otherwise make the broker's mapping fault.
        try memory.addSeals([.shrink, .grow, .seal])
        let noticesMapping = try Mapping(memory, length: 4096, writable: true)
        return ServicePages(status: page, statusMapping: statusMapping, notices: memory, noticesMapping: noticesMapping)
    }
}

/// What the client gets for a new connection, and what the service gets.
struct CapsConnection: ~Copyable {
    var channelID: UInt64
    var service: CapsServiceRecord
    var channel: Descriptor
    var statusReadOnly: Descriptor
    /// The service's wake-up: it reads, the client writes.
    var serviceWakeReader: Descriptor
    var serviceWakeWriter: Descriptor
    /// The client's wake-up: it reads, the service (and the broker) write.
    var clientWakeReader: Descriptor
    var clientWakeWriter: Descriptor
    var clientEnd: Descriptor
    var serviceEnd: Descriptor
}

/// A name as one uid registered it: what the registry keeps a generation for.
struct RememberedName: Hashable {
    let uid: UInt32
    let name: String
}

final class CapsRegistry {
    /// In id order (ids only grow), so a listing is a prefix, not a sort.
    private(set) var services: OrderedDictionary<UInt64, CapsServiceRecord> = [:]
    /// Services registered by each uid (the registering process's), for the quota and `status`.
    private var servicesPerUser: [UInt32: Int] = [:]
    /// Registrations by name, oldest first (the newest shadows the others for new clients).
    private var byName: [String: [UInt64]] = [:]
    private(set) var channels: [UInt64: CapsChannelRecord] = [:]
    private var channelBySession: [UInt64: UInt64] = [:]
    private var serviceBySession: [UInt64: UInt64] = [:]
    /// The last generation of every name each uid registered (the registering process's uid),
    /// remembered after its services close, and charged to that uid. Kept per uid, so another
    /// uid's registrations of the same name (while it is free) never move this one's.
    private var lastGeneration: [RememberedName: UInt64] = [:]
    /// The names remembered for each uid, the least recently registered first.
    private var namesByUser: [UInt32: OrderedSet<String>] = [:]
    /// Per uid, the highest generation of a name it forgot: a name it has no record of starts
    /// above it, so a forgotten name registered again is still visibly newer than before.
    private var forgottenFloor: [UInt32: UInt64] = [:]
    /// Every uid's floor: raised past any generation a lost record could have held, when the
    /// records come from a copy that may have fallen behind (`mirrorDirectory`). Line `<gen> * *`.
    private var everyUIDFloor: UInt64 = 0
    private var nextID: UInt64 = 1
    private var logger: Logger
    let arenaSize = CapsLayout.defaultArenaSize
    /// Services one uid (the registering process's, whatever uid it registers under) may have.
    var maximumServicesPerUser = 256
    /// Connections one uid may have open to one service, unless it is root or the service's own
    /// uid: each holds three of the service process's descriptors, and without a bound one user
    /// could fill the service's table, leaving every later client waiting for an answer.
    var maximumClientsPerUser = 64
    /// Names one uid may have remembered (each a line of the generations file and a record in
    /// memory, kept after its service closes): past it, its least recently registered name not
    /// registered now is forgotten. Without a bound, one user registering fresh names would
    /// make the broker hold them forever.
    var maximumNamesPerUser = 1024
    /// Where services' and channels' descriptors are charged (nil: not charged, in unit tests).
    var budget: DescriptorBudget?
    /// Names reserved for their owners (system broker).
    var policy = Policy.none
    /// How long a name held when the last broker stopped stays its holder's, in nanoseconds
    /// (`--caps-name-grace`; set before `generationsFile`). 0: not kept.
    var nameGrace: UInt64 = 30_000_000_000
    /// The names held when the last broker stopped (a crash or not), each kept for the uid that
    /// held it until that uid registers it again or `keptNamesUntil` passes: another uid's
    /// registration meanwhile is `EEXIST`, as while the holder was registered. So a restart is no
    /// moment for another user to take a service's name before the service registers again.
    private var keptNames: [String: UInt32] = [:]
    /// When the kept names are released (`CLOCK_MONOTONIC` nanoseconds).
    private var keptNamesUntil: UInt64 = 0

    init(logger: Logger) {
        self.logger = logger
    }

    /// Where the last generation of each name is kept across broker restarts (a file in the
    /// broker's private store directory, lines of `<generation> <name>`, the highest per name
    /// winning), so a service registered after a restart is still visibly newer than the one
    /// before. Nil: kept in memory only.
    var generationsFile: String? {
        didSet { load() }
    }

    /// Where copies of the generations and ids are kept when `generationsFile` is on a file
    /// system a stop may lose (the system broker's state tmpfs, mounted in a service's private
    /// mount namespace, which `systemctl stop` ends, along with the descriptor store that keeps
    /// it across a crash or restart): the store's own directory. Set before `generationsFile`.
    /// The copies are written at a clean stop (`saveCopies`); while a broker runs they are
    /// renamed `<file>.dirty` (a rename needs no room), so a broker that finds only those after
    /// losing the state knows they may be behind, and moves past anything they could have missed.
    var mirrorDirectory: String?
    /// How far past a copy that may be behind the ids and the generations go.
    static let idsPastADirtyCopy: UInt64 = 1 << 20
    static let generationsPastADirtyCopy: UInt64 = 1 << 32

    private func load() {
        guard let generationsFile, let idsFile else { return }
        var generationsSource = generationsFile
        var idsSource = idsFile
        var behind = false
        if let mirrorDirectory {
            func source(_ own: String, _ name: String) -> String {
                if access(own, F_OK) == 0 { return own }
                let copy = mirrorDirectory + "/" + name
                if access(copy, F_OK) == 0 { return copy }
                if access(copy + ".dirty", F_OK) == 0 {
                    behind = true
                    return copy + ".dirty"
                }
                return own
            }
            generationsSource = source(generationsFile, "caps-generations")
            idsSource = source(idsFile, "caps-ids")
        }
        let loaded = loadGenerations(from: generationsSource)
        loadReservedIDs(from: idsSource)
        if behind {
            nextID = min(nextID + Self.idsPastADirtyCopy, Self.lastID + 1)
            for key in Array(lastGeneration.keys) {
                lastGeneration[key] = min(lastGeneration[key]! + Self.generationsPastADirtyCopy, Self.highestGeneration)
            }
            for uid in Array(forgottenFloor.keys) {
                forgottenFloor[uid] = min(forgottenFloor[uid]! + Self.generationsPastADirtyCopy, Self.highestGeneration)
            }
            everyUIDFloor = min(everyUIDFloor + Self.generationsPastADirtyCopy, Self.highestGeneration)
            logger.warning("CAPS generations and ids taken from copies that may be behind (the broker before did not stop cleanly, and its state is gone); they go on well past them",
                           metadata: ["ids": "\(nextID)"])
        }
        // Compacted (and made, from a copy) at once.
        if loaded || behind { rewriteGenerations() }
        if let mirrorDirectory {
            for name in ["caps-generations", "caps-ids"] {
                let copy = mirrorDirectory + "/" + name
                if access(copy, F_OK) == 0 { rename(copy, copy + ".dirty") }
            }
        }
    }

    /// Writes the copies in `mirrorDirectory` (at a clean stop) and removes the `.dirty` marks; a
    /// copy that cannot be written leaves its mark, and the next broker that must use it goes past it.
    func saveCopies() {
        guard let mirrorDirectory, let generationsFile, let idsFile,
              access(generationsFile, F_OK) == 0 || access(idsFile, F_OK) == 0 else { return }  // no CAPS here yet
        let ids = "\(max(reservedIDs, nextID))\n"
        for (name, text) in [("caps-generations", generationsText().text), ("caps-ids", ids)] {
            let copy = mirrorDirectory + "/" + name
            do throws(Errno) {
                let file = try openFile(copy + ".new", flags: O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW, mode: 0o600)
                try file.writeAll(Array(text.utf8))
                guard rename(copy + ".new", copy) == 0 else { throw Errno.current }
                unlink(copy + ".dirty")
            } catch {
                unlink(copy + ".new")
                logger.warning("cannot keep a copy of the CAPS \(name) beside the store; the next broker goes past it", metadata: ["errno": "\(error.name)"])
            }
        }
    }
    /// Ids (of services and channels) are never handed out twice, even across restarts: a
    /// service that outlived the broker keeps its clients' channels under their old ids, and a
    /// new client must not arrive under one of them. The ids up to `reservedIDs` are taken from
    /// the file `caps-ids` beside the generations, in blocks of `idBlock`, before any is used.
    private var reservedIDs: UInt64 = 0
    private static let idBlock: UInt64 = 4096

    private var idsFile: String? { generationsFile.map { String($0[..<($0.lastIndex(of: "/") ?? $0.startIndex)]) + "/caps-ids" } }

    private func loadReservedIDs(from idsFile: String) {
        guard let file = try? openFile(idsFile, flags: O_RDONLY | O_NOFOLLOW),
              let bytes = try? file.readToEnd(limit: 64),
              let ceiling = UInt64(String(decoding: bytes.prefix { $0 != 0x0A }, as: UTF8.self)) else { return }
        nextID = max(nextID, ceiling)
        reservedIDs = 0
    }

    /// The last id handed out: a channel's id is the high half of its messages' ids.
    static let lastID = UInt64(UInt32.max)

    /// Makes sure `takeID` has an id to give, before anything is made for a registration or a
    /// connection: refused with ENOSPC once every id is spent, and with the write's errno when a
    /// new block cannot be reserved in the file (its file system full: it may be `/dev/shm`,
    /// which any user can fill). An id handed out unreserved could be handed out again after a
    /// restart, to a channel beside one of the same id that outlived the broker.
    private func checkIDsLeft() throws(RequestError) {
        guard nextID <= Self.lastID else {
            throw RequestError(errno: .noSpace,
                               reason: "this broker has handed out all \(Self.lastID) CAPS ids (they are never reused, across restarts too: see caps-ids in its shared memory directory)")
        }
        guard let idsFile, nextID >= reservedIDs else { return }
        let ceiling = nextID + Self.idBlock
        let temporary = idsFile + ".new"
        do throws(Errno) {
            let file = try openFile(temporary, flags: O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW, mode: 0o600)
            try file.writeAll(Array("\(ceiling)\n".utf8))
            guard rename(temporary, idsFile) == 0 else { throw Errno.current }
        } catch {
            unlink(temporary)
            logger.warning("cannot reserve CAPS ids", metadata: ["errno": "\(error.name)"])
            throw RequestError(errno: error, reason: "cannot reserve CAPS ids in \(idsFile): \(error.name)")
        }
        reservedIDs = ceiling
    }

    /// The next id (`checkIDsLeft` made sure there is one, reserved).
    private func takeID() -> UInt64 {
        let id = nextID
        nextID += 1
        return id
    }
    /// Lines in the file: one short line is appended per change, and the file is rewritten whole
    /// only when stale lines dominate, so a registration costs the loop one small write, not the
    /// whole table. No descriptor is held between writes.
    private var generationLines = 0

    /// Whether there was a file to load.
    private func loadGenerations(from generationsFile: String) -> Bool {
        // No file: nothing to load, and none is made until a name registers.
        guard let file = try? openFile(generationsFile, flags: O_RDONLY | O_NOFOLLOW),
              let bytes = try? file.readToEnd(limit: 16 << 20) else { return false }
        // Lines in the order they were written: `<generation> <name> <uid>` (a registration, or a
        // generation seen at a close; without a uid, from an older broker: root's), `- <name>
        // <uid>` (forgotten), `<generation> * <uid>` (that uid's floor), `held <name> <uid>` and
        // `released <name> <uid>` (the uid's first registration of the name began, its last
        // ended). Others are skipped.
        var held: [String: UInt32] = [:]
        for line in String(decoding: bytes, as: UTF8.self).split(separator: "\n") {
            let fields = line.split(separator: " ")
            guard fields.count == 2 || fields.count == 3 else { continue }
            if fields.count == 3, fields[1] == "*", fields[2] == "*", let floor = UInt64(fields[0]) {
                everyUIDFloor = max(everyUIDFloor, min(floor, Self.highestGeneration))
                continue
            }
            let uid = fields.count == 3 ? UInt32(fields[2]) : 0
            guard let uid else { continue }
            if fields[0] == "held" || fields[0] == "released" {
                guard fields.count == 3, capsNameProblem(String(fields[1])) == nil else { continue }
                if fields[0] == "held" {
                    held[String(fields[1])] = uid
                } else if held[String(fields[1])] == uid {
                    held[String(fields[1])] = nil
                }
                continue
            }
            if fields[0] == "-" {
                forget(RememberedName(uid: uid, name: String(fields[1])))
                continue
            }
            guard let generation = UInt64(fields[0]).map({ min($0, Self.highestGeneration) }) else { continue }
            if fields[1] == "*" {
                if fields.count == 3 { forgottenFloor[uid] = max(forgottenFloor[uid] ?? 0, generation) }
                continue
            }
            let key = RememberedName(uid: uid, name: String(fields[1]))
            guard capsNameProblem(key.name) == nil else { continue }
            remember(key, generation: max(lastGeneration[key] ?? 0, generation))
        }
        if nameGrace > 0 && !held.isEmpty {
            keptNames = held
            keptNamesUntil = monotonicNanoseconds() &+ nameGrace
            logger.info("CAPS names kept for their holders", metadata: [
                "names": "\(held.count)", "seconds": "\(nameGrace / 1_000_000_000)",
            ])
        }
        return true
    }

    /// Records `name`'s last generation: one appended line, the file compacted when stale lines
    /// outnumber the names. The error when it could not be saved.
    private func saveGeneration(of key: RememberedName, forgotten: [String] = [], held: Bool = false) -> Errno? {
        guard let generation = lastGeneration[key] else { return nil }
        var text = forgotten.isEmpty ? "" : "\(forgottenFloor[key.uid] ?? 0) * \(key.uid)\n"
        for each in forgotten { text += "- \(each) \(key.uid)\n" }
        text += "\(generation) \(key.name) \(key.uid)\n"
        if held { text += "held \(key.name) \(key.uid)\n" }
        return appendGenerationLines(text)
    }

    /// The tables changed since the file last took a write: a write failed (its file system
    /// full), perhaps cut short mid-line. The next save writes the table whole instead of
    /// appending after a torn line.
    private var generationsUnsaved = false

    /// Appends `text`'s lines (whose changes the tables already hold) to the file, or writes the
    /// table whole when there is none yet or a write failed since. The error when neither worked.
    @discardableResult
    private func appendGenerationLines(_ text: String) -> Errno? {
        guard let generationsFile else { return nil }
        if generationsUnsaved { return rewriteGenerations() }
        do throws(Errno) {
            let file = try openFile(generationsFile, flags: O_WRONLY | O_APPEND | O_NOFOLLOW)
            try file.writeAll(Array(text.utf8))
            generationLines += text.utf8.reduce(0) { $0 + ($1 == 0x0A ? 1 : 0) }
        } catch {
            if error == .noSuchFileOrDirectory { return rewriteGenerations() }  // the first: made whole
            logger.warning("cannot save a CAPS generation", metadata: ["errno": "\(error.name)"])
            generationsUnsaved = true
            return error
        }
        if generationLines > 2 * (lastGeneration.count + services.count) + 64 { rewriteGenerations() }
        return nil
    }

    /// Writes the table whole to a new file renamed over the old (a crash leaves one or the
    /// other). The error when it could not.
    @discardableResult
    private func rewriteGenerations() -> Errno? {
        guard let generationsFile else { return nil }
        let (text, lines) = generationsText()
        let temporary = generationsFile + ".new"
        do throws(Errno) {
            let file = try openFile(temporary, flags: O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW, mode: 0o600)
            try file.writeAll(Array(text.utf8))
            guard rename(temporary, generationsFile) == 0 else { throw Errno.current }
            generationLines = lines
            generationsUnsaved = false
            return nil
        } catch {
            unlink(temporary)
            logger.warning("cannot save CAPS generations", metadata: ["errno": "\(error.name)"])
            generationsUnsaved = true
            return error
        }
    }

    /// The table whole, as the file holds it, and its number of lines.
    private func generationsText() -> (text: String, lines: Int) {
        // Each uid's names oldest first, so the order of forgetting survives a restart.
        var text = everyUIDFloor > 0 ? "\(everyUIDFloor) * *\n" : ""
        for (uid, floor) in forgottenFloor.sorted(by: { $0.key < $1.key }) { text += "\(floor) * \(uid)\n" }
        for uid in namesByUser.keys.sorted() {
            for name in namesByUser[uid] ?? [] {
                if let generation = lastGeneration[RememberedName(uid: uid, name: name)] { text += "\(generation) \(name) \(uid)\n" }
            }
        }
        // The names held now, by a registration or kept from before the restart.
        var held = Set(services.values.map { RememberedName(uid: $0.owner.uid, name: $0.name) })
        if monotonicNanoseconds() < keptNamesUntil {
            for (name, uid) in keptNames { held.insert(RememberedName(uid: uid, name: name)) }
        }
        for each in held.sorted(by: { ($0.uid, $0.name) < ($1.uid, $1.name) }) { text += "held \(each.name) \(each.uid)\n" }
        return (text, (everyUIDFloor > 0 ? 1 : 0) + forgottenFloor.count + lastGeneration.count + held.count)
    }

    // MARK: Registration

    /// The checks of a registration, before the broker takes the status page.
    private func admitRegistration(name: String, uid: Int32, gid: Int32, flags: CapsFlags, session: UInt64,
                                   caller: PeerCredentials) throws(RequestError) {
        try Self.validate(name)
        guard flags.isSubset(of: .serviceFlags) else {
            throw RequestError(errno: .invalidArgument,
                               reason: "unknown service flags 0x\(String(flags.subtracting(.serviceFlags).rawValue, radix: 16))")
        }
        guard serviceBySession[session] == nil, channelBySession[session] == nil else {
            throw RequestError(errno: .invalidArgument, reason: "this connection is already a CAPS port; open one per port")
        }
        try policy.checkTake(.caps, Substring(name), by: caller)
        // A name belongs to whoever holds it: another uid's live registration is never shadowed,
        // nor a name held when the last broker stopped, while it is kept for its holder.
        if let keeper = keptNames[name] {
            if monotonicNanoseconds() >= keptNamesUntil {
                releaseKeptNames()
            } else if keeper != caller.uid {
                let seconds = (keptNamesUntil - monotonicNanoseconds() + 999_999_999) / 1_000_000_000
                throw RequestError(errno: .fileExists,
                                   reason: "service \(name) was registered by uid \(keeper) when the broker last stopped; the name is kept for that uid until it registers again, or for \(seconds) s more (--caps-name-grace)")
            }
        }
        if let holder = (byName[name] ?? []).compactMap({ services[$0] }).first(where: { $0.owner.uid != caller.uid }) {
            throw RequestError(errno: .fileExists,
                               reason: "service \(name) is registered by uid \(holder.owner.uid) (pid \(holder.owner.pid)); a name is held by one uid at a time")
        }
        if caller.uid != 0 {
            if uid != -1 && UInt32(bitPattern: uid) != caller.uid {
                throw RequestError(errno: .notPermitted, reason: "uid \(caller.uid) may not register a service under uid \(uid)")
            }
            if gid != -1 && !caller.isMember(of: UInt32(bitPattern: gid)) {
                throw RequestError(errno: .notPermitted, reason: "uid \(caller.uid) is not in group \(gid)")
            }
        }
        if flags.contains(.exclusive),
           (byName[name] ?? []).contains(where: { services[$0]?.uid == uid && services[$0]?.gid == gid }) {
            throw RequestError(errno: .fileExists, reason: "a service \(name) (uid \(uid), gid \(gid)) is already registered")
        }
        let owned = servicesPerUser[caller.uid] ?? 0
        guard owned < maximumServicesPerUser else {
            throw RequestError(errno: .diskQuotaExceeded, reason: "uid \(caller.uid) already has \(owned) services registered, the limit")
        }
        try checkIDsLeft()
    }

    func register(name: String, uid: Int32, gid: Int32, flags: CapsFlags, maximumInFlight: UInt32,
                  statusPage: consuming Descriptor, session: UInt64, caller: PeerCredentials)
        throws(RequestError) -> CapsServiceRecord
    {
        do {
            try admitRegistration(name: name, uid: uid, gid: gid, flags: flags, session: session, caller: caller)
        } catch {
            // The status page is the client's until checked: its close may block.
            DeferredCloser.shared.close(statusPage, of: caller.uid)
            throw error
        }
        let charge: DescriptorCharge?
        do {
            charge = try budget.map { (budget) throws(RequestError) in
                try DescriptorCharge(2, to: caller.uid, in: budget, for: "another service's pages")
            }
        } catch {
            DeferredCloser.shared.close(statusPage, of: caller.uid)
            throw error
        }
        let pages = try ServicePages.make(status: statusPage, of: caller.uid)
        let id = takeID()
        // At most a quarter of the ring, so requests, aborts and disposes always fit.
        let inFlight = maximumInFlight == 0 ? 128 : min(maximumInFlight, UInt32(CapsLayout.ringCapacity / 4))
        let record = CapsServiceRecord(id: id, name: name, uid: uid, gid: gid, flags: flags, maximumInFlight: inFlight,
                                       session: session, owner: caller, pages: pages, charge: charge)
        services[id] = record
        servicesPerUser[caller.uid, default: 0] += 1
        byName[name, default: []].append(id)
        serviceBySession[session] = id
        // Its generation and hold are saved before it is admitted: lost, the name would not be
        // kept for this uid across a restart, and its generations could start lower after one
        // (tenth attack round: the file's file system, `/dev/shm` by default, filled by another
        // user).
        do {
            record.initialGeneration = try initialGeneration(of: name, by: caller.uid)
        } catch {
            services[id] = nil
            let remaining = (servicesPerUser[caller.uid] ?? 1) - 1
            servicesPerUser[caller.uid] = remaining > 0 ? remaining : nil
            byName[name]?.removeAll { $0 == id }
            if byName[name]?.isEmpty == true { byName[name] = nil }
            serviceBySession[session] = nil
            throw error
        }
        // Held again by its keeper (admitted): kept no longer.
        if keptNames[name] != nil { keptNames[name] = nil }
        logger.debug("service registered", metadata: ["name": "\(name)", "service": "\(id)"])
        return record
    }

    /// The generation a new registration of `name` starts at: one past the last, so a restarted
    /// service is visibly new. The service writes it to its status page.
    /// Recorded (and saved) at once, so a broker that dies while the service runs still starts
    /// the next registration above it.
    /// The name is remembered for `uid`, the registering process's, as its most recently
    /// registered; past `maximumNamesPerUser`, that uid's least recently registered names it has
    /// no live registration of are forgotten.
    private func initialGeneration(of name: String, by uid: UInt32) throws(RequestError) -> UInt64 {
        let key = RememberedName(uid: uid, name: name)
        let generation = min(max(lastGeneration[key] ?? forgottenFloor[uid] ?? 0, everyUIDFloor) + 1, Self.highestGeneration)
        remember(key, generation: generation)
        var forgotten: [String] = []
        if let names = namesByUser[uid], names.count > maximumNamesPerUser {
            // The live ones are at most `maximumServicesPerUser`; the others are candidates.
            for candidate in names where candidate != name && !isRegistered(candidate, by: uid) {
                forgotten.append(candidate)
                if names.count - forgotten.count <= maximumNamesPerUser { break }
            }
        }
        // (Out of the scope above, where a copy of the set would be made at the first removal.)
        for each in forgotten {
            let old = RememberedName(uid: uid, name: each)
            forgottenFloor[uid] = max(forgottenFloor[uid] ?? 0, lastGeneration[old] ?? 0)
            forget(old)
        }
        if let error = saveGeneration(of: key, forgotten: forgotten, held: registrations(of: name, by: uid) == 1) {
            throw RequestError(errno: error, reason: "cannot save the name's generation in \(generationsFile ?? "caps-generations"): \(error.name)")
        }
        return generation
    }

    /// The highest generation the broker hands out or records: generations stop growing there
    /// rather than wrap to 0 (a service may write any value to its page, and one of 2^64 − 1 would
    /// otherwise make the next registration of its name start at 0). Kept within a signed 64-bit
    /// integer, for C and Python callers.
    static let highestGeneration = UInt64(Int64.max)

    private func isRegistered(_ name: String, by uid: UInt32) -> Bool {
        (byName[name] ?? []).contains { services[$0]?.owner.uid == uid }
    }

    private func registrations(of name: String, by uid: UInt32) -> Int {
        (byName[name] ?? []).reduce(0) { $0 + (services[$1]?.owner.uid == uid ? 1 : 0) }
    }

    /// Milliseconds until the names kept from before the restart are released, or -1 (none).
    func millisecondsUntilKeptNamesRelease(now: UInt64) -> CInt {
        guard !keptNames.isEmpty else { return -1 }
        return now >= keptNamesUntil ? 0 : CInt(clamping: (keptNamesUntil - now + 999_999) / 1_000_000)
    }

    /// Releases the names kept from before the restart once their time is up.
    func releaseKeptNames(now: UInt64) {
        if !keptNames.isEmpty && now >= keptNamesUntil { releaseKeptNames() }
    }

    /// The kept names' holders did not register them again in time: anyone may take them now,
    /// and the file says so, so the next restart does not keep them again.
    private func releaseKeptNames() {
        let text = keptNames.sorted { $0.key < $1.key }.map { "released \($0.key) \($0.value)\n" }.joined()
        logger.info("CAPS names kept for their holders released", metadata: ["names": "\(keptNames.count)"])
        keptNames = [:]
        appendGenerationLines(text)
    }

    /// Records a generation for `key`, as its uid's most recently registered name.
    private func remember(_ key: RememberedName, generation: UInt64) {
        lastGeneration[key] = generation
        namesByUser[key.uid, default: []].remove(key.name)
        namesByUser[key.uid, default: []].append(key.name)
    }

    private func forget(_ key: RememberedName) {
        guard lastGeneration.removeValue(forKey: key) != nil else { return }
        namesByUser[key.uid]?.remove(key.name)
        if namesByUser[key.uid]?.isEmpty == true { namesByUser[key.uid] = nil }
    }

    // MARK: Connecting

    /// Connects a client, or returns nil when it should wait for a service to register.
    func connect(name: String, uid: Int32, gid: Int32, flags: CapsFlags, session: UInt64, caller: PeerCredentials)
        throws(RequestError) -> CapsConnection?
    {
        try Self.validate(name)
        guard flags.isSubset(of: .clientFlags) else {
            throw RequestError(errno: .invalidArgument,
                               reason: "unknown client flags 0x\(String(flags.subtracting(.clientFlags).rawValue, radix: 16))")
        }
        guard serviceBySession[session] == nil, channelBySession[session] == nil else {
            throw RequestError(errno: .invalidArgument, reason: "this connection is already a CAPS port; open one per port")
        }
        // Naming no uid means "a service I can trust": my own uid's, root's, or the name's owners'
        // by policy. Naming a uid asks for that uid's service, whoever it is.
        let candidates = (byName[name] ?? []).compactMap { services[$0] }.filter { service in
            (uid == -1 ? policy.trusts(serviceOwner: service.owner, of: name, client: caller) : service.uid == uid)
                && (gid == -1 || service.gid == gid)
        }
        guard let service = candidates.last else {
            if flags.contains(.waitForService) { return nil }
            // (Said only of a registration this client would not trust: one it would, passed
            // over for its gid, gets the plain reason below.)
            if uid == -1, let other = (byName[name] ?? []).compactMap({ services[$0] })
                .first(where: { !policy.trusts(serviceOwner: $0.owner, of: name, client: caller) }) {
                // A registration under no uid (-1) matches no uid a client names: only its own
                // uid's clients (and what the policy trusts) reach it.
                let advice = other.uid == -1
                    ? ", registered under no uid, which only that uid's own clients reach"
                    : ": name uid \(other.uid) to use it"
                throw RequestError(errno: .noSuchFileOrDirectory,
                                   reason: "no service \(name) of uid \(caller.uid) or root is registered; the one there is uid \(other.owner.uid)'s\(advice)")
            }
            throw RequestError(errno: .noSuchFileOrDirectory, reason: "no service \(name) is registered (matching uid \(uid), gid \(gid))")
        }
        guard Self.permits(service: service, clientFlags: flags, caller: caller) else {
            throw RequestError(errno: .permissionDenied,
                               reason: "service \(name) and this client share no access class that admits uid \(caller.uid)")
        }
        if service.refusedUsers.contains(caller.uid) {
            throw RequestError(errno: .diskQuotaExceeded,
                               reason: "service \(name) takes no new connections from uid \(caller.uid) for now: that uid's descriptors wait to be closed there past its bound")
        }
        if caller.uid != 0, Int64(caller.uid) != Int64(service.owner.uid) {
            let held = service.channels.reduce(0) { $0 + (channels[$1]?.clientUID == caller.uid ? 1 : 0) }
            guard held < maximumClientsPerUser else {
                throw RequestError(errno: .diskQuotaExceeded,
                                   reason: "uid \(caller.uid) already has \(held) connections to service \(name), the most one user may have (--max-caps-clients-per-uid)")
            }
        }
        try checkIDsLeft()
        return try makeChannel(service: service, session: session, client: caller)
    }

    /// USER, GROUP or WORLD, set on both sides and true of the client. Root gets no bypass.
    static func permits(service: CapsServiceRecord, clientFlags: CapsFlags, caller: PeerCredentials) -> Bool {
        let shared = service.flags.intersection(clientFlags)
        // An id past 2^31 travels as its bits in an i32; only -1 is no id.
        if shared.contains(.user), service.uid != -1, UInt32(bitPattern: service.uid) == caller.uid { return true }
        if shared.contains(.group), service.gid != -1, caller.isMember(of: UInt32(bitPattern: service.gid)) { return true }
        if shared.contains(.world) { return true }
        return false
    }

    private func makeChannel(service: CapsServiceRecord, session: UInt64, client: PeerCredentials)
        throws(RequestError) -> CapsConnection
    {
        let charge = try budget.map { (budget) throws(RequestError) in
            try DescriptorCharge(1, to: client.uid, in: budget, for: "another channel's wake-up")
        }
        do {
            let memory = try makeMemoryFile(name: "patchbay-caps-channel", sealable: true)
            try memory.truncate(to: CapsLayout.channelSize(arenaSize: arenaSize))
            // The broker maps the header; sealing the size keeps a peer from making it fault.
            try memory.addSeals([.shrink, .grow, .seal])
            let header = try Mapping(memory, length: CapsLayout.headerSize, writable: true)
            let base = header.baseAddress
            base.advanced(by: CapsLayout.magicOffset).assumingMemoryBound(to: UInt32.self).pointee = CapsLayout.magic
            base.advanced(by: CapsLayout.versionOffset).assumingMemoryBound(to: UInt32.self).pointee = CapsLayout.version
            base.advanced(by: CapsLayout.ringCapacityOffset).assumingMemoryBound(to: UInt32.self).pointee = UInt32(CapsLayout.ringCapacity)
            base.advanced(by: CapsLayout.arenaSizeOffset).assumingMemoryBound(to: UInt64.self).pointee = UInt64(arenaSize)
            // Each wake-up is a socket pair whose ends are held by different sides, so neither side
            // can make the other's reads or writes block.
            let serviceWake = try WakeSocket.pair()
            let clientWake = try WakeSocket.pair()
            let pair = try SeqpacketSocket.pair()
            let statusReadOnly = try service.status.reopenReadOnly()
            let id = takeID()
            let record = CapsChannelRecord(id: id, serviceID: service.id, clientSession: session, clientUID: client.uid,
                                           header: header, clientWake: try clientWake.writer.duplicateForBroker(), charge: charge)
            channels[id] = record
            channelBySession[session] = id
            service.channels.insert(id)
            return CapsConnection(
                channelID: id, service: service, channel: memory, statusReadOnly: statusReadOnly,
                serviceWakeReader: serviceWake.reader, serviceWakeWriter: serviceWake.writer,
                clientWakeReader: clientWake.reader, clientWakeWriter: clientWake.writer,
                clientEnd: pair.first.descriptor, serviceEnd: pair.second.descriptor)
        } catch {
            throw RequestError(errno: error, reason: "cannot build the channel: \(error.name)")
        }
    }

    // MARK: Deaths and listings

    /// The service of session `session` could not take the client of `channelID` (its port got
    /// the channel's descriptors short, or could not map it): the channel ends as if the service
    /// had gone, for that client only, which learns it at once instead of waiting for answers
    /// that cannot come. Ignored for a channel of another service.
    func refuse(channelID: UInt64, bySession session: UInt64) {
        guard let channel = channels[channelID], let service = services[channel.serviceID], service.session == session else { return }
        channels[channelID] = nil
        channelBySession[channel.clientSession] = nil
        service.channels.remove(channelID)
        channel.markServiceClosed(refused: true)
        logger.warning("service could not take a client", metadata: ["name": "\(service.name)", "channel": "\(channelID)"])
    }

    /// Uids one service may have refused at once: its refusals are memory the broker holds.
    static let maximumRefusedUsers = 1024

    /// The service of session `session` takes no new connections from `uid` (`refusing`), or
    /// takes them again. Past `maximumRefusedUsers` uids, more refusals are ignored.
    func refuseUser(_ uid: UInt32, _ refusing: Bool, bySession session: UInt64) {
        guard let id = serviceBySession[session], let service = services[id] else { return }
        if !refusing {
            service.refusedUsers.remove(uid)
        } else if service.refusedUsers.count < Self.maximumRefusedUsers, service.refusedUsers.insert(uid).inserted {
            // (Debug only: a service can refuse and take a uid again as often as it likes.)
            logger.debug("service refuses new connections of a uid", metadata: ["name": "\(service.name)", "uid": "\(uid)"])
        }
    }

    /// A connection closed. Returns the service sessions to tell of departed clients.
    func sessionClosed(_ session: UInt64) -> [(serviceSession: UInt64, event: Event)] {
        var notices: [(UInt64, Event)] = []
        if let id = channelBySession.removeValue(forKey: session), let channel = channels.removeValue(forKey: id) {
            channel.markClientClosed()
            if let service = services[channel.serviceID] {
                service.channels.remove(id)
                if channel.announced { notices.append((service.session, .caps(.disconnected(channelID: id)))) }
            }
        }
        if let id = serviceBySession.removeValue(forKey: session), let service = services.removeValue(forKey: id) {
            let remaining = (servicesPerUser[service.owner.uid] ?? 1) - 1
            servicesPerUser[service.owner.uid] = remaining > 0 ? remaining : nil
            byName[service.name]?.removeAll { $0 == id }
            if byName[service.name]?.isEmpty == true { byName[service.name] = nil }
            // (A page is the service's to write: past the highest generation, it counts as that.)
            let shown = min(service.generation, Self.highestGeneration)
            let key = RememberedName(uid: service.owner.uid, name: service.name)
            var lines = ""
            if let previous = lastGeneration[key], shown > previous {
                lastGeneration[key] = shown
                lines += "\(shown) \(key.name) \(key.uid)\n"
            }
            if !isRegistered(service.name, by: service.owner.uid) { lines += "released \(key.name) \(key.uid)\n" }
            if !lines.isEmpty { appendGenerationLines(lines) }
            for channelID in service.channels {
                guard let channel = channels.removeValue(forKey: channelID) else { continue }
                channelBySession[channel.clientSession] = nil
                channel.markServiceClosed()
            }
            logger.debug("service gone", metadata: ["name": "\(service.name)", "clients": "\(service.channels.count)"])
        }
        return notices
    }

    /// The channel a client session holds, if any.
    func channel(ofSession session: UInt64) -> CapsChannelRecord? {
        channelBySession[session].flatMap { channels[$0] }
    }

    /// The uids whose services are registered under `name` (for monitors).
    func owners(of name: String) -> [UInt32] {
        (byName[name] ?? []).compactMap { services[$0]?.owner.uid }
    }

    /// The service record behind a session, if that session is a service port.
    func service(ofSession session: UInt64) -> CapsServiceRecord? {
        serviceBySession[session].flatMap { services[$0] }
    }

    func list() -> [CapsServiceInfo] {
        list(limit: services.count)
    }

    /// A page of channels' traffic, in id order after `after`: what `visible` lets the caller see,
    /// with each client's credentials from `client`.
    func traffic(after: UInt64, limit: Int, client: (CapsChannelRecord) -> PeerCredentials?,
                 visible: (CapsServiceRecord, PeerCredentials?) -> Bool) -> ([CapsChannelTraffic], more: Bool) {
        var page: [CapsChannelTraffic] = []
        for id in channels.keys.filter({ $0 > after }).sorted() {
            guard let channel = channels[id], let service = services[channel.serviceID] else { continue }
            let credentials = client(channel)
            guard visible(service, credentials) else { continue }
            if page.count == limit { return (page, true) }
            let words = channel.ringWords
            page.append(CapsChannelTraffic(service: service.name, serviceUID: service.uid, serviceOwner: service.owner.uid,
                                           servicePID: service.owner.pid, channelID: id, clientUID: credentials?.uid ?? 0,
                                           clientPID: credentials?.pid ?? 0, requestsPut: words.requestTail,
                                           requestsTaken: words.requestHead, repliesPut: words.replyTail,
                                           repliesTaken: words.replyHead))
        }
        return (page, false)
    }

    /// Messages per registered service since it registered, summed per name and owner uid:
    /// its live channels' counts plus those of channels that closed.
    func messageCounts() -> [(name: String, uid: UInt32, toService: UInt64, toClient: UInt64)] {
        var sums: [String: [UInt32: (UInt64, UInt64)]] = [:]
        for service in services.values {
            let (toService, toClient) = service.messages
            let previous = sums[service.name, default: [:]][service.owner.uid, default: (0, 0)]
            sums[service.name, default: [:]][service.owner.uid] = (previous.0 &+ toService, previous.1 &+ toClient)
        }
        return sums.flatMap { name, byUid in byUid.map { (name, $0.key, $0.value.0, $0.value.1) } }
    }

    /// The first `limit` services by id.
    func list(limit: Int) -> [CapsServiceInfo] {
        services.values.prefix(limit).map(\.info)
    }

    func countByOwner() -> [UInt32: Int] {
        servicesPerUser
    }

    static func validate(_ name: String) throws(RequestError) {
        switch capsNameProblem(name) {
        case "EINVAL"?:
            throw RequestError(errno: .invalidArgument, reason: "a service name is 1 to 63 of 0-9 A-Z a-z _ .; \"\(name.prefix(80))\" is not")
        case "ENAMETOOLONG"?:
            throw RequestError(errno: .fileNameTooLong, reason: "a service name is at most 63 characters; this one has \(name.utf8.count)")
        default:
            return
        }
    }
}

extension Descriptor {
    /// A second descriptor for the same file, for the broker's own use.
    borrowing func duplicateForBroker() throws(Errno) -> Descriptor {
        try duplicateDescriptor(rawValue)
    }
}

extension CInt {
    /// Takes ownership of a released descriptor number again.
    var adopted: Descriptor { Descriptor(adopting: self) }
}
