"""The one activation table: every activation graphsurg recognises, in both IRs.

An activation has a canonical name (``"relu"``, ``"gelu"``, ``"sigmoid"``...), a *family*
that decides which detectors judge it, and its output range (for the saturation check):

* ``"relu"``: units can die (never fire): DeadNeurons judges them (ReLU, GELU, SiLU, ...).
* ``"saturating"``: units saturate in a flat region: Saturation judges them (tanh, sigmoid).
* ``"smooth"``: neither (softsign...).

The torch adapter maps aten ops, ``torch.nn.functional`` functions and ``nn`` modules to
canonical names; the ONNX adapter maps op types. Both read this module and no other table,
so both IRs classify a site the same way.

**Patterns.** An exporter decomposes many activations into pieces (tanh-form GELU as
mul/pow/add/tanh, erf-form GELU as Div/Erf/Add/Mul, QuickGELU as ``x * sigmoid(1.702 x)``,
HardSwish as Clip/Div/Mul...). Each adapter finds the maximal *pointwise region* hanging off
one value ``x`` (ops whose other inputs are scalar constants) with :func:`pointwise_regions`,
evaluates the region's function on :data:`GRID` in its own IR, and :func:`identify` names it
against the numpy references of :data:`REFERENCES`: the region's output is then one site with
the canonical name, and its inner tanh/sigmoid/erf are no sites. One table, both IRs.

**Gated units** (SwiGLU/GeGLU: ``act(gate(x)) * up(x)``) are one site, the product, named by
:func:`gated` (``"swiglu"``, ``"geglu"``, ``"reglu"``), family ``"relu"``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np


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
        Activation("gelu_tanh", "relu"),
        Activation("swiglu", "relu"),
        Activation("geglu", "relu"),
        Activation("reglu", "relu"),
        Activation("gated", "relu"),
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


# -- patterns: numpy references of the activations a region may compute ---------------------

#: the 1-D grid a pointwise region is evaluated on (float64)
GRID: np.ndarray = np.linspace(-8.0, 8.0, 2001)
#: a region matches a reference when ``|f - ref| <= MATCH_ATOL + MATCH_RTOL * |ref|`` on all of
#: GRID. float32 constants (sqrt(2/pi) stored as 0.7978846) stay within 1e-6; the nearest two
#: references (erf- and tanh-form GELU) differ by 4.7e-4, so the tolerance tells them apart.
MATCH_ATOL = 1e-5
MATCH_RTOL = 1e-5

_erf = np.vectorize(math.erf, otypes=[np.float64])


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _relu6(x: np.ndarray) -> np.ndarray:
    return np.clip(x, 0.0, 6.0)


#: canonical name -> numpy reference (float64), for the parameter-free activations a pointwise
#: region is matched against (checked in this order; the first match names the region)
REFERENCES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "relu": lambda x: np.maximum(x, 0.0),
    "relu6": _relu6,
    "gelu": lambda x: 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0))),
    "gelu_tanh": lambda x: 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi)
                                                    * (x + 0.044715 * x**3))),
    "quick_gelu": lambda x: x * _sigmoid(1.702 * x),
    "silu": lambda x: x * _sigmoid(x),
    "hardswish": lambda x: x * _relu6(x + 3.0) / 6.0,
    "hardsigmoid": lambda x: _relu6(x + 3.0) / 6.0,
    "mish": lambda x: x * np.tanh(np.logaddexp(0.0, x)),
    "softplus": lambda x: np.logaddexp(0.0, x),
    "elu": lambda x: np.where(x > 0, x, np.expm1(np.minimum(x, 0.0))),
    "tanh": np.tanh,
    "sigmoid": _sigmoid,
    "softsign": lambda x: x / (1.0 + np.abs(x)),
}


def identify(y: np.ndarray) -> Activation | None:
    """The activation whose reference equals ``y`` (a function's values on :data:`GRID`),
    or None. Non-finite values never match."""
    y = np.asarray(y, dtype=np.float64)
    if y.shape != GRID.shape or not np.isfinite(y).all():
        return None
    for name, ref in REFERENCES.items():
        r = ref(GRID)
        if bool(np.all(np.abs(y - r) <= MATCH_ATOL + MATCH_RTOL * np.abs(r))):
            return ACTIVATIONS[name]
    return None


#: the activation inside a gate -> the gated unit's canonical name
_GATED = {"silu": "swiglu", "gelu": "geglu", "gelu_tanh": "geglu", "quick_gelu": "geglu",
          "relu": "reglu"}


def gated(inner: str) -> Activation:
    """The gated unit ``inner(gate) * up`` (``silu`` -> swiglu, ``gelu`` -> geglu, ``relu`` ->
    reglu, anything else -> ``gated``); family ``"relu"``: a unit whose gate never opens is
    dead in the product."""
    return ACTIVATIONS[_GATED.get(inner, "gated")]


K = TypeVar("K", bound=Hashable)  # a value of the graph (fx.Node / onnx_ir.Value)
N = TypeVar("N", bound=Hashable)  # an op of the graph


@dataclass
class Region(Generic[K, N]):
    """A pointwise region: ``ops`` (graph order) computing functions of the one value
    ``root`` and scalar constants. After :func:`match_regions`: ``site`` is the op whose
    output is the recognised activation, ``activation`` its table entry and ``inner`` the ops
    it absorbed (no sites of their own)."""

    root: K
    ops: list[N] = field(default_factory=list)
    site: N | None = None
    activation: Activation | None = None
    inner: set[N] = field(default_factory=set)


def pointwise_regions(order: Iterable[N], *, pointwise: Callable[[N], bool],
                      tensor_inputs: Callable[[N], Sequence[K]], output: Callable[[N], K]
                      ) -> list[Region[K, N]]:
    """Maximal pointwise regions of a graph: ``order`` is its ops in graph order,
    ``pointwise(op)`` says the op is elementwise with every non-tensor input a scalar
    constant, ``tensor_inputs(op)`` its tensor inputs (scalar constants left out) and
    ``output(op)`` its output value. An op joins the region of ``r`` when all its tensor
    inputs are ``r`` or outputs of ``r``'s region."""
    root_of: dict[K, K] = {}
    regions: dict[K, Region[K, N]] = {}
    for op in order:
        if not pointwise(op):
            continue
        roots = {root_of.get(v, v) for v in tensor_inputs(op)}
        if len(roots) != 1:
            continue
        r = roots.pop()
        root_of[output(op)] = r
        regions.setdefault(r, Region(r)).ops.append(op)
    return list(regions.values())


def match_regions(regions: Iterable[Region[K, N]], *,
                  evaluate: Callable[[Region[K, N]], dict[N, np.ndarray] | None],
                  tensor_inputs: Callable[[N], Sequence[K]], output: Callable[[N], K],
                  users: Callable[[K], Iterable[N]]) -> list[Region[K, N]]:
    """Name each region's activation: ``evaluate(region)`` gives every op's values on
    :data:`GRID` (the root fed with GRID; None when the region cannot be evaluated). The site
    is the latest op whose cone (its ancestors in the region) is closed -- no inner value is
    used outside it -- and whose values :func:`identify` names. Returns the matched regions
    (``site``, ``activation``, ``inner`` set), one per matched cone."""
    out: list[Region[K, N]] = []
    todo = list(regions)
    while todo:
        reg = todo.pop(0)
        values = evaluate(reg)
        if values is None:
            continue
        by_out = {output(op): op for op in reg.ops}
        taken: set[N] = set()
        for end in reversed(reg.ops):
            if end in taken or end not in values:
                continue
            cone = {end}
            stack = [end]
            while stack:
                for v in tensor_inputs(stack.pop()):
                    p = by_out.get(v)
                    if p is not None and p not in cone:
                        cone.add(p)
                        stack.append(p)
            if cone & taken:
                continue
            if not all(u in cone for c in cone if c is not end for u in users(output(c))):
                continue  # an inner value is used outside: not one function
            act = identify(values[end])
            if act is None:
                continue
            taken |= cone
            out.append(Region(reg.root, [op for op in reg.ops if op in cone], end, act,
                              cone - {end}))
        if taken:  # what is left (e.g. a function of the recognised output) is regrouped
            left = [op for op in reg.ops if op not in taken]
            todo.extend(r for r in pointwise_regions(
                left, pointwise=lambda op: True, tensor_inputs=tensor_inputs, output=output)
                if r.root not in by_out or by_out[r.root] in taken)
    return out


__all__ = ["ACTIVATIONS", "Activation", "CLASS_NAME_HINTS", "GRID", "ONNX_OPS", "REFERENCES",
           "Region", "bounded", "family", "gated", "identify", "match_regions",
           "pointwise_regions"]
