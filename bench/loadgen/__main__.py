"""`python -P -m bench.loadgen JOB.json`: one generator process (see bench.loadgen).

On uvloop: it cost the generator 18-26% less CPU per reading than asyncio's loop, and
7% less memory per meter (docs/scaling.md, "A leaner load generator")."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import uvloop

from meterproof.bench.loadgen.generator import serve

if __name__ == "__main__":
    uvloop.run(serve(json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))))
