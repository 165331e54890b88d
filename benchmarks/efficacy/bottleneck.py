"""Experiment 3 -- rank bottleneck (Net2Net, Chen et al. ICLR 2016).

An MLP ``32-64-4-64-16`` (ReLU, tanh, tanh) learns a teacher whose 16 outputs have rank 16
through a width-4 layer. It is trained ``P`` steps; then

* **untreated**: trained ``N`` more steps;
* **graphsurg widen**: ``gs.operate`` (the planner picks ``widen``: Net2WiderNet, exact) and
  ``N`` steps of the same fine-tune; the function change at surgery is measured on held-out
  inputs (``||f' - f|| / ||f||`` and the largest absolute difference);
* **wide from scratch**: the widened architecture trained from its initialisation for
  ``P + N`` steps (the same number of steps as the other arms in total).

Every arm fine-tunes with a fresh Adam (lr 1e-3) on the same batches in the same order.
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
from graphsurg._zoo import _teacher_batches

from .common import eval_loss, fmt, mse, plot_xy, table, train

ARMS = ("untreated", "graphsurg widen", "wide from scratch")


def build(seed: int, narrow: int, width: int = 64) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, width), nn.ReLU(), nn.Linear(width, narrow), nn.Tanh(),
                         nn.Linear(narrow, width), nn.Tanh(), nn.Linear(width, 16))


@torch.no_grad()
def change(a: nn.Module, b: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    fa, fb = a.eval()(x), b.eval()(x)
    a.train()
    b.train()
    return float((fb - fa).norm() / fa.norm()), float((fb - fa).abs().max())


def run(seeds: list[int], quick: bool, out: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    pre = 100 if quick else 400
    steps = 100 if quick else 800
    check = 50
    metrics: dict[str, dict[str, list[float]]] = {a: {} for a in ARMS}
    curves: dict[str, list[list[float]]] = {a: [] for a in ARMS}
    notes: list[str] = []
    widths = []
    for seed in seeds:
        batches = _teacher_batches((32,), 16, 20, 128, seed)
        tr, held = batches[:16], batches[16:]
        xh = torch.cat([b[0] for b in held])
        base = build(seed, 4)
        torch.manual_seed(seed + 1)
        pre_curve = [eval_loss(base, held)]
        for s in range(0, pre, check):
            train(base, tr, check, start=s)
            pre_curve.append(eval_loss(base, held))
        new_width = 4
        for arm in ARMS:
            m: nn.Module
            if arm == "untreated":
                m = copy.deepcopy(base)
                ls = list(pre_curve)
            elif arm == "graphsurg widen":
                res = gs.operate(base, tr, loss_fn=mse, heal_mode="never", seed=seed,
                                 held_out=held)
                m = res.model
                kept = [v for v in res.verification if v.kept]
                for v in kept:
                    if v.replacement == "widen":
                        new_width = int((v.details or {}).get("width_after", new_width))
                rel, mx = change(base, m, xh)
                metrics[arm].setdefault("change", []).append(rel)
                metrics[arm].setdefault("max abs change", []).append(mx)
                if seed == seeds[0]:
                    notes.append(f"graphsurg widen (seed {seed}): kept "
                                 + ", ".join(f"{v.replacement}@{v.site} (exact={v.exact}, "
                                             f"output change {v.output_change:.2g})"
                                             for v in kept)
                                 + f"; rolled back {[r['replacement'] for r in res.rolled_back]}")
                ls = list(pre_curve)
            else:
                widths.append(new_width)
                m = build(seed, new_width)
                torch.manual_seed(seed + 1)
                ls = [eval_loss(m, held)]
                for s in range(0, pre, check):
                    train(m, tr, check, start=s)
                    ls.append(eval_loss(m, held))
            opt = torch.optim.Adam(m.parameters(), lr=1e-3)
            torch.manual_seed(seed + 2)
            for s in range(pre, pre + steps, check):
                train(m, tr, check, opt=opt, start=s)
                ls.append(eval_loss(m, held))
            curves[arm].append(ls)
            metrics[arm].setdefault("loss", []).append(ls[-1])
    xs = [i * check for i in range((pre + steps) // check + 1)]
    plot_xy(out / "bottleneck.png", {a: (xs, curves[a]) for a in ARMS},
            title="Rank bottleneck: held-out loss (surgery at the dotted line)",
            xlabel="training step", ylabel="held-out MSE", vline=pre)
    w = metrics["graphsurg widen"]
    rows = [[a, fmt(metrics[a]["change"]) if "change" in metrics[a] else "-",
             fmt(metrics[a]["max abs change"]) if "change" in metrics[a] else "-",
             fmt(metrics[a]["loss"])] for a in ARMS]
    return {
        "name": "bottleneck",
        "title": "3. Rank bottleneck: Net2Net widening vs a wide network from scratch",
        "setup": (f"MLP 32-64-4-64-16 on a rank-16 teacher; {pre} steps, then surgery, then "
                  f"{steps} steps (Adam lr 1e-3). The planner widened the width-4 layer to "
                  f"{sorted(set(widths))}; the wide network from scratch has that width and "
                  f"{pre + steps} steps."),
        "table": table(["arm", "relative output change at surgery", "max abs(f' - f)",
                        f"held-out MSE after {pre}+{steps} steps"], rows),
        "metrics": metrics,
        "max_change": max(w.get("change", [math.nan])),
        "plots": ["bottleneck.png"],
        "notes": notes,
        "seconds": time.perf_counter() - t0,
    }
