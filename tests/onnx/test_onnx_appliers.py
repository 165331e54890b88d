"""The library's ONNX appliers, one site at a time (``Replacement.apply`` on an
``OnnxTarget``): rewrite count, op types, onnxruntime numerics within 1e-5 relative,
``full_check``, and the reason of each refusal. Problems are built here from onnxruntime
outputs (an independent reference), not from graphsurg's own diagnosis."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from _onnx_helpers import EXPORTERS, assert_same_outputs, feeds, full_check, op_types
from _onnx_models import LowRank, export
from graphsurg.passes.onnx.target import OnnxTarget

import graphsurg as gs
from graphsurg._activations import ONNX_OPS
from graphsurg._problems import Problem, Site
from graphsurg.library import Refused

# Excision removes terms that are exactly c * w from float32 sums and folds them into the
# bias; factoring drops singular values below the float32 rank tolerance: both differ from
# the original by float32 round-off only.
EXACT_RTOL = 1e-5


def _producer(v: ir.Value) -> str:
    node = v.producer()
    while node is not None and node.op_type not in ("Gemm", "MatMul", "Conv"):
        node = node.inputs[0].producer() if node.inputs and node.inputs[0] is not None else None
    return "" if node is None else str(node.name)


def _dead_problems(proto: onnx.ModelProto, data: list[dict[str, np.ndarray]]) -> list[Problem]:
    """One DeadNeurons problem per activation with units constant on ``data`` (evidence keys
    as graphsurg.detect.dead writes them), measured with onnxruntime."""
    model = ir.serde.deserialize_model(proto)
    acts = [n for n in model.graph if n.op_type in ONNX_OPS and n.op_type != "Clip"]
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    for n in acts:
        probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(n.outputs[0].name))
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [n.outputs[0].name for n in acts]
    got = [sess.run(names, f) for f in data]
    out = []
    for i, n in enumerate(acts):
        x = np.concatenate([g[i] for g in got], 0).astype(np.float64)
        x = np.moveaxis(x, 1, 0).reshape(x.shape[1], -1)
        const = [int(u) for u in np.flatnonzero(x.max(1) == x.min(1))]
        if not const:
            continue
        site = Site(_producer(n.outputs[0]), names[i], ONNX_OPS[n.op_type], "onnx")
        out.append(Problem("DeadNeurons", site, len(const) / x.shape[0], tuple(const),
                           evidence={"constant": const, "channel_dim": 1,
                                     "constant_values": [float(x[u, 0]) for u in const]}))
    return out


def _apply_all(proto: onnx.ModelProto, problems: list[Problem], name: str, **params: object
               ) -> tuple[onnx.ModelProto, int, list[str]]:
    """Apply replacement ``name`` per site; (model, sites rewritten, refusal reasons)."""
    r = gs.default_library().get(name)
    target = OnnxTarget(ir.serde.deserialize_model(proto), [])
    done, refused = 0, []
    for p in problems:
        try:
            a = r.apply(target, p, {**r.propose(p, target), **params})
        except Refused as e:
            refused.append(str(e))
            continue
        assert a.exact == (r.guarantee == "exact")
        done += 1
    return ir.serde.serialize_model(target.model), done, refused


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_excise_mlp_per_site(exported, dynamo: bool) -> None:
    proto = onnx.load(str(exported("mlp", dynamo)))
    problems = _dead_problems(proto, feeds("mlp"))
    assert [len(p.evidence["constant"]) for p in problems] == [16, 3]
    out, done, refused = _apply_all(proto, problems, "excise_dead")
    assert done == 2 and refused == []
    assert op_types(out) == op_types(proto) == ["Gemm", "Relu", "Gemm", "Relu", "Gemm"]
    shapes = sorted(tuple(t.dims) for t in out.graph.initializer if len(t.dims) == 2)
    assert shapes == [(4, 29), (16, 16), (29, 16)]
    full_check(out)
    assert_same_outputs(proto, out, feeds("mlp", n=1, seed=7)[0], EXACT_RTOL)


def test_excise_cnn_through_flatten(exported) -> None:
    proto = onnx.load(str(exported("cnn")))
    problems = _dead_problems(proto, feeds("cnn"))
    out, done, refused = _apply_all(proto, problems, "excise_dead")
    assert done == 2 and refused == []
    assert op_types(out) == op_types(proto)
    dims = [tuple(t.dims) for t in out.graph.initializer]
    assert sorted(d for d in dims if len(d) == 4) == [(5, 6, 3, 3), (6, 3, 3, 3)]
    assert (5, 5 * 16) in dims
    full_check(out)
    assert_same_outputs(proto, out, feeds("cnn", n=1, seed=7)[0], EXACT_RTOL)


def test_excise_one_site_refused_the_other_kept(exported) -> None:
    """Per site: the residual stem's units are refused with the reason, fc1's are excised."""
    proto = onnx.load(str(exported("residual")))
    problems = _dead_problems(proto, feeds("residual"))
    out, done, refused = _apply_all(proto, problems, "excise_dead")
    assert done == 1
    (why,) = refused
    assert "residual Add" in why and "couples the units with another branch" in why
    full_check(out)
    assert_same_outputs(proto, out, feeds("residual", n=1, seed=7)[0], EXACT_RTOL)


def test_excise_padded_conv_border_map_and_missing_evidence(exported) -> None:
    """Constant tanh channels into a zero-padded conv: excised exactly with the constant's
    border map (static spatial dims); evidence without constants is refused."""
    proto = onnx.load(str(exported("padded_tanh")))
    problems = _dead_problems(proto, feeds("padded_tanh"))
    out, done, refused = _apply_all(proto, problems, "excise_dead")
    assert done == len(problems) >= 1 and refused == []
    full_check(out)
    assert_same_outputs(proto, out, feeds("padded_tanh", n=1, seed=7)[0], EXACT_RTOL)
    p = problems[0]
    bare = Problem(p.kind, p.site, p.severity, p.units, evidence={"constant": []})
    with pytest.raises(Refused, match="is constant on the data"):
        gs.default_library().get("excise_dead").apply(
            OnnxTarget(ir.serde.deserialize_model(proto), []), bare, {})


def test_activation_swap_onnx_at_one_site(exported) -> None:
    proto = onnx.load(str(exported("mlp")))
    problems = _dead_problems(proto, feeds("mlp"))
    out, done, refused = _apply_all(proto, problems[1:], "activation_swap")
    assert done == 1 and refused == []
    assert op_types(out) == ["Gemm", "Relu", "Gemm", "LeakyRelu", "Gemm"]  # that site only
    leaky = next(n for n in out.graph.node if n.op_type == "LeakyRelu")
    assert abs(onnx.helper.get_attribute_value(leaky.attribute[0]) - 0.01) < 1e-7
    full_check(out)
    # bounded: the dead units are at -1e3 pre-activation, so the output moves
    with pytest.raises(AssertionError):
        assert_same_outputs(proto, out, feeds("mlp", n=1, seed=7)[0], EXACT_RTOL)
    # refusals: a tanh site, the ramp variant, an opset without LeakyRelu
    tanh = Problem("DeadNeurons", Site("x", problems[1].site.node, "tanh", "onnx"), 0.1, (1,))
    r = gs.default_library().get("activation_swap")
    t = OnnxTarget(ir.serde.deserialize_model(proto), [])
    with pytest.raises(Refused, match="is tanh, not a relu"):
        r.apply(t, tanh, {"variant": "leaky"})
    with pytest.raises(Refused, match="not available on ONNX"):
        r.apply(t, problems[1], {"variant": "ramp"})
    t.model.opset_imports[""] = 5
    t.model.graph.opset_imports[""] = 5
    with pytest.raises(Refused, match="needs opset >= 6"):
        r.apply(t, problems[1], {"variant": "leaky"})


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_factor_low_rank_onnx(tmp_path, dynamo: bool) -> None:
    proto = onnx.load(str(export(LowRank(), torch.randn(4, 48), tmp_path / "lr.onnx",
                                 dynamo=dynamo)))
    layers = [n.name for n in proto.graph.node if n.op_type in ("Gemm", "MatMul")]
    problems = [Problem("Bottleneck", Site(n, "", "linear", "onnx"), 0.5,
                        evidence={"reason": "rank"}) for n in layers]
    out, done, refused = _apply_all(proto, problems, "factor_low_rank")
    assert done == 1
    (why,) = refused  # the 40x3 head is full rank
    assert "would not be smaller" in why
    assert op_types(out) == ["MatMul", "Gemm", "Relu", "Gemm"]
    n = sum(int(np.prod(t.dims)) for t in out.graph.initializer)
    assert n == sum(int(np.prod(t.dims)) for t in proto.graph.initializer) - 40 * 48 + 3 * 88
    full_check(out)
    rng = np.random.default_rng(0)
    assert_same_outputs(proto, out, {"x": rng.standard_normal((16, 48)).astype(np.float32)},
                        EXACT_RTOL)
