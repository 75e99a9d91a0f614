from clframe.cli import main

main()
