// A service's tap: what `caps serve --tap` (or `CapsService(..., tap:)`) turns on. The service
// opens a second connection to the broker, asks it to become the tap of the service this process
// registered (`capsTap`), and reports each message it takes or answers there, one-way
// (`capsTapRecord`): its id, kind and length, and its first bytes only when payloads were asked
// for. The broker adds who the client is from the channel's kernel credentials and shows the
// records to monitors of the service's uid and root (PROTOCOL.md §12.6).
//
// Cost: nothing without a tap. With one, one non-blocking send per message; a broker that does
// not keep up costs the service nothing either: records that do not fit are counted, and the
// next record that does carries the count (monitors show it as missed events).

package import PatchbayProtocol
import Glibc
import PatchbaySystem

/// What a tap reports: message headers, or headers and the first bytes of each payload.
public enum CapsTapMode: Sendable {
    /// Id, kind and length of every message; never its bytes.
    case headers
    /// Headers and each payload's first bytes (at most `CapsTapRecord.payloadLimit`).
    case payloads
}

/// A tap connection. Used under its service port's lock. Package-visible for the tests, which
/// try to tap another process's service and to report another service's messages.
package final class CapsTap {
    private var connection: Connection
    private let payloads: Bool
    /// Records that did not fit since the last one that did.
    private var lost: UInt32 = 0

    /// Opens a connection to `broker` and makes it the tap of `serviceID`.
    ///
    /// - Throws: `EPERM` (the service was registered by another process), `ENOENT` (no such service).
    package init(_ broker: Broker, serviceID: UInt64, mode: CapsTapMode) throws(PatchbayError) {
        payloads = mode == .payloads
        connection = Connection(socket: try broker.connectOnce())
        let response = try connection.call(.caps(.tap(serviceID: serviceID, payloads: payloads)))
        guard case .caps(.tap) = response.reply else {
            throw PatchbayError(.protocolError, "the broker's reply to a tap request is malformed")
        }
    }

    /// What a record of `payload` carries of it: its first bytes if this tap reports payloads.
    func head(of payload: UnsafeRawBufferPointer) -> [UInt8] {
        payloads && payload.count > 0 ? Array(payload.prefix(CapsTapRecord.payloadLimit)) : []
    }

    /// Reports one message; never waits.
    package func record(_ kind: CapsTapRecord.Kind, _ messageID: UInt64, length: Int, head: [UInt8] = []) {
        let record = CapsTapRecord(messageID: messageID, kind: kind, length: UInt32(clamping: length), payload: head)
        let frame = Request.caps(.tapRecords(lost: lost, [record])).encode(requestID: 0)
        let sent = frame.withUnsafeBytes { bytes in
            (try? connection.socket.send(bytes, nonblocking: true)) != nil
        }
        lost = sent ? 0 : lost &+ 1
    }
}
