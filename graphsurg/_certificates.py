"""Certificates: the soft bounds an operation must keep to be kept."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Certificates:
    """Bounds every surgery schema is verified against; a schema that breaks one is rolled back.

    Attributes:
        max_loss_increase: the operated (and healed) model's loss may exceed the equally
            fine-tuned untreated model's loss by at most this much (absolute).
        max_output_change: bound on the relative output change ``||f' - f|| / ||f||`` at the
            moment of surgery for operations that are not exact.
        exact_tolerance: the bound for operations that claim to be exact (float32 round-off).
        require_gradient_flow: every layer's gradient norm > 0 and every new parameter gets a
            non-zero gradient after surgery.
        require_no_dead_units: no dead units at treated sites on held-out batches.
        require_exact: only function-preserving operations are planned.
    """

    max_loss_increase: float = 0.0
    max_output_change: float = 0.5
    exact_tolerance: float = 1e-5
    require_gradient_flow: bool = True
    require_no_dead_units: bool = True
    require_exact: bool = False

    def __post_init__(self) -> None:
        for name in ("max_loss_increase", "max_output_change", "exact_tolerance"):
            v = getattr(self, name)
            if not isinstance(v, int | float) or v != v or v < 0:
                raise ValueError(f"Certificates.{name} must be a number >= 0, got {v!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Certificates:
        return cls(**d)
