"""The load generator behind `bench.load` and `bench.connections`.

Several processes (`python -P -m bench.loadgen JOB.json`, one per slice of the fleet, as a
process may open only 20,000 files here), each holding one mutual-TLS MQTT 5 connection per
meter, with that meter's own certificate. The parent speaks JSON lines to each:

- on start the child connects its meters and answers `{"event": "connected", ...}`;
- `{"cmd": "prepare", "count": n, "rate": r}` signs n readings (Ed25519, seq and
  registers rising, ts spread back in time, see `plan.ts_base_ms`) -> `prepared`;
- `{"cmd": "go", "start_at": epoch_s, "grace_s": g, "tag": t, "legs": bool}` publishes
  them at QoS 1, r per second, waits up to g seconds for the last receipts -> `done` with
  per-second counts, receipt statuses and a file of publish->receipt latencies (with
  `legs`, also a file of each receipt's send and receipt times);
- `{"cmd": "stop"}` disconnects and exits.

Modules: `plan` (pure arithmetic), `generator` (the child), `control` (the parent: private
stack with workers, generator processes, CPU per process group, one measured phase),
`legs` (a phase's latency split at the worker's and the store's timestamps).
"""
