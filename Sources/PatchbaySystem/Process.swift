package import SystemPackage
import Glibc
package import CPatchbayShims

/// How a child process ended.
package enum Termination: Sendable, Equatable, CustomStringConvertible {
    case exited(CInt)
    case signaled(CInt)

    package var description: String {
        switch self {
        case .exited(let code): "exited with status \(code)"
        case .signaled(let signal): "killed by signal \(signal)"
        }
    }
}

/// Starts a program with `posix_spawn`, giving it exactly the descriptors named in
/// `descriptors` (child number → parent descriptor); everything else the parent has open is
/// close-on-exec and stays behind. Signals start at their defaults and unblocked.
package func spawnProcess(
    path: String,
    arguments: [String],
    environment: [String],
    descriptors: [CInt: CInt] = [:],
    newSession: Bool = false,
    closingOthers: Bool = false
) throws(Errno) -> pid_t {
    var actions = posix_spawn_file_actions_t()
    if posix_spawn_file_actions_init(&actions) != 0 { throw Errno.noMemory }
    defer { posix_spawn_file_actions_destroy(&actions) }
    // Copy every descriptor to a scratch number above all the numbers involved first, then into
    // place: a direct dup2 could overwrite a parent descriptor that a later mapping still needs
    // (child 3 ← parent 5 and child 5 ← parent 3).
    let involved = Array(descriptors.keys) + Array(descriptors.values)
    var scratch = (involved.max() ?? 2) + 1
    var staged: [(child: CInt, temporary: CInt)] = []
    for (child, parent) in descriptors.sorted(by: { $0.key < $1.key }) {
        try check(posix_spawn_file_actions_adddup2(&actions, parent, scratch))
        staged.append((child, scratch))
        scratch += 1
    }
    for (child, temporary) in staged {
        try check(posix_spawn_file_actions_adddup2(&actions, temporary, child))
        try check(posix_spawn_file_actions_addclose(&actions, temporary))
    }
    // Everything else the caller has open without FD_CLOEXEC stays behind too: a long-lived
    // child (the broker) would otherwise hold its starter's pipes and files for its whole life.
    if closingOthers {
        let from = (descriptors.keys.max() ?? 2) + 1
        try check(withUnsafeMutablePointer(to: &actions) { pb_spawn_addclosefrom(UnsafeMutableRawPointer($0), from) })
    }

    var attributes = posix_spawnattr_t()
    let initialised = withUnsafeMutablePointer(to: &attributes) {
        pb_spawnattr_init_clean(UnsafeMutableRawPointer($0), newSession ? 1 : 0)
    }
    if initialised != 0 { throw Errno.current }
    defer { posix_spawnattr_destroy(&attributes) }

    let argv = ([path] + arguments).map { strdup($0) } + [nil]
    let envp = environment.map { strdup($0) } + [nil]
    defer {
        for pointer in argv { free(pointer) }
        for pointer in envp { free(pointer) }
    }
    var pid: pid_t = 0
    let result = posix_spawn(&pid, path, &actions, &attributes, argv, envp)
    if result != 0 { throw Errno(rawValue: result) }
    return pid
}

private func check(_ result: CInt) throws(Errno) {
    if result != 0 { throw Errno(rawValue: result) }
}

/// Waits for a child to end. The corresponding C call is `waitpid`.
package func waitForProcess(_ pid: pid_t) throws(Errno) -> Termination {
    var status: CInt = 0
    _ = try syscallRetrying { waitpid(pid, &status, 0) }
    if pb_wifexited(status) != 0 { return .exited(pb_wexitstatus(status)) }
    return .signaled(pb_wtermsig(status))
}

/// Whether `pid` ends within `nanoseconds` (its pidfd turns readable; it is not reaped): a child
/// of this process that nobody reaps meanwhile, or another's process (readable once it exits). True at once if no pidfd can be
/// opened for it (a kernel before 5.3): it may then take all the time it likes.
package func childEnds(_ pid: pid_t, within nanoseconds: UInt64) -> Bool {
    let pidfd = pb_pidfd_open(pid)
    guard pidfd >= 0 else { return true }
    defer { close(pidfd) }
    return waitReadable(pidfd, until: deadline(afterNanoseconds: nanoseconds))
}

/// The monotonic time `nanoseconds` from now (`monotonicNanoseconds`), or `UInt64.max` when that
/// does not fit.
package func deadline(afterNanoseconds nanoseconds: UInt64) -> UInt64 {
    let (sum, overflow) = monotonicNanoseconds().addingReportingOverflow(nanoseconds)
    return overflow ? UInt64.max : sum
}

/// Waits until `fd` is readable (or at its end, or hung up): true; false once the monotonic
/// `deadline` passes first. A poll that fails other than `EINTR` is true too: no wait would
/// cure it, and the caller's read says what is wrong.
package func waitReadable(_ fd: CInt, until deadline: UInt64) -> Bool {
    while true {
        let now = monotonicNanoseconds()
        guard now < deadline else { return false }
        var entry = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        let ready = poll(&entry, 1, CInt((min(deadline - now, 60_000_000_000) + 999_999) / 1_000_000))
        if ready > 0 || (ready < 0 && errno != EINTR) { return true }
    }
}

/// The environment of this process as `NAME=value` strings.
package func currentEnvironment() -> [String] {
    var result: [String] = []
    var pointer = environ
    while let entry = pointer.pointee {
        result.append(String(cString: entry))
        pointer += 1
    }
    return result
}

/// The environment with `overrides` applied (a nil value removes the variable).
package func environment(applying overrides: [String: String?]) -> [String] {
    var result = currentEnvironment().filter { entry in
        let name = entry.split(separator: "=", maxSplits: 1).first.map(String.init) ?? entry
        return overrides[name] == nil
    }
    for (name, value) in overrides.sorted(by: { $0.key < $1.key }) {
        if let value { result.append("\(name)=\(value)") }
    }
    return result
}

/// The path of the running executable (`/proc/self/exe`).
package func currentExecutablePath() -> String? {
    var buffer = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
    let length = readlink("/proc/self/exe", &buffer, buffer.count - 1)
    guard length > 0 else { return nil }
    return String(decoding: buffer[0..<length].map { UInt8(bitPattern: $0) }, as: UTF8.self)
}

/// Opens a file of another process's `/proc/PID/` for reading without ever waiting: the files
/// are that process's user's, who may hold a lease on them (`F_SETLEASE`), and an open that
/// conflicts with a lease waits for its break (45 s by default), with the broker's one thread
/// (tenth attack round). Non-blocking, such an open fails at once (`EAGAIN`): the caller then
/// learns nothing from the file, as for a process that is gone.
package func openProcessFile(_ pid: pid_t, _ name: String) -> Descriptor? {
    try? openFile("/proc/\(pid)/\(name)", flags: O_RDONLY | O_NONBLOCK)
}

/// The real uid of process `pid`, which `SO_PEERCRED` does not report (it gives the effective
/// one): the `Uid:` line of `/proc/PID/status`. Nil when the process is gone.
package func realUserID(of pid: pid_t) -> UInt32? {
    guard let status = openProcessFile(pid, "status"),
          let bytes = try? status.readToEnd(limit: 8192) else { return nil }
    for line in String(decoding: bytes, as: UTF8.self).split(separator: "\n") where line.hasPrefix("Uid:") {
        return line.dropFirst(4).split(whereSeparator: { $0 == " " || $0 == "\t" }).first.flatMap { uid_t($0) }
    }
    return nil
}

/// When process `pid` started, in clock ticks since boot (field 22 of `/proc/PID/stat`): with
/// the pid, it names one process since boot, where the pid alone is handed on once the process
/// is gone. Nil when there is no such process.
package func processStartTime(of pid: pid_t) -> UInt64? {
    processStat(of: pid)?.startTime
}

/// The command name (`comm`, field 2) and start time (field 22) of `/proc/PID/stat`.
package func processStat(of pid: pid_t) -> (command: String, startTime: UInt64)? {
    guard let stat = openProcessFile(pid, "stat"),
          let bytes = try? stat.readToEnd(limit: 4096),
          let open = bytes.firstIndex(of: UInt8(ascii: "(")),
          let close = bytes.lastIndex(of: UInt8(ascii: ")")), open < close else { return nil }
    // After the command (which may hold spaces and parentheses): field 3 onwards.
    let fields = bytes[(close + 1)...].split(separator: UInt8(ascii: " "))
    guard fields.count > 19, let start = UInt64(String(decoding: fields[19], as: UTF8.self)) else { return nil }
    return (String(decoding: bytes[(open + 1)..<close], as: UTF8.self), start)
}

/// The command name and start time of the process behind `pidfd` (number `pid`), kept only if
/// the process was still there after they were read: then the number was still its own, and
/// they are its, not those of a process that got the pid since. Nil once it has exited.
package func verifiedProcessStat(pid: pid_t, pidfd: CInt) -> (command: String, startTime: UInt64)? {
    guard let stat = processStat(of: pid), pb_pidfd_exited(pidfd) == 0 else { return nil }
    return stat
}

/// `verifiedProcessStat`'s start time.
package func verifiedStartTime(pid: pid_t, pidfd: CInt) -> UInt64? {
    verifiedProcessStat(pid: pid, pidfd: pidfd)?.startTime
}

/// The inode of a pidfd when pidfds live in pidfs (Linux 6.9 on): a number no other process gets
/// while the system runs, where a start time in clock ticks is shared by processes started in the
/// same tick. Nil on older kernels (one anonymous inode for every pidfd).
package func pidfdInode(_ pidfd: CInt) -> UInt64? {
    var info = stat()
    guard pidfdInodesAreUnique, fstat(pidfd, &info) == 0 else { return nil }
    return UInt64(info.st_ino)
}

/// Whether pidfds of two processes have inodes of their own (pidfs) rather than one shared
/// anonymous inode: this process's against init's.
private let pidfdInodesAreUnique: Bool = {
    let mine = pb_pidfd_open(getpid()), inits = pb_pidfd_open(1)
    defer {
        if mine >= 0 { close(mine) }
        if inits >= 0 { close(inits) }
    }
    var first = stat(), second = stat()
    guard mine >= 0, inits >= 0, fstat(mine, &first) == 0, fstat(inits, &second) == 0 else { return false }
    return first.st_ino != second.st_ino
}()

/// The real uid of the process `pid` that started at `startTime`, nil if that process is gone
/// (its pid may be someone else's by now).
package func verifiedRealUserID(pid: pid_t, startTime: UInt64, inode: UInt64?) -> UInt32? {
    guard let process = try? ProcessHandle(pid: pid), process.startTime == startTime, process.inode == inode,
          let uid = realUserID(of: pid), !process.hasExited else { return nil }
    return uid
}

/// A process held by a pidfd: unlike its pid, which the kernel hands to a new process once this
/// one is gone, the handle keeps meaning this process (and says when it has exited).
package final class ProcessHandle {
    package let pid: pid_t
    private let descriptor: Descriptor
    /// `processStartTime`, read while the handle held the process (nil: it had exited already).
    package let startTime: UInt64?
    /// `pidfdInode` of the handle.
    package let inode: UInt64?

    /// A handle on the running process `pid`; `ESRCH` if there is none. The corresponding C call
    /// is `pidfd_open`.
    package init(pid: pid_t) throws(Errno) {
        self.pid = pid
        descriptor = Descriptor(adopting: try syscallRetrying { pb_pidfd_open(pid) })
        startTime = verifiedStartTime(pid: pid, pidfd: descriptor.rawValue)
        inode = pidfdInode(descriptor.rawValue)
    }

    /// Whether the process has exited (its pid may then belong to someone else already).
    package var hasExited: Bool {
        pb_pidfd_exited(descriptor.rawValue) != 0
    }
}

/// An exclusive advisory lock on a file (`flock`), released when the value ends.
package struct FileLock: ~Copyable {
    private let descriptor: Descriptor

    /// Opens (creating, mode 0600) and locks `path`. With `wait: false` a lock held elsewhere
    /// throws `EWOULDBLOCK` (`EAGAIN`).
    package init(path: String, wait: Bool) throws(Errno) {
        let fd = try openFile(path, flags: O_RDWR | O_CREAT | O_NOFOLLOW | O_NOCTTY, mode: 0o600)
        _ = try syscallRetrying { flock(fd.rawValue, LOCK_EX | (wait ? 0 : LOCK_NB)) }
        descriptor = fd
    }
}
