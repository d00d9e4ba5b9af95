"""meterproof: the trusted path from a smart meter to a P2P energy-trading ledger.

The repository root is this package: `ingest/` is `meterproof.ingest`, `bridge/` is
`meterproof.bridge`, and so on (pyproject.toml maps it; README "Layout" says why). Layers
point down only, as `tests/test_layers.py` enforces:

    schemas                      the wire contract; imports nothing of ours
    config, errors, logs         neutral: settings base, error root, log setup
    certs, mosquitto, registry, db
    meter, ingest, bridge        the product
    cli, stack, bench, chaos, fuzz, demo   the command root and development tools
"""
