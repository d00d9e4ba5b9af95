"""Where entries are anchored: the `LedgerSink` protocol and its adapters (`local`)."""
