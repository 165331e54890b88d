"""``graphsurg demo``: diagnose -> operate -> verify -> heal on the embedded zoo, with a report.

For each broken network (dead-unit MLP, vanishing-gradient deep sigmoid net, rank
bottleneck, small CNN with dead channels): diagnose it, operate when surgery is available,
then train a treated and an untreated copy for the same number of steps with the same seed
and the same data, and compare. Sized to finish in about two minutes on a laptop CPU.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ._config import DiagnoseConfig
from ._console import Console
from ._data import compute_loss, run_model
from ._diagnose import diagnose
from ._errors import first_line
from ._problems import Diagnosis
from ._report import ModelReport, Report, fmt, missing_figures
from ._zoo import ZooCase, build

DEMO_MODELS: tuple[str, ...] = ("dead_mlp", "deep_sigmoid", "bottleneck_mlp", "dead_cnn")


def surgery_api() -> tuple[Callable[..., Any] | None, type[BaseException] | None]:
    """``(gs.operate, gs.SurgeryFailed)`` when this build has surgery, else ``(None, None)``."""
    import graphsurg as gs

    op = getattr(gs, "operate", None)
    failed = getattr(gs, "SurgeryFailed", None)
    if failed is None:
        try:
            from ._plan import SurgeryFailed as failed
        except ImportError:
            failed = None
    return (op if callable(op) else None), failed


@dataclass
class DemoOutcome:
    report: Report
    tables: list[tuple[str, list[str], list[list[str]]]] = field(default_factory=list)
    surgery_available: bool = False
    certificates_met: bool = True
    seconds: float = 0.0


def train(model: nn.Module, batches: Sequence[Any], loss_fn: Callable[[Any, Any], torch.Tensor],
          *, steps: int, seed: int, lr: float = 1e-3, start: int = 0,
          on_step: Callable[[int], None] | None = None) -> list[float]:
    """Train ``model`` in place with Adam (lr 1e-3, as healing) for ``steps`` steps cycling
    over ``batches`` from step ``start``; returns the loss per step. Same ``seed``, batches
    and ``start`` give the same run."""
    torch.manual_seed(seed + start)
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses: list[float] = []
    for step in range(start, start + steps):
        batch = batches[step % len(batches)]
        opt.zero_grad(set_to_none=True)
        loss = compute_loss(loss_fn, run_model(model, batch, None, step), batch, step)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step)
    return losses


def dead_fraction(d: Diagnosis) -> float:
    """Dead/dormant units over all measured hidden units (activation sites with a non-linearity)."""
    layers = [r for r in d.layers.values() if r.kind == "activation" and r.width]
    hidden = [r for r in layers if r.activation] or layers
    total = sum(r.width for r in hidden)
    return sum(r.dead_fraction * r.width for r in hidden) / total if total else 0.0


def first_grad_norm(d: Diagnosis) -> float | None:
    for r in d.layers.values():
        if r.kind == "parameters" and r.grad_norm is not None:
            return float(r.grad_norm)
    return None


def _plan_rows(result: Any) -> list[dict[str, Any]]:
    """The plan of a SurgeryResult as report rows: problem -> replacement -> scale ->
    guarantee -> verified evidence -> kept / rolled back."""
    plan = getattr(result, "plan", None)
    schemas = {getattr(s, "index", i): s for i, s in enumerate(getattr(plan, "schemas", []) or [])}
    rows = []
    for v in getattr(result, "verification", None) or []:
        s = schemas.get(v.index)
        problem = getattr(s, "problem", None)
        ev = []
        if v.output_change is not None:
            bound = f" (bound {fmt(v.bound)})" if v.bound is not None else ""
            ev.append(f"output change {fmt(v.output_change)}{bound}")
        if v.grad_norms:
            ev.append(f"min grad norm {fmt(min(v.grad_norms.values()))}")
        if v.reasons:
            ev.append("; ".join(v.reasons))
        rows.append({
            "problem": getattr(problem, "kind", ""),
            "site": v.site,
            "replacement": v.replacement + ("" if v.variant == "planned" else f" ({v.variant})"),
            "scale": str(getattr(s, "scale", "")),
            "guarantee": "exact" if v.exact else "bounded",
            "evidence": ", ".join(ev),
            "kept": bool(v.kept),
        })
    return rows


def run_demo(console: Console, *, models: Sequence[str] = DEMO_MODELS, steps: int = 150,
             seed: int = 0) -> DemoOutcome:
    """Run the demo; returns the report and the tables printed.

    The zoo's networks are tiny: torch runs single-threaded for the demo (restored after),
    because intra-op thread hand-offs cost more than the work -- measured 10-50x slower with
    two threads on a busy 2-core machine.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_demo(console, models=models, steps=steps, seed=seed)
    finally:
        torch.set_num_threads(threads)


def _run_demo(console: Console, *, models: Sequence[str], steps: int, seed: int) -> DemoOutcome:
    import graphsurg

    t0 = time.perf_counter()
    operate, failed_exc = surgery_api()
    outcome = DemoOutcome(report=Report(
        title="graphsurg demo: broken networks, diagnosed and operated on",
        models=[], meta={"version": graphsurg.__version__, "steps": steps, "seed": seed,
                         "created": time.strftime("%Y-%m-%d %H:%M")}),
        surgery_available=operate is not None)
    if operate is None:
        msg = ("surgery (gs.operate) is not available in this build: showing the diagnosis only, "
               "no operation and no treated-vs-untreated training")
        outcome.report.notes.append(msg)
        console.info(f"note: {msg}")
    missing = missing_figures()
    if missing:  # the tables below carry every number; the note says how to get the plots
        console.result(f"note: {missing}")
    cfg = DiagnoseConfig(progress=False)
    for name in models:
        case: ZooCase = build(name, seed)
        console.rule(f"{name}: {case.description}")
        before = diagnose(case.model, case.batches, loss_fn=case.loss_fn, config=cfg)
        console.info(f"diagnosis: {len(before.problems)} problem(s)")
        for p in before.problems:
            console.info(f"  {p.kind:<18} {p.site.address:<14} {p.describe()}")
        mr = ModelReport(name=name, description=case.description, before=before)
        result: Any = None
        if operate is not None:
            try:
                result = operate(case.model, case.batches, loss_fn=case.loss_fn, diagnosis=before,
                                 config=cfg, seed=seed)
            except Exception as e:  # SurgeryFailed or an engine error: report, keep going
                if failed_exc is not None and isinstance(e, failed_exc):
                    mr.notes.append(f"surgery failed: {first_line(e)}")
                else:
                    mr.notes.append(f"surgery raised {type(e).__name__}: {first_line(e)}")
                outcome.certificates_met = False
                console.info(mr.notes[-1])
        metrics: list[tuple[str, str, str]] = []
        if result is not None:
            treated: nn.Module = result.model
            after = result.after if isinstance(result.after, Diagnosis) else diagnose(
                treated, case.batches, loss_fn=case.loss_fn, config=cfg)
            mr.after = after
            mr.plan = _plan_rows(result)
            mr.notes.extend(str(n) for n in getattr(result, "notes", []) or [])
            for rb in getattr(result, "rolled_back", None) or []:
                outcome.certificates_met = False
                mr.notes.append(f"rolled back: {rb.get('replacement')} at {rb.get('site')}: "
                                f"{rb.get('reason')}")
            mr.surgery = _json_of(result)
            healed = int((getattr(result, "healing", None) or {}).get("steps", 0) or 0)
            kept = sum(1 for r in mr.plan if r["kept"])
            console.info(f"surgery: {kept} of {len(mr.plan)} schema(s) kept"
                         + (f", healed {healed} steps" if healed else ""))
            for r in mr.plan:
                console.info(f"  {r['replacement']:<18} {r['site']:<14} {r['guarantee']:<8} "
                             f"{'kept' if r['kept'] else 'ROLLED BACK'}  {r['evidence']}")
            # Fair comparison: the untreated copy trains through the healing steps too.
            with console.progress(f"training {name}", healed + 2 * steps) as bar:
                untreated = train(copy.deepcopy(case.model), case.batches, case.loss_fn,
                                  steps=healed + steps, seed=seed,
                                  on_step=lambda _s: bar.advance())
                treated_curve = train(copy.deepcopy(treated), case.batches, case.loss_fn,
                                      steps=steps, seed=seed, start=healed,
                                      on_step=lambda _s: bar.advance())
            mr.curves = {"untreated": untreated, "treated": treated_curve}
            mr.curve_offsets = {"treated": healed}
            total = healed + steps
            change = getattr(result, "output_change", None)
            metrics = [
                ("problems", str(len(before.problems)), str(len(after.problems))),
                ("dead units", f"{dead_fraction(before):.1%}", f"{dead_fraction(after):.1%}"),
                ("first-layer grad norm", fmt(first_grad_norm(before)), fmt(first_grad_norm(after))),
                ("output change at surgery", "—", fmt(change)),
                (f"train loss after {total} steps", fmt(_tail(untreated)), fmt(_tail(treated_curve))),
            ]
        else:
            metrics = [
                ("problems", str(len(before.problems)), "—"),
                ("dead units", f"{dead_fraction(before):.1%}", "—"),
                ("first-layer grad norm", fmt(first_grad_norm(before)), "—"),
            ]
        mr.metrics = metrics
        header = ["metric", "untreated", "treated" if result is not None else "(no surgery)"]
        rows = [list(r) for r in metrics]
        console.table(f"{name}", header, rows, highlight_last=result is not None)
        outcome.tables.append((name, header, rows))
        outcome.report.models.append(mr)
    outcome.seconds = time.perf_counter() - t0
    outcome.report.meta["seconds"] = round(outcome.seconds, 1)
    return outcome


def _tail(xs: list[float], k: int = 10) -> float | None:
    """Mean of the last ``k`` losses (a less noisy 'loss after N steps')."""
    if not xs:
        return None
    tail = xs[-k:]
    return sum(tail) / len(tail)


def _json_of(result: Any) -> dict[str, Any] | None:
    import json

    to_json = getattr(result, "to_json", None)
    if to_json is None:
        return None
    try:
        text = to_json()
    except Exception:  # the report must not die on a serialisation detail
        return None
    try:
        d = json.loads(text) if isinstance(text, str) else text
    except ValueError:
        return None
    return d if isinstance(d, dict) else {"result": d}


__all__ = ["DEMO_MODELS", "DemoOutcome", "dead_fraction", "first_grad_norm", "run_demo", "surgery_api", "train"]
