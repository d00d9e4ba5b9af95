"""`meterproof bench`: our pipeline measured against the raw limits of this machine, in the
same run, on loopback. Raw figures go to bench/results/*.json, the report to docs/benchmarks.md."""
