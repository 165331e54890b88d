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
* **loss**, where there is a loss: the operated model's held-out loss is not above the
  input's (L(f') <= L(f)) and within ``max_loss_increase`` / ``max_relative_loss_increase``
  of the equally fine-tuned untreated model's;
* **the global certificate** (:func:`relate`): the whole diagnosis of f' on held-out batches
  against f's on the same batches: issues(f') must be a strict subset of issues(f). Problems
  are matched by kind, site and units through what surgery renamed: a site is its producer
  module (a swap that renumbers graph nodes keeps it), a module split by an edit (``2`` ->
  ``2.0``, ``2.1``) maps back to it, and an excised layer's remaining units map back through
  the removed indices (:class:`UnitMap`).

Rollback is per site: when a group of edits fails a certificate, :func:`culprits` finds the
edits that broke it by bisection (subsets applied on restored snapshots) and the rest are
kept.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, TypeVar

import torch
from torch import nn

from ._data import InputFn, compute_loss, run_model
from ._heal import LossFn
from ._problems import Diagnosis, Problem

#: problem kinds whose treatment must leave no flagged unit at the treated site
UNIT_KINDS: tuple[str, ...] = ("DeadNeurons", "Saturation", "NonFinite")
#: problem kinds that name a span of layers: matched when the spans share a layer
SPAN_KINDS: tuple[str, ...] = ("VanishingGradient", "ExplodingGradient")

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
        round: 0 for the plan's schemas, ``r`` for a follow-up round's (closed loop).
        created: the new problems this schema was found to create (global certificate).
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
    round: int = 0
    created: list[str] = field(default_factory=list)

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


@dataclass
class UnitMap:
    """How one round of surgery renamed sites and units: ``split`` maps a module created by
    splitting a layer (``"2.0"``) to it (``"2"``); ``kept`` maps a layer whose units were
    removed to the old index of each remaining unit (new index ``j`` -> ``kept[m][j]``)."""

    split: dict[str, str] = field(default_factory=dict)
    kept: dict[str, list[int]] = field(default_factory=dict)

    def module(self, m: str) -> str:
        for base in sorted(self.split.values(), key=len, reverse=True):
            if m == base or m.startswith(base + "."):
                return base
        return m

    def units(self, m: str, units: Sequence[int]) -> list[int]:
        keep = self.kept.get(m)
        if keep is None:
            return [int(u) for u in units]
        return [keep[u] if 0 <= u < len(keep) else -1 - u for u in units]


def unit_map(schemas: Sequence[Any], applied: dict[int, Any], removes_units: Callable[[str], bool]
             ) -> UnitMap:
    """The :class:`UnitMap` of one round: ``schemas`` (with ``index``, ``replacement``,
    ``site``), their ``Applied`` records, and ``removes_units(replacement)`` from the
    library (a removal's ``Applied.units`` are the removed indices, ``details["width_before"]``
    the layer's width before)."""
    um = UnitMap()
    for s in schemas:
        a = applied.get(s.index)
        if a is None:
            continue
        m = s.site.module
        um.split[m] = m
        width = a.details.get("width_before")
        if removes_units(s.replacement) and isinstance(width, int) and a.units:
            prev = um.kept.get(m, list(range(width)))
            gone = {int(u) for u in a.units}
            um.kept[m] = [old for j, old in enumerate(prev) if j not in gone]
    return um


@dataclass
class ProblemRelation:
    """issues(f') against issues(f), both diagnosed on the held-out batches.

    Attributes:
        resolved: problems of f with no counterpart in f'.
        remaining: problems of f' that were already problems of f (same kind, same site after
            renames, units among f's).
        new: problems of f' that f did not have -- a problem whose units are partly new is
            split: the new units are listed here, in f'\'s numbering.
        before / after: how many problems f and f' have.
    """

    resolved: list[Problem] = field(default_factory=list)
    remaining: list[Problem] = field(default_factory=list)
    new: list[Problem] = field(default_factory=list)
    before: int = 0
    after: int = 0

    @property
    def strict_subset(self) -> bool:
        """issues(f') is a strict subset of issues(f): nothing new, at least one gone."""
        return not self.new and bool(self.resolved)

    def to_dict(self) -> dict[str, Any]:
        def short(ps: list[Problem]) -> list[dict[str, Any]]:
            return [{"kind": p.kind, "site": p.site.address, "units": list(p.units)}
                    for p in ps]
        return {"before": self.before, "after": self.after, "strict_subset": self.strict_subset,
                "resolved": short(self.resolved), "remaining": short(self.remaining),
                "new": short(self.new)}

    def describe(self) -> str:
        return (f"{self.before} -> {self.after} problem(s): {len(self.resolved)} resolved, "
                f"{len(self.remaining)} remaining, {len(self.new)} new; issues(f') "
                + ("is a strict subset of issues(f)" if self.strict_subset
                   else "is NOT a strict subset of issues(f)"))


def describe_problem(p: Problem) -> str:
    """``Kind at site (n units)``: a problem in one short phrase."""
    units = f" ({len(p.units)} unit(s))" if p.units else ""
    return f"{p.kind} at {p.site.module or p.site.address}{units}"


def relate(before: Diagnosis, after: Diagnosis, maps: Sequence[UnitMap] = ()) -> ProblemRelation:
    """Match the problems of ``after`` (f') with ``before``'s (f) through ``maps`` (one
    :class:`UnitMap` per round of surgery, in order).

    A problem of f' is *remaining* when f has a problem of the same kind at the same site
    (module, mapped back through the rounds) whose units include its units (mapped back); a
    span problem (vanishing/exploding gradient) when the spans share a layer. Units of f' not
    among f's make a *new* problem (in f'\'s numbering); a problem of f that nothing in f'
    matches is *resolved*.
    """
    rel = ProblemRelation(before=len(before.problems), after=len(after.problems))
    matched: set[int] = set()
    for q in after.problems:
        module, units = q.site.module, list(q.units)
        span = list(q.span)
        for um in reversed(list(maps)):
            units = um.units(module, units)
            span = [um.module(m) for m in span]
            module = um.module(module)
        hits = [i for i, p in enumerate(before.problems) if p.kind == q.kind and (
            p.site.module == module or (q.kind in SPAN_KINDS and set(p.span or (p.site.module,))
                                        & set(span or (module,))))]
        if not hits:
            rel.new.append(q)
            continue
        matched |= set(hits)
        if not q.units or any(not before.problems[i].units for i in hits):
            rel.remaining.append(q)
            continue
        old = set().union(*(set(before.problems[i].units) for i in hits))
        extra = [u for u, m in zip(q.units, units, strict=True) if m not in old]
        if len(extra) < len(q.units):
            rel.remaining.append(replace(q, units=tuple(u for u in q.units if u not in extra)))
        if extra:
            rel.new.append(replace(q, units=tuple(extra)))
    rel.resolved = [p for i, p in enumerate(before.problems) if i not in matched]
    return rel
