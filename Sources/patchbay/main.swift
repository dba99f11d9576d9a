import PatchbayCLI

PatchbayCommand.main()
