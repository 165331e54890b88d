"""Graph structure the detectors need: which layers have a parallel path around them.

A layer is *bypassed* when some node downstream of it combines its output with a
floating-point value that depends on the data but does not pass through the layer: a residual
add around its block, a squeeze-excite or gate multiply, a concatenation with a parallel branch,
attention combining a key projection with its sibling query projection. The detectors read
design from this (``graphsurg.detect.bottleneck`` and ``graphsurg.detect.gradients``): a narrow
layer that information can flow around loses nothing, and a small gradient in a branch that a
residual path bypasses does not stop gradients reaching earlier layers.

Ancestry is computed once per graph as Python-int bitsets, so the whole analysis is linear in
the graph size times the number of layers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.fx as fx


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    out: list[fx.Node] = []
    for a in (*node.args, *node.kwargs.values()):
        items = a if isinstance(a, (list, tuple)) else (a,)
        out.extend(x for x in items if isinstance(x, fx.Node))
    return out


def _floating(node: fx.Node) -> bool:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return val.is_floating_point()
    return val is None  # unknown (symbolic_trace): assume it may carry activations


def bypassed_layers(gm: fx.GraphModule, layer_nodes: Mapping[str, str]) -> dict[str, bool]:
    """For each layer (module path -> its graph node's name), whether a parallel path joins
    its output downstream (see the module docstring). Graph inputs (``placeholder``) are the
    data; ``get_attr`` nodes (parameters, buffers, constants) are not."""
    nodes = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    anc: dict[fx.Node, int] = {}
    data_mask = 0
    for n in nodes:
        bits = 1 << index[n]
        for a in _tensor_args(n):
            bits |= anc.get(a, 0)
        anc[n] = bits
        if n.op == "placeholder":
            data_mask |= 1 << index[n]
    by_name = {n.name: n for n in nodes}
    out: dict[str, bool] = {}
    for path, name in layer_nodes.items():
        node = by_name.get(name)
        if node is None:
            continue
        out[path] = _joined(node, index[node], anc, data_mask)
    return out


def _joined(layer: fx.Node, bit_index: int, anc: Mapping[fx.Node, int], data_mask: int) -> bool:
    bit = 1 << bit_index
    seen: set[fx.Node] = set()
    frontier: list[fx.Node] = list(layer.users)
    while frontier:
        u = frontier.pop()
        if u in seen or u.op == "output":
            continue
        seen.add(u)
        if _has_outside_operand(u, bit, anc, data_mask):
            return True
        frontier.extend(u.users)
    return False


def _has_outside_operand(node: fx.Node, bit: int, anc: Mapping[fx.Node, int],
                         data_mask: int) -> bool:
    args = _tensor_args(node)
    if len(args) < 2:
        return False
    for a in args:
        bits = anc.get(a, 0)
        if not bits & bit and bits & data_mask and _floating(a):
            return True
    return False


def layer_nodes_of(layer_sites: Iterable[object]) -> dict[str, str]:
    """``{module: node}`` of :class:`passes.fx.capture.LayerSite` objects."""
    return {str(ls.module): str(ls.node) for ls in layer_sites}  # type: ignore[attr-defined]


__all__ = ["bypassed_layers", "layer_nodes_of"]
