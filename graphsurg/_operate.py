"""operate: diagnose, plan, excise and paste on a copy, heal, verify, roll back.

The input model is never modified: every edit happens on a deep copy, and a schema that
fails is rolled back by rebuilding the copy without it (so no half-operated model is ever
returned).
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ._certificates import Certificates
from ._config import DiagnoseConfig
from ._data import InputFn, iter_batches
from ._errors import BadInputError, first_line
from ._heal import HealLog, LossFn, OptimizerFactory, heal, mean_loss
from ._plan import Schema, SurgeryFailed, SurgeryPlan, plan
from ._problems import Diagnosis, _finite, _table
from ._verify import (
    SchemaVerification,
    grad_norms,
    module_grad_norm,
    outputs,
    relative_change,
    still_flagged,
)
from .library._base import SCALES, Applied, Library, Refused, Target

RESULT_FORMAT = "graphsurg.surgery/1"


@dataclass
class SurgeryResult:
    """The outcome of :func:`operate`.

    Attributes:
        model: the operated (and healed) model -- a new module; the input is untouched.
        plan: the plan that was executed.
        before / after: diagnoses of the input model and of the result (held-out batches).
        verification: one :class:`SchemaVerification` per planned schema.
        rolled_back: ``{"index", "replacement", "site", "reason"}`` per rolled-back schema.
        healing: fine-tune record: steps, treated and untreated losses.
        output_change: total ``||f' - f|| / ||f||`` of the result before healing.
        applied: per kept schema index, what it changed (for
            :func:`reset_optimizer_state`).
        notes: anything the user should know.
        escalations: one record per escalation (``operate(..., escalate=n)``): the round,
            the problem and site, what was tried (replacement, scale, outcome) and what the
            next plan did instead.
    """

    model: nn.Module
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

    @property
    def kept(self) -> list[int]:
        return [v.index for v in self.verification if v.kept]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": RESULT_FORMAT,
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
        }

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(_finite(self.to_dict()), indent=indent)

    def summary(self) -> str:
        rows = [("#", "replacement", "site", "kept", "exact", "output change", "why")]
        for v in self.verification:
            oc = "n/a" if v.output_change is None else f"{v.output_change:.2e}"
            rows.append((str(v.index), v.replacement + ("*" if v.variant != "planned" else ""),
                         v.site, "yes" if v.kept else "ROLLED BACK", "yes" if v.exact else "no",
                         oc, "; ".join(v.reasons)))
        h = self.healing
        lines = [f"Surgery: {len(self.kept)} of {len(self.verification)} schema(s) kept",
                 _table(rows)]
        if h.get("steps"):
            lines.append(f"healing: {h['steps']} step(s); loss treated "
                         f"{_f(h.get('treated_loss'))} vs untreated {_f(h.get('untreated_loss'))}")
        # by module, not graph node: a rewrite renames later nodes (relu_2 -> relu_1)
        before = {(p.kind, p.site.module) for p in self.before.problems}
        after = {(p.kind, p.site.module) for p in self.after.problems} if self.after else set()
        lines.append(f"problems: {len(before)} before, {len(after)} after "
                     f"({len(before - after)} resolved)")
        if any(v.variant != "planned" for v in self.verification):
            lines.append("*: the exact fallback variant was applied")
        for e in self.escalations:
            lines.append(f"escalation (round {e['round']}): {e['problem']} at {e['site']}: "
                         f"{e['from']} ({e['from_scale']}) {e['outcome']} -> {e['to']} "
                         f"({e['to_scale']})")
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def _f(x: Any) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def operate(model: nn.Module, data: Iterable[Any], *, loss_fn: LossFn | None = None,
            library: Library | None = None, certificates: Certificates | None = None,
            config: DiagnoseConfig | None = None, diagnosis: Diagnosis | None = None,
            surgery_plan: SurgeryPlan | None = None, heal_steps: int = 100,
            heal_mode: str = "auto", optimizer: OptimizerFactory | None = None,
            input_fn: InputFn | None = None, prefer: Sequence[str] = (), seed: int = 0,
            held_out: Sequence[Any] | None = None, rediagnose: bool = True,
            escalate: int = 0) -> SurgeryResult:
    """Diagnose ``model``, plan, operate on a copy, heal, verify and roll back failures.

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
    from . import diagnose as _diagnose

    if escalate > 0:
        return _escalating(model, data, rounds=escalate, loss_fn=loss_fn, library=library,
                           certificates=certificates, config=config, diagnosis=diagnosis,
                           surgery_plan=surgery_plan, heal_steps=heal_steps,
                           heal_mode=heal_mode, optimizer=optimizer, input_fn=input_fn,
                           prefer=prefer, seed=seed, held_out=held_out, rediagnose=rediagnose)
    if not isinstance(model, nn.Module):
        raise BadInputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if heal_mode not in ("auto", "always", "never"):
        raise BadInputError(f"heal_mode must be 'auto', 'always' or 'never', got {heal_mode!r}")
    cfg = config or DiagnoseConfig()
    cert = certificates or Certificates()
    batches = list(iter_batches(data, cfg.max_batches))
    if held_out is not None:
        held = list(held_out)
        train = batches
    elif len(batches) >= 2:
        k = max(1, len(batches) // 4)
        train, held = batches[:-k], batches[-k:]
    else:
        train, held = batches, batches
    calib = train[:2]
    notes: list[str] = []
    base = copy.deepcopy(model)  # every edit starts from this private copy
    before = diagnosis if diagnosis is not None else _diagnose(
        copy.deepcopy(base), batches, loss_fn=loss_fn, config=cfg, input_fn=input_fn)
    if surgery_plan is None:
        surgery_plan = plan(base, before, library=library, certificates=cert, data=calib,
                            input_fn=input_fn, prefer=prefer, seed=seed)
    lib = library
    if lib is None:
        from .library import default_library

        lib = default_library()
    if loss_fn is None:
        notes.append("no loss_fn: no healing, no loss certificate; gradient checks use "
                     "0.5*mean(output^2)")
    ref = outputs(base, calib, input_fn)
    verif = {s.index: SchemaVerification(s.index, s.replacement, s.site.address, exact=s.exact)
             for s in surgery_plan.schemas}
    dropped: set[int] = set()
    untreated_cache: dict[str, Any] = {}
    work: nn.Module = base
    applied: dict[int, Applied] = {}
    healed = HealLog()
    after: Diagnosis | None = None
    total_change: float | None = None
    for _round in range(len(surgery_plan.schemas) + 1):
        for v in verif.values():
            if v.index not in dropped:
                v.kept, v.reasons, v.problem_after, v.grad_norms = True, [], [], {}
        work, applied = _build(base, surgery_plan, lib, cert, calib, input_fn, seed, ref,
                               verif, dropped)
        total_change = relative_change(outputs(work, calib, input_fn), ref, ref)
        kept = [s for s in surgery_plan.schemas if s.index not in dropped]
        # heal when an edit is inexact, only helps once trained, or carries a schedule that acts
        # during training (the exact ramp swap's slope rises only while healing runs)
        needs = any((not applied[s.index].exact) or s.judged_after_healing
                    or applied[s.index].on_step is not None for s in kept)
        do_heal = loss_fn is not None and heal_steps > 0 and (
            heal_mode == "always" or (heal_mode == "auto" and needs))
        healed = HealLog()
        if do_heal:
            assert loss_fn is not None
            hooks = [a.on_step for i, a in applied.items() if a.on_step is not None]
            healed = heal(work, train, loss_fn, steps=heal_steps, optimizer=optimizer,
                          seed=seed, input_fn=input_fn, on_step=hooks)
            if "model" not in untreated_cache:
                untreated = copy.deepcopy(base)
                ulog = heal(untreated, train, loss_fn, steps=heal_steps, optimizer=optimizer,
                            seed=seed, input_fn=input_fn)
                untreated_cache.update(model=untreated, log=ulog)
        elif needs and loss_fn is None:
            notes.append("a schema needs healing but there is no loss_fn: judged unhealed")
        untreated_model = untreated_cache.get("model", base) if do_heal else base
        # -- verify ------------------------------------------------------------------------
        norms = grad_norms(work, held[:2], loss_fn, input_fn) if kept else {}
        after = None
        if rediagnose and kept:
            try:
                after = _diagnose(copy.deepcopy(work), held, loss_fn=loss_fn, config=cfg,
                                  input_fn=input_fn)
            except Exception as e:  # reported; certificates needing it fail
                notes.append(f"diagnosis of the operated model failed: {first_line(e)}")
        failed_now: list[int] = []
        for s in kept:
            v, a = verif[s.index], applied[s.index]
            if cert.require_gradient_flow:
                for mod in dict.fromkeys(a.modules):
                    g = module_grad_norm(norms, mod)
                    v.grad_norms[mod] = g
                    if not g > 0:
                        v.fail(f"no gradient reaches {mod!r}")
                for pname in a.new_parameters:
                    g = norms.get(pname, 0.0)
                    v.grad_norms[pname] = g
                    if pname in norms and not g > 0:
                        v.fail(f"new parameter {pname!r} gets no gradient")
            if cert.require_no_dead_units and s.problem.kind in (
                    "DeadNeurons", "Saturation", "NonFinite") and s.replacement != "excise_dead":
                units = a.units or list(s.problem.units)
                if rediagnose and after is None:
                    v.fail("the operated model could not be diagnosed")
                else:
                    left = still_flagged(after, s.problem.kind, s.site.module, units)
                    v.problem_after = left
                    if left:
                        v.fail(f"{len(left)} treated unit(s) still flagged {s.problem.kind} "
                               "on held-out batches")
            if not v.kept:
                failed_now.append(s.index)
        loss_info: dict[str, Any] = {}
        if loss_fn is not None and kept:
            lt = mean_loss(work, held, loss_fn, input_fn=input_fn)
            lu = mean_loss(untreated_model, held, loss_fn, input_fn=input_fn)
            tol = cert.exact_tolerance * max(1.0, abs(lu)) if math.isfinite(lu) else 0.0
            ok = (math.isfinite(lt) and (not math.isfinite(lu) or
                                         lt <= lu + cert.max_loss_increase + tol))
            loss_info = {"treated_loss": lt, "untreated_loss": lu, "loss_ok": ok}
            if not ok and not failed_now:
                blame = [s for s in kept if not applied[s.index].exact or s.judged_after_healing]
                victim = (blame or kept)[-1]
                verif[victim.index].fail(
                    f"held-out loss {lt:.4g} > untreated {lu:.4g} + {cert.max_loss_increase}"
                    " (rolled back as the last bounded schema)")
                failed_now.append(victim.index)
        healing = {"healed": do_heal, "steps": healed.steps, "stopped": healed.stopped,
                   **({"untreated_steps": untreated_cache["log"].steps}
                      if do_heal and "log" in untreated_cache else {}), **loss_info}
        if not failed_now:
            break
        dropped |= set(failed_now)
    result_model = work
    if not [s for s in surgery_plan.schemas if s.index not in dropped]:
        result_model = copy.deepcopy(model)
        after = before
        notes.append("every schema was rolled back: the result is a copy of the input model")
    result_model.train(model.training)
    rolled = [{"index": v.index, "replacement": v.replacement, "site": v.site,
               "reason": "; ".join(v.reasons)} for v in verif.values() if not v.kept]
    return SurgeryResult(
        model=result_model, plan=surgery_plan, before=before, after=after,
        verification=[verif[s.index] for s in surgery_plan.schemas], rolled_back=rolled,
        healing=healing, output_change=total_change,
        applied={i: a for i, a in applied.items() if i not in dropped},
        notes=list(dict.fromkeys(surgery_plan.notes + notes)))


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


def _build(base: nn.Module, surgery_plan: SurgeryPlan, lib: Library, cert: Certificates,
           calib: list[Any], input_fn: InputFn | None, seed: int, ref: list[torch.Tensor],
           verif: dict[int, SchemaVerification], dropped: set[int]
           ) -> tuple[nn.Module, dict[int, Applied]]:
    """Apply the plan's schemas (minus ``dropped``) in order to a fresh copy of ``base``.

    A schema that raises or breaks its output-change bound is undone at once (its exact
    fallback is tried first when it has one) and added to ``dropped``.
    """
    target = Target(copy.deepcopy(base), calib, input_fn=input_fn, seed=seed)
    applied: dict[int, Applied] = {}
    current = ref
    for s in surgery_plan.schemas:
        if s.index in dropped:
            continue
        v = verif[s.index]
        attempts: list[tuple[str, dict[str, Any]]] = [("planned", s.params)]
        if s.fallback is not None:
            attempts.append(("fallback", s.fallback))
        reasons: list[str] = []
        for variant, params in attempts:
            snapshot = copy.deepcopy(target.model)
            try:
                r = lib.get(s.replacement)
                a = r.apply(target, s.problem, dict(params))
                new = outputs(target.model, calib, input_fn)
            except Exception as e:  # a failing replacement is rolled back
                target.set_model(snapshot)
                why = str(e) if isinstance(e, Refused | KeyError) else \
                    f"{type(e).__name__}: {first_line(e)}"
                reasons.append(f"{variant}: {why}")
                continue
            change = relative_change(new, current, ref)
            exact = a.exact
            bound = cert.exact_tolerance if exact else cert.max_output_change
            if change is not None and not change <= bound:
                target.set_model(snapshot)
                reasons.append(f"{variant}: output change {change:.3g} > "
                               f"{'exact tolerance' if exact else 'max_output_change'} {bound}")
                continue
            v.output_change, v.bound, v.exact, v.variant = change, bound, exact, variant
            v.details = a.details
            applied[s.index] = a
            current = new
            break
        else:
            v.kept = False
            v.reasons = reasons
            dropped.add(s.index)
    return target.model, applied


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


__all__ = ["SurgeryResult", "operate", "reset_optimizer_state", "SurgeryFailed", "Schema"]
