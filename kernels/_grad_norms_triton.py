"""Triton multi-tensor kernel for ``grad_sq_norms``: the sum of squares of every tensor in a
list, in one launch per dtype (one launch for the usual all-float32 list).

Layers: ``_grad_sq_norms_kernel`` (jit), ``_launch`` (packs the chunk table, picks the
grid) and ``grad_sq_norms_triton``.

The tensors are cut into chunks of at most ``CHUNK`` elements; a table holds, per chunk, the
chunk's start address and its length (int64). Program ``p`` reads row ``p`` of the table,
turns the address into a typed pointer, and writes the chunk's sum of squares to
``partials[p]``. The table is cached per list of (address, length), so repeated calls on the
same gradients launch without rebuilding it. Chunks of one tensor are consecutive rows, so each tensor's total is a
fixed-order sum over its own partials (deterministic, no atomics; a tiny tensor's total does
not lose precision next to a huge one, as a running cumsum would).
"""

from __future__ import annotations

from collections import OrderedDict
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


_PLANS: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
_PLAN_CACHE_SIZE = 16


def _plan(ts: list[torch.Tensor], chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunk table ``(n_chunks, 2)`` and, per tensor, the indices of its partials padded
    with ``n_chunks`` (a zero slot) to ``(T, width)``; both on the tensors' device.

    Cached by (address, length) of every tensor: a gradient list keeps its storage from step
    to step, so the table is built and copied to the device once. The table depends on
    nothing else, so a cache hit is correct even if the memory changed owner.
    """
    device = ts[0].device
    esz = ts[0].element_size()
    key = (device, esz, chunk, tuple((t.data_ptr(), t.numel()) for t in ts))
    hit = _PLANS.get(key)
    if hit is not None:
        _PLANS.move_to_end(key)
        return hit
    rows: list[tuple[int, int]] = []
    owned: list[list[int]] = []
    for t in ts:
        n = t.numel()
        mine = []
        for s in range(0, n, chunk):
            mine.append(len(rows))
            rows.append((t.data_ptr() + s * esz, min(chunk, n - s)))
        owned.append(mine)
    width = max(1, max(len(m) for m in owned))
    idx = [m + [len(rows)] * (width - len(m)) for m in owned]
    table = torch.tensor(rows if rows else [(0, 0)], dtype=torch.int64).to(device)
    gather = torch.tensor(idx, dtype=torch.int64).to(device)
    _PLANS[key] = (table, gather)
    if len(_PLANS) > _PLAN_CACHE_SIZE:
        _PLANS.popitem(last=False)
    return table, gather


def _launch(ts: list[torch.Tensor], chunk: int, block: int) -> torch.Tensor:
    """Sum of squares of each tensor of ``ts`` (all one dtype, one device, contiguous)."""
    table, gather = _plan(ts, chunk)
    n_rows = sum(triton.cdiv(t.numel(), chunk) for t in ts)
    acc = torch.float64 if ts[0].dtype == torch.float64 else torch.float32
    partials = torch.zeros(n_rows + 1, dtype=acc, device=ts[0].device)  # last: the zero slot
    if n_rows:
        _grad_sq_norms_kernel[(n_rows,)](
            table,
            partials,
            DTYPE=_TL_DTYPES[ts[0].dtype],
            ACC_FP64=acc == torch.float64,
            BLOCK=block,
            num_warps=8 if block >= 2048 else 4,
        )
    # per tensor: a fixed-order sum of its own partials (deterministic, no atomics)
    return partials[gather].sum(1)


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
        for i, s in zip(idx, _launch(group, chunk, block).unbind(0), strict=True):
            result[i] = s
    out_dt = torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32
    return torch.stack([r.to(out_dt) for r in result if r is not None])
