import PatchbayCLI

holdClosedStandardDescriptors()
runCommandLine(PatchbayCommand.self)
