"""Smoke test of the efficacy experiments (benchmarks/efficacy): the --quick variant runs,
writes its report, tables and plots, and graphsurg beats the untreated network on the
dying-ReLU experiment; Net2Net widening is exact at surgery."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EXPERIMENTS = ("dying_relu", "vanishing", "bottleneck", "plasticity")


def test_quick_efficacy_run(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.efficacy", "--quick", "--seeds", "1",
         "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["name"] for r in results] == list(EXPERIMENTS)
    md = (tmp_path / "RESULTS.md").read_text()
    for r in results:
        assert r["title"] in md and r["table"] in md
        assert r["table"].count("\n") >= 3  # header, rule and at least two arms
        for p in r["plots"]:
            png = tmp_path / p
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", p
            assert f"]({p})" in md

    by = {r["name"]: r for r in results}
    dying = by["dying_relu"]["metrics"]
    assert dying["untreated"]["dormant"][0] >= 0.2  # the large learning rate broke it
    assert dying["graphsurg operate"]["dormant"][0] < 0.5 * dying["untreated"]["dormant"][0]
    assert by["bottleneck"]["max_change"] <= 1e-5  # Net2Net widening is exact
    assert set(by["plasticity"]["metrics"]) == {
        "backprop", "continual backprop", "shrink-and-perturb", "graphsurg"}
    # the callback's CBP-style utility replacement ran (gs.SurgeryCallback(replace_rate=...))
    assert by["plasticity"]["metrics"]["graphsurg"]["units replaced"][0] > 0
