"""Runner: ``python -m benchmarks.efficacy [--quick] [--seeds N] [--only a,b] [--out DIR]``."""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from . import EXPERIMENTS, OPTIONAL
from .common import paired

#: per experiment: (metric, graphsurg arms, baselines) for the paired-by-seed comparison
PAIRED = {
    "dying_relu": ("final loss", ["graphsurg callback", "graphsurg operate"],
                   ["ReDo", "untreated"]),
    "vanishing": ("loss", ["sigmoid / graphsurg residual", "tanh / graphsurg residual"],
                  ["residual from scratch", "untreated"]),
    "bottleneck": ("loss", ["graphsurg widen"], ["wide from scratch", "untreated"]),
    "plasticity": ("error, all tasks", ["graphsurg"],
                   ["continual backprop", "shrink-and-perturb", "backprop"]),
    "transformer": ("final loss", ["graphsurg callback", "graphsurg operate"],
                    ["ReDo", "untreated"]),
}


def significance(r: dict[str, Any]) -> list[str]:
    """Paired-by-seed lines: each graphsurg arm against each baseline (lower is better)."""
    spec = PAIRED.get(r["name"])
    if spec is None:
        return []
    key, arms, bases = spec
    mets = r["metrics"]
    out = []
    for arm in arms:
        prefix = arm.split(" / ")[0] + " / " if " / " in arm else ""
        for b in bases:
            base = prefix + b
            if arm in mets and base in mets and key in mets[arm] and key in mets[base] \
                    and len(mets[arm][key]) == len(mets[base][key]) > 1:
                out.append(f"{arm} vs {base} ({key}): "
                           f"{paired(mets[arm][key], mets[base][key])}")
    return out

HERE = Path(__file__).resolve().parent

INTRO = """# Efficacy experiments

Does surgery heal? Each experiment reproduces a failure mode from the literature and compares
graphsurg with the known remedy, side by side, on the same seeds, data and step budget.
Regenerate with `make efficacy`, i.e. `{cmd}` (this file, `results.json` and the plots are rewritten).
Tables show mean ± std over the seeds; plots show the mean with a min-max band.

Run: {mode}, seeds {seeds}, torch {torch}, {threads} thread, {machine} (shared with other
jobs while it ran: times are inflated);
wall time {total:.0f} s ({times}). Denormal floats are flushed to zero
(`torch.set_flush_denormal(True)`): the 32-layer sigmoid network's gradients are denormal
and make CPU arithmetic ~100x slower otherwise.
"""


def _json(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _json(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json(v) for v in x]
    if isinstance(x, float) and x != x:
        return None
    return x


def write_results(results: list[dict[str, Any]], out: Path, args: argparse.Namespace,
                  total: float, findings: str) -> None:
    cmd = "python -m benchmarks.efficacy" + (" --quick" if args.quick else "") + (
        f" --seeds {args.seeds}")
    parts = [INTRO.format(
        cmd=cmd, mode="quick" if args.quick else "full", seeds=list(range(args.seeds)),
        torch=torch.__version__, threads=1,
        machine=f"{platform.machine()} CPU", total=total,
        times=", ".join(f"{r['name']} {r['seconds']:.0f} s" for r in results))]
    if findings:
        parts.append(findings)
    for r in results:
        parts.append(f"## {r['title']}\n\n{r['setup']}\n\n{r['table']}\n")
        sig = significance(r)
        if sig:
            parts.append("Paired by seed (graphsurg minus baseline; negative is better):\n\n"
                         + "\n".join(f"* {line}" for line in sig) + "\n")
        parts += [f"![{p}]({p})\n" for p in r["plots"]]
        if r["notes"]:
            parts.append("What the surgery did:\n\n" + "\n".join(f"* {n}" for n in r["notes"])
                         + "\n")
    (out / "RESULTS.md").write_text("\n".join(parts))
    (out / "results.json").write_text(json.dumps(_json(results), indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.efficacy",
                                 description="graphsurg efficacy experiments")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (CI smoke test)")
    ap.add_argument("--seeds", type=int, default=3, help="number of seeds (default 3)")
    ap.add_argument("--only", default="",
                    help=f"comma-separated subset of {EXPERIMENTS + OPTIONAL} (default: "
                         f"{', '.join(EXPERIMENTS)}; {', '.join(OPTIONAL)} only when named)")
    ap.add_argument("--out", type=Path, default=HERE, help="output folder (default: here)")
    ap.add_argument("--findings", type=Path, default=HERE / "FINDINGS.md",
                    help="hand-written findings inserted into RESULTS.md (when present)")
    ap.add_argument("--render-only", action="store_true",
                    help="rewrite RESULTS.md from --out/results.json without running anything")
    args = ap.parse_args(argv)
    if args.render_only:
        results = json.loads((args.out / "results.json").read_text())
        findings = args.findings.read_text() if args.findings.is_file() else ""
        write_results(results, args.out, args, sum(r["seconds"] for r in results), findings)
        print(f"wrote {args.out / 'RESULTS.md'}")
        return 0
    names = [n for n in args.only.split(",") if n] or list(EXPERIMENTS)
    bad = [n for n in names if n not in EXPERIMENTS + OPTIONAL]
    if bad or args.seeds < 1:
        print(f"unknown experiment(s) {bad}; known: {', '.join(EXPERIMENTS + OPTIONAL)}"
              if bad else "--seeds must be >= 1", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_flush_denormal(True)
    # one thread: these networks are tiny, and OpenMP workers spin-waiting on a busy machine
    # made a 32-layer MLP's step 300x slower with 2 threads than with 1
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=UserWarning)
    seeds = list(range(args.seeds))
    results = []
    t0 = time.perf_counter()
    for name in names:
        mod = importlib.import_module(f"{__package__}.{name}")
        r = mod.run(seeds, args.quick, args.out)
        print(f"[{name}] {r['seconds']:.1f} s\n{r['table']}\n", flush=True)
        results.append(r)
    old = args.out / "results.json"
    if args.only and old.is_file():  # keep the other experiments' last results
        new = {r["name"]: r for r in results}
        prev = {r["name"]: r for r in json.loads(old.read_text())}
        results = [new.get(n) or prev[n] for n in EXPERIMENTS + OPTIONAL
                   if n in new or n in prev]
    findings = args.findings.read_text() if args.findings and args.findings.is_file() and \
        not args.quick else ""
    write_results(results, args.out, args, time.perf_counter() - t0, findings)
    print(f"wrote {args.out / 'RESULTS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
