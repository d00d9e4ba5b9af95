"""The `meterproof` command: a thin root that hands each command group to its package."""
