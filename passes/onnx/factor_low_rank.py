"""``factor_low_rank``: split a MatMul/Gemm whose weight has numerical rank ``r << min(K, N)``.

Rewrites, with ``W = U S V^T`` truncated to the singular values ``> rtol x sigma_max``::

    MatMul(X, W)              -> MatMul(MatMul(X, U_r S_r^1/2), S_r^1/2 V_r^T)
    Gemm(X, B, C, transB=t)   -> Gemm(MatMul(X, U_r S_r^1/2), S_r^1/2 V_r^T, C, transB=0)

only where ``r (K + N) < K N`` (it saves FLOPs and parameters). Exact up to the SVD tolerance:
the dropped singular values are ``<= rtol x sigma_max``, so ``||W - W_r||_2 <= rtol x
||W||_2``; the notes state the bound per layer. Conv weights are not factored (refused).
Targets are the ``Bottleneck`` problems of the diagnosis, or every MatMul/Gemm weight when
the pass is given no diagnosis.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphsurg._problems import Diagnosis

from ._base import GraphsurgPass, PassState, const_array, int_attr, new_initializer
from .calibration import numerical_rank


class FactorLowRank(GraphsurgPass):
    """Factor low-rank MatMul/Gemm weights (see module doc)."""

    name = "factor_low_rank"
    exact = True
    needs_diagnosis = False

    def __init__(
        self,
        diagnosis: Diagnosis | None = None,
        state: PassState | None = None,
        *,
        rtol: float | None = None,
    ) -> None:
        super().__init__(diagnosis, state)
        self.rtol = rtol

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        targets: dict[str, float | None] | None = None
        if self.diagnosis is not None:
            targets = {}
            for p in self.diagnosis.of_kind("Bottleneck"):
                targets[p.site.module] = p.evidence.get("rtol")
        for node in list(graph):
            if node.op_type not in ("MatMul", "Gemm", "Conv") or node.domain not in ("", "ai.onnx"):
                continue
            if targets is not None and node.name not in targets:
                continue
            site = node.name or node.op_type
            if node.op_type == "Conv":
                if targets is not None:
                    self.refuse(site, f"Conv '{site}' weights are not factored (MatMul/Gemm only)")
                continue
            rtol = self.rtol if self.rtol is not None else (targets or {}).get(node.name or "")
            self._factor(graph, node, site, rtol)
        return ir.passes.PassResult(model, self.rewrites > 0)

    def _factor(self, graph: ir.Graph, node: ir.Node, site: str, rtol: float | None) -> None:
        w = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
        if w is None or w.ndim != 2 or not np.issubdtype(w.dtype, np.floating):
            self.refuse(site, f"'{site}' has no 2-D floating-point constant weight")
            return
        if node.op_type == "MatMul" and const_array(node.inputs[0]) is not None:
            self.refuse(site, f"MatMul '{site}' multiplies two constants")
            return
        if node.op_type == "Gemm":
            if int_attr(node, "transA", 0):
                self.refuse(site, f"Gemm '{site}' has transA=1")
                return
            wk = w.T if int_attr(node, "transB", 0) else w
        else:
            wk = w
        k, n = wk.shape
        rank, s, tol = numerical_rank(wk, rtol)
        if rank == 0:
            self.refuse(site, f"'{site}' weight is zero: nothing to factor")
            return
        if rank * (k + n) >= k * n:
            self.refuse(
                site,
                f"rank {rank} of a {k}x{n} weight: two factors ({rank * (k + n)} weights) would "
                f"not be smaller than one ({k * n})",
            )
            return
        u, sv, vt = np.linalg.svd(wk.astype(np.float64), full_matrices=False)
        root = np.sqrt(sv[:rank])
        a = (u[:, :rank] * root).astype(w.dtype)
        b = (root[:, None] * vt[:rank]).astype(w.dtype)
        dropped = float(s[rank]) if rank < s.size else 0.0
        x = node.inputs[0]
        assert x is not None
        base = node.name or node.op_type
        a_v = new_initializer(graph, f"{base}_lowrank_a", a)
        mid = ir.Node("", "MatMul", [x, a_v], name=f"{base}_lowrank", num_outputs=1)
        mid.outputs[0].name = f"{base}_lowrank_out"
        if x.type is not None:
            mid.outputs[0].type = x.type
        graph.insert_before(node, mid)
        node.replace_input_with(0, mid.outputs[0])
        if node.op_type == "Gemm":
            # alpha and beta keep their meaning: B_r is the factor of op(B)
            node.attributes["transB"] = ir.AttrInt64("transB", 0)
        b_v = new_initializer(graph, f"{base}_lowrank_b", b)
        node.replace_input_with(1, b_v)
        self.rewrites += 1
        self.notes.append(
            f"{site}: {k}x{n} weight factored at rank {rank}; dropped singular values <= "
            f"{dropped:.3g} (rtol {tol:.3g} x sigma_max {float(s[0]):.3g})"
        )
