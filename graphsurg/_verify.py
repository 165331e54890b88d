"""Verification: measured evidence that each schema keeps the certificates.

* output change at surgery, ``||f' - f|| / ||f||`` (eval mode, calibration batches);
* gradient flow: every layer the schema touched has a non-zero gradient norm and every new
  parameter a non-zero gradient (after healing when the plan healed);
* the treated problem is gone at the treated units (DeadNeurons, Saturation, NonFinite) in
  the diagnosis of the operated model on held-out batches;
* the operated model's loss is within ``max_loss_increase`` of the equally fine-tuned
  untreated model's (a plan-wide check; a failure rolls back the last bounded schema).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ._data import InputFn, compute_loss, run_model
from ._heal import LossFn
from ._problems import Diagnosis


@dataclass
class SchemaVerification:
    """The evidence for one schema, and whether it was kept.

    Attributes:
        index: the schema's index in the plan.
        replacement / site: what and where.
        kept: the schema is in the result model.
        reasons: why it was rolled back (empty when kept).
        exact: the variant applied was function-preserving.
        variant: the parameters finally applied differ from the plan's (``"fallback"``).
        output_change: ``||f' - f|| / ||f||`` at surgery (None when not measurable).
        bound: the bound the output change was held to.
        grad_norms: gradient norm per touched module / new parameter after healing.
        problem_after: treated units still flagged in the diagnosis after surgery.
        details: the replacement's own numbers.
    """

    index: int
    replacement: str
    site: str
    kept: bool = True
    reasons: list[str] = field(default_factory=list)
    exact: bool = False
    variant: str = "planned"
    output_change: float | None = None
    bound: float | None = None
    grad_norms: dict[str, float] = field(default_factory=dict)
    problem_after: list[int] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def fail(self, reason: str) -> None:
        self.kept = False
        self.reasons.append(reason)


def float_leaves(out: Any) -> list[torch.Tensor]:
    """Floating-point tensors of a model output (tensors, tuples, dicts, ModelOutput)."""
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    leaves, _ = torch.utils._pytree.tree_flatten(out)
    return [t.detach() for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()]


@torch.no_grad()
def outputs(model: nn.Module, batches: Sequence[Any], input_fn: InputFn | None
            ) -> list[torch.Tensor]:
    """The model's floating outputs on ``batches`` in eval mode (mode restored)."""
    was = model.training
    model.eval()
    try:
        got: list[torch.Tensor] = []
        for i, b in enumerate(batches):
            got += float_leaves(run_model(model, b, input_fn, i))
    finally:
        model.train(was)
    return got


def relative_change(new: Sequence[torch.Tensor], old: Sequence[torch.Tensor],
                    ref: Sequence[torch.Tensor]) -> float | None:
    """``||new - old|| / ||ref||`` in float64, or None when a reference value is not finite
    (or the shapes differ)."""
    if len(new) != len(old) or len(old) != len(ref):
        return None
    num = 0.0
    den = 0.0
    for a, b, r in zip(new, old, ref, strict=True):
        if a.shape != b.shape:
            return None
        if not (torch.isfinite(b).all() and torch.isfinite(r).all()):
            return None
        num += float((a.double() - b.double()).pow(2).sum())
        den += float(r.double().pow(2).sum())
    if not math.isfinite(num):
        return math.inf
    return math.sqrt(num) / max(math.sqrt(den), 1e-30)


def grad_norms(model: nn.Module, batches: Sequence[Any], loss_fn: LossFn | None,
               input_fn: InputFn | None) -> dict[str, float]:
    """Gradient norm of every parameter after one backward over ``batches`` (training mode,
    dropout seeded) on a copy of ``model``. Without ``loss_fn`` the surrogate
    ``0.5 * mean(output^2)`` is differentiated."""
    model = copy.deepcopy(model)  # a forward in training mode updates BatchNorm statistics
    model.train()
    try:
        for p in model.parameters():
            p.grad = None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            for i, b in enumerate(batches):
                out = run_model(model, b, input_fn, i)
                if loss_fn is not None:
                    loss = compute_loss(loss_fn, out, b, i)
                else:
                    loss = torch.stack([0.5 * t.pow(2).mean() for t in _grad_leaves(out)]).sum()
                (loss / len(batches)).backward()  # type: ignore[union-attr]
        return {n: float(p.grad.detach().double().norm()) if p.grad is not None else 0.0
                for n, p in model.named_parameters() if p.requires_grad}
    finally:
        for p in model.parameters():
            p.grad = None


def _grad_leaves(out: Any) -> list[torch.Tensor]:
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    leaves, _ = torch.utils._pytree.tree_flatten(out)
    return [t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()
            and t.requires_grad]


def module_grad_norm(norms: dict[str, float], module: str) -> float:
    """Gradient norm of all parameters under ``module``."""
    pre = module + "."
    return math.sqrt(sum(v * v for k, v in norms.items() if k.startswith(pre) or k == module))


def still_flagged(after: Diagnosis | None, kind: str, module: str, units: Sequence[int]
                  ) -> list[int]:
    """Treated units that the after-diagnosis still flags with ``kind`` at ``module``."""
    if after is None:
        return []
    flagged: set[int] = set()
    for p in after.problems:
        if p.kind == kind and p.site.module == module:
            flagged |= set(p.units) if p.units else set(units)
    return sorted(flagged & {int(u) for u in units})
