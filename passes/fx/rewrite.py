"""Function-preserving torch.fx rewrites used by the surgery library.

* :func:`block_bounds` -- the block of a parametrised layer: from its input node to the end of
  the channel-local chain after it (activation, dropout, BatchNorm).
* :func:`insert_bypass` -- ``x_{i+1} = g_i(x_i) + B(x_i)``: adds a skip module ``B`` around a
  block (a zero-gated projection is exact at surgery).
* :func:`replace_node_with_module` -- swap a ``call_function``/``call_method`` activation
  (``F.relu``) for a module (``LeakyReLU``) at one site only.
* :func:`insert_after` -- put a module after a node (a norm layer on one value).
* :func:`extract_block` -- a standalone GraphModule computing a block from its input (for
  the planner's Jacobian probe).

Every function edits the GraphModule in place, keeps ``node.meta`` of untouched nodes, copies
``tensor_meta`` and ``nn_module_stack`` onto the nodes it creates when it can, lints the
graph and recompiles. Callers work on a private copy.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx, nn

__all__ = [
    "block_bounds",
    "extract_block",
    "insert_after",
    "insert_bypass",
    "module_node",
    "replace_node_with_module",
    "unique_name",
]

_LOCAL_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.GELU, nn.Sigmoid, nn.Tanh, nn.SiLU, nn.ELU,
    nn.SELU, nn.CELU, nn.Softplus, nn.Hardtanh, nn.Hardswish, nn.Mish, nn.Identity, nn.Dropout,
    nn.Dropout1d, nn.Dropout2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
)
_F = torch.nn.functional
_LOCAL_FUNCS: set[Any] = {
    _F.relu, _F.relu6, _F.leaky_relu, _F.gelu, _F.silu, _F.elu, _F.selu, _F.softplus,
    _F.hardtanh, _F.mish, _F.dropout, _F.sigmoid, _F.tanh, torch.relu, torch.sigmoid,
    torch.tanh,
}
_LOCAL_METHODS = {"relu", "sigmoid", "tanh"}


class RewriteError(ValueError):
    """A rewrite cannot be done on this graph; the message says why."""


def module_node(gm: fx.GraphModule, path: str) -> fx.Node:
    """The single ``call_module`` node of ``path``."""
    nodes = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == path]
    if len(nodes) != 1:
        raise RewriteError(f"module {path!r} is called {len(nodes)} times in the graph "
                           "(need exactly one)")
    return nodes[0]


def _is_local(gm: fx.GraphModule, n: fx.Node) -> bool:
    if n.op == "call_module":
        return isinstance(gm.get_submodule(str(n.target)), _LOCAL_MODULES)
    if n.op == "call_function":
        return n.target in _LOCAL_FUNCS
    if n.op == "call_method":
        return n.target in _LOCAL_METHODS
    return False


def block_bounds(gm: fx.GraphModule, path: str) -> tuple[fx.Node, fx.Node]:
    """``(input, end)`` of the block of layer ``path``: the layer's input node, and the last
    node of the single-user channel-local chain that follows it."""
    node = module_node(gm, path)
    if not node.args or not isinstance(node.args[0], fx.Node):
        raise RewriteError(f"layer {path!r} has no tensor input node")
    x = node.args[0]
    end = node
    while len(end.users) == 1:
        nxt = next(iter(end.users))
        if not _is_local(gm, nxt) or len(nxt.all_input_nodes) != 1:
            break
        end = nxt
    return x, end


def unique_name(gm: fx.GraphModule, base: str) -> str:
    """A submodule name not yet used on ``gm``."""
    base = base.replace(".", "_")
    name, i = base, 1
    while hasattr(gm, name):
        name, i = f"{base}_{i}", i + 1
    return name


def _copy_meta(src: fx.Node, dst: fx.Node) -> None:
    for key in ("tensor_meta", "val", "nn_module_stack", "stack_trace"):
        if key in src.meta:
            dst.meta[key] = src.meta[key]


def insert_bypass(gm: fx.GraphModule, x: fx.Node, end: fx.Node, module: nn.Module,
                  name: str) -> str:
    """Add ``end + module(x)`` and route every user of ``end`` to it. Returns the submodule
    name."""
    name = unique_name(gm, name)
    gm.add_submodule(name, module)
    with gm.graph.inserting_after(end):
        skip = gm.graph.call_module(name, (x,))
    with gm.graph.inserting_after(skip):
        out = gm.graph.call_function(operator.add, (end, skip))
    _copy_meta(end, skip)
    _copy_meta(end, out)
    end.replace_all_uses_with(out, delete_user_cb=lambda u: u is not out)
    gm.graph.lint()
    gm.recompile()
    return name


def replace_node_with_module(gm: fx.GraphModule, node: fx.Node, module: nn.Module,
                             name: str) -> str:
    """Replace a single-input node by ``call_module(module)`` on the same input."""
    if len(node.all_input_nodes) != 1:
        raise RewriteError(f"node {node.name!r} has {len(node.all_input_nodes)} tensor inputs")
    name = unique_name(gm, name)
    gm.add_submodule(name, module)
    with gm.graph.inserting_after(node):
        new = gm.graph.call_module(name, (node.all_input_nodes[0],))
    _copy_meta(node, new)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return name


def insert_after(gm: fx.GraphModule, node: fx.Node, module: nn.Module, name: str) -> str:
    """Insert ``call_module(module)`` on ``node``'s value and route its users through it."""
    name = unique_name(gm, name)
    gm.add_submodule(name, module)
    with gm.graph.inserting_after(node):
        new = gm.graph.call_module(name, (node,))
    _copy_meta(node, new)
    node.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)
    gm.graph.lint()
    gm.recompile()
    return name


def extract_block(gm: fx.GraphModule, x: fx.Node, end: fx.Node) -> fx.GraphModule:
    """A GraphModule ``f(x) -> end`` holding the nodes between ``x`` and ``end``.

    Raises :class:`RewriteError` if the block reads any other value of the graph (besides
    parameters and constants): then it is not a function of ``x`` alone.
    """
    # nodes on a path x -> end
    down: set[fx.Node] = set()
    order = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(order)}
    for n in order[pos[x]:pos[end] + 1]:
        if n is x or any(a in down for a in n.all_input_nodes):
            down.add(n)
    if end not in down:
        raise RewriteError(f"{end.name!r} does not depend on {x.name!r}")
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {x: g.placeholder("x")}
    for n in order[pos[x] + 1:pos[end] + 1]:
        if n not in down:
            continue
        for a in n.all_input_nodes:
            if a not in env:
                if a.op == "get_attr":
                    env[a] = g.node_copy(a, lambda m: env[m])
                else:
                    raise RewriteError(f"the block {x.name!r} -> {end.name!r} also reads "
                                       f"{a.name!r}")
        env[n] = g.node_copy(n, lambda m: env[m])
    g.output(env[end])
    return fx.GraphModule(gm, g)
