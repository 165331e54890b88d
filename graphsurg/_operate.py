"""operate: the spine's surgery, one pipeline for every graph IR.

split -> diagnose -> plan -> build -> heal -> verify -> roll back, each a small named step
written against :class:`graphsurg._ir.IRAdapter` (:func:`operate_adapter`). :func:`operate`
is it over the torch adapter (healing included); ``graphsurg.onnx.apply`` is it over the ONNX
adapter without healing, plus save.

The user's model is never modified: the adapter works on a private copy, every build starts
from a snapshot of it, and a schema that fails is rolled back by rebuilding without it --
alone: when a group of edits fails a certificate, bisection (:func:`graphsurg._verify.culprits`)
finds the edits that broke it and the rest are kept.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from ._certificates import Certificates
from ._compare import output_change
from ._config import DiagnoseConfig
from ._data import InputFn, iter_batches, split_held_out
from ._errors import BadInputError, first_line
from ._heal import HealLog, LossFn, OptimizerFactory, heal, mean_loss
from ._ir import IRAdapter
from ._plan import Schema, SurgeryFailed, SurgeryPlan, _layers, plan, plan_target
from ._problems import Diagnosis, Problem, _finite, _table
from ._verify import (
    UNIT_KINDS,
    ProblemRelation,
    SchemaVerification,
    UnitMap,
    culprits,
    describe_problem,
    grad_norms,
    module_grad_norm,
    relate,
    still_flagged,
    unit_map,
)
from .library._base import SCALES, Applied, Library, Refused

RESULT_FORMAT = "graphsurg.surgery/1"


@dataclass
class SurgeryResult:
    """The outcome of :func:`operate` / :func:`operate_adapter` / ``graphsurg.onnx.apply``.

    Attributes:
        model: the operated (and healed) model -- a new object (``nn.Module`` for torch,
            ``onnx_ir.Model`` for ONNX, the ``onnx.ModelProto`` when ``graphsurg.onnx.apply``
            edited a plain model on its protobuf: :mod:`graphsurg.passes.onnx.plain`); the
            input is untouched.
        plan: the plan that was executed (``plan.untreated``: problems refused, with reasons).
        before / after: diagnoses of the input model and of the result (held-out batches;
            None when the result was not re-diagnosed).
        verification: one :class:`SchemaVerification` per planned schema (per site).
        rolled_back: ``{"index", "replacement", "site", "reason"}`` per rolled-back schema.
        healing: fine-tune record: steps, treated and untreated losses.
        output_change: total ``||f' - f|| / ||f||`` of the result before healing, on the
            held-out batches.
        applied: per kept schema index, what it changed (for
            :func:`reset_optimizer_state`).
        notes: anything the user should know.
        escalations: one record per escalation (``operate(..., escalate=n)``).
        ir: ``"torch"`` or ``"onnx"``.
        verified_on: which batches verified the result (or why it was not verified).
        size: ``nodes_before/after``, ``params_before/after`` where the adapter counts them.
        output: the file the result was written to (``graphsurg.onnx.apply`` on a path).
        guarantee: the global certificate (:meth:`ProblemRelation.to_dict`: ``before``,
            ``after``, ``resolved``, ``remaining``, ``new``, ``strict_subset``), or
            ``{"checked": False, "why": ...}`` when it could not be checked.
        rounds: one record per follow-up round of closed-loop surgery (the new problems it
            planned for, the schemas and what became of them).
        diagnoses: diagnosis runs beyond the plan's (the input and the result on held-out
            batches, follow-up rounds, bisection): the cost of the guarantee.
    """

    model: Any
    plan: SurgeryPlan
    before: Diagnosis
    after: Diagnosis | None
    verification: list[SchemaVerification] = field(default_factory=list)
    rolled_back: list[dict[str, Any]] = field(default_factory=list)
    healing: dict[str, Any] = field(default_factory=dict)
    output_change: float | None = None
    applied: dict[int, Applied] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    escalations: list[dict[str, Any]] = field(default_factory=list)
    ir: str = "torch"
    verified_on: str = ""
    size: dict[str, int] = field(default_factory=dict)
    output: str | None = None
    guarantee: dict[str, Any] = field(default_factory=dict)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    diagnoses: int = 0

    @property
    def strict_subset(self) -> bool | None:
        """issues(f') is a strict subset of issues(f) (None: not checked)."""
        v = self.guarantee.get("strict_subset")
        return bool(v) if v is not None else None

    @property
    def kept(self) -> list[int]:
        return [v.index for v in self.verification if v.kept]

    @property
    def ok(self) -> bool:
        """True when every planned schema met the certificates (none was rolled back)."""
        return not self.rolled_back

    def kept_at(self, replacement: str) -> list[SchemaVerification]:
        """The kept schemas of one replacement (per site)."""
        return [v for v in self.verification if v.kept and v.replacement == replacement]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": RESULT_FORMAT,
            "ir": self.ir,
            "ok": self.ok,
            "verified_on": self.verified_on,
            "size": dict(self.size),
            "output": self.output,
            "plan": self.plan.to_dict(),
            "before": self.before.to_dict(),
            "after": self.after.to_dict() if self.after is not None else None,
            "verification": [v.to_dict() for v in self.verification],
            "rolled_back": list(self.rolled_back),
            "healing": self.healing,
            "output_change": self.output_change,
            "touched": {str(i): {k: [[d, idx] for d, idx in v] for k, v in a.touched.items()}
                        for i, a in self.applied.items()},
            "notes": list(self.notes),
            "escalations": list(self.escalations),
            "guarantee": dict(self.guarantee),
            "rounds": list(self.rounds),
            "diagnoses": self.diagnoses,
        }

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(_finite(self.to_dict()), indent=indent, default=str)

    def summary(self) -> str:
        head = f"Surgery ({self.ir}): {len(self.kept)} of {len(self.verification)} schema(s) kept"
        if self.size:
            s = self.size
            head += (f"; nodes {s.get('nodes_before')} -> {s.get('nodes_after')}, parameters "
                     f"{s.get('params_before')} -> {s.get('params_after')}")
        if self.verified_on:
            head += f"; {self.verified_on}"
        rows = [("#", "replacement", "site", "kept", "exact", "output change", "why")]
        for v in self.verification:
            oc = v.output_change
            why = "; ".join(v.reasons) if not v.kept else _details(v.details)
            rows.append((str(v.index) + (f" (round {v.round})" if v.round else ""),
                         v.replacement + ("*" if v.variant != "planned" else ""),
                         v.site, "yes" if v.kept else "ROLLED BACK", "yes" if v.exact else "no",
                         "n/a" if oc is None else f"{oc:.2e}", why))
        lines = [head, _table(rows)] if self.verification else [head]
        h = self.healing
        if h.get("steps"):
            lines.append(f"healing: {h['steps']} step(s); held-out loss treated "
                         f"{_f(h.get('treated_loss'))} vs equally fine-tuned untreated "
                         f"{_f(h.get('untreated_loss'))}")
        lf = h.get("final_loss", h.get("treated_loss"))
        if h.get("input_loss") is not None and lf is not None:
            ok = lf <= h["input_loss"] + 1e-5 * max(1.0, abs(h["input_loss"]))
            lines.append(f"loss: L(f') {_f(lf)} {'<=' if ok else '>'} L(f) "
                         f"{_f(h['input_loss'])} (held-out"
                         + (", after the follow-up rounds)" if "final_loss" in h else ")"))
        if self.output_change is not None:
            lines.append(f"output change of the result: {self.output_change:.3g}")
        g = self.guarantee
        if g.get("strict_subset") is not None:
            lines.append(f"guarantee: problems {g['before']} -> {g['after']} on held-out data "
                         f"({len(g['resolved'])} resolved, {len(g['remaining'])} remaining, "
                         f"{len(g['new'])} new): issues(f') "
                         + ("is a strict subset of issues(f)" if g["strict_subset"]
                            else "is NOT a strict subset of issues(f)"))
            for q in g["new"]:
                lines.append(f"  new: {q['kind']} at {q['site']}"
                             + (f" ({len(q['units'])} unit(s))" if q["units"] else ""))
        elif g.get("why"):
            lines.append(f"guarantee: not checked: {g['why']}")
        if self.rounds:
            lines.append(f"closed loop: {len(self.rounds)} follow-up round(s); "
                         f"{self.diagnoses} extra diagnosis run(s)")
            for rd in self.rounds:
                lines.append(f"  round {rd['round']}: {rd.get('outcome', '')}")
        # by module, not graph node: a rewrite renames later nodes (relu_2 -> relu_1)
        before = {(p.kind, p.site.module) for p in self.before.problems}
        if self.after is not None:
            after = {(p.kind, p.site.module) for p in self.after.problems}
            lines.append(f"problems: {len(before)} before, {len(after)} after "
                         f"({len(before - after)} resolved)")
        else:
            lines.append(f"problems: {len(before)} before (the result was not re-diagnosed)")
        for p, r in self.plan.untreated:
            lines.append(f"refused: {p.kind} at {p.site.address}: {r}")
        for rb in self.rolled_back:
            lines.append(f"rolled back: #{rb['index']} {rb['replacement']} at {rb['site']}: "
                         f"{rb['reason']}")
        if any(v.variant == "fallback" for v in self.verification):
            lines.append("*: the exact fallback variant was applied")
        if any(v.variant == "alternative" for v in self.verification):
            lines.append("*: the planned (bounded) treatment was rolled back and the exact "
                         "alternative applied in its place (see the notes)")
        for e in self.escalations:
            lines.append(f"escalation (round {e['round']}): {e['problem']} at {e['site']}: "
                         f"{e['from']} ({e['from_scale']}) {e['outcome']} -> {e['to']} "
                         f"({e['to_scale']})")
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def _numpy(t: Any) -> np.ndarray:
    return t.detach().double().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


def _f(x: Any) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def _details(d: dict[str, Any]) -> str:
    """A kept schema's own numbers, short: its note, else its scalar details."""
    if isinstance(d.get("note"), str):
        return d["note"]
    return ", ".join(f"{k}={_f(v)}" for k, v in d.items()
                     if isinstance(v, int | float | str) and not isinstance(v, bool))[:120]


def operate(model: nn.Module, data: Iterable[Any], *, loss_fn: LossFn | None = None,
            library: Library | None = None, certificates: Certificates | None = None,
            config: DiagnoseConfig | None = None, diagnosis: Diagnosis | None = None,
            surgery_plan: SurgeryPlan | None = None, heal_steps: int = 100,
            heal_mode: str = "auto", optimizer: OptimizerFactory | None = None,
            input_fn: InputFn | None = None, prefer: Sequence[str] = (), seed: int = 0,
            held_out: Sequence[Any] | None = None, rediagnose: bool = True,
            escalate: int = 0) -> SurgeryResult:
    """Diagnose ``model``, plan, operate on a copy, heal, verify and roll back failures.

    :func:`operate_adapter` over the torch adapter (``graphsurg.passes.fx.adapter``).

    Args:
        model: the network to treat. It is not modified (state_dict bit-identical, training
            mode and ``requires_grad`` unchanged).
        data: batches (as for :func:`graphsurg.diagnose`); the last quarter (at least one
            batch, when there are two or more) is held out for verification unless
            ``held_out`` is given.
        loss_fn: ``loss_fn(output, batch) -> scalar``; needed for healing and the loss
            certificate (without it gradient checks use ``0.5 * mean(output^2)``).
        library: replacements (default :func:`graphsurg.default_library`).
        certificates: the bounds to keep (default :class:`Certificates`).
        config: diagnosis thresholds.
        diagnosis: a diagnosis of ``model`` to use instead of running one.
        surgery_plan: a plan to execute instead of planning (e.g. loaded from JSON).
        heal_steps: fine-tune steps after surgery (the untreated copy gets the same).
        heal_mode: ``"auto"`` (heal when a kept schema is not exact or is judged after
            healing), ``"always"`` or ``"never"``.
        optimizer: ``factory(params) -> Optimizer`` for healing (default Adam, lr 1e-3).
        input_fn: ``batch -> (args, kwargs)``.
        prefer: replacement names the planner tries first.
        seed: seeds every random draw (re-initialisations, noise, healing order).
        held_out: explicit verification batches.
        rediagnose: diagnose the result (needed for the dead-unit certificate).
        escalate: up to this many escalation rounds: when a schema is rolled back or its
            problem is still reported at its site, the model is planned again one scale up
            (:func:`graphsurg.plan` with ``previous=``) and operated from scratch; the result
            lists each step in ``escalations`` (and its summary shows them).

    Returns:
        a :class:`SurgeryResult`. Raises :class:`SurgeryFailed` when nothing can be treated,
        :class:`graphsurg.BadInputError` for unusable inputs.

    Example::

        res = gs.operate(model, batches, loss_fn=loss)
        print(res.summary())
        new_model = res.model
    """
    if escalate > 0:
        return _escalating(model, data, rounds=escalate, loss_fn=loss_fn, library=library,
                           certificates=certificates, config=config, diagnosis=diagnosis,
                           surgery_plan=surgery_plan, heal_steps=heal_steps,
                           heal_mode=heal_mode, optimizer=optimizer, input_fn=input_fn,
                           prefer=prefer, seed=seed, held_out=held_out, rediagnose=rediagnose)
    if not isinstance(model, nn.Module):
        raise BadInputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    from .passes.fx.adapter import TorchAdapter

    cfg = config or DiagnoseConfig()
    batches = list(iter_batches(data, cfg.max_batches))
    res = operate_adapter(TorchAdapter(model, input_fn=input_fn), batches, library=library,
                          certificates=certificates, config=cfg, loss_fn=loss_fn,
                          held_out=held_out, heal_steps=heal_steps, heal_mode=heal_mode,
                          optimizer=optimizer, seed=seed, diagnosis=diagnosis,
                          surgery_plan=surgery_plan, prefer=prefer, rediagnose=rediagnose)
    res.model.train(model.training)
    return res


def operate_adapter(adapter: IRAdapter, batches: Sequence[Any], *,
                    library: Library | None = None, certificates: Certificates | None = None,
                    config: DiagnoseConfig | None = None, loss_fn: LossFn | None = None,
                    held_out: Sequence[Any] | None = None, heal_steps: int = 100,
                    heal_mode: str = "auto", optimizer: OptimizerFactory | None = None,
                    seed: int = 0, replacements: Sequence[str] | None = None,
                    diagnosis: Diagnosis | None = None,
                    surgery_plan: SurgeryPlan | None = None, prefer: Sequence[str] = (),
                    rediagnose: bool = True) -> SurgeryResult:
    """The spine: split -> diagnose -> plan -> build -> heal -> verify -> roll back, on the
    adapter's working model (a private copy; the user's model is never touched).

    Args:
        adapter: any :class:`graphsurg._ir.IRAdapter`. Healing and the loss certificate need
            ``capabilities.trainable``, the gradient-flow certificate ``.gradients``.
        batches: the adapter's batches. Without ``held_out`` the last quarter is held out
            (one batch: its halves, when the adapter can ``halve`` it); the diagnosis and the
            plan see only the rest. No batches at all (with ``diagnosis``): the edits are
            applied unverified and the result says so.
        replacements: restrict the library to these replacement names (``None``: all of the
            library's replacements with an applier for ``adapter.ir``).
        heal_steps, heal_mode, optimizer: healing (trainable adapters with a ``loss_fn``).
        rediagnose: diagnose the result on the held-out batches even when no certificate
            needs it (the dead-unit certificate always does).

        The other arguments are :func:`operate`'s.

    Returns:
        a :class:`SurgeryResult` whose ``model`` is ``adapter.model`` after surgery.
        Raises :class:`SurgeryFailed` when nothing can be treated.
    """
    if heal_mode not in ("auto", "always", "never"):
        raise BadInputError(f"heal_mode must be 'auto', 'always' or 'never', got {heal_mode!r}")
    cfg = config or DiagnoseConfig()
    cert = certificates or Certificates()
    lib = select_library(library, replacements, adapter.ir)
    train, held, how = _split(adapter, list(batches), held_out)
    before = diagnosis if diagnosis is not None else diagnose_on(adapter, train, cfg, loss_fn)
    if surgery_plan is None:
        surgery_plan = plan_on(adapter, before, lib, cert, train[:2], seed=seed, prefer=prefer)
    kw: dict[str, Any] = dict(loss_fn=loss_fn, seed=seed, heal_steps=heal_steps,
                              heal_mode=heal_mode, optimizer=optimizer, rediagnose=rediagnose)
    global_check = cert.require_strict_subset and rediagnose and bool(held)
    # the input on the held-out batches: the global certificate compares like with like
    before_held = diagnose_on(adapter, held, cfg, loss_fn) if global_check else None
    s = _Surgery(adapter, surgery_plan, lib, cert, cfg, train, held, **kw)
    res = s.run(before)
    if before_held is not None:
        res = _close_loop(s, res, before, before_held, kw)
    else:
        res.guarantee = {"checked": False, "why": (
            "Certificates(require_strict_subset=False)" if not cert.require_strict_subset
            else "rediagnose=False" if not rediagnose else "no held-out batches")}
    res.verified_on = how
    return res


def _close_loop(s: _Surgery, res: SurgeryResult, before: Diagnosis, before_held: Diagnosis,
                kw: dict[str, Any]) -> SurgeryResult:
    """The global certificate and closed-loop surgery.

    issues(f') is compared with issues(f) (both on the held-out batches, :func:`relate`).
    While new problems remain (or a treated problem is still there), up to
    ``Certificates.max_rounds`` follow-up rounds plan for those problems only on the operated
    model, operate, heal and verify. When new problems survive the rounds, bisection over the
    plan's kept schemas finds the ones that create them; those are rolled back alone and the
    rest is operated again. Raises :class:`SurgeryFailed` when every schema had to be rolled
    back for creating problems.
    """
    lib, cert = s.lib, s.cert

    def removes(name: str) -> bool:
        return lib.get(name).removes_units

    diagnoses = 1
    created: dict[int, list[str]] = {}
    history: list[dict[str, Any]] = []
    for _attempt in range(len(s.plan.schemas) + 1):
        base_map = unit_map(s.kept(), res.applied, removes)
        after = res.after if res.after is not None and res.kept else before_held
        if res.kept and res.after is None:
            after = diagnose_on(s.a, s.held, s.cfg, s.loss_fn)
            diagnoses += 1
        maps = [base_map]
        rel = relate(before_held, after, maps)
        rounds: list[dict[str, Any]] = []
        offset = max((v.index for v in res.verification), default=-1) + 1
        extra_verif: list[SchemaVerification] = []
        for r in range(1, cert.max_rounds + 1):
            todo = rel.new + _left_at_treated(rel, res, s)
            if not todo or not res.kept:
                break
            record: dict[str, Any] = {"round": r, "problems": [describe_problem(p) for p in todo]}
            rounds.append(record)
            history.append(record)
            try:
                follow = plan_on(s.a, Diagnosis(problems=todo), lib, cert, s.calib,
                                 seed=s.seed + r)
            except SurgeryFailed as e:
                record["outcome"] = f"nothing could be planned for {len(todo)} problem(s): " \
                    f"{first_line(e)}"
                break
            for sch in follow.schemas:
                sch.index += offset
            offset += len(follow.schemas)
            s2 = _Surgery(s.a, follow, lib, cert, s.cfg, s.train, s.held, round_no=r,
                          input_loss=s.input_loss(), **kw)
            r2 = s2.run(Diagnosis(problems=todo))
            diagnoses += 1
            extra_verif += r2.verification
            record.update(schemas=[v.to_dict() for v in r2.verification],
                          healing=r2.healing)
            if not r2.kept or r2.after is None:
                record["outcome"] = (f"planned {len(follow.schemas)} schema(s) for "
                                     f"{len(todo)} problem(s); none kept")
                break
            maps.append(unit_map([x for x in follow.schemas if x.index in r2.applied],
                                 r2.applied, removes))
            res.applied.update(r2.applied)
            res.notes += [n for n in r2.notes if n not in res.notes]
            after = r2.after
            rel = relate(before_held, after, maps)
            record["outcome"] = (f"{len(r2.kept)} of {len(follow.schemas)} schema(s) kept for "
                                 f"{', '.join(record['problems'])}; now " + rel.describe())
        if not rel.new or not res.kept:
            break
        # new problems the rounds could not treat: which of the plan's schemas create them?
        left = {(p.kind, p.site.module) for p in rel.new}
        kept = s.kept()
        healed = bool(res.healing.get("healed"))

        def creates(group: list[Schema], left: set[tuple[str, str]] = left,
                    healed: bool = healed) -> bool:
            nonlocal diagnoses
            applied = s.build(group, measure=False)
            if healed:
                s.heal(applied)
            d = diagnose_on(s.a, s.held, s.cfg, s.loss_fn)
            diagnoses += 1
            rel_g = relate(before_held, d, [unit_map(group, applied,
                                                     removes)])
            return any((p.kind, p.site.module) in left for p in rel_g.new)

        bad = culprits(kept, creates, known_failing=True)
        if not bad:
            res.notes.append("new problems remain that no single schema creates on its own "
                             "(measurement noise or an interaction): nothing was rolled back")
            break
        for sch in bad:
            what = [describe_problem(p) for p in rel.new]
            created[sch.index] = what
            v = s.verif[sch.index]
            v.created = what
            v.fail(f"created {', '.join(what)}; {len(rounds)} follow-up round(s) could not "
                   "treat them (found by bisection)" if len(kept) > 1 else
                   f"created {', '.join(what)}; {len(rounds)} follow-up round(s) could not "
                   "treat them")
        # the schemas rolled back for other reasons get another chance without the culprits
        # (a culprit's new problem may have failed them: dead units kept dead downstream)
        s.dropped = set(created)
        res = s.run(before)
        for d in rounds:
            d["outcome"] = d.get("outcome", "") + " (discarded: its base was rolled back)"
        extra_verif = []
        if not res.kept:
            break
    res.verification = list(res.verification) + extra_verif
    res.rounds = history
    res.rolled_back = [{"index": v.index, "replacement": v.replacement, "site": v.site,
                        "reason": "; ".join(v.reasons), "round": v.round}
                       for v in res.verification if not v.kept]
    if not res.kept and created:
        untreated = []
        for sch in s.plan.schemas:
            if sch.index in created:
                untreated.append((sch.problem, f"tried {sch.replacement}: created "
                                  + ", ".join(created[sch.index])))
        raise SurgeryFailed(
            "nothing could be treated without creating problems: " + "; ".join(
                f"{p.kind} at {p.site.address}: {why}" for p, why in untreated), untreated)
    final_after = after if res.kept else before_held
    res.after = final_after if res.kept else res.after
    rel = relate(before_held, final_after, maps) if res.kept else relate(before_held,
                                                                          before_held)
    res.guarantee = {"checked": True, **rel.to_dict()}
    res.diagnoses = diagnoses
    if history and res.kept and s.trainable and s.loss_fn is not None:
        res.healing["final_loss"] = mean_loss(s.a.model, s.held, s.loss_fn,
                                              input_fn=s.input_fn)
        res.healing["input_loss"] = s.input_loss()
    return res


def _left_at_treated(rel: ProblemRelation, res: SurgeryResult, s: _Surgery) -> list[Problem]:
    """Problems still present at a site a kept schema treated (the treatment did not resolve
    them, e.g. a factored rank collapse that is now a narrow layer): the follow-up rounds try
    them too."""
    treated = {(sch.problem.kind, sch.site.module) for sch in s.kept() if sch.index in res.applied}
    um = UnitMap(split={m: m for _, m in treated})
    return [p for p in rel.remaining if (p.kind, um.module(p.site.module)) in treated]


# -- the steps -------------------------------------------------------------------------------
def select_library(library: Library | None, names: Sequence[str] | None, ir: str) -> Library:
    """The replacements the plan may use: ``library`` (default: the default library),
    restricted to ``names`` when given; an unknown name is a one-line error."""
    if library is None:
        from .library import default_library

        library = default_library()
    if names is None:
        return library
    unknown = [n for n in names if n not in library]
    if unknown:
        raise BadInputError(f"unknown replacement(s) {unknown}; the library has "
                            f"{', '.join(library.names())}")
    return Library([library.get(n) for n in dict.fromkeys(names)])


def _split(adapter: IRAdapter, batches: list[Any], held_out: Sequence[Any] | None
           ) -> tuple[list[Any], list[Any], str]:
    """split: ``(train, held-out, how)`` through the one held-out split."""
    if held_out is not None:
        held = list(held_out)
        how = (f"verified on {len(held)} given held-out batch(es)" if held else
               "not verified: no verification batches")
        return batches, held, how
    if not batches:
        return [], [], "not verified: no data"
    return split_held_out(batches, adapter.halve)


def diagnose_on(adapter: IRAdapter, batches: Sequence[Any], config: DiagnoseConfig,
                loss_fn: LossFn | None = None) -> Diagnosis:
    """diagnose: the one diagnosis over ``adapter`` (``graphsurg._diagnose``)."""
    from ._diagnose import diagnose_adapter

    return diagnose_adapter(adapter, list(batches), config=config, loss_fn=loss_fn)


def plan_on(adapter: IRAdapter, diagnosis: Diagnosis, lib: Library, cert: Certificates,
            calib: list[Any], *, seed: int = 0, prefer: Sequence[str] = ()) -> SurgeryPlan:
    """plan: :func:`graphsurg.plan` on a torch model (it probes the sites' Jacobians);
    :func:`graphsurg._plan.plan_target` on a snapshot of any other IR's model (sites in the
    diagnosis's order, which is the graph's)."""
    if adapter.ir == "torch":
        return plan(adapter.model, diagnosis, library=lib, certificates=cert,
                    data=calib or None, input_fn=getattr(adapter, "input_fn", None),
                    prefer=prefer, seed=seed)
    order = {p.site.module: i for i, p in reversed(list(enumerate(diagnosis.problems)))}
    scratch = getattr(adapter, "scratch_target", None)
    if scratch is not None:  # a copy made only when a check takes the target's model
        return plan_target(scratch(calib, seed=seed), diagnosis, order, library=lib,
                           certificates=cert, prefer=prefer, seed=seed)
    work = adapter.snapshot()  # the planner's checks may edit the target's model
    try:
        return plan_target(adapter.target(calib, seed=seed), diagnosis, order, library=lib,
                           certificates=cert, prefer=prefer, seed=seed)
    finally:
        _take_back(adapter, work)


def _take_back(adapter: IRAdapter, snapshot: Any) -> None:
    """Restore a snapshot that is not used again: an adapter whose ``restore`` takes
    ``consume`` installs it without a copy."""
    try:
        consume = "consume" in inspect.signature(adapter.restore).parameters
    except (TypeError, ValueError):
        consume = False
    if consume:
        adapter.restore(snapshot, consume=True)  # type: ignore[call-arg]
    else:
        adapter.restore(snapshot)


class _Surgery:
    """build -> heal -> verify -> roll back, round after round until every kept schema meets
    the certificates. Every build restores the base snapshot first. A rolled-back bounded
    schema with an exact alternative (:attr:`Schema.alternative`) is replaced by it and the
    round repeated, rather than dropped."""

    def __init__(self, adapter: IRAdapter, surgery_plan: SurgeryPlan, lib: Library,
                 cert: Certificates, cfg: DiagnoseConfig, train: list[Any], held: list[Any],
                 *, loss_fn: LossFn | None, seed: int, heal_steps: int, heal_mode: str,
                 optimizer: OptimizerFactory | None, rediagnose: bool, round_no: int = 0,
                 input_loss: float | None = None) -> None:
        self.a, self.plan, self.lib, self.cert, self.cfg = adapter, surgery_plan, lib, cert, cfg
        self.train, self.held, self.calib = train, held, train[:2]
        self.loss_fn, self.seed, self.optimizer = loss_fn, seed, optimizer
        self.heal_steps, self.heal_mode, self.rediagnose = heal_steps, heal_mode, rediagnose
        self.input_fn: InputFn | None = getattr(adapter, "input_fn", None)
        self.trainable = adapter.capabilities.trainable and loss_fn is not None
        self.base = adapter.snapshot()
        self.ref_calib = adapter.run(self.calib) if self.calib else []
        self.ref_held = adapter.run(held) if held else []
        self.verif = {s.index: SchemaVerification(s.index, s.replacement, s.site.address,
                                                  exact=s.exact, round=round_no)
                      for s in surgery_plan.schemas}
        self._input_loss = input_loss
        self._undos = 0
        self._resolution: float | None = None
        self.variant: dict[int, dict[str, Any]] = {}
        self.dropped: set[int] = set()
        self.notes: list[str] = []
        self.untreated: tuple[Any, HealLog] | None = None
        if loss_fn is None and adapter.capabilities.trainable:
            self.notes.append("no loss_fn: no healing, no loss certificate"
                              + ("; gradient checks use 0.5*mean(output^2)"
                                 if adapter.capabilities.gradients else ""))
        if not held:
            self.notes.append("not verified: without data the output change and the treated "
                              "sites could not be measured")

    def kept(self) -> list[Schema]:
        return [s for s in self.plan.schemas if s.index not in self.dropped]

    def input_loss(self) -> float | None:
        """L(f): the input model's held-out loss (the base's in round 0; a follow-up round is
        given the original input's), computed once."""
        if self._input_loss is None and self.trainable and self.held:
            assert self.loss_fn is not None
            work = self.a.snapshot()
            self.a.restore(self.base)
            self._input_loss = mean_loss(self.a.model, self.held, self.loss_fn,
                                         input_fn=self.input_fn)
            self.a.restore(work)
        return self._input_loss

    def run(self, before: Diagnosis) -> SurgeryResult:
        applied: dict[int, Applied] = {}
        after: Diagnosis | None = None
        healing: dict[str, Any] = {}
        total: float | None = None
        # one round per schema that can be dropped, and one per switch to an alternative
        for _round in range(2 * len(self.plan.schemas) + 1):
            for i, v in self.verif.items():
                if i not in self.dropped:
                    v.kept, v.reasons, v.problem_after, v.grad_norms = True, [], [], {}
            applied = self.build(self.kept(), measure=True)
            failed = self.verify_exact_group(applied)
            if failed:
                self.dropped |= set(failed)
                continue
            total = (output_change(self.a.run(self.held), self.ref_held).rel
                     if self.held and self.kept() else None)
            healing, untreated_model = self.heal(applied)
            after, failed = self.verify_sites(applied)
            failed += self.verify_loss(applied, untreated_model, healing, failed)
            if not failed:
                break
            self.dropped |= {i for i in failed if not self.to_alternative(i)}
        if not self.kept():
            self.a.restore(self.base)
            after = before
            self.notes.append("every schema was rolled back: the result is a copy of the "
                              "input model")
        rolled = [{"index": v.index, "replacement": v.replacement, "site": v.site,
                   "reason": "; ".join(v.reasons)} for v in self.verif.values() if not v.kept]
        return SurgeryResult(
            model=self.a.model, plan=self.plan, before=before, after=after,
            verification=[self.verif[s.index] for s in self.plan.schemas], rolled_back=rolled,
            healing=healing, output_change=total,
            applied={i: a for i, a in applied.items() if i not in self.dropped},
            notes=list(dict.fromkeys(self.plan.notes + self.notes)), ir=self.a.ir)

    # -- build -----------------------------------------------------------------------------
    def build(self, schemas: list[Schema], *, measure: bool) -> dict[int, Applied]:
        """Apply ``schemas`` in order to the restored base. ``measure``: the first build of a
        round -- each bounded edit's output change on the calibration batches is held to
        ``max_output_change`` (its exact fallback is tried when it breaks it, then its exact
        alternative, :meth:`to_alternative`) and an edit that refuses is dropped; otherwise
        the variants chosen then are replayed."""
        self.a.restore(self.base)
        target = self.a.target(self.calib, seed=self.seed)
        applied: dict[int, Applied] = {}
        done: list[tuple[Schema, dict[str, Any]]] = []  # applied so far, for a replay
        undos = self._undos
        current = self.ref_calib
        for s in schemas:
            if not measure:
                if s.index in self.variant:
                    target, a, _ = self._try(target, s, self.variant[s.index], done, applied)
                    if a is not None:
                        applied[s.index] = a
                        done.append((s, self.variant[s.index]))
                continue
            v = self.verif[s.index]
            attempts = [("planned", s.params)] + (
                [("fallback", s.fallback)] if s.fallback is not None else [])
            reasons: list[str] = []
            broke = False  # an attempt applied and broke max_output_change (did not raise)
            for variant, params in attempts:
                target, a, why = self._try(target, s, params, done, applied)
                if a is None:
                    reasons.append(f"{variant}: {why}")
                    continue
                change = None
                if not a.exact and self.calib and not self._finite_ref():
                    self.notes.append("the input model's outputs are not finite: the output "
                                      "change of bounded edits was not measured")
                elif not a.exact and self.calib:
                    snap_new = self.a.run(self.calib)
                    change = output_change(snap_new, current, self.ref_calib).rel
                    if not change <= self.cert.max_output_change:
                        broke = True
                        target = self._replay(done, applied)
                        reasons.append(f"{variant}: output change {change:.3g} > "
                                       f"max_output_change {self.cert.max_output_change}")
                        continue
                    current = snap_new
                v.output_change, v.exact, v.details = change, a.exact, a.details
                if v.variant != "alternative" or variant != "planned":
                    v.variant = variant
                v.bound = self.cert.exact_tolerance if a.exact else self.cert.max_output_change
                applied[s.index] = a
                self.variant[s.index] = dict(params)
                done.append((s, dict(params)))
                break
            else:
                v.fail("; ".join(reasons))
                # a replacement that raised is reported, not replaced: the alternative answers
                # a broken certificate only
                alt = self.to_alternative(s.index) if broke else None
                if alt is None:
                    self.dropped.add(s.index)
                    continue
                target, a, why = self._try(target, alt, alt.params, done, applied)
                v = self.verif[alt.index]
                if a is None:
                    v.fail(f"alternative: {why}")
                    self.dropped.add(alt.index)
                    continue
                v.exact, v.variant, v.details = a.exact, "alternative", a.details
                v.bound = self.cert.exact_tolerance
                applied[alt.index] = a
                self.variant[alt.index] = dict(alt.params)
                done.append((alt, dict(alt.params)))
        if undos != self._undos and any(a.on_step is not None for a in applied.values()):
            # an undo restores a copy of the model: the healing hooks of edits applied before
            # it (a slope ramp) would drive modules no longer in it -- replay on a fresh copy
            return self.build([s for s in schemas if s.index in applied], measure=False)
        return applied

    def to_alternative(self, index: int) -> Schema | None:
        """Put schema ``index``'s exact alternative (:attr:`Schema.alternative`, another
        replacement's exact treatment of the same problem) in its place in the plan, after
        the planned (bounded) treatment was rolled back; returns the new schema, or None when
        it has none. The rolled-back treatment and why are kept in the notes; the alternative
        is verified like any schema (it has no alternative of its own)."""
        pos = next(k for k, x in enumerate(self.plan.schemas) if x.index == index)
        old = self.plan.schemas[pos]
        alt = old.alternative
        # renumbered units would break another kept schema's indices at the same layers
        if alt is None or any(set(_layers(x)) & set(_layers(old)) for x in self.kept()
                              if x.index != index):
            return None
        why = "; ".join(self.verif[index].reasons) or "certificates not met"
        new = replace(old, replacement=str(alt["replacement"]), scale=str(alt["scale"]),
                      params=dict(alt["params"]), exact=True,
                      judged_after_healing=bool(alt.get("judged_after_healing", False)),
                      fallback=None, alternative=None, graph_rewrite=alt.get("graph_rewrite"),
                      reason=f"exact alternative of {old.replacement} (rolled back: {why[:160]})"
                             f": {alt.get('reason', '')}")
        self.plan.schemas[pos] = new
        old_v = self.verif[index]
        self.verif[index] = SchemaVerification(index, new.replacement, new.site.address,
                                               exact=True, variant="alternative",
                                               round=old_v.round)
        self.variant.pop(index, None)
        self.notes.append(f"#{index} {old.replacement} at {old.site.address} was rolled back "
                          f"({why}); its exact alternative {new.replacement} was applied in "
                          "its place")
        return new

    def _finite_ref(self) -> bool:
        return all(bool(np.isfinite(_numpy(t)).all()) for t in self.ref_calib)

    def _try(self, target: Any, s: Schema, params: dict[str, Any],
             done: list[tuple[Schema, dict[str, Any]]], applied: dict[int, Applied]
             ) -> tuple[Any, Applied | None, str]:
        """Apply one schema; on failure rebuild the model as it was and say why."""
        try:
            return target, self.lib.get(s.replacement).apply(target, s.problem, dict(params)), ""
        except Exception as e:  # a failing replacement is rolled back, with why
            why = str(e) if isinstance(e, Refused | KeyError) else \
                f"{type(e).__name__}: {first_line(e)}"
            return self._replay(done, applied), None, why

    def _replay(self, done: list[tuple[Schema, dict[str, Any]]],
                applied: dict[int, Applied]) -> Any:
        """The model as it was before the failed edit: the base restored and the edits
        ``done`` so far re-applied (deterministic: seeded), their records refreshed in
        ``applied``; returns a fresh target. No copy of the model is taken before each edit
        (that made a build quadratic in model size): failures are rare, and a replay costs
        only the edits kept so far."""
        self._undos += 1
        self.a.restore(self.base)
        target = self.a.target(self.calib, seed=self.seed)
        for s, params in done:
            applied[s.index] = self.lib.get(s.replacement).apply(target, s.problem, dict(params))
        return target

    # -- verify ----------------------------------------------------------------------------
    def resolution(self) -> float:
        """The input model's own floating-point resolution on the held-out batches: the
        relative output change from re-rounding every weight within one ulp of its dtype
        (:meth:`jitter_weights` of the adapter; 0 for an adapter without it, or when the
        comparison cannot be made). An exact edit (a different float summation order) cannot
        be held below it. Measured once, on the base model; the working model is left at
        the base (the caller rebuilds)."""
        if self._resolution is None:
            self._resolution = 0.0
            jitter = getattr(self.a, "jitter_weights", None)
            if jitter is not None and self.held:
                self.a.restore(self.base)
                jitter(seed=self.seed)
                rel = output_change(self.a.run(self.held), self.ref_held).rel
                self._resolution = rel if math.isfinite(rel) else 0.0
                self.a.restore(self.base)
        return self._resolution

    def verify_exact_group(self, applied: dict[int, Applied]) -> list[int]:
        """The exact edits, together, must keep the held-out output within
        ``exact_tolerance``; when they do not, bisection finds the sites that break it."""
        exact = [s for s in self.kept() if s.index in applied and applied[s.index].exact]
        if not exact or not self.held:
            return []
        bounded = len(exact) < len([s for s in self.kept() if s.index in applied])
        changes: dict[int, float] = {}

        def change_of(group: list[Schema]) -> float:
            self.build(group, measure=False)
            rel = output_change(self.a.run(self.held), self.ref_held).rel
            changes[group[-1].index] = rel
            return rel

        tol = self.cert.exact_tolerance
        first = change_of(exact) if bounded else \
            output_change(self.a.run(self.held), self.ref_held).rel
        for s in exact:
            self.verif[s.index].output_change = first
        if first > tol and self.resolution() > tol:
            tol = self.resolution()
            self.notes.append(
                f"exact edits judged at {tol:.3g}, not exact_tolerance "
                f"{self.cert.exact_tolerance}: re-rounding every weight of the input model "
                f"(within an ulp) moves its held-out output that much already")
            if first <= tol:
                self.build(self.kept(), measure=False)
                return []
        if first <= tol:
            if bounded:
                self.build(self.kept(), measure=False)
            return []
        bad = culprits(exact, lambda g: change_of(g) > tol, known_failing=True)
        for s in bad:
            self.verif[s.index].output_change = changes.get(s.index, first)
            self.verif[s.index].fail(
                f"output change {changes.get(s.index, first):.3g} on the held-out batches > "
                f"exact tolerance {tol} (found by bisection among {len(exact)} exact edit(s))")
        return [s.index for s in bad]

    def heal(self, applied: dict[int, Applied]) -> tuple[dict[str, Any], Any]:
        """heal: fine-tune the working model when a kept edit needs it (trainable adapters
        with a loss); the untreated model gets the same fine-tune, once."""
        kept = [s for s in self.kept() if s.index in applied]
        # heal when an edit is inexact, only helps once trained, or carries a schedule that
        # acts during training (the exact ramp swap's slope rises only while healing runs)
        needs = any((not applied[s.index].exact) or s.judged_after_healing
                    or applied[s.index].on_step is not None for s in kept)
        do = self.trainable and self.heal_steps > 0 and (
            self.heal_mode == "always" or (self.heal_mode == "auto" and needs))
        if not do:
            if needs and self.a.capabilities.trainable and self.loss_fn is None:
                self.notes.append("a schema needs healing but there is no loss_fn: judged "
                                  "unhealed")
            return {"healed": False, "steps": 0, "stopped": ""}, None
        assert self.loss_fn is not None
        hooks = [a.on_step for a in applied.values() if a.on_step is not None]
        log = heal(self.a.model, self.train, self.loss_fn, steps=self.heal_steps,
                   optimizer=self.optimizer, seed=self.seed, input_fn=self.input_fn,
                   on_step=hooks)
        if self.untreated is None:
            work = self.a.snapshot()
            self.a.restore(self.base)
            model = copy.deepcopy(self.a.model)
            self.a.restore(work)
            ulog = heal(model, self.train, self.loss_fn, steps=self.heal_steps,
                        optimizer=self.optimizer, seed=self.seed, input_fn=self.input_fn)
            self.untreated = (model, ulog)
        return ({"healed": True, "steps": log.steps, "stopped": log.stopped,
                 "untreated_steps": self.untreated[1].steps}, self.untreated[0])

    def verify_sites(self, applied: dict[int, Applied]) -> tuple[Diagnosis | None, list[int]]:
        """Per-site certificates: gradient flow (where the adapter has gradients) and no
        flagged unit left at a treated site (re-diagnosis on the held-out batches)."""
        kept = [s for s in self.kept() if s.index in applied]
        grad = self.cert.require_gradient_flow and self.a.capabilities.gradients and kept
        norms = grad_norms(self.a.model, self.held[:2], self.loss_fn, self.input_fn) \
            if grad and self.held else {}
        units_checked = [s for s in kept if self._needs_unit_check(s)]
        after: Diagnosis | None = None
        if self.held and kept and (self.rediagnose or units_checked):
            try:
                after = diagnose_on(self.a, self.held, self.cfg, self.loss_fn)
            except BadInputError as e:
                self.notes.append(f"diagnosis of the operated model failed: {first_line(e)}")
        failed: list[int] = []
        for s in kept:
            v, a = self.verif[s.index], applied[s.index]
            for mod in dict.fromkeys(a.modules) if norms else ():
                g = module_grad_norm(norms, mod)
                v.grad_norms[mod] = g
                if not g > 0:
                    v.fail(f"no gradient reaches {mod!r}")
            for pname in a.new_parameters if norms else ():
                g = norms.get(pname, 0.0)
                v.grad_norms[pname] = g
                if pname in norms and not g > 0:
                    v.fail(f"new parameter {pname!r} gets no gradient")
            if s in units_checked and self.held:
                if after is None:
                    v.fail("the operated model could not be diagnosed")
                else:
                    left = still_flagged(after, s.problem.kind, s.site.module,
                                         a.units or list(s.problem.units))
                    v.problem_after = left
                    if left:
                        v.fail(f"{len(left)} treated unit(s) still flagged {s.problem.kind} "
                               "on held-out batches")
            if not v.kept:
                failed.append(s.index)
        return after, failed

    def _needs_unit_check(self, s: Schema) -> bool:
        return (self.cert.require_no_dead_units and s.problem.kind in UNIT_KINDS
                and not self.lib.get(s.replacement).removes_units)

    def verify_loss(self, applied: dict[int, Applied], untreated: Any,
                    healing: dict[str, Any], failed: list[int]) -> list[int]:
        """The loss certificates (trainable adapters with a loss), on the held-out batches:
        L(f') <= L(f) against the input (``require_loss_not_above_input``), and L(f') within
        ``max_loss_increase`` / ``max_relative_loss_increase`` of the equally fine-tuned
        untreated model's. They judge the whole model: a failure rolls back the last bounded
        (or judged-after-healing) schema."""
        kept = [s for s in self.kept() if s.index in applied]
        if not (self.trainable and kept and self.held):
            return []
        assert self.loss_fn is not None
        lt = mean_loss(self.a.model, self.held, self.loss_fn, input_fn=self.input_fn)
        li = self.input_loss()
        lu = li if untreated is None else mean_loss(untreated, self.held, self.loss_fn,
                                                    input_fn=self.input_fn)
        assert li is not None and lu is not None
        rnd = self.cert.exact_tolerance
        allow = max(self.cert.max_loss_increase,
                    self.cert.max_relative_loss_increase * abs(lu)) if math.isfinite(lu) else 0.0
        vs_untreated = math.isfinite(lt) and (
            not math.isfinite(lu) or lt <= lu + allow + rnd * max(1.0, abs(lu)))
        vs_input = math.isfinite(lt) and (
            not math.isfinite(li) or lt <= li + rnd * max(1.0, abs(li)))
        ok = vs_untreated and (vs_input or not self.cert.require_loss_not_above_input)
        healing.update(treated_loss=lt, untreated_loss=lu, input_loss=li, loss_ok=ok,
                       loss_vs_input_ok=vs_input, loss_vs_untreated_ok=vs_untreated)
        if ok or failed:
            return []
        blame = [s for s in kept if not applied[s.index].exact or s.judged_after_healing]
        victims = self._loss_culprits(kept, blame, li, lu, allow)
        why = (f"held-out loss {lt:.4g} > input model's {li:.4g} (L(f') <= L(f))"
               if not vs_input and self.cert.require_loss_not_above_input else
               f"held-out loss {lt:.4g} > untreated {lu:.4g} + {allow:.3g} (max of "
               f"max_loss_increase {self.cert.max_loss_increase} and "
               f"{self.cert.max_relative_loss_increase:.0%} of it)")
        for victim in victims:
            self.verif[victim.index].fail(why + (" (found by bisection)" if len(blame) > 1
                                                 else ""))
        return [v.index for v in victims]

    def _loss_culprits(self, kept: list[Schema], blame: list[Schema], li: float, lu: float,
                       allow: float) -> list[Schema]:
        """The bounded (or judged-after-healing) schemas that break the loss certificates,
        by bisection: each subset is rebuilt over the exact edits, healed and its held-out
        loss judged. Falls back to the last of them when no subset fails on its own."""
        group = blame or kept
        if len(group) == 1:
            return group
        loss_fn = self.loss_fn
        assert loss_fn is not None
        fixed = [s for s in kept if s not in group]
        rnd = self.cert.exact_tolerance

        def fails(sub: list[Schema]) -> bool:
            applied = self.build([s for s in kept if s in fixed or s in sub], measure=False)
            self.heal(applied)
            lt = mean_loss(self.a.model, self.held, loss_fn, input_fn=self.input_fn)
            return not (math.isfinite(lt) and lt <= lu + allow + rnd * max(1.0, abs(lu)) and (
                not self.cert.require_loss_not_above_input
                or lt <= li + rnd * max(1.0, abs(li))))

        return culprits(group, fails, known_failing=True) or [group[-1]]


def _escalating(model: nn.Module, data: Iterable[Any], *, rounds: int, **kw: Any
                ) -> SurgeryResult:
    """operate, then re-plan one scale up where a schema failed, up to ``rounds`` times."""
    batches = list(iter_batches(data, (kw.get("config") or DiagnoseConfig()).max_batches))
    res = operate(model, batches, **kw)
    history: list[dict[str, Any]] = []
    for r in range(1, rounds + 1):
        if kw.get("held_out") is not None or len(batches) < 2:
            calib = batches[:2]
        else:
            calib = batches[:-max(1, len(batches) // 4)][:2]
        try:
            nxt = plan(model, res.before, library=kw.get("library"),
                       certificates=kw.get("certificates"), data=calib,
                       input_fn=kw.get("input_fn"), prefer=kw.get("prefer", ()),
                       seed=kw.get("seed", 0), previous=res)
        except SurgeryFailed:
            break
        steps = [s for s in nxt.schemas if s.escalated_from]
        if not steps:
            break
        grouped: dict[tuple[str, str], list[Schema]] = {}
        for s in steps:
            grouped.setdefault((s.problem.kind, s.site.address), []).append(s)
        for (kind, site), group in grouped.items():
            e = group[0].escalated_from or {}
            top = max(group, key=lambda s: SCALES.index(s.scale) if s.scale in SCALES else -1)
            history.append({"round": r, "problem": kind, "site": site,
                            "from": e.get("replacement"), "from_scale": e.get("scale"),
                            "outcome": e.get("outcome"),
                            "to": "+".join(dict.fromkeys(s.replacement for s in group)),
                            "to_scale": top.scale})
        res = operate(model, batches, **{**kw, "diagnosis": res.before, "surgery_plan": nxt})
    res.escalations = history
    return res


def reset_optimizer_state(optimizer: torch.optim.Optimizer, result: SurgeryResult) -> int:
    """Zero the optimizer's moments for the parameter slices the surgery re-initialised.

    ReDo's authors found that without this, Adam's stale moments push re-initialised units
    back to dormancy. Build ``optimizer`` over ``result.model.parameters()``; call this after
    it has state (or at any time -- slices without state are skipped). Handles Adam/AdamW
    (``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``) and SGD momentum (``momentum_buffer``).

    Returns the number of state tensors reset.
    """
    params = dict(result.model.named_parameters())
    n = 0
    for a in result.applied.values():
        for name, slices in a.touched.items():
            p = params.get(name)
            if p is None or p not in optimizer.state:
                continue
            state = optimizer.state[p]
            for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer"):
                t = state.get(key)
                if not isinstance(t, torch.Tensor) or t.shape != p.shape:
                    continue
                with torch.no_grad():
                    for dim, idx in slices:
                        t.index_fill_(dim, torch.tensor(idx, dtype=torch.long,
                                                        device=t.device), 0.0)
                n += 1
    return n


__all__ = ["SurgeryResult", "operate", "operate_adapter",
           "reset_optimizer_state", "SurgeryFailed", "Schema"]
