import ArgumentParser
import Patchbay
import PatchbayProtocol
import PatchbaySystem
import SystemPackage

/// `patchbay`: the command-line face of Patchbay.
public struct PatchbayCommand: ParsableCommand {
    public static let configuration = CommandConfiguration(
        commandName: "patchbay",
        abstract: "IPC from PatchworkOS, FreeBSD and DragonFly BSD for Linux processes.",
        discussion: """
            Commands talk to the per-user broker (started on demand) or to PATCHBAY_SOCKET. \
            Errors are printed as `patchbay: <command>: <ERRNO>: <sentence>`. Exit status: 0 done; \
            1 the operation failed (the errno says why); 64 a wrong command line; 69 no broker \
            could be reached or started; 127 a program to run does not exist or cannot be run; \
            3 (status only) no broker is running.
            """,
        version: patchbayVersion,
        subcommands: [DaemonCommand.self, StatusCommand.self, MetricsCommand.self, MonitorCommand.self, DoctorCommand.self, ShareCommand.self, ClaimCommand.self, SharedMemoryCommand.self, NetCommand.self, CapsCommand.self,
                      BenchCommand.self, BenchPeerCommand.self, LoadCommand.self, HostileWorkerCommand.self, ExecStarterCommand.self,
                      DemoCommand.self]
    )

    public init() {}
}

/// Opens the broker connection for a command, or fails the command.
func connectBroker(for command: String, reconnect: ReconnectPolicy = .standard) -> Broker {
    do {
        return try Broker(reconnect: reconnect)
    } catch {
        fail(command, error, status: ExitStatus.unavailable)
    }
}
