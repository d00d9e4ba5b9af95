"""`python -m meterproof` runs the `meterproof` command (how workers are spawned)."""

from meterproof.cli.main import run

run()
