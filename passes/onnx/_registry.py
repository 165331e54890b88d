"""The pass registry: snake_case names to pass classes, in the order ``apply`` runs them."""

from __future__ import annotations

from ._pass import GraphsurgPass
from .cleanup import Cleanup
from .excise_dead_units import ExciseDeadUnits
from .low_rank import FactorLowRank
from .relu_to_leaky_relu import ReluToLeakyReluPass

PASSES: dict[str, type[GraphsurgPass]] = {
    cls.name: cls for cls in (ExciseDeadUnits, FactorLowRank, ReluToLeakyReluPass, Cleanup)
}


def get_available_passes() -> list[str]:
    """The names of graphsurg's ONNX passes, in the order ``apply`` runs them.

    Example:
        >>> get_available_passes()
        ['excise_dead_units', 'factor_low_rank', 'relu_to_leaky_relu', 'cleanup']
    """
    return list(PASSES)


def describe_passes() -> dict[str, str]:
    """Each pass name with the first line of its module's documentation."""
    import sys

    out = {}
    for name, cls in PASSES.items():
        doc = (sys.modules[cls.__module__].__doc__ or "").strip().splitlines()
        line = doc[0] if doc else ""
        out[name] = line.split(":", 1)[1].strip() if line.startswith("``") and ":" in line else line
    return out
