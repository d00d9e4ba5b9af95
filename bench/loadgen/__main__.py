"""`python -P -m bench.loadgen JOB.json`: one generator process (see bench.loadgen)."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from meterproof.bench.loadgen.generator import serve

if __name__ == "__main__":
    asyncio.run(serve(json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))))
