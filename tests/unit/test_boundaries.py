"""Who may import whom: the producer's side (contracts.client, the `seedance` CLI) speaks only the wire
contract and loads nothing of the worker, and the worker imports nothing of the producer's side."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PRODUCER_SIDE = ("contracts.client", "contracts.cli")


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_the_producers_side_loads_nothing_of_the_worker() -> None:
    code = (
        "import sys, contracts.cli, contracts.client;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'worker'))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert done.stdout.strip() == "[]"


def test_the_worker_imports_nothing_of_the_producers_side() -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(n for n in imported_modules(path) if n.startswith(PRODUCER_SIDE))
        for path in (ROOT / "worker").rglob("*.py")
    }
    assert {path: names for path, names in offenders.items() if names} == {}
    # The scan sees imports at all: the worker's entry point imports the worker's service.
    assert "worker.service" in imported_modules(ROOT / "worker" / "__main__.py")
