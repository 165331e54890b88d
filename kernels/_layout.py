"""How an activation is laid out in memory, as the kernels see it.

Every kernel reads ``x`` as a strided 3-D view ``(O, C, I)``: ``C`` channels, reduced over
``O`` (dimensions before the channel dimension, after moving it) and ``I`` (dimensions after
it). Two views cover the common layouts without a copy:

* ``(N, C)``, ``(N, T, C)``, channels-last ``(N, C, H, W)``: the channel dimension is moved
  last and the rest flattened into rows, ``(R, C, 1)`` with any row and channel stride;
* contiguous ``(N, C, H, W)`` with ``channel_dim=1``: ``(N, C, H*W)``.

Anything else (e.g. a permuted view whose non-channel dimensions do not flatten) is copied
once to a contiguous tensor.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class View3d(NamedTuple):
    """``x`` read as ``(outer, channels, inner)`` with element strides; ``base`` owns the data
    (``x`` itself, or a contiguous copy when no view exists)."""

    base: torch.Tensor
    outer: int
    channels: int
    inner: int
    outer_stride: int
    channel_stride: int
    inner_stride: int
    copied: bool


def _try_view(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor | None:
    try:
        return t.view(shape)
    except RuntimeError:
        return None


def as_3d(x: torch.Tensor, cd: int) -> View3d:
    """Read ``x`` (channel dimension ``cd``, already normalised) as ``(O, C, I)`` strides.

    Returns a view of ``x`` whenever one exists; otherwise a contiguous copy (``copied``).
    ``x`` is never modified.
    """
    c = x.shape[cd]
    rows = x.movedim(cd, -1)
    v = _try_view(rows, (-1, c))
    if v is not None:
        return View3d(x, v.shape[0], c, 1, v.stride(0), v.stride(1), 1, False)
    outer = 1
    for s in x.shape[:cd]:
        outer *= s
    inner = x.numel() // (outer * c)
    v3 = _try_view(x, (outer, c, inner))
    if v3 is not None:
        return View3d(x, outer, c, inner, v3.stride(0), v3.stride(1), v3.stride(2), False)
    y = rows.contiguous()
    return View3d(y, y.numel() // c, c, 1, c, 1, 1, True)


PIVOT_POSITIONS = 64


def pivot_of(v: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """Per-channel shift for the kernels' sums: the mean of the finite values among the first
    (up to) 64 reduced positions of ``v``, a strided ``(O, C, I)`` view; 0 where none is
    finite. Returns a contiguous ``(C,)`` tensor of dtype ``acc`` on ``v``'s device.

    Shifting by a value near the channel's mean keeps sums of ``x - pivot`` and its square
    small even for ``x + 1e4``; any pivot is correct, a close one is accurate.
    """
    o = max(1, min(v.shape[0], -(-PIVOT_POSITIONS // max(1, v.shape[2]))))
    head = v[:o, :, :PIVOT_POSITIONS].to(acc)
    fin = torch.isfinite(head)
    cnt = fin.sum((0, 2))
    s = torch.where(fin, head, torch.zeros((), dtype=acc, device=v.device)).sum((0, 2))
    return (s / cnt.clamp_min(1).to(acc)).contiguous()
