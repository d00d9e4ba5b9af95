"""The package's shape, checked: one namespace, complete, and layers that point down only.

Each module's imports are read from its source (no import is executed), including
imports inside functions; a `TYPE_CHECKING` import counts too, since it is a dependency
of the code's meaning all the same. Commands named by string in the command root
(`cli.main.COMMANDS`) are not imports: the root is where the layers are composed.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Lower layers first; a module may import its own layer and those before it.
LAYERS: list[tuple[str, set[str]]] = [
    ("contract", {"schemas"}),
    ("neutral", {"config", "errors", "backoff", "heap", "probes", "durable", "pidfile", "cli"}),
    ("infrastructure", {"certs", "mosquitto", "registry", "db", "consent"}),
    ("product", {"meter", "ingest", "bridge", "api"}),
    ("tools", {"stack", "bench", "chaos", "fuzz", "demo", "conformance", "__main__"}),
]
RANK = {part: rank for rank, (_, parts) in enumerate(LAYERS) for part in parts}


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in sorted(ROOT.rglob("*.py")):
        relative = path.relative_to(ROOT)
        if relative.parts[0] in {"tests", ".venv", ".run", "build", "node_modules"}:
            continue
        if relative.parts[0].startswith("."):
            continue
        name = ".".join(("meterproof", *relative.with_suffix("").parts))
        found[name.removesuffix(".__init__")] = path
    return found


def _imports(path: Path, module: str) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                names.add(".".join([*base, node.module] if node.module else base))
            elif node.module:
                names.add(node.module)
    return names


def _part(module: str) -> str:
    """`meterproof.ingest.worker` -> `ingest`; the root's own modules name themselves."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


MODULES = _modules()


def test_every_module_belongs_to_a_layer() -> None:
    unplaced = {m for m in MODULES if _part(m) not in RANK and m != "meterproof"}
    assert not unplaced, f"add these parts to a layer in tests/test_layers.py: {unplaced}"


def violations(module: str, imports: set[str]) -> list[str]:
    """The imports of `module` that climb a layer or bypass the namespace."""
    rank = RANK[_part(module)]
    bad = [i for i in imports if i.split(".")[0] in RANK]  # `import ingest`: not ours
    bad += [
        i for i in imports if i.startswith("meterproof.") and RANK.get(_part(i), len(LAYERS)) > rank
    ]
    return sorted(bad)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m != "meterproof"))
def test_imports_point_down_only(module: str) -> None:
    bad = violations(module, _imports(MODULES[module], module))
    assert not bad, f"{module} ({LAYERS[RANK[_part(module)]][0]}) imports {bad}"


def test_the_check_sees_a_climbing_or_generic_import() -> None:
    """Not vacuous: a product module importing a tool, or a bare `ingest`, is caught."""
    assert violations("meterproof.ingest.worker", {"meterproof.stack.process"}) == [
        "meterproof.stack.process"
    ]
    assert violations("meterproof.schemas.codec", {"meterproof.config"}) == ["meterproof.config"]
    assert violations("meterproof.bench.cli", {"ingest.worker", "meterproof.ingest"}) == [
        "ingest.worker"
    ]


def test_the_contract_imports_nothing_of_ours() -> None:
    for module in (m for m in MODULES if _part(m) == "schemas"):
        imports = _imports(MODULES[module], module)
        ours = {i for i in imports if i.startswith("meterproof.")}
        assert ours <= {i for i in ours if i.startswith("meterproof.schemas")}, module


def test_the_distribution_lists_every_package_and_only_ours() -> None:
    """pyproject maps the root to `meterproof`; every folder with an __init__.py must be
    listed, or a wheel would silently lack it."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    setuptools = project["tool"]["setuptools"]
    assert setuptools["package-dir"] == {"meterproof": "."}
    packages = {m for m, p in MODULES.items() if p.name == "__init__.py"}
    assert set(setuptools["packages"]) == packages
    assert all(p == "meterproof" or p.startswith("meterproof.") for p in setuptools["packages"])


@pytest.mark.slow
def test_only_meterproof_is_importable_from_outside_the_checkout(tmp_path: Path) -> None:
    """What a user who pip-installs meterproof gets: one import package, no generic names."""
    probe = (
        "import importlib.util, meterproof.ingest.worker, meterproof.cli.main\n"
        "print(sorted(n for n in ('cli', 'stack', 'bench', 'schemas', 'ingest', 'fuzz')"
        " if importlib.util.find_spec(n) is not None))\n"
    )
    done = subprocess.run(
        [sys.executable, "-P", "-c", probe], cwd=tmp_path, capture_output=True, check=True
    )
    assert done.stdout == b"[]\n"


@pytest.mark.slow
def test_an_ingest_worker_starts_without_the_evm_signature_libraries() -> None:
    """eth-account costs ~0.45 s of import (py_ecc's pairing tables) and only checks of
    wallet links and signed consents use it: a worker, started again after every crash,
    does not pay for it."""
    probe = "import sys, meterproof.ingest.worker\nprint('eth_account' in sys.modules)\n"
    done = subprocess.run(
        [sys.executable, "-P", "-c", probe], cwd=ROOT.parent, capture_output=True, check=True
    )
    assert done.stdout == b"False\n"
