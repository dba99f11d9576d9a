// Public, not package, and `@inlinable` with a public import of the shims: this toolchain inlines
// `@inlinable` bodies across modules only for public declarations (a package one stays a call),
// and these run several times per CAPS message. They are not part of Patchbay's API: the
// library's users import `Patchbay`, which does not re-export this module.
public import CPatchbayShims
package import SystemPackage

/// Atomic access to words that live in memory shared between processes. Loads acquire, stores
/// release, read-modify-writes and `fence` are sequentially consistent: enough for the
/// single-producer/single-consumer rings and the sleep/wake handshakes built on them.
public enum SharedWord {
    @inlinable @inline(__always) public static func load(_ p: UnsafeMutablePointer<UInt32>) -> UInt32 { pb_load_u32(p) }
    @inlinable @inline(__always) public static func load(_ p: UnsafeMutablePointer<UInt64>) -> UInt64 { pb_load_u64(p) }
    @inlinable @inline(__always) public static func store(_ p: UnsafeMutablePointer<UInt32>, _ v: UInt32) { pb_store_u32(p, v) }
    @inlinable @inline(__always) public static func store(_ p: UnsafeMutablePointer<UInt64>, _ v: UInt64) { pb_store_u64(p, v) }
    @inlinable @inline(__always) @discardableResult
    public static func increment(_ p: UnsafeMutablePointer<UInt32>) -> UInt32 { pb_fetch_add_u32(p, 1) }
    @inlinable @inline(__always) @discardableResult
    public static func decrement(_ p: UnsafeMutablePointer<UInt32>) -> UInt32 { pb_fetch_add_u32(p, UInt32.max) }
    @inlinable @inline(__always)
    public static func compareExchange(_ p: UnsafeMutablePointer<UInt32>, expected: UInt32, desired: UInt32) -> Bool {
        pb_cas_u32(p, expected, desired) != 0
    }
    @inlinable @inline(__always)
    public static func compareExchange(_ p: UnsafeMutablePointer<UInt64>, expected: UInt64, desired: UInt64) -> Bool {
        pb_cas_u64(p, expected, desired) != 0
    }
    @inlinable @inline(__always) public static func fence() { pb_fence() }
    /// A pause hint for spin loops.
    @inlinable @inline(__always) public static func relax() { pb_cpu_relax() }
    /// Starts bringing in the cache line at `address` for reading; returns at once.
    @inlinable @inline(__always) public static func prefetch(_ address: UnsafeRawPointer) { pb_prefetch(address) }
}

/// The CPU this thread is running on now. The corresponding C call is `sched_getcpu`.
@inlinable @inline(__always)
public func currentCPU() -> Int32 { pb_current_cpu() }

/// Pins the calling thread to `cpu`. The corresponding C call is `sched_setaffinity`.
package func pinToCPU(_ cpu: Int32) throws(Errno) {
    if pb_pin_to_cpu(cpu) != 0 { throw Errno.current }
}

/// CPUs online.
package func onlineCPUCount() -> Int { Int(pb_cpu_count()) }

/// Increases in every process created by `fork`, so objects can tell they were inherited.
@inlinable @inline(__always)
public func forkGeneration() -> UInt64 { pb_fork_generation() }

/// `forkGeneration()` as one load, exact once `forkGeneration()` has been called in this process
/// (objects that check it call that when they are made).
@inlinable @inline(__always)
public func forkGenerationSeen() -> UInt64 { pb_fork_generation_seen() }
