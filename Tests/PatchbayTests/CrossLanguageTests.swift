// Patchbay from C and Python: the C tests (Tests/C/test_patchbay.c, compiled here with cc against
// patchbay.h and the library this build made), the Python package's tests (python/tests), and
// CAPS across the three languages, each with kernel credentials on the message and DISPOSE after
// REPLY, plus a descriptor shared by key from C and claimed from Python.
import Glibc
import Patchbay
import PatchbaySystem
import Testing

/// The repository, from this file's path.
let repositoryRoot: String = {
    let path = #filePath
    guard let range = path.range(of: "/Tests/PatchbayTests/") else { return "." }
    return String(path[..<range.lowerBound])
}()

/// The C compiler: cc if there is one, else the toolchain's clang.
let cCompiler: String? = {
    for candidate in ["/usr/bin/cc", "/usr/bin/gcc", "/usr/bin/clang", "/opt/swift/usr/bin/clang"] where access(candidate, X_OK) == 0 {
        return candidate
    }
    return nil
}()

let python3: String? = (["/usr/bin/python3", "/usr/local/bin/python3"] as [String]).first { access($0, X_OK) == 0 }

/// The built library under the names a C program links and loads (libpatchbay.so, and
/// libpatchbay.so.0, its soname), and the C test program compiled against it: made once.
struct CBuild: Sendable {
    let libraryDirectory: String
    let testProgram: String

    static let shared: Result<CBuild, PatchbayError> = {
        guard let cCompiler else { return .failure(PatchbayError(.noSuchFileOrDirectory, "no C compiler (cc, gcc or clang)")) }
        let directory = makeTemporaryDirectory()
        let built = productsDirectory + "/libPatchbayC.so"
        guard access(built, R_OK) == 0 else { return .failure(PatchbayError(.noSuchFileOrDirectory, "\(built) was not built")) }
        symlink(built, directory + "/libpatchbay.so")
        symlink(built, directory + "/libpatchbay.so.0")
        let program = directory + "/test_patchbay"
        do {
            let compiled = try run(cCompiler, ["-std=c11", "-Wall", "-Wextra", "-Werror", "-I", repositoryRoot + "/Sources/CPatchbayABI/include",
                                               repositoryRoot + "/Tests/C/test_patchbay.c", "-L", directory, "-lpatchbay",
                                               "-Wl,-rpath," + directory, "-lpthread", "-o", program])
            guard compiled.termination == .exited(0) else {
                return .failure(PatchbayError(.ioError, "cc failed: \(compiled.standardError)"))
            }
        } catch {
            return .failure(PatchbayError(.ioError, "cannot run cc: \(error)"))
        }
        return .success(CBuild(libraryDirectory: directory, testProgram: program))
    }()

    /// What a child in another language needs: the broker, the library, the package.
    func environment(_ broker: TestBroker) -> [String: String?] {
        ["PATCHBAY_SOCKET": broker.socketPath, "PATCHBAY_LIBRARY": libraryDirectory + "/libpatchbay.so.0",
         "PYTHONPATH": repositoryRoot + "/python", "PATCHBAY_BIN_DIR": productsDirectory]
    }
}

@Suite("C and Python", .enabled(if: cCompiler != nil && python3 != nil, "needs a C compiler and python3"),
       .enabled(if: getenv("PATCHBAY_SANITIZER") == nil, "an instrumented library does not load into uninstrumented C programs or Python"))
struct CrossLanguageTests {
    @Test("the C tests: every function of patchbay.h and its errno paths, against a broker")
    func cTests() throws {
        let build = try CBuild.shared.get()
        let broker = try TestBroker()
        let outcome = try run(build.testProgram, ["all"], environment: build.environment(broker))
        #expect(outcome.termination == .exited(0), "\(outcome.standardError)")
        #expect(outcome.standardOutput.hasPrefix("ok "), "\(outcome.standardOutput)")
    }

    @Test("the header compiles as C11 and C++17 with every warning; the library exports exactly its functions")
    func headerAndExports() throws {
        let build = try CBuild.shared.get()
        let header = repositoryRoot + "/Sources/CPatchbayABI/include/patchbay.h"
        let compilerPlusPlus = (["/usr/bin/c++", "/usr/bin/g++", "/usr/bin/clang++", "/opt/swift/usr/bin/clang++"] as [String]).first { access($0, X_OK) == 0 }
        if let compilerPlusPlus {
            let cxx = try run(compilerPlusPlus, ["-x", "c++", "-std=c++17", "-Wall", "-Wextra", "-Werror", "-fsyntax-only", header])
            #expect(cxx.termination == .exited(0), "\(cxx.standardError)")
        }
        let c = try run(cCompiler!, ["-x", "c", "-std=c11", "-Wall", "-Wextra", "-Werror", "-pedantic", "-fsyntax-only", header])
        #expect(c.termination == .exited(0), "\(c.standardError)")
        // Declared: every `pb_name(` in the header. Exported: the library's dynamic symbols.
        let text = String(decoding: try openFile(header, flags: O_RDONLY).readToEnd(), as: UTF8.self)
        var declared: Set<String> = []
        for piece in text.split(separator: "pb_").dropFirst() {
            let name = piece.prefix { $0.isLetter || $0 == "_" }
            if piece.dropFirst(name.count).first == "(" { declared.insert("pb_" + name) }
        }
        let symbols = try run("/usr/bin/nm", ["-D", "--defined-only", build.libraryDirectory + "/libpatchbay.so.0"])
        let exported = Set(symbols.standardOutput.split(separator: "\n").compactMap { line -> String? in
            let fields = line.split(separator: " ")
            guard fields.count == 3, fields[1] == "T" else { return nil }
            return String(fields[2].split(separator: "@").first ?? "")
        })
        #expect(declared.count >= 37)
        #expect(exported == declared, "exported but not declared: \(exported.subtracting(declared)); declared but not exported: \(declared.subtracting(exported))")
    }

    @Test("a C service answers a Swift client: kernel credentials on the request, DISPOSE after the REPLY")
    func cServiceSwiftClient() throws {
        let build = try CBuild.shared.get()
        let broker = try TestBroker()
        let service = try Child(build.testProgram, ["service", "c_service"], environment: build.environment(broker))
        #expect(try service.readLine() == "ready")
        let client = try CapsClient(try broker.connect(), name: "c_service")
        #expect(try client.call(Array("from swift".utf8)) == Array("c:from swift".utf8))
        let request = try #require(try service.readLine()).split(separator: " ")
        #expect(request.count == 5 && request[0] == "request", "\(request)")
        #expect(request.count == 5 && request[2] == "\(getpid())" && request[3] == "\(getuid())" && request[4] == "\(getgid())")
        #expect(try service.readLine() == "dispose \(request.count == 5 ? request[1] : "")")
        #expect(try service.wait() == .exited(0))
    }

    @Test("a Swift service answers a Python client: the client's pid and uid on the request, DISPOSE after the REPLY")
    func swiftServicePythonClient() throws {
        let build = try CBuild.shared.get()
        let broker = try TestBroker()
        let service = try CapsService(try broker.connect(), name: "swift_service")
        let client = try Child(python3!, ["-c", """
            import patchbay
            client = patchbay.CapsClient(patchbay.Broker(), "swift_service", wait=True)
            print(client.call(b"from python").decode())
            client.close()
            """], environment: build.environment(broker))
        let (request, bytes) = try serviceWait(service)
        #expect(request.kind == .request && bytes == Array("from python".utf8))
        #expect(request.credentials.pid == client.pid && request.credentials.uid == getuid())
        try service.reply(to: request.messageID, Array("swift:".utf8) + bytes)
        #expect(try client.readLine() == "swift:from python")
        let (dispose, _) = try serviceWait(service)
        #expect(dispose.kind == .dispose && dispose.messageID == request.messageID)
        #expect(try client.wait() == .exited(0))
    }

    @Test("a Python service answers a C client: the C client's pid and uid on the request, DISPOSE after the REPLY")
    func pythonServiceCClient() throws {
        let build = try CBuild.shared.get()
        let broker = try TestBroker()
        let service = try Child(python3!, ["-c", """
            import patchbay, sys
            service = patchbay.CapsService(patchbay.Broker(), "py_service")
            print("ready", flush=True)
            for message in service:
                if message.kind == patchbay.REQUEST:
                    print("request", message.id, message.pid, message.uid, flush=True)
                    service.reply(message.id, b"py:" + message.data)
                elif message.kind == patchbay.DISPOSE:
                    print("dispose", message.id, flush=True)
                    break
            service.close()
            """], environment: build.environment(broker))
        #expect(try service.readLine() == "ready")
        let client = try Child(build.testProgram, ["call", "py_service", "from c"], environment: build.environment(broker))
        #expect(try client.readLine() == "py:from c")
        #expect(try client.wait() == .exited(0))
        let request = try #require(try service.readLine()).split(separator: " ")
        #expect(request.count == 4 && request[0] == "request" && request[2] == "\(client.pid)" && request[3] == "\(getuid())", "\(request)")
        #expect(try service.readLine() == "dispose \(request.count == 4 ? request[1] : "")")
        #expect(try service.wait() == .exited(0))
    }

    @Test("a descriptor shared by key from C is claimed from Python: the same file, its bytes")
    func sharedFromCClaimedFromPython() throws {
        let build = try CBuild.shared.get()
        let broker = try TestBroker()
        let path = broker.directory + "/shared.txt"
        try writeFile(path, "bytes from a C process")
        let sharer = try Child(build.testProgram, ["share", path], environment: build.environment(broker))
        let key = try #require(try sharer.readLine())
        let claimer = try run(python3!, ["-c", """
            import os, sys, patchbay
            fd = patchbay.Broker().claim(sys.argv[1])
            print(os.read(fd, 100).decode())
            os.close(fd)
            """, key], environment: build.environment(broker))
        #expect(claimer.termination == .exited(0), "\(claimer.standardError)")
        #expect(claimer.standardOutput == "bytes from a C process\n")
        sharer.closeInput()
        #expect(try sharer.wait() == .exited(0))
        // One time: a second claim is ENOENT, raised as FileNotFoundError.
        let again = try run(python3!, ["-c", """
            import sys, patchbay
            try:
                patchbay.Broker().claim(sys.argv[1])
            except FileNotFoundError as error:
                print(error.errno, bool(error.strerror))
            """, key], environment: build.environment(broker))
        #expect(again.standardOutput == "\(ENOENT) True\n", "\(again.standardError)")
    }

    @Test("a C (pb_net_recv) and a Python (recv_from) datagram server outlive the broker: answering while none runs, taken back under their names by the next",
          arguments: ["c", "python"])
    func datagramServersRideOutARestart(_ language: String) throws {
        let build = try CBuild.shared.get()
        let broker = try TestBroker()
        let name = "dg-" + language
        let server: Child
        if language == "c" {
            server = try Child(build.testProgram, ["dgram-echo", name], environment: build.environment(broker))
        } else {
            server = try Child(python3!, ["-c", """
                import sys, patchbay
                server = patchbay.Socket.open(patchbay.Broker(), "dgram")
                server.ctl("bind " + sys.argv[1])
                print("ready", flush=True)
                while True:
                    data, sender = server.recv_from(256)
                    if data == b"quit":
                        break
                    server.reply(b"py:" + data, sender)
                """, name], environment: build.environment(broker))
        }
        defer { server.kill(SIGKILL); _ = try? server.wait() }
        #expect(try server.readLine() == "ready")
        let prefix = language == "c" ? "c:" : "py:"
        let client = try broker.connect()
        func bound() throws -> NetSocketInfo? { try client.listSockets().first { $0.name == name } }
        let before = try #require(try bound())
        let sender = try UnixSocket(.datagram)
        try sender.bind(path: broker.directory + "/sender-" + language)
        try sender.connectWithoutBlocking(path: try client.localSocketPath(name))
        func echoed(_ text: String) -> String { datagramExchange(text, on: sender.rawValue) }
        #expect(echoed("one") == prefix + "one")

        kill(broker.pid, SIGKILL)
        _ = try waitForProcess(broker.pid)
        #expect(echoed("two") == prefix + "two")
        let second = try spawnDaemon(socketPath: broker.socketPath, sharedMemoryDirectory: broker.directory + "/shm")
        defer { kill(second, SIGTERM); _ = try? waitForProcess(second) }
        // Found out by the server itself, which makes no broker call while it receives: the same
        // process and socket file, BOUND, under a new id.
        #expect(try eventually { try bound() != nil })
        let after = try #require(try bound())
        #expect(after.ownerPID == before.ownerPID && after.state == "BOUND", "\(after)")
        #expect(echoed("three") == prefix + "three")
        _ = Array("quit".utf8).withUnsafeBytes { send(sender.rawValue, $0.baseAddress, $0.count, 0) }
        #expect(try server.wait() == .exited(0))
    }

    @Test("the Python package's own tests (python/tests)")
    func pythonTests() throws {
        let build = try CBuild.shared.get()
        let broker = try TestBroker()
        let outcome = try run(python3!, ["-m", "unittest", "discover", "-s", repositoryRoot + "/python/tests"],
                              environment: build.environment(broker))
        #expect(outcome.termination == .exited(0), "\(outcome.standardError)")
    }
}
