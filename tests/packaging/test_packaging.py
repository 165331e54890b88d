"""The wheel ships every package folder: pyproject lists them explicitly (because of the
kernels/ and passes/ package-dir mapping), so a new sub-package must be added there."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]


def _declared() -> tuple[set[str], dict[str, str]]:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return set(cfg["packages"]), cfg["package-dir"]


def test_every_package_folder_is_declared() -> None:
    packages, package_dir = _declared()
    roots = {"graphsurg": "graphsurg", "graphsurg.kernels": "kernels", "graphsurg.passes": "passes"}
    found = set()
    for name, folder in roots.items():
        assert package_dir[name] == folder
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            dotted = ".".join((name, *rel.parts)) if rel.parts else name
            if dotted.startswith("graphsurg.kernels") and folder == "graphsurg":
                continue
            found.add(dotted)
    assert found == packages, f"pyproject packages differ: missing {found - packages}"


def test_import_graphsurg_does_not_import_triton() -> None:
    code = "import sys, graphsurg, graphsurg.kernels; print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def test_py_typed_ships() -> None:
    assert (ROOT / "graphsurg" / "py.typed").exists()


def test_test_module_basenames_are_unique() -> None:
    """pytest's default (prepend) import mode imports test files by basename: two
    tests/*/test_x.py files collide at collection."""
    names = [p.name for p in (ROOT / "tests").rglob("*.py") if p.name != "conftest.py"
             and p.name != "__init__.py"]
    dups = sorted({n for n in names if names.count(n) > 1})
    assert not dups, f"rename one of each: {dups}"
