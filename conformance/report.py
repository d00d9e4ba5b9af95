"""The verdicts as a vendor reads them: a table on a terminal, JSON for a pipeline."""

from __future__ import annotations

import json
from collections.abc import Sequence

from meterproof.conformance.checks import Verdict

#: What each check holds the meter to, for the table and docs/conformance.md.
TITLES = {
    "signing_bytes": "signing bytes (spec 6)",
    "strict_json": "strict JSON (spec 4, 5)",
    "key_binding": "algorithm and key binding (spec 1, 2, 7)",
    "seq_ts": "seq and ts behaviour (spec 4, 9, 11)",
    "receipt_handling": "receipt handling (spec 3, 10)",
    "republish": "republish after silence (spec 11)",
    "reconnect_backoff": "reconnect backoff (spec 12)",
    "power_cut": "outbox and seq across a power cut (spec 11)",
    "session": "session settings (spec 3)",
}


def passed(verdicts: Sequence[Verdict]) -> bool:
    """Conformant only if every check ran and passed: a skipped check proves nothing."""
    return all(v.passed for v in verdicts)


def as_json(verdicts: Sequence[Verdict], **context: object) -> str:
    return json.dumps(
        {
            **context,
            "passed": passed(verdicts),
            "checks": [
                {"check": v.check, "status": v.status, "summary": v.summary, "reasons": v.reasons}
                for v in verdicts
            ],
        },
        indent=2,
    )


def as_table(verdicts: Sequence[Verdict]) -> str:
    width = max(len(TITLES.get(v.check, v.check)) for v in verdicts)
    lines = []
    for v in verdicts:
        lines.append(f"{v.status.upper():<5} {TITLES.get(v.check, v.check):<{width}}  {v.summary}")
        lines += [f"{'':<5} {'':<{width}}  - {reason}" for reason in v.reasons]
    failed = [v.check for v in verdicts if not v.passed]
    lines.append("")
    lines.append(
        "CONFORMANT: every check passed"
        if not failed
        else f"NOT CONFORMANT: {', '.join(failed)} did not pass"
    )
    return "\n".join(lines)
