from unipo.cli import main

main()
