"""The meter registry: meters, their signing keys and the security event log.

`repository` is the typed API the worker and the bridge use; `cli` is `meterproof meters`.
"""
