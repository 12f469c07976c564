from iros.cli import main

main()
