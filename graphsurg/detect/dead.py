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
(``act(gate) * up``) ``partner``, the up projection whose units pair with the gate's; and
``utility`` (of the dormant units) when the consumers' weights were measured.

Usefulness beyond dormancy: :func:`contribution_utility` is continual backprop's measure
(Dohare et al., Nature 2024), ``mean|h_i| x sum_k |w_out[k, i]|`` -- a unit can fire and
still contribute nothing when its outgoing weights are ~0 (live but useless).
:func:`site_utility` computes it from a :class:`Measurements` (layer weights and their next
modules), :func:`lowest_utility` picks CBP's replacement candidates; ``gs.SurgeryCallback``
uses both for its opt-in utility replacement (``replace_rate=``).
"""

from __future__ import annotations

from collections.abc import Sequence

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


def contribution_utility(mean_abs: torch.Tensor, outgoing: torch.Tensor) -> torch.Tensor:
    """CBP's contribution utility per unit, float64: ``mean_abs[i] * outgoing[i]``, where
    ``mean_abs`` is the unit's mean |activation| and ``outgoing`` the sum of the absolute
    weights reading it in every consumer."""
    if mean_abs.shape != outgoing.shape:
        raise ValueError(f"contribution_utility: {tuple(mean_abs.shape)} mean |h| values for "
                         f"{tuple(outgoing.shape)} outgoing sums; pass one per unit")
    return mean_abs.to(torch.float64) * outgoing.to(torch.float64)


def outgoing_mass(weight: torch.Tensor, width: int) -> torch.Tensor | None:
    """Sum of |w| over each input column of a consumer weight stored ``(out, in, ...)``
    (nn.Linear / nn.Conv), grouped into ``width`` units (a flatten feeds each unit's
    ``in // width`` consecutive columns); None when ``in`` is not a multiple of ``width``."""
    if weight.dim() < 2 or weight.shape[1] % width or weight.shape[1] < width:
        return None
    cols = weight.detach().abs().to(torch.float64).transpose(0, 1).reshape(weight.shape[1], -1)
    return cols.sum(1).reshape(width, -1).sum(1)


def site_utility(m: Measurements, s: SiteMeasure) -> torch.Tensor | None:
    """The contribution utility of each unit of site ``s`` from the measured weights of the
    layers reading it (the producer's ``next_modules``); None when a consumer's weight was
    not measured or does not read the units column-wise."""
    layers = {lm.module: lm for lm in m.layers}
    prod = layers.get(s.module)
    if prod is None or not prod.next_modules:
        return None
    width = s.stats.channels
    total = torch.zeros(width, dtype=torch.float64)
    for name in prod.next_modules:
        c = layers.get(name)
        mass = None if c is None or c.weight is None else outgoing_mass(c.weight, width)
        if mass is None:
            return None
        total += mass
    return contribution_utility(s.stats.mean_abs, total)


def lowest_utility(utility: torch.Tensor, eligible: torch.Tensor, k: int,
                   exclude: Sequence[int] = ()) -> list[int]:
    """The ``k`` eligible units (``eligible``: boolean mask, e.g. CBP's "older than the
    maturity threshold") with the lowest utility, never all of a layer's units; equal
    utilities (e.g. fresh units, all 0) go lowest index first."""
    ok = eligible.clone()
    ok[list(exclude)] = False
    idx = ok.nonzero().flatten()
    k = min(k, idx.numel(), utility.numel() - 1)
    if k <= 0:
        return []
    return sorted(int(i) for i in idx[utility[idx].argsort(stable=True)[:k]])


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
    # layers with dormant units below the thresholds: reported too under dormant_every_layer
    # once another layer is (ReDo resets every layer's dormant units)
    below: list[tuple[SiteMeasure, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
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
        if not units:
            continue
        if (n_dead < max(1, config.min_dead_units)
                and len(units) < config.min_dormant_fraction * s.stats.channels):
            below.append((s, dormant, dead, constant, score))
            continue
        out.append(_problem(m, s, dormant, dead, constant, score, config))
    if config.dormant_every_layer and out:
        out += [_problem(m, *b, config) for b in below]
        out.sort(key=lambda p: next(s.order for s in m.sites if s.module == p.site.module
                                    and s.node == p.site.node))
    return out


def _problem(m: Measurements, s: SiteMeasure, dormant: torch.Tensor, dead: torch.Tensor,
             constant: torch.Tensor, score: torch.Tensor, config: DiagnoseConfig) -> Problem:
    units = torch.nonzero(dormant).flatten().tolist()
    n_dead = int(dead.sum())
    width = s.stats.channels
    const_units = torch.nonzero(constant).flatten().tolist()
    util = site_utility(m, s)
    return Problem(
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
            **({"utility": [float(util[u]) for u in units]} if util is not None
               else {}),
        },
    )
