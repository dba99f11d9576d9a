import PatchbayCLI

DaemonCommand.main()
