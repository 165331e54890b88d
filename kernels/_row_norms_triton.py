"""Triton kernel for ``row_sq_norms``: per-output-neuron squared norms of a weight gradient.

Layers: ``_row_sq_norms_kernel`` (jit), ``_launch`` (views the weight as ``(R, K)``, picks
blocks and the split of ``K``) and ``row_sq_norms_triton``.

Grid ``(row blocks, K splits)``: each program sums squares over ``[BLOCK_R, BLOCK_K]`` tiles
of its rows and ``K`` range and writes one partial per row; the ``K`` splits (so that a few
rows with a long ``K`` still fill the GPU) are summed afterwards in a fixed order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _row_sq_norms_kernel(
    g_ptr,
    partial_ptr,  # (SPLITS, R) accumulation dtype
    R,
    K,
    g_row_stride,
    k_per_prog,
    ACC_FP64: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_r = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1).to(tl.int64)
    acc_ty = tl.float64 if ACC_FP64 else tl.float32
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    mask_r = offs_r < R
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    k0 = pid_k * k_per_prog
    k1 = tl.minimum(k0 + k_per_prog, K)
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=acc_ty)
    for ks in range(k0, k1, BLOCK_K):
        k = ks + offs_k
        mask = mask_r[:, None] & (k < k1)[None, :]
        v = tl.load(g_ptr + offs_r[:, None] * g_row_stride + k[None, :], mask=mask, other=0.0)
        v = v.to(acc_ty)
        acc += v * v
    tl.store(partial_ptr + pid_k * R + offs_r, tl.sum(acc, axis=1), mask=mask_r)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def row_sq_norms_triton(
    g: torch.Tensor,
    *,
    block_r: int | None = None,
    block_k: int | None = None,
    splits: int | None = None,
) -> torch.Tensor:
    """Squared norm of each ``g[i]`` (``g`` validated by the caller), shape ``(g.shape[0],)``.

    ``g`` is read as ``(R, K)`` (a view when its trailing dimensions flatten, a copy
    otherwise). Accumulates in float32 (float64 for float64 input).
    """
    g2 = g.detach().reshape(g.shape[0], -1)
    if g2.shape[1] > 0 and g2.stride(1) != 1:
        g2 = g2.contiguous()
    r, k = g2.shape
    acc = torch.float64 if g.dtype == torch.float64 else torch.float32
    if k == 0:
        return torch.zeros(r, dtype=acc, device=g.device)
    block_k = block_k or min(1024 if g.is_cuda else 64, _next_pow2(k))
    block_r = block_r or max(1, min(_next_pow2(r), 4096 // block_k))
    r_blocks = triton.cdiv(r, block_r)
    if splits is None:
        target = 4 * torch.cuda.get_device_properties(g.device).multi_processor_count if (
            g.is_cuda
        ) else 2
        splits = max(1, min(triton.cdiv(k, block_k), triton.cdiv(target, r_blocks)))
    k_per_prog = triton.cdiv(triton.cdiv(k, splits), block_k) * block_k
    splits = triton.cdiv(k, k_per_prog)
    partials = torch.empty(splits, r, dtype=acc, device=g.device)
    _row_sq_norms_kernel[(r_blocks, splits)](
        g2,
        partials,
        r,
        k,
        g2.stride(0),
        k_per_prog,
        ACC_FP64=acc == torch.float64,
        BLOCK_R=block_r,
        BLOCK_K=block_k,
        num_warps=4,
    )
    return partials.sum(0)
