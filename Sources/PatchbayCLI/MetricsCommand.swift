import ArgumentParser
import Glibc
import Patchbay

/// `patchbay metrics`: the broker's metrics in the Prometheus text exposition format.
struct MetricsCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "metrics",
        abstract: "Print the broker's metrics in the Prometheus text exposition format.",
        discussion: """
            Counters since the broker started (patchbay_requests_total by subsystem, operation and \
            outcome; keys shared, claimed, expired), gauges (patchbay_clients, \
            patchbay_keys_outstanding, objects, sockets, services, channels, descriptors, resident \
            memory, per-uid rows) and a histogram of the broker's time per request. For \
            node_exporter's textfile collector: patchbayd --metrics-file PATH, or \
            patchbay metrics > DIR/patchbay.prom.tmp && mv DIR/patchbay.prom.tmp DIR/patchbay.prom. \
            Never starts a broker: with none running it fails with status 69.
            """)

    func run() throws {
        let broker: Broker
        do {
            broker = try Broker(socketPath: Broker.defaultSocketPath, autostart: false)
        } catch {
            fail("metrics", error, status: ExitStatus.unavailable)
        }
        do {
            writeStandardOutput(try broker.metrics())
        } catch {
            fail("metrics", error)
        }
    }
}
