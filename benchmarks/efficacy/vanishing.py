"""Experiment 2 -- vanishing gradients (He et al. 2016): a 32-layer plain MLP.

A plain (no skip connections) MLP of 32 Linear layers, width 32, with sigmoid or tanh
activations, on a teacher regression task. Arms:

* **untreated**: the plain network, fine-tuned;
* **graphsurg gated**: ``gs.operate`` with ``require_exact=True`` -- the planner's
  ``residual_bypass`` over the vanishing span in its exact zero-gated form;
* **graphsurg residual**: ``gs.operate`` with the default certificates: the planner's
  residual conversion (its bypass subtracts the activation's centre, so the residual stream
  stays bounded), judged after healing like every schema;
* **residual from scratch**: the same depth built with ``x + act(W x + b)`` blocks.

Every arm gets the same number of fine-tune steps (Adam, lr 1e-3, ``N`` steps, same
batches, same order): the graphsurg arms spend ``N/5`` of them healing inside ``gs.operate``
(where the certificates judge them, issues(f') a strict subset of issues(f) included) and
the rest here.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import graphsurg as gs
from graphsurg._zoo import _teacher_batches

from .common import eval_loss, first_layer_grad_norm, fmt, mse, plot_curves, table, train

ARMS = ("untreated", "graphsurg gated", "graphsurg residual", "residual from scratch")
ACTS = {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh}


def plain(seed: int, act: str, depth: int = 32, width: int = 32) -> nn.Sequential:
    torch.manual_seed(seed)
    a = ACTS[act]
    layers: list[nn.Module] = [nn.Linear(16, width), a()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), a()]
    layers.append(nn.Linear(width, 4))
    return nn.Sequential(*layers)


class Residual(nn.Module):
    def __init__(self, width: int, act: str) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.act = ACTS[act]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.fc(x))


def residual(seed: int, act: str, depth: int = 32, width: int = 32) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, width), ACTS[act](),
                         *[Residual(width, act) for _ in range(depth - 2)],
                         nn.Linear(width, 4))


def _operate(model: nn.Module, tr: list[Any], seed: int, gated: bool, heal: int
             ) -> tuple[nn.Module, str, int]:
    """gs.operate with the default certificates (gated: exact edits only); it heals inside
    (``heal`` steps, counted in the arm's step budget) and is judged after healing."""
    cert = gs.Certificates(require_exact=True) if gated else gs.Certificates()
    try:
        res = gs.operate(model, tr, loss_fn=mse, certificates=cert, heal_steps=heal,
                         prefer=["residual_bypass"], seed=seed)
    except gs.SurgeryFailed as e:
        return copy.deepcopy(model), f"no surgery: {e}", 0
    kept = [v for v in res.verification if v.kept and v.replacement == "residual_bypass"]
    desc = "; ".join(f"{v.replacement} {v.variant} {(v.details or {}).get('variant')} over "
                     f"{len((v.details or {}).get('span', []))} layer(s), output change "
                     f"{v.output_change:.2g}" for v in kept) or (
        f"rolled back: {res.rolled_back}")
    done = int(res.healing.get("steps") or 0)
    g = res.guarantee
    desc += f"; healed {done} step(s) inside operate" + (
        f"; problems {g.get('before')} -> {g.get('after')}" if isinstance(g, dict) else "")
    return res.model, desc, done


def run(seeds: list[int], quick: bool, out: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    steps = 60 if quick else 500
    depth = 12 if quick else 32  # quick: a smoke test, not the experiment
    acts = ["sigmoid"] if quick else ["sigmoid", "tanh"]
    metrics: dict[str, dict[str, list[float]]] = {f"{a} / {arm}": {} for a in acts
                                                  for arm in ARMS}
    notes: list[str] = []
    plots = []
    for act in acts:
        curves: dict[str, list[list[float]]] = {a: [] for a in ARMS}
        for seed in seeds:
            batches = _teacher_batches((16,), 4, 20, 128, seed)
            tr, held = batches[:16], batches[16:]
            base = plain(seed, act, depth)
            for arm in ARMS:
                if arm == "untreated":
                    m: nn.Module = copy.deepcopy(base)
                elif arm == "residual from scratch":
                    m = residual(seed, act, depth)
                done = 0
                if arm not in ("untreated", "residual from scratch"):
                    m, desc, done = _operate(base, tr, seed, gated=arm.endswith("gated"),
                                             heal=steps // 5)
                    if seed == seeds[0]:
                        notes.append(f"{act}, {arm} (seed {seed}): {desc}")
                key = f"{act} / {arm}"
                g0 = first_layer_grad_norm(m, held[0])
                torch.manual_seed(seed + 1)
                losses = train(m, tr, steps - done, lr=1e-3)  # healing counts in the budget
                curves[arm].append(losses)
                metrics[key].setdefault("grad0", []).append(g0)
                metrics[key].setdefault("gradN", []).append(first_layer_grad_norm(m, held[0]))
                metrics[key].setdefault("loss", []).append(eval_loss(m, held))
        name = f"vanishing_{act}.png"
        plot_curves(out / name, curves, title=f"{depth}-layer plain {act} MLP: training loss",
                    xlabel="fine-tune step (Adam, lr 1e-3)", ylabel="training MSE",
                    smooth_k=10)
        plots.append(name)
    rows = [[k, fmt(v["grad0"]), fmt(v["gradN"]), fmt(v["loss"])] for k, v in metrics.items()]
    return {
        "name": "vanishing",
        "title": "2. Vanishing gradients: residual bypass vs residual from scratch",
        "setup": (f"{depth} Linear layers, width 32, {' / '.join(acts)}, teacher regression "
                  f"16 -> 4; every arm fine-tuned {steps} steps with Adam lr 1e-3 on the same "
                  "batches. Gradient norms are of the first layer's weight on a held-out batch."),
        "table": table(["activation / arm", "first-layer grad norm at surgery",
                        f"first-layer grad norm after {steps} steps",
                        f"held-out MSE after {steps} steps"], rows),
        "metrics": metrics,
        "plots": plots,
        "notes": notes,
        "seconds": time.perf_counter() - t0,
    }
