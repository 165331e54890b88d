"""Lift ``aten.linear`` / ``aten.conv*`` calls back into ``nn.Linear`` / ``nn.Conv*`` modules.

A module loaded from a ``torch.export`` archive (``torch.export.load(path).module()``) is a
GraphModule whose layers are aten calls on ``get_attr`` parameters held by plain
``nn.Module`` containers: the layer *types* are gone. Surgery edits Linear/Conv layers, so
this pass restores them (and turns parameter-free aten activations back into the torch
functions they came from): each ``aten.linear(x, get_attr(p.weight), get_attr(p.bias))`` whose
container ``p`` holds exactly that weight (and bias) and nothing else becomes
``call_module(p)(x)`` with ``p`` an ``nn.Linear`` owning the *same* parameter tensors
(likewise conv1d/2d/3d with their stride, padding, dilation and groups). The function is
unchanged; anything else -- a weight used twice, a container holding more -- is left as it
was. Works out of place: the input module is not modified. :class:`LiftModules` is the
same lift as a ``torch.fx`` pass (``PassResult(graph_module, modified)``).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult
from torch.nn import functional as F

aten = torch.ops.aten

_CONV = {
    aten.conv1d.default: nn.Conv1d,
    aten.conv2d.default: nn.Conv2d,
    aten.conv3d.default: nn.Conv3d,
}


# parameter-free aten activations -> the torch functions graph rewrites and the coupling
# analysis understand (argument lists are compatible)
_FUNCS: dict[Any, Any] = {
    aten.relu.default: F.relu,
    aten.gelu.default: F.gelu,
    aten.silu.default: F.silu,
    aten.leaky_relu.default: F.leaky_relu,
    aten.sigmoid.default: torch.sigmoid,
    aten.tanh.default: torch.tanh,
}


def _param_node(a: Any) -> str | None:
    return str(a.target) if isinstance(a, fx.Node) and a.op == "get_attr" else None


class LiftModules(PassBase):
    """The lift as a ``torch.fx`` pass, out of place: ``LiftModules()(gm)`` returns
    ``PassResult(copy, modified)``; ``gm`` is not modified. :attr:`lifted` holds the module
    paths restored by the last call. Lifted ``call_module`` nodes keep the aten call's
    ``node.meta`` (``val``, ``nn_module_stack``, ``source_fn_stack``, ...)."""

    def __init__(self) -> None:
        self.lifted: list[str] = []

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        gm, self.lifted, modified = _lift(graph_module)
        return PassResult(gm, modified)


def lift_modules(gm: fx.GraphModule) -> tuple[fx.GraphModule, list[str]]:
    """Return a copy of ``gm`` with Linear/Conv modules restored, and their paths."""
    p = LiftModules()
    result = p(gm)
    assert result is not None
    return result.graph_module, p.lifted


def _lift(gm: fx.GraphModule) -> tuple[fx.GraphModule, list[str], bool]:
    gm = copy.deepcopy(gm)
    modified = False
    uses: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            uses[str(n.target)] = uses.get(str(n.target), 0) + len(n.users)
    lifted: list[str] = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in _FUNCS:
            node.target = _FUNCS[node.target]
            modified = True
            continue
        if node.target is aten.linear.default:
            cls: type[nn.Module] | None = nn.Linear
        else:
            cls = _CONV.get(node.target)
        if cls is None or node.kwargs:
            continue
        w_t = _param_node(node.args[1]) if len(node.args) > 1 else None
        b_arg = node.args[2] if len(node.args) > 2 else None
        b_t = _param_node(b_arg)
        if w_t is None or "." not in w_t or (b_arg is not None and b_t is None):
            continue
        path, leaf = w_t.rsplit(".", 1)
        if leaf != "weight" or (b_t is not None and b_t != f"{path}.bias"):
            continue
        if uses.get(w_t, 0) != 1 or (b_t is not None and uses.get(b_t, 0) != 1):
            continue
        try:
            holder = gm.get_submodule(path)
        except AttributeError:
            continue
        own = dict(holder.named_parameters(recurse=False))
        if (type(holder) is not nn.Module or any(True for _ in holder.children())
                or set(own) != ({"weight", "bias"} if b_t else {"weight"})
                or list(holder.buffers(recurse=False))):
            continue
        weight = own["weight"]
        new = _make(cls, node, weight, own.get("bias"))
        if new is None:
            continue
        parent_path, _, name = path.rpartition(".")
        parent = gm.get_submodule(parent_path) if parent_path else gm
        new.train(holder.training)
        setattr(parent, name, new)
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(path, (node.args[0],))
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
        lifted.append(path)
    for n in list(gm.graph.nodes):
        if n.op == "get_attr" and not n.users:
            gm.graph.erase_node(n)
            modified = True
    gm.graph.lint()
    gm.recompile()
    return gm, lifted, modified or bool(lifted)


def _make(cls: type[nn.Module], node: fx.Node, weight: torch.Tensor,
          bias: torch.Tensor | None) -> nn.Module | None:
    if cls is nn.Linear:
        if weight.dim() != 2:
            return None
        lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        lin.weight = weight  # type: ignore[assignment]
        if bias is not None:
            lin.bias = bias  # type: ignore[assignment]
        return lin
    nd = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}[cls]  # type: ignore[index]
    if weight.dim() != nd + 2:
        return None
    a = list(node.args) + [None] * (7 - len(node.args))
    stride, padding, dilation, groups = (a[3] or 1), (a[4] or 0), (a[5] or 1), (a[6] or 1)
    if isinstance(padding, str) or not isinstance(groups, int):
        return None
    conv = cls(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]),
               stride=stride, padding=padding, dilation=dilation, groups=groups,
               bias=bias is not None, device="meta")
    conv.weight = weight  # type: ignore[assignment]
    if bias is not None:
        conv.bias = bias  # type: ignore[assignment]
    return conv


__all__ = ["LiftModules", "lift_modules"]
