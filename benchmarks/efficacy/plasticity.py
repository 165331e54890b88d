"""Experiment 4 -- loss of plasticity (Dohare et al., Nature 2024): slowly-changing regression.

The problem (their "Slowly-Changing Regression", SCR): inputs are ``m = 20`` bits plus a
bias bit; the first ``f = 15`` bits are fixed within a task and one of them, chosen at
random, flips when a task ends; the other 5 bits are drawn afresh for every example. The
target is a fixed random network of 100 linear threshold units (input weights +-1, threshold
``(m + 1) * beta - S_i`` with ``beta = 0.7`` and ``S_i`` the unit's number of negative
weights) with output weights +-1. The learner is theirs too: one hidden layer of 5 ReLU
units, trained online (one example per step) with SGD. The per-task error is the mean squared
error over the task's examples.

Arms, all from the same initial network and the same stream:

* **backprop**: plain SGD;
* **continual backprop** (generate-and-test, implemented from the paper): every step each
  hidden unit's contribution utility ``u <- eta*u + (1-eta)*|h|*sum_k|w_out[k]|``
  (``eta = 0.99``) is updated and its age incremented; units older than the maturity
  threshold (100) are eligible and a fraction ``rho`` of them per step (accumulated) is
  replaced -- the lowest-utility one gets fresh input weights from the initialiser, zero
  output weights, utility and age 0;
* **shrink-and-perturb** (Ash & Adams 2020) applied every step: ``w <- (1-lambda) w + sigma eps``;
* **graphsurg**: ``gs.SurgeryCallback`` on the live model, trained through
  ``torch.compile(backend="graphsurg")`` with a ``gs.Monitor``, operating once per task on
  that task's statistics (each round diagnoses the window since the last round), with the
  library's CBP (``replace_rate=rho``): CBP's schedule and generator, the utility estimated
  from the monitor's samples (one step in 5) every 10 steps; the hidden layer's dead units
  are left to it.

Scaled for a 2-core CPU: tasks last ``T`` examples (the paper uses 10,000), and CBP's
replacement rate is scaled by ``10000 / T`` so that as many units are replaced per task.
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import graphsurg as gs

from .common import fmt, plot_curves, table

ARMS = ("backprop", "continual backprop", "shrink-and-perturb", "graphsurg")
LR = 0.01


class SCR:
    """Slowly-changing regression (Dohare et al.)."""

    def __init__(self, seed: int, m: int = 20, f: int = 15, hidden: int = 100,
                 beta: float = 0.7) -> None:
        g = torch.Generator().manual_seed(50_000 + seed)
        self.g, self.m, self.f = g, m, f
        self.w = torch.randint(0, 2, (m + 1, hidden), generator=g).float() * 2 - 1
        self.theta = (m + 1) * beta - (self.w < 0).sum(0).float()
        self.v = torch.randint(0, 2, (hidden,), generator=g).float() * 2 - 1
        self.bits = torch.randint(0, 2, (f,), generator=g).float()

    def sample(self, n: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([self.bits.expand(n, self.f),
                       torch.randint(0, 2, (n, self.m - self.f), generator=self.g).float(),
                       torch.ones(n, 1)], 1)
        y = ((x @ self.w > self.theta).float() @ self.v).unsqueeze(1)
        return x, y

    def next_task(self) -> None:
        i = int(torch.randint(0, self.f, (1,), generator=self.g))
        self.bits[i] = 1 - self.bits[i]


def build(seed: int, hidden: int = 5) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(21, hidden), nn.ReLU(), nn.Linear(hidden, 1))


class ContinualBackprop:
    """Generate-and-test for one hidden layer (Dohare et al. 2024, Algorithm 1)."""

    def __init__(self, model: nn.Sequential, rho: float, maturity: int = 100,
                 eta: float = 0.99, seed: int = 0) -> None:
        self.inc, self.out = model[0], model[2]
        n = self.inc.out_features
        self.u = torch.zeros(n)
        self.age = torch.zeros(n)
        self.rho, self.maturity, self.eta = rho, maturity, eta
        self.acc = 0.0
        self.replaced = 0
        self.g = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def step(self, h: torch.Tensor) -> None:
        contrib = h.abs().mean(0) * self.out.weight.abs().sum(0)
        self.u.mul_(self.eta).add_((1 - self.eta) * contrib)
        self.age += 1
        eligible = (self.age > self.maturity).nonzero().flatten()
        self.acc += self.rho * eligible.numel()
        k = int(self.acc)
        if k < 1:
            return
        self.acc -= k
        worst = eligible[self.u[eligible].argsort()[:k]]
        fan_in = self.inc.in_features
        bound = 1 / math.sqrt(fan_in)  # nn.Linear's default init (kaiming_uniform, a=sqrt 5)
        fresh = (torch.rand(len(worst), fan_in, generator=self.g) * 2 - 1) * bound
        self.inc.weight[worst] = fresh
        self.inc.bias[worst] = 0.0
        self.out.weight[:, worst] = 0.0
        self.u[worst] = 0.0
        self.age[worst] = 0.0
        self.replaced += len(worst)


#: shrink-and-perturb (lambda, sigma) of the table; :func:`tune_shrink_perturb` scans SP_GRID on
#: other seeds (FINDINGS.md reports it)
SP = (1e-4, 1e-3)
SP_GRID = [(lam, sig) for lam in (1e-5, 1e-4, 1e-3) for sig in (1e-4, 1e-3, 1e-2)]


class Arm:
    """One arm's learner on its own SCR stream, advanced one task at a time."""

    def __init__(self, arm: str, model: nn.Sequential, seed: int, per_task: int,
                 sp: tuple[float, float] = SP) -> None:
        self.arm, self.seed, self.per_task, self.sp = arm, seed, per_task, sp
        self.env = SCR(seed)
        torch.manual_seed(seed + 7)
        self.m = m = copy.deepcopy(model)
        self.opt = torch.optim.SGD(m.parameters(), lr=LR)
        rho = 1e-4 * 10_000 / per_task  # CBP's rate, scaled: as many replacements per task
        self.cbp = ContinualBackprop(m, rho=rho, seed=seed) \
            if arm == "continual backprop" else None
        self.g = torch.Generator().manual_seed(seed + 11)
        self.fwd: Any = m
        self.cb: Any = None
        if arm == "graphsurg":
            torch._dynamo.reset()
            mon = gs.Monitor(every=5)
            self.fwd = torch.compile(m, backend="graphsurg", options={"monitor": mon,
                                                                       "inner": "aot_eager"})
            # diagnosis once per task and CBP's generate-and-test at CBP's rate
            # (gs.SurgeryCallback(replace_rate=...), a library feature; it takes the dead
            # units of the layers it manages)
            self.cb = gs.SurgeryCallback(m, self.opt, mon, every=per_task, seed=seed,
                                         replace_rate=rho, maturity=100, utility_every=10)
        self.errs: list[float] = []

    def task(self) -> float:
        m, opt, env, cbp, cb = self.m, self.opt, self.env, self.cbp, self.cb
        lam, sig = self.sp
        tot = 0.0
        for _ in range(self.per_task):
            x, y = env.sample(1)
            if cbp is not None:
                h = m[1](m[0](x))
                out = m[2](h)
            else:
                out = self.fwd(x)
            loss = ((out - y) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += float(loss.detach())
            if cbp is not None:
                cbp.step(h.detach())  # after the update: replacements edit the weights
            if self.arm == "shrink-and-perturb":
                with torch.no_grad():
                    for p in m.parameters():
                        p.mul_(1 - lam).add_(torch.randn(p.shape, generator=self.g) * sig)
            if cb is not None:
                cb.step((x, y))  # each round diagnoses the window since the last round
        self.errs.append(tot / self.per_task)
        env.next_task()
        return self.errs[-1]

    def finish(self, notes: list[str]) -> dict[str, float]:
        m, extra = self.m, {}
        with torch.no_grad():
            x, _ = self.env.sample(512)
            h = m[1](m[0](x))
            extra["dead units"] = float(((h > 0).float().mean(0) == 0).sum())
        if self.cbp is not None:
            extra["units replaced"] = float(self.cbp.replaced)
        if self.cb is not None:
            cb = self.cb
            applied = [a for e in cb.history for a in e.applied]
            extra["edits applied"] = float(len(applied))
            extra["units replaced"] = float(cb.replaced)
            if self.seed == 0 or not notes:
                kinds = sorted(set(a.split(" at ")[0] + (" (utility)" if "(utility" in a
                                                          else "") for a in applied))
                notes.append(f"graphsurg (seed {self.seed}): {len(applied)} in-place edit(s) "
                             f"({', '.join(kinds) or 'none'}); {int(cb.replaced)} unit(s) "
                             f"replaced on utility; {len(self.errs)} tasks")
            torch._dynamo.reset()
        return extra


def _run_arm(arm: str, model: nn.Sequential, seed: int, tasks: int, per_task: int,
             notes: list[str], sp: tuple[float, float] = SP
             ) -> tuple[list[float], dict[str, float]]:
    a = Arm(arm, model, seed, per_task, sp)
    for _ in range(tasks):
        a.task()
    return a.errs, a.finish(notes)


def _job(arm: str, seed: int, tasks: int, per_task: int, sp: tuple[float, float]
         ) -> tuple[list[float], dict[str, float], list[str]]:
    """One arm on one seed; with env ``EFFICACY_CACHE`` (a folder) the result is read from /
    written to a JSON file there, so that seeds can run in separate processes and the
    report be assembled from them (a code change needs a fresh folder)."""
    import json
    import os

    cache = os.environ.get("EFFICACY_CACHE")
    path = None
    if cache:
        name = f"{arm.replace(' ', '_')}-{seed}-{tasks}-{per_task}-{sp[0]:g}-{sp[1]:g}.json"
        path = Path(cache) / name
        if path.is_file():
            errs, extra, notes = json.loads(path.read_text())
            return errs, extra, notes
    torch.set_num_threads(1)
    notes: list[str] = []
    errs, extra = _run_arm(arm, build(seed), seed, tasks, per_task, notes, sp)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps([errs, extra, notes]))
        tmp.replace(path)
    return errs, extra, notes


def _map(jobs: list[tuple[Any, ...]]) -> list[tuple[list[float], dict[str, float], list[str]]]:
    """Run ``_job`` over ``jobs``, in ``JOBS`` forked processes when JOBS > 1 (env
    ``EFFICACY_JOBS``): the arms and seeds are independent."""
    import multiprocessing
    import os

    n = int(os.environ.get("EFFICACY_JOBS", "1"))
    if n <= 1:
        return [_job(*j) for j in jobs]
    with multiprocessing.get_context("fork").Pool(min(n, len(jobs))) as pool:
        return pool.starmap(_job, jobs)


def tune_shrink_perturb(seeds: list[int], tasks: int, per_task: int
                        ) -> list[tuple[float, float, float]]:
    """Mean error over all tasks of shrink-and-perturb for each (lambda, sigma) of SP_GRID,
    averaged over ``seeds``; sorted best first."""
    res = _map([("shrink-and-perturb", s, tasks, per_task, sp) for sp in SP_GRID
                for s in seeds])
    out = []
    for i, (lam, sig) in enumerate(SP_GRID):
        errs = [sum(e) / len(e) for e, _, _ in res[i * len(seeds):(i + 1) * len(seeds)]]
        out.append((lam, sig, sum(errs) / len(errs)))
        print(f"lambda={lam:g} sigma={sig:g}: {out[-1][2]:.4f}", flush=True)
    return sorted(out, key=lambda t: t[2])


def paper_run(seed: int, tasks: int, per_task: int, path: Path) -> None:
    """The paper's task length on one seed, the arms interleaved task by task; after every
    task the per-task errors, the task count and the wall time so far are written to
    ``path`` (JSON), so a run stopped early still says how far it got."""
    import json

    t0 = time.perf_counter()
    model = build(seed)
    arms = {a: Arm(a, model, seed, per_task) for a in ARMS}
    for t in range(tasks):
        for a in arms.values():  # only the graphsurg arm is compiled
            a.task()
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({
            "seed": seed, "per_task": per_task, "tasks_done": t + 1, "tasks_planned": tasks,
            "wall_s": time.perf_counter() - t0, "sp": SP,
            "errors": {k: a.errs for k, a in arms.items()}}) + "\n")
        tmp.replace(path)


def run(seeds: list[int], quick: bool, out: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    tasks = 12 if quick else 150
    per_task = 100 if quick else 500
    curves: dict[str, list[list[float]]] = {a: [] for a in ARMS}
    metrics: dict[str, dict[str, list[float]]] = {a: {} for a in ARMS}
    notes: list[str] = []
    if not hasattr(gs, "SurgeryCallback"):
        raise RuntimeError("gs.SurgeryCallback is missing")
    k = max(1, tasks // 10)
    results = iter(_map([(arm, seed, tasks, per_task, SP) for seed in seeds for arm in ARMS]))
    for seed in seeds:
        for arm in ARMS:
            errs, extra, arm_notes = next(results)
            if arm_notes and (seed == 0 or not notes):
                notes += arm_notes
            curves[arm].append(errs)
            metrics[arm].setdefault(f"error, first {k} tasks", []).append(
                sum(errs[:k]) / k)
            metrics[arm].setdefault(f"error, last {k} tasks", []).append(
                sum(errs[-k:]) / k)
            metrics[arm].setdefault("error, all tasks", []).append(sum(errs) / len(errs))
            for key, v in extra.items():
                metrics[arm].setdefault(key, []).append(v)
    plot_curves(out / "plasticity.png", curves, smooth_k=max(1, tasks // 15), x0=1,
                title="Loss of plasticity: slowly-changing regression (5 ReLU units, SGD)",
                xlabel=f"task (error averaged over the last {max(1, tasks // 15)} tasks)",
                ylabel="mean squared error over the task", logy=False)
    cols = [f"error, first {k} tasks", f"error, last {k} tasks", "error, all tasks",
            "dead units"]
    rows = [[a] + [fmt(metrics[a][c]) for c in cols] for a in ARMS]
    return {
        "name": "plasticity",
        "title": "4. Loss of plasticity: continual backprop, shrink-and-perturb, graphsurg",
        "setup": (f"SCR (m=20 bits, 15 slowly flipping, 100-LTU target), {tasks} tasks of "
                  f"{per_task} examples, one example per step, SGD lr {LR}, learner 21-5-1 "
                  f"ReLU. CBP: rho={1e-4 * 10_000 / per_task:g}, maturity 100, eta 0.99. "
                  f"Shrink-and-perturb: lambda={SP[0]:g}, sigma={SP[1]:g} every step (its "
                  "3x3 grid is in FINDINGS). graphsurg: gs.SurgeryCallback "
                  "diagnosing every task (Monitor(every=5), a one-task window) with CBP's "
                  f"utility replacement (replace_rate={1e-4 * 10_000 / per_task:g}, maturity "
                  "100, CBP's schedule and generator; utility from the monitor's samples, "
                  "updated every 10 steps; dead units left to it)."),
        "table": table(["arm"] + cols + [], rows),
        "metrics": metrics,
        "plots": ["plasticity.png"],
        "curves": curves,
        "notes": notes,
        "seconds": time.perf_counter() - t0,
    }


if __name__ == "__main__":
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="python -m benchmarks.efficacy.plasticity")
    ap.add_argument("--tune-sp", action="store_true", help="grid over shrink-and-perturb")
    ap.add_argument("--paper", type=Path, help="paper-length run on one seed: progress JSON")
    ap.add_argument("--tasks", type=int, default=150)
    ap.add_argument("--per-task", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tune-seeds", default="100,101,102", help="seeds for --tune-sp")
    ap.add_argument("--cache-seed", type=int, default=None,
                    help="run every arm of this seed into $EFFICACY_CACHE (then assemble with "
                         "the runner and the same EFFICACY_CACHE)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    if a.tune_sp:
        print(json.dumps(tune_shrink_perturb([int(x) for x in a.tune_seeds.split(",")],
                                             a.tasks, a.per_task)))
    elif a.paper:
        paper_run(a.seed, a.tasks, a.per_task, a.paper)
    elif a.cache_seed is not None:
        _map([(arm, a.cache_seed, a.tasks, a.per_task, SP) for arm in ARMS])
