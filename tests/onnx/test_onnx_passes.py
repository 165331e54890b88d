"""Each pass on models exported from torch: number of rewrites (kept sites of the
``SurgeryResult``), op types after, onnxruntime equality within the stated tolerance,
full_check, and a smaller model where expected. Negative tests assert the reason a rewrite was
refused (``plan.untreated`` / ``rolled_back`` of the result, or the pass's ``refusals``)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from _onnx_helpers import (
    EXPORTERS,
    assert_same_outputs,
    feeds,
    full_check,
    n_params,
    op_types,
    run_ort,
)
from _onnx_models import LowRank, export
from graphsurg.passes.onnx.excise_dead_units import ExciseDeadUnits, excise_site
from graphsurg.passes.onnx.low_rank import FactorLowRank
from graphsurg.passes.onnx.relu_to_leaky_relu import ReluToLeakyReluPass, leaky_rule

from graphsurg import SurgeryResult
from graphsurg import onnx as gso
from graphsurg._compare import output_change

# Excision removes terms that are exactly c * w from float32 sums and folds them into the
# bias: the result differs from the original by summation-order round-off only, a few ulps
# of the largest output.
EXACT_RTOL = 1e-5


def refusals(res: SurgeryResult) -> list[str]:
    """Why sites were not treated or not kept (refused at planning or at application)."""
    return [r for _, r in res.plan.untreated] + [r["reason"] for r in res.rolled_back]


def _excise(path, name):  # type: ignore[no-untyped-def]
    proto = onnx.load(str(path))
    out, res = gso.apply(proto, feeds(name), ["excise_dead_units"])  # the legacy name
    return proto, out, res, res.kept_at("excise_dead")


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_excise_mlp(exported, dynamo: bool) -> None:
    proto, out, res, kept = _excise(exported("mlp", dynamo), "mlp")
    assert len(kept) == 2 and res.ok
    assert op_types(out) == op_types(proto) == ["Gemm", "Relu", "Gemm", "Relu", "Gemm"]
    shapes = {t.name: tuple(t.dims) for t in out.graph.initializer}
    assert shapes["fc1.weight"] == (16, 16)  # 16 of 32 units were dead
    assert shapes["fc2.weight"] == (29, 16)  # 3 of 32 dead, 16 input rows removed
    assert shapes["fc3.weight"] == (4, 29)
    assert n_params(out) < n_params(proto) * 0.55
    assert all(v.exact and v.output_change is not None and v.output_change <= EXACT_RTOL
               for v in kept)
    assert res.size["params_after"] == n_params(out) < res.size["params_before"]
    full_check(out)
    assert_same_outputs(proto, out, feeds("mlp", n=1, seed=7)[0], EXACT_RTOL)


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_excise_cnn_through_flatten(exported, dynamo: bool) -> None:
    proto, out, res, kept = _excise(exported("cnn", dynamo), "cnn")
    assert len(kept) == 2 and res.ok
    assert op_types(out) == op_types(proto)
    w = {t.name: tuple(t.dims) for t in out.graph.initializer}
    conv_w = sorted(d for d in w.values() if len(d) == 4)
    assert conv_w == [(5, 6, 3, 3), (6, 3, 3, 3)]  # 2 and 3 channels removed
    assert (5, 5 * 16) in w.values()  # the Gemm lost 3 channels x 16 positions
    full_check(out)
    assert_same_outputs(proto, out, feeds("cnn", n=1, seed=7)[0], EXACT_RTOL)


def test_excise_follows_concat_and_batchnorm(exported) -> None:
    proto, out, res, kept = _excise(exported("concat_bn"), "concat_bn")
    assert len(kept) == 1
    # the BatchNormalization lost 3 channels; the constant it makes of them went into the head
    dims = sorted(tuple(t.dims) for t in out.graph.initializer)
    assert (15,) in dims and (3, 15) in dims and (9, 8) in dims
    # the Relu after the Concat is refused, with the reason, and only that site
    (why,) = refusals(res)
    assert "produced by" in why and "Concat" in why
    full_check(out)
    assert_same_outputs(proto, out, feeds("concat_bn", n=1, seed=7)[0], EXACT_RTOL)


def test_excise_refuses_residual_coupling(exported) -> None:
    proto = onnx.load(str(exported("residual")))
    diag = gso.analyze(proto, feeds("residual"))
    model = ir.serde.deserialize_model(proto)
    p = ExciseDeadUnits(diag)
    p(model)
    assert p.rewrites == 1  # fc1's units (inside the block) are excised
    (refusal,) = p.refusals
    assert "residual Add" in refusal.reason and "couples the units with another branch" in refusal.reason


def test_excise_padded_conv_with_nonzero_constant_adds_the_border_map(exported) -> None:
    """Two channels constant at tanh(0.5) != 0 feed a zero-padded Conv: the border pixels see
    the padding, not the constant, so no bias absorbs them; with the spatial shape static,
    their exact contribution is a constant [1, C_out, H, W] map added after the conv. (The
    detector leaves constant tanh units to Saturation, so the problem is written here as the
    applier reads it.)"""
    from graphsurg._problems import Problem, Site

    proto = onnx.load(str(exported("padded_tanh")))
    model = ir.serde.deserialize_model(proto)
    tanh = next(n for n in model.graph if n.op_type == "Tanh")
    c = float(np.tanh(0.5))
    problem = Problem("DeadNeurons", Site("c1", tanh.outputs[0].name, "tanh", "onnx"), 1 / 3,
                      units=(1, 4), evidence={"constant": [1, 4], "constant_values": [c, c],
                                              "channel_dim": 1})
    excised: dict[str, set[int]] = {}
    excise_site(model, problem, excised)
    out = ir.serde.serialize_model(model)
    convs = sorted(tuple(t.dims) for t in out.graph.initializer if len(t.dims) == 4)
    # c1 6 -> 4 outputs, c2 6 -> 4 inputs; the border map [1, 4, 6, 6] added after c2
    assert convs == [(1, 4, 6, 6), (4, 3, 3, 3), (4, 4, 3, 3)] and "Add" in op_types(out)
    assert_same_outputs(proto, out, feeds("padded_tanh", n=1, seed=7)[0], 1e-5)


def test_relu_to_leaky_relu_on_dying_units(exported) -> None:
    proto = onnx.load(str(exported("dying")))
    diag = gso.analyze(proto, feeds("dying"))
    model = ir.serde.deserialize_model(proto)
    p = ReluToLeakyReluPass(diag)
    p(model)
    out = ir.serde.serialize_model(model)
    assert p.rewrites == 1 and not p.refusals
    assert op_types(out) == ["Gemm", "LeakyRelu", "Gemm"]
    leaky = next(n for n in out.graph.node if n.op_type == "LeakyRelu")
    assert abs(onnx.helper.get_attribute_value(leaky.attribute[0]) - 0.01) < 1e-7
    full_check(out)
    # not exact: the output moves by about alpha x the negative pre-activations
    feed = feeds("dying", n=1, seed=7)[0]
    change = output_change(run_ort(out, feed), run_ort(proto, feed))
    assert 0 < change.rel <= 0.05
    # through apply, the swap is inexact and needs the opt-in; it is judged against the bound
    with pytest.raises(gso.OnnxInputError, match="change the model's function"):
        gso.apply(proto, feeds("dying"), ["relu_to_leaky_relu"])
    _, res = gso.apply(proto, feeds("dying"), ["relu_to_leaky_relu"], max_output_change=0.05)
    (v,) = res.verification
    assert v.replacement == "activation_swap" and not v.exact and v.bound == 0.05
    assert v.output_change is not None and 0 < v.output_change <= 0.05


def test_relu_rule_set_and_refusals(exported) -> None:
    import onnxscript.rewriter as rw

    proto = onnx.load(str(exported("dying")))
    diag = gso.analyze(proto, feeds("dying"))
    rewritten = rw.rewrite(proto, pattern_rewrite_rules=gso.rules(diag))
    assert op_types(rewritten) == ["Gemm", "LeakyRelu", "Gemm"]
    # a Relu that is not diagnosed is refused with the reason
    rule = leaky_rule({"some_other_value"})
    model = ir.serde.deserialize_model(proto)
    tracer = rw.MatchingTracer()
    assert rw.RewriteRuleSet([rule]).apply_to_model(model, tracer=tracer) == 0
    reasons = [m.match_result.reason for ms in tracer.best_matches_map.values() for m in ms]
    assert any("is not diagnosed as dying" in r for r in reasons)
    # a healthy diagnosis gives a rule set that changes nothing
    healthy = gso.analyze(exported("healthy_mlp"), feeds("healthy_mlp"))
    assert rw.RewriteRuleSet(gso.rules(healthy).rules).apply_to_model(
        ir.serde.deserialize_model(onnx.load(str(exported("healthy_mlp"))))
    ) == 0


def test_relu_to_leaky_relu_refuses_below_opset_6(exported) -> None:
    proto = onnx.load(str(exported("dying")))
    diag = gso.analyze(proto, feeds("dying"))
    model = ir.serde.deserialize_model(proto)
    model.opset_imports[""] = 5
    model.graph.opset_imports[""] = 5
    p = ReluToLeakyReluPass(diag)
    p(model)
    assert p.rewrites == 0
    assert any("needs opset >= 6" in r.reason for r in p.refusals)


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_factor_low_rank_gemm(tmp_path, dynamo: bool) -> None:
    path = export(LowRank(), torch.randn(4, 48), tmp_path / "lr.onnx", dynamo=dynamo)
    proto = onnx.load(str(path))
    rng = np.random.default_rng(0)
    data = [{"x": rng.standard_normal((32, 48)).astype(np.float32)} for _ in range(4)]
    diag = gso.analyze(proto, data)
    (b,) = diag.of_kind("Bottleneck")
    assert b.evidence["rank"] == 3 and b.evidence["max_rank"] == 40
    out, res = gso.apply(proto, data, ["factor_low_rank"])
    (v,) = res.kept_at("factor_low_rank")
    assert res.ok and v.exact and v.details["rank"] == 3
    assert op_types(out) == ["MatMul", "Gemm", "Relu", "Gemm"]
    assert n_params(out) == n_params(proto) - 40 * 48 + 3 * (40 + 48) == res.size["params_after"]
    assert "rank 3" in v.details["note"] and "dropped singular values" in v.details["note"]
    full_check(out)
    # exact up to the SVD tolerance (float32 factors of a rank-3 matrix)
    assert_same_outputs(proto, out, data[0], 1e-5)


def test_factor_low_rank_matmul_and_refusal() -> None:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    low = (rng.standard_normal((64, 2)) @ rng.standard_normal((2, 32))).astype(np.float32)
    full = rng.standard_normal((32, 8)).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm_low"),
         helper.make_node("MatMul", ["h", "V"], ["y"], name="mm_full")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])],
        [numpy_helper.from_array(low, "W"), numpy_helper.from_array(full, "V")],
    )  # fmt: skip
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model = ir.serde.deserialize_model(proto)
    from graphsurg._problems import Diagnosis, Problem, Site

    diag = Diagnosis(problems=[
        Problem("Bottleneck", Site("mm_low", "", "linear", "onnx"), 0.9,
                evidence={"reason": "rank", "rank": 2}),
        Problem("Bottleneck", Site("mm_full", "", "linear", "onnx"), 0.5,
                evidence={"reason": "rank", "rank": 8})])
    p = FactorLowRank(diag)
    p(model)
    assert p.rewrites == 1
    (r,) = p.refusals
    assert r.site == "mm_full" and "would not be smaller" in r.reason
    out = ir.serde.serialize_model(model)
    assert op_types(out) == ["MatMul", "MatMul", "MatMul"]
    full_check(out)
    assert_same_outputs(proto, out, {"x": rng.standard_normal((5, 64)).astype(np.float32)}, 1e-5)
