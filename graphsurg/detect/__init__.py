"""Detectors: one module per problem kind, each a pure function of the measurements.

``Measurements`` is what instrumentation produced; ``detect_all`` runs every detector and
returns the problems in forward order. Thresholds come from :class:`DiagnoseConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from graphsurg._config import DiagnoseConfig
from graphsurg._diagnosis import Problem
from graphsurg.kernels import NeuronStats


@dataclass
class SiteMeasure:
    """One observed site: its statistics and a bounded row sample."""

    module: str  # producer layer (or owning module)
    node: str
    op: str
    family: str  # "relu" | "saturating" | "smooth" | "linear"
    order: int
    stats: NeuronStats
    saturated_fraction: torch.Tensor | None = None
    sample: torch.Tensor | None = None


@dataclass
class LayerMeasure:
    """One parametrised layer: shape, weight, gradient norm."""

    module: str
    kind: str
    order: int
    d_in: int
    d_out: int
    weight: torch.Tensor | None = None
    grad_sq: float | None = None  # mean over batches of the layer's squared gradient norm
    grad_nonfinite: bool = False
    next_modules: list[str] = field(default_factory=list)


@dataclass
class Measurements:
    sites: list[SiteMeasure]
    layers: list[LayerMeasure]
    gradients: bool
    input_nonfinite: int = 0
    losses: dict[str, float] = field(default_factory=dict)  # "train"/"val" with val_data=


def detect_all(m: Measurements, config: DiagnoseConfig) -> list[Problem]:
    from .bottleneck import detect_bottlenecks
    from .dead import detect_dead
    from .gradients import detect_gradients
    from .nonfinite import detect_nonfinite
    from .overfitting import detect_overfitting
    from .saturation import detect_saturation

    problems: list[Problem] = []
    problems += detect_nonfinite(m, config)
    problems += detect_dead(m, config)
    problems += detect_saturation(m, config)
    problems += detect_gradients(m, config)
    problems += detect_bottlenecks(m, config)
    problems += detect_overfitting(m, config)
    order = {lm.module: lm.order for lm in m.layers}
    kinds = ["NonFinite", "DeadNeurons", "Saturation", "VanishingGradient", "ExplodingGradient",
             "Bottleneck", "Overfitting", "LostPlasticity", "MixingCollapse"]
    problems.sort(key=lambda p: (order.get(p.site.module, -1), kinds.index(p.kind)))
    return problems
