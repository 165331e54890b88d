"""Triton multi-tensor kernel for ``grad_sq_norms``: the sum of squares of every tensor in a
list, in one launch per dtype (one launch for the usual all-float32 list).

Layers: ``_grad_sq_norms_kernel`` (jit), ``_launch`` (packs the chunk table, picks the
grid) and ``grad_sq_norms_triton``.

The tensors are cut into chunks of at most ``CHUNK`` elements; a table holds, per chunk, the
chunk's start address and its length (int64). Program ``p`` reads row ``p`` of the table,
turns the address into a typed pointer, and writes the chunk's sum of squares to
``partials[p]``. Chunks of one tensor are consecutive rows, so each tensor's total is a
fixed-order sum over its own partials (deterministic, no atomics; a tiny tensor's total does
not lose precision next to a huge one, as a running cumsum would).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

_TL_DTYPES = {
    torch.float32: tl.float32,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float64: tl.float64,
}


@triton.jit
def _grad_sq_norms_kernel(
    table_ptr,  # (n_chunks, 2) int64: start address, length
    partial_ptr,  # (n_chunks,) accumulation dtype
    DTYPE: tl.constexpr,
    ACC_FP64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    addr = tl.load(table_ptr + 2 * pid)
    n = tl.load(table_ptr + 2 * pid + 1)
    x_ptr = addr.to(tl.pointer_type(DTYPE), bitcast=True)
    acc_ty = tl.float64 if ACC_FP64 else tl.float32
    acc = tl.zeros((BLOCK,), dtype=acc_ty)
    offs = tl.arange(0, BLOCK).to(tl.int64)
    for start in range(0, n, BLOCK):
        idx = start + offs
        v = tl.load(x_ptr + idx, mask=idx < n, other=0.0).to(acc_ty)
        acc += v * v
    tl.store(partial_ptr + pid, tl.sum(acc, axis=0))


def _launch(ts: list[torch.Tensor], chunk: int, block: int) -> list[torch.Tensor]:
    """Sum of squares of each tensor of ``ts`` (all one dtype, one device, contiguous)."""
    device = ts[0].device
    esz = ts[0].element_size()
    rows: list[tuple[int, int]] = []
    owner: list[int] = []
    for k, t in enumerate(ts):
        n = t.numel()
        for s in range(0, n, chunk):
            rows.append((t.data_ptr() + s * esz, min(chunk, n - s)))
            owner.append(k)
    acc = torch.float64 if ts[0].dtype == torch.float64 else torch.float32
    out = [torch.zeros((), dtype=acc, device=device) for _ in ts]
    if not rows:
        return out
    table = torch.tensor(rows, dtype=torch.int64).to(device, non_blocking=True)
    partials = torch.empty(len(rows), dtype=acc, device=device)
    _grad_sq_norms_kernel[(len(rows),)](
        table,
        partials,
        DTYPE=_TL_DTYPES[ts[0].dtype],
        ACC_FP64=acc == torch.float64,
        BLOCK=block,
        num_warps=8 if block >= 2048 else 4,
    )
    # per tensor: a fixed-order sum of its own consecutive partials, padded to one matrix
    counts = torch.bincount(torch.tensor(owner), minlength=len(ts))
    width = int(counts.max())
    padded = torch.zeros(len(ts), width, dtype=acc, device=device)
    first = torch.cumsum(counts, 0) - counts
    col = torch.arange(len(rows)) - first[torch.tensor(owner)]
    padded[torch.tensor(owner, device=device), col.to(device)] = partials
    sums = padded.sum(1)
    return list(sums.unbind(0))


def grad_sq_norms_triton(
    tensors: Sequence[torch.Tensor], *, chunk: int | None = None, block: int | None = None
) -> torch.Tensor:
    """Sum of squares of each tensor (validated by the caller): one launch per dtype.

    Non-contiguous tensors are copied to contiguous ones first. Returns a 1-d tensor of
    length ``len(tensors)`` (float64 when any tensor is float64, else float32). ``chunk`` and
    ``block`` (elements per program and per load) default to 65536 and 4096 on a GPU and to
    small values under the interpreter.
    """
    ts = [t.detach() for t in tensors]
    on_gpu = ts[0].is_cuda
    chunk = chunk or (65536 if on_gpu else 1024)
    block = block or (4096 if on_gpu else 256)
    chunk = max(block, chunk // block * block)
    result: list[torch.Tensor | None] = [None] * len(ts)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(ts):
        by_dtype.setdefault(t.dtype, []).append(i)
    for idx in by_dtype.values():
        group = [ts[i] if ts[i].is_contiguous() else ts[i].contiguous() for i in idx]
        for i, s in zip(idx, _launch(group, chunk, block), strict=True):
            result[i] = s
    out_dt = torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32
    return torch.stack([r.to(out_dt) for r in result if r is not None])
