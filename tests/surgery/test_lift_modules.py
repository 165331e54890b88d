"""A model loaded from a torch.export archive gets its Linear/Conv layers back, unchanged in
function, and gs.operate treats it like the original."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import zoo
from graphsurg.passes.fx.lift_modules import lift_modules
from torch import nn

import graphsurg as gs


def _roundtrip(model: nn.Module, x: torch.Tensor, tmp_path: Path) -> nn.Module:
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim.AUTO},))
    torch.export.save(ep, tmp_path / "m.pt2")
    return torch.export.load(str(tmp_path / "m.pt2")).module()


@pytest.mark.parametrize("name", ["dead_mlp", "dead_cnn"])
def test_lift_restores_layers_exactly(name: str, tmp_path: Path) -> None:
    case = zoo.build(name)
    x = case.batches[0][0]
    loaded = _roundtrip(case.model.eval(), x, tmp_path)
    lifted, paths = lift_modules(loaded)
    want = {p for p, m in case.model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)}
    assert set(paths) == want
    for p in want:
        assert type(lifted.get_submodule(p)) is type(case.model.get_submodule(p))
    with torch.no_grad():
        assert torch.equal(lifted(x), loaded(x))
    assert not any(isinstance(m, nn.Linear) for m in loaded.modules())  # input untouched


def test_operate_on_an_exported_archive(tmp_path: Path) -> None:
    case = zoo.dead_mlp()
    lifted, _ = lift_modules(_roundtrip(case.model, case.batches[0][0], tmp_path))
    res = gs.operate(lifted, case.batches, loss_fn=case.loss_fn, heal_steps=5,
                     certificates=gs.Certificates(max_loss_increase=10.0))
    assert res.kept, res.summary()
    assert {s.replacement for s in res.plan.schemas} >= {"reinit_dead"}
