"""The torch fallback of the CPU path, used when the C kernel cannot be built (no gcc).

Row-chunked eager torch: ``x`` is read as strided ``(O, C, I)`` and walked in chunks of
about 1 MiB (so the several passes each statistic takes over a chunk hit the cache, and
``x`` itself is read from memory once), with in-place ops into buffers allocated once.
Each chunk is shifted by the per-channel pivot, so plain float32 sums of ``d`` and ``d*d``
stay accurate at ``x + 1e4``; the chunk sums are added in float64. Chunks whose sums come
out non-finite (a NaN/Inf inside) are redone with masks, so clean data pays nothing for the
non-finite handling. Several times slower than the C kernel, many times faster than the
reference.
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
    pivot = pivot_of(view, acc)
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
    return pivot, out, n_o * n_i


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
