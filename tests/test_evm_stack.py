"""`meterproof stack chain` and `stack down`: the dev chain of a run dir, its contracts
deployed once, and the settings file that points the bridge at it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from meterproof.bridge.evm.client import Deployment, connect
from meterproof.stack.process import free_port, port_accepts


def _meterproof(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERPROOF_")}
    argv = [sys.executable, "-P", "-m", "meterproof", *args]
    return subprocess.run(argv, env=env, capture_output=True, text=True, check=False, timeout=120)


@pytest.mark.slow
def test_stack_chain_deploys_once_writes_the_settings_and_stack_down_stops_it(
    tmp_path: Path,
) -> None:
    run_dir, port = tmp_path / "run", free_port()
    up = ["stack", "chain", "--run-dir", str(run_dir), "--port", str(port), "--block-time", "0"]
    first = _meterproof(*up)
    assert first.returncode == 0, first.stderr
    env_file = run_dir / "evm" / "chain.env"
    assert first.stdout.rstrip().endswith(f"source {env_file}")
    settings = dict(line.split("=", 1) for line in env_file.read_text().splitlines())
    assert settings["METERPROOF_SINK"] == "evm"
    assert settings["METERPROOF_EVM_RPC_URL"] == f"http://127.0.0.1:{port}"
    deployed = Deployment.load(Path(settings["METERPROOF_EVM_CONTRACTS_FILE"]))
    w3 = connect(settings["METERPROOF_EVM_RPC_URL"], timeout_s=10)
    assert w3.eth.get_code(deployed.anchor)
    assert (run_dir / "evm" / "oracle.key").stat().st_mode & 0o077 == 0

    again = _meterproof(*up)  # running: the same node and contracts
    assert again.returncode == 0, again.stderr
    assert Deployment.load(Path(settings["METERPROOF_EVM_CONTRACTS_FILE"])) == deployed

    down = _meterproof("stack", "down", "--run-dir", str(run_dir))
    assert down.returncode == 0, down.stderr
    assert "ganache" in down.stdout
    assert not port_accepts(port)
