"""The HTTP API (`meterproof api`): the same pipeline, registry and consent policy over HTTPS."""
