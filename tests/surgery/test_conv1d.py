"""Hugging Face ``Conv1D`` (GPT-2's MLP: ``x @ W + b`` with ``W`` of shape ``(in, out)``) is a
layer for surgery: its units are weight columns and bias entries, a consumer's columns are
weight rows. A GPT-2 small config with dead units planted in ``h.0.mlp.c_fc``."""

from __future__ import annotations

import copy
import subprocess
import sys
from typing import Any

import pytest
import torch
from _helpers import assert_treated, same_state, snapshot

import graphsurg as gs
from graphsurg.library import ExciseDead, ReinitDead, Target, Widen

transformers = pytest.importorskip("transformers")

FC, PROJ = "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"
UNITS = (3, 17, 40, 101)
VOCAB = 64


def _gpt2() -> tuple[torch.nn.Module, list[dict[str, torch.Tensor]]]:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=VOCAB,
                                  n_positions=32)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    fc = model.get_submodule(FC)
    with torch.no_grad():  # dead units: zero weight columns, bias deep in GELU's zero region
        fc.weight[:, list(UNITS)] = 0.0
        fc.bias[list(UNITS)] = -50.0
    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(4):
        ids = torch.randint(0, VOCAB, (8, 12), generator=g)
        data.append({"input_ids": ids, "labels": ids})
    return model, data


def _loss(out: Any, batch: Any) -> torch.Tensor:
    return out.loss  # type: ignore[no-any-return]


def _problem() -> gs.Problem:
    return gs.Problem("DeadNeurons", gs.Site(FC, "", "gelu_tanh"), 0.03, UNITS,
                      evidence={"constant": list(UNITS), "constant_values": [0.0] * len(UNITS)})


@torch.no_grad()
def _rel64(a: torch.nn.Module, b: torch.nn.Module, data: list[dict[str, torch.Tensor]]
           ) -> float:
    """max over batches of ||f_a - f_b|| / ||f_b||, both models run in float64."""
    a64, b64 = copy.deepcopy(a).double().eval(), copy.deepcopy(b).double().eval()
    worst = 0.0
    for batch in data:
        x, y = a64(input_ids=batch["input_ids"]).logits, b64(input_ids=batch["input_ids"]).logits
        worst = max(worst, float((x - y).norm() / y.norm()))
    return worst


def _apply(rep: Any, model: torch.nn.Module, data: list[Any], problem: gs.Problem,
           **params: Any) -> tuple[Target, Any]:
    target = Target(copy.deepcopy(model), data)
    assert rep.check(problem, target) is None
    p = {**rep.propose(problem, target), **params}
    return target, rep.apply_torch(target, problem, p)


def test_conv1d_is_recognised_without_importing_transformers() -> None:
    code = ("import sys, graphsurg, graphsurg.library, graphsurg.passes.fx.coupling; "
            "assert 'transformers' not in sys.modules, 'transformers imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    from graphsurg.passes.fx.coupling import is_conv1d, is_layer, weight_rows

    c = transformers.pytorch_utils.Conv1D(24, 8)  # nf=24 outputs, nx=8 inputs
    assert is_conv1d(c) and is_layer(c)
    assert weight_rows(c).shape == (24, 8)
    assert not is_conv1d(torch.nn.Linear(8, 24))


def test_reinit_dead_conv1d_exact() -> None:
    model, data = _gpt2()
    target, applied = _apply(ReinitDead(), model, data, _problem())
    assert applied.exact and applied.units == list(UNITS)
    assert applied.details["consumers"] == [PROJ]
    fc, proj = target.model.get_submodule(FC), target.model.get_submodule(PROJ)
    idx = list(UNITS)
    assert bool((fc.weight[:, idx].norm(dim=0) > 0).all())  # units are weight columns
    assert bool((fc.bias[idx] == 0).all())
    assert bool((proj.weight[idx, :] == 0).all())  # consumer columns are weight rows
    assert bool((proj.weight[[0, 1, 2], :] != 0).any())
    assert applied.touched[f"{FC}.weight"] == [(1, idx)]
    assert applied.touched[f"{PROJ}.weight"] == [(0, idx)]
    # exact: the dead units contributed 0 and the reset ones start at 0 (float64 runs)
    assert _rel64(target.model, model, data) <= 1e-6


def test_excise_dead_conv1d_exact() -> None:
    model, data = _gpt2()
    target, applied = _apply(ExciseDead(), model, data, _problem())
    assert applied.units == list(UNITS)
    fc, proj = target.model.get_submodule(FC), target.model.get_submodule(PROJ)
    assert type(fc).__name__ == "Conv1D" and type(proj).__name__ == "Conv1D"
    assert fc.weight.shape == (32, 128 - len(UNITS)) and fc.nf == 128 - len(UNITS)
    assert fc.bias.shape == (128 - len(UNITS),)
    assert proj.weight.shape == (128 - len(UNITS), 32)
    keep = [u for u in range(128) if u not in UNITS]
    ref = model.get_submodule(FC)
    assert torch.equal(fc.weight, ref.weight[:, keep])
    assert _rel64(target.model, model, data) <= 1e-6


def test_widen_conv1d_exact() -> None:
    model, data = _gpt2()
    problem = gs.Problem("Bottleneck", gs.Site(FC, "", "linear"), 0.5)
    target, applied = _apply(Widen(), model, data, problem, new_width=160)
    fc, proj = target.model.get_submodule(FC), target.model.get_submodule(PROJ)
    assert fc.weight.shape == (32, 160) and fc.nf == 160 and proj.weight.shape == (160, 32)
    # function-preserving up to float32 rounding of the split columns (w/2 +- eps): 1e-5
    assert _rel64(target.model, model, data) <= 1e-5


def test_operate_treats_dead_units_in_conv1d() -> None:
    model, data = _gpt2()
    before_state = snapshot(model)
    res = gs.operate(model, data, loss_fn=_loss)
    assert same_state(snapshot(model), before_state)  # the input model is untouched

    assert_treated(res, "DeadNeurons", FC, UNITS)
