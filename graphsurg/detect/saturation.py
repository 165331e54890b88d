"""Saturation: tanh/sigmoid/hardtanh units that sit in the flat region for >= 99% of inputs.

Like dormancy, saturation is judged only where every unit was observed at least
``min_unit_samples`` times: a squeeze-excite gate (a HardSigmoid over one pooled vector per
image) seen on twelve images cannot be told stuck from unlucky. :func:`too_few_samples` names
the sites skipped, for the diagnosis notes.
"""

from __future__ import annotations

import torch

from graphsurg._config import DiagnoseConfig
from graphsurg._problems import Problem, Site

from . import Measurements, SiteMeasure


def _observations(s: SiteMeasure) -> int:
    return int(s.stats.count.max()) if s.stats.count.numel() else 0


def too_few_samples(m: Measurements, config: DiagnoseConfig) -> list[str]:
    """Notes naming the saturating sites not judged: fewer than ``config.min_unit_samples``
    observations per unit."""
    return [f"site {Site(s.module, s.node, s.op, ir=m.ir).address}: saturation not judged, "
            f"{_observations(s)} observation(s) per unit < min_unit_samples="
            f"{config.min_unit_samples}"
            for s in m.sites
            if s.family == "saturating" and s.saturated_fraction is not None
            and 0 < _observations(s) < config.min_unit_samples]


def detect_saturation(m: Measurements, config: DiagnoseConfig) -> list[Problem]:
    out: list[Problem] = []
    for s in m.sites:
        if s.family != "saturating" or s.saturated_fraction is None:
            continue
        if _observations(s) < config.min_unit_samples:
            continue  # too few observations per unit to judge (too_few_samples notes it)
        frac = s.saturated_fraction
        units = torch.nonzero((frac >= config.saturation_fraction) & (s.stats.count > 0))
        units_l = units.flatten().tolist()
        if not units_l:
            continue
        width = s.stats.channels
        out.append(
            Problem(
                kind="Saturation",
                site=Site(s.module, s.node, s.op, ir=m.ir),
                severity=len(units_l) / width,
                units=tuple(int(u) for u in units_l),
                evidence={
                    "width": width,
                    "fraction": len(units_l) / width,
                    "saturated_fraction": [float(frac[u]) for u in units_l],
                    "activation": s.op,
                    "margin": config.saturation_margin,
                    "threshold": config.saturation_fraction,
                },
            )
        )
    return out
