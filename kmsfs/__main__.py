from kmsfs.cli import main

main()
