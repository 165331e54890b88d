"""DeadNeurons: ReDo dormancy (Sokar et al., ICML 2023) and dead units.

Checked at the outputs of ReLU-family activations (ReLU, LeakyReLU, GELU, SiLU, ELU,
Softplus, ...). A unit's score is its mean |h| over the mean of its layer's units' mean |h|;
it is *dormant* at score <= tau. It is *dead* when its output never varies on the data
(variance ~ 0 relative to its magnitude) and it never fired. A layer is reported when it has
a dead unit or when at least ``min_dormant_fraction`` of its units are dormant: a few
rarely-firing units are normal in a healthy network. Constant tanh/sigmoid units are
Saturation's to report.

A site is judged only when its units were each observed at least ``min_unit_samples`` times
(``NeuronStats.count``): a squeeze-excite reduction sees one pooled vector per image, and four
units seen on sixteen images cannot be told dormant from unlucky. :func:`too_few_samples`
names the sites skipped, for the diagnosis notes.

Evidence (the same keys for both IRs, read by the excision appliers): ``width``,
``fraction``, ``n_dead``, ``dead`` (unit indices), ``constant`` (units constant on the data,
dead ones included) and ``constant_values`` (their mean outputs, same order: what an excision
folds into the next layer's bias), ``dormant``, ``scores``, ``firing_rate`` (of the dormant
units), ``activation``, ``tau``, ``samples`` and ``channel_dim`` (the unit axis of the
observed value: 1 for a conv's NCHW output, -1 for a linear layer's), and for a gated unit
(``act(gate) * up``) ``partner``, the up projection whose units pair with the gate's.
"""

from __future__ import annotations

import torch

from graphsurg._config import DiagnoseConfig
from graphsurg._problems import Problem, Site

from . import Measurements, SiteMeasure


def unit_flags(s: SiteMeasure, config: DiagnoseConfig) -> tuple[torch.Tensor, torch.Tensor,
                                                                 torch.Tensor, torch.Tensor]:
    """(dormant, dead, constant, score) boolean/float masks per unit of a site."""
    st = s.stats
    seen = st.count > 0
    score = st.dormancy_score
    var = st.var
    mean = st.mean
    constant = seen & (var <= config.dead_var * (1.0 + mean * mean))
    if s.family == "relu":
        dead = constant & (st.n_nonpos == st.count)
        dormant = seen & ((score <= config.dormant_tau) | dead)
    else:
        dead = constant
        dormant = dead.clone()
    return dormant, dead, constant, score


def _observations(s: SiteMeasure) -> int:
    """How many times each unit of the site was observed (finite values)."""
    return int(s.stats.count.max()) if s.stats.count.numel() else 0


def too_few_samples(m: Measurements, config: DiagnoseConfig) -> list[str]:
    """Notes naming the ReLU-family sites not judged for dormancy: fewer than
    ``config.min_unit_samples`` observations per unit."""
    return [f"site {Site(s.module, s.node, s.op, ir=m.ir).address}: dormancy not judged, "
            f"{_observations(s)} observation(s) per unit < min_unit_samples="
            f"{config.min_unit_samples}"
            for s in m.sites
            if s.family == "relu" and 0 < _observations(s) < config.min_unit_samples]


def detect_dead(m: Measurements, config: DiagnoseConfig) -> list[Problem]:
    out: list[Problem] = []
    for s in m.sites:
        if s.family != "relu":
            continue  # saturating units are Saturation's; layer outputs are not activations
        if int((s.stats.count > 0).sum()) == 0:
            continue  # all values non-finite: NonFinite reports it
        if _observations(s) < config.min_unit_samples:
            continue  # too few observations per unit to judge (too_few_samples notes it)
        dormant, dead, constant, score = unit_flags(s, config)
        units = torch.nonzero(dormant).flatten().tolist()
        n_dead = int(dead.sum())
        if not units or (n_dead < max(1, config.min_dead_units)
                         and len(units) < config.min_dormant_fraction * s.stats.channels):
            continue
        width = s.stats.channels
        const_units = torch.nonzero(constant).flatten().tolist()
        out.append(
            Problem(
                kind="DeadNeurons",
                site=Site(s.module, s.node, s.op, ir=m.ir),
                severity=len(units) / width,
                units=tuple(int(u) for u in units),
                evidence={
                    "width": width,
                    "fraction": len(units) / width,
                    "n_dead": n_dead,
                    "dead": torch.nonzero(dead).flatten().tolist(),
                    "constant": const_units,
                    "constant_values": [float(s.stats.mean[u]) for u in const_units],
                    "dormant": units,
                    "scores": [float(score[u]) for u in units],
                    "firing_rate": [float(s.stats.firing_rate[u]) for u in units],
                    "activation": s.op,
                    "tau": config.dormant_tau,
                    "samples": int(s.stats.count.max()),
                    "channel_dim": s.channel_dim,
                    **({"partner": s.partner} if s.partner else {}),
                },
            )
        )
    return out
