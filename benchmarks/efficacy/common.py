"""Shared helpers of the efficacy experiments: statistics, dormancy, training, plots."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

Batch = tuple[torch.Tensor, torch.Tensor]
ACTIVATIONS = (nn.ReLU, nn.LeakyReLU, nn.PReLU)


def mse(out: torch.Tensor, batch: Batch) -> torch.Tensor:
    return F.mse_loss(out, batch[1])


def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    xs = [float(x) for x in xs]
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def fmt(xs: Sequence[float], digits: int = 3) -> str:
    """``mean ± std`` with ``digits`` significant digits."""
    m, s = mean_std(xs)
    if not math.isfinite(m):
        return "n/a"
    return f"{m:.{digits}g} ± {s:.2g}"


def is_activation(m: nn.Module) -> bool:
    return isinstance(m, ACTIVATIONS) or type(m).__name__ == "RampLeakyReLU"


@torch.no_grad()
def dormant_fraction(model: nn.Module, x: torch.Tensor, tau: float = 0.1) -> float:
    """ReDo's dormant fraction over every activation module's units (score <= tau)."""
    hs: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, _i, o: hs.append(o.detach()))
             for m in model.modules() if is_activation(m)]
    was = model.training
    model.eval()
    try:
        model(x)
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    dead = total = 0
    for h in hs:
        s = h.abs().flatten(0, -2).mean(0)
        s = s / s.mean().clamp_min(1e-12)
        dead += int((s <= tau).sum())
        total += s.numel()
    return dead / max(1, total)


@torch.no_grad()
def eval_loss(model: nn.Module, batches: Sequence[Batch],
              loss_fn: Callable[[Any, Batch], torch.Tensor] = mse) -> float:
    was = model.training
    model.eval()
    try:
        vals = [float(loss_fn(model(b[0]), b)) for b in batches]
    finally:
        model.train(was)
    return statistics.fmean(vals)


def first_layer_grad_norm(model: nn.Module, batch: Batch,
                          loss_fn: Callable[[Any, Batch], torch.Tensor] = mse) -> float:
    """Gradient norm of the first parametrised layer's weight on ``batch``."""
    model.zero_grad(set_to_none=True)
    loss_fn(model(batch[0]), batch).backward()
    w = next(p for n, p in model.named_parameters() if n.endswith("weight"))
    g = 0.0 if w.grad is None else float(w.grad.norm())
    model.zero_grad(set_to_none=True)
    return g


def train(model: nn.Module, batches: Sequence[Batch], steps: int, *, lr: float = 1e-3,
          opt: torch.optim.Optimizer | None = None, start: int = 0,
          loss_fn: Callable[[Any, Batch], torch.Tensor] = mse,
          every: Callable[[int, torch.optim.Optimizer], None] | None = None,
          forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
          after: Callable[[Batch], Any] | None = None) -> list[float]:
    """Adam (lr ``lr``) for ``steps`` steps cycling over ``batches``; returns the losses.

    ``every(step, opt)`` runs after each optimiser step (ReDo's resets hook in here);
    ``forward`` replaces ``model`` in the forward pass (a compiled model) and ``after(batch)``
    runs after each step (``gs.SurgeryCallback.step``)."""
    opt = opt or torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    losses = []
    for s in range(start, start + steps):
        b = batches[s % len(batches)]
        opt.zero_grad(set_to_none=True)
        loss = loss_fn((model if forward is None else forward)(b[0]), b)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if every is not None:
            every(s, opt)
        if after is not None:
            after(b)
    return losses


def smooth(xs: Sequence[float], k: int) -> list[float]:
    if k <= 1:
        return list(xs)
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= k:
            acc -= xs[i - k]
        out.append(acc / min(i + 1, k))
    return out


def plot_curves(path: Path, curves: dict[str, list[list[float]]], *, title: str,
                xlabel: str, ylabel: str, logy: bool = True, smooth_k: int = 1,
                vline: float | None = None, x0: int = 0) -> None:
    """One line per arm: the mean over seeds, with a min-max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    for name, runs in curves.items():
        if not runs:
            continue
        n = min(len(r) for r in runs)
        rs = [smooth(r[:n], smooth_k) for r in runs]
        xs = list(range(x0, x0 + n))
        mean = [statistics.fmean(v) for v in zip(*rs, strict=True)]
        ax.plot(xs, mean, label=name, lw=1.4)
        ax.fill_between(xs, [min(v) for v in zip(*rs, strict=True)],
                        [max(v) for v in zip(*rs, strict=True)], alpha=0.18)
    _finish(fig, ax, path, title=title, xlabel=xlabel, ylabel=ylabel, logy=logy, vline=vline)


def plot_xy(path: Path, curves: dict[str, tuple[Sequence[float], list[list[float]]]], *,
            title: str, xlabel: str, ylabel: str, logy: bool = True,
            vline: float | None = None) -> None:
    """Like :func:`plot_curves` with explicit x values per arm: ``{arm: (xs, runs)}``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    for name, (xs, runs) in curves.items():
        n = min([len(xs)] + [len(r) for r in runs])
        if not runs or n == 0:
            continue
        cols = list(zip(*[r[:n] for r in runs], strict=True))
        ax.plot(list(xs)[:n], [statistics.fmean(c) for c in cols], label=name, lw=1.4,
                marker="." if n < 40 else None)
        ax.fill_between(list(xs)[:n], [min(c) for c in cols], [max(c) for c in cols],
                        alpha=0.18)
    _finish(fig, ax, path, title=title, xlabel=xlabel, ylabel=ylabel, logy=logy, vline=vline)


def _finish(fig: Any, ax: Any, path: Path, *, title: str, xlabel: str, ylabel: str,
            logy: bool, vline: float | None) -> None:
    """Labels, scale, grid and legend of a curve plot; save it and close the figure."""
    import matplotlib.pyplot as plt

    if vline is not None:
        ax.axvline(vline, color="grey", ls=":", lw=1)
    if logy:
        ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "| " + " | ".join(columns) + " |"
    sep = "| " + " | ".join("---" for _ in columns) + " |"
    return "\n".join([head, sep] + ["| " + " | ".join(r) + " |" for r in rows])


def _t_sf(t: float, df: int) -> float:
    """P(T > t) for Student's t with ``df`` degrees of freedom (Simpson's rule on the
    density; no scipy here)."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def f(x: float) -> float:
        return c * (1 + x * x / df) ** (-(df + 1) / 2)

    a, b, n = 0.0, abs(t), 2000
    h = (b - a) / n
    area = f(a) + f(b) + sum((4 if i % 2 else 2) * f(a + i * h) for i in range(1, n))
    return max(0.0, 0.5 - area * h / 3) if t >= 0 else min(1.0, 0.5 + area * h / 3)


def paired(treated: Sequence[float], baseline: Sequence[float]) -> str:
    """Paired-by-seed comparison of a lower-is-better metric: mean difference (treated -
    baseline) ± std, wins, the paired t-test's and the exact sign test's two-sided p."""
    d = [a - b for a, b in zip(treated, baseline, strict=True)]
    n = len(d)
    m, s = mean_std(d)
    wins = sum(x < 0 for x in d)
    ties = sum(x == 0 for x in d)
    k = min(wins, n - wins - ties)
    nn = n - ties
    sign_p = min(1.0, 2 * sum(math.comb(nn, i) for i in range(k + 1)) / 2 ** nn) if nn else 1.0
    t_p = (2 * _t_sf(abs(m) / (s / math.sqrt(n)), n - 1)) if n > 1 and s > 0 else math.nan
    return (f"difference {m:+.3g} ± {s:.2g}, lower on {wins} of {n} seeds, paired t-test "
            f"p={t_p:.2g}, sign test p={sign_p:.2g}")


def train_checkpointed(m: nn.Module, tr: Sequence[Batch], held: Sequence[Batch],
                       xh: torch.Tensor, ls: list[float], ds: list[float], *, steps: int,
                       check: int, done: int, opt: torch.optim.Optimizer, every: Any = None,
                       forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
                       after: Callable[[Any], Any] | None = None) -> None:
    """Train ``m`` from step ``done`` (the steps spent inside operate's healing) to
    ``steps``, appending the held-out loss and the dormant fraction to ``ls`` / ``ds`` every
    ``check`` steps (NaN for the checkpoints inside the healing). A ``every`` with a
    ``batch`` attribute (ReDo) is given the training batch of each span."""
    s = done
    if done:  # the model right after operate (and its healing)
        while len(ls) < done // check:
            ls.append(math.nan)
            ds.append(math.nan)
        if done % check == 0:
            ls.append(eval_loss(m, held))
            ds.append(dormant_fraction(m, xh))
    while s < steps:
        n = min(check - s % check, steps - s)
        if hasattr(every, "batch"):
            every.batch = tr[s % len(tr)][0]
        train(m, tr, n, opt=opt, start=s, every=every, forward=forward, after=after)
        s += n
        if s % check == 0 or s == steps:
            while len(ls) < s // check:
                ls.append(math.nan)
                ds.append(math.nan)
            ls.append(eval_loss(m, held))
            ds.append(dormant_fraction(m, xh))
