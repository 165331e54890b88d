"""The planner: from a diagnosis to an ordered list of surgery schemas.

For each problem:

1. **Local analysis** (the site's tangent cone): the input-output Jacobian of the site's
   layer (with its activation) or of a gradient problem's span of blocks is probed with a few
   JVPs and VJPs on calibration inputs (a randomised SVD), giving its leading singular values.
   A collapsed spectrum (largest singular value tiny, or few non-negligible ones) says the
   site cannot pass signal and a larger-scale edit is needed; a healthy one that a local fix
   will do. The spectrum is kept on the schema and shown in the report.
2. **Profile selection**: the library's replacements that treat the problem's kind.
3. **Scale selection** (:func:`candidates`, asked of the library, never by name): the
   replacements that treat the problem's kind and evidence reason with an applier for the
   target's IR, those at the smallest scale expected to resolve it first
   (:func:`needed_scale`: a few dormant units, neuron; most of a layer or a collapsed layer
   spectrum, layer; a span of vanishing gradient, block), then by priority. A rank-collapsed
   Bottleneck gets the exact ``factor_low_rank`` when factoring makes the layer smaller, a
   narrow one is widened. ``prefer=`` puts named replacements first.
4. **Conflict resolution**: two schemas that would edit the same layer's units in
   incompatible ways (one ``renumbers_units``, or the same replacement twice) keep the first.
5. **Deterministic order**: by the site's position in the model, then scale
   (neuron < layer < block < module), then replacement priority.

Problems without a viable replacement are listed with the reason; :func:`plan` raises
:class:`SurgeryFailed` only when nothing at all can be treated.
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
from ._data import InputFn
from ._errors import GraphsurgError
from ._problems import Diagnosis, Problem, Site, _finite, _table, loads
from .library._base import SCALES, Library, Refused, Replacement, Target

PLAN_FORMAT = "graphsurg.plan/1"


class SurgeryFailed(GraphsurgError):
    """Nothing in the diagnosis can be treated with the library under the certificates.

    Attributes:
        untreated: ``(problem, reason)`` for every problem.
    """

    def __init__(self, message: str, untreated: Sequence[tuple[Problem, str]] = ()) -> None:
        super().__init__(message)
        self.untreated = list(untreated)


@dataclass
class Schema:
    """One planned operation: (problem, replacement, scale, site, parameters).

    Attributes:
        index: position in the plan (the order of application).
        problem: the problem it treats.
        replacement: the library entry's name.
        scale: ``neuron``, ``layer``, ``block`` or ``module``.
        site: where it operates (the problem's site).
        params: the replacement's parameters (JSON-serialisable).
        exact: the edit preserves the function at surgery (then its output change must stay
            within ``Certificates.exact_tolerance``).
        judged_after_healing: the edit helps only once trained; healing runs before judging.
        fallback: parameters of an exact variant to use when the output change of this one
            breaks ``Certificates.max_output_change`` (None: roll back instead).
        spectrum: the local Jacobian probe at the site (see :func:`jacobian_spectrum`).
        reason: why this replacement and scale were chosen.
        escalated_from: when the planner escalated (a smaller-scale schema at the site was
            rolled back or left the problem in place): ``{"replacement", "scale",
            "outcome"}`` of the schema it replaces; None otherwise.
        graph_rewrite: the edit as a graph-level rewrite (``Replacement.graph_rewrite``:
            e.g. ``{"activation": "leaky_relu", "negative_slope": 0.01}``) for the
            torch.compile backend and ``apply_plan``; None when it needs new or reshaped
            parameters.
        alternative: for a bounded schema without an exact ``fallback``: an exact treatment
            of the same problem by another replacement (``{"replacement", "scale",
            "params", "reason"}``, checked and proposed at planning), applied in its place
            when this one is rolled back (it broke ``max_output_change``, a loss certificate
            or left the problem in place); None when there is none.
    """

    index: int
    problem: Problem
    replacement: str
    scale: str
    site: Site
    params: dict[str, Any] = field(default_factory=dict)
    exact: bool = False
    judged_after_healing: bool = False
    fallback: dict[str, Any] | None = None
    spectrum: dict[str, Any] = field(default_factory=dict)
    reason: str = ""
    escalated_from: dict[str, Any] | None = None
    graph_rewrite: dict[str, Any] | None = None
    alternative: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "problem": self.problem.to_dict(),
            "replacement": self.replacement,
            "scale": self.scale,
            "site": self.site.__dict__,
            "params": self.params,
            "exact": self.exact,
            "judged_after_healing": self.judged_after_healing,
            "fallback": self.fallback,
            "spectrum": self.spectrum,
            "reason": self.reason,
            "escalated_from": self.escalated_from,
            "graph_rewrite": self.graph_rewrite,
            "alternative": self.alternative,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Schema:
        return cls(
            index=int(d["index"]),
            problem=Problem.from_dict(d["problem"]),
            replacement=str(d["replacement"]),
            scale=str(d["scale"]),
            site=Site(**d["site"]),
            params=dict(d.get("params", {})),
            exact=bool(d.get("exact", False)),
            judged_after_healing=bool(d.get("judged_after_healing", False)),
            fallback=d.get("fallback"),
            spectrum=dict(d.get("spectrum", {})),
            reason=str(d.get("reason", "")),
            escalated_from=d.get("escalated_from"),
            graph_rewrite=d.get("graph_rewrite"),
            alternative=d.get("alternative"),
        )

    def describe(self) -> str:
        kind = "exact" if self.exact else "bounded"
        return f"#{self.index} {self.replacement} ({self.scale}, {kind}) at {self.site.address}"


@dataclass
class SurgeryPlan:
    """The ordered schemas for a model, and the problems left untreated (with reasons)."""

    schemas: list[Schema] = field(default_factory=list)
    untreated: list[tuple[Problem, str]] = field(default_factory=list)
    certificates: Certificates = field(default_factory=Certificates)
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.schemas)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.schemas)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "schemas": [s.to_dict() for s in self.schemas],
            "untreated": [{"problem": p.to_dict(), "reason": r} for p, r in self.untreated],
            "certificates": self.certificates.to_dict(),
            "notes": list(self.notes),
        }

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(_finite(self.to_dict()), indent=indent)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SurgeryPlan:
        if d.get("format") != PLAN_FORMAT:
            raise ValueError(f"not a graphsurg plan (format={d.get('format')!r}); pass the "
                             "output of SurgeryPlan.to_json()")
        return cls(
            schemas=[Schema.from_dict(s) for s in d.get("schemas", [])],
            untreated=[(Problem.from_dict(u["problem"]), str(u["reason"]))
                       for u in d.get("untreated", [])],
            certificates=Certificates.from_dict(d.get("certificates", {})),
            notes=list(d.get("notes", [])),
        )

    @classmethod
    def from_json(cls, text: str) -> SurgeryPlan:
        return cls.from_dict(loads(text, "plan"))

    def summary(self) -> str:
        rows = [("#", "replacement", "scale", "site", "guarantee", "spectrum", "why")]
        for s in self.schemas:
            rows.append((str(s.index), s.replacement, s.scale, s.site.address,
                         "exact" if s.exact else "bounded", _spectrum_str(s.spectrum),
                         s.reason))
        text = f"Plan: {len(self.schemas)} schema(s)\n" + _table(rows)
        for s in self.schemas:
            if s.escalated_from:
                e = s.escalated_from
                text += (f"\nescalated: #{s.index} {s.replacement} ({s.scale}) at "
                         f"{s.site.address} after {e.get('replacement')} ({e.get('scale')}): "
                         f"{e.get('outcome')}")
        for p, r in self.untreated:
            text += f"\nuntreated: {p.kind} at {p.site.address}: {r}"
        return text + "".join(f"\nnote: {n}" for n in self.notes)


def _spectrum_str(sp: dict[str, Any]) -> str:
    if not sp or "sigma" not in sp:
        return sp.get("skipped", "-") if sp else "-"
    sig = sp["sigma"]
    return f"s1={sig[0]:.2g} sk={sig[-1]:.2g}{' collapsed' if sp.get('collapsed') else ''}"


# --------------------------------------------------------------------------------------------
# local Jacobian probe


def jacobian_spectrum(fn: Any, x: torch.Tensor, *, k: int = 6, samples: int = 4,
                      seed: int = 0) -> dict[str, Any]:
    """Leading singular values of the per-sample Jacobian of ``fn`` at calibration inputs.

    A randomised range finder on ``k`` JVPs and ``k`` VJPs per sample (no full Jacobian):
    ``Y = J V``, ``Q = qr(Y)``, ``B = Q^T J``, ``svdvals(B)``. Singular values are averaged
    over up to ``samples`` inputs.

    Returns ``{"sigma": [...] (descending), "k": k, "samples": n, "collapsed": bool,
    "numerical_rank": r}``; the spectrum is *collapsed* when ``sigma_1 < 1e-3`` or fewer
    than a quarter of the probed directions carry more than ``1e-3 * sigma_1``.
    """
    gen = torch.Generator().manual_seed(seed)
    n = min(samples, int(x.shape[0]))
    d_in = x[0].numel()
    sig_all = []
    for i in range(n):
        xi = x[i: i + 1].detach().to(torch.float32)

        def f(z: torch.Tensor, xi: torch.Tensor = xi) -> torch.Tensor:
            return fn(z.reshape(xi.shape)).reshape(-1)

        z0 = xi.reshape(-1)
        y0 = f(z0)
        kk = max(1, min(k, d_in, y0.numel()))
        cols = []
        for _ in range(kk):
            v = torch.randn(z0.shape, generator=gen)
            jv = torch.func.jvp(f, (z0,), (v,))[1]
            cols.append(jv)
        q, _ = torch.linalg.qr(torch.stack(cols, 1))
        vjp = torch.func.vjp(f, z0)[1]
        rows = [vjp(q[:, j])[0] for j in range(q.shape[1])]
        sig_all.append(torch.linalg.svdvals(torch.stack(rows, 0)))
    sig = torch.stack(sig_all).mean(0).detach()
    s1 = float(sig[0]) if sig.numel() else 0.0
    rank = int((sig > 1e-3 * max(s1, 1e-30)).sum())
    return {"sigma": [float(s) for s in sig], "k": int(sig.numel()), "samples": n,
            "numerical_rank": rank,
            "collapsed": bool(s1 < 1e-3 or rank < max(1, math.ceil(sig.numel() / 4)))}


def _site_function(target: Target, problem: Problem) -> tuple[Any, torch.Tensor] | None:
    """``(f, x)``: the map from the site's input to the end of its block, and inputs."""
    from .passes.fx.rewrite import RewriteError, block_bounds, extract_block

    span = list(problem.span or (problem.site.module,))
    try:
        x = target.capture(span[0])
    except (Refused, AttributeError, RuntimeError):
        return None
    if not x.is_floating_point():
        return None
    gm, _ = target.graph_module()
    if gm is not None:
        try:
            xin, _ = block_bounds(gm, span[0])
            _, end = block_bounds(gm, span[-1])
            sub = extract_block(gm, xin, end).eval()
            return sub, x
        except (RewriteError, KeyError, RuntimeError):
            pass
    if len(span) != 1:
        return None
    mod = target.model.get_submodule(span[0]).eval()
    return mod, x


def probe_site(target: Target, problem: Problem, *, seed: int = 0) -> dict[str, Any]:
    """The local Jacobian spectrum at a problem's site (``{"skipped": reason}`` if not
    measurable)."""
    if problem.kind == "NonFinite":
        return {"skipped": "non-finite values"}
    try:
        got = _site_function(target, problem)
        if got is None:
            return {"skipped": "site input not available"}
        fn, x = got
        was = target.model.training
        target.model.eval()
        try:
            sp = jacobian_spectrum(fn, x, seed=seed)
        finally:
            target.model.train(was)
        sp["map"] = "block" if problem.span and len(problem.span) > 1 else "layer"
        return sp
    except Exception as e:  # the probe is evidence, never a blocker
        return {"skipped": f"{type(e).__name__}: {str(e)[:100]}"}


# --------------------------------------------------------------------------------------------
# scale selection


def needed_scale(problem: Problem, spectrum: dict[str, Any]) -> str:
    """The smallest scale expected to resolve ``problem``: a few dormant or saturated units,
    ``neuron``; most of a layer (or a collapsed layer spectrum), ``layer``; a vanishing
    gradient, ``block``; anything else, the smallest scale a replacement offers."""
    frac = float(problem.evidence.get("fraction", problem.severity) or 0.0)
    if problem.kind == "DeadNeurons":
        return "layer" if frac > 0.5 or bool(spectrum.get("collapsed")) else "neuron"
    if problem.kind == "Saturation":
        return "layer" if frac > 0.5 else "neuron"
    if problem.kind == "VanishingGradient":
        return "block"
    return "neuron"


def _why(r: Replacement, problem: Problem, spectrum: dict[str, Any], need: str) -> str:
    ev = problem.evidence
    frac = float(ev.get("fraction", problem.severity) or 0.0)
    detail = {"DeadNeurons": f"{len(problem.units)} dormant unit(s), {frac:.0%} of the layer",
              "Saturation": f"{frac:.0%} of the layer saturated",
              "VanishingGradient": f"over {len(problem.span) or 1} layer(s)",
              "Bottleneck": f"{ev.get('reason', 'narrow')}"}.get(problem.kind, "")
    collapsed = ", collapsed spectrum" if spectrum.get("collapsed") else ""
    fit = "" if r.scale == need else f" (needed {need} scale)"
    return (f"{problem.kind}{f' ({detail}{collapsed})' if detail else ''}: {r.scale} scale"
            f"{fit}, {r.describe()}")


def candidates(lib: Library, problem: Problem, *, ir: str = "torch",
               spectrum: dict[str, Any] | None = None, escalating: bool = False,
               prefer: Sequence[str] = ()) -> list[tuple[list[Replacement], str]]:
    """Candidate treatments of ``problem``, preferred first: (replacements applied together,
    why). Asked of the library, never by name: the replacements that treat the problem's kind
    and evidence reason (:meth:`Replacement.accepts`) with an applier for ``ir``, those at the
    needed scale (:func:`needed_scale`) first, then larger ones, then smaller ones, each by
    priority. A replacement with ``reinit_companion`` is planned together with the one that
    ``reinitialises_units``. ``escalation_only`` replacements join only when escalating or
    preferred; ``prefer`` puts named replacements first."""
    sp = spectrum or {}
    need = SCALES.index(needed_scale(problem, sp))
    pool = [r for r in lib.treating(problem.kind, ir=ir) if r.accepts(problem)
            and (escalating or not r.escalation_only or r.name in prefer)]

    def key(r: Replacement) -> tuple[int, int, int, str]:
        s = SCALES.index(r.scale) if r.scale in SCALES else len(SCALES)
        return (int(s < need), abs(s - need), r.priority, r.name)

    pool.sort(key=key)
    rank = {n: i for i, n in enumerate(dict.fromkeys(prefer))}
    pool.sort(key=lambda r: rank.get(r.name, len(rank)))  # stable: preferred first, in order
    reinit = next((r for r in pool if r.reinitialises_units), None)
    out: list[tuple[list[Replacement], str]] = []
    for r in pool:
        group = [r, reinit] if r.reinit_companion and reinit is not None else [r]
        why = (f"preferred by the caller ({r.name})" if r.name in prefer
               else _why(r, problem, sp, SCALES[need]))
        out.append((group, why))
    return out


def _escalation(problem: Problem, previous: Any) -> dict[str, Any] | None:
    """What a previous surgery did about ``problem`` when it must be escalated: the largest
    scale tried at the site and why it did not resolve it; None when nothing failed there.

    A schema *failed* when it was rolled back or when the problem is still reported at its
    site in the diagnosis of the result."""
    if previous is None:
        return None
    prev_plan = getattr(previous, "plan", None)
    if prev_plan is None:
        return None
    verif = {v.index: v for v in getattr(previous, "verification", [])}
    after = getattr(previous, "after", None)
    persists = after is not None and any(
        p.kind == problem.kind and p.site.module == problem.site.module for p in after.problems)
    tried = [s for s in prev_plan.schemas
             if s.problem.kind == problem.kind and s.problem.site.module == problem.site.module]
    if not tried:
        return None
    rolled = [s for s in tried if s.index in verif and not verif[s.index].kept]
    if not rolled and not persists:
        return None
    top = max(tried, key=lambda s: SCALES.index(s.scale) if s.scale in SCALES else -1)
    if rolled:
        v = verif[rolled[-1].index]
        outcome = "rolled back: " + ("; ".join(v.reasons) or "certificates not met")
    else:
        outcome = "the problem persists after surgery"
    return {"replacement": "+".join(dict.fromkeys(s.replacement for s in tried)),
            "scale": top.scale, "outcome": outcome[:300]}


def _at_least(group: list[Replacement], scale: str) -> bool:
    """The treatment reaches beyond ``scale`` (its largest scale is above it)."""
    top = max(SCALES.index(r.scale) if r.scale in SCALES else -1 for r in group)
    return top > SCALES.index(scale)


def plan(model: nn.Module, diagnosis: Diagnosis, *, library: Library | None = None,
         certificates: Certificates | None = None, data: Iterable[Any] | None = None,
         input_fn: InputFn | None = None, prefer: Sequence[str] = (), seed: int = 0,
         probe: bool = True, previous: Any = None) -> SurgeryPlan:
    """Plan one schema per treatable problem of ``diagnosis`` on ``model``.

    Args:
        model: the diagnosed model (not modified: the planner works on a copy).
        diagnosis: from :func:`graphsurg.diagnose`.
        library: replacements to choose from (default: :func:`graphsurg.default_library`).
        certificates: bounds the schemas must keep; ``require_exact=True`` plans only
            function-preserving variants.
        data: calibration batches, needed to check couplings, measure constant units and probe
            Jacobians (without data only structural checks run and nothing is probed).
        input_fn: ``batch -> (args, kwargs)`` for the model (default: see ``graphsurg._data``).
        prefer: replacement names to try first for every problem (e.g. ``["excise_dead"]``).
        seed: seeds every random draw of the schemas.
        probe: run the local Jacobian probe.
        previous: a :class:`graphsurg.SurgeryResult` of an earlier attempt on this model and
            diagnosis. Escalation: a problem whose schema was rolled back, or which is still
            reported at its site after it, is planned one scale up (neuron -> layer -> block
            -> module) and the schema records ``escalated_from``.

    Returns:
        a :class:`SurgeryPlan`. Raises :class:`SurgeryFailed` when no problem can be treated
        (the exception lists each problem's reason).

    Example::

        d = gs.diagnose(model, batches, loss_fn=loss)
        p = gs.plan(model, d, data=batches)
        print(p.summary())
    """
    from .library import default_library

    lib = library if library is not None else default_library()
    cert = certificates if certificates is not None else Certificates()
    if not diagnosis.problems:
        raise SurgeryFailed("the diagnosis found no problems: there is nothing to operate on")
    batches = list(data) if data is not None else []
    if not batches:
        result = SurgeryPlan(certificates=cert)
        result.notes.append("no calibration data: couplings were checked structurally only "
                            "and no Jacobian was probed")
        return _plan_without_data(model, diagnosis, lib, cert, result)
    target = Target(copy.deepcopy(model), batches[:2], input_fn=input_fn, seed=seed)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return plan_target(target, diagnosis, order, library=lib, certificates=cert,
                       prefer=prefer, seed=seed, probe=probe, previous=previous)


def plan_target(target: Any, diagnosis: Diagnosis, order: dict[str, int], *,
                library: Library, certificates: Certificates, prefer: Sequence[str] = (),
                seed: int = 0, probe: bool = True, previous: Any = None) -> SurgeryPlan:
    """:func:`plan` on a target of either IR (a torch ``Target`` or an ``OnnxTarget``, a
    private copy: checks may edit it). ``order`` maps a site's module (ONNX: node name) to its
    position in the model. The Jacobian probe runs on torch targets only; on a target that
    cannot heal (ONNX), exact fallbacks that only help through healing are not planned."""
    lib, cert = library, certificates
    result = SurgeryPlan(certificates=cert)
    if not diagnosis.problems:
        raise SurgeryFailed("the diagnosis found no problems: there is nothing to operate on")
    ir = str(getattr(target, "ir", "torch"))
    can_heal = ir == "torch"
    chosen: list[tuple[tuple[int, int, int, int], Schema]] = []
    claimed: dict[str, tuple[Replacement, int]] = {}  # layer -> (replacement, problem index)
    for pi, problem in enumerate(diagnosis.problems):
        spectrum = probe_site(target, problem, seed=seed) if probe and can_heal else {}
        esc = _escalation(problem, previous)
        options = candidates(lib, problem, ir=ir, spectrum=spectrum,
                             escalating=esc is not None, prefer=prefer)
        if esc is not None:
            options = [(group, f"escalated from {esc['replacement']} ({esc['scale']}, "
                               f"{esc['outcome'][:80]}): {why}")
                       for group, why in options if _at_least(group, esc["scale"])]
            if not options:
                result.untreated.append((problem, f"{esc['replacement']} ({esc['scale']}) "
                                         f"failed ({esc['outcome'][:120]}) and no replacement "
                                         "at a larger scale treats " + problem.kind))
                continue
        if not options:
            result.untreated.append((problem, f"no replacement in the library treats "
                                              f"{problem.kind}" + (f" on {ir}" if ir != "torch"
                                                                   else "")))
            continue
        reasons = []
        picked: list[Schema] | None = None
        for group, why in options:
            schemas: list[Schema] = []
            failed = ""
            for r in group:
                n = r.name
                try:
                    refusal = r.check(problem, target)
                    if refusal is None:
                        params = r.propose(problem, target, exact=cert.require_exact)
                except Exception as e:  # a broken replacement is reported
                    refusal = f"{n} raised {type(e).__name__}: {e}"
                if refusal:
                    failed = f"{n}: {refusal}"
                    break
                params["seed"] = seed
                exact = r.is_exact(params)
                fallback = r.exact_fallback(params) if not exact else None
                if fallback is not None and not can_heal and r.fallback_needs_healing:
                    fallback = None
                if cert.require_exact and not exact:
                    if fallback is None:
                        failed = f"{n}: not exact and the certificates require exactness"
                        break
                    params, exact, fallback = fallback, True, None
                schemas.append(Schema(
                    index=-1, problem=problem, replacement=n, scale=r.scale,
                    site=problem.site, params=params, exact=exact,
                    judged_after_healing=r.judged_after_healing, fallback=fallback,
                    spectrum=spectrum, reason=why, escalated_from=esc,
                    graph_rewrite=r.graph_rewrite(params)))
            if failed:
                reasons.append(failed)
                continue
            conflict = _conflict(schemas, group, claimed)
            if conflict:
                reasons.append(conflict)
                continue
            picked = schemas
            break
        if picked is None:
            result.untreated.append((problem, "; ".join(reasons) or "no viable replacement"))
            continue
        if len(picked) == 1 and not picked[0].exact and picked[0].fallback is None:
            rest = options[[g for g, _ in options].index(group) + 1:]
            picked[0].alternative = _exact_alternative(problem, target, rest, claimed, seed)
        for s in picked:
            r = lib.get(s.replacement)
            for layer in _layers(s):
                claimed.setdefault(layer, (r, pi))
            pos = order.get(s.site.module, len(order))
            # within a site: neuron-scale edits (indices still valid) before layer-scale ones
            key = (pos, SCALES.index(s.scale) if s.scale in SCALES else 9,
                   0 if r.reinitialises_units else r.priority, pi)
            chosen.append((key, s))
    chosen.sort(key=lambda t: t[0])
    for i, (_, s) in enumerate(chosen):
        s.index = i
        result.schemas.append(s)
    if not result.schemas:
        raise SurgeryFailed(
            "no problem could be treated: " + "; ".join(
                f"{p.kind} at {p.site.address}: {r}" for p, r in result.untreated),
            result.untreated)
    return result


def _exact_alternative(problem: Problem, target: Any,
                       options: list[tuple[list[Replacement], str]],
                       claimed: dict[str, tuple[Replacement, int]], seed: int
                       ) -> dict[str, Any] | None:
    """The first of ``options`` (single replacements, in the planner's order) that treats
    ``problem`` exactly at ``target`` and conflicts with no schema planned so far: what
    operate applies when the bounded schema planned for it is rolled back."""
    for group, why in options:
        if len(group) != 1:
            continue
        r = group[0]
        try:
            if r.check(problem, target) is not None:
                continue
            params = r.propose(problem, target, exact=True)
        except Exception:  # a replacement that cannot say is no alternative
            continue
        params["seed"] = seed
        if not r.is_exact(params):
            continue
        alt = Schema(index=-1, problem=problem, replacement=r.name, scale=r.scale,
                     site=problem.site, params=params, exact=True)
        if _conflict([alt], [r], claimed):
            continue
        return {"replacement": r.name, "scale": r.scale, "params": params,
                "judged_after_healing": r.judged_after_healing,
                "graph_rewrite": r.graph_rewrite(params), "reason": why}
    return None


def _layers(s: Schema) -> list[str]:
    return list(s.params.get("span") or s.params.get("layers") or [s.site.module])


def _conflict(schemas: list[Schema], group: list[Replacement],
              claimed: dict[str, tuple[Replacement, int]]) -> str:
    """A reason when a schema would edit units another schema already edits incompatibly
    (the same replacement twice, or either one ``renumbers_units``)."""
    for s, r in zip(schemas, group, strict=True):
        for layer in _layers(s):
            if layer not in claimed:
                continue
            other, _ = claimed[layer]
            if other.name == r.name or r.renumbers_units or other.renumbers_units:
                return f"{r.name}: conflicts with {other.name} already planned at {layer!r}"
    return ""


def _plan_without_data(model: nn.Module, diagnosis: Diagnosis, lib: Library,
                       cert: Certificates, result: SurgeryPlan) -> SurgeryPlan:
    """Structural planning: scale selection without checks that need data."""
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    for problem in diagnosis.problems:
        options = candidates(lib, problem)
        if not options:
            result.untreated.append((problem, f"no replacement in the library treats "
                                              f"{problem.kind}"))
            continue
        group, why = options[0]
        for r in group:
            params: dict[str, Any] = {"units": list(problem.units)} if problem.units else {}
            if problem.span:
                params["span"] = list(problem.span)
            params.update(r.structural_params(problem, cert.require_exact))
            params["exact"] = r.is_exact(params) if "variant" in params else \
                r.guarantee == "exact"
            result.schemas.append(Schema(
                index=len(result.schemas), problem=problem, replacement=r.name,
                scale=r.scale, site=problem.site, params=params,
                exact=bool(params["exact"]), judged_after_healing=r.judged_after_healing,
                fallback=r.exact_fallback(params), reason=why,
                graph_rewrite=r.graph_rewrite(params)))
    result.schemas.sort(key=lambda s: (order.get(s.site.module, len(order)), s.index))
    for i, s in enumerate(result.schemas):
        s.index = i
    if not result.schemas:
        raise SurgeryFailed("no problem could be treated: " + "; ".join(
            f"{p.kind} at {p.site.address}: {r}" for p, r in result.untreated), result.untreated)
    return result
