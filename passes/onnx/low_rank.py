"""``factor_low_rank``: split a MatMul/Gemm whose weight has numerical rank ``r << min(K, N)``.

Rewrites, with ``W = U S V^T`` truncated to its ``r`` leading singular values::

    MatMul(X, W)              -> MatMul(MatMul(X, U_r S_r^1/2), S_r^1/2 V_r^T)
    Gemm(X, B, C, transB=t)   -> Gemm(MatMul(X, U_r S_r^1/2), S_r^1/2 V_r^T, C, transB=0)

only where ``r (K + N) < K N`` (it saves FLOPs and parameters). The rank ``r`` is given by
the caller: the library's ``factor_low_rank`` replacement counts it with the one rank routine
(``graphsurg.detect.bottleneck.weight_ranks``), so the dropped singular values are below the
rank tolerance and the edit is exact up to it (``||W - W_r||_2 = sigma_{r+1}``, reported).
Conv weights are not factored (refused). The ONNX applier is :func:`factor_site` (one site at
a time); :class:`FactorLowRank` loops over a diagnosis' ``Bottleneck`` problems with
``reason="rank"`` and calls it with the rank the detector measured.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graphsurg._errors import Refused

from ._pass import GraphsurgPass, const_array, int_attr, new_initializer


@dataclass
class Factored:
    """What :func:`factor_site` did: a ``k x n`` weight (as ``X @ W``) split at ``rank``;
    ``dropped`` is the largest singular value left out (0 when none), ``sigma_max`` the
    largest."""

    node: str
    k: int
    n: int
    rank: int
    dropped: float
    sigma_max: float

    def note(self) -> str:
        return (f"{self.node}: {self.k}x{self.n} weight factored at rank {self.rank}; dropped "
                f"singular values <= {self.dropped:.3g} (sigma_max {self.sigma_max:.3g})")


def weight_of(model: ir.Model, node_name: str) -> np.ndarray:
    """The weight of MatMul/Gemm ``node_name`` as the ``k x n`` matrix ``X @ W`` multiplies
    by (a Gemm's ``transB`` undone).

    Raises:
        Refused: the node is missing, a Conv, or has no 2-D floating-point constant weight.
    """
    node = _node(model, node_name)
    return _oriented(node)[0]


def _node(model: ir.Model, node_name: str) -> ir.Node:
    node = next((n for n in model.graph if n.name == node_name), None)
    if node is None:
        raise Refused(f"node '{node_name}' is not in the model")
    if node.domain not in ("", "ai.onnx") or node.op_type not in ("MatMul", "Gemm"):
        raise Refused(f"'{node_name}' is a {node.op_type}: only MatMul/Gemm weights are "
                      "factored")
    return node


def _oriented(node: ir.Node) -> tuple[np.ndarray, np.ndarray]:
    """``(X @ W weight, stored array)`` of a MatMul/Gemm node."""
    site = node.name or node.op_type
    w = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if w is None or w.ndim != 2 or not np.issubdtype(w.dtype, np.floating):
        raise Refused(f"'{site}' has no 2-D floating-point constant weight")
    if node.op_type == "MatMul":
        if const_array(node.inputs[0]) is not None:
            raise Refused(f"MatMul '{site}' multiplies two constants")
        return w, w
    if int_attr(node, "transA", 0):
        raise Refused(f"Gemm '{site}' has transA=1")
    return (w.T if int_attr(node, "transB", 0) else w), w


def factor_site(model: ir.Model, node_name: str, rank: int) -> Factored:
    """Factor the weight of MatMul/Gemm ``node_name`` at ``rank`` (in place; see module doc).

    Raises:
        Refused: with the reason (not a MatMul/Gemm with a constant 2-D weight, rank 0, or two
            factors that would not be smaller than the weight).
    """
    node = _node(model, node_name)
    wk, w = _oriented(node)
    site = node.name or node.op_type
    k, n = wk.shape
    rank = int(rank)
    if rank <= 0:
        raise Refused(f"'{site}' weight is zero: nothing to factor")
    if rank * (k + n) >= k * n:
        raise Refused(f"rank {rank} of a {k}x{n} weight: two factors ({rank * (k + n)} "
                      f"weights) would not be smaller than one ({k * n})")
    u, sv, vt = np.linalg.svd(wk.astype(np.float64), full_matrices=False)
    root = np.sqrt(sv[:rank])
    a = (u[:, :rank] * root).astype(w.dtype)
    b = (root[:, None] * vt[:rank]).astype(w.dtype)
    graph = model.graph
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
    old = node.inputs[1]
    node.replace_input_with(1, new_initializer(graph, f"{base}_lowrank_b", b))
    if (old is not None and old.is_initializer() and not old.uses() and old.name
            and not old.is_graph_input() and not old.is_graph_output()):
        del graph.initializers[old.name]  # the full weight is gone, not left for cleanup
    return Factored(site, int(k), int(n), rank, float(sv[rank]) if rank < sv.size else 0.0,
                    float(sv[0]))


class FactorLowRank(GraphsurgPass):
    """Factor the MatMul/Gemm weights of the diagnosis' rank ``Bottleneck`` problems with
    :func:`factor_site`, at the rank the detector measured (see module doc)."""

    name = "factor_low_rank"
    exact = True

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if self.diagnosis is None:
            raise ValueError("factor_low_rank needs a diagnosis (run graphsurg.onnx.analyze)")
        for p in self.diagnosis.of_kind("Bottleneck"):
            if p.evidence.get("reason") != "rank":
                continue
            try:
                done = factor_site(model, p.site.module, int(p.evidence["rank"]))
            except Refused as e:
                self.refuse(p.site.address, str(e))
                continue
            self.rewrites += 1
            self.notes.append(done.note())
        return ir.passes.PassResult(model, self.rewrites > 0)
