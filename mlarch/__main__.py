from mlarch.cli import main

main()
