// The one table of opcodes: what each is, which subsystem owns its payloads, and how many
// descriptors ride beside its frames. A new opcode is a row here plus a case in its subsystem's
// file (Keys.swift, Namespace.swift, SharedMemory.swift, Net.swift, Caps.swift).

/// The part of the broker a frame concerns; each has its own payload file.
public enum Subsystem: Sendable, Equatable {
    /// The connection and the broker as a whole (`Status.swift`).
    case broker
    /// Keys: share and claim (`Keys.swift`).
    case keys
    /// The broker's file namespace: `open` of `/dev/shmem/new` and `/net` paths (`Namespace.swift`).
    case namespace
    /// Named shared memory (`SharedMemory.swift`).
    case sharedMemory
    /// Sockets through `/net` (`Net.swift`).
    case net
    /// CAPS services (`Caps.swift`).
    case caps
}

/// The operation a frame concerns. Replies carry their request's opcode.
public enum Opcode: UInt16, Sendable, CaseIterable {
    /// About the connection itself, not a request: only ever an error frame from the broker with
    /// request id 0 (for example, a per-user broker refusing another uid).
    case connection = 0
    /// Broker identity, uptime and object counts.
    case status = 1
    /// The broker's metrics in the Prometheus text exposition format.
    case metrics = 2
    /// Watch: the connection receives a `monitorEvent` per request the broker answers.
    case monitor = 3
    case monitorEvent = 4
    /// Hand a descriptor to the broker under a new key.
    case share = 16
    /// Take a shared descriptor by its key.
    case claim = 17
    /// The claimer's report that the claimed descriptor arrived (or did not); no reply.
    case claimAcknowledge = 18
    /// Open a path in the broker's namespace (`/dev/shmem/new`, `/net/local/seqpacket`,
    /// `/net/local/<id>/data`, `/net/local/<id>/accept`).
    case open = 32
    /// Named shared memory: `shm_open`, `shm_unlink`, `shm_rename`, stat and listing.
    case sharedMemoryOpen = 40
    case sharedMemoryUnlink = 41
    case sharedMemoryRename = 42
    case sharedMemoryStat = 43
    case sharedMemoryList = 44
    case sharedMemoryWatch = 45
    /// `/net`: write a command line to a socket's `ctl`; list sockets; a name's filesystem path.
    case netControl = 50
    case netList = 51
    case netPath = 52
    /// `/net`: take back a listener that outlived a broker restart (its kernel socket attached).
    case netAdopt = 53
    /// CAPS: register a service, connect a client, set a generation, list services; and the
    /// events a service port receives.
    case capsService = 60
    case capsClient = 61
    case capsSetGeneration = 62
    case capsList = 63
    case capsConnected = 64
    case capsDisconnected = 65
    /// CAPS: every channel's traffic, from its ring words (`patchbay caps top`).
    case capsTraffic = 66
    /// CAPS: a service's own second connection becomes its tap (`caps serve --tap`), then reports
    /// the messages the service sees, one-way, for monitors of its uid (§12.6).
    case capsTap = 67
    case capsTapRecord = 68
    /// CAPS: a service port that could not take a new client (its descriptors did not arrive, or
    /// its channel could not be mapped) says so, one-way; the broker marks the channel refused.
    case capsRefuseClient = 69
    /// CAPS: a service port says it takes no new connections from a uid (whose descriptors wait
    /// to be closed there past its bound), or takes them again, one-way; the broker refuses that
    /// uid's connections to the service meanwhile.
    case capsRefuseUser = 70

    /// What an opcode is: its subsystem, the frames it appears in and their descriptors.
    public struct Metadata: Sendable, Equatable {
        public var subsystem: Subsystem
        /// Whether a client may send it as a request.
        public var isRequest: Bool
        /// Whether the broker answers the request (acknowledgements are one-way).
        public var expectsReply: Bool
        /// Whether it appears only as an unsolicited event.
        public var isEvent: Bool
        /// Descriptors a request must carry.
        public var requestDescriptors: Int
        /// Descriptors a successful reply carries (`open`: 1 or 2, see `OpenedObjectKind`).
        public var replyDescriptors: Int
        /// Descriptors an event carries.
        public var eventDescriptors: Int
    }

    /// The table.
    public var metadata: Metadata {
        switch self {
        //                                subsystem      request  reply  event  fds: req rep evt
        case .connection:        Metadata(.broker,       false,   false, false, 0, 0, 0)
        case .status:            Metadata(.broker,       true,    true,  false, 0, 0, 0)
        case .metrics:           Metadata(.broker,       true,    true,  false, 0, 0, 0)
        case .monitor:           Metadata(.broker,       true,    true,  false, 0, 0, 0)
        case .monitorEvent:      Metadata(.broker,       false,   false, true,  0, 0, 0)
        case .share:             Metadata(.keys,         true,    true,  false, 1, 0, 0)
        case .claim:             Metadata(.keys,         true,    true,  false, 0, 1, 0)
        case .claimAcknowledge:  Metadata(.keys,         true,    false, false, 0, 0, 0)
        case .open:              Metadata(.namespace,    true,    true,  false, 0, 1, 0)
        case .sharedMemoryOpen:  Metadata(.sharedMemory, true,    true,  false, 0, 1, 0)
        case .sharedMemoryUnlink: Metadata(.sharedMemory, true,   true,  false, 0, 0, 0)
        case .sharedMemoryRename: Metadata(.sharedMemory, true,   true,  false, 0, 0, 0)
        case .sharedMemoryStat:  Metadata(.sharedMemory, true,    true,  false, 0, 0, 0)
        case .sharedMemoryList:  Metadata(.sharedMemory, true,    true,  false, 0, 0, 0)
        case .sharedMemoryWatch: Metadata(.sharedMemory, true,    true,  false, 0, 1, 0)
        case .netControl:        Metadata(.net,          true,    true,  false, 0, 0, 0)
        case .netList:           Metadata(.net,          true,    true,  false, 0, 0, 0)
        case .netPath:           Metadata(.net,          true,    true,  false, 0, 0, 0)
        case .netAdopt:          Metadata(.net,          true,    true,  false, 1, 1, 0)
        case .capsService:       Metadata(.caps,         true,    true,  false, 1, 1, 0)
        case .capsClient:        Metadata(.caps,         true,    true,  false, 0, 5, 0)
        case .capsSetGeneration: Metadata(.caps,         true,    true,  false, 0, 0, 0)
        case .capsList:          Metadata(.caps,         true,    true,  false, 0, 0, 0)
        case .capsConnected:     Metadata(.caps,         false,   false, true,  0, 0, 4)
        case .capsDisconnected:  Metadata(.caps,         false,   false, true,  0, 0, 0)
        case .capsTraffic:       Metadata(.caps,         true,    true,  false, 0, 0, 0)
        case .capsTap:           Metadata(.caps,         true,    true,  false, 0, 0, 0)
        case .capsTapRecord:     Metadata(.caps,         true,    false, false, 0, 0, 0)
        case .capsRefuseClient:  Metadata(.caps,         true,    false, false, 0, 0, 0)
        case .capsRefuseUser:    Metadata(.caps,         true,    false, false, 0, 0, 0)
        }
    }

    public var subsystem: Subsystem { metadata.subsystem }
    /// Descriptors a request of this kind must carry.
    public var requestDescriptors: Int { metadata.requestDescriptors }
    /// Descriptors a successful reply of this kind carries.
    public var replyDescriptors: Int { metadata.replyDescriptors }
    /// Descriptors an event of this kind carries.
    public var eventDescriptors: Int { metadata.eventDescriptors }
    /// Whether the broker answers this request (acknowledgements are one-way).
    public var expectsReply: Bool { metadata.expectsReply }
}

extension Opcode.Metadata {
    init(_ subsystem: Subsystem, _ isRequest: Bool, _ expectsReply: Bool, _ isEvent: Bool,
         _ requestDescriptors: Int, _ replyDescriptors: Int, _ eventDescriptors: Int) {
        self.init(subsystem: subsystem, isRequest: isRequest, expectsReply: expectsReply, isEvent: isEvent,
                  requestDescriptors: requestDescriptors, replyDescriptors: replyDescriptors,
                  eventDescriptors: eventDescriptors)
    }
}

extension DecodeError {
    /// The error for an opcode that exists but not as this kind of frame.
    static func wrongFrame(_ opcode: Opcode, _ kind: String) -> DecodeError {
        .invalidValue(field: "opcode", reason: "\(opcode) is not a \(kind)")
    }
}
