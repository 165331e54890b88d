"""Surgery on models ``symbolic_trace`` cannot capture (issue 14 class 7): norm insertion and
residual bypass on a Hugging Face BERT, with blocks read from the ``torch.export`` graph and
the edits made on the module tree. Each test fails on 7462296 (both replacements refused
with "needs a torch.fx graph")."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from graphsurg.passes.fx.target import Target
from torch import nn

import graphsurg as gs
from graphsurg.library import default_library

transformers = pytest.importorskip("transformers")

LAYER = "encoder.layer.0.intermediate.dense"
#: float32 surgery vs the input, both evaluated in float64: an exact edit differs only by
#: the float32 rounding of copied statistics (|x| * 2^-24 per element), far below 1e-6
EXACT = 1e-6


def _bert() -> tuple[nn.Module, list[dict[str, torch.Tensor]]]:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, vocab_size=100)
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, 100, (4, 7), generator=g)} for _ in range(2)]
    return transformers.BertModel(cfg).eval(), data


def _f64(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return copy.deepcopy(model).double().eval()(**batch).last_hidden_state


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _names_kept(before: nn.Module, after: nn.Module, new: list[str]) -> None:
    """Every parameter and buffer of the input keeps its name and value; only ``new`` are
    added."""
    old, now = before.state_dict(), after.state_dict()
    assert set(old) <= set(now)
    assert all(torch.equal(old[k], now[k]) for k in old)
    added = set(now) - set(old)
    assert added and all(any(k.startswith(n) for n in new) for k in added), added


def _apply(name: str, problem: gs.Problem, params: dict[str, Any]
           ) -> tuple[nn.Module, list[dict[str, torch.Tensor]], Target, Any]:
    model, data = _bert()
    with pytest.raises(Exception):  # noqa: B017 -- any tracing error: the point is it fails
        torch.fx.symbolic_trace(model)
    target = Target(copy.deepcopy(model), data)
    rep = default_library().get(name)
    assert rep.check(problem, target) is None
    applied = rep.apply(target, problem, {**rep.propose(problem, target), **params})
    assert type(target.model) is type(model)  # an ordinary module, not a GraphModule
    return model, data, target, applied


def test_norm_insert_on_an_exported_graph_is_exact() -> None:
    problem = gs.Problem("ExplodingGradient", gs.Site(LAYER, "", "linear"), 0.5)
    model, data, target, applied = _apply("norm_insert", problem, {"variant": "identity"})
    (name,) = [m for m in applied.modules if m != LAYER]
    assert name == f"{LAYER}.gs_norm"
    assert applied.exact and applied.new_parameters == [f"{name}.weight", f"{name}.bias"]
    _names_kept(model, target.model, [name])
    for b in data:
        assert _rel(_f64(target.model, b), _f64(model, b)) <= EXACT
    # the norm runs on the layer's output: in training mode it normalises with the batch's
    # statistics, then scales by weight and shifts by bias (per unit: mean = bias, var = w^2)
    bn: Any = target.model.get_submodule(name)
    seen: list[torch.Tensor] = []
    bn.register_forward_hook(lambda m, a, o: seen.append(o))
    target.model.train()(**data[0])
    h = seen[0].detach().double().flatten(0, -2)
    w, b = bn.weight.detach().double(), bn.bias.detach().double()
    assert float((h.mean(0) - b).abs().max()) < 1e-5
    # var = w^2 * v / (v + eps): eps = 1e-5 against unit variances ~5e-3 shrinks it < 1%
    assert float((h.var(0, False) / w.square() - 1).abs().max()) < 1e-2


@pytest.mark.parametrize("variant", ["gated", "residual"])
def test_residual_bypass_on_an_exported_graph(variant: str) -> None:
    problem = gs.Problem("VanishingGradient", gs.Site(LAYER, "", "linear"), 0.5, span=(LAYER,))
    model, data, target, applied = _apply("residual_bypass", problem,
                                          {"variant": variant, "span": [LAYER]})
    end = "encoder.layer.0.intermediate.intermediate_act_fn"  # the block: dense -> GELU
    assert applied.details["blocks"] == {LAYER: end}
    (name,) = applied.details["bypasses"]
    assert name == f"{end}.gs_bypass" and applied.details["centres"] == [0.0]
    _names_kept(model, target.model, [name])
    ref = _f64(model, data[0])
    got = _f64(target.model, data[0])
    if variant == "gated":  # alpha = 0: exact at surgery
        assert applied.exact and _rel(got, ref) <= EXACT
        return
    # residual: the block computes GELU(dense(x)) + P(x), P a learned 32 -> 64 projection
    assert not applied.exact and _rel(got, ref) > 1e-3
    m64 = copy.deepcopy(target.model).double().eval()
    io: dict[str, torch.Tensor] = {}
    m64.get_submodule(LAYER).register_forward_pre_hook(lambda m, a: io.update(x=a[0]))
    m64.get_submodule(end).register_forward_hook(lambda m, a, o: io.update(y=o))
    with torch.no_grad():
        m64(**data[0])
        dense = m64.get_submodule(LAYER)
        want = nn.functional.gelu(nn.functional.linear(io["x"], dense.weight, dense.bias)) + \
            m64.get_submodule(name).proj(io["x"])
    assert _rel(io["y"], want) <= 1e-12
    # the operated model is still exportable (the diagnosis after surgery reads its graph)
    torch.export.export(target.model, (), dict(data[0]), strict=False)
