"""The ledger bridge: epochs, Merkle commitments, mints and exactly-once anchoring."""
