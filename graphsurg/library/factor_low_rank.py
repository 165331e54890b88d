"""FactorLowRank (layer scale): split an exactly rank-deficient weight into two thin ones.

A weight ``W`` (``d_out x d_in``) whose numerical rank ``r`` (singular values above the rank
tolerance, counted by the one rank routine :func:`graphsurg.detect.bottleneck.weight_ranks`)
satisfies ``r (d_in + d_out) < d_in d_out`` is replaced by ``W = A B`` with
``A = U_r S_r^1/2`` and ``B = S_r^1/2 V_r^T``:

* torch: ``Linear(d_in, d_out)`` -> ``Sequential(Linear(d_in, r, bias=False), Linear(r,
  d_out))`` (the bias moves to the second layer);
* ONNX: ``MatMul/Gemm(X, W)`` -> ``MatMul/Gemm(MatMul(X, A), B)``
  (:func:`graphsurg.passes.onnx.low_rank.factor_site`).

Exact up to the rank tolerance: the dropped singular values are below it, so
``||W - A B||_2 = sigma_{r+1} <= rtol x sigma_max`` (reported in the details). The model gets
smaller and faster. It treats ``Bottleneck`` problems with ``reason="rank"`` only; a narrow
layer is widened instead (:class:`graphsurg.library.Widen`). Conv weights are refused.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from .._problems import Problem
from ..detect.bottleneck import weight_ranks
from ._base import Applied, Refused, Replacement


def _rank(w: torch.Tensor, rtol: float | None) -> int:
    rank, _, _ = weight_ranks(w, rtol)
    return rank


def _smaller(rank: int, d_in: int, d_out: int, where: str) -> None:
    if rank <= 0:
        raise Refused(f"{where}: the weight is zero, nothing to factor")
    if rank * (d_in + d_out) >= d_in * d_out:
        raise Refused(f"{where}: rank {rank} of a {d_out}x{d_in} weight; two factors "
                      f"({rank * (d_in + d_out)} weights) would not be smaller than one "
                      f"({d_in * d_out})")


class FactorLowRank(Replacement):
    """Split an exactly rank-deficient Linear/MatMul/Gemm weight into two thin factors
    (exact up to the rank tolerance)."""

    name = "factor_low_rank"
    treats = ("Bottleneck",)
    reasons = {"Bottleneck": ("rank",)}
    scales = ("layer",)
    guarantee = "exact"
    priority = 10
    renumbers_units = True  # the layer becomes two: other edits' paths no longer hold

    def _torch_layer(self, target: Any, path: str) -> nn.Linear:
        try:
            m = target.model.get_submodule(path)
        except AttributeError:
            raise Refused(f"the model has no module {path!r} (the site is gone)") from None
        if not isinstance(m, nn.Linear):
            raise Refused(f"{path!r} is a {type(m).__name__}: only Linear weights are "
                          "factored")
        return m

    def _site_rank(self, problem: Problem, target: Any, rtol: float | None
                   ) -> tuple[int, int, int]:
        """``(rank, d_in, d_out)`` of the site's weight, refusing when factoring would not
        make it smaller."""
        path = problem.site.module
        if target.ir == "onnx":
            from ..passes.onnx.low_rank import weight_of

            wk = weight_of(target.model, path)  # k x n, as X @ W
            w = torch.from_numpy(np.array(wk.T, dtype=np.float32))  # a writable copy
        else:
            w = self._torch_layer(target, path).weight.detach()
        d_out, d_in = int(w.shape[0]), int(w.shape[1])
        rank = _rank(w, rtol)
        _smaller(rank, d_in, d_out, repr(path))
        return rank, d_in, d_out

    def check(self, problem: Problem, target: Any) -> str | None:
        why = super().check(problem, target)
        if why:
            return why
        try:
            self._site_rank(problem, target, problem.evidence.get("rtol"))
        except Refused as e:
            return str(e)
        return None

    def propose(self, problem: Problem, target: Any, *, exact: bool = False
                ) -> dict[str, Any]:
        rtol = problem.evidence.get("rtol")
        rank, _, _ = self._site_rank(problem, target, rtol)
        return {"rank": rank, "rtol": rtol, "exact": True}

    def apply_torch(self, target: Any, problem: Problem, params: dict[str, Any]) -> Applied:
        """``Linear`` -> ``Sequential(Linear(d_in, r, bias=False), Linear(r, d_out))``."""
        path = problem.site.module
        layer = self._torch_layer(target, path)
        w = layer.weight.detach()
        rank, d_in, d_out = self._site_rank(problem, target, params.get("rtol"))
        if params.get("rank") is not None and int(params["rank"]) != rank:
            raise Refused(f"{path!r}: the planned rank {params['rank']} is not the weight's "
                          f"rank {rank} now; plan again")
        u, s, vh = torch.linalg.svd(w.to(torch.float64), full_matrices=False)
        root = s[:rank].sqrt()
        first = nn.Linear(d_in, rank, bias=False, device=w.device, dtype=w.dtype)
        second = nn.Linear(rank, d_out, bias=layer.bias is not None, device=w.device,
                           dtype=w.dtype)
        with torch.no_grad():
            first.weight.copy_((root[:, None] * vh[:rank]).to(w.dtype))
            second.weight.copy_((u[:, :rank] * root).to(w.dtype))
            if layer.bias is not None:
                second.bias.copy_(layer.bias.detach())
        new = nn.Sequential(first, second)
        target.replace_module(path, new)
        dropped = float(s[rank]) if rank < s.numel() else 0.0
        applied = Applied(exact=True, modules=[f"{path}.0", f"{path}.1"],
                          new_parameters=[f"{path}.{n}" for n, _ in new.named_parameters()])
        applied.details.update({"rank": rank, "d_in": d_in, "d_out": d_out,
                                "params_before": d_in * d_out, "params_after":
                                rank * (d_in + d_out), "dropped_sigma": dropped,
                                "sigma_max": float(s[0])})
        return applied

    def apply_onnx(self, target: Any, problem: Problem, params: dict[str, Any]) -> Applied:
        """``MatMul/Gemm(X, W)`` -> ``MatMul/Gemm(MatMul(X, A), B)``."""
        from ..passes.onnx.low_rank import factor_site

        rank, d_in, d_out = self._site_rank(problem, target, params.get("rtol"))
        done = factor_site(target.model, problem.site.module, rank)
        return Applied(exact=True, modules=[problem.site.module],
                       details={"rank": rank, "d_in": d_in, "d_out": d_out,
                                "params_before": d_in * d_out,
                                "params_after": rank * (d_in + d_out),
                                "dropped_sigma": done.dropped, "sigma_max": done.sigma_max,
                                "note": done.note()})
