"""The torch CLI under hostile and careless input (issue 17): each case is exit 2 with one
line on stderr, every input file byte-for-byte unchanged, no output (or partial output) left,
and for the crafted archives, the payload not run.

Cases run in process through ``graphsurg._cli.main`` (the console script's code path minus
interpreter start-up); one real subprocess checks the same contract end to end.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from graphsurg._cli import main

HERE = Path(__file__).parent


class _Payload:
    """Unpickling this runs ``touch <marker>``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


def _evil_pickle(marker: Path, wrap: Callable[[object], object] = lambda p: (p,)) -> bytes:
    buf = io.BytesIO()
    torch.save(wrap(_Payload(marker)), buf)
    return buf.getvalue()


def _rewrite(src: Path, dst: Path, edits: dict[str, Callable[[bytes], bytes]],
             add: dict[str, bytes] | None = None) -> None:
    """Copy the archive ``src`` to ``dst``, editing entries named relative to its root."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        root = zin.namelist()[0].split("/", 1)[0]
        for info in zin.infolist():
            data = zin.read(info.filename)
            rel = info.filename.split("/", 1)[1]
            zout.writestr(info, edits[rel](data) if rel in edits else data)
        for rel, data in (add or {}).items():
            zout.writestr(f"{root}/{rel}", data)


def _first_weight(src: Path) -> str:
    with zipfile.ZipFile(src) as z:
        root = z.namelist()[0].split("/", 1)[0]
        cfg = json.loads(z.read(f"{root}/data/weights/model_weights_config.json"))
    return "data/weights/" + next(iter(cfg["config"].values()))["path_name"]


def _use_pickle(data: bytes) -> bytes:
    cfg = json.loads(data)
    cfg["config"][next(iter(cfg["config"]))]["use_pickle"] = True
    return json.dumps(cfg).encode()


def _opaque_constant(marker: Path) -> Callable[[bytes], bytes]:
    def edit(data: bytes) -> bytes:
        cfg = json.loads(data)
        cfg["config"]["evil"] = {"path_name": "opaque_obj_0", "is_param": False,
                                 "use_pickle": True, "tensor_meta": None}
        return json.dumps(cfg).encode()
    return edit


def _graph_calls_system(marker: Path) -> Callable[[bytes], bytes]:
    def edit(data: bytes) -> bytes:
        ep = json.loads(data)
        node = ep["graph_module"]["graph"]["nodes"][1]
        node["target"] = "torch.os.system"
        node["inputs"] = [{"name": "command", "arg": {"as_string": f"touch {marker}"},
                           "kind": 1}]
        return json.dumps(ep).encode()
    return edit


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A clean archive and data, plus crafted archives whose pickles would create
    ``<name>.ran`` if anything unpickled them."""
    from graphsurg._zoo import dead_mlp

    d = tmp_path_factory.mktemp("hostile")
    case = dead_mlp(0)
    ep = torch.export.export(case.model, (case.batches[0][0],),
                             dynamic_shapes=({0: torch.export.Dim.AUTO},))
    model = d / "m.pt2"
    torch.export.save(ep, model)
    x = torch.cat([b[0] for b in case.batches[:2]])
    y = torch.cat([b[1] for b in case.batches[:2]])
    np.savez(d / "d.npz", x=x.numpy(), y=y.numpy())
    (d / "notes.txt").write_text("an existing file\n")
    out = {"m.pt2": model, "d.npz": d / "d.npz", "notes.txt": d / "notes.txt"}

    def craft(name: str, edits: dict[str, Callable[[bytes], bytes]],
              add: dict[str, bytes] | None = None) -> None:
        _rewrite(model, d / name, edits, add)
        out[name] = d / name

    m = lambda name: d / f"{name}.ran"  # noqa: E731
    craft("evil_samples.pt2", {"data/sample_inputs/model.pt":
                               lambda _: _evil_pickle(m("evil_samples.pt2"))})
    craft("evil_weights.pt2", {"data/weights/model_weights_config.json": _use_pickle,
                               _first_weight(model):
                               lambda _: _evil_pickle(m("evil_weights.pt2"), lambda p: p)})
    craft("evil_opaque.pt2",
          {"data/constants/model_constants_config.json": _opaque_constant(m("evil_opaque.pt2"))},
          {"data/constants/opaque_obj_0": __import__("pickle").dumps(
              _Payload(m("evil_opaque.pt2")))})
    craft("evil_legacy.pt2", {}, {"data/weights/model.pt": _evil_pickle(m("evil_legacy.pt2"))})
    craft("evil_graph.pt2", {"models/model.json": _graph_calls_system(m("evil_graph.pt2"))})
    craft("evil_aoti.pt2", {}, {"data/aotinductor/model/model.so": b"\x7fELF not really"})
    raw = model.read_bytes()
    (d / "truncated.pt2").write_bytes(raw[: len(raw) // 2])
    (d / "random.pt2").write_bytes(np.random.default_rng(0).bytes(4096))
    out["truncated.pt2"], out["random.pt2"] = d / "truncated.pt2", d / "random.pt2"
    return out


# (case name, argv with {file} placeholders, expected text in the one-line error)
CASES: list[tuple[str, list[str], str]] = [
    # code execution
    ("pickled sample inputs", ["diagnose", "{evil_samples.pt2}", "--data", "{d.npz}"],
     "data/sample_inputs/model.pt"),
    ("use_pickle weights", ["operate", "{evil_weights.pt2}", "--data", "{d.npz}", "-o", "o.pt2"],
     "data/weights/weight_0"),
    ("opaque constant", ["diagnose", "{evil_opaque.pt2}", "--data", "{d.npz}"],
     "opaque Python object"),
    ("legacy pickled weights", ["diagnose", "{evil_legacy.pt2}", "--data", "{d.npz}"],
     "data/weights/model.pt"),
    ("graph calls os.system", ["diagnose", "{evil_graph.pt2}", "--data", "{d.npz}"],
     "system"),
    ("AOTInductor library", ["diagnose", "{evil_aoti.pt2}", "--data", "{d.npz}"],
     "compiled code"),
    # unreadable archives
    ("truncated .pt2", ["diagnose", "{truncated.pt2}", "--data", "{d.npz}"],
     "not a readable torch.export archive"),
    ("random bytes .pt2", ["operate", "{random.pt2}", "--data", "{d.npz}", "-o", "o.pt2"],
     "not a readable torch.export archive"),
    # outputs onto inputs
    ("--report is the model", ["diagnose", "{m.pt2}", "--data", "{d.npz}", "--report",
                               "{m.pt2}"], "is the input"),
    ("--report is an existing file", ["diagnose", "{m.pt2}", "--data", "{d.npz}", "--report",
                                      "{notes.txt}"], "is an existing file"),
    ("operate -o the model", ["operate", "{m.pt2}", "--data", "{d.npz}", "-o", "{m.pt2}"],
     "is the input"),
    ("--report equal to -o", ["operate", "{m.pt2}", "--data", "{d.npz}", "-o", "o.pt2",
                              "--report", "o.pt2"], "is the -o output"),
    ("-o is the data", ["operate", "{m.pt2}", "--data", "{d.npz}", "-o", "{d.npz}"], ".pt2"),
    ("report file is the data", ["diagnose", "{m.pt2}", "--data", "rep/report.json",
                                 "--report", "rep"], "is the input"),
    ("demo -o an existing file", ["demo", "-o", "{notes.txt}"], "is an existing file"),
    # numbers
    ("--batch-size -5", ["diagnose", "{m.pt2}", "--data", "{d.npz}", "--batch-size", "-5"],
     "--batch-size must be >= 1"),
    ("--max-batches 0", ["diagnose", "{m.pt2}", "--data", "{d.npz}", "--max-batches", "0"],
     "--max-batches must be >= 1"),
    ("operate --max-batches 0", ["operate", "{m.pt2}", "--data", "{d.npz}", "-o", "o.pt2",
                                 "--max-batches", "0"], "--max-batches must be >= 1"),
    ("operate --batch-size 0", ["operate", "{m.pt2}", "--data", "{d.npz}", "-o", "o.pt2",
                                "--batch-size", "0"], "--batch-size must be >= 1"),
    ("--threads 0", ["diagnose", "{m.pt2}", "--data", "{d.npz}", "--threads", "0"],
     "--threads must be >= 1"),
]


def _argv(template: list[str], files: dict[str, Path]) -> list[str]:
    return [str(files[a[1:-1]]) if a.startswith("{") else a for a in template]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_hostile_inputs_are_one_line_exit_2_and_touch_nothing(
        files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rep").mkdir()
    (tmp_path / "rep" / "report.json").write_text("{}")  # an input that --report would replace
    inputs = files["m.pt2"].parent
    before_inputs, before_cwd = _snapshot(inputs), _snapshot(tmp_path)
    threads = torch.get_num_threads()
    failures = []
    for name, template, needle in CASES:
        code = main(_argv(template, files))
        err = capsys.readouterr().err.strip()
        ok = (code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
              and needle in err)
        if not ok:
            failures.append(f"{name}: exit {code}, stderr {err[:300]!r}")
        assert _snapshot(inputs) == before_inputs, f"{name}: an input file changed"
        assert _snapshot(tmp_path) == before_cwd, f"{name}: output left behind"
        assert not list(tmp_path.rglob(".graphsurg-*")), f"{name}: partial output left"
    assert torch.get_num_threads() == threads
    assert not failures, "\n".join(failures)
    ran = sorted(p.name for p in inputs.glob("*.ran"))
    assert not ran, f"archive payloads ran: {ran}"


def test_payloads_would_run_under_torch_export_load(files: dict[str, Path]) -> None:
    """The crafted archives are real attacks: torch.export.load itself runs two of them (so the
    test above would catch a loader that went back to it)."""
    import logging

    marker = files["m.pt2"].parent / "evil_samples.pt2.ran"
    logging.disable(logging.WARNING)  # torch logs the fallback with a broken format string
    try:
        torch.export.load(str(files["evil_samples.pt2"]))
        assert marker.exists()
    finally:
        logging.disable(logging.NOTSET)
        marker.unlink(missing_ok=True)


def test_clean_archive_still_loads_and_matches(files: dict[str, Path]) -> None:
    from graphsurg._loaders import load_model
    from graphsurg._pt2 import load_exported

    ours = load_exported(files["m.pt2"])
    theirs = torch.export.load(str(files["m.pt2"]))
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(ours.module()(x), theirs.module()(x))
    assert load_model(str(files["m.pt2"]))(x).shape == (5, 4)


def test_threads_option_sets_torch_threads(files: dict[str, Path], tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []
    import graphsurg._cli as cli

    def spy(args: object) -> int:
        seen.append(torch.get_num_threads())
        return 0

    monkeypatch.setattr(cli, "cmd_diagnose", spy)
    before = torch.get_num_threads()
    try:
        helptext = " ".join(cli.build_parser().format_help().split())
        sub = [a for a in cli.build_parser()._actions if a.dest == "command"][0]
        helptext += " ".join(sub.choices["diagnose"].format_help().split())  # type: ignore[attr-defined]
        assert "--threads N" in helptext and "torch.set_num_threads" in helptext
        args = ["diagnose", str(files["m.pt2"]), "--data", str(files["d.npz"]), "--threads", "2"]
        p = cli.build_parser().parse_args(args)
        assert p.threads == 2
        p.func = spy
        monkeypatch.setattr(cli._Parser, "parse_args", lambda self, argv=None: p)
        assert cli.main(args) == 0
        assert seen == [2]
    finally:
        torch.set_num_threads(before)


def test_subprocess_end_to_end(files: dict[str, Path], tmp_path: Path) -> None:
    """One real process (the console path, logging and warnings as a user sees them): a
    crafted archive is one line, exit 2, the payload not run, nothing written."""
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    before = _snapshot(files["m.pt2"].parent)
    p = subprocess.run([sys.executable, "-m", "graphsurg", "diagnose",
                        str(files["evil_weights.pt2"]), "--data", str(files["d.npz"])],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "weights_only" in p.stderr
    assert _snapshot(files["m.pt2"].parent) == before
    assert not list(files["m.pt2"].parent.glob("*.ran"))
    assert not list(tmp_path.iterdir())


def test_failed_export_is_one_line_without_graph_dump(tmp_path: Path,
                                                      capfd: pytest.CaptureFixture[str]) -> None:
    """torch.export prints the whole graph on stderr when it fails; the CLI's final export
    keeps only its own one-line error and writes neither the archive nor the plan."""
    from graphsurg._cli import _save_pt2
    from graphsurg._errors import GraphsurgError

    class DataDependent(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2 if x.sum() > 0 else x

    out = tmp_path / "o.pt2"
    with pytest.raises(GraphsurgError, match="could not be exported") as e:
        _save_pt2(DataDependent(), torch.randn(4, 3), out, plan=(tmp_path / "o.plan.json", "{}"))
    assert len(str(e.value).splitlines()) == 1
    captured = capfd.readouterr()
    assert captured.err.strip() == "" and captured.out.strip() == "", captured.err[:300]
    assert list(tmp_path.iterdir()) == []
