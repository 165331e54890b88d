"""The one activation table: every activation graphsurg recognises, in both IRs.

An activation has a canonical name (``"relu"``, ``"gelu"``, ``"sigmoid"``...), a *family*
that decides which detectors judge it, and its output range (for the saturation check):

* ``"relu"``: units can die (never fire): DeadNeurons judges them (ReLU, GELU, SiLU, ...).
* ``"saturating"``: units saturate in a flat region: Saturation judges them (tanh, sigmoid).
* ``"smooth"``: neither (softsign...).

The torch adapter maps aten ops, ``torch.nn.functional`` functions and ``nn`` modules to
canonical names; the ONNX adapter maps op types. Both read this module and no other table,
so both IRs classify a site the same way.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Activation:
    """One activation function.

    Attributes:
        name: canonical name.
        family: ``"relu"``, ``"saturating"`` or ``"smooth"``.
        low / high: the output's bounds (None: unbounded). Saturation is measured as
            ``|y - centre| >= half_range - margin`` with ``centre = (low + high) / 2``.
    """

    name: str
    family: str
    low: float | None = None
    high: float | None = None

    @property
    def bounded(self) -> bool:
        return self.low is not None and self.high is not None

    def saturation(self, margin: float) -> tuple[float, float] | None:
        """``(centre, threshold)``: a value saturates when ``|y - centre| >= threshold``;
        None for activations without two bounds (nothing to saturate against)."""
        if self.low is None or self.high is None:
            return None
        centre = (self.low + self.high) / 2.0
        half = (self.high - self.low) / 2.0
        return centre, half - margin  # config: |tanh| >= 1 - margin, sigmoid >= 1 - margin


ACTIVATIONS: dict[str, Activation] = {
    a.name: a
    for a in (
        Activation("relu", "relu", 0.0, None),
        Activation("relu6", "relu", 0.0, 6.0),
        Activation("leaky_relu", "relu"),
        Activation("prelu", "relu"),
        Activation("thresholded_relu", "relu"),
        Activation("gelu", "relu"),
        Activation("silu", "relu"),
        Activation("elu", "relu"),
        Activation("selu", "relu"),
        Activation("celu", "relu"),
        Activation("softplus", "relu"),
        Activation("mish", "relu"),
        Activation("hardswish", "relu"),
        Activation("quick_gelu", "relu"),
        Activation("tanh", "saturating", -1.0, 1.0),
        Activation("sigmoid", "saturating", 0.0, 1.0),
        Activation("hardtanh", "saturating", -1.0, 1.0),
        Activation("hardsigmoid", "saturating", 0.0, 1.0),
        Activation("softsign", "smooth", -1.0, 1.0),
    )
}

#: ONNX op type (default domain) -> canonical name. ``Clip`` is read from its bounds by the
#: ONNX adapter (Clip(0, 6) is relu6, Clip(0, inf) is relu, anything else is hardtanh-like).
ONNX_OPS: dict[str, str] = {
    "Relu": "relu", "LeakyRelu": "leaky_relu", "PRelu": "prelu",
    "ThresholdedRelu": "thresholded_relu", "Elu": "elu", "Selu": "selu", "Celu": "celu",
    "Gelu": "gelu", "Softplus": "softplus", "Mish": "mish", "HardSwish": "hardswish",
    "Tanh": "tanh", "Sigmoid": "sigmoid", "HardSigmoid": "hardsigmoid", "Softsign": "softsign",
    "Clip": "hardtanh",
}  # fmt: skip

#: method/module class-name fragments for activations written as custom modules (Hugging Face
#: ``NewGELUActivation``, ``SiLUActivation``...), checked in this order.
CLASS_NAME_HINTS: tuple[tuple[str, str], ...] = (
    ("quickgelu", "quick_gelu"), ("gelu", "gelu"), ("silu", "silu"), ("swish", "silu"),
    ("relu6", "relu6"), ("relu", "relu"), ("tanh", "tanh"), ("sigmoid", "sigmoid"),
)


def family(name: str) -> str:
    """The family of a canonical activation name (``"smooth"`` for unknown names)."""
    a = ACTIVATIONS.get(name)
    return a.family if a is not None else "smooth"


def bounded(name: str, low: float | None, high: float | None) -> Activation:
    """The activation of a clamp with explicit bounds (hardtanh(0, 6), Clip(0, 6), ...):
    ``relu6``/``relu`` when the low bound is 0, else a saturating hardtanh with those bounds."""
    if low == 0.0 and high == 6.0:
        return ACTIVATIONS["relu6"]
    if low == 0.0 and (high is None or high == float("inf")):
        return ACTIVATIONS["relu"]
    if low == 0.0:
        return Activation("relu6" if high == 6.0 else "clamp", "relu", 0.0, high)
    return Activation(name, "saturating", low, high)


__all__ = ["ACTIVATIONS", "Activation", "CLASS_NAME_HINTS", "ONNX_OPS", "bounded", "family"]
