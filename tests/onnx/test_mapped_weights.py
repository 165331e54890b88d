"""A large model file is read without copying its weights (issue 15, "the model memory-mapped
or loaded once"): every inline ``raw_data`` becomes a reference into the file itself, which
onnx-ir memory-maps on use. The thresholds are lowered here so a small model takes that path.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from _onnx_helpers import run_ort
from graphsurg.passes.onnx import _common
from graphsurg.passes.onnx._common import OnnxInputError, has_external_tensors, load_model
from onnx import TensorProto, helper, numpy_helper

from graphsurg import onnx as gso

DEAD = [0, 3, 5]
#: onnxruntime float32 outputs after an exact excision: equal up to summation order
EXACT = 1e-5


@pytest.fixture
def mapped(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every model file counts as large and every weight of 20 bytes or more is mapped."""
    monkeypatch.setattr(_common, "SMALL_PROTO_BYTES", 0)
    monkeypatch.setattr(_common, "_MAP_MIN_BYTES", 20)


def _mlp() -> onnx.ModelProto:
    """x(n, 16) -> Gemm -> Relu -> Gemm -> y(n, 4); hidden units DEAD dead (bias -100)."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((12, 16)) * 0.3).astype(np.float32)
    b = np.full(12, 0.2, np.float32)
    b[DEAD] = -100.0
    v = (rng.standard_normal((4, 12)) * 0.3).astype(np.float32)
    c = np.full(4, 0.5, np.float32)  # 16 bytes: stays inline (mapped at 16)
    nodes = [helper.make_node("Gemm", ["x", "W", "b"], ["h"], name="fc1", transB=1),
             helper.make_node("Relu", ["h"], ["a"], name="act"),
             helper.make_node("Gemm", ["a", "V"], ["y0"], name="fc2", transB=1),
             helper.make_node("Add", ["y0", "c"], ["y"], name="shift")]
    inits = [numpy_helper.from_array(a, n) for n, a in (("W", w), ("b", b), ("V", v), ("c", c))]
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", 1, ["n", 16])],
                          [helper.make_tensor_value_info("y", 1, ["n", 4])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _data(n: int = 4, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((32, 16)).astype(np.float32)} for _ in range(n)]


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_weights_are_read_in_place_and_equal(tmp_path: Path, mapped: None) -> None:
    proto = _mlp()
    path = tmp_path / "m.onnx"
    onnx.save(proto, str(path))
    read, names = _common._read_weights_mapped(path)  # type: ignore[misc]
    assert names == {"W", "b", "V"}  # "c" (16 bytes) stays inline
    onnx.external_data_helper.load_external_data_for_model(read, str(tmp_path))
    want = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    got = {t.name: numpy_helper.to_array(t) for t in read.graph.initializer}
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    assert read.graph.node == proto.graph.node

    model, kind = load_model(path)
    assert kind == "path"
    for name in ("W", "b", "V"):
        t = model.graph.initializers[name].const_value
        assert isinstance(t, ir.ExternalTensor) and Path(t.path) == path
        np.testing.assert_array_equal(t.numpy(), want[name])
    assert not has_external_tensors(model)  # the user's model has no external data


def test_apply_on_a_mapped_model_writes_a_self_contained_exact_result(
        tmp_path: Path, mapped: None) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(_mlp(), str(path))
    before = _sha(path)
    out = tmp_path / "out.onnx"
    got, result = gso.apply(path, _data(), output=out)
    assert Path(got) == out and result.ok, result.summary()
    assert result.size["params_after"] < result.size["params_before"]  # units excised
    assert _sha(path) == before  # the input is untouched
    assert not out.with_name("out.onnx.data").exists()  # self-contained, as the input was
    small = onnx.load(str(out))
    assert all(t.data_location != TensorProto.EXTERNAL for t in small.graph.initializer)
    for feed in _data(2, seed=7):
        (a,), (b,) = run_ort(path, feed), run_ort(small, feed)
        np.testing.assert_allclose(b, a, rtol=EXACT, atol=EXACT)


def test_mixed_inline_and_external_data_stays_external(tmp_path: Path, mapped: None) -> None:
    proto = _mlp()
    path = tmp_path / "m.onnx"
    onnx.external_data_helper.convert_model_to_external_data(
        proto, all_tensors_to_one_file=True, location="m.onnx.bin", size_threshold=700)
    onnx.save(proto, str(path))  # W (768 bytes) in m.onnx.bin, the rest inline
    model, _ = load_model(path)
    w = model.graph.initializers["W"].const_value
    v = model.graph.initializers["V"].const_value
    assert isinstance(w, ir.ExternalTensor) and Path(w.path).name == "m.onnx.bin"
    assert isinstance(v, ir.ExternalTensor) and Path(v.path) == path
    assert has_external_tensors(model)  # W is the user's external data
    out = tmp_path / "out.onnx"
    gso.apply(path, _data(), output=out)
    assert out.with_name("out.onnx.data").exists()  # written with external data, as it came


def test_a_truncated_large_file_is_one_line(tmp_path: Path, mapped: None) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(_mlp(), str(path))
    data = path.read_bytes()
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(data[: len(data) - 40])
    with pytest.raises(OnnxInputError) as e:
        load_model(bad)
    msg = str(e.value)
    assert "\n" not in msg and "bad.onnx" in msg


def test_sessions_read_the_models_own_weights(tmp_path: Path, mapped: None) -> None:
    """onnxruntime is fed the model's arrays (the mapped file's pages) on every run instead
    of being handed initializers it would copy; its outputs are the plain session's."""
    path = tmp_path / "m.onnx"
    onnx.save(_mlp(), str(path))
    model, _ = load_model(path)
    sess = _common.ort_session(model)
    assert [i.name for i in sess.get_inputs()] == ["x"]  # the weights are not the user's inputs
    assert set(sess.weights) == {"W", "b", "V"}
    for name, arr in sess.weights.items():
        assert np.shares_memory(arr, model.graph.initializers[name].const_value.numpy())
    for feed in _data(2, seed=3):
        (got,), (want,) = sess.run(None, feed), run_ort(path, feed)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_a_mapped_model_saved_with_external_data(tmp_path: Path, mapped: None,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """``--save-external-data`` on a mapped model: onnx-ir would copy the mapped tensors
    (another file's external data to it) and close their map under the session's arrays."""
    monkeypatch.setattr(_common, "_MAP_MIN_BYTES", 16)  # "c" too: a mapped tensor the excision leaves alone
    path = tmp_path / "m.onnx"
    onnx.save(_mlp(), str(path))
    out = tmp_path / "elsewhere" / "out.onnx"  # another folder: onnx-ir moves the data
    gso.apply(path, _data(), output=out, save_external_data=True,
              external_data_size_threshold=16)
    assert out.with_name("out.onnx.data").exists()
    for feed in _data(2, seed=5):
        (a,), (b,) = run_ort(path, feed), run_ort(out, feed)
        np.testing.assert_allclose(b, a, rtol=EXACT, atol=EXACT)


def test_a_mapped_model_file_is_not_external_data_to_the_output(tmp_path: Path,
                                                                mapped: None) -> None:
    """The output of a mapped model is self-contained, so no ``<output>.data`` is written and
    the input (here named like one) is not in its way; the input stays byte-identical."""
    path = tmp_path / "out.onnx.data"
    onnx.save(_mlp(), str(path))
    before = _sha(path)
    out = tmp_path / "out.onnx"
    gso.apply(path, _data(), output=out)
    assert _sha(path) == before and onnx.load(str(out)).graph.node
