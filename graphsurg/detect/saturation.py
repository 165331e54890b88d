"""Saturation: tanh/sigmoid/hardtanh units that sit in the flat region for >= 99% of inputs.

Design is not disease (the adapters read a site's role off the graph,
:attr:`graphsurg._measurements.SiteMeasure.role`):

* an **output head** (role ``"output"``: the activation reaches a graph output through no
  parametrised layer, e.g. a pitch-bin or detection-score sigmoid) is not judged: confident
  probabilities are what its training (binary cross-entropy) asks for;
* a **gate** (role ``"gate"``: a sigmoid-family activation used only as a factor of products
  with another branch, e.g. squeeze-excite) saturated at its *upper* bound is always open and
  passes its channel through unchanged: not reported. A gate saturated at its *lower* bound
  silences its channel and is reported.

Each site left out (wholly or in part) is named in a diagnosis note (:func:`design_notes`).
"""

from __future__ import annotations

import torch

from graphsurg._activations import ACTIVATIONS
from graphsurg._config import DiagnoseConfig
from graphsurg._problems import Problem, Site

from . import Measurements, SiteMeasure


def _saturated(s: SiteMeasure, config: DiagnoseConfig) -> torch.Tensor:
    """Boolean per unit: saturated on >= ``config.saturation_fraction`` of its values."""
    assert s.saturated_fraction is not None
    return (s.saturated_fraction >= config.saturation_fraction) & (s.stats.count > 0)


def _open(s: SiteMeasure, config: DiagnoseConfig) -> torch.Tensor | None:
    """Boolean per unit: the unit sits at its activation's upper bound: its mean is at least
    ``high - (high - low) * (1 - saturation_fraction) - margin``, the least mean of a unit
    within ``margin`` of ``high`` on a ``saturation_fraction`` of its values (a gate that is
    open on 60% of the inputs and shut on the rest is no gate stuck open). None when the
    activation's bounds are not known."""
    act = ACTIVATIONS.get(s.op)
    if act is None or act.low is None or act.high is None:
        return None
    span = act.high - act.low
    least = act.high - span * (1.0 - config.saturation_fraction) - config.saturation_margin
    return s.stats.mean.double() >= least


def _by_design(s: SiteMeasure, sat: torch.Tensor,
               config: DiagnoseConfig) -> tuple[torch.Tensor, str]:
    """The saturated units that are design, not disease, and why ("" when none)."""
    none = torch.zeros_like(sat)
    if s.role == "output":
        return sat, ("an output head (reaches a graph output through no layer): confident "
                     "outputs are what training asks of it")
    if s.role == "gate":
        up = _open(s, config)
        if up is None:
            return none, ""
        return sat & up, "a gate stuck open (at its upper bound) passes its channel unchanged"
    return none, ""


def detect_saturation(m: Measurements, config: DiagnoseConfig) -> list[Problem]:
    out: list[Problem] = []
    for s in m.sites:
        if s.family != "saturating" or s.saturated_fraction is None:
            continue
        sat = _saturated(s, config)
        design, _ = _by_design(s, sat, config)
        units_l = torch.nonzero(sat & ~design).flatten().tolist()
        if not units_l:
            continue
        frac = s.saturated_fraction
        width = s.stats.channels
        evidence: dict[str, object] = {
            "width": width,
            "fraction": len(units_l) / width,
            "saturated_fraction": [float(frac[u]) for u in units_l],
            "activation": s.op,
            "margin": config.saturation_margin,
            "threshold": config.saturation_fraction,
        }
        if s.role:
            evidence["role"] = s.role
            evidence["excused"] = int(design.sum())  # saturated open gates left out
        out.append(
            Problem(
                kind="Saturation",
                site=Site(s.module, s.node, s.op, ir=m.ir),
                severity=len(units_l) / width,
                units=tuple(int(u) for u in units_l),
                evidence=evidence,
            )
        )
    return out


def design_notes(m: Measurements, config: DiagnoseConfig) -> list[str]:
    """One note per saturating site whose saturated units were left out as design."""
    notes: list[str] = []
    for s in m.sites:
        if s.family != "saturating" or s.saturated_fraction is None or not s.role:
            continue
        sat = _saturated(s, config)
        design, why = _by_design(s, sat, config)
        n = int(design.sum())
        if n == 0:
            continue
        notes.append(f"site {Site(s.module, s.node, s.op, ir=m.ir).address}: saturation not "
                     f"reported on {n}/{s.stats.channels} saturated unit(s): {why}")
    return notes
