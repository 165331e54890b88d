"""Experiment 1 -- dying ReLU (Maas et al. 2013; ReDo, Sokar et al. ICML 2023).

A 3-hidden-layer ReLU MLP is trained on a teacher regression task with Adam at a large
learning rate (3e-2) until about half of its units are dormant (ReDo score <= 0.1). Training
then continues at lr 1e-3 for the same number of steps in four arms:

* **untreated**: plain training;
* **ReDo**: every ``K`` steps, units with score ``<= tau = 0.1`` on the current batch get
  their incoming weights re-drawn from the layer's initialiser (bias 0), their outgoing
  weights zeroed and the Adam moments of both reset -- implemented here from the paper's
  description, not with graphsurg;
* **graphsurg operate**: ``gs.operate`` once, the planner's choice, its healing steps counted
  in the budget; the optimizer is rebuilt on the new model;
* **graphsurg activation_swap**: the same with ``prefer=['activation_swap']`` (the swap alone
  at every flagged layer);
* **graphsurg callback**: ReDo's schedule with graphsurg's diagnosis -- the model trains
  through ``torch.compile(backend="graphsurg")`` with a ``gs.Monitor`` and
  ``gs.SurgeryCallback`` operates in place every ``K`` steps (``reinit_dead`` with the
  Adam moments of the re-initialised slices zeroed), keeping the optimizer.
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

from .common import dormant_fraction, eval_loss, fmt, mse, plot_xy, table, train, train_checkpointed

ARMS = ("untreated", "ReDo", "graphsurg operate", "graphsurg activation_swap",
        "graphsurg callback")


def build(seed: int, width: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 4))


class ReDo:
    """ReDo (Sokar et al. 2023, Alg. 1) for a Sequential of Linear/ReLU layers."""

    def __init__(self, model: nn.Sequential, tau: float = 0.1, every: int = 50) -> None:
        self.model, self.tau, self.every = model, tau, every
        self.batch: torch.Tensor | None = None
        self.resets = 0

    @torch.no_grad()
    def __call__(self, step: int, opt: torch.optim.Optimizer) -> None:
        if (step + 1) % self.every or self.batch is None:
            return
        layers = list(self.model)
        h = self.batch
        acts: dict[int, torch.Tensor] = {}
        for i, m in enumerate(layers):  # one forward pass scores every layer (Alg. 1)
            h = m(h)
            if isinstance(m, nn.ReLU):
                acts[i] = h
        for i, h in acts.items():
            score = h.abs().mean(0)
            score = score / score.mean().clamp_min(1e-12)
            idx = (score <= self.tau).nonzero().flatten()
            if idx.numel() == 0:
                continue
            inc, out = layers[i - 1], layers[i + 1]
            assert isinstance(inc, nn.Linear) and isinstance(out, nn.Linear)
            fresh = nn.Linear(inc.in_features, inc.out_features)  # the layer's initialiser
            inc.weight[idx] = fresh.weight[idx]
            inc.bias[idx] = 0.0
            out.weight[:, idx] = 0.0
            for p, dim in ((inc.weight, 0), (inc.bias, 0), (out.weight, 1)):
                st = opt.state.get(p, {})
                for key in ("exp_avg", "exp_avg_sq"):
                    if key in st:
                        st[key].index_fill_(dim, idx, 0.0)
            self.resets += int(idx.numel())


def run(seeds: list[int], quick: bool, out: Path, *, arms: tuple[str, ...] = ARMS,
        library: Any = None, config: gs.DiagnoseConfig | None = None) -> dict[str, Any]:
    """The experiment; ``arms``, ``library`` (graphsurg's replacements) and ``config``
    (its diagnosis) are there for ablations (FINDINGS.md), the defaults are the report's."""
    t0 = time.perf_counter()
    width = 48 if quick else 128
    break_steps = 150 if quick else 200
    steps = 60 if quick else 600
    check = 30 if quick else 50
    heal = 30 if quick else 100
    metrics: dict[str, dict[str, list[float]]] = {a: {} for a in arms}
    curves: dict[str, list[list[float]]] = {a: [] for a in arms}
    dcurves: dict[str, list[list[float]]] = {a: [] for a in arms}
    notes: list[str] = []
    broken_frac = []
    for seed in seeds:
        batches = _teacher_batches((16,), 4, 20, 128, seed)
        tr, held = batches[:16], batches[16:]
        xh = torch.cat([b[0] for b in held])
        model = build(seed, width)
        torch.manual_seed(seed)
        train(model, tr, break_steps, lr=3e-2)
        d0 = dormant_fraction(model, xh)
        broken_frac.append(d0)
        l0 = eval_loss(model, held)
        for arm in arms:
            torch.manual_seed(seed + 1)
            m: nn.Module = copy.deepcopy(model)
            done = 0
            ls, ds = [l0], [d0]
            every = None
            res: Any = None
            if arm == "ReDo":
                assert isinstance(m, nn.Sequential)
                redo = ReDo(m, tau=0.1, every=check)
                every = redo
            elif arm in ("graphsurg operate", "graphsurg activation_swap"):
                prefer = ["activation_swap"] if arm.endswith("swap") else []
                try:
                    # the default certificates (issue 13: L(f') <= L(f), within 5% of the
                    # equally fine-tuned untreated copy, issues(f') a strict subset)
                    res = gs.operate(m, tr, loss_fn=mse, heal_steps=heal, seed=seed,
                                     library=library, config=config,
                                     prefer=prefer)
                except gs.SurgeryFailed as e:
                    notes.append(f"{arm} (seed {seed}): no surgery ({e})")
                    res = None
            if res is not None:
                m = res.model
                done = int(res.healing.get("steps") or 0)
                kept = [f"{v.replacement}@{v.site}" for v in res.verification if v.kept]
                if seed == seeds[0]:
                    notes.append(f"{arm} (seed {seed}): kept {', '.join(kept) or 'nothing'}; "
                                 f"{done} healing step(s); rolled back "
                                 f"{[r['replacement'] for r in res.rolled_back]}")
                metrics[arm].setdefault("schemas kept", []).append(len(kept))
            opt = torch.optim.Adam(m.parameters(), lr=1e-3)
            fwd: Any = None
            cb: Any = None
            if arm == "graphsurg callback":
                torch._dynamo.reset()
                mon = gs.Monitor(every=2, config=config)
                fwd = torch.compile(m, backend="graphsurg",
                                    options={"monitor": mon, "inner": "aot_eager"})
                cb = gs.SurgeryCallback(m, opt, mon, every=check, seed=seed, library=library)
            # checkpoints every `check` steps; healing steps count towards the budget
            train_checkpointed(m, tr, held, xh, ls, ds, steps=steps, check=check, done=done,
                               opt=opt, every=every, forward=fwd,
                               after=None if cb is None else cb.step)
            if cb is not None:
                applied = [a for e in cb.history for a in e.applied]
                metrics[arm].setdefault("schemas kept", []).append(len(applied))
                if seed == seeds[0]:
                    notes.append(f"{arm} (seed {seed}): {len(applied)} in-place edit(s) in "
                                 f"{len(cb.history)} rounds: {sorted(set(applied))}")
                torch._dynamo.reset()
            curves[arm].append(ls)
            dcurves[arm].append(ds)
            metrics[arm].setdefault("final loss", []).append(ls[-1])
            metrics[arm].setdefault("dormant", []).append(ds[-1])
    xs = [i * check for i in range(steps // check + 1)]
    plot_xy(out / "dying_relu_loss.png", {a: (xs, curves[a]) for a in arms},
            title="Dying ReLU: held-out loss after the large-lr phase", xlabel="step (lr 1e-3)",
            ylabel="held-out MSE")
    plot_xy(out / "dying_relu_dormant.png", {a: (xs, dcurves[a]) for a in arms},
            title="Dying ReLU: dormant fraction (ReDo score <= 0.1)", xlabel="step (lr 1e-3)",
            ylabel="dormant fraction", logy=False)
    rows = [[a, fmt(metrics[a]["dormant"]), fmt(metrics[a]["final loss"])] for a in arms]
    return {
        "name": "dying_relu",
        "title": "1. Dying ReLU: ReDo vs graphsurg",
        "setup": (f"MLP 16-{width}x3-4 (ReLU) on a teacher regression task; Adam lr 3e-2 for "
                  f"{break_steps} steps leaves {fmt(broken_frac)} of the units dormant; then "
                  f"{steps} steps at lr 1e-3 (graphsurg's healing steps included). ReDo: "
                  f"tau=0.1 every {check} steps with Adam moment reset."),
        "table": table(["arm", f"dormant fraction after {steps} steps",
                        "held-out MSE"], rows),
        "metrics": metrics,
        "broken_dormant": broken_frac,
        "plots": ["dying_relu_loss.png", "dying_relu_dormant.png"],
        "notes": notes,
        "seconds": time.perf_counter() - t0,
    }
