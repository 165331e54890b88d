"""Verification: measured evidence that each schema keeps the certificates, on any IR.

The certificates, the same on every adapter (:class:`graphsurg._ir.IRAdapter`):

* **output change** ``||f' - f|| / ||f||`` (:func:`graphsurg._compare.output_change`, the one
  measure): a bounded edit at surgery on the calibration batches, within
  ``max_output_change``; the exact edits together on the *held-out* batches, within
  ``exact_tolerance`` (a unit constant on the calibration data that fires on held-out data
  makes its excision inexact);
* **gradient flow**, where ``adapter.capabilities.gradients``: every layer a schema touched
  has a non-zero gradient norm and every new parameter a non-zero gradient (after healing
  when the plan healed);
* **no dead units at treated sites**: the treated units are not flagged again in the
  diagnosis of the operated model on held-out batches -- except for replacements that remove
  the units (``Replacement.removes_units``: they are gone, not revived);
* **loss**, where there is a loss: the operated model's held-out loss is within
  ``max_loss_increase`` of the equally fine-tuned untreated model's.

Rollback is per site: when a group of edits fails a certificate, :func:`culprits` finds the
edits that broke it by bisection (subsets applied on restored snapshots) and the rest are
kept.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn

from ._data import InputFn, compute_loss, run_model
from ._heal import LossFn
from ._problems import Diagnosis

#: problem kinds whose treatment must leave no flagged unit at the treated site
UNIT_KINDS: tuple[str, ...] = ("DeadNeurons", "Saturation", "NonFinite")

E = TypeVar("E")


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
        output_change: ``||f' - f|| / ||f||``: a bounded edit's own at surgery (calibration
            batches); an exact edit's is that of the group of exact edits it was judged in, on
            the held-out batches (of the edit with the others kept, when it broke the group).
            None when nothing could be measured.
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


def culprits(edits: Sequence[E], fails: Callable[[list[E]], bool], *,
             known_failing: bool = False) -> list[E]:
    """The edits of a failing group that break a certificate, found by bisection.

    ``fails(subset)`` applies ``subset`` (in order) on a restored snapshot and says whether a
    certificate breaks. The left half is judged alone, the right half with the good edits of
    the left half in place, so an edit that fails only together with others is still found;
    with one culprit among ``n`` edits this costs about ``2 log2 n`` calls.
    ``known_failing``: the whole group is already known to fail (saves one call).

    Example: ten excisions where one site's units fire on held-out data -> ``[that site]``.
    """
    def find(context: list[E], group: list[E], failing: bool) -> list[E]:
        if not group or not (failing or fails(context + group)):
            return []
        if len(group) == 1:
            return list(group)
        mid = len(group) // 2
        bad_left = find(context, group[:mid], False)
        good_left = [e for e in group[:mid] if e not in bad_left]
        return bad_left + find(context + good_left, group[mid:], False)

    return find([], list(edits), known_failing)
