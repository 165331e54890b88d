"""diagnose -> plan -> operate -> verify end to end on Hugging Face models (small configs,
random weights): the real diagnosis finds the planted units and operate treats them."""

from __future__ import annotations

import pytest
import torch

import graphsurg as gs

pytest.importorskip("transformers")
import _hf_models as _hf


def _bert() -> tuple[torch.nn.Module, list[dict[str, torch.Tensor]], str]:
    return (*_hf.bert(6), "bert.encoder.layer.1.intermediate.dense")


def _vit() -> tuple[torch.nn.Module, list[dict[str, torch.Tensor]], str]:
    return (*_hf.vit(6), "vit.layers.0.mlp.fc1")


@pytest.mark.parametrize("build", [_bert, _vit], ids=["bert", "vit"])
def test_operate_treats_planted_units_found_by_diagnose(build) -> None:  # type: ignore[no-untyped-def]
    model, data, path = build()
    units = [1, 7, 30]
    with torch.no_grad():
        model.get_submodule(path).bias[units] = -50.0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = gs.operate(model, data, loss_fn=_hf.loss, heal_steps=5)
    planted = [p for p in res.before.problems if p.site.module == path]
    assert planted and planted[0].evidence["dead"] == units
    assert res.kept and not res.rolled_back, res.summary()
    assert not [p for p in res.after.problems if p.site.module == path], res.summary()
    # the input model is bit-identical; the operated one differs only where it was treated
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not torch.equal(res.model.get_submodule(path).weight[units],
                           model.get_submodule(path).weight[units])
