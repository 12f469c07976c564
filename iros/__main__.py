from iros.cli.main import main

main()
