"""`python -m rbcbatch.cli`: the same command as `rbcbatch`."""

from rbcbatch.cli.main import main

main()
