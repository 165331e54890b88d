"""Layering (DESIGN.md, "The spine and its adapters"): lower layers never import higher ones.

kernels <- data model <- adapters (passes/) <- detect, library <- plan, operate, verify <- CLI,
report. Read from the source (``ast``), so a lazy import inside a function counts too:

* ``kernels/`` imports nothing of graphsurg outside ``graphsurg.kernels``;
* ``passes/`` imports only ``graphsurg.kernels``, ``graphsurg.passes`` and the data-model
  modules -- never the planner, operate, verify, callback, CLI, report, library, detect, or
  the ``graphsurg`` facade (``import graphsurg``, ``from graphsurg import diagnose``).

And one room per concept: no two modules of the package share a name (``_monitor`` and
``passes/fx/monitor``) or nearly do (``_diagnose`` and ``_diagnosis``).
"""

from __future__ import annotations

import ast
import itertools
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = {"graphsurg": "graphsurg", "kernels": "graphsurg.kernels", "passes": "graphsurg.passes"}

#: the data model (DESIGN.md): what the adapters may build on
DATA_MODEL = frozenset({
    "_problems", "_measurements", "_activations", "_layers", "_compare", "_files", "_data", "_ir",
    "_config", "_certificates", "_errors",
})
#: named in the issue as the layers above the adapters (the allow-list below covers them and
#: any new module; this list only makes the failure message say which layer it is)
ABOVE = ("graphsurg._plan", "graphsurg._operate", "graphsurg._verify", "graphsurg._callback",
         "graphsurg._cli", "graphsurg._report", "graphsurg.library", "graphsurg.detect")

#: upward imports still in the tree when this test was written, and where they should go
#: (strict xfail: the test fails as soon as one is gone, so its entry goes with it)
KNOWN: dict[str, str] = {}
#: module names still shared when this test was written (same rule as KNOWN)
KNOWN_TWINS: dict[str, str] = {}


def _module(rel_path: str) -> tuple[str, bool]:
    """Dotted name of a source file (folders mapped as in pyproject's package-dir)."""
    rel = Path(rel_path).with_suffix("")
    parts = [FOLDERS[rel.parts[0]], *rel.parts[1:]]
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def _imports(rel: str, source: str) -> list[tuple[int, str]]:
    """``(line, dotted name)`` of every graphsurg module or name the file ``rel`` (path from
    the repository root) with text ``source`` imports."""
    name, is_pkg = _module(rel)
    package = name if is_pkg else name.rpartition(".")[0]
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source, rel)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*up, *([node.module] if node.module else [])])
            if base == "graphsurg":  # from graphsurg import X: X is what is imported
                out += [(node.lineno, f"graphsurg.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, base))
    return [(line, m) for line, m in out if m == "graphsurg" or m.startswith("graphsurg.")]


def _allowed_in_passes(mod: str) -> bool:
    if mod.startswith(("graphsurg.kernels", "graphsurg.passes")):
        return True
    parts = mod.split(".")
    return len(parts) >= 2 and parts[1] in DATA_MODEL


def _why(mod: str) -> str:
    layer = next((a for a in ABOVE if mod == a or mod.startswith(a + ".")), None)
    if layer:
        return f"{layer}, a layer above the adapters"
    if mod == "graphsurg" or mod.count(".") == 1 and not mod.split(".")[1].startswith("_"):
        return "the graphsurg facade"
    return "not the data model"


def _sources(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def _violations(rel: str, source: str) -> list[str]:
    folder = Path(rel).parts[0]
    bad = []
    for line, mod in _imports(rel, source):
        if folder == "kernels" and not mod.startswith("graphsurg.kernels"):
            bad.append(f"{rel}:{line} imports {mod} (kernels import only graphsurg.kernels)")
        elif folder == "passes" and not _allowed_in_passes(mod):
            bad.append(f"{rel}:{line} imports {mod} ({_why(mod)})")
    return bad


def _params(folder: str) -> list[object]:
    out: list[object] = []
    for p in _sources(folder):
        rel = str(p.relative_to(ROOT))
        marks = [pytest.mark.xfail(reason=KNOWN[rel], strict=True)] if rel in KNOWN else []
        out.append(pytest.param(p, id=rel, marks=marks))
    return out


@pytest.mark.parametrize("path", _params("kernels") + _params("passes"))
def test_no_upward_imports(path: Path) -> None:
    bad = _violations(str(path.relative_to(ROOT)), path.read_text())
    assert not bad, "; ".join(bad)


def test_the_check_sees_upward_imports() -> None:
    """The walker resolves relative, lazy and facade imports (a check that cannot fail is no
    check): a module text placed at passes/fx/ with each kind of upward import."""
    source = ("import graphsurg\nfrom graphsurg import diagnose, _errors\n"
              "from ... import _plan\nfrom ...detect import dead\n"
              "def f():\n    from graphsurg.library import default_library\n"
              "from ..onnx import adapter\nfrom graphsurg._problems import Site\n")
    bad = _violations("passes/fx/probe.py", source)
    assert _violations("kernels/probe.py", "from .. import _errors\n") == [
        "kernels/probe.py:1 imports graphsurg._errors (kernels import only graphsurg.kernels)"]
    mods = [b.split(" imports ")[1].split(" (")[0] for b in bad]
    assert mods == ["graphsurg", "graphsurg.diagnose", "graphsurg._plan", "graphsurg.detect",
                    "graphsurg.library"]
    assert [b.split(" (")[1] for b in bad] == [
        "the graphsurg facade)", "the graphsurg facade)",
        "graphsurg._plan, a layer above the adapters)",
        "graphsurg.detect, a layer above the adapters)",
        "graphsurg.library, a layer above the adapters)"]


def _stems() -> dict[str, list[str]]:
    """Module names (leading underscores dropped) -> files, for graphsurg/, kernels/, passes/."""
    out: dict[str, list[str]] = {}
    for folder in FOLDERS:
        for p in _sources(folder):
            if p.name not in ("__init__.py", "__main__.py"):
                out.setdefault(p.stem.lstrip("_"), []).append(str(p.relative_to(ROOT)))
    return out


def _mirrored(paths: list[str]) -> bool:
    """The two IR adapters may mirror each other's rooms (passes/fx/X.py, passes/onnx/X.py):
    the same role for each IR is the point of the adapter interface."""
    return sorted(str(Path(p).parent) for p in paths) == ["passes/fx", "passes/onnx"]


def test_no_two_modules_share_a_name() -> None:
    dups = {s: ps for s, ps in _stems().items() if len(ps) > 1 and not _mirrored(ps)}
    new = {s: ps for s, ps in dups.items() if s not in KNOWN_TWINS}
    assert not new, f"one room per concept; rename or merge: {new}"
    gone = sorted(set(KNOWN_TWINS) - set(dups))
    assert not gone, f"no longer twins, drop them from KNOWN_TWINS: {gone}"


def test_no_two_modules_nearly_share_a_name() -> None:
    """``diagnose``/``diagnosis``: a common stem of 5+ letters and tails of at most 3."""
    def twins(a: str, b: str) -> bool:
        common = os.path.commonprefix([a, b])
        return len(common) >= 5 and len(a) - len(common) <= 3 and len(b) - len(common) <= 3

    stems = _stems()
    pairs = [(stems[a], stems[b]) for a, b in itertools.combinations(sorted(stems), 2)
             if twins(a, b)]
    assert not pairs, f"name twins: {pairs}"
    assert twins("diagnose", "diagnosis") and not twins("monitor", "observe_compiled")
