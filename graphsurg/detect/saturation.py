"""Saturation: tanh/sigmoid/hardtanh units that sit in the flat region for >= 99% of inputs."""

from __future__ import annotations

import torch

from graphsurg._config import DiagnoseConfig
from graphsurg._problems import Problem, Site

from . import Measurements


def detect_saturation(m: Measurements, config: DiagnoseConfig) -> list[Problem]:
    out: list[Problem] = []
    for s in m.sites:
        if s.family != "saturating" or s.saturated_fraction is None:
            continue
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
