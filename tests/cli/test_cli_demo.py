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


def test_training_is_reproducible_and_leaves_no_threads_changed() -> None:
    import copy

    import torch

    from graphsurg._demo import run_demo, train
    from graphsurg._zoo import dead_mlp

    case = dead_mlp(0, n_batches=2)
    a = train(copy.deepcopy(case.model), case.batches, case.loss_fn, steps=4, seed=1, start=2)
    b = train(copy.deepcopy(case.model), case.batches, case.loss_fn, steps=4, seed=1, start=2)
    assert a == b  # same seed, same data, same start: bit-identical losses
    threads = torch.get_num_threads()
    from graphsurg._console import Console

    run_demo(Console(quiet=True, force_plain=True), models=("bottleneck_mlp",), steps=2)
    assert torch.get_num_threads() == threads
