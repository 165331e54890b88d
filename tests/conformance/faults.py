"""Faults planted into a corpus model (in place, on the builder's fresh copy), each returning
the planted truth: the problem kind, the module path of its site and its units.

- ``dead``: 8 output units of the FFN up-projection / conv channel producer never fire: zero
  weight rows and a bias of ``DEAD_BIAS`` (for a conv followed by BatchNorm, the norm's scale
  is zeroed and its shift set to ``DEAD_BIAS``). ``DEAD_BIAS`` puts ReLU, ReLU6, GELU (erf
  and tanh forms), QuickGELU and SiLU in their zero region (|f(-50)| < 1e-20); without a
  bias the pre-activation is exactly 0 and every one of them outputs exactly 0.
- ``collapsed``: the producer's weight replaced by its best rank-1 approximation rescaled to
  the same Frobenius norm (a collapsed, rank-deficient weight: ``Bottleneck``).
- ``saturated``: the producer of a tanh/sigmoid site scaled by ``SATURATING_GAIN`` so most
  units sit in the flat tails (``Saturation``); not applicable without such a site.
- ``vanishing``: not planted yet: the transformers and CNNs of the corpus carry gradients
  through residual or normalised paths (no span can vanish without changing the
  architecture); the one plain stack (``same_pad_cnn``) is too shallow for a span.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .corpus import Built

N_DEAD = 8
DEAD_BIAS = -50.0
SATURATING_GAIN = 200.0
#: added to the saturating layer's bias (its sign) after the gain: a layer fed small inputs
#: (EfficientNet's squeeze-excite expand sees pooled features, |pre-activation| ~1e-3) is not
#: pushed into the flat region by the gain alone, and a fault that is not there tests nothing
SATURATING_SHIFT = 20.0


@dataclass(frozen=True)
class Planted:
    """The planted truth: a problem of ``kind`` at ``module`` (the producer layer) on
    ``units`` (empty for whole-layer problems)."""

    kind: str
    module: str
    units: tuple[int, ...] = ()


@dataclass(frozen=True)
class Inapplicable:
    """This fault cannot be planted in this architecture, and why."""

    reason: str


def width(layer: nn.Module) -> int:
    """Output units of a Linear, a Conv or Hugging Face's ``Conv1D`` (weight ``in x out``)."""
    w = layer.weight
    return int(w.shape[1]) if type(layer).__name__ == "Conv1D" else int(w.shape[0])


def spread_units(n_units: int, k: int = N_DEAD) -> tuple[int, ...]:
    """``k`` units spread over ``1 .. n_units - 2`` (interior: neither the first nor the last)."""
    if n_units < k + 2:
        raise ValueError(f"a layer of {n_units} units is too narrow to plant {k} dead units")
    return tuple(sorted({1 + round(i * (n_units - 3) / (k - 1)) for i in range(k)}))


def _weight_rows(layer: nn.Module) -> torch.Tensor:
    """The weight viewed as ``out x ...`` (Conv1D's is transposed)."""
    w = layer.weight
    return w.t() if type(layer).__name__ == "Conv1D" else w


@torch.no_grad()
def plant_dead(built: Built) -> Planted | Inapplicable:
    model, meta = built.model, built.meta
    layer = model.get_submodule(meta.site)
    units = spread_units(width(layer))
    idx = list(units)
    _weight_rows(layer)[idx] = 0.0
    bias = getattr(layer, "bias", None)
    if meta.norm:
        norm = model.get_submodule(meta.norm)
        norm.weight[idx] = 0.0
        norm.bias[idx] = DEAD_BIAS
    elif bias is not None:
        bias[idx] = DEAD_BIAS
    return Planted("DeadNeurons", meta.site, units)


@torch.no_grad()
def plant_collapsed(built: Built) -> Planted | Inapplicable:
    layer = built.model.get_submodule(built.meta.site)
    w = layer.weight
    flat = _weight_rows(layer).reshape(width(layer), -1).double()
    u, s, vh = torch.linalg.svd(flat, full_matrices=False)
    rank1 = s[0] * torch.outer(u[:, 0], vh[0])
    rank1 *= flat.norm() / rank1.norm()
    rows = rank1.to(w.dtype).reshape(_weight_rows(layer).shape)
    w.copy_(rows.t() if type(layer).__name__ == "Conv1D" else rows)
    return Planted("Bottleneck", built.meta.site)


@torch.no_grad()
def plant_saturated(built: Built) -> Planted | Inapplicable:
    if not built.meta.saturating:
        return Inapplicable("no tanh/sigmoid site")
    layer = built.model.get_submodule(built.meta.saturating)
    layer.weight.mul_(SATURATING_GAIN)
    if getattr(layer, "bias", None) is not None:
        layer.bias.mul_(SATURATING_GAIN)
        layer.bias.add_(torch.where(layer.bias < 0, -SATURATING_SHIFT, SATURATING_SHIFT))
    return Planted("Saturation", built.meta.saturating)


def plant_vanishing(built: Built) -> Planted | Inapplicable:
    return Inapplicable("not planted: residual/normalised paths or too shallow a plain stack")


PLANTERS = {
    "dead": plant_dead,
    "collapsed": plant_collapsed,
    "saturated": plant_saturated,
    "vanishing": plant_vanishing,
}
