"""schemathesis over the OpenAPI document of a running `meterproof api`: every operation,
with an operator's token and then as a meter (client certificate), answers no 5xx, only
documented statuses and content types, and bodies that match their schemas."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from fixtures.api import ApiServer
from ingest_harness import provision

CHECKS = ",".join([
    "not_a_server_error", "status_code_conformance", "content_type_conformance",
    "response_schema_conformance",
])  # fmt: skip


def _schemathesis(api: ApiServer, *options: str, report: Path) -> subprocess.CompletedProcess[str]:
    st = Path(sys.executable).with_name("st")
    return subprocess.run(
        [
            str(st), "run", f"{api.url}/openapi.json", "--tls-verify", str(api.pki.ca_cert),
            "--checks", CHECKS, "--max-examples", "25", "--seed", "13", "--workers", "1",
            "--generation-deterministic", "--report", "junit", "--report-junit-path",
            str(report), *options,
        ],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


@pytest.mark.slow
def test_every_operation_conforms_to_the_openapi_document(
    api_server: ApiServer, make_meter_id: Callable[[], str], tmp_path: Path
) -> None:
    meter_id = make_meter_id()
    provision(api_server.pki, api_server.database_url, meter_id)
    files = api_server.pki.device(meter_id)
    runs = {
        "operator": ("-H", f"Authorization: Bearer {api_server.operator_token()}"),
        "meter": ("--request-cert", str(files.cert), "--request-cert-key", str(files.key)),
    }
    with api_server.client() as http:
        document = http.get("/openapi.json").json()
    assert document["openapi"].startswith("3.1")
    operations = sum(len(methods) for methods in document["paths"].values())
    for who, options in runs.items():
        done = _schemathesis(api_server, *options, report=tmp_path / f"{who}.xml")
        assert done.returncode == 0, f"{who}:\n{done.stdout[-6000:]}\n{done.stderr[-2000:]}"
        assert f"Tested: {operations}" in done.stdout, done.stdout[-3000:]
    log = api_server.log.read_text()
    assert "request_failed" not in log, "an unexpected error reached the catch-all handler"
