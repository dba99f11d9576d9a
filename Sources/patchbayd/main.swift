import PatchbayCLI

holdClosedStandardDescriptors()
// `patchbayd daemon ...` is `patchbayd ...`: the library's autostart runs `PROGRAM daemon
// --detach`, whichever of the two programs PATCHBAY_DAEMON names (or a wrapper of either).
var arguments = Array(CommandLine.arguments.dropFirst())
if arguments.first == "daemon" { arguments.removeFirst() }
runCommandLine(DaemonCommand.self, arguments: arguments)
