"""The ingest worker: source -> decode -> verify -> replay -> batch -> store -> ack/publish."""
