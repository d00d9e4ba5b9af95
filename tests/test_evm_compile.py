"""The committed ABI and bytecode are what the committed Solidity compiles to."""

from __future__ import annotations

from pathlib import Path

import pytest

from meterproof.bridge.evm.compile import (
    ARTIFACTS,
    NAMES,
    compile_contracts,
    load_artifact,
    solc_available,
    write_artifacts,
)


@pytest.mark.slow
def test_the_committed_artifacts_equal_a_fresh_compilation(tmp_path: Path) -> None:
    assert solc_available(), "solcjs is missing from node_modules: run `make setup`"
    fresh = compile_contracts()
    assert sorted(fresh) == sorted(NAMES)
    for path in write_artifacts(fresh, tmp_path):
        committed = ARTIFACTS / path.name
        assert path.read_text() == committed.read_text(), (
            f"{committed} is stale: run `meterproof chain compile` and commit it"
        )
    anchor = load_artifact("GridAnchor")
    assert anchor.solc.startswith("0.8.28")
    names = {item.get("name") for item in anchor.abi}
    assert {"anchor", "claim", "release", "verifyReading", "setOracle", "AlreadyAnchored"} <= names
