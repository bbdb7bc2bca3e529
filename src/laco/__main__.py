from laco.cli import main

main()
