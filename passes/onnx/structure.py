"""Graph structure the detectors need, in an ONNX graph: which layers have a parallel path
around them (the ONNX twin of ``passes/fx/structure.py``, same rule).

A layer is *bypassed* when some node downstream of it combines its output with a
floating-point value that depends on the data but does not pass through the layer: a residual
``Add`` around its block, a squeeze-excite or gate ``Mul``, a ``Concat`` with a parallel
branch, attention's ``MatMul`` of a key projection with its sibling query projection (one
key/value head of grouped-query attention is design, not a bottleneck). The data are the graph
inputs that are not initializers; constants (initializers, ``Constant`` nodes) are not data,
and a ``Shape``/``Size`` output carries no data (a ``Reshape`` to the input's own shape is not
a parallel path).

Ancestry is computed once per graph as Python-int bitsets (one bit per node and per graph
input), so the analysis is linear in the graph size times the number of layers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import onnx_ir as ir

#: ops whose output says something about their input's shape, not its values
_SHAPE_OPS = frozenset({"Shape", "Size"})


def bypassed_layers(graph: ir.Graph, layers: Mapping[str, ir.Node],
                    floating: Callable[[ir.Value], bool]) -> dict[str, bool]:
    """For each layer (name -> its node in ``graph``), whether a parallel path joins its
    output downstream (see the module docstring). ``floating(v)`` says a value may carry
    floating-point activations (True when its type is unknown)."""
    anc: dict[ir.Value, int] = {}
    bit_of: dict[ir.Node, int] = {}
    data_mask = 0
    initializers = set(graph.initializers.values())
    k = 0
    for v in graph.inputs:
        if v not in initializers:
            anc[v] = 1 << k
            data_mask |= 1 << k
            k += 1
    for n in graph:
        bit = 1 << k
        k += 1
        bit_of[n] = bit
        bits = bit
        if n.op_type not in _SHAPE_OPS:
            for i in n.inputs:
                if i is not None:
                    bits |= anc.get(i, 0)
        for o in n.outputs:
            anc[o] = bits
    out: dict[str, bool] = {}
    for name, node in layers.items():
        if node in bit_of:
            out[name] = _joined(node, bit_of[node], anc, data_mask, floating)
    return out


def _joined(layer: ir.Node, bit: int, anc: Mapping[ir.Value, int], data_mask: int,
            floating: Callable[[ir.Value], bool]) -> bool:
    seen: set[ir.Node] = set()
    frontier = [u for o in layer.outputs for u, _ in o.uses()]
    while frontier:
        u = frontier.pop()
        if u in seen:
            continue
        seen.add(u)
        if u.op_type not in _SHAPE_OPS and _has_outside_operand(u, bit, anc, data_mask,
                                                                  floating):
            return True
        frontier.extend(c for o in u.outputs for c, _ in o.uses())
    return False


def _has_outside_operand(node: ir.Node, bit: int, anc: Mapping[ir.Value, int], data_mask: int,
                         floating: Callable[[ir.Value], bool]) -> bool:
    args = [i for i in node.inputs if i is not None]
    if len(args) < 2:
        return False
    for a in args:
        bits = anc.get(a, 0)
        if not bits & bit and bits & data_mask and floating(a):
            return True
    return False


__all__ = ["bypassed_layers"]
