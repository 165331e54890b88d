"""The ONNX adapter: its verbs, what ``observe`` measures (sites, units, weights, float16),
and ``analyze`` as the one diagnosis over it."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from _onnx_helpers import feeds, run_ort
from graphsurg.passes.onnx.adapter import OnnxAdapter
from graphsurg.passes.onnx.target import OnnxTarget
from onnx import TensorProto, helper, numpy_helper

from graphsurg._config import DiagnoseConfig
from graphsurg._ir import IRAdapter
from graphsurg.onnx import analyze

STATS_RTOL = 1e-5  # float32 streaming statistics against a float64 reference


def test_adapter_verbs(exported, tmp_path) -> None:
    src = exported("mlp")
    proto = onnx.load(str(src))
    ser = proto.SerializeToString()
    a, kind = OnnxAdapter.open(src)
    assert kind == "path" and isinstance(a, IRAdapter) and a.ir == "onnx"
    assert not a.capabilities.gradients and not a.capabilities.trainable
    b, kind = OnnxAdapter.open(proto)
    assert kind == "proto" and proto.SerializeToString() == ser
    user = ir.load(src)
    c, kind = OnnxAdapter.open(user)
    assert kind == "ir" and c.model is not user

    batches = feeds("mlp", n=2, rows=8)
    outs = a.run(batches)
    assert len(outs) == 2 and outs[0].shape == (8, 4)
    assert np.array_equal(outs[1], run_ort(src, batches[1])[0])

    snap = a.snapshot()
    w = a.model.graph.initializers["fc1.weight"]
    w.const_value = ir.tensor(np.zeros((32, 16), np.float32), name="fc1.weight")
    assert not np.array_equal(a.run(batches)[0], outs[0])
    a.restore(snap)
    assert np.array_equal(a.run(batches)[0], outs[0])
    a.restore(snap)  # the snapshot stays usable
    assert np.array_equal(a.run(batches)[0], outs[0])

    t = a.target(batches, seed=3)
    assert isinstance(t, OnnxTarget) and t.model is a.model and t.seed == 3

    lo, hi = a.halve(batches[0])  # type: ignore[misc]
    assert lo["x"].shape == (4, 16) and hi["x"].shape == (4, 16)
    assert a.halve({"x": np.zeros((1, 16), np.float32)}) is None

    files = a.save(tmp_path / "out" / "m.onnx", save_external_data=True,
                   external_data_size_threshold=64)
    assert [f.name for f in files] == ["m.onnx", "m.onnx.data"]
    assert sorted(os.listdir(tmp_path / "out")) == ["m.onnx", "m.onnx.data"]  # nothing else
    assert np.array_equal(run_ort(files[0], batches[0])[0], outs[0])
    # re-saving a model loaded from that file over itself keeps its data readable
    d, _ = OnnxAdapter.open(files[0])
    d.save(files[0])
    assert np.array_equal(run_ort(files[0], batches[0])[0], outs[0])


def test_observe_measures_like_torch(exported) -> None:
    a, _ = OnnxAdapter.open(exported("cnn"))
    batches = feeds("cnn", n=3, rows=16)
    cfg = DiagnoseConfig(rank_sample=40)
    m = a.observe(batches, cfg)
    assert m.ir == "onnx" and m.capture == "onnxruntime" and m.batches == 3 and not m.gradients
    relus = [s for s in m.sites if s.op == "relu"]
    assert [s.module for s in relus] == ["/c1/Conv", "/c2/Conv"]
    assert all(s.channel_dim == 1 and s.family == "relu" for s in relus)
    (bare,) = [s for s in m.sites if s.family == "linear"]  # the head Gemm
    assert bare.op == "linear" and bare.module == "/fc/Gemm" and bare.channel_dim == -1
    assert all(s.sample is not None and s.sample.shape[0] == 40 for s in m.sites)
    # the first conv's statistics against a float64 reference over all batches
    ref = np.concatenate([run_ort(_with_output(a, relus[0].node), b)[1]
                          for b in batches]).astype(np.float64)
    mean = ref.mean(axis=(0, 2, 3))
    assert np.allclose(relus[0].stats.mean.double().numpy(), mean, rtol=STATS_RTOL, atol=1e-6)
    assert [(lm.module, lm.kind, lm.d_out, lm.d_in) for lm in m.layers] == [
        ("/c1/Conv", "conv", 8, 3), ("/c2/Conv", "conv", 8, 8), ("/fc/Gemm", "linear", 5, 128)]
    assert m.layers[0].next_modules == ["/c2/Conv"]


def _with_output(a: OnnxAdapter, value: str) -> onnx.ModelProto:
    m = a.model.clone()
    v = next(o for n in m.graph for o in n.outputs if o.name == value)
    m.graph.outputs.append(v)
    return ir.serde.serialize_model(m)


def _fp16_model(clip: tuple[float, float] | None = None) -> onnx.ModelProto:
    """x(fp16) -> MatMul W -> Add b -> Relu (or Clip) -> MatMul V -> y, intermediate values
    untyped; units 0, 3, 5 dead (bias -100)."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((16, 12)) * 0.3).astype(np.float16)
    b = np.full(12, 0.2, np.float16)
    b[[0, 3, 5]] = -100
    v = (rng.standard_normal((12, 4)) * 0.3).astype(np.float16)
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b"),
             numpy_helper.from_array(v, "V")]
    act = helper.make_node("Relu", ["h"], ["a"], name="act")
    if clip is not None:
        inits += [numpy_helper.from_array(np.array(clip[0], np.float16), "lo"),
                  numpy_helper.from_array(np.array(clip[1], np.float16), "hi")]
        act = helper.make_node("Clip", ["h", "lo", "hi"], ["a"], name="act")
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["z"], name="fc1"),
         helper.make_node("Add", ["z", "b"], ["h"], name="fc1_bias"), act,
         helper.make_node("MatMul", ["a", "V"], ["y"], name="fc2")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["n", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["n", 4])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_float16_model_is_observed_in_its_type() -> None:
    proto = _fp16_model()
    onnx.checker.check_model(proto, full_check=True)
    rng = np.random.default_rng(1)
    data = [{"x": rng.standard_normal((32, 16)).astype(np.float16)} for _ in range(2)]
    d = analyze(proto, data)
    (dead,) = d.of_kind("DeadNeurons")
    assert dead.units == (0, 3, 5) and dead.site.module == "fc1" and dead.site.op == "relu"
    assert dead.site.node == "a" and dead.site.ir == "onnx"
    # statistics in float32 from the float16 values onnxruntime computed
    a, _ = OnnxAdapter.open(proto)
    (site,) = [s for s in a.observe(data, DiagnoseConfig()).sites if s.node == "a"]
    ref = np.concatenate([run_ort(_with_output(a, "a"), b)[1] for b in data])
    assert ref.dtype == np.float16
    ref64 = ref.astype(np.float64)
    assert np.allclose(site.stats.mean.double().numpy(), ref64.mean(0), rtol=STATS_RTOL,
                       atol=1e-6)
    assert np.allclose(site.stats.var.double().numpy(), ref64.var(0), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("bounds", "op", "family"), [((0.0, 6.0), "relu6", "relu"),
                                                       ((-1.0, 1.0), "hardtanh", "saturating")])
def test_clip_is_read_from_its_bounds(bounds, op: str, family: str) -> None:
    a, _ = OnnxAdapter.open(_fp16_model(clip=bounds))
    rng = np.random.default_rng(2)
    m = a.observe([{"x": rng.standard_normal((8, 16)).astype(np.float16)}], DiagnoseConfig())
    (site,) = [s for s in m.sites if s.node == "a"]
    assert (site.op, site.family, site.module) == (op, family, "fc1")
    assert (site.saturated_fraction is not None) == (family == "saturating")
    # MatMul's (K, N) weight is oriented like torch's (N, K)
    assert [(lm.module, lm.d_out, lm.d_in) for lm in m.layers] == [("fc1", 12, 16),
                                                                   ("fc2", 4, 12)]


def test_dynamo_export_is_diagnosed(exported) -> None:
    d = analyze(exported("mlp", True), feeds("mlp"))
    assert [p.units for p in d.of_kind("DeadNeurons")] == [tuple(range(0, 32, 2)), (1, 5, 7)]
