"""`python -m cli` runs the `meterproof` command (used to start worker processes)."""

from cli.main import main

main()
