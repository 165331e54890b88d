"""Shared helpers for the surgery tests."""

from __future__ import annotations

import copy
from typing import Any

import torch
from graphsurg.passes.fx.adapter import TorchAdapter
from torch import nn

from graphsurg._compare import output_change


def rel_change(a: nn.Module, b: nn.Module, batches: list[Any]) -> float:
    """||f_a - f_b|| / ||f_b|| in float64, eval mode."""
    return output_change(TorchAdapter(a).run(batches), TorchAdapter(b).run(batches)).rel


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Bit-identical state dicts (NaN equal to NaN)."""
    if a.keys() != b.keys():
        return False
    return all(torch.equal(x.view(torch.uint8) if x.is_floating_point() else x,
                           y.view(torch.uint8) if y.is_floating_point() else y)
               for x, y in ((a[k], b[k]) for k in a))


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train(model: nn.Module, batches: list[Any], loss_fn: Any, steps: int, seed: int = 0
          ) -> float:
    """``steps`` Adam steps (lr 1e-3, seeded), returning the final mean training loss."""
    from graphsurg._heal import heal, mean_loss

    model = copy.deepcopy(model)
    heal(model, batches, loss_fn, steps=steps, seed=seed)
    return mean_loss(model, batches, loss_fn)


def assert_treated(res: Any, kind: str, module: str, units: tuple[int, ...]) -> None:
    """``res`` (a SurgeryResult) treated the planted ``kind`` at ``module``: it was there
    before, no ``kind`` is left at ``module`` after, and the problems after (kind, producer
    module, units) are a strict subset of those before."""

    def key(p: Any) -> tuple[str, str, tuple[int, ...]]:
        return (p.kind, p.site.module, tuple(p.units))

    before = {key(p) for p in res.before.problems}
    assert (kind, module, units) in before, res.summary()
    assert res.after is not None
    after = {key(p) for p in res.after.problems}
    assert not any(k[:2] == (kind, module) for k in after), res.summary()
    assert after < before
