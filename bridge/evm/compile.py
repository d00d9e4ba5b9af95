"""Compile the GRID contracts with the npm `solc` package (solcjs: no download at run time)
into the committed artifacts, so a deployment never needs a compiler and a test can
recompile and compare byte for byte.

`node_modules` (from `make setup`, `npm ci`) lies in the checkout's root, beside this
package's root; solcjs resolves `@openzeppelin/...` imports from it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from meterproof.errors import UnavailableError

HERE: Final = Path(__file__).resolve().parent
CONTRACTS: Final = HERE / "contracts"
ARTIFACTS: Final = HERE / "artifacts"
NODE_MODULES: Final = HERE.parents[1] / "node_modules"
#: What gets deployed; GRID is created by GridAnchor's constructor.
NAMES: Final = ("GRID", "GridAnchor")
SETTINGS: Final[dict[str, Any]] = {
    "optimizer": {"enabled": True, "runs": 200},
    "evmVersion": "shanghai",  # ganache 7.9's hardfork; Energy Web Chain is older-or-equal
    "outputSelection": {"*": {"*": ["abi", "evm.bytecode.object"]}},
}
#: Reads standard JSON on stdin, resolves imports from the contracts folder and node_modules.
_COMPILER_JS: Final = """
const fs = require("fs"), path = require("path"), solc = require("solc");
const [contracts, modules] = process.argv.slice(1);
const input = JSON.parse(fs.readFileSync(0, "utf8"));
function findImports(p) {
  for (const base of [contracts, modules]) {
    const f = path.join(base, p);
    if (fs.existsSync(f)) return { contents: fs.readFileSync(f, "utf8") };
  }
  return { error: "not found: " + p };
}
const out = JSON.parse(solc.compile(JSON.stringify(input), { import: findImports }));
out.solcVersion = solc.version();
process.stdout.write(JSON.stringify(out));
"""


class CompilerError(UnavailableError):
    """solcjs is missing (run `make setup`) or the contracts do not compile."""

    def __init__(self, detail: str) -> None:
        super().__init__("solc", detail)


@dataclass(frozen=True, slots=True)
class Artifact:
    name: str
    abi: list[dict[str, Any]]
    bytecode: str  #: 0x-prefixed creation code
    solc: str

    def to_json(self) -> str:
        view = {"contract": self.name, "solc": self.solc, "settings": SETTINGS,
                "abi": self.abi, "bytecode": self.bytecode}  # fmt: skip
        return json.dumps(view, indent=1, sort_keys=True) + "\n"


def solc_available(node_modules: Path = NODE_MODULES) -> bool:
    return shutil.which("node") is not None and (node_modules / "solc").is_dir()


def compile_contracts(node_modules: Path = NODE_MODULES) -> dict[str, Artifact]:
    if not solc_available(node_modules):
        raise CompilerError(f"no node or no solc under {node_modules}: run `make setup`")
    sources = {p.name: {"content": p.read_text()} for p in sorted(CONTRACTS.glob("*.sol"))}
    request = {"language": "Solidity", "sources": sources, "settings": SETTINGS}
    done = subprocess.run(
        ["node", "-e", _COMPILER_JS, str(CONTRACTS), str(node_modules)],
        input=json.dumps(request), capture_output=True, text=True, check=False,
        env={"NODE_PATH": str(node_modules), "PATH": "/usr/bin:/bin:/usr/local/bin"},
    )  # fmt: skip
    if done.returncode != 0:
        raise CompilerError((done.stderr.strip().splitlines() or ["node failed"])[-1])
    out = json.loads(done.stdout)
    errors = [e["formattedMessage"] for e in out.get("errors", []) if e["severity"] == "error"]
    if errors:
        raise CompilerError(errors[0].strip().splitlines()[0])
    found: dict[str, Artifact] = {}
    for contracts in out["contracts"].values():
        for name, compiled in contracts.items():
            if name in NAMES:
                bytecode = "0x" + compiled["evm"]["bytecode"]["object"]
                found[name] = Artifact(name, compiled["abi"], bytecode, out["solcVersion"])
    return found


def write_artifacts(artifacts: dict[str, Artifact], folder: Path = ARTIFACTS) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, artifact in sorted(artifacts.items()):
        path = folder / f"{name}.json"
        path.write_text(artifact.to_json())
        written.append(path)
    return written


def load_artifact(name: str, folder: Path = ARTIFACTS) -> Artifact:
    view = json.loads((folder / f"{name}.json").read_text())
    return Artifact(view["contract"], view["abi"], view["bytecode"], view["solc"])
