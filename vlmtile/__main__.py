from vlmtile.cli import main

main()
