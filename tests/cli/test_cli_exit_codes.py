"""``python -m graphsurg``: exit codes (0 ok, 1 certificates, 2 bad input), one-line errors,
tracebacks only with --debug, JSON on stdout with --json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def _one_line_error(proc) -> str:  # type: ignore[no-untyped-def]
    err = proc.stderr.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    return err


def test_no_command_and_unknown_command_are_bad_input(gs_run) -> None:  # type: ignore[no-untyped-def]
    assert gs_run().returncode == 2
    p = gs_run("transmogrify")
    assert p.returncode == 2
    assert "invalid choice" in _one_line_error(p)


def test_help_says_specs_run_user_code(gs_run) -> None:  # type: ignore[no-untyped-def]
    p = gs_run("diagnose", "--help")
    assert p.returncode == 0
    text = " ".join(p.stdout.split())
    assert "executes your own code, by design" in text
    assert "weights_only=True" in text


@pytest.mark.parametrize("model,data,needle", [
    ("missing.pt2", "x.npz", "no such file"),
    ("no_such_pkg.mod:make", "x.npz", "cannot import module 'no_such_pkg.mod'"),
    ("_cli_models:nope", "x.npz", "has no attribute 'nope'"),
    ("_cli_models:not_a_model", "x.npz", "must return a torch.nn.Module"),
    ("_cli_models:NOT_CALLABLE", "x.npz", "not a callable"),
    ("_cli_models:dead_mlp", "missing.npz", "no such file"),
])
def test_bad_model_or_data_is_one_line_exit_2(model: str, data: str, needle: str, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    # in process (same code path as the console script, minus interpreter start-up)
    from graphsurg._cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    assert main(["diagnose", model, "--data", data]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert needle in err


def test_data_that_does_not_fit_the_model(gs_run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import numpy as np

    np.savez(tmp_path / "wrong.npz", x=np.zeros((8, 5), dtype=np.float32))
    p = gs_run("diagnose", "_cli_models:dead_mlp", "--data", str(tmp_path / "wrong.npz"))
    assert p.returncode == 2
    assert "the model rejected batch 0" in _one_line_error(p)
    # --debug shows the traceback
    p = gs_run("--debug", "diagnose", "_cli_models:dead_mlp", "--data", str(tmp_path / "wrong.npz"))
    assert p.returncode != 0 and "Traceback" in p.stderr


def test_diagnose_pt2_npz_json(gs_run, dead_mlp_files) -> None:  # type: ignore[no-untyped-def]
    model, npz, _ = dead_mlp_files
    p = gs_run("diagnose", str(model), "--data", str(npz), "--loss", "mse", "--json", "-q")
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert d["format"] == "graphsurg.diagnosis/1" and d["gradients_checked"]
    assert {pr["site"]["module"] for pr in d["problems"] if pr["kind"] == "DeadNeurons"} == {"0", "2"}


def test_diagnose_specs_and_report(gs_run, dead_mlp_files, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, _, pt = dead_mlp_files
    p = gs_run("diagnose", "_cli_models:dead_mlp", "--data", str(pt), "--loss", "_cli_models:mse",
               "--report", "rep")
    assert p.returncode == 0, p.stderr
    assert "DeadNeurons" in p.stdout
    assert (tmp_path / "rep" / "report.html").stat().st_size > 10_000
    assert json.loads((tmp_path / "rep" / "report.json").read_text())["format"] == "graphsurg.report/1"


def test_pickled_code_in_pt_data_is_refused_and_not_run(gs_run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import torch

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            import os

            return (os.system, (f"touch {marker}",))

    torch.save([Evil()], tmp_path / "evil.pt")
    p = gs_run("diagnose", "_cli_models:dead_mlp", "--data", str(tmp_path / "evil.pt"))
    assert p.returncode == 2
    assert "refuses to load" in _one_line_error(p)
    assert not marker.exists()


def test_onnx_subcommand_wired_or_unavailable(gs_run) -> None:  # type: ignore[no-untyped-def]
    p = gs_run("onnx", "list-passes")
    if p.returncode == 0:
        assert "excise_dead" in p.stdout
    else:
        assert p.returncode == 2
        assert "unavailable" in _one_line_error(p)


def test_operate_writes_archive_and_plan(gs_run, dead_mlp_files, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import graphsurg as gs

    if not hasattr(gs, "operate"):
        pytest.skip("surgery is not in this build")
    _, npz, _ = dead_mlp_files
    model = "_cli_models:dead_mlp"
    p = gs_run("operate", model, "--data", str(npz), "--loss", "mse", "-o", "out.pt2", "-q")
    assert p.returncode in (0, 1), p.stderr
    assert (tmp_path / "out.plan.json").exists()
    import torch

    m = torch.export.load(str(tmp_path / "out.pt2")).module()
    x = torch.randn(3, 16)
    assert m(x).shape == (3, 4)
    # --dry-run --json: the plan only, nothing written
    p = gs_run("operate", model, "--data", str(npz), "--loss", "mse", "--dry-run", "--json", "-q")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["schemas"]
    # output must be a .pt2 path
    p = gs_run("operate", model, "--data", str(npz), "-o", "out.onnx")
    assert p.returncode == 2 and ".pt2" in _one_line_error(p)


def test_operate_on_a_pt2_archive(gs_run, dead_mlp_files, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """An exported archive has no nn.Linear left; the loader lifts them back so surgery can
    treat the planted units."""
    model, npz, _ = dead_mlp_files
    p = gs_run("operate", str(model), "--data", str(npz), "--loss", "mse", "-o", "op.pt2",
               "--json", "-q")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["verification"] and not out["rolled_back"], out
    assert {v["replacement"] for v in out["verification"]} == {"reinit_dead"}
    import torch

    m = torch.export.load(str(tmp_path / "op.pt2")).module()
    assert m(torch.randn(5, 16)).shape == (5, 4)
