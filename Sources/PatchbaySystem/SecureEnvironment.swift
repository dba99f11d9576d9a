// Settings read from the environment, and who may set them.
//
// A set-user-ID or set-group-ID program (or one with file capabilities) runs with an environment
// chosen by the user who started it, not by its owner. The library reads where the broker is
// (`PATCHBAY_SOCKET`, `XDG_RUNTIME_DIR`) and what to start (`PATCHBAY_DAEMON`, `PATH`) from the
// environment, so in such a process it reads none of them, as glibc's `secure_getenv`, and it
// starts no broker (fifteenth attack round: a set-user-ID root program using the library sent
// root's files to another user's socket, or ran that user's program as root).

import CPatchbayShims
import Glibc

/// Whether this process runs with privileges its environment's author may not have: started in
/// secure-execution mode (`AT_SECURE`), or with real and effective ids that differ now.
package var runsWithBorrowedPrivileges: Bool {
    pb_secure_execution() != 0 || getuid() != geteuid() || getgid() != getegid()
}

/// `name`'s value in the environment, or nil when it is unset or this process runs with borrowed
/// privileges (`runsWithBorrowedPrivileges`).
package func trustedEnvironmentValue(_ name: String) -> String? {
    guard !runsWithBorrowedPrivileges else { return nil }
    return getenv(name).map { String(cString: $0) }
}
