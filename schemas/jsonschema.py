"""Generate the checked-in JSON Schema files from the models.

`python -m schemas.jsonschema` rewrites them; a test fails when they drift, so the files
integrators read are always the ones the code enforces. JSON Schema cannot state all of
docs/spec/reading-v1.md section 5 (to it `1.0` is an integer; it has no word for a key
given twice, a non-canonical base64url `sig` or the 4,096-byte limit): a payload the
schema accepts may still be `malformed`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Final

from pydantic import BaseModel

from meterproof.schemas.reading import Receipt, SignedReading, VerifiedReading

SCHEMA_DIR: Final = Path(__file__).parent / "json"
MODELS: Final[dict[str, type[BaseModel]]] = {
    "signed-reading.schema.json": SignedReading,
    "receipt.schema.json": Receipt,
    "verified-reading.schema.json": VerifiedReading,
}


def render(model: type[BaseModel]) -> str:
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        **model.model_json_schema(mode="validation"),
    }
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def write_all(directory: Path = SCHEMA_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, model in MODELS.items():
        path = directory / name
        path.write_text(render(model), encoding="utf-8")
        written.append(path)
    return written


if __name__ == "__main__":
    for path in write_all():
        print(path)
