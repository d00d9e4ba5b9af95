"""`meterproof chaos`: a scripted fault campaign against the whole path on loopback.

A simulated fleet keeps a steady load on a private stack while faults are injected one
after another (worker kill -9, broker restart and kill -9, PostgreSQL and Redis outages,
bridge kill -9); then everything settles and an audit checks, by (meter_id, seq), that
every generated reading was stored exactly once and anchored exactly once.

plan (the seeded schedule) -> campaign (orchestration) -> faults (injection, recovery
timing) -> audit (the exactly-once checks) -> report (docs/reliability.md).
"""
