from tui.cli.app import main

main()
