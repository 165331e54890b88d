"""``graphsurg demo`` in process on two small zoo models: tables, --json, the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from graphsurg._cli import main


def test_demo_quiet_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["demo", "--models", "bottleneck_mlp,dead_cnn", "--steps", "5", "-o",
               str(tmp_path / "rep"), "--quiet", "--json"])
    out, err = capsys.readouterr()
    assert rc in (0, 1)  # 1 only when a schema was rolled back
    data = json.loads(out)  # stdout is JSON only
    assert [m["name"] for m in data["models"]] == ["bottleneck_mlp", "dead_cnn"]
    assert "bottleneck_mlp" in err and "report:" in err  # tables go to stderr with --json
    assert (tmp_path / "rep" / "report.html").exists()
    import graphsurg as gs

    if hasattr(gs, "operate"):
        m = data["models"][0]
        assert m["plan"] and len(m["curves"]["treated"]) == 5


def test_demo_bad_models(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--models", "nope", "--no-report"]) == 2
    assert "unknown zoo model" in capsys.readouterr().err
