"""Issue 17's ONNX bad input: each case is a one-line error and exit 2 on the command line
(OnnxInputError in the API), every input file's bytes are unchanged and no output (partial
or whole) is left; all-NaN data never passes verification. Ends with a property-based test of
that contract over small models, calibration arrays and output paths."""

from __future__ import annotations

import hashlib
import io
import re
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from test_onnx_inputs import _feed, paddle_style

from graphsurg import onnx as gso
from graphsurg._cli import main


def _files(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def bad_input(folder: Path, capsys: pytest.CaptureFixture[str], *argv: str,
              match: str) -> str:
    """Run ``graphsurg onnx *argv`` in process: exit 2, one line on stderr matching
    ``match``, every file in ``folder`` unchanged and nothing new there."""
    before = _files(folder)
    capsys.readouterr()
    code = main(["onnx", *argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "error:" in err, err
    assert "internal error" not in err and "Traceback" not in err
    assert re.search(match, err), err
    assert _files(folder) == before  # inputs unchanged, no output, no temporary left
    return err


def _save(m: onnx.ModelProto, path: Path) -> Path:
    onnx.save(m, str(path))
    return path


def _npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


# -- onnxruntime fails on the calibration data -------------------------------------------------
def _reshape_model() -> onnx.ModelProto:
    """x (N, 8) -> Reshape(-1, 5) -> Relu: fails at run time unless 8N is a multiple of 5."""
    g = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["r"]),
         helper.make_node("Relu", ["r"], ["y"])], "reshape",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", 5])],
        [numpy_helper.from_array(np.array([-1, 5], np.int64), "shape")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)])


def _gather_model() -> onnx.ModelProto:
    """idx (N,) int64 -> Gather from a 10-row table -> Relu: an index >= 10 fails."""
    table = np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("Gather", ["table", "idx"], ["e"], axis=0),
         helper.make_node("Relu", ["e"], ["y"])], "gather",
        [helper.make_tensor_value_info("idx", TensorProto.INT64, ["N"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(table, "table")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)])


@pytest.mark.parametrize("command", ["analyze", "apply"])
def test_onnxruntime_failure_on_the_data(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         command: str) -> None:
    out = ["-o", str(tmp_path / "out.onnx")] if command == "apply" else []
    m = _save(_reshape_model(), tmp_path / "reshape.onnx")
    calib = _npz(tmp_path / "c.npz", x=np.ones((4, 8), np.float32))
    bad_input(tmp_path, capsys, command, str(m), "--data", str(calib), *out,
              match=r"onnxruntime failed on calibration batch 0 \(x\(\d+, 8\)\): .*Reshape")
    m = _save(_gather_model(), tmp_path / "gather.onnx")
    calib = _npz(tmp_path / "i.npz", idx=np.array([1, 2, 30], np.int64))
    bad_input(tmp_path, capsys, command, str(m), "--data", str(calib), *out,
              match=r"onnxruntime failed on calibration batch 0 .*idx")
    with pytest.raises(gso.OnnxInputError, match="onnxruntime failed"):
        gso.analyze(m, {"idx": np.array([11], np.int64)})


# -- external data -----------------------------------------------------------------------------
@pytest.mark.parametrize(("key", "value"), [("offset", "-8"), ("length", "-1"),
                                            ("offset", "abc"), ("length", "1.5")])
def test_external_data_offset_length(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                     key: str, value: str) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(paddle_style(), str(path))
    m = onnx.load(str(path))
    w = numpy_helper.from_array(np.ones((8, 6), np.float32), "w_ext")
    m.graph.initializer.append(w)
    onnx.save(m, str(path), save_as_external_data=True, location="m.onnx.data",
              size_threshold=0)
    proto = onnx.load(str(path), load_external_data=False)
    t = next(t for t in proto.graph.initializer if t.name == "w_ext")
    entries = {e.key: e for e in t.external_data}
    if key in entries:
        entries[key].value = value
    else:
        t.external_data.add(key=key, value=value)
    path.write_bytes(proto.SerializeToString())
    calib = _npz(tmp_path / "c.npz", **_feed(4, 0))
    bad_input(tmp_path, capsys, "apply", str(path), "-o", str(tmp_path / "o.onnx"), "--data",
              str(calib), match=rf"external-data {key} '{value}', not a non-negative integer"
              if not value.lstrip("-").isdigit() or value.startswith("-") else key)


# -- calibration arrays and options ------------------------------------------------------------
def test_zero_d_array_where_a_batch_is_needed(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    m = _save(paddle_style(), tmp_path / "m.onnx")
    f = _feed(4, 0)
    calib = _npz(tmp_path / "c.npz", x=np.float32(1.0), state=f["state"], scale=f["scale"])
    bad_input(tmp_path, capsys, "analyze", str(m), "--data", str(calib),
              match=r"input 'x' is 0-d \(a scalar\) but the model expects rank 2 \(-1, 8\); "
                    "give it its batch dimension")
    with pytest.raises(gso.OnnxInputError, match=r"'x' is 0-d \(a scalar\)"):
        gso.analyze(m, {"x": np.float32(1.0), "state": f["state"], "scale": f["scale"]})


@pytest.mark.parametrize(("command", "option"), [
    ("analyze", ("--max-batches", "0")), ("analyze", ("--batch-size", "-5")),
    ("analyze", ("--batch-size", "0")), ("apply", ("--batch-size", "-5")),
    ("apply", ("--batch-size", "0"))])
def test_batch_options_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                               command: str, option: tuple[str, str]) -> None:
    m = _save(paddle_style(), tmp_path / "m.onnx")
    calib = _npz(tmp_path / "c.npz", **_feed(8, 0))
    out = ["-o", str(tmp_path / "out.onnx")] if command == "apply" else []
    bad_input(tmp_path, capsys, command, str(m), "--data", str(calib), *out, *option,
              match=r"must be a positive integer")


def test_npz_over_the_cap_is_refused_unread(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    m = _save(paddle_style(), tmp_path / "m.onnx")
    f = _feed(4, 0)
    calib = tmp_path / "bomb.npz"
    hdr = io.BytesIO()
    np.lib.format.write_array_header_2_0(
        hdr, {"descr": "<f4", "fortran_order": False, "shape": (2**28, 8)})  # 8 GiB
    with zipfile.ZipFile(calib, "w", zipfile.ZIP_DEFLATED) as z:
        with z.open("x.npy", "w", force_zip64=True) as fh:
            fh.write(hdr.getvalue())
            fh.write(bytes(1 << 20))
        for k in ("state", "scale"):
            buf = io.BytesIO()
            np.save(buf, f[k])
            z.writestr(f"{k}.npy", buf.getvalue())
    assert calib.stat().st_size < 100_000
    bad_input(tmp_path, capsys, "analyze", str(m), "--data", str(calib),
              match=r"array 'x' \(268435456, 8\) float32 decompresses to 8 GiB, over the 4 GiB")
    monkeypatch.setenv("GRAPHSURG_MAX_ARRAY_GIB", "1e-7")  # a small cap: a tiny file too
    small = _npz(tmp_path / "small.npz", **_feed(64, 0))
    bad_input(tmp_path, capsys, "apply", str(m), "-o", str(tmp_path / "o.onnx"), "--data",
              str(small), match=r"array '(x|state)'.*GRAPHSURG_MAX_ARRAY_GIB")


def test_all_nan_data_is_refused_and_nan_outputs_fail_verification(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    m = _save(paddle_style(), tmp_path / "m.onnx")
    nan = {k: np.full_like(v, np.nan) for k, v in _feed(8, 0).items()}
    bad_input(tmp_path, capsys, "apply", str(m), "-o", str(tmp_path / "o.onnx"), "--data",
              str(_npz(tmp_path / "nan.npz", **nan)), match="entirely NaN/inf")
    # finite activations, but every output NaN (the state is NaN): no finite reference, so
    # nothing can be verified -- the edits are rolled back, never "certificates met"
    feeds = [{**_feed(16, s), "state": np.full((2, 16, 3), np.nan, np.float32)}
             for s in range(4)]
    _, res = gso.apply(m, feeds, output=tmp_path / "o.onnx")
    assert not res.ok and res.rolled_back
    assert all("output change" in r["reason"] for r in res.rolled_back)
    capsys.readouterr()
    code = main(["onnx", "apply", str(m), "-o", str(tmp_path / "o2.onnx"), "--batch-size", "16",
                 "--data", str(_npz(tmp_path / "s.npz", **{**_feed(64, 0), "state": np.full(
                     (2, 64, 3), np.nan, np.float32)}))])
    printed = capsys.readouterr().out
    assert code == 1 and "ROLLED BACK" in printed, printed


# -- an IR 3 (opset 7) model -------------------------------------------------------------------
def _ir3_model() -> onnx.ModelProto:
    """Gemm + Relu + Gemm at opset 7, IR 3: initializers are also graph inputs."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((6, 8)).astype(np.float32)
    b1 = rng.standard_normal(6).astype(np.float32)
    w1[2], b1[2] = 0.0, -3.0  # unit 2 dead
    w2 = rng.standard_normal((3, 6)).astype(np.float32)
    b2 = np.zeros(3, np.float32)
    inits = [numpy_helper.from_array(a, n)
             for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))]
    g = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w1", "b1"], ["h0"], transB=1, name="fc1"),
         helper.make_node("Relu", ["h0"], ["h"], name="relu"),
         helper.make_node("Gemm", ["h", "w2", "b2"], ["y"], transB=1, name="fc2")], "ir3",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8]),
         *[helper.make_tensor_value_info(t.name, TensorProto.FLOAT, list(t.dims))
           for t in inits]],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 7)], ir_version=3)
    onnx.checker.check_model(m, full_check=True)
    return m


def test_ir3_model_new_initializers_are_graph_inputs(tmp_path: Path) -> None:
    m = _save(_ir3_model(), tmp_path / "m.onnx")
    before = m.read_bytes()
    rng = np.random.default_rng(1)
    feeds = [{"x": rng.standard_normal((16, 8)).astype(np.float32)} for _ in range(4)]
    out, res = gso.apply(m, feeds, output=tmp_path / "o.onnx")
    assert m.read_bytes() == before
    saved = onnx.load(str(out))
    onnx.checker.check_model(saved, full_check=True)
    assert saved.ir_version == 3
    inputs = {i.name for i in saved.graph.input}
    assert {t.name for t in saved.graph.initializer} <= inputs
    assert res.size["params_after"] < res.size["params_before"]  # the dead unit is gone
    import onnxruntime as ort

    x = rng.standard_normal((5, 8)).astype(np.float32)
    a = ort.InferenceSession(str(m), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    b = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(b[0], a[0], rtol=1e-5, atol=1e-6)  # float32 round-off


# -- the contract, property-based --------------------------------------------------------------
_DTYPES = [np.float32, np.float64, np.float16, np.int64, np.bool_, np.complex64]


@st.composite
def _case(draw: st.DrawFn) -> tuple[onnx.ModelProto, dict[str, np.ndarray], str, int]:
    dim = draw(st.sampled_from([-1, 0, "N", None, 4]))
    model = paddle_style(dim)
    n = draw(st.integers(1, 9))
    arrays = _feed(n, draw(st.integers(0, 3)))
    for name in list(arrays):
        how = draw(st.sampled_from(["ok", "ok", "ok", "dtype", "rank", "dim", "zero_d",
                                    "nan_some", "nan_all", "missing"]))
        a = arrays[name]
        if how == "dtype":
            a = a.astype(draw(st.sampled_from(_DTYPES)))
        elif how == "rank":
            a = a[None] if a.ndim else a.reshape(1)
        elif how == "dim" and a.ndim:
            a = np.concatenate([a, a[..., :1]], axis=-1)
        elif how == "zero_d":
            a = np.asarray(a.reshape(-1)[0] if a.size else 0.0, np.float32)
        elif how == "nan_some" and a.size:
            a = a.copy()
            a.reshape(-1)[0] = np.nan
        elif how == "nan_all":
            a = np.full_like(a, np.nan)
        elif how == "missing":
            del arrays[name]
            continue
        arrays[name] = a
    output = draw(st.sampled_from(["fresh", "model", "calib", "no_dir", "analyze"]))
    return model, arrays, output, draw(st.sampled_from([1, 3, 64, -5]))


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow])
@given(case=_case())
def test_contract_on_generated_inputs(tmp_path_factory: pytest.TempPathFactory,
                                      capsys: pytest.CaptureFixture[str],
                                      case: tuple[onnx.ModelProto, dict[str, np.ndarray], str, int]
                                      ) -> None:
    model, arrays, output, batch_size = case
    folder = tmp_path_factory.mktemp("case")
    m = _save(model, folder / "m.onnx")
    calib = _npz(folder / "c.npz", **arrays)
    out = {"fresh": folder / "out.onnx", "model": m, "calib": calib,
           "no_dir": folder / "nowhere" / "out.onnx", "analyze": None}[output]
    argv = ["analyze", str(m)] if out is None else ["apply", str(m), "-o", str(out)]
    argv += ["--data", str(calib), "--batch-size", str(batch_size)]
    before = _files(folder)
    capsys.readouterr()
    code = main(["onnx", *argv])
    cap = capsys.readouterr()
    assert code in (0, 1, 2), cap.err
    assert "internal error" not in cap.err and "Traceback" not in cap.err
    after = _files(folder)
    for name, digest in before.items():  # every input unchanged
        assert after.get(name) == digest, (name, cap.err)
    new = set(after) - set(before)
    if code == 2:
        assert cap.err.count("\n") == 1, cap.err
        assert not new, new  # no partial output
    else:
        assert new <= {"out.onnx", "out.onnx.data", "nowhere/out.onnx"}, new
        if out is not None:
            onnx.checker.check_model(onnx.load(str(out)), full_check=True)


def test_output_beside_an_input_whose_data_file_it_would_replace(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``m.onnx`` keeps its tensors in ``out.onnx.data``; writing ``-o out.onnx`` would
    replace that file (an output's data file is ``<output>.data``) and leave the input
    pointing at the new bytes. Before: exit 0 and the input's data replaced."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4])
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 4))
                                .astype(np.float32), "w")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["h"]),
                           helper.make_node("Relu", ["h"], ["y"])], "g", [x], [y], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(m, str(tmp_path / "m.onnx"), save_as_external_data=True,
              location="out.onnx.data", size_threshold=0)
    _npz(tmp_path / "c.npz", x=np.random.default_rng(1).standard_normal((32, 8))
         .astype(np.float32))
    bad_input(tmp_path, capsys, "apply", str(tmp_path / "m.onnx"), "--data",
              str(tmp_path / "c.npz"), "-o", str(tmp_path / "out.onnx"),
              match="out.onnx.data is the input")
