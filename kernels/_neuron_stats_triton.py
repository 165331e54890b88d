"""Triton kernel for ``neuron_stats``: every per-channel statistic in one pass over ``x``.

Layers (Liger-Kernel style): ``_neuron_stats_kernel`` (the jit function; with its
finalising ``_neuron_stats_merge_kernel``), ``_launch`` (views ``x`` as strided
``(O, C, I)``, picks block sizes and the grid) and ``neuron_stats_triton``.

The kernel reads ``x`` as tiles ``[BLOCK_M, BLOCK_C]``: ``BLOCK_C`` channels by ``BLOCK_M``
reduced positions along the innermost reduced axis. Rows layouts -- ``(N, C)``, ``(N, T, C)``,
channels-last -- are read as ``(1, C, R)`` with the row stride as the reduced stride, so the
channel axis is the contiguous one; contiguous ``NCHW`` is read as ``(N, C, H*W)`` with the
spatial axis contiguous. Nothing is copied for these layouts.

Grid: ``(channel blocks, splits)``. Program ``(pc, ps)`` walks a contiguous range of tiles of
its channel block. Values are shifted by a per-channel pivot (the finite mean of the
channel's first tile, which every split loads alike), so sums of ``d = x - pivot`` and
``d*d`` stay accurate at ``x + 1e4``. The tile loop is element-wise only: each tile position
has its own accumulator slot (count, sum d, sum d*d, sum|x|, max|x|, #x<=0, #saturated), so
no thread waits on another; every ``FLUSH_ITERS`` tiles the slots are reduced to a block's
count, mean and M2 and merged into the program's running statistics with Chan's formula
(per-block Welford partials), which bounds float32 rounding by the block, not the batch.
Non-finite values are excluded by mask and counted as visited positions minus finite ones. Each program writes one partial per channel; a second, tiny kernel
(``_neuron_stats_merge_kernel``) merges the ``splits`` partials of each channel in float64
and writes the final fields, so a call is two launches and no host-side torch arithmetic.
Offsets are int64. fp16/bf16/fp32 inputs accumulate in float32, float64 in float64.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._layout import as_3d
from ._stats import NeuronStats, acc_dtype

_FP32_MAX = 3.4028234663852886e38
_FP64_MAX = 1.7976931348623157e308


@triton.jit
def _neuron_stats_kernel(
    x_ptr,
    pivot_ptr,  # (C,) accumulation dtype, written by the programs of split 0
    mom_ptr,  # (4, SPLITS, C) accumulation dtype: mean - pivot, m2, abs_sum, absmax
    cnt_ptr,  # (4, SPLITS, C) int64: count, n_nonpos, n_sat, n_nonfinite
    C,
    n_i,
    x_o_stride,
    x_c_stride,
    x_i_stride,
    n_i_blocks,
    n_iters,
    iters_per_prog,
    sat_threshold,
    part_stride,  # SPLITS * C
    HAS_SAT: tl.constexpr,
    ACC_FP64: tl.constexpr,
    MAX_FINITE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    FLUSH_ITERS: tl.constexpr,
):
    pid_c = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    acc_ty = tl.float64 if ACC_FP64 else tl.float32

    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    mask_c = offs_c < C
    offs_m = tl.arange(0, BLOCK_M).to(tl.int64)

    # every program of a channel block shifts by the same per-channel pivot: the finite mean
    # of the first tile of the channel (the same tile for every split), so sums stay small
    # even at x + 1e4
    mask0 = (offs_m < n_i)[:, None] & mask_c[None, :]
    v0 = tl.load(
        x_ptr + offs_m[:, None] * x_i_stride + offs_c[None, :] * x_c_stride,
        mask=mask0,
        other=0.0,
    ).to(acc_ty)
    fin0 = mask0 & (tl.abs(v0) <= MAX_FINITE)
    n0 = tl.maximum(tl.sum(fin0.to(tl.int32), axis=0), 1).to(acc_ty)
    pivot = tl.sum(tl.where(fin0, v0, 0.0), axis=0) / n0
    tl.store(pivot_ptr + offs_c, pivot, mask=mask_c & (pid_s == 0))

    n = tl.zeros((BLOCK_C,), dtype=tl.int64)
    mean = tl.zeros((BLOCK_C,), dtype=acc_ty)
    m2 = tl.zeros((BLOCK_C,), dtype=acc_ty)
    abs_sum = tl.zeros((BLOCK_C,), dtype=acc_ty)
    absmax = tl.zeros((BLOCK_C,), dtype=acc_ty)
    n_nonpos = tl.zeros((BLOCK_C,), dtype=tl.int64)
    n_sat = tl.zeros((BLOCK_C,), dtype=tl.int64)

    it0 = pid_s * iters_per_prog
    it1 = tl.minimum(it0 + iters_per_prog, n_iters)
    for blk in range(it0, it1, FLUSH_ITERS):
        # one accumulator slot per tile position: the inner loop is element-wise only (no
        # cross-thread reductions); the slots are folded into the running statistics once
        # per FLUSH_ITERS tiles, so float32 slot sums hold at most FLUSH_ITERS values
        c_s = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.int32)
        s1_s = tl.zeros((BLOCK_M, BLOCK_C), dtype=acc_ty)
        s2_s = tl.zeros((BLOCK_M, BLOCK_C), dtype=acc_ty)
        ab_s = tl.zeros((BLOCK_M, BLOCK_C), dtype=acc_ty)
        mx_s = tl.zeros((BLOCK_M, BLOCK_C), dtype=acc_ty)
        np_s = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.int32)
        st_s = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.int32)
        for it in range(blk, tl.minimum(blk + FLUSH_ITERS, it1)):
            o = it // n_i_blocks
            i = (it - o * n_i_blocks) * BLOCK_M + offs_m
            mask = (i < n_i)[:, None] & mask_c[None, :]
            ptrs = (
                x_ptr
                + o * x_o_stride
                + i[:, None] * x_i_stride
                + offs_c[None, :] * x_c_stride
            )
            v = tl.load(ptrs, mask=mask, other=0.0).to(acc_ty)
            a = tl.abs(v)
            fin = mask & (a <= MAX_FINITE)
            d = tl.where(fin, v - pivot[None, :], 0.0)
            az = tl.where(fin, a, 0.0)
            c_s += fin.to(tl.int32)
            s1_s += d
            s2_s += d * d
            ab_s += az
            mx_s = tl.maximum(mx_s, az)
            np_s += (fin & (v <= 0.0)).to(tl.int32)
            if HAS_SAT:
                st_s += (fin & (a >= sat_threshold)).to(tl.int32)

        # the block's (count, mean, M2) from its pivot-shifted sums, merged with Chan's formula
        n_b = tl.sum(c_s, axis=0).to(tl.int64)
        s1_b = tl.sum(s1_s, axis=0)
        mean_b = s1_b / tl.maximum(n_b, 1).to(acc_ty)
        m2_b = tl.maximum(tl.sum(s2_s, axis=0) - s1_b * mean_b, 0.0)
        n_new = n + n_b
        inv = 1.0 / tl.maximum(n_new, 1).to(acc_ty)
        delta = mean_b - mean
        mean = mean + delta * (n_b.to(acc_ty) * inv)
        m2 = m2 + m2_b + delta * delta * (n.to(acc_ty) * n_b.to(acc_ty) * inv)
        n = n_new
        abs_sum += tl.sum(ab_s, axis=0)
        absmax = tl.maximum(absmax, tl.max(mx_s, axis=0))
        n_nonpos += tl.sum(np_s, axis=0).to(tl.int64)
        if HAS_SAT:
            n_sat += tl.sum(st_s, axis=0).to(tl.int64)

    # positions this program visited (every block holds BLOCK_M except the last of each row,
    # n_i_blocks * BLOCK_M - n_i short); the ones that were not finite are the rest
    n_lastblocks = it1 // n_i_blocks - it0 // n_i_blocks
    visited = (it1 - it0) * BLOCK_M - n_lastblocks * (n_i_blocks * BLOCK_M - n_i)
    n_nonfinite = visited - n

    out = pid_s * C + offs_c
    tl.store(mom_ptr + out, mean, mask=mask_c)
    tl.store(mom_ptr + part_stride + out, m2, mask=mask_c)
    tl.store(mom_ptr + 2 * part_stride + out, abs_sum, mask=mask_c)
    tl.store(mom_ptr + 3 * part_stride + out, absmax, mask=mask_c)
    tl.store(cnt_ptr + out, n, mask=mask_c)
    tl.store(cnt_ptr + part_stride + out, n_nonpos, mask=mask_c)
    tl.store(cnt_ptr + 2 * part_stride + out, n_sat, mask=mask_c)
    tl.store(cnt_ptr + 3 * part_stride + out, n_nonfinite, mask=mask_c)


@triton.jit
def _neuron_stats_merge_kernel(
    mom_ptr,
    cnt_ptr,
    pivot_ptr,
    out_f_ptr,  # (5, C) accumulation dtype: mean, m2, abs_sum, absmax, mean_residual
    out_i_ptr,  # (4, C) int64: count, n_nonpos, n_sat, n_nonfinite
    C,
    splits,
    part_stride,
    ACC_FP64: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Merge the ``splits`` partials of each channel (Chan's formula, in float64)."""
    pid = tl.program_id(0).to(tl.int64)
    acc_ty = tl.float64 if ACC_FP64 else tl.float32
    offs_c = pid * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    mask_c = offs_c < C
    n = tl.zeros((BLOCK_C,), dtype=tl.int64)
    mean = tl.zeros((BLOCK_C,), dtype=tl.float64)
    m2 = tl.zeros((BLOCK_C,), dtype=tl.float64)
    abs_sum = tl.zeros((BLOCK_C,), dtype=tl.float64)
    absmax = tl.zeros((BLOCK_C,), dtype=acc_ty)
    n_nonpos = tl.zeros((BLOCK_C,), dtype=tl.int64)
    n_sat = tl.zeros((BLOCK_C,), dtype=tl.int64)
    n_nonfinite = tl.zeros((BLOCK_C,), dtype=tl.int64)
    for sp in range(0, splits):
        at = sp * C + offs_c
        n_s = tl.load(cnt_ptr + at, mask=mask_c, other=0)
        mean_s = tl.load(mom_ptr + at, mask=mask_c, other=0.0).to(tl.float64)
        m2_s = tl.load(mom_ptr + part_stride + at, mask=mask_c, other=0.0).to(tl.float64)
        n_new = n + n_s
        inv = 1.0 / tl.maximum(n_new, 1).to(tl.float64)
        delta = mean_s - mean
        mean = mean + delta * (n_s.to(tl.float64) * inv)
        m2 = m2 + m2_s + delta * delta * (n.to(tl.float64) * n_s.to(tl.float64) * inv)
        n = n_new
        abs_sum += tl.load(mom_ptr + 2 * part_stride + at, mask=mask_c, other=0.0).to(tl.float64)
        absmax = tl.maximum(absmax, tl.load(mom_ptr + 3 * part_stride + at, mask=mask_c, other=0.0))
        n_nonpos += tl.load(cnt_ptr + part_stride + at, mask=mask_c, other=0)
        n_sat += tl.load(cnt_ptr + 2 * part_stride + at, mask=mask_c, other=0)
        n_nonfinite += tl.load(cnt_ptr + 3 * part_stride + at, mask=mask_c, other=0)
    pivot = tl.load(pivot_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float64)
    mean = tl.where(n > 0, mean + pivot, 0.0)
    mean_acc = mean.to(acc_ty)
    tl.store(out_f_ptr + offs_c, mean_acc, mask=mask_c)
    tl.store(out_f_ptr + C + offs_c, m2.to(acc_ty), mask=mask_c)
    tl.store(out_f_ptr + 2 * C + offs_c, abs_sum.to(acc_ty), mask=mask_c)
    tl.store(out_f_ptr + 3 * C + offs_c, absmax, mask=mask_c)
    tl.store(out_f_ptr + 4 * C + offs_c, (mean - mean_acc.to(tl.float64)).to(acc_ty), mask=mask_c)
    tl.store(out_i_ptr + offs_c, n, mask=mask_c)
    tl.store(out_i_ptr + C + offs_c, n_nonpos, mask=mask_c)
    tl.store(out_i_ptr + 2 * C + offs_c, n_sat, mask=mask_c)
    tl.store(out_i_ptr + 3 * C + offs_c, n_nonfinite, mask=mask_c)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@functools.lru_cache(maxsize=16)
def _sm_count(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).multi_processor_count)


def _target_programs(x: torch.Tensor) -> int:
    if x.is_cuda:
        return 4 * _sm_count(x.device.index if x.device.index is not None else 0)
    return 4  # the interpreter on CPU: few, small programs


def _launch(
    x: torch.Tensor,
    cd: int,
    sat_threshold: float | None,
    *,
    block_m: int | None = None,
    block_c: int | None = None,
    splits: int | None = None,
    num_warps: int | None = None,
    flush_iters: int = 64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the kernel; returns ``pivot (C,)`` and partials ``mom (4, S, C)``, ``cnt (4, S, C)``."""
    v = as_3d(x, cd)
    n_o, C, n_i = v.outer, v.channels, v.inner
    so, sc, si = v.outer_stride, v.channel_stride, v.inner_stride
    if n_i == 1:
        # rows layout: the rows are the reduced axis
        n_o, n_i, so, si = 1, n_o, 0, so
    if block_m is None or block_c is None:
        if sc == 1 or si != 1:
            bm, bc = 32, min(128, _next_pow2(C))  # channels contiguous
        else:
            bm, bc = min(512, _next_pow2(n_i)), min(8, _next_pow2(C))  # positions contiguous
        block_m = block_m or bm
        block_c = block_c or bc
    n_i_blocks = triton.cdiv(n_i, block_m)
    n_iters = n_o * n_i_blocks
    c_blocks = triton.cdiv(C, block_c)
    if splits is None:
        splits = max(1, min(n_iters, triton.cdiv(_target_programs(x), c_blocks)))
    splits = max(1, min(splits, n_iters))
    iters_per_prog = triton.cdiv(n_iters, splits)
    splits = triton.cdiv(n_iters, iters_per_prog)
    acc = acc_dtype(x.dtype)
    pivot = torch.empty(C, dtype=acc, device=x.device)
    mom = torch.empty(4, splits, C, dtype=acc, device=x.device)
    cnt = torch.empty(4, splits, C, dtype=torch.int64, device=x.device)
    _neuron_stats_kernel[(c_blocks, splits)](
        v.base,
        pivot,
        mom,
        cnt,
        C,
        n_i,
        so,
        sc,
        si,
        n_i_blocks,
        n_iters,
        iters_per_prog,
        float(sat_threshold) if sat_threshold is not None else 0.0,
        splits * C,
        HAS_SAT=sat_threshold is not None,
        ACC_FP64=acc == torch.float64,
        MAX_FINITE=_FP64_MAX if acc == torch.float64 else _FP32_MAX,
        BLOCK_M=block_m,
        BLOCK_C=block_c,
        FLUSH_ITERS=flush_iters,
        num_warps=num_warps or (4 if block_m * block_c <= 2048 else 8),
    )
    return pivot, mom, cnt


def _merge(
    pivot: torch.Tensor, mom: torch.Tensor, cnt: torch.Tensor, sat_threshold: float | None
) -> NeuronStats:
    splits, C = mom.shape[1], mom.shape[2]
    out_f = torch.empty(5, C, dtype=mom.dtype, device=mom.device)
    out_i = torch.empty(4, C, dtype=torch.int64, device=mom.device)
    block_c = min(1024, _next_pow2(C))
    _neuron_stats_merge_kernel[(triton.cdiv(C, block_c),)](
        mom, cnt, pivot, out_f, out_i, C, splits, splits * C,
        ACC_FP64=mom.dtype == torch.float64,
        BLOCK_C=block_c,
    )
    return NeuronStats(
        count=out_i[0],
        mean=out_f[0],
        m2=out_f[1],
        abs_sum=out_f[2],
        n_nonpos=out_i[1],
        absmax=out_f[3],
        n_nonfinite=out_i[3],
        n_sat=out_i[2],
        sat_threshold=sat_threshold,
        mean_residual=out_f[4],
    )


def neuron_stats_triton(
    x: torch.Tensor,
    cd: int,
    sat_threshold: float | None,
    *,
    block_m: int | None = None,
    block_c: int | None = None,
    splits: int | None = None,
    num_warps: int | None = None,
    flush_iters: int = 64,
) -> NeuronStats:
    """Per-channel statistics of ``x`` (channel dimension ``cd``, already validated and
    normalised) with the Triton kernel. ``x`` is not modified.

    Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1``. The block sizes
    and the number of splits of the reduced axis are chosen from the layout unless given
    (tests pass small ones to exercise multi-tile and multi-split merging; benchmarks/gpu.py
    sweeps them).
    """
    pivot, mom, cnt = _launch(
        x, cd, sat_threshold, block_m=block_m, block_c=block_c, splits=splits,
        num_warps=num_warps, flush_iters=flush_iters,
    )
    return _merge(pivot, mom, cnt, sat_threshold)
