"""Bad input gets one line naming the problem (OnnxInputError; exit code 2 on the CLI); the
input file is never modified; the output is written atomically or not at all."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from _onnx_helpers import digest, feeds
from onnx import TensorProto, helper, numpy_helper

from graphsurg import _onnx_cli as cli
from graphsurg import onnx as gso


def _one_line(e: pytest.ExceptionInfo[BaseException]) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg
    return msg


def test_not_onnx(tmp_path) -> None:
    p = tmp_path / "model.onnx"
    p.write_text("this is not a model\n" * 20)
    with pytest.raises(gso.OnnxInputError) as e:
        gso.analyze(p, feeds("mlp"))
    assert "not an ONNX model" in _one_line(e)


def test_truncated(exported, tmp_path) -> None:
    data = exported("mlp").read_bytes()
    p = tmp_path / "cut.onnx"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(gso.OnnxInputError) as e:
        gso.apply(p, feeds("mlp"), output=tmp_path / "out.onnx")
    assert "truncated" in _one_line(e) or "not a valid ONNX model" in _one_line(e)
    assert not (tmp_path / "out.onnx").exists()
    assert sorted(os.listdir(tmp_path)) == ["cut.onnx"]


def test_missing_file(tmp_path) -> None:
    with pytest.raises(gso.OnnxInputError, match="does not exist"):
        gso.analyze(tmp_path / "nope.onnx", feeds("mlp"))


def _external(exported, folder: Path, location: str) -> Path:  # type: ignore[no-untyped-def]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "m.onnx"
    onnx.save(onnx.load(str(exported("mlp"))), str(path), save_as_external_data=True,
              location="m.onnx.data", size_threshold=64)  # fmt: skip
    if location != "m.onnx.data":
        proto = onnx.load(str(path), load_external_data=False)
        for t in proto.graph.initializer:
            for kv in t.external_data:
                if kv.key == "location":
                    kv.value = location
        onnx.save(proto, str(path))
    return path


def test_missing_external_data(exported, tmp_path) -> None:
    path = _external(exported, tmp_path / "m", "m.onnx.data")
    (path.parent / "m.onnx.data").unlink()
    with pytest.raises(gso.OnnxInputError) as e:
        gso.analyze(path, feeds("mlp"))
    assert "external data file 'm.onnx.data'" in _one_line(e) and "missing" in _one_line(e)


def test_external_data_outside_folder_is_refused_unread(exported, tmp_path) -> None:
    secret = tmp_path / "secret.data"
    secret.write_bytes(b"\0" * 100_000)
    path = _external(exported, tmp_path / "m", "../secret.data")
    before = secret.stat().st_atime_ns, digest(secret)
    with pytest.raises(gso.OnnxInputError) as e:
        gso.analyze(path, feeds("mlp"))
    assert "outside the model's folder" in _one_line(e)
    assert digest(secret) == before[1]
    path_abs = _external(exported, tmp_path / "n", str(secret))
    with pytest.raises(gso.OnnxInputError, match="absolute path"):
        gso.analyze(path_abs, feeds("mlp"))


def _custom_model() -> onnx.ModelProto:
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "W")
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
         helper.make_node("Frobnicate", ["h"], ["y"], name="custom", domain="my.ops")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
        [w],
    )  # fmt: skip
    return helper.make_model(
        g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("my.ops", 1)]
    )


def test_custom_domain(tmp_path) -> None:
    proto = _custom_model()
    data = [{"x": np.ones((2, 4), np.float32)}]
    with pytest.raises(gso.OnnxInputError) as e:  # onnxruntime cannot run it: named
        gso.analyze(proto, data)
    assert "my.ops::Frobnicate" in _one_line(e)
    # without running it (a diagnosis, no data), the op is left untouched and reported
    from graphsurg import Diagnosis

    out, res = gso.apply(proto, Diagnosis(capture="onnxruntime"), full_check=False)
    assert [n.op_type for n in out.graph.node] == ["MatMul", "Frobnicate"]
    assert any("my.ops::Frobnicate ('custom')" in n for n in res.notes)


@pytest.mark.parametrize(
    ("feed", "match"),
    [
        ({"input": np.zeros((4, 16), np.float32)}, "does not match the model's inputs"),
        ({"x": np.zeros((4, 15), np.float32)}, r"expects \(batch, 16\) \(dimension 1"),
        ({"x": np.zeros((4, 16, 1), np.float32)}, "expects rank 2"),
        ({"x": np.zeros((4, 16), np.complex64)}, "dtype complex64"),
    ],
)
def test_mismatched_calibration_data(exported, feed, match: str) -> None:
    with pytest.raises(gso.OnnxInputError, match=match):
        gso.analyze(exported("mlp"), [feed])


def test_bad_pass_name(exported) -> None:
    with pytest.raises(gso.OnnxInputError, match="unknown pass.*available: .*excise_dead"):
        gso.apply(onnx.load(str(exported("mlp"))), feeds("mlp"), ["fold_everything"])


# -- CLI -------------------------------------------------------------------------------------
def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "graphsurg", "onnx", *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_cli_exit_codes(exported, tmp_path, capsys) -> None:
    src = exported("mlp")
    before = digest(src)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal((512, 16)).astype(np.float32))
    out = tmp_path / "out.onnx"

    def run(*args: str) -> int:
        import argparse

        parser = argparse.ArgumentParser()
        cli.add_parser(parser.add_subparsers(dest="command"))
        return cli.run(parser.parse_args(["onnx", *args]))

    assert run("list-passes") == 0
    listed = capsys.readouterr().out
    assert "excise_dead" in listed and "(exact)" in listed and "(bounded)" in listed
    assert run("analyze", str(src), "--data", str(calib), "--json", str(tmp_path / "d.json")) == 0
    assert "DeadNeurons" in capsys.readouterr().out
    assert run("apply", str(src), "-o", str(out), "--data", str(calib), "-p",
               "excise_dead", "--report", str(tmp_path / "r.json")) == 0  # fmt: skip
    assert out.exists() and digest(src) == before
    # a non-exact pass without an opt-in: bad input -> 2 (deployment runs are exact)
    assert run("apply", str(exported("dying")), "-o", str(tmp_path / "d.onnx"), "--data",
               str(calib), "-p", "activation_swap") == 2  # fmt: skip
    assert "--allow-inexact" in capsys.readouterr().err
    # a non-exact pass with an impossible bound: certificates not met -> 1
    assert run("apply", str(exported("dying")), "-o", str(tmp_path / "d.onnx"), "--data",
               str(calib), "-p", "activation_swap", "--max-output-change", "0") == 1  # fmt: skip
    capsys.readouterr()
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage")
    assert run("apply", str(bad), "-o", str(tmp_path / "x.onnx"), "--data", str(calib)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "graphsurg onnx: error:" in err
    assert not (tmp_path / "x.onnx").exists()


def test_cli_standalone_module(tmp_path) -> None:
    r = _cli("analyze", str(tmp_path / "missing.onnx"), "--data", str(tmp_path / "c.npz"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "does not exist" in r.stderr
