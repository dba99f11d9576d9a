// swift-tools-version: 6.1
import PackageDescription

let strict: [SwiftSetting] = [
    .swiftLanguageMode(.v6),
    .enableUpcomingFeature("ExistentialAny"),
]

let package = Package(
    name: "Patchbay",
    platforms: [.macOS(.v15)],
    products: [
        .library(name: "Patchbay", targets: ["Patchbay"]),
        .executable(name: "patchbay", targets: ["patchbay"]),
        .executable(name: "patchbayd", targets: ["patchbayd"]),
        // libpatchbay: the library through a C ABI (patchbay.h); scripts/install installs it as
        // libpatchbay.so.0 with the header and patchbay.pc.
        .library(name: "PatchbayC", type: .dynamic, targets: ["PatchbayC"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-system", from: "1.8.1"),
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-collections", from: "1.6.0"),
    ],
    targets: [
        // The few C helpers Swift cannot import (CMSG_*, memfd, futex, eventfd, ucred, signalfd).
        .target(
            name: "CPatchbayShims",
            cSettings: [.define("_GNU_SOURCE")]
        ),
        // Typed, thin syscall layer. No policy.
        .target(
            name: "PatchbaySystem",
            dependencies: [
                "CPatchbayShims",
                .product(name: "SystemPackage", package: "swift-system"),
            ],
            // Every declaration here is `package`: the library's users never see this layer.
            swiftSettings: strict + [.enableUpcomingFeature("InternalImportsByDefault")]
        ),
        // The wire format: pure, no I/O, total on hostile input.
        .target(
            name: "PatchbayProtocol",
            dependencies: [],
            swiftSettings: strict
        ),
        // The broker: event loop, sessions, access control, quotas, one folder per subsystem.
        .target(
            name: "PatchbayBroker",
            dependencies: [
                "PatchbaySystem",
                "PatchbayProtocol",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "HeapModule", package: "swift-collections"),
                .product(name: "DequeModule", package: "swift-collections"),
                .product(name: "OrderedCollections", package: "swift-collections"),
            ],
            swiftSettings: strict
        ),
        // The client library users import. Its imports are internal unless marked `public`, so
        // the compiler checks that nothing of the layers below leaks into its public API.
        .target(
            name: "Patchbay",
            dependencies: [
                "PatchbaySystem",
                "PatchbayProtocol",
                .product(name: "SystemPackage", package: "swift-system"),
            ],
            swiftSettings: strict + [.enableUpcomingFeature("InternalImportsByDefault")]
        ),
        // The C ABI's header (include/patchbay.h, installed as is) and the thread's last reason.
        .target(
            name: "CPatchbayABI"
        ),
        // The C library's exports: `@_cdecl` functions over the Swift library. Only the `pb_`
        // names are exported (Sources/PatchbayC/exports.map); the soname is libpatchbay.so.0.
        .target(
            name: "PatchbayC",
            dependencies: ["Patchbay", "CPatchbayABI", .product(name: "SystemPackage", package: "swift-system")],
            exclude: ["exports.map"],
            swiftSettings: strict,
            linkerSettings: [
                .unsafeFlags(["-Xlinker", "-soname=libpatchbay.so.0",
                              "-Xlinker", "--version-script=\(Context.packageDirectory)/Sources/PatchbayC/exports.map"]),
            ]
        ),
        // The commands of the CLI, shared by `patchbay` and `patchbayd`.
        .target(
            name: "PatchbayCLI",
            dependencies: [
                "Patchbay",
                "PatchbayBroker",
                "PatchbaySystem",
                "PatchbayProtocol",
                .product(name: "SystemPackage", package: "swift-system"),
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: strict
        ),
        .executableTarget(
            name: "patchbay",
            dependencies: ["PatchbayCLI"],
            swiftSettings: strict
        ),
        .executableTarget(
            name: "patchbayd",
            dependencies: ["PatchbayCLI"],
            swiftSettings: strict
        ),
        // A scripted peer for the tests: does one awkward thing (fill its fd table, hang with a
        // pending share, claim on a barrier) in a separate, unrelated process.
        .executableTarget(
            name: "patchbay-testpeer",
            dependencies: ["Patchbay", "PatchbaySystem", .product(name: "SystemPackage", package: "swift-system")],
            path: "Sources/PatchbayTestPeer",
            swiftSettings: strict
        ),
        // libFuzzer drivers, only declared when PATCHBAY_FUZZ is set (scripts/fuzz sets it and
        // passes the sanitizer flags): they link against the fuzzer runtime, which a normal build
        // does not have.
    ] + (Context.environment["PATCHBAY_FUZZ"] == nil ? [] : [
        .executableTarget(
            name: "fuzz-protocol",
            dependencies: ["PatchbayProtocol"],
            path: "Fuzz/Protocol",
            swiftSettings: strict
        ),
        .executableTarget(
            name: "fuzz-broker",
            dependencies: ["PatchbayProtocol", "PatchbaySystem"],
            path: "Fuzz/Broker",
            swiftSettings: strict
        ),
    ]) + [
        .testTarget(
            name: "PatchbayProtocolTests",
            dependencies: ["PatchbayProtocol"],
            swiftSettings: strict
        ),
        .testTarget(
            name: "PatchbayTests",
            dependencies: [
                "Patchbay", "PatchbaySystem", "PatchbayProtocol",
                .product(name: "SystemPackage", package: "swift-system"),
            ],
            swiftSettings: strict
        ),
        // The syscall layer on real kernel objects: descriptor passing, credentials, epoll,
        // futex/eventfd, memfd seals, locks, errno.
        .testTarget(
            name: "PatchbaySystemTests",
            dependencies: [
                "PatchbaySystem",
                .product(name: "SystemPackage", package: "swift-system"),
            ],
            swiftSettings: strict
        ),
        // The broker's pure structures (key table, limiter, namespace paths, the shared memory
        // store's journal), without a running broker.
        .testTarget(
            name: "PatchbayBrokerTests",
            dependencies: [
                "PatchbayBroker",
                "PatchbayProtocol",
                "PatchbaySystem",
                .product(name: "SystemPackage", package: "swift-system"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: strict
        ),
        // The client library's pure structures (the CAPS arena allocator and ring arithmetic).
        .testTarget(
            name: "PatchbayLibraryTests",
            dependencies: ["Patchbay", "PatchbaySystem", .product(name: "SystemPackage", package: "swift-system")],
            swiftSettings: strict
        ),
    ]
)
