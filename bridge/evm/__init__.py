"""GRID on an EVM chain: the contracts, their compiled artifacts and the `evm` ledger sink."""
