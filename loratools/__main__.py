from loratools.cli import main

main()
