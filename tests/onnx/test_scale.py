"""Real-size plumbing of the ONNX adapter (issue 15): external data end to end, bfloat16
weights, the streamed self-contained save, the weights shared with the detectors, and the
rank certificate that spares the eigensolver."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from _onnx_helpers import run_ort
from graphsurg.passes.onnx._common import load_model, write_self_contained
from graphsurg.passes.onnx.observe import weight_tensor
from onnx import TensorProto, helper, numpy_helper

from graphsurg import onnx as gso
from graphsurg.detect.bottleneck import rank_certified, rows_certified, weight_ranks

DEAD = [0, 3, 5]
#: onnxruntime float32 outputs after an exact excision: equal up to summation order
EXACT = 1e-5


def _mlp(store: int = TensorProto.FLOAT) -> onnx.ModelProto:
    """x(n, 16) -> MatMul W -> Add b -> Relu -> MatMul V -> y(n, 4); units DEAD of the hidden
    layer dead (bias -100). With ``store=BFLOAT16`` the weights are stored in bfloat16 and
    Cast to float32 where used (how bf16 checkpoints run on CPU)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 12)) * 0.3
    b = np.full(12, 0.2)
    b[DEAD] = -100.0
    v = rng.standard_normal((12, 4)) * 0.3
    nodes = []
    inits = []
    names = {}
    for name, a in (("W", w), ("b", b), ("V", v)):
        if store == TensorProto.BFLOAT16:
            bf = a.astype(ml_dtypes.bfloat16)
            inits.append(helper.make_tensor(name, TensorProto.BFLOAT16, bf.shape,
                                            bf.view(np.uint16).tobytes(), raw=True))
            nodes.append(helper.make_node("Cast", [name], [name + "_f"], to=TensorProto.FLOAT))
            names[name] = name + "_f"
        else:
            inits.append(numpy_helper.from_array(a.astype(np.float32), name))
            names[name] = name
    nodes += [helper.make_node("MatMul", ["x", names["W"]], ["z"], name="fc1"),
              helper.make_node("Add", ["z", names["b"]], ["h"], name="fc1_bias"),
              helper.make_node("Relu", ["h"], ["a"], name="act"),
              helper.make_node("MatMul", ["a", names["V"]], ["y"], name="fc2")]
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", 1, ["n", 16])],
                          [helper.make_tensor_value_info("y", 1, ["n", 4])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _data(n: int = 4, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((32, 16)).astype(np.float32)} for _ in range(n)]


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir()) if p.is_file()}


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    ref = b.astype(np.float64)
    return float(np.abs(a.astype(np.float64) - ref).max()) <= EXACT * max(
        float(np.abs(ref).max()), 1e-12)


def test_external_data_model_through_analyze_and_apply(tmp_path: Path) -> None:
    """A model whose weights live in external data (threshold lowered to 64 bytes: the same
    code path as a model over 2 GB) is analyzed, excised and written with external data to a
    new path; the input files are untouched and the outputs equal."""
    src = tmp_path / "in"
    src.mkdir()
    path = src / "m.onnx"
    onnx.save(_mlp(), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="m.onnx.data", size_threshold=64)
    on_disk = onnx.load(str(path), load_external_data=False)
    assert {"W", "V"} <= {t.name for t in on_disk.graph.initializer
                          if t.data_location == TensorProto.EXTERNAL}
    before = _digests(src)
    data = _data()

    (dead,) = gso.analyze(path, data).of_kind("DeadNeurons")
    assert list(dead.units) == DEAD and dead.site.module == "fc1"

    out = tmp_path / "out" / "small.onnx"
    out.parent.mkdir()
    written, result = gso.apply(path, data, output=out, external_data_size_threshold=64)
    assert Path(written) == out and result.ok, result.summary()
    assert result.size["params_before"] == 16 * 12 + 12 + 12 * 4
    assert result.size["params_after"] == 16 * 9 + 9 + 9 * 4
    assert _digests(src) == before  # the input model and its data file are untouched
    assert sorted(p.name for p in out.parent.iterdir()) == ["small.onnx", "small.onnx.data"]
    saved = onnx.load(str(out), load_external_data=False)
    ext = [t for t in saved.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    assert ext and all({e.key: e.value for e in t.external_data}["location"]
                       == "small.onnx.data" for t in ext)
    onnx.checker.check_model(str(out), full_check=True)
    for feed in _data(2, seed=7):
        (y0,), (y1,) = run_ort(path, feed), run_ort(out, feed)
        assert _close(y1, y0)


def test_bfloat16_weights_analyzed_and_excised() -> None:
    """bfloat16-stored weights (Cast to float32 where used): counted, their dead units found
    with statistics in float32, excised exactly."""
    proto = _mlp(TensorProto.BFLOAT16)
    onnx.checker.check_model(proto, full_check=True)
    data = _data()
    (dead,) = gso.analyze(proto, data).of_kind("DeadNeurons")
    assert list(dead.units) == DEAD and dead.site.module == "fc1"
    out, result = gso.apply(proto, data)
    assert result.ok, result.summary()
    assert result.size["params_before"] == 16 * 12 + 12 + 12 * 4
    assert result.size["params_after"] == 16 * 9 + 9 + 9 * 4
    for feed in _data(2, seed=7):
        (y0,), (y1,) = run_ort(proto, feed), run_ort(out, feed)
        assert _close(y1, y0)


def test_bfloat16_weight_reaches_the_detectors_without_a_copy() -> None:
    rng = np.random.default_rng(0)
    a = (rng.standard_normal((8, 6))).astype(ml_dtypes.bfloat16)
    t = weight_tensor(a.T)  # a transposed view, as a MatMul weight is oriented
    assert t.dtype == torch.bfloat16 and tuple(t.shape) == (6, 8)
    assert np.array_equal(t.double().numpy(), a.T.astype(np.float64))
    f = rng.standard_normal((5, 3)).astype(np.float32)
    f.setflags(write=False)  # memory-mapped external data is read-only
    tf = weight_tensor(f)
    assert tf.data_ptr() == f.ctypes.data  # shared, not copied
    assert np.array_equal(tf.double().numpy(), f.astype(np.float64))


@pytest.mark.parametrize("ir_version", [3, 9])
def test_streamed_save_is_what_ir_save_writes(tmp_path: Path, ir_version: int) -> None:
    """The streamed self-contained file parses to the same model as ``ir.save``'s (weights
    of every size and type, IR < 4 initializers listed as inputs)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "w"),
             numpy_helper.from_array(np.arange(3, dtype=np.int64), "small"),
             numpy_helper.from_array(rng.standard_normal(700).astype(np.float16), "h"),
             numpy_helper.from_array(rng.integers(0, 2, 2000).astype(bool), "mask")]
    as_inputs = [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                 for t in inits] if ir_version < 4 else []  # IR < 4: initializers are inputs
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", 1, ["n", 64]), *as_inputs],
                          [helper.make_tensor_value_info("y", 1, ["n", 64])], inits)
    p = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17 if ir_version > 3
                                                                    else 8)])
    p.ir_version = ir_version
    m, _ = load_model(p)
    write_self_contained(m, tmp_path / "a.onnx")
    from graphsurg.passes.onnx._common import initializers_as_inputs

    with initializers_as_inputs(m):
        ir.save(m, tmp_path / "b.onnx")
    a, b = onnx.load(str(tmp_path / "a.onnx")), onnx.load(str(tmp_path / "b.onnx"))
    assert a == b  # every field, every initializer's bytes, in the same order
    assert (tmp_path / "a.onnx").stat().st_size == (tmp_path / "b.onnx").stat().st_size


def test_rows_certificate_is_sound_and_spares_the_eigensolver() -> None:
    """rows_certified never claims more rank than the SVD counts, and certifies full-rank
    random and (near-)orthogonal weights; low-rank ones fall through."""
    g = torch.Generator().manual_seed(0)
    for shape in [(64, 64), (256, 64), (64, 256)]:
        w = torch.randn(shape, generator=g)
        k = math.ceil(0.5 * min(shape))
        assert rows_certified(w, k, None)
        assert rank_certified(w, k, None)
        q, _ = torch.linalg.qr(torch.randn(max(shape), max(shape), generator=g))
        assert rows_certified(q[: shape[0], : shape[1]], k, None)
    for r in (1, 5, 31):
        low = torch.randn(64, r, generator=g) @ torch.randn(r, 96, generator=g)
        exact = weight_ranks(low, None)[0]
        for k in (r, r + 1, 32):
            if rows_certified(low, k, None):
                assert exact >= k
        assert not rows_certified(low, r + 1, None)
    # a weight whose first rows are dead (zero) is not certified from them: the fallback
    # certificates still see the rest
    w = torch.randn(64, 64, generator=g)
    w[:32] = 0.0
    assert not rows_certified(w, 32, None)
    assert weight_ranks(w, None)[0] == 32
