"""Run the conformance checks on the corpus and write the table (``docs/conformance.md``).

Checks per architecture (each in-process, on a fresh build, caught one by one: a failure
never stops the run):

- ``healthy``: ``gs.diagnose`` on the healthy model reports no problem (else: false alarm).
- ``dead`` / ``collapsed`` / ``saturated`` / ``vanishing``: the fault planted by
  :mod:`.faults` is found at the right site (``site.module``) with the right units (for the
  vanishing span: a reported span within the planted one).
- ``operate``: ``gs.operate`` with defaults on the model with planted dead units treats them:
  the planted problem is in ``before`` and not in ``after``, issues(after) is a strict subset
  of issues(before) (a problem is ``(kind, site.module, units)``), and the input model is
  bit-identical (state_dict).
- ``onnx_legacy`` / ``onnx_dynamo``: the planted model exported by ``torch.onnx.export``
  (TorchScript / dynamo exporter), ``graphsurg.onnx.apply`` with defaults removes at least
  the planted units' producer rows, and onnxruntime outputs on every batch are within
  ``ONNX_ATOL`` (relative to the output's largest magnitude) of the exported model's.

Usage::

    python -m tests.conformance.runner                 # everything, writes docs/conformance.md
    python -m tests.conformance.runner --quick         # the CI third (corpus.QUICK)
    python -m tests.conformance.runner --only gpt2 --only llama --checks healthy,dead
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from .corpus import ARCHITECTURES, QUICK, Built, model_output
from .faults import PLANTERS, Inapplicable, Planted, plant_dead

#: onnxruntime vs the exported model: an exact excision changes float32 sums only by
#: rounding (a few ulps of the largest output); 1e-5 relative to max |output| bounds it
ONNX_ATOL = 1e-5

CHECKS: tuple[str, ...] = ("healthy", "dead", "collapsed", "saturated", "vanishing",
                           "operate", "onnx_legacy", "onnx_dynamo")

DOC = Path(__file__).resolve().parents[2] / "docs" / "conformance.md"


class CheckFailed(AssertionError):
    """The check ran and graphsurg's answer was wrong (the message says how)."""


class NotApplicable(Exception):
    """The check cannot apply to this architecture (the message says why)."""


@dataclass
class Result:
    arch: str
    check: str
    status: str  # "pass" | "fail" | "error" | "n/a"
    reason: str
    seconds: float


# ---- helpers -------------------------------------------------------------------------------
Key = tuple[str, str, tuple[int, ...]]


def issues(diagnosis: Any) -> set[Key]:
    """A diagnosis as a set of ``(kind, site.module, units)``."""
    return {(p.kind, p.site.module, tuple(p.units)) for p in diagnosis.problems}


def describe(problems: Sequence[Any], limit: int = 4) -> str:
    parts = [f"{p.kind}@{p.site.address}" + (f"[{len(p.units)} units]" if p.units else "")
             for p in problems[:limit]]
    more = f" +{len(problems) - limit} more" if len(problems) > limit else ""
    return ", ".join(parts) + more


def _quiet() -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    return stack


def _planted(built: Built, fault: str) -> Planted:
    truth = PLANTERS[fault](built)
    if isinstance(truth, Inapplicable):
        raise NotApplicable(truth.reason)
    return truth


def _units_of(p: Any) -> tuple[int, ...]:
    return tuple(p.units) or tuple(p.evidence.get("dead", ()))


def _matches(p: Any, units: tuple[int, ...]) -> bool:
    """``p`` is on exactly ``units``: its units, or the units its evidence finds dead (a
    DeadNeurons problem's units also list the dormant ones around them, e.g. on MTCNN)."""
    return set(units) in ({*p.units}, {*p.evidence.get("dead", ())})


def _found(diagnosis: Any, truth: Planted) -> None:
    at_site = [p for p in diagnosis.problems if p.site.module == truth.module]
    same = [p for p in at_site if p.kind == truth.kind]
    if not same:
        seen = describe(diagnosis.problems) or "no problems"
        raise CheckFailed(f"no {truth.kind} at {truth.module}; reported: {seen}")
    if truth.units and not any(_matches(p, truth.units) for p in same):
        raise CheckFailed(f"{truth.kind} at {truth.module} on units "
                          f"{list(_units_of(same[0]))}, planted {list(truth.units)}")
    if truth.span and not any(set(p.span) <= set(truth.span) for p in same):
        raise CheckFailed(f"{truth.kind} at {truth.module} over {list(same[0].span)}, "
                          f"planted over {list(truth.span)}")


# ---- checks --------------------------------------------------------------------------------
def check_healthy(build: Callable[[], Built]) -> str:
    import graphsurg as gs

    b = build()
    d = gs.diagnose(b.model, b.batches, loss_fn=b.loss_fn)
    if d.problems:
        raise CheckFailed(f"false alarm: {describe(d.problems)}")
    return f"no problems ({len(d.layers)} sites)"


def _fault_check(fault: str) -> Callable[[Callable[[], Built]], str]:
    def check(build: Callable[[], Built]) -> str:
        import graphsurg as gs

        b = build()
        truth = _planted(b, fault)
        _found(gs.diagnose(b.model, b.batches, loss_fn=b.loss_fn), truth)
        return f"{truth.kind} at {truth.module}"

    check.__name__ = f"check_{fault}"
    return check


def check_operate(build: Callable[[], Built]) -> str:
    import graphsurg as gs

    b = build()
    truth = plant_dead(b)
    assert isinstance(truth, Planted)
    state = {k: v.detach().clone() for k, v in b.model.state_dict().items()}
    res = gs.operate(b.model, b.batches, loss_fn=b.loss_fn)
    now = b.model.state_dict()
    if set(now) != set(state) or not all(torch.equal(state[k], now[k]) for k in state):
        raise CheckFailed("the input model was modified")
    key = (truth.kind, truth.module, truth.units)
    before = issues(res.before)
    if not any(p.kind == key[0] and p.site.module == key[1] and _matches(p, key[2])
               for p in res.before.problems):
        raise CheckFailed(f"planted units not diagnosed; before: {describe(res.before.problems)}")
    if res.after is None:
        raise CheckFailed("no diagnosis after surgery")
    after = issues(res.after)
    if any(k[:2] == key[:2] for k in after):
        rolled = [f"{r['replacement']}@{r['site']}: {r['reason']}" for r in res.rolled_back]
        raise CheckFailed("planted problem still there after surgery; rolled back: "
                          f"{'; '.join(rolled)[:300] or 'nothing'}")
    if not after < before:
        new = [p for p in res.after.problems
               if (p.kind, p.site.module, tuple(p.units)) not in before]
        raise CheckFailed(f"issues(after) not a strict subset of issues(before): new "
                          f"{describe(new)}")
    return f"treated; {len(before)} -> {len(after)} issues"


class _Exported(torch.nn.Module):
    """Positional tensor inputs (``meta.inputs``) -> ``meta.output``: what ONNX exports."""

    def __init__(self, built: Built) -> None:
        super().__init__()
        self.m = built.model
        self.meta = built.meta

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return model_output(self.m(**dict(zip(self.meta.inputs, args, strict=True))),
                            self.meta)


def export_onnx(built: Built, path: Path, *, dynamo: bool) -> Path:
    """Export ``built.model`` (eval) with static shapes (every batch has the same shape)."""
    example = tuple(built.batches[0][k] for k in built.meta.inputs)
    with _quiet():
        torch.onnx.export(_Exported(built).eval(), example, str(path), dynamo=dynamo,
                          input_names=list(built.meta.inputs), output_names=["output"])
    return path


def feeds(built: Built) -> list[dict[str, np.ndarray]]:
    return [{k: b[k].numpy() for k in built.meta.inputs} for b in built.batches]


def _onnx_check(dynamo: bool) -> Callable[[Callable[[], Built]], str]:
    def check(build: Callable[[], Built]) -> str:
        import onnx
        import onnxruntime as ort

        from graphsurg import onnx as gso

        b = build()
        truth = plant_dead(b)
        assert isinstance(truth, Planted)
        layer = b.model.get_submodule(truth.module)
        fan_in = int(layer.weight.numel() // (layer.weight.shape[1]
                     if type(layer).__name__ == "Conv1D" else layer.weight.shape[0]))
        data = feeds(b)
        with tempfile.TemporaryDirectory() as tmp:
            try:
                src = export_onnx(b, Path(tmp) / "model.onnx", dynamo=dynamo)
            except Exception as e:  # the exporter's limit, not graphsurg's
                raise NotApplicable(f"torch.onnx.export(dynamo={dynamo}) fails: "
                                    f"{first_line(e)}") from None
            proto = onnx.load(str(src), load_external_data=True)
            with _quiet():
                out, res = gso.apply(proto, data)
            removed = res.size["params_before"] - res.size["params_after"]
            need = len(truth.units) * fan_in
            if removed < need:
                treated = [f"{s.replacement}@{s.site.module}" for s in res.plan.schemas] or ["nothing"]
                untreated = [f"{p.kind}@{p.site.module}: {why}" for p, why in
                             sorted(res.plan.untreated, key=lambda t: t[0].kind != truth.kind)]
                untreated = untreated[:2]
                rolled = [f"{r['replacement']}@{r['site']}: {r['reason']}"
                          for r in res.rolled_back][:2]
                raise CheckFailed(f"removed {removed} parameters, planted units hold {need}; "
                                  f"planned {treated}; untreated {untreated}; "
                                  f"rolled back {rolled}")
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = 1
            s0 = ort.InferenceSession(proto.SerializeToString(), opts)
            s1 = ort.InferenceSession(out.SerializeToString(), opts)
            for feed in data:
                (y0,), (y1,) = s0.run(None, feed), s1.run(None, feed)
                scale = max(1.0, float(np.abs(y0).max()))
                err = float(np.abs(y0.astype(np.float64) - y1).max())
                if err > ONNX_ATOL * scale:
                    raise CheckFailed(f"outputs differ by {err:.3g} (> {ONNX_ATOL} x {scale:.3g})")
        return f"removed {removed} parameters; outputs within {ONNX_ATOL}"

    check.__name__ = f"check_onnx_{'dynamo' if dynamo else 'legacy'}"
    return check


CHECK_FNS: dict[str, Callable[[Callable[[], Built]], str]] = {
    "healthy": check_healthy,
    "dead": _fault_check("dead"),
    "collapsed": _fault_check("collapsed"),
    "saturated": _fault_check("saturated"),
    "vanishing": _fault_check("vanishing"),
    "operate": check_operate,
    "onnx_legacy": _onnx_check(dynamo=False),
    "onnx_dynamo": _onnx_check(dynamo=True),
}


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def run_check(arch: str, check: str) -> Result:
    """One check on one architecture, never raising."""
    from graphsurg import GraphsurgError

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    try:
        with _quiet():
            detail = CHECK_FNS[check](ARCHITECTURES[arch])
        status, reason = "pass", detail
    except NotApplicable as e:
        status, reason = "n/a", str(e)
    except pytest.skip.Exception as e:  # a trained net's wheel cannot be fetched
        status, reason = "n/a", str(e)
    except CheckFailed as e:
        status, reason = "fail", str(e)
    except GraphsurgError as e:  # graphsurg refused (SurgeryFailed...): its answer, wrong
        status, reason = "fail", first_line(e)
    except Exception as e:  # the run must go on: the table records what broke
        status, reason = "error", first_line(e)
        if os.environ.get("CONFORMANCE_TRACEBACK"):
            traceback.print_exc()
    return Result(arch, check, status, reason, time.perf_counter() - t0)


# ---- the table -----------------------------------------------------------------------------
_CELL = {"pass": "pass", "fail": "**FAIL**", "error": "**ERROR**", "n/a": "n/a"}


def table(results: list[Result], archs: Sequence[str], checks: Sequence[str]) -> str:
    by = {(r.arch, r.check): r for r in results}
    lines = ["| architecture | family | " + " | ".join(checks) + " |",
             "|---|---|" + "---|" * len(checks)]
    for a in archs:
        fam = _family(a)
        cells = []
        for c in checks:
            r = by.get((a, c))
            cells.append("" if r is None else
                         _CELL[r.status] + ("" if r.status == "n/a" else f" {r.seconds:.1f}s"))
        lines.append(f"| {a} | {fam} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _family(arch: str) -> str:
    return _FAMILIES.get(arch, "")


_FAMILIES: dict[str, str] = {}


def markdown(results: list[Result], archs: Sequence[str], checks: Sequence[str],
             wall: float) -> str:
    n = {s: sum(r.status == s for r in results) for s in ("pass", "fail", "error", "n/a")}
    out = [
        "# Conformance corpus",
        "",
        "Generated by `python -m tests.conformance.runner` (issue 14): "
        f"{len(archs)} architectures built offline from small configs (random weights), "
        "healthy and with planted faults. See `tests/conformance/` for the builders, the "
        "planted faults and what each check asserts.",
        "",
        f"Wall time {wall:.0f} s (torch {torch.__version__}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}); "
        f"{n['pass']} pass, {n['fail']} fail, {n['error']} error, {n['n/a']} not applicable.",
        "",
        table(results, archs, checks),
        "",
        "## Reasons",
        "",
        "| architecture | check | status | reason |",
        "|---|---|---|---|",
    ]
    for r in results:
        if r.status != "pass":
            reason = r.reason.replace("|", "\\|").replace("\n", " ")
            out.append(f"| {r.arch} | {r.check} | {r.status} | {reason} |")
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.conformance.runner",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="only the CI third (corpus.QUICK)")
    ap.add_argument("--only", action="append", default=[], metavar="NAME",
                    help="only this architecture (repeatable)")
    ap.add_argument("--checks", default=",".join(CHECKS),
                    help=f"comma-separated checks (default: {','.join(CHECKS)})")
    ap.add_argument("--output", type=Path, default=None,
                    help="markdown table path (default docs/conformance.md for a full run, "
                         "none for a subset)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    args = ap.parse_args(argv)
    archs = list(args.only) or (list(QUICK) if args.quick else list(ARCHITECTURES))
    unknown = [a for a in archs if a not in ARCHITECTURES]
    checks = [c for c in args.checks.split(",") if c]
    bad = [c for c in checks if c not in CHECK_FNS]
    if unknown or bad:
        print(f"unknown architecture(s) {unknown} or check(s) {bad}; architectures: "
              f"{', '.join(ARCHITECTURES)}; checks: {', '.join(CHECKS)}", file=sys.stderr)
        return 2
    full = not args.only and not args.quick and checks == list(CHECKS)
    output = args.output if args.output is not None else (DOC if full else None)
    results: list[Result] = []
    t0 = time.perf_counter()
    for a in archs:
        try:
            _FAMILIES[a] = ARCHITECTURES[a]().meta.family
        except (Exception, pytest.skip.Exception) as e:
            _FAMILIES[a] = f"build failed: {first_line(e)}"
        for c in checks:
            r = run_check(a, c)
            results.append(r)
            print(f"{a:18s} {c:12s} {r.status:5s} {r.seconds:6.1f}s  {r.reason[:150]}",
                  flush=True)
    wall = time.perf_counter() - t0
    print()
    print(table(results, archs, checks))
    print(f"\nwall time {wall:.0f} s")
    if output is not None:
        from graphsurg._files import write_text

        write_text(output, markdown(results, archs, checks, wall))
        print(f"wrote {output}")
    if args.json is not None:
        from graphsurg._files import write_text

        write_text(args.json, json.dumps([asdict(r) for r in results], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
