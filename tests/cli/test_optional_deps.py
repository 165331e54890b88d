"""Every command works without the ``report`` extra (matplotlib, rich).

``pip install graphsurg`` (no extra) installs neither package. The CLI runs here in a
subprocess whose import system has them removed: a meta-path finder first in
``sys.meta_path`` raises ``ModuleNotFoundError`` for ``matplotlib``, ``mpl_toolkits`` and
``rich`` -- for graphsurg and for every library it imports -- exactly as when they are not
installed. Chosen over a fresh venv with ``pip install --no-deps .``: that venv would either
reinstall torch, onnxruntime and the rest (gigabytes, minutes, a network) or see this venv's
site-packages, matplotlib included. What the finder cannot show -- that installing graphsurg
without the extra does not pull matplotlib or rich in -- is read from the installed
package's metadata (``test_report_packages_are_only_in_the_extra``).
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
EXTRA = ("matplotlib", "mpl_toolkits", "rich")  # top-level modules of the report extra
_NO_EXTRA = f"""
import sys

class _NoReportExtra:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {EXTRA!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, _NoReportExtra())
"""
_RUN_CLI = _NO_EXTRA + """
import runpy
sys.argv = ["graphsurg", *sys.argv[1:]]
runpy.run_module("graphsurg", run_name="__main__", alter_sys=True)
"""


def _run(code: str, *args: str, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_report_packages_are_only_in_the_extra() -> None:
    reqs = importlib.metadata.requires("graphsurg") or []
    for name in ("matplotlib", "rich"):
        mine = [r for r in reqs if re.match(rf"{name}\b", r)]
        assert mine, f"{name} is not declared at all"
        assert all(re.search(r"""extra\s*==\s*["']report["']""", r) for r in mine), mine


def test_without_the_extra_every_module_imports(tmp_path: Path) -> None:
    """The finder works (the extra's packages do not import), and no graphsurg module needs
    them to import: a module may fail only for another reason (an optional dev tool)."""
    code = _NO_EXTRA + """
import importlib, pkgutil
for blocked in ("matplotlib", "rich.progress"):
    try:
        importlib.import_module(blocked)
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit(f"{blocked} imported: the finder does not work")
import graphsurg
bad = []
for m in pkgutil.walk_packages(graphsurg.__path__, "graphsurg."):
    try:
        importlib.import_module(m.name)
    except ModuleNotFoundError as e:
        if (e.name or "").partition(".")[0] in EXTRA:
            bad.append(f"{m.name}: {e}")
    except ImportError:
        pass
print("NEEDS EXTRA:", bad)
raise SystemExit(1 if bad else 0)
""".replace("EXTRA", repr(EXTRA))
    proc = _run(code, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_demo_without_the_extra(tmp_path: Path) -> None:
    proc = _run(_RUN_CLI, "demo", "--models", "dead_mlp", "--steps", "3", "-o", "rep",
                cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "internal error" not in proc.stderr
    assert "pip install 'graphsurg[report]'" in proc.stdout  # says how to get the figures
    assert re.search(r"^dead_mlp\nmetric +untreated +treated\n", proc.stdout, re.M), \
        proc.stdout[-2000:]  # the before/after table, in plain text
    assert re.search(r"^problems +2 ", proc.stdout, re.M)
    page = (tmp_path / "rep" / "report.html").read_text()
    assert "<img" not in page and "<table" in page and "graphsurg[report]" in page
    assert (tmp_path / "rep" / "report.json").exists()


@pytest.mark.parametrize("command", ["diagnose", "onnx"])
def test_other_commands_without_the_extra(command: str, tmp_path: Path,
                                          dead_mlp_files: tuple[Path, Path, Path]) -> None:
    model, data, _ = dead_mlp_files
    args = {"diagnose": ["diagnose", str(model), "--data", str(data), "--loss", "mse",
                         "--report", "rep"],
            "onnx": ["onnx", "list-passes"]}[command]
    proc = _run(_RUN_CLI, *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "internal error" not in proc.stderr
    if command == "diagnose":
        assert "DeadNeurons" in proc.stdout
        assert "graphsurg[report]" in (tmp_path / "rep" / "report.html").read_text()
