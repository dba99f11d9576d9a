import PatchbayCLI

holdClosedStandardDescriptors()
PatchbayCommand.main()
