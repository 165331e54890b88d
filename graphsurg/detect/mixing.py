"""MixingCollapse: the positions of a sequence (or spatial map) collapse onto few directions.

For each module whose output is a sequence value ``(N, T, d)`` (``T >= 2``), the *position
rank* of a sample is the effective rank of its ``T x d`` matrix centred across positions (the
number of singular values holding ``effective_rank_energy`` of its energy; 0 when every
position carries the same vector). A module is reported when its mean position rank is at
most ``mixing_rank_fraction x min(T - 1, d)`` while the previous sequence value's was above
twice that (or it is the first sequence value): the first place where token mixing collapsed (later values inherit it and are not
reported).

The observers of :func:`graphsurg.diagnose` keep rows without their sequence grouping, so this
detector measures with its own forward hooks: call :func:`detect_mixing_collapse` on the
model and data and add its problems to a diagnosis (``gs.Diagnosis(problems=...)``) to plan
the zero-gated attention block.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from graphsurg._config import DiagnoseConfig
from graphsurg._data import InputFn, iter_batches, run_model
from graphsurg._problems import Problem, Site


def position_rank(h: torch.Tensor, energy: float) -> torch.Tensor:
    """Effective rank across positions of each sample of ``h`` ``(N, T, d)`` (float64)."""
    x = h.double()
    x = x - x.mean(1, keepdim=True)
    s2 = torch.linalg.svdvals(x).pow(2)  # (N, min(T, d))
    total = s2.sum(1, keepdim=True)
    scale = h.double().pow(2).sum((1, 2)).unsqueeze(1)
    c = torch.cumsum(s2, 1) / total.clamp_min(1e-300)
    ranks = (c < energy).sum(1).double() + 1
    return torch.where(total.squeeze(1) <= 1e-12 * scale.squeeze(1).clamp_min(1e-300),
                       torch.zeros_like(ranks), ranks)


@torch.no_grad()
def detect_mixing_collapse(model: nn.Module, data: Iterable[Any], *,
                           config: DiagnoseConfig | None = None,
                           input_fn: InputFn | None = None) -> list[Problem]:
    """Problems where the position rank of a sequence value collapses (see module docstring).

    The model is run in eval mode on up to ``config.max_batches`` batches (mode restored, no
    hooks left behind, parameters untouched)."""
    cfg = config or DiagnoseConfig()
    ranks: dict[str, list[torch.Tensor]] = {}
    shapes: dict[str, tuple[int, int]] = {}
    order: list[str] = []
    handles = []

    def hook(path: str) -> Any:
        def fn(m: nn.Module, args: Any, out: Any) -> None:
            if isinstance(out, torch.Tensor) and out.is_floating_point() and out.dim() == 3 \
                    and out.shape[1] >= 2 and torch.isfinite(out).all():
                if path not in ranks:
                    order.append(path)
                    ranks[path] = []
                ranks[path].append(position_rank(out.detach(), cfg.effective_rank_energy))
                shapes[path] = (int(out.shape[1]), int(out.shape[2]))
        return fn

    for path, m in model.named_modules():
        if path:
            handles.append(m.register_forward_hook(hook(path)))
    was = model.training
    model.eval()
    try:
        for i, b in enumerate(iter_batches(data, cfg.max_batches)):
            run_model(model, b, input_fn, i)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    out: list[Problem] = []
    prev: float | None = None
    for path in order:
        r = float(torch.cat(ranks[path]).mean())
        t, d = shapes[path]
        limit = cfg.mixing_rank_fraction * min(t - 1, d)
        if r <= limit and (prev is None or prev > 2 * limit):
            m = model.get_submodule(path)
            out.append(Problem(
                kind="MixingCollapse", site=Site(path, "", type(m).__name__),
                severity=float(1 - r / max(prev or min(t - 1, d), 1e-12)),
                evidence={"position_rank": r, "previous_rank": prev, "positions": t,
                          "dim": d, "limit": limit, "energy": cfg.effective_rank_energy}))
        prev = r
    return out
