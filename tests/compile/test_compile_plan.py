"""The backend's ``plan`` option, apply_plan on ExportedPrograms, and PlanGraphPass."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from _compile_models import BreakMLP, batches, mlp, mse
from graphsurg.passes.fx.apply_plan import PlanGraphPass, PlanNotGraphLevel, apply_plan
from torch import nn

import graphsurg as gs
from graphsurg._plan import Schema, SurgeryPlan
from graphsurg._problems import Problem, Site

ATOL, RTOL = 1e-6, 1e-5  # same aten kernels on both sides; float32 ulps only


def _plan(module: str, replacement: str = "activation_swap", **params: object) -> SurgeryPlan:
    site = Site(module, "", "relu")
    params = params or {"variant": "leaky", "negative_slope": 0.1}
    # the planner asks the library for the graph-level form of an edit; so does this helper
    rewrite = gs.default_library().get(replacement).graph_rewrite(dict(params))
    return SurgeryPlan(schemas=[Schema(0, Problem("DeadNeurons", site, units=(1,)), replacement,
                                       "layer", site, dict(params), graph_rewrite=rewrite)])


def _swapped(model: nn.Sequential, index: int, slope: float = 0.1) -> nn.Sequential:
    """What gs.operate's activation_swap(variant='leaky') makes of the module."""
    ref = copy.deepcopy(model)
    ref[index] = nn.LeakyReLU(slope)
    return ref


def _relu_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                         nn.Linear(16, 2))


@pytest.mark.parametrize("inner", ["eager", "aot_eager"])
def test_compiled_plan_equals_operated_eager(inner: str) -> None:
    model = _relu_mlp()
    ref = _swapped(model, 3)
    c = torch.compile(model, backend="graphsurg", options={"plan": _plan("2"), "inner": inner})
    for x, y in batches(3):
        out = c(x)
        torch.testing.assert_close(out, ref(x), atol=ATOL, rtol=RTOL)
        assert not torch.allclose(out, model(x))  # the swap did change the function
        mse(out, (x, y)).backward()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert isinstance(model[3], nn.ReLU)  # the module itself is untouched


def test_plan_from_json_file_with_monitor(tmp_path: Path) -> None:
    model = _relu_mlp()
    path = tmp_path / "plan.json"
    path.write_text(_plan("0").to_json())
    mon = gs.Monitor(every=1)
    c = torch.compile(model, backend="graphsurg",
                      options={"plan": str(path), "monitor": mon, "inner": "aot_eager"})
    x = batches(1)[0][0]
    torch.testing.assert_close(c(x), _swapped(model, 1)(x), atol=ATOL, rtol=RTOL)
    ops = sorted(o.site.op for o in mon._observers.values())
    assert ops == ["leaky_relu", "linear", "relu"]  # the monitor sees the operated graph


@pytest.mark.parametrize("replacement,params", [
    ("reinit_dead", {}),
    ("widen", {"factor": 2}),
    ("activation_swap", {"variant": "prelu", "negative_slope": 0.1}),
])
def test_parameter_schemas_are_refused_with_the_fix(replacement: str, params: dict) -> None:
    c = torch.compile(_relu_mlp(), backend="graphsurg",
                      options={"plan": _plan("0", replacement, **params), "inner": "eager"})
    with pytest.raises(Exception, match=r"schema 0 .*apply the plan to the module with "
                                        r"gs.operate") as e:
        c(torch.randn(2, 8))
    assert replacement in str(e.value)


def test_bad_plan_path() -> None:
    c = torch.compile(mlp(), backend="graphsurg",
                      options={"plan": "/nonexistent/plan.json", "inner": "eager"})
    with pytest.raises(Exception, match="cannot read it"):
        c(torch.randn(2, 8))


def test_plan_across_graph_break() -> None:
    model = BreakMLP()
    c = torch.compile(model, backend="graphsurg", options={"plan": _plan("fc1"),
                                                          "inner": "aot_eager"})
    x = batches(1)[0][0]
    want = model.head(torch.tanh(model.fc2(torch.nn.functional.leaky_relu(model.fc1(x), 0.1))))
    torch.testing.assert_close(c(x), want, atol=ATOL, rtol=RTOL)


def test_apply_plan_exported_program() -> None:
    model = _relu_mlp()
    x = batches(1)[0][0]
    ep = torch.export.export(model, (x,))
    before = ep.graph_module.code
    ep2 = apply_plan(ep, _plan("2").to_json())
    assert ep.graph_module.code == before  # input program unchanged
    torch.testing.assert_close(ep2.module()(x), _swapped(model, 3)(x), atol=ATOL, rtol=RTOL)
    targets = [n.target for n in ep2.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.aten.leaky_relu.default) == 1
    assert targets.count(torch.ops.aten.relu.default) == 1
    # still an ExportedProgram torch can re-export / run_decompositions on
    ep3 = ep2.run_decompositions()
    torch.testing.assert_close(ep3.module()(x), ep2.module()(x), atol=ATOL, rtol=RTOL)


def test_apply_plan_wrong_site() -> None:
    ep = torch.export.export(_relu_mlp(), (torch.randn(2, 8),))
    with pytest.raises(gs.BadInputError, match="no ReLU after that module"):
        apply_plan(ep, _plan("4"))
    with pytest.raises(PlanNotGraphLevel):
        apply_plan(ep, _plan("0", "excise_dead"))


def test_plan_graph_pass_uuid_and_rewrite() -> None:
    p1, p2 = PlanGraphPass(_plan("0")), PlanGraphPass(_plan("2"))
    assert p1.uuid() == PlanGraphPass(_plan("0")).uuid() != p2.uuid()
    ep = torch.export.export(_relu_mlp(), (torch.randn(2, 8),))
    gm = copy.deepcopy(ep.graph_module)
    p2(gm.graph)  # nn_module_stack / placeholders resolve the producer in aten graphs
    assert p2.applied == [0]
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.aten.leaky_relu.default) == 1


def test_apply_plan_result_exports_to_onnx() -> None:
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    x = torch.randn(4, 8)
    ep2 = apply_plan(torch.export.export(model, (x,)), _plan("0"))
    onx = torch.onnx.export(ep2, (x,), dynamo=True, verbose=False)
    assert onx is not None
    assert [n.op_type for n in onx.model_proto.graph.node] == ["Gemm", "LeakyRelu", "Gemm"]
    sess = ort.InferenceSession(onx.model_proto.SerializeToString())
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    # onnxruntime's Gemm vs torch's addmm: float32 summation order differs
    torch.testing.assert_close(torch.from_numpy(got), _swapped(model, 1)(x), atol=1e-5, rtol=1e-5)
