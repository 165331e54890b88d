"""Function-preserving torch.fx rewrites used by the surgery library.

The rewrites are ``torch.fx`` passes (:class:`~torch.fx.passes.infra.pass_base.PassBase`:
``pass_(gm) -> PassResult(gm, modified)``, so a ``PassManager`` can run them):

* :class:`InsertBypass` -- ``x_{i+1} = g_i(x_i) + B(x_i)``: adds a skip module ``B`` around a
  block (a zero-gated projection is exact at surgery).
* :class:`ReplaceWithModule` -- swap a ``call_function``/``call_method`` activation
  (``F.relu``) for a module (``LeakyReLU``) at one site only.
* :class:`InsertAfter` -- put a module after a node (a norm layer on one value).

Each pass edits the GraphModule in place (callers work on a private copy), keeps
``node.meta`` of untouched nodes, gives the nodes it creates the ``val``, ``tensor_meta``,
``nn_module_stack`` (closed by the new module's own entry) and ``stack_trace`` of the value
they stand for, lints the graph (``ensures``) and recompiles. :func:`insert_bypass`,
:func:`replace_node_with_module` and :func:`insert_after` run one pass and return the new
submodule's name.

Queries used by the library and the planner:

* :func:`block_bounds` -- the block of a parametrised layer: from its input node to the end of
  the channel-local chain after it (activation, dropout, BatchNorm).
* :func:`extract_block` -- a standalone GraphModule computing a block from its input (for
  the planner's Jacobian probe).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

__all__ = [
    "InsertAfter",
    "InsertBypass",
    "ReplaceWithModule",
    "RewriteError",
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


_COPIED_META = ("tensor_meta", "val", "nn_module_stack", "stack_trace")


def _copy_meta(src: fx.Node, dst: fx.Node, module: tuple[str, nn.Module] | None = None) -> None:
    """Give ``dst`` (a node computing a value of ``src``'s shape) ``src``'s ``val``,
    ``tensor_meta``, ``nn_module_stack`` and ``stack_trace``; with ``module`` =
    ``(path, module)`` for a new ``call_module`` node, its entry closes the module stack."""
    for key in _COPIED_META:
        if key in src.meta:
            dst.meta[key] = src.meta[key]
    stack = src.meta.get("nn_module_stack")
    if module is not None and isinstance(stack, dict):
        path, mod = module
        cls = type(mod)
        # torch.export writes the type as a qualified name, Dynamo as the class itself
        typ: Any = cls
        if any(isinstance(v, tuple) and len(v) == 2 and isinstance(v[1], str)
               for v in stack.values()):
            typ = f"{cls.__module__}.{cls.__qualname__}"
        dst.meta["nn_module_stack"] = {**stack, path: (path, typ)}


def _node(gm: fx.GraphModule, ref: fx.Node | str) -> fx.Node:
    """``ref`` as a node of ``gm`` (a node object of this graph, or a node name)."""
    if isinstance(ref, fx.Node):
        if ref.graph is not gm.graph:
            raise RewriteError(f"node {ref.name!r} belongs to another graph")
        return ref
    for n in gm.graph.nodes:
        if n.name == ref:
            return n
    raise RewriteError(f"the graph has no node {ref!r}")


class _ModulePass(PassBase):
    """An in-place rewrite that adds one submodule; :attr:`submodule` is its name on the
    GraphModule after :meth:`call` (a fresh name derived from the requested one)."""

    def __init__(self, module: nn.Module, name: str) -> None:
        self.module = module
        self.name = name
        self.submodule: str | None = None

    def _add(self, gm: fx.GraphModule) -> str:
        self.submodule = unique_name(gm, self.name)
        gm.add_submodule(self.submodule, self.module)
        return self.submodule

    def ensures(self, graph_module: fx.GraphModule) -> None:
        graph_module.graph.lint()


class InsertBypass(_ModulePass):
    """``end + module(x)``: a skip module ``B`` around the block ``x -> end``
    (``x_{i+1} = g_i(x_i) + B(x_i)``); every user of ``end`` reads the sum. A zero-gated ``B``
    is exact at surgery. In place; returns ``PassResult(gm, True)``."""

    def __init__(self, x: fx.Node | str, end: fx.Node | str, module: nn.Module,
                 name: str) -> None:
        super().__init__(module, name)
        self.x, self.end = x, end

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        gm = graph_module
        x, end = _node(gm, self.x), _node(gm, self.end)
        name = self._add(gm)
        with gm.graph.inserting_after(end):
            skip = gm.graph.call_module(name, (x,))
        with gm.graph.inserting_after(skip):
            out = gm.graph.call_function(operator.add, (end, skip))
        _copy_meta(end, skip, (name, self.module))
        _copy_meta(end, out)
        end.replace_all_uses_with(out, delete_user_cb=lambda u: u is not out)
        gm.recompile()
        return PassResult(gm, True)


class ReplaceWithModule(_ModulePass):
    """Replace a single-input node (``F.relu``) by ``call_module(module)`` on the same input
    (``LeakyReLU``), at this site only. In place; returns ``PassResult(gm, True)``."""

    def __init__(self, node: fx.Node | str, module: nn.Module, name: str) -> None:
        super().__init__(module, name)
        self.node = node

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        gm = graph_module
        node = _node(gm, self.node)
        if len(node.all_input_nodes) != 1:
            raise RewriteError(f"node {node.name!r} has {len(node.all_input_nodes)} tensor "
                               "inputs")
        name = self._add(gm)
        with gm.graph.inserting_after(node):
            new = gm.graph.call_module(name, (node.all_input_nodes[0],))
        _copy_meta(node, new, (name, self.module))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        gm.recompile()
        return PassResult(gm, True)


class InsertAfter(_ModulePass):
    """``call_module(module)`` on ``node``'s value (a shape-preserving module such as a norm
    layer); every other user of ``node`` reads its output. In place; returns
    ``PassResult(gm, True)``."""

    def __init__(self, node: fx.Node | str, module: nn.Module, name: str) -> None:
        super().__init__(module, name)
        self.node = node

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        gm = graph_module
        node = _node(gm, self.node)
        name = self._add(gm)
        with gm.graph.inserting_after(node):
            new = gm.graph.call_module(name, (node,))
        _copy_meta(node, new, (name, self.module))
        node.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)
        gm.recompile()
        return PassResult(gm, True)


def _run(p: _ModulePass, gm: fx.GraphModule) -> str:
    p(gm)
    assert p.submodule is not None
    return p.submodule


def insert_bypass(gm: fx.GraphModule, x: fx.Node, end: fx.Node, module: nn.Module,
                  name: str) -> str:
    """:class:`InsertBypass` on ``gm`` in place; returns the new submodule's name."""
    return _run(InsertBypass(x, end, module, name), gm)


def replace_node_with_module(gm: fx.GraphModule, node: fx.Node, module: nn.Module,
                             name: str) -> str:
    """:class:`ReplaceWithModule` on ``gm`` in place; returns the new submodule's name."""
    return _run(ReplaceWithModule(node, module, name), gm)


def insert_after(gm: fx.GraphModule, node: fx.Node, module: nn.Module, name: str) -> str:
    """:class:`InsertAfter` on ``gm`` in place; returns the new submodule's name."""
    return _run(InsertAfter(node, module, name), gm)


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


# --------------------------------------------------------------------------------------------
# surgery on the module tree, with a torch.export graph as the map (models symbolic_trace
# cannot capture: every Hugging Face model). The edits are forward hooks on the user's own
# modules, with the new module registered as a child of the hooked one: the result is an
# ordinary nn.Module, every existing parameter keeps its name, and deepcopy / state_dict /
# torch.export see the new modules.

#: aten ops that act on each unit alone (the block of a layer runs through them)
_LOCAL_ATEN = {
    "relu", "relu_", "gelu", "gelu_", "silu", "silu_", "sigmoid", "tanh", "hardtanh",
    "hardtanh_", "leaky_relu", "leaky_relu_", "elu", "selu", "celu", "softplus", "mish",
    "hardswish", "hardsigmoid", "relu6", "dropout", "dropout_", "feature_dropout", "clone",
    "batch_norm", "_native_batch_norm_legit_no_training", "alias", "detach", "_to_copy",
}


def node_owner(node: fx.Node) -> str:
    """The innermost module path of a node of an exported graph ('' for the root)."""
    stack = node.meta.get("nn_module_stack")
    if not isinstance(stack, dict) or not stack:
        return ""
    path = str(list(stack.values())[-1][0])
    return path.split("@", 1)[0]


def _aten_name(node: fx.Node) -> str:
    t = node.target
    if t is operator.getitem:
        return "getitem"
    return str(getattr(t, "_opname", getattr(t, "__name__", t)))


def _within(owner: str, path: str) -> bool:
    return owner == path or owner.startswith(path + ".")


def exported_block(gm: fx.GraphModule, path: str) -> tuple[str, list[str]]:
    """``(end, modules)`` of the block of layer ``path`` in an exported graph: the module whose
    output ends the block (the layer itself, or the last channel-local module after it:
    activation, dropout, BatchNorm) and the modules of the block in forward order.

    The block follows the layer's single-user chain of unit-wise aten ops and ends at the last
    node that is the whole output of a module made of that chain alone (a functional
    activation inside a bigger module's forward cannot be bracketed by hooks, so the block
    stops before it). Raises :class:`RewriteError` when the layer is not called exactly once.
    """
    own = [n for n in gm.graph.nodes if n.op == "call_function" and node_owner(n) == path]
    outs = [n for n in own if any(node_owner(u) != path for u in n.users)]
    if not outs:
        raise RewriteError(f"module {path!r} is not called in the exported graph")
    if len(outs) != 1:
        raise RewriteError(f"module {path!r} is called {len(outs)} times in the exported graph "
                           "(need exactly one)")
    end, chain = outs[0], {n for n in own}
    best, modules = path, [path]
    node = end
    while len(node.users) == 1:
        nxt = next(iter(node.users))
        name = _aten_name(nxt)
        if nxt.op != "call_function" or not nxt.args or nxt.args[0] is not node:
            break
        if name == "getitem" and nxt.args[1] != 0:
            break
        if name not in _LOCAL_ATEN and name != "getitem":
            break
        chain.add(nxt)
        node = nxt
        owner = node_owner(node)
        closes = owner and all(not _within(node_owner(u), owner) for u in node.users)
        pure = all(n in chain for n in gm.graph.nodes
                   if n.op == "call_function" and _within(node_owner(n), owner))
        if closes and pure and not _within(path, owner):
            best = owner
            if owner not in modules:
                modules.append(owner)
    return best, modules


class SkipHooks:
    """Forward hooks adding ``branch(x)`` to a block's output, ``x`` the block's input: a
    pre-hook on the block's first module remembers its input, a hook on the block's last
    module adds ``branch(x)`` to its output (``x_{i+1} = g_i(x_i) + B(x_i)``)."""

    def __init__(self, branch: nn.Module) -> None:
        self.branch = branch
        self.x: torch.Tensor | None = None

    def remember(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self.x = args[0]

    def add(self, module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
        x, self.x = self.x, None
        if x is None:
            raise RuntimeError("graphsurg skip path: the block's end ran before its start")
        return out + self.branch(x)


class ThenHook:
    """A forward hook running ``module`` on the hooked module's output."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, hooked: nn.Module, args: tuple[Any, ...], out: torch.Tensor
                 ) -> torch.Tensor:
        return self.module(out)


def _child_name(parent: nn.Module, base: str) -> str:
    base = base.replace(".", "_")
    name, i = base, 1
    while hasattr(parent, name):
        name, i = f"{base}_{i}", i + 1
    return name


def attach_after(model: nn.Module, path: str, module: nn.Module, name: str) -> str:
    """Run ``module`` on the output of the module at ``path`` (in place on ``model``); the
    new module becomes a child of that module. Returns its path."""
    host = model.get_submodule(path)
    child = _child_name(host, name)
    host.add_module(child, module)
    host.register_forward_hook(ThenHook(module))
    return f"{path}.{child}" if path else child


def attach_skip(model: nn.Module, start: str, end: str, branch: nn.Module, name: str) -> str:
    """``end``'s output + ``branch(start's input)`` (in place on ``model``); ``branch``
    becomes a child of the module at ``end``. Returns its path."""
    first, last = model.get_submodule(start), model.get_submodule(end)
    child = _child_name(last, name)
    last.add_module(child, branch)
    hooks = SkipHooks(branch)
    first.register_forward_pre_hook(hooks.remember)
    last.register_forward_hook(hooks.add)
    return f"{end}.{child}" if end else child
