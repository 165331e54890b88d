"""Detectors: one module per problem kind, each a pure function of the measurements.

``Measurements`` is what instrumentation produced; ``detect_all`` runs every detector and
returns the problems in forward order. Thresholds come from :class:`DiagnoseConfig`.
"""

from __future__ import annotations

from graphsurg._config import DiagnoseConfig
from graphsurg._measurements import LayerMeasure as LayerMeasure
from graphsurg._measurements import Measurements as Measurements
from graphsurg._measurements import SiteMeasure as SiteMeasure
from graphsurg._problems import Problem


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


def detect_notes(m: Measurements, config: DiagnoseConfig) -> list[str]:
    """What the detectors could not judge or left out and why (for the diagnosis notes):
    sites with too few observations per unit for dormancy; saturated units read as design
    (an output head, a gate stuck open)."""
    from .dead import too_few_samples
    from .saturation import design_notes

    return too_few_samples(m, config) + design_notes(m, config)
