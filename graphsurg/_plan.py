"""The planner: from a diagnosis to an ordered list of surgery schemas.

For each problem:

1. **Local analysis** (the site's tangent cone): the input-output Jacobian of the site's
   layer (with its activation) or of a gradient problem's span of blocks is probed with a few
   JVPs and VJPs on calibration inputs (a randomised SVD), giving its leading singular values.
   A collapsed spectrum (largest singular value tiny, or few non-negligible ones) says the
   site cannot pass signal and a larger-scale edit is needed; a healthy one that a local fix
   will do. The spectrum is kept on the schema and shown in the report.
2. **Profile selection**: the library's replacements that treat the problem's kind.
3. **Scale selection**: the smallest scale expected to resolve it -- a few dormant units:
   ``reinit_dead``; most of a layer dead, or a collapsed layer spectrum: ``activation_swap``
   plus ``reinit_dead``; a span of vanishing gradient: ``residual_bypass`` over the span
   (residual conversion unless the certificates demand exactness); a bottleneck: ``widen``;
   exploding gradients: ``norm_insert``. ``prefer=`` puts named replacements first.
4. **Conflict resolution**: two schemas that would edit the same layer's units in
   incompatible ways (e.g. excising units another schema re-initialises) keep the first.
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
from .library._base import SCALES, Library, Refused, Target

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
    except Exception as e:  # noqa: BLE001 - the probe is evidence, never a blocker
        return {"skipped": f"{type(e).__name__}: {str(e)[:100]}"}


# --------------------------------------------------------------------------------------------
# scale selection


def _options(problem: Problem, spectrum: dict[str, Any], exact: bool
             ) -> list[tuple[list[str], str]]:
    """Candidate treatments, preferred first: (replacement names applied together, why)."""
    kind = problem.kind
    frac = float(problem.evidence.get("fraction", problem.severity) or 0.0)
    collapsed = bool(spectrum.get("collapsed"))
    if kind == "DeadNeurons":
        small = [(["reinit_dead"], f"{len(problem.units)} dormant unit(s) ({frac:.0%} of the "
                                   "layer): neuron scale"),
                 (["excise_dead"], "constant units: excise and fold (neuron scale)")]
        big = [(["activation_swap", "reinit_dead"],
                f"{frac:.0%} of the layer dormant" + (", collapsed layer spectrum" if collapsed
                                                      else "") + ": layer scale")]
        return big + small if (frac > 0.5 or collapsed) else small + big
    if kind == "VanishingGradient":
        return [(["residual_bypass"], f"vanishing gradient over {len(problem.span) or 1} "
                 "layer(s)" + (" with a collapsed block spectrum" if collapsed else "")
                 + ": block scale")]
    if kind == "ExplodingGradient":
        return [(["norm_insert"], "exploding gradient: identity-initialised norm")]
    if kind == "Bottleneck":
        return [(["widen"], f"bottleneck ({problem.evidence.get('reason', 'narrow')}): "
                 "Net2Net widening")]
    if kind == "Saturation":
        if frac > 0.5:
            return [(["norm_insert"], f"{frac:.0%} of the layer saturated: standardise the "
                     "pre-activations"), (["reinit_dead"], "reset saturated units")]
        return [(["reinit_dead"], "reset saturated units (neuron scale)"),
                (["norm_insert"], "standardise the pre-activations")]
    if kind == "NonFinite":
        return [(["reinit_dead"], "reset the units whose weights are non-finite")]
    if kind == "Overfitting":
        return [(["dropout"], "held-out gap with co-adapting units: dropout after the layer "
                 "(changes training only)")]
    if kind == "LostPlasticity":
        return [(["plasticity_injection"], "head lost plasticity: inject a fresh copy minus "
                 "its frozen twin")]
    if kind == "MixingCollapse":
        return [(["attention"], "token mixing collapsed: zero-gated self-attention")]
    return []


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


def _at_least(lib: Library, names: list[str], scale: str) -> bool:
    """The treatment reaches beyond ``scale`` (its largest scale is above it)."""
    top = max(SCALES.index(_scale_of(lib, n)) if n in lib else -1 for n in names)
    return top > SCALES.index(scale)


def _scale_of(lib: Library, name: str) -> str:
    return lib.get(name).scales[0] if name in lib and lib.get(name).scales else "layer"


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
    result = SurgeryPlan(certificates=cert)
    if not diagnosis.problems:
        raise SurgeryFailed("the diagnosis found no problems: there is nothing to operate on")
    batches = list(data) if data is not None else []
    if not batches:
        result.notes.append("no calibration data: couplings were checked structurally only "
                            "and no Jacobian was probed")
        return _plan_without_data(model, diagnosis, lib, cert, result)
    work = copy.deepcopy(model)
    target = Target(work, batches[:2], input_fn=input_fn, seed=seed)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    chosen: list[tuple[tuple[int, int, int, int], Schema]] = []
    claimed: dict[str, tuple[str, int]] = {}  # layer -> (replacement, problem index)
    for pi, problem in enumerate(diagnosis.problems):
        spectrum = probe_site(target, problem, seed=seed) if probe else {}
        options = _options(problem, spectrum, cert.require_exact)
        for name in reversed(list(prefer)):
            if name in lib and problem.kind in lib.get(name).treats:
                options = [([name], f"preferred by the caller ({name})")] + [
                    o for o in options if o[0] != [name]]
        esc = _escalation(problem, previous)
        extra = [r.name for r in lib.treating(problem.kind)
                 if all(r.name not in o[0] for o in options)
                 and (esc is not None or not getattr(r, "escalation_only", False))]
        options += [([n], f"registered replacement {n!r} treats {problem.kind}") for n in extra]
        if esc is not None:
            options = [(names, f"escalated from {esc['replacement']} ({esc['scale']}, "
                               f"{esc['outcome'][:80]}): {why}")
                       for names, why in options if _at_least(lib, names, esc["scale"])]
            if not options:
                result.untreated.append((problem, f"{esc['replacement']} ({esc['scale']}) "
                                         f"failed ({esc['outcome'][:120]}) and no replacement "
                                         "at a larger scale treats " + problem.kind))
                continue
        if not options:
            result.untreated.append((problem, f"no replacement in the library treats "
                                              f"{problem.kind}"))
            continue
        reasons = []
        picked: list[Schema] | None = None
        for names, why in options:
            missing = [n for n in names if n not in lib]
            if missing:
                reasons.append(f"{'+'.join(names)}: not in the library")
                continue
            schemas: list[Schema] = []
            failed = ""
            for n in names:
                r = lib.get(n)
                try:
                    refusal = r.check(problem, target)
                    if refusal is None:
                        params = r.propose(problem, target, exact=cert.require_exact)
                except Exception as e:  # noqa: BLE001 - a broken replacement is reported
                    refusal = f"{n} raised {type(e).__name__}: {e}"
                if refusal:
                    failed = f"{n}: {refusal}"
                    break
                params["seed"] = seed
                exact = r.is_exact(params)
                if cert.require_exact and not exact:
                    fb = r.exact_fallback(params)
                    if fb is None:
                        failed = f"{n}: not exact and the certificates require exactness"
                        break
                    params, exact = fb, True
                schemas.append(Schema(
                    index=-1, problem=problem, replacement=n, scale=_scale_of(lib, n),
                    site=problem.site, params=params, exact=exact,
                    judged_after_healing=r.judged_after_healing,
                    fallback=None if exact else r.exact_fallback(params),
                    spectrum=spectrum, reason=why, escalated_from=esc))
            if failed:
                reasons.append(failed)
                continue
            conflict = _conflict(schemas, claimed)
            if conflict:
                reasons.append(conflict)
                continue
            picked = schemas
            break
        if picked is None:
            result.untreated.append((problem, "; ".join(reasons) or "no viable replacement"))
            continue
        for s in picked:
            for layer in _layers(s):
                claimed.setdefault(layer, (s.replacement, pi))
            pos = order.get(s.site.module, len(order))
            # within a site: neuron-scale edits (indices still valid) before layer-scale ones
            key = (pos, SCALES.index(s.scale) if s.scale in SCALES else 9,
                   0 if s.replacement == "reinit_dead" else lib.get(s.replacement).priority, pi)
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


_RENUMBERING = {"excise_dead", "widen"}


def _layers(s: Schema) -> list[str]:
    return list(s.params.get("span") or s.params.get("layers") or [s.site.module])


def _conflict(schemas: list[Schema], claimed: dict[str, tuple[str, int]]) -> str:
    """A reason when a schema would edit units another schema already edits incompatibly."""
    for s in schemas:
        for layer in _layers(s):
            if layer not in claimed:
                continue
            other, _ = claimed[layer]
            if other == s.replacement or s.replacement in _RENUMBERING or \
                    other in _RENUMBERING:
                return (f"{s.replacement}: conflicts with {other} already planned at "
                        f"{layer!r}")
    return ""


def _plan_without_data(model: nn.Module, diagnosis: Diagnosis, lib: Library,
                       cert: Certificates, result: SurgeryPlan) -> SurgeryPlan:
    """Structural planning: scale selection without checks that need data."""
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    for pi, problem in enumerate(diagnosis.problems):
        options = _options(problem, {}, cert.require_exact)
        picked = None
        for names, why in options:
            if all(n in lib for n in names):
                picked = (names, why)
                break
        if picked is None:
            result.untreated.append((problem, f"no replacement in the library treats "
                                              f"{problem.kind}"))
            continue
        for n in picked[0]:
            r = lib.get(n)
            params: dict[str, Any] = {"units": list(problem.units)} if problem.units else {}
            if problem.span:
                params["span"] = list(problem.span)
            if n == "residual_bypass":
                params["variant"] = "gated" if cert.require_exact else "residual"
            params["exact"] = r.is_exact(params) if "variant" in params else \
                r.guarantee == "exact"
            result.schemas.append(Schema(
                index=len(result.schemas), problem=problem, replacement=n,
                scale=_scale_of(lib, n), site=problem.site, params=params,
                exact=bool(params["exact"]), judged_after_healing=r.judged_after_healing,
                fallback=r.exact_fallback(params), reason=picked[1]))
        del pi
    result.schemas.sort(key=lambda s: (order.get(s.site.module, len(order)), s.index))
    for i, s in enumerate(result.schemas):
        s.index = i
    if not result.schemas:
        raise SurgeryFailed("no problem could be treated: " + "; ".join(
            f"{p.kind} at {p.site.address}: {r}" for p, r in result.untreated), result.untreated)
    return result
