"""Healing: the short fine-tune after surgery (the "fine-tuning" in surgical fine-tuning).

The operated model and, for a fair comparison, a copy of the untreated model get the same
fine-tune: same optimizer factory, same batches in the same order, same seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ._console import progress
from ._data import InputFn, compute_loss, run_model

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
LossFn = Callable[[Any, Any], torch.Tensor]


def default_optimizer(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """Adam, lr 1e-3 (the default healing optimizer)."""
    return torch.optim.Adam(params, lr=1e-3)


@dataclass
class HealLog:
    """What a fine-tune did: steps run, the loss per step, and why it stopped early."""

    steps: int = 0
    losses: list[float] = field(default_factory=list)
    stopped: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "first_loss": self.losses[0] if self.losses else None,
                "last_loss": self.losses[-1] if self.losses else None, "stopped": self.stopped}


def heal(model: nn.Module, batches: Sequence[Any], loss_fn: LossFn, *, steps: int,
         optimizer: OptimizerFactory | None = None, seed: int = 0,
         input_fn: InputFn | None = None,
         on_step: Sequence[Callable[[int, int], None]] = ()) -> HealLog:
    """Fine-tune ``model`` in place for ``steps`` steps, cycling over ``batches``.

    The model is in training mode during the fine-tune and its mode is restored after. The
    global RNG state (dropout) is seeded with ``seed`` and restored afterwards. ``on_step``
    callbacks run before each step as ``cb(step, steps)`` (e.g. an activation-slope ramp).
    A non-finite loss stops the fine-tune (and is logged).
    """
    log = HealLog()
    params = [p for p in model.parameters() if p.requires_grad]
    if steps <= 0 or not params or not batches:
        log.stopped = "nothing to do" if steps > 0 else ""
        return log
    opt = (optimizer or default_optimizer)(params)
    was = model.training
    model.train()
    try:
        with torch.random.fork_rng(devices=[]), \
                progress(steps, "healing (fine-tune steps)") as bar:
            torch.manual_seed(seed)
            for step in range(steps):
                for cb in on_step:
                    cb(step, steps)
                batch = batches[step % len(batches)]
                opt.zero_grad(set_to_none=True)
                loss = compute_loss(loss_fn, run_model(model, batch, input_fn, step), batch, step)
                if not math.isfinite(float(loss.detach())):
                    log.stopped = f"non-finite loss at step {step}"
                    break
                loss.backward()
                opt.step()
                log.losses.append(float(loss.detach()))
                log.steps += 1
                bar.advance()
    finally:
        opt.zero_grad(set_to_none=True)
        model.train(was)
    return log


@torch.no_grad()
def mean_loss(model: nn.Module, batches: Sequence[Any], loss_fn: LossFn, *,
              input_fn: InputFn | None = None) -> float:
    """Mean loss over ``batches`` in eval mode (mode restored)."""
    was = model.training
    model.eval()
    try:
        vals = [float(compute_loss(loss_fn, run_model(model, b, input_fn, i), b, i))
                for i, b in enumerate(batches)]
    finally:
        model.train(was)
    return sum(vals) / len(vals)
