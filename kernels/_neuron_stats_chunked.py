"""The torch fallback of the CPU path, used when the C kernel cannot be built (no gcc).

Row-chunked eager torch: ``x`` is read as strided ``(O, C, I)`` and walked in chunks of
about 1 MiB (so the several passes each statistic takes over a chunk hit the cache, and
``x`` itself is read from memory once), with in-place ops into buffers allocated once.
Each chunk is shifted by the per-channel pivot, so plain float32 sums of ``d`` and ``d*d``
stay accurate at ``x + 1e4``; the chunk sums are added in float64. Chunks whose sums come
out non-finite (a NaN/Inf inside) are redone with masks, so clean data pays nothing for the
non-finite handling. Several times slower than the C kernel, many times faster than the
reference.

:func:`repair_overflow` is shared with the C kernel: float32 lanes overflow on data near the
top of float32's range, and the channels where they did are recomputed in float64.
"""

from __future__ import annotations

import torch

from ._layout import as_3d, pivot_of

_CHUNK_BYTES = 1 << 20


def raw_sums_chunked(
    x: torch.Tensor, cd: int, sat_threshold: float | None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Same contract as ``_neuron_stats_cpu.raw_sums``: ``(pivot, sums (7, C), per channel)``."""
    v = as_3d(x, cd)
    n_o, c, n_i = v.outer, v.channels, v.inner
    view = torch.as_strided(v.base, (n_o, c, n_i), (v.outer_stride, v.channel_stride,
                                                    v.inner_stride))
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    pivot = pivot_of(view, torch.float64).to(acc)  # a float32 sum of 64 x 3e38 overflows
    dims: tuple[int, ...] = (0, 2)
    if n_i == 1:  # rows: 2-D reductions over dim 0 take torch's fast path
        view, dims = view[:, :, 0], (0,)
    piv = pivot.view(1, c, 1) if n_i > 1 else pivot.view(1, c)
    thr = float("inf") if sat_threshold is None else float(sat_threshold)
    f64 = torch.float64
    out = torch.zeros(7, c, dtype=f64)
    out[3] = 0.0
    step = max(1, _CHUNK_BYTES // max(1, c * n_i * torch.finfo(acc).bits // 8))
    shape = (min(step, n_o), c, n_i) if n_i > 1 else (min(step, n_o), c)
    buf_d = torch.empty(shape, dtype=acc)
    buf_a = torch.empty_like(buf_d)
    buf_b = torch.empty(shape, dtype=torch.bool)
    buf_x = torch.empty_like(buf_d) if x.dtype != acc else None
    for o0 in range(0, n_o, step):
        xc = view[o0 : o0 + step]
        k = xc.shape[0]
        d, a, b = buf_d[:k], buf_a[:k], buf_b[:k]
        if buf_x is not None:  # fp16/bf16: convert the chunk to float32 once
            xc = buf_x[:k].copy_(xc)
        torch.sub(xc, piv, out=d)
        s1 = d.sum(dims).to(f64)
        if not bool(torch.isfinite(s1).all()):
            _masked_chunk(xc, piv, thr, out, dims)
            continue
        out[0] += s1
        d.mul_(d)
        out[1] += d.sum(dims).to(f64)
        torch.abs(xc, out=a)
        out[2] += a.sum(dims).to(f64)
        torch.maximum(out[3], a.amax(dims).to(f64), out=out[3])
        torch.le(xc, 0, out=b)
        out[4] += b.sum(dims)
        if sat_threshold is not None:
            torch.ge(a, thr, out=b)
            out[5] += b.sum(dims)
    return pivot, repair_overflow(view.unsqueeze(2) if n_i == 1 else view, pivot, out, thr), \
        n_o * n_i


def repair_overflow(view: torch.Tensor, pivot: torch.Tensor, out: torch.Tensor,
                    thr: float) -> torch.Tensor:
    """Recompute, in float64, the channels of ``out`` (the ``(7, C)`` float64 sums of
    ``view``, a strided ``(O, C, I)`` view) whose sum of ``d``, ``d*d`` or ``|x|`` is not
    finite. Non-finite inputs are masked before those sums, so a non-finite total means a
    float32 accumulator overflowed (an overflow never comes back to a finite number). For
    float32, bfloat16 and float16 inputs the float64 sums cannot overflow (``|d| <= 6.9e38``,
    ``d*d <= 4.7e77``), so the result is exact for every finite input. Edits ``out`` in place
    and returns it; clean data costs one ``isfinite`` over ``3*C`` values.
    """
    bad = (~torch.isfinite(out[:3])).any(0).nonzero().flatten()
    if bad.numel() == 0:
        return out
    f64 = torch.float64
    xs = view.index_select(1, bad).to(f64)
    fin = torch.isfinite(xs)
    zero = torch.zeros((), dtype=f64)
    d = torch.where(fin, xs - pivot.index_select(0, bad).to(f64).view(1, -1, 1), zero)
    a = torch.where(fin, xs.abs(), zero)
    dims = (0, 2)
    fixed = torch.stack([
        d.sum(dims), (d * d).sum(dims), a.sum(dims),
        a.amax(dims) if a.numel() else torch.zeros(bad.numel(), dtype=f64),
        (fin & (xs <= 0)).sum(dims).to(f64), (fin & (a >= thr)).sum(dims).to(f64),
        (~fin).sum(dims).to(f64),
    ])
    out[:, bad] = fixed
    return out


def _masked_chunk(
    xc: torch.Tensor, piv: torch.Tensor, thr: float, out: torch.Tensor, dims: tuple[int, ...]
) -> None:
    f64 = torch.float64
    fin = torch.isfinite(xc)
    zero = torch.zeros((), dtype=xc.dtype)
    d = torch.where(fin, xc - piv, zero)
    a = torch.where(fin, xc.abs(), zero)
    out[0] += d.sum(dims, dtype=f64)
    out[1] += (d * d).sum(dims, dtype=f64)
    out[2] += a.sum(dims).to(f64)
    torch.maximum(out[3], a.amax(dims).to(f64), out=out[3])
    out[4] += (fin & (xc <= 0)).sum(dims)
    out[5] += (fin & (a >= thr)).sum(dims)
    out[6] += (~fin).sum(dims)
