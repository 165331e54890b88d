"""Faults planted into a corpus model (in place, on the builder's fresh copy), each returning
the planted truth: the problem kind, the module path of its site and its units.

- ``dead``: 8 output units of the FFN up-projection / conv channel producer never fire: zero
  weight rows and a bias of ``DEAD_BIAS`` (for a conv followed by BatchNorm, the norm's scale
  is zeroed and its shift set to ``DEAD_BIAS``). ``DEAD_BIAS`` puts ReLU, ReLU6, GELU (erf
  and tanh forms), QuickGELU and SiLU in their zero region (|f(-50)| < 1e-20); without a
  bias the pre-activation is exactly 0 and every one of them outputs exactly 0; a PReLU
  (learned negative slope, no zero region) gets a bias of 0 for the same reason.
- ``collapsed``: the producer's weight replaced by its best rank-1 approximation rescaled to
  the same Frobenius norm (a collapsed, rank-deficient weight: ``Bottleneck``).
- ``saturated``: the producer of a tanh/sigmoid site scaled by ``SATURATING_GAIN`` so most
  units sit in the flat tails (``Saturation``); not applicable without such a site.
- ``vanishing``: in a plain stack ``l0 .. lm`` (``Meta.plain``: no norm layer, no parallel
  path between its layers), the weights of the interior layers ``l1 .. l(m-1)`` are scaled by
  ``VANISHING_SCALE`` (biases kept: the forward stays finite and input-dependent). Each
  scaled layer multiplies the gradient flowing back through it by ~``VANISHING_SCALE``, so
  the layers below the last scaled one (``l0 .. l(m-2)``) get gradients orders of magnitude
  below the rest: that span is the planted truth (``VanishingGradient`` at ``l0``). Not
  applicable where no plain stack of 3+ layers exists: a weight-scaled span behind a norm
  layer is renormalised (its gradient scaled back up), one in a residual branch is bypassed
  -- the reason is ``Meta.no_plain`` or the family's (``NO_PLAIN``).
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
#: weight scale of each interior layer of a plain stack: two scaled layers put the first
#: layer's gradient ~1e-8 and the second's ~1e-4 below the median (the detector's threshold
#: is 1e-3); the forward stays finite (biases carry it)
VANISHING_SCALE = 1e-4

_RESIDUAL = ("no plain stack of 3+ layers: every block is a residual branch behind a "
             "LayerNorm/RMSNorm (a weight-scaled span is renormalised forward and backward, "
             "and bypassed); outside the blocks at most the embeddings and a 1-2 layer head")
#: the vanishing check's n/a reason by family, where the builder gives none
NO_PLAIN: dict[str, str] = {
    "text-encoder": _RESIDUAL,
    "decoder": _RESIDUAL,
    "encoder-decoder": _RESIDUAL,
    "speech": _RESIDUAL,
    "vision-transformer": _RESIDUAL,
    "multimodal": _RESIDUAL,
    "vision-cnn": "no plain stack without a norm: every conv is followed by BatchNorm, whose "
                  "statistics (calibrated as training would) renormalise a weight-scaled span "
                  "and scale its gradient back up (up to their epsilon; tests/diagnose/"
                  "test_vanishing_real.py); the rest are residual blocks",
}


@dataclass(frozen=True)
class Planted:
    """The planted truth: a problem of ``kind`` at ``module`` (the producer layer) on
    ``units`` (empty for whole-layer problems)."""

    kind: str
    module: str
    units: tuple[int, ...] = ()
    #: for a span problem (``VanishingGradient``): the layers whose gradient the fault makes
    #: vanish, in forward order; a reported span must lie within it
    span: tuple[str, ...] = ()


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
        # a learned-slope PReLU has no zero region: only a pre-activation of exactly 0 is
        # dead under it (DEAD_BIAS would make a large constant, not a dead unit)
        bias[idx] = 0.0 if meta.activation == "prelu" else DEAD_BIAS
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
        return Inapplicable("no tanh/sigmoid site inside the network")
    layer = built.model.get_submodule(built.meta.saturating)
    layer.weight.mul_(SATURATING_GAIN)
    if getattr(layer, "bias", None) is not None:
        layer.bias.mul_(SATURATING_GAIN)
        # push each unit further the way its bias points; a zero bias (EfficientNet's SE
        # expand layer is zero-initialised) alternates by unit, so half the units saturate
        # at the lower bound: a sigmoid gate stuck open everywhere is design, not disease
        sign = torch.sign(layer.bias)
        alt = 1.0 - 2.0 * (torch.arange(sign.numel(), device=sign.device) % 2).to(sign.dtype)
        sign = torch.where(sign == 0, alt, sign)
        layer.bias.add_(sign * SATURATING_SHIFT)
    return Planted("Saturation", built.meta.saturating)


@torch.no_grad()
def plant_vanishing(built: Built) -> Planted | Inapplicable:
    plain = built.meta.plain
    if len(plain) < 3:
        return Inapplicable(built.meta.no_plain or NO_PLAIN.get(
            built.meta.family, "no plain stack of 3+ layers"))
    for name in plain[1:-1]:
        built.model.get_submodule(name).weight.mul_(VANISHING_SCALE)
    return Planted("VanishingGradient", plain[0], span=plain[:-2])


PLANTERS = {
    "dead": plant_dead,
    "collapsed": plant_collapsed,
    "saturated": plant_saturated,
    "vanishing": plant_vanishing,
}
