"""The meter registry: meters, their signing keys and the security event log.

`repository` is the typed API operators' tools use (`cli` is `meterproof meters`, the
meter's self-registration and the benchmarks call it); `snapshots` is what the ingest
workers' key cache reads, and `model` holds the statuses, among them the ones whose
readings are accepted.
"""
