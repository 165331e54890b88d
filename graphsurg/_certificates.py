"""Certificates: the soft bounds an operation must keep to be kept."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Certificates:
    """Bounds every surgery schema is verified against; a schema that breaks one is rolled back.

    Each certificate compares two models on the *held-out* batches:

    * the **global certificate** (``require_strict_subset``): the whole diagnosis of the
      result f' against the input f's -- issues(f') must be a strict subset of issues(f):
      no new problem, at least one gone. A schema whose new problems the follow-up rounds
      (up to ``max_rounds``) cannot treat is rolled back, alone;
    * **loss against the input** (``require_loss_not_above_input``): L(f') <= L(f), the
      theorem's inequality (within ``exact_tolerance`` relative, for float round-off);
    * **loss against the untreated copy**: L(f') <= L(f_u) + max(``max_loss_increase``,
      ``max_relative_loss_increase`` * |L(f_u)|), where f_u is the untreated model fine-tuned
      exactly as f' was healed (same steps, batches, seed) -- surgery must not lose to plain
      fine-tuning by more than that;
    * the per-schema bounds below (output change, gradient flow, treated units).

    Attributes:
        max_loss_increase: absolute allowance of the operated (and healed) model's loss over
            the equally fine-tuned untreated model's loss.
        max_relative_loss_increase: relative allowance over the same (0.05: 5% of its loss);
            the larger of the two allowances applies.
        require_loss_not_above_input: the operated model's held-out loss is not above the
            input model's (where there is a loss).
        require_strict_subset: the global certificate (needs the result re-diagnosed).
        max_rounds: follow-up rounds of closed-loop surgery that may treat the problems a
            kept schema created (0: roll such a schema back at once).
        max_output_change: bound on the relative output change ``||f' - f|| / ||f||`` at the
            moment of surgery for operations that are not exact.
        exact_tolerance: the bound for operations that claim to be exact (float32 round-off).
        require_gradient_flow: every layer's gradient norm > 0 and every new parameter gets a
            non-zero gradient after surgery.
        require_no_dead_units: no dead units at treated sites on held-out batches.
        require_exact: only function-preserving operations are planned.
    """

    max_loss_increase: float = 0.0
    max_relative_loss_increase: float = 0.05
    require_loss_not_above_input: bool = True
    require_strict_subset: bool = True
    max_rounds: int = 2
    max_output_change: float = 0.5
    exact_tolerance: float = 1e-5
    require_gradient_flow: bool = True
    require_no_dead_units: bool = True
    require_exact: bool = False

    def __post_init__(self) -> None:
        for name in ("max_loss_increase", "max_relative_loss_increase", "max_output_change",
                     "exact_tolerance"):
            v = getattr(self, name)
            if not isinstance(v, int | float) or v != v or v < 0:
                raise ValueError(f"Certificates.{name} must be a number >= 0, got {v!r}")
        if not isinstance(self.max_rounds, int) or self.max_rounds < 0:
            raise ValueError(f"Certificates.max_rounds must be an integer >= 0, got "
                             f"{self.max_rounds!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Certificates:
        return cls(**d)
