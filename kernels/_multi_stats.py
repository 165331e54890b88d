"""Statistics of many activations at once, and their exact merge, as whole-tensor operations.

What the compiled-graph monitor runs on a sampled call instead of one ``neuron_stats`` call,
one Chan merge and one gradient reduction per site:

* :func:`partial_sums` -- the raw per-channel sums of one activation (shifted by a pivot) as
  plain torch ops, so it can be written *into* a graph: inductor fuses it with the producer,
  and the sums of every site of a graph leave it as one ``(9, sum of widths)`` output;
* :func:`partial_sums_many` -- the same sums for a list of CPU tensors in one batched call of
  the C kernel (one thread-pool dispatch for every site, one reduction of the partial blocks);
* :func:`packed_from_sums` and :func:`merge_packed` -- statistics of all sites packed side by
  side in one ``(8, C_total)`` float64 tensor (rows :data:`PACKED_ROWS`), merged exactly
  (Chan et al.) with a handful of tensor ops whatever the number of sites;
  :func:`merge_packed_many` merges the statistics of K calls at once (the monitor keeps the
  sums of up to K sampled calls and merges them together, so a call pays one copy);
* :func:`packed_to_stats` -- one site's :class:`NeuronStats` from its columns (read time);
* :func:`all_reduce_packed` -- packed statistics merged across ranks with one all-gather;
* :func:`multi_grad_sq_norms` -- squared norms of many tensors, one multi-tensor reduction
  per dtype (the Triton multi-tensor kernel on CUDA, ``torch._foreach_norm`` on CPU).

Sums rows (:func:`partial_sums`): sum d, sum d*d, sum|x|, max|x|, #(x <= 0), #(|x| >= thr),
#non-finite, pivot, #finite, with ``d = x - pivot`` over finite values (the C kernel's seven
rows plus the pivot and the count). Counts are exact in float64 below 2**53.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from ._stats import NeuronStats, acc_dtype

#: rows of a packed statistics tensor (float64, one column per channel of every site)
PACKED_ROWS = ("count", "mean", "m2", "abs_sum", "n_nonpos", "absmax", "n_nonfinite", "n_sat")
SUM_ROWS = 9
_MAX_ROW = 3
_PART_ROWS = 256  # rows per C-kernel task at least (small inputs do not pay for threads)


def partial_sums(x: torch.Tensor, channel_dim: int, sat_threshold: float | None
                 ) -> torch.Tensor:
    """The ``(9, C)`` float64 sums of ``x`` (see the module docstring), in torch ops only.

    Traceable (make_fx / aot_autograd / inductor): the graph monitor inserts it into the
    observed graph after each site. The pivot is the first reduced position of each channel
    (0 where it is not finite); any pivot is exact, a close one keeps ``x + 1e4`` accurate.

    Written so that no node equals one a backward formula builds from the same activation
    (aot_autograd CSEs the joint graph: a statistic ``x <= 0`` on a ReLU output *is* ReLU
    backward's mask, and the partitioner then saves that bool mask for backward, whose store
    costs inductor's CPU code ~8 ns per value -- 0.5 ms on a 256x256 activation). The sign
    test reads ``where(finite, x, 1)`` instead, and counts are sums of the accumulation
    dtype (exact below 2**24 values per channel; int64 above that or with symbolic shapes).
    """
    return torch.stack(partial_sums_rows(x, channel_dim, sat_threshold))


def _sum_rows(d: torch.Tensor, a: torch.Tensor, dims: list[int], *counts: torch.Tensor,
              dtype: torch.dtype | None = torch.float64) -> list[torch.Tensor]:
    n_nonpos, n_sat, n_nonfin, pivot, n_fin = counts
    rows = [d.sum(dims), (d * d).sum(dims), a.sum(dims), a.amax(dims), n_nonpos, n_sat,
            n_nonfin, pivot, n_fin]
    return rows if dtype is None else [r.to(dtype) for r in rows]


def partial_sums_rows(x: torch.Tensor, channel_dim: int, sat_threshold: float | None,
                      dtype: torch.dtype | None = torch.float64) -> list[torch.Tensor]:
    """:func:`partial_sums` as its nine ``(C,)`` rows (``torch.stack`` of them is
    ``partial_sums``), for a graph that lays the rows of many sites out in one tensor.
    ``dtype=None``: each row in the type it was computed in (the accumulation type, or
    int64 counts), not converted to float64."""
    cd = channel_dim % x.dim()
    dims = [d for d in range(x.dim()) if d != cd]
    acc = acc_dtype(x.dtype)
    first = x
    for dim in sorted(dims, reverse=True):
        first = first.select(dim, 0)
    first = first.to(acc)
    zero = torch.zeros((), dtype=acc, device=x.device)
    one = torch.ones((), dtype=acc, device=x.device)
    pivot = torch.where(torch.isfinite(first), first, zero)
    shape = [1] * x.dim()
    shape[cd] = -1
    rows = x.numel() // x.shape[cd] if x.shape[cd] else 0
    cnt = acc if isinstance(rows, int) and rows < 2 ** 24 else torch.int64
    fin = torch.isfinite(x)
    xa = x.to(acc)
    d = torch.where(fin, xa - pivot.view(shape), zero)
    a = torch.where(fin, xa.abs(), zero)
    n_fin = fin.to(cnt).sum(dims)
    n_nonfin = rows - n_fin
    n_nonpos = (torch.where(fin, xa, one) <= 0).to(cnt).sum(dims)
    if sat_threshold is None:
        n_sat = torch.zeros_like(n_fin)
    else:
        n_sat = (a >= sat_threshold).to(cnt).sum(dims)
    return _sum_rows(d, a, dims, n_nonpos, n_sat, n_nonfin, pivot, n_fin, dtype=dtype)


def packed_partial_sums(xs: Sequence[torch.Tensor], channel_dims: Sequence[int],
                        sat_thresholds: Sequence[float | None]) -> torch.Tensor:
    """The ``(9, sum C)`` sums of every tensor in ``xs`` side by side (rows of
    :func:`partial_sums`) as ONE ``cat`` of every site's rows, in torch ops only: in a
    graph, inductor writes each site's reductions straight into their slices of one output
    buffer (no per-site buffers, no copy into the result).

    The result is float32 when every row was computed in float32 (float32 activations and
    counts below 2**24 values per channel: every value is then exact in float32 and
    converting to float64 later gives :func:`partial_sums`' values bit for bit), else
    float64.
    """
    rows = [partial_sums_rows(x, cd, thr, dtype=None)
            for x, cd, thr in zip(xs, channel_dims, sat_thresholds, strict=True)]
    f32 = all(r.dtype == torch.float32 for site in rows for r in site)
    flat = [r[k] if f32 else r[k].to(torch.float64) for k in range(SUM_ROWS) for r in rows]
    return torch.cat(flat).view(SUM_ROWS, -1)


def packed_from_sums(sums: torch.Tensor) -> torch.Tensor:
    """``(..., 9, C)`` sums -> ``(..., 8, C)`` packed statistics (rows :data:`PACKED_ROWS`);
    leading dimensions (calls) are kept."""
    s1, s2, ab, mx, nonpos, sat, nonfin, pivot, count = sums.unbind(-2)
    c = count.clamp_min(1)
    mean = pivot + s1 / c
    m2 = (s2 - s1 * s1 / c).clamp_min(0)
    return torch.stack([count, mean, m2, ab, nonpos, mx, nonfin, sat], dim=-2)


def merge_packed_many(p: torch.Tensor) -> torch.Tensor:
    """Exact merge of ``(K, 8, C)`` packed statistics (K sets of the same columns) into one
    ``(8, C)``, with a fixed number of tensor ops whatever ``K``: counts and sums add, the
    mean is the count-weighted mean (shifted by the first set's), ``m2`` adds each set's
    ``m2`` and ``n_k (mean_k - mean)**2`` (the parallel-variance identity Chan's pairwise
    merge applies two at a time)."""
    n = p[:, 0]
    total = n.sum(0)
    mu0 = p[0, 1]
    mean = mu0 + (n * (p[:, 1] - mu0)).sum(0) / total.clamp_min(1)
    dev = p[:, 1] - mean
    out = p.sum(0)
    out[1] = mean
    out[2] = p[:, 2].sum(0) + (n * dev * dev).sum(0)
    out[5] = p[:, 5].amax(0)
    return out


def merge_sums_many(sums: torch.Tensor, scratch: bool = False) -> torch.Tensor:
    """``(K, 9, C)`` float64 raw sums of K calls (:func:`partial_sums` rows) -> their merged
    ``(8, C)`` packed statistics: ``merge_packed_many(packed_from_sums(sums))`` computed from
    the sums' rows directly, with the same float64 operations (bit for bit; no ``(K, 8, C)``
    intermediate). ``scratch=True``: ``sums`` may be overwritten, and the ``(K, C)``
    intermediates are written into its rows (no allocation the size of the data, which a
    flush of a large ``K`` would otherwise pay in page faults)."""
    s1, s2, n = sums[:, 0], sums[:, 1], sums[:, 8]
    abs_sum, absmax = sums[:, 2].sum(0), sums[:, 3].amax(0)
    nonpos, sat, nonfin = sums[:, 4].sum(0), sums[:, 5].sum(0), sums[:, 6].sum(0)
    total = n.sum(0)
    if scratch:  # rows 2-6 are read: they hold the intermediates from here on
        c = torch.clamp_min(n, 1, out=sums[:, 2])
        mean_k = sums[:, 7].add_(torch.div(s1, c, out=sums[:, 3]))  # each call's mean
        m2_k = s2.sub_(s1.mul_(s1).div_(c)).clamp_min_(0)
        mu0 = mean_k[0].clone()
        t = torch.sub(mean_k, mu0, out=sums[:, 4])
        mean = mu0 + torch.mul(n, t, out=t).sum(0) / total.clamp_min(1)
        dev = torch.sub(mean_k, mean, out=sums[:, 5])
        m2 = m2_k.sum(0) + torch.mul(n, dev, out=sums[:, 6]).mul_(dev).sum(0)
    else:
        c = n.clamp_min(1)
        mean_k = sums[:, 7] + s1 / c  # each call's mean
        m2_k = (s2 - s1 * s1 / c).clamp_min(0)
        mu0 = mean_k[0]
        mean = mu0 + (n * (mean_k - mu0)).sum(0) / total.clamp_min(1)
        dev = mean_k - mean
        m2 = m2_k.sum(0) + (n * dev * dev).sum(0)
    return torch.stack([total, mean, m2, abs_sum, nonpos, absmax, nonfin, sat])


def merge_packed(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    """Exact (Chan) merge of two packed statistics tensors of the same columns."""
    if a is None:
        return b
    na, nb = a[0], b[0]
    n = na + nb
    nn = n.clamp_min(1)
    delta = b[1] - a[1]
    out = a + b  # counts and sums add
    out[1] = a[1] + delta * (nb / nn)
    out[2] = a[2] + b[2] + delta * delta * (na * nb / nn)
    out[5] = torch.maximum(a[5], b[5])
    return out


def packed_to_stats(p: torch.Tensor, dtype: torch.dtype, sat_threshold: float | None
                    ) -> NeuronStats:
    """One site's :class:`NeuronStats` from its ``(8, C)`` packed columns; moments in
    ``dtype`` (the accumulation type), the float64 mean kept through ``mean_residual``."""
    i64 = torch.int64
    mean = p[1].to(dtype)
    return NeuronStats(
        count=p[0].to(i64), mean=mean, m2=p[2].to(dtype), abs_sum=p[3].to(dtype),
        n_nonpos=p[4].to(i64), absmax=p[5].to(dtype), n_nonfinite=p[6].to(i64),
        n_sat=p[7].to(i64) if sat_threshold is not None else torch.zeros_like(p[7], dtype=i64),
        sat_threshold=sat_threshold, mean_residual=(p[1] - mean.to(torch.float64)).to(dtype))


def stats_to_packed(s: NeuronStats) -> torch.Tensor:
    """The ``(8, C)`` float64 packed form of ``s`` (exact mean through its residual)."""
    f64 = torch.float64
    return torch.stack([s.count.to(f64), s.exact_mean(), s.m2.to(f64), s.abs_sum.to(f64),
                        s.n_nonpos.to(f64), s.absmax.to(f64), s.n_nonfinite.to(f64),
                        s.n_sat.to(f64)])


def all_reduce_packed(p: torch.Tensor, group: object | None = None) -> torch.Tensor:
    """Packed statistics of the union of every rank's samples: one all-gather, merged in rank
    order (every rank computes bit-identical results). Collective."""
    import torch.distributed as dist

    world = dist.get_world_size(group)  # type: ignore[arg-type]
    gathered = [torch.empty_like(p) for _ in range(world)]
    dist.all_gather(gathered, p.contiguous(), group=group)  # type: ignore[arg-type]
    out: torch.Tensor | None = None
    for g in gathered:
        out = merge_packed(out, g)
    assert out is not None
    return out


def _rows_view(x: torch.Tensor, cd: int) -> torch.Tensor | None:
    """``x`` as ``(R, C)`` rows with unit channel stride, without a copy, or None."""
    rows = x.movedim(cd, -1)
    try:
        v = rows.view(-1, x.shape[cd])
    except RuntimeError:
        return None
    if v.stride(1) != 1 or v.shape[0] == 0:
        return None
    return v


def partial_sums_many(xs: Sequence[torch.Tensor], channel_dims: Sequence[int],
                      sat_thresholds: Sequence[float | None]) -> torch.Tensor:
    """The ``(9, sum C)`` float64 sums of every tensor in ``xs`` side by side, in one batched
    call of the CPU C kernel (every site's row blocks run as tasks of one thread-pool
    dispatch) where every tensor is a float32 row layout; otherwise per tensor
    (:func:`partial_sums`, or the C kernel's own layouts through ``raw_sums``)."""
    from . import _neuron_stats_cpu as cpu

    views = [_rows_view(x, cd % x.dim()) for x, cd in zip(xs, channel_dims, strict=True)]
    lib = cpu._get_lib() if all(v is not None and v.dtype == torch.float32
                                and v.device.type == "cpu" for v in views) else None
    if lib is None or not views:
        return torch.cat([_sums_one(x, cd, thr) for x, cd, thr
                          in zip(xs, channel_dims, sat_thresholds, strict=True)], dim=1)
    vs: list[torch.Tensor] = views  # type: ignore[assignment]
    widths = [int(v.shape[1]) for v in vs]
    total = sum(widths)
    firsts = torch.cat([v[0] for v in vs])
    pivot = torch.nan_to_num(firsts, nan=0.0, posinf=0.0, neginf=0.0)  # non-finite: 0
    nthreads = max(1, torch.get_num_threads())
    parts = max(1, min(8 * nthreads, min(int(v.shape[0]) for v in vs) // _PART_ROWS))
    buf = torch.zeros(parts, 7 * total, dtype=torch.float64)
    fn = lib.stats_rows_f32
    calls = []
    off = 0
    pp, bp, row_b = pivot.data_ptr(), buf.data_ptr(), 7 * total * 8
    for v, c, thr in zip(vs, widths, sat_thresholds, strict=True):
        r, sr = int(v.shape[0]), int(v.stride(0))
        t = float("inf") if thr is None else float(thr)
        for k in range(parts):
            lo, hi = r * k // parts, r * (k + 1) // parts
            calls.append((fn, (v.data_ptr() + lo * sr * 4, hi - lo, c, sr, pp + off * 4, t,
                               bp + k * row_b + 7 * off * 8)))
        off += c
    cpu._run(calls, nthreads)
    # each site's block is its own (7, c): side by side with one cat (no gather)
    flat = buf.sum(0) if parts > 1 else buf[0]
    sums7 = _side_by_side(flat, widths)
    if parts > 1:
        sums7[_MAX_ROW] = _side_by_side(buf.amax(0), widths)[_MAX_ROW]
    if not math.isfinite(float(sums7[:3].sum())):  # a float32 lane overflowed: exact per site
        return torch.cat([_sums_one(x, cd, thr) for x, cd, thr
                          in zip(xs, channel_dims, sat_thresholds, strict=True)], dim=1)
    n_fin = _layout(tuple(widths)).rows_per_column(tuple(int(v.shape[0]) for v in vs)) \
        - sums7[6]
    return torch.cat([sums7, pivot.to(torch.float64)[None], n_fin[None]])


def _side_by_side(flat: torch.Tensor, widths: Sequence[int]) -> torch.Tensor:
    """``(7 * sum C,)`` per-site ``(7, c)`` blocks, one after the other -> ``(7, sum C)``."""
    if len(widths) == 1:
        return flat.view(7, widths[0])
    blocks = []
    off = 0
    for c in widths:
        blocks.append(flat[7 * off: 7 * (off + c)].view(7, c))
        off += c
    return torch.cat(blocks, dim=1)


class _Layout:
    def __init__(self, widths: tuple[int, ...]) -> None:
        self.widths = widths
        self._rows: dict[tuple[int, ...], torch.Tensor] = {}

    def rows_per_column(self, rows: tuple[int, ...]) -> torch.Tensor:
        """Values per channel of every column (float64), cached per batch shape."""
        t = self._rows.get(rows)
        if t is None:
            t = torch.cat([torch.full((c,), float(r), dtype=torch.float64)
                           for c, r in zip(self.widths, rows, strict=True)])
            if len(self._rows) < 64:
                self._rows[rows] = t
        return t


_LAYOUTS: dict[tuple[int, ...], _Layout] = {}


def _layout(widths: tuple[int, ...]) -> _Layout:
    lay = _LAYOUTS.get(widths)
    if lay is None:
        lay = _LAYOUTS[widths] = _Layout(widths)
    return lay


def _sums_one(x: torch.Tensor, cd: int, thr: float | None) -> torch.Tensor:
    from . import _neuron_stats_cpu as cpu

    cd = cd % x.dim()
    if cpu.supports(x) and cpu.available():
        pivot, sums, per_channel = cpu.raw_sums(x, cd, thr)
        count = per_channel - sums[6]
        return torch.cat([sums, pivot.to(torch.float64)[None], count[None]])
    with torch.no_grad():
        return partial_sums(x, cd, thr)


_SQ_SOURCE = r"""
#include <stdint.h>
#include <string.h>
typedef float vf __attribute__((vector_size(64)));
typedef double vd __attribute__((vector_size(64)));
#define BLOCK 2048

/* out[t] = sum of x_t[i]^2 over the n[t] contiguous values at ptr[t]: float32 squares summed
   in eight 16-lane float32 accumulators over blocks of BLOCK values (16 values a lane), each
   block's lanes added into a float64 total (rounding does not grow with the size). The same
   order whatever the alignment or the thread. */
void sq_sums_f32(const int64_t *ptr, const int64_t *n, int64_t k, double *out) {
    for (int64_t t = 0; t < k; ++t) {
        const float *x = (const float *)(intptr_t)ptr[t];
        const int64_t m = n[t];
        double s = 0;
        int64_t i = 0;
        while (i + BLOCK <= m) {
            vf a[8] = {{0}};
            for (int64_t e = i + BLOCK; i < e; i += 128) {
                for (int j = 0; j < 8; ++j) {
                    vf v; memcpy(&v, x + i + 16 * j, 64);
                    a[j] += v * v;
                }
            }
            vf r = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
            for (int l = 0; l < 16; ++l) s += (double)r[l];
        }
        for (; i < m; ++i) s += (double)x[i] * (double)x[i];
        out[t] = s;
    }
}

void sq_sums_f64(const int64_t *ptr, const int64_t *n, int64_t k, double *out) {
    for (int64_t t = 0; t < k; ++t) {
        const double *x = (const double *)(intptr_t)ptr[t];
        const int64_t m = n[t];
        vd a[8] = {{0}};
        int64_t i = 0;
        for (; i + 64 <= m; i += 64) {
            for (int j = 0; j < 8; ++j) {
                vd v; memcpy(&v, x + i + 8 * j, 64);
                a[j] += v * v;
            }
        }
        vd r = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
        double s = 0;
        for (int l = 0; l < 8; ++l) s += r[l];
        for (; i < m; ++i) s += x[i] * x[i];
        out[t] = s;
    }
}
"""

_sq_lib_state: list[Any] = []  # [lib or None] once tried
#: total values above which several threads (torch's reduction) beat the one-thread C loop
_SQ_ONE_THREAD_MAX = 1 << 22


def _sq_lib() -> Any:
    """The small C library of :data:`_SQ_SOURCE` (built and cached like the statistics
    kernel's, :func:`._neuron_stats_cpu.compile_library`), or None where it cannot be
    built or ``GRAPHSURG_NO_NATIVE`` is set."""
    if _sq_lib_state:
        return _sq_lib_state[0]
    import ctypes
    import os

    from ._neuron_stats_cpu import compile_library

    lib = None if os.environ.get("GRAPHSURG_NO_NATIVE") else compile_library(_SQ_SOURCE,
                                                                              "sq_sums")
    if lib is not None:
        vp, i64 = ctypes.c_void_p, ctypes.c_int64
        for name in ("sq_sums_f32", "sq_sums_f64"):
            f = getattr(lib, name)
            f.argtypes = [vp, vp, i64, vp]
            f.restype = None
    _sq_lib_state.append(lib)
    return lib


def _sq_sums_native(ts: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """Sums of squares (float64) of contiguous CPU float32 or float64 tensors of one dtype,
    in one C call, or None where that does not apply."""
    dt = ts[0].dtype
    if dt not in (torch.float32, torch.float64):
        return None
    total = 0
    for t in ts:
        if t.dtype != dt or not t.is_cpu or not t.is_contiguous():
            return None
        total += t.numel()
    if total > _SQ_ONE_THREAD_MAX and torch.get_num_threads() > 1:
        return None
    lib = _sq_lib()
    if lib is None:
        return None
    import ctypes

    k = len(ts)
    arr = ctypes.c_int64 * k
    ptrs = arr(*[t.data_ptr() for t in ts])
    ns = arr(*[t.numel() for t in ts])
    out = torch.empty(k, dtype=torch.float64)
    fn = lib.sq_sums_f32 if dt == torch.float32 else lib.sq_sums_f64
    fn(ptrs, ns, k, out.data_ptr())
    return out


def multi_grad_sq_norms(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum of squares of each tensor (float64, one value per tensor, on their device).

    One multi-tensor reduction per dtype: on CUDA the Triton multi-tensor kernel
    (:func:`graphsurg.kernels.grad_sq_norms`); on CPU, for contiguous tensors of one float32
    or float64 dtype, one call of a small C loop accumulating in float64 (a training step's
    gradients: no tensor op at all), else ``torch._foreach_norm`` for float32 and float64
    groups (other dtypes are upcast by ``grad_sq_norms``).
    """
    from ._norms import grad_sq_norms

    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    ts = [t.detach() if t.requires_grad else t for t in tensors]  # no op per tensor
    if ts[0].is_cuda:
        return grad_sq_norms(ts).to(torch.float64)
    fast = _sq_sums_native(ts)
    if fast is not None:
        return fast
    out = torch.empty(len(ts), dtype=torch.float64)
    groups: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(ts):
        groups.setdefault(t.dtype, []).append(i)
    for dt, idx in groups.items():
        sub = [ts[i] for i in idx]
        if dt in (torch.float32, torch.float64):
            v = torch.stack(torch._foreach_norm(sub)).to(torch.float64).square()
        else:
            v = grad_sq_norms(sub).to(torch.float64)
        if len(groups) == 1:
            return v
        out[torch.tensor(idx)] = v
    return out


__all__ = ["PACKED_ROWS", "SUM_ROWS", "all_reduce_packed", "merge_packed", "merge_packed_many",
           "merge_sums_many",
           "multi_grad_sq_norms", "packed_from_sums", "packed_partial_sums", "packed_to_stats",
           "partial_sums", "partial_sums_many", "partial_sums_rows", "stats_to_packed"]
