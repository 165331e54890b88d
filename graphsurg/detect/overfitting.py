"""Overfitting: a train/held-out loss gap, localised to the layers whose units co-adapt.

Runs only when ``gs.diagnose(..., val_data=...)`` measured both losses (eval mode, the same
``loss_fn``). The model over-fits when ``val_loss > (1 + overfit_gap) x train_loss`` (and
the difference exceeds ``overfit_min_delta``). The problem is localised to the activation
sites where pairs of units co-adapt: ``|corr(h_i, h_j)| > coadapt_corr`` over the sampled
rows (constant units excluded). When no site co-adapts, one problem is reported at the last
activation site (``evidence["localised"] = False``): dropout before the head is the classic
remedy.
"""

from __future__ import annotations

import torch

from graphsurg._config import DiagnoseConfig
from graphsurg._problems import Problem, Site

from . import Measurements, SiteMeasure


def coadapted_pairs(sample: torch.Tensor, threshold: float) -> list[tuple[int, int, float]]:
    """``(i, j, corr)`` for unit pairs ``i < j`` of a ``(rows, units)`` sample whose
    ``|corr| > threshold`` (units with no variation are skipped)."""
    x = sample.double()
    if x.shape[0] < 3:
        return []
    x = x - x.mean(0, keepdim=True)
    sd = x.pow(2).mean(0).sqrt()
    live = sd > 1e-8 * (1.0 + sample.double().abs().mean(0))
    idx = torch.nonzero(live).flatten()
    if idx.numel() < 2:
        return []
    z = x[:, idx] / sd[idx]
    c = (z.T @ z) / x.shape[0]
    iu = torch.triu_indices(len(idx), len(idx), 1)
    vals = c[iu[0], iu[1]]
    hit = vals.abs() > threshold
    return [(int(idx[a]), int(idx[b]), float(v)) for a, b, v in
            zip(iu[0][hit].tolist(), iu[1][hit].tolist(), vals[hit].tolist(), strict=True)]


def detect_overfitting(m: Measurements, config: DiagnoseConfig) -> list[Problem]:
    train = m.losses.get("train")
    val = m.losses.get("val")
    if train is None or val is None or not (train == train and val == val):
        return []
    if not (val > (1.0 + config.overfit_gap) * train and val - train > config.overfit_min_delta):
        return []
    base = {"train_loss": train, "val_loss": val, "gap": val - train,
            "relative_gap": (val - train) / max(abs(train), 1e-12),
            "threshold": config.overfit_gap, "coadapt_corr": config.coadapt_corr}
    out: list[Problem] = []
    acts: list[SiteMeasure] = [s for s in m.sites if s.family != "linear"] or list(m.sites)
    for s in acts:
        if s.sample is None or s.sample.dim() != 2:
            continue
        pairs = coadapted_pairs(s.sample, config.coadapt_corr)
        if not pairs:
            continue
        units = sorted({u for i, j, _ in pairs for u in (i, j)})
        width = int(s.sample.shape[1])
        out.append(Problem(
            kind="Overfitting", site=Site(s.module, s.node, s.op, ir=m.ir),
            severity=min(1.0, len(units) / max(1, width)), units=tuple(units),
            evidence={**base, "pairs": len(pairs), "width": width, "localised": True,
                      "coadapted_fraction": len(units) / max(1, width),
                      "top_pairs": [[i, j, c] for i, j, c in sorted(
                          pairs, key=lambda t: -abs(t[2]))[:10]]}))
    if not out and acts:
        s = acts[-1]
        out.append(Problem(kind="Overfitting", site=Site(s.module, s.node, s.op, ir=m.ir),
                           severity=min(1.0, base["relative_gap"]),
                           evidence={**base, "pairs": 0, "localised": False}))
    return out
