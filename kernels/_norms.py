"""Gradient norms: the sum of squares of a list of tensors, and per-row squared norms.

On CUDA tensors the Triton kernels run (``_grad_norms_triton``: one multi-tensor launch for
the whole list; ``_row_norms_triton``); on CPU, torch reductions. ``backend="triton"`` runs
the kernels on CPU tensors under ``TRITON_INTERPRET=1`` (tests).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Literal

import torch

NormBackend = Literal["auto", "torch", "triton"]
_BACKENDS = ("auto", "torch", "triton")


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _use_triton(backend: str, is_cuda: bool, fn: str) -> bool:
    if backend not in _BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {_BACKENDS}")
    if backend == "auto":
        return is_cuda
    if backend == "triton" and not is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"{fn}(backend='triton') on CPU tensors needs TRITON_INTERPRET=1 set before triton "
            "is imported; use backend='auto' or CUDA tensors"
        )
    return backend == "triton"


def grad_sq_norms(
    tensors: Sequence[torch.Tensor], *, backend: NormBackend = "auto"
) -> torch.Tensor:
    """Sum of squares of every tensor in ``tensors``, one value per tensor.

    Args:
        tensors: floating-point tensors of any shapes (e.g. the ``.grad`` of each parameter),
            all on one device.
        backend: ``"auto"`` (Triton on CUDA, torch on CPU), ``"torch"`` or ``"triton"``.

    Returns:
        A 1-d tensor of length ``len(tensors)`` on the tensors' device: float64 when any
        tensor is float64, else float32 (fp16/bf16 are accumulated in float32). The tensors
        are not modified.

    Raises:
        ValueError: ``tensors`` is empty, holds a non-floating-point tensor, or mixes devices.

    Example:
        >>> grad_sq_norms([torch.ones(2, 3), torch.full((4,), 2.0)])
        tensor([ 6., 16.])
    """
    ts = list(tensors)
    if not ts:
        raise ValueError("tensors is empty: grad_sq_norms needs at least one tensor")
    for i, t in enumerate(ts):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"tensors[{i}] is a {type(t).__name__}, not a torch.Tensor")
        if not t.is_floating_point():
            raise ValueError(
                f"tensors[{i}] has dtype {t.dtype}: grad_sq_norms needs floating-point tensors"
            )
        if t.device != ts[0].device:
            raise ValueError(
                f"tensors[{i}] is on {t.device} but tensors[0] is on {ts[0].device}: "
                "pass tensors from one device"
            )
    if _use_triton(backend, ts[0].is_cuda, "grad_sq_norms"):
        from ._grad_norms_triton import grad_sq_norms_triton

        return grad_sq_norms_triton(ts)
    out = []
    for t in ts:
        td = t.detach()
        if td.dtype in (torch.float32, torch.float64):
            out.append(torch.linalg.vecdot(td.reshape(-1), td.reshape(-1)))
        else:
            out.append(td.to(_acc(td.dtype)).pow(2).sum())
    dt = torch.float64 if any(o.dtype == torch.float64 for o in out) else torch.float32
    return torch.stack([o.to(dt) for o in out])


def row_sq_norms(g: torch.Tensor, *, backend: NormBackend = "auto") -> torch.Tensor:
    """Per-output-neuron squared norms of a weight (gradient).

    Args:
        g: rows of a Linear weight ``(out, in)``, output channels of a conv weight
            ``(out, in, *k)``, or a bias ``(out,)`` (each element is its own row).
        backend: ``"auto"`` (Triton on CUDA, torch on CPU), ``"torch"`` or ``"triton"``.

    Returns:
        Shape ``(out,)``, float32 (float64 for float64 ``g``). ``g`` is not modified.

    Raises:
        ValueError: ``g`` is 0-dim, empty, or not floating point.
    """
    if not isinstance(g, torch.Tensor):
        raise ValueError(f"g is a {type(g).__name__}, not a torch.Tensor")
    if g.dim() < 1:
        raise ValueError("g is 0-dimensional: row_sq_norms needs a tensor with rows, (out, ...)")
    if not g.is_floating_point():
        raise ValueError(f"g has dtype {g.dtype}: row_sq_norms needs a floating-point tensor")
    if g.shape[0] == 0:
        raise ValueError(f"g has no rows (shape {tuple(g.shape)})")
    if _use_triton(backend, g.is_cuda, "row_sq_norms"):
        from ._row_norms_triton import row_sq_norms_triton

        return row_sq_norms_triton(g)
    g2 = g.detach().reshape(g.shape[0], -1)
    if g2.dtype in (torch.float32, torch.float64):
        return torch.linalg.vecdot(g2, g2)
    return g2.to(_acc(g2.dtype)).pow(2).sum(1)
