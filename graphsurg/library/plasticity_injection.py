"""PlasticityInjection (module scale; Nikishin et al., 2023): a fresh head next to the old.

For a head that has lost plasticity (most of its units dormant, gradients tiny while the loss
stalls: ``LostPlasticity``), the head ``h`` is replaced by

    ``h(x) + h1(x) - h2(x)``

where ``h1`` is a freshly initialised copy of ``h``'s architecture and ``h2`` a frozen copy of
``h1``. ``h1(x) - h2(x)`` is exactly 0 at injection (the same weights and the same float
operations), so the function is unchanged; ``h1`` then learns with fresh, live units while
``h`` keeps what it knew. ``h`` can be frozen too (``freeze_old=True``, the paper's setting).
Exact, and judged after healing.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from .._problems import Problem
from ._base import Applied, Refused, Replacement, Target


class InjectedHead(nn.Module):
    """``old(x) + fresh(x) - frozen(x)`` with ``frozen`` a non-trainable copy of ``fresh``."""

    def __init__(self, old: nn.Module, fresh: nn.Module) -> None:
        super().__init__()
        self.old = old
        self.fresh = fresh
        self.frozen = copy.deepcopy(fresh)
        for p in self.frozen.parameters():
            p.requires_grad_(False)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        # fresh - frozen first: exactly 0 at injection (a + b - b is not a in floats)
        return self.old(*args, **kwargs) + (self.fresh(*args, **kwargs) -
                                            self.frozen(*args, **kwargs))


def _reset(m: nn.Module, gen: torch.Generator) -> None:
    """Re-initialise every submodule that knows how, with a forked RNG seeded from ``gen``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        for sub in m.modules():
            reset = getattr(sub, "reset_parameters", None)
            if callable(reset):
                reset()


class PlasticityInjection(Replacement):
    """Add a fresh copy of a head minus its frozen twin (Nikishin et al. 2023): exact."""

    name = "plasticity_injection"
    treats = ("LostPlasticity",)
    scales = ("module",)
    guarantee = "exact"
    judged_after_healing = True
    priority = 20

    def __init__(self, *, freeze_old: bool = False) -> None:
        self.freeze_old = freeze_old

    def _head(self, target: Target, problem: Problem) -> str:
        path = str(problem.evidence.get("head") or problem.site.module)
        try:
            m = target.model.get_submodule(path)
        except AttributeError:
            raise Refused(f"the model has no module {path!r}") from None
        if not any(True for _ in m.parameters()):
            raise Refused(f"{path!r} has no parameters: nothing to inject")
        if not any(callable(getattr(s, "reset_parameters", None)) for s in m.modules()):
            raise Refused(f"{path!r} has no submodule with reset_parameters(): cannot draw a "
                          "fresh copy")
        return path

    def check(self, problem: Problem, target: Target) -> str | None:
        why = super().check(problem, target)
        if why:
            return why
        try:
            self._head(target, problem)
        except Refused as e:
            return str(e)
        return None

    def propose(self, problem: Problem, target: Target, *, exact: bool = False
                ) -> dict[str, Any]:
        return {"head": self._head(target, problem), "freeze_old": self.freeze_old,
                "exact": True}

    def apply_torch(self, target: Target, problem: Problem, params: dict[str, Any]) -> Applied:
        path = str(params.get("head") or self._head(target, problem))
        old = target.model.get_submodule(path)
        fresh = copy.deepcopy(old)
        _reset(fresh, target.generator(f"plasticity:{path}"))
        for p in fresh.parameters():
            p.requires_grad_(True)
        if params.get("freeze_old", self.freeze_old):
            for p in old.parameters():
                p.requires_grad_(False)
        head = InjectedHead(old, fresh)
        target.replace_module(path, head)
        applied = Applied(exact=True, modules=[f"{path}.fresh"],
                          new_parameters=[f"{path}.fresh.{n}" for n, _ in
                                          fresh.named_parameters()])
        applied.details.update({"head": path, "fresh_parameters": sum(
            p.numel() for p in fresh.parameters()), "frozen_old": bool(
            params.get("freeze_old", self.freeze_old))})
        return applied
