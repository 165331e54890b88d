"""Gradient norms: the sum of squares of a list of tensors, and per-row squared norms.

(Initial reference-correct torch implementation; the multi-tensor Triton kernel is part of the
kernels issue.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def grad_sq_norms(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum of squares of every tensor in ``tensors``, one float32/float64 value per tensor.

    Returns a 1-d tensor of length ``len(tensors)`` on the tensors' device.
    """
    ts = list(tensors)
    if not ts:
        raise ValueError("grad_sq_norms needs at least one tensor")
    out = []
    for t in ts:
        if not t.is_floating_point():
            raise ValueError(f"grad_sq_norms needs floating-point tensors, got {t.dtype}")
        dt = torch.float64 if t.dtype == torch.float64 else torch.float32
        out.append(t.detach().to(dt).pow(2).sum())
    dt = torch.float64 if any(o.dtype == torch.float64 for o in out) else torch.float32
    return torch.stack([o.to(dt) for o in out])


def row_sq_norms(g: torch.Tensor) -> torch.Tensor:
    """Per-output-neuron squared norms of a weight (gradient): rows of a Linear weight
    ``(out, in)``, output channels of a conv weight ``(out, in, *k)``.
    """
    if g.dim() < 1:
        raise ValueError("row_sq_norms needs a tensor with at least one dimension")
    if not g.is_floating_point():
        raise ValueError(f"row_sq_norms needs a floating-point tensor, got {g.dtype}")
    dt = torch.float64 if g.dtype == torch.float64 else torch.float32
    return g.detach().reshape(g.shape[0], -1).to(dt).pow(2).sum(1)
