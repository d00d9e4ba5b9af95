"""The demo's HTTP API: `meterproof api` started as a user starts it, and at the end the
curl lines a user would type (a token, a meter's latest reading, its 15-minute rollups,
a reading's ledger proof), run by bash exactly as printed."""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

from meterproof.api.ready import ApiNotReadyError, wait_ready
from meterproof.certs.layout import PkiLayout
from meterproof.config import StackEnv
from meterproof.stack.commands import command_environ, meterproof_argv, start_command, stop_command

Say = Callable[[str], None]
API_PORT = 8443
API_METRICS = 9118
_CURL = "curl -sS --fail-with-body --cacert $CA"


class ApiDemo:
    def __init__(self, env: StackEnv, logs: Path, say: Say) -> None:
        self._env = env
        self._logs = logs
        self._say = say
        self._secret = secrets.token_hex(24)
        self._ca = PkiLayout(env.pki_root).ca_cert
        self.url = f"https://127.0.0.1:{API_PORT}"

    def start(self, running: ExitStack) -> bool:
        """Start the API and wait (30 s at most) until its /health says submissions run."""
        proc = start_command(
            meterproof_argv("api"),
            command_environ(
                self._env,
                METERPROOF_API_OPERATOR_SECRET=self._secret,
                METERPROOF_API_PORT=str(API_PORT),
                METERPROOF_API_METRICS_PORT=str(API_METRICS),
            ),
            self._logs / "api.log",
        )
        running.callback(stop_command, proc)
        try:
            wait_ready(self.url, self._ca, proc, self._logs / "api.log", within_s=30)
        except ApiNotReadyError as exc:
            self._say(f"    the API did not answer: {exc}")
            return False
        return True

    def curl_lines(self, meter_id: str, reading_hash: str) -> bool:
        """Print the lines, run them with bash, print what each answered (shortened)."""
        script = [
            f"export API={self.url} CA={self._ca} METER={meter_id}",
            f"export METERPROOF_API_OPERATOR_SECRET={self._secret}",
            f"TOKEN=$({_CURL} $API/api/auth/token -d grant_type=client_credentials"
            " -d client_id=operator -d client_secret=$METERPROOF_API_OPERATOR_SECRET"
            " | python3 -c 'import json,sys; print(json.load(sys.stdin)[\"access_token\"])')",
            f'{_CURL} -H "Authorization: Bearer $TOKEN" $API/api/meters/$METER/latest',
            f'{_CURL} -H "Authorization: Bearer $TOKEN" "$API/api/meters/$METER/rollups'
            '?width=15m&from=$(( ($(date +%s) - 3600) * 1000 ))&to=$(( $(date +%s) * 1000 + 1 ))"',
            f'{_CURL} -H "Authorization: Bearer $TOKEN" $API/api/ledger/proofs/{reading_hash}',
        ]
        self._say("    the HTTP API, as curl (each line run now, its answer below it):")
        ok = True
        for index in range(2, len(script)):
            # the exports and the token, then this line; each answer ends with a newline
            lines = [*script[:3], *([script[index]] if index > 2 else []), "echo"]
            done = subprocess.run(
                ["bash", "-euo", "pipefail", "-c", "\n".join(lines)],
                capture_output=True, text=True, timeout=30, check=False,
            )  # fmt: skip
            self._say(f"      $ {script[index]}")
            answer = (done.stdout or done.stderr).strip().splitlines()
            last = answer[-1] if answer else "(an operator token, valid 5 minutes, in $TOKEN)"
            self._say(f"        {last[:150]}{'..' if len(last) > 150 else ''}")
            ok = ok and done.returncode == 0
        self._say(f"    (run `{script[0]}` and `{script[1]}` first)")
        return ok
