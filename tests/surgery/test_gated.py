"""Gated units (``down(act(gate(x)) * up(x))``): the DeadNeurons evidence names the up
projection ``partner``; reinit_dead resets the unit in gate and up and zeroes its down
columns, excise_dead removes it from gate, up and down together -- both exact. A Llama small
config (probe coupling) and a traceable toy gated MLP (FX coupling)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from _helpers import assert_treated, same_state, snapshot
from torch import nn

import graphsurg as gs
from graphsurg.library import ExciseDead, ReinitDead, Target

transformers = pytest.importorskip("transformers")

MLP = "model.layers.0.mlp"
GATE, UP, DOWN = f"{MLP}.gate_proj", f"{MLP}.up_proj", f"{MLP}.down_proj"
UNITS = (2, 9, 33, 50)
TOY_UNITS = (1, 7, 20)
VOCAB = 64


def _llama() -> tuple[nn.Module, list[dict[str, torch.Tensor]]]:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1,
                                   vocab_size=VOCAB, max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # a zero gate row: silu(0) = 0, the gated unit outputs 0
        model.get_submodule(GATE).weight[list(UNITS)] = 0.0
    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(4):
        ids = torch.randint(0, VOCAB, (8, 12), generator=g)
        data.append({"input_ids": ids, "labels": ids})
    return model, data


class _GatedMLP(nn.Module):
    """A traceable SwiGLU block: ``down(silu(gate(x)) * up(x))`` after a stem."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(8, 16)
        self.gate, self.up, self.down = nn.Linear(16, 24), nn.Linear(16, 24), nn.Linear(24, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        return self.down(torch.nn.functional.silu(self.gate(h)) * self.up(h))


def _toy() -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    m = _GatedMLP().eval()
    with torch.no_grad():  # silu(-50) ~ -1e-20: the units output ~0 (constant)
        m.gate.weight[list(TOY_UNITS)] = 0.0
        m.gate.bias[list(TOY_UNITS)] = -50.0
    g = torch.Generator().manual_seed(1)
    return m, [torch.randn(16, 8, generator=g) for _ in range(3)]


def _problem(gate: str, up: str, units: tuple[int, ...]) -> gs.Problem:
    return gs.Problem("DeadNeurons", gs.Site(gate, "mul", "swiglu"), 0.1, units,
                      evidence={"constant": list(units), "partner": up})


@torch.no_grad()
def _rel64(a: nn.Module, b: nn.Module, data: list[Any]) -> float:
    """max over batches of ||f_a - f_b|| / ||f_b||, both models run in float64."""
    a64, b64 = copy.deepcopy(a).double().eval(), copy.deepcopy(b).double().eval()
    worst = 0.0
    for batch in data:
        if isinstance(batch, dict):
            x, y = (a64(input_ids=batch["input_ids"]).logits,
                    b64(input_ids=batch["input_ids"]).logits)
        else:
            x, y = a64(batch.double()), b64(batch.double())
        worst = max(worst, float((x - y).norm() / y.norm()))
    return worst


def _apply(rep: Any, model: nn.Module, data: list[Any], problem: gs.Problem
           ) -> tuple[Target, Any]:
    target = Target(copy.deepcopy(model), data)
    assert rep.check(problem, target) is None, rep.check(problem, target)
    return target, rep.apply_torch(target, problem, rep.propose(problem, target))


@torch.no_grad()
def _down_input(model: nn.Module, path: str, batch: Any) -> torch.Tensor:
    got: list[torch.Tensor] = []
    h = model.get_submodule(path).register_forward_pre_hook(lambda m, a: got.append(a[0]))
    try:
        model(input_ids=batch["input_ids"]) if isinstance(batch, dict) else model(batch)
    finally:
        h.remove()
    return got[0].reshape(-1, got[0].shape[-1])


def test_reinit_dead_gated_unit_exact() -> None:
    model, data = _llama()
    target, applied = _apply(ReinitDead(), model, data, _problem(GATE, UP, UNITS))
    assert applied.exact and applied.details["partners"] == [UP]
    assert {GATE, UP, DOWN} <= set(applied.modules)
    idx = list(UNITS)
    gate, up, down = (target.model.get_submodule(p) for p in (GATE, UP, DOWN))
    assert bool((gate.weight[idx].norm(dim=1) > 0).all())  # the gate rows are redrawn
    assert not torch.equal(up.weight[idx], model.get_submodule(UP).weight[idx])  # and up's
    assert bool((down.weight[:, idx] == 0).all())  # the unit starts contributing 0
    assert _rel64(target.model, model, data) <= 1e-6
    # the unit is alive again: its product varies over the data
    x = _down_input(target.model, DOWN, data[0])[:, idx]
    assert bool((x.std(0) > 1e-4).all())


def test_excise_dead_gated_unit_exact() -> None:
    model, data = _llama()
    target, applied = _apply(ExciseDead(), model, data, _problem(GATE, UP, UNITS))
    assert applied.units == list(UNITS) and applied.details["partners"] == [UP]
    n = 64 - len(UNITS)
    gate, up, down = (target.model.get_submodule(p) for p in (GATE, UP, DOWN))
    assert gate.weight.shape == (n, 32) and up.weight.shape == (n, 32)
    assert down.weight.shape == (32, n)
    keep = [u for u in range(64) if u not in UNITS]
    assert torch.equal(up.weight, model.get_submodule(UP).weight[keep])
    assert _rel64(target.model, model, data) <= 1e-6


def test_gated_unit_fx_coupling_exact() -> None:
    model, data = _toy()
    units = TOY_UNITS
    for rep in (ReinitDead(), ExciseDead()):
        target, applied = _apply(rep, model, data, _problem("gate", "up", units))
        assert applied.details["coupling"] == "fx"
        assert _rel64(target.model, model, data) <= 1e-6
    assert target.model.up.out_features == 24 - len(units) == target.model.down.in_features


def test_without_partner_the_gate_cannot_change_width() -> None:
    model, data = _toy()
    problem = gs.Problem("DeadNeurons", gs.Site("gate", "mul", "swiglu"), 0.1, TOY_UNITS,
                         evidence={"constant": list(TOY_UNITS)})
    why = ExciseDead().check(problem, Target(copy.deepcopy(model), data))
    assert why is not None and "residual mul" in why


def test_a_partner_that_is_no_partner_is_refused() -> None:
    model, data = _llama()
    why = ReinitDead().check(_problem(GATE, DOWN, UNITS), Target(copy.deepcopy(model), data))
    assert why is not None and "partner" in why and DOWN in why


def test_operate_treats_dead_gated_units() -> None:
    model, data = _llama()
    before_state = snapshot(model)
    res = gs.operate(model, data, loss_fn=lambda out, b: out.loss)
    assert same_state(snapshot(model), before_state)

    assert_treated(res, "DeadNeurons", GATE, UNITS)
    assert any(s.kept for s in res.verification), res.summary()
