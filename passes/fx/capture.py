"""Capture a model as a torch.fx graph and find its measurement sites.

``capture`` tries ``torch.export`` first (aten-level graph, module origin in
``node.meta["nn_module_stack"]``, parameters as ``get_attr`` nodes of the unlifted module),
then ``torch.fx.symbolic_trace`` (``call_module`` nodes), and reports which one worked.
When neither can capture the model, the caller falls back to module hooks.

``find_sites`` walks the graph once and returns, in forward order, the parametrised layers
(Linear/Conv) and the activation sites (outputs of ReLU/GELU/.../Tanh/Sigmoid, and of
Linear/Conv layers that no activation follows), each linked to its producer layer.
"""

from __future__ import annotations

import contextlib
import logging
import operator
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.nn import functional as F

from graphsurg._activations import ACTIVATIONS, CLASS_NAME_HINTS, Activation, bounded
from graphsurg._errors import first_line

aten = torch.ops.aten

# the torch spellings of the activations (aten ops, functions, modules) -> canonical names of
# graphsurg._activations, the one table that gives their family and bounds
_ATEN_ACT = {
    aten.relu.default: "relu", aten.relu_.default: "relu", aten.relu6.default: "relu6",
    aten.leaky_relu.default: "leaky_relu", aten.leaky_relu_.default: "leaky_relu",
    aten.gelu.default: "gelu", aten.gelu_.default: "gelu", aten.silu.default: "silu",
    aten.silu_.default: "silu", aten.elu.default: "elu", aten.elu_.default: "elu",
    aten.selu.default: "selu", aten.celu.default: "celu", aten.softplus.default: "softplus",
    aten.mish.default: "mish", aten.hardswish.default: "hardswish",
    aten.prelu.default: "prelu", aten._prelu_kernel.default: "prelu",
    aten.tanh.default: "tanh", aten.tanh_.default: "tanh", aten.sigmoid.default: "sigmoid",
    aten.sigmoid_.default: "sigmoid", aten.hardtanh.default: "hardtanh",
    aten.hardtanh_.default: "hardtanh", aten.hardsigmoid.default: "hardsigmoid",
}
_FN_ACT: dict[Callable[..., Any], str] = {
    F.relu: "relu", torch.relu: "relu", F.relu6: "relu6", F.leaky_relu: "leaky_relu",
    F.gelu: "gelu", F.silu: "silu", F.elu: "elu", F.selu: "selu", F.celu: "celu",
    F.softplus: "softplus", F.mish: "mish", F.hardswish: "hardswish", F.prelu: "prelu",
    torch.tanh: "tanh", F.tanh: "tanh", torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid",
    F.hardtanh: "hardtanh", F.hardsigmoid: "hardsigmoid",
}
_MOD_ACT: dict[type[nn.Module], str] = {
    nn.ReLU: "relu", nn.ReLU6: "relu6", nn.LeakyReLU: "leaky_relu", nn.GELU: "gelu",
    nn.SiLU: "silu", nn.ELU: "elu", nn.SELU: "selu", nn.CELU: "celu", nn.Softplus: "softplus",
    nn.Mish: "mish", nn.Hardswish: "hardswish", nn.PReLU: "prelu", nn.Tanh: "tanh",
    nn.Sigmoid: "sigmoid", nn.Hardtanh: "hardtanh", nn.Hardsigmoid: "hardsigmoid",
}
_ATEN_LAYER = {
    aten.linear.default: "linear", aten.conv1d.default: "conv", aten.conv2d.default: "conv",
    aten.conv3d.default: "conv", aten.convolution.default: "conv",
    aten.conv_transpose2d.input: "conv_transpose", aten.conv_transpose1d.default: "conv_transpose",
}
_FN_LAYER = {F.linear: "linear", F.conv1d: "conv", F.conv2d: "conv", F.conv3d: "conv"}
_METHOD_ACT = ("relu", "sigmoid", "tanh")
_MOD_LAYER: dict[type[nn.Module], str] = {
    nn.Linear: "linear", nn.Conv1d: "conv", nn.Conv2d: "conv", nn.Conv3d: "conv",
}
# ops a unit's identity passes through between its producer layer and its activation
_TRANSPARENT_ATEN = {
    aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default,
    aten._native_batch_norm_legit_functional.default, aten.native_batch_norm.default,
    aten.layer_norm.default, aten.group_norm.default, aten.dropout.default,
    aten.contiguous.default, aten.clone.default, operator.getitem,
}
_TRANSPARENT_MOD = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm,
                    nn.Dropout, nn.Identity)
_TRANSPARENT_FN = {F.batch_norm, F.layer_norm, F.group_norm, F.dropout}


def activation_of_module(m: nn.Module) -> Activation | None:
    """The activation of an nn module (also Hugging Face activation modules); a Hardtanh
    (ReLU6 included) is read from its bounds (``Hardtanh(0, 6)`` is relu6)."""
    if isinstance(m, nn.Hardtanh):
        return bounded("hardtanh", float(m.min_val), float(m.max_val))
    for t, name in _MOD_ACT.items():
        if isinstance(m, t):
            return ACTIVATIONS[name]
    cls = type(m).__name__.lower()
    if "norm" in cls:
        return None
    for key, name in CLASS_NAME_HINTS:
        if key in cls:
            return ACTIVATIONS[name]
    return None


def activation_name_of_module(m: nn.Module) -> str | None:
    """The canonical activation name of an nn module (see :func:`activation_of_module`)."""
    a = activation_of_module(m)
    return a.name if a is not None else None


# clamps with constant bounds are activations read from their bounds (as ONNX's Clip is):
# target -> the names and defaults of its (min, max) arguments
_HARDTANH_ARGS = (("min_val", -1.0), ("max_val", 1.0))
_CLAMP_ARGS = (("min", None), ("max", None))
_CLAMPS: dict[Any, tuple[tuple[str, float | None], ...]] = {
    aten.hardtanh.default: _HARDTANH_ARGS, aten.hardtanh_.default: _HARDTANH_ARGS,
    F.hardtanh: _HARDTANH_ARGS, aten.clamp.default: _CLAMP_ARGS,
    aten.clamp_.default: _CLAMP_ARGS, torch.clamp: _CLAMP_ARGS, torch.clip: _CLAMP_ARGS,
    aten.clamp_min.default: (("min", None),),
}
_METHOD_CLAMPS = {"clamp": _CLAMP_ARGS, "clip": _CLAMP_ARGS}


def _clamp(node: fx.Node, spec: tuple[tuple[str, float | None], ...]) -> Activation | None:
    """The activation of a clamp node (``hardtanh(x, 0, 6)`` is relu6), or None when a bound
    is not a constant number (a tensor) or there is none."""
    vals: list[float | None] = []
    for k, (key, default) in enumerate(spec):
        v = node.args[k + 1] if len(node.args) > k + 1 else node.kwargs.get(key, default)
        if v is not None and not isinstance(v, int | float):
            return None
        vals.append(None if v is None else float(v))
    low, high = (vals + [None])[:2]
    low = None if low == float("-inf") else low
    high = None if high == float("inf") else high
    if low is None and high is None:
        return None
    return bounded("hardtanh", low, high)


def activation_of_node(gm: fx.GraphModule, node: fx.Node) -> Activation | None:
    """The activation a graph node computes, or None. Clamps (hardtanh, clamp, clip) with
    constant bounds are read from them with :func:`graphsurg._activations.bounded`, as the ONNX
    adapter reads ``Clip``: ``hardtanh(x, 0, 6)`` (how torch.export lowers ReLU6) is relu6, a
    relu-family activation; ``clamp(x, -2, 2)`` a saturating hardtanh with those bounds."""
    if node.op == "call_function":
        target: Any = node.target
        if target in _CLAMPS:
            return _clamp(node, _CLAMPS[target])
        name = _ATEN_ACT.get(target) or _FN_ACT.get(target)
        return ACTIVATIONS[name] if name else None
    if node.op == "call_method":
        if node.target in _METHOD_CLAMPS:
            return _clamp(node, _METHOD_CLAMPS[str(node.target)])
        return ACTIVATIONS.get(str(node.target)) if node.target in _METHOD_ACT else None
    if node.op == "call_module":
        m = gm.get_submodule(str(node.target))
        return None if layer_kind_of_module(m) else activation_of_module(m)
    return None


def layer_kind_of_module(m: nn.Module) -> str | None:
    for t, name in _MOD_LAYER.items():
        if isinstance(m, t):
            return name
    return None


@dataclass
class Captured:
    """A captured model: the graph module to run, and how it was captured."""

    gm: fx.GraphModule | None
    method: str  # "export" | "symbolic_trace" | "hooks"
    notes: list[str] = field(default_factory=list)


def capture(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Captured:
    """Capture ``model`` (already a private copy: the graph shares its parameters).

    Returns a :class:`Captured`; never raises for a model that cannot be captured --
    ``method == "hooks"`` and ``gm is None`` then, with the reasons in ``notes``.
    """
    notes: list[str] = []
    try:
        gm = _export(model, args, kwargs)
        return Captured(gm, "export", notes)
    except Exception as e:  # any failure of export means: try the next method
        notes.append(f"torch.export failed ({type(e).__name__}: {first_line(e, 160)})")
    try:
        gm = fx.symbolic_trace(model)
        return Captured(gm, "symbolic_trace", notes)
    except Exception as e:
        notes.append(f"symbolic_trace failed ({type(e).__name__}: {first_line(e, 160)})")
    notes.append("measured with module hooks instead of a graph")
    return Captured(None, "hooks", notes)


def _export(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> fx.GraphModule:
    from torch.export import Dim, export

    def dyn(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.dim() > 0:
            return {0: Dim.AUTO}
        return None

    # every tensor's first (batch) dimension may vary; keyed by argument name when there are
    # keyword arguments (torch.export's form for mixing positional and keyword inputs)
    pos = torch.utils._pytree.tree_map(dyn, args)
    ds: Any = pos
    if kwargs:
        ds = {**dict(zip(_arg_names(model, len(args)), pos, strict=False)),
              **torch.utils._pytree.tree_map(dyn, kwargs)}
    with _quiet_torch_logs():
        try:
            ep = export(model, args, kwargs, dynamic_shapes=ds, strict=False)
        except Exception:
            ep = export(model, args, kwargs, strict=False)
    # guards re-check input shapes on every call (~2% of a step): diagnosis runs the batches
    # it was given, and a rejected batch still surfaces as BadInputError
    return ep.module(check_guards=False)


@contextlib.contextmanager
def _quiet_torch_logs() -> Iterator[None]:
    """Silence torch's own error logs while export is attempted: a failure is expected for
    some models (it falls back, and the diagnosis notes why), and a batch the model rejects
    is reported as one line by the fallback, not as a traceback torch logged on the way."""
    names = ("torch._subclasses.fake_tensor", "torch.export", "torch._export",
             "torch.fx.experimental.symbolic_shapes")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, lv in zip(loggers, levels, strict=True):
            lg.setLevel(lv)


def _arg_names(model: nn.Module, n: int) -> list[str]:
    import inspect

    params = list(inspect.signature(model.forward).parameters)
    return params[:n]


# -- site discovery -----------------------------------------------------------------------


@dataclass
class LayerSite:
    """A parametrised layer (Linear/Conv) in forward order."""

    module: str
    kind: str  # "linear" | "conv" | "conv_transpose"
    node: str
    order: int
    next_modules: list[str] = field(default_factory=list)


@dataclass
class ActSite:
    """An observed value: an activation's output, or a layer's output no activation follows."""

    node: str
    op: str  # activation name, or "linear"/"conv"
    family: str  # "relu" | "saturating" | "smooth" | "linear"
    producer: str  # module path of the producer layer ("" if none)
    channel_dim: int
    order: int
    module: str  # module path owning the node (for messages)
    activation: Activation | None = None  # family and bounds (None for a bare layer output)


def _weight_module(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """Module path of a layer node's weight (export: get_attr; symbolic: call_module)."""
    if node.op == "call_module":
        return str(node.target)
    if len(node.args) > 1 and isinstance(node.args[1], fx.Node) and node.args[1].op == "get_attr":
        target = str(node.args[1].target)
        return target.rsplit(".", 1)[0] if "." in target else target
    return None


def _classify(gm: fx.GraphModule, node: fx.Node) -> tuple[str, str] | None:
    """('act', canonical name) | ('layer', kind) | ('transparent', '') | None."""
    act = activation_of_node(gm, node)
    if act is not None:
        return "act", act.name
    if node.op == "call_function":
        t = node.target
        if t in _ATEN_LAYER:
            return "layer", _ATEN_LAYER[t]  # type: ignore[index]
        if t in _FN_LAYER:
            return "layer", _FN_LAYER[t]  # type: ignore[index]
        if t in _TRANSPARENT_ATEN or t in _TRANSPARENT_FN:
            return "transparent", ""
    elif node.op == "call_method":
        if node.target in ("contiguous",):
            return "transparent", ""
    elif node.op == "call_module":
        m = gm.get_submodule(str(node.target))
        k = layer_kind_of_module(m)
        if k:
            return "layer", k
        if isinstance(m, _TRANSPARENT_MOD):
            return "transparent", ""
    return None


def _owner(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        return str(path).replace("L['self'].", "").replace("L__self___", "")
    if node.op == "call_module":
        return str(node.target)
    return ""


def find_sites(
    gm: fx.GraphModule,
    *,
    weight_module: Callable[[fx.GraphModule, fx.Node], str | None] | None = None,
    owner: Callable[[fx.Node], str] | None = None,
) -> tuple[list[LayerSite], list[ActSite]]:
    """Layers and observed sites of a captured graph, in forward order.

    ``weight_module(gm, node)`` names a layer node's module (default: from a ``get_attr``
    weight or a ``call_module`` target) and ``owner(node)`` the module owning a node (default:
    from ``nn_module_stack``); the torch.compile backend passes resolvers for Dynamo graphs,
    whose weights are placeholders.
    """
    weight_module = weight_module or _weight_module
    owner = owner or _owner
    layers: list[LayerSite] = []
    acts: list[ActSite] = []
    layer_of_node: dict[fx.Node, str] = {}
    kinds: dict[fx.Node, tuple[str, str] | None] = {}
    for node in gm.graph.nodes:
        kinds[node] = _classify(gm, node)
    for i, node in enumerate(gm.graph.nodes):
        c = kinds[node]
        if c is None:
            continue
        what, name = c
        if what == "layer":
            mod = weight_module(gm, node)
            if mod is None:
                continue
            layer_of_node[node] = mod
            if not any(ls.module == mod for ls in layers):
                layers.append(LayerSite(mod, name, node.name, len(layers)))
            # a layer output that no activation follows is observed itself
            if not _follows_activation(node, kinds):
                acts.append(ActSite(node.name, name, "linear", mod, 1 if name != "linear" else -1,
                                    i, mod))
        elif what == "act":
            producer_node = _producer(node, kinds)
            producer = layer_of_node.get(producer_node, "") if producer_node is not None else ""
            pc = kinds.get(producer_node) if producer_node is not None else None
            pkind = pc[1] if pc else ""
            cd = 1 if pkind.startswith("conv") else -1
            act = activation_of_node(gm, node) or ACTIVATIONS[name]
            acts.append(ActSite(node.name, act.name, act.family, producer, cd, i,
                                owner(node) or producer, act))
    # next layers of each layer (through non-layer nodes), for the "narrow layer" check
    by_name = {n.name: n for n in gm.graph.nodes}
    for ls in layers:
        ls.next_modules = _next_layers(by_name[ls.node], kinds, layer_of_node)
    return layers, acts


def _producer(node: fx.Node, kinds: dict[fx.Node, tuple[str, str] | None]) -> fx.Node | None:
    cur: Any = node.args[0] if node.args else None
    for _ in range(8):
        if not isinstance(cur, fx.Node):
            return None
        c = kinds.get(cur)
        if c and c[0] == "layer":
            return cur
        if c and c[0] == "transparent":
            cur = cur.args[0] if cur.args else None
            continue
        return None
    return None


def _follows_activation(node: fx.Node, kinds: dict[fx.Node, tuple[str, str] | None]) -> bool:
    """True when the layer's output flows (through transparent ops) into an activation."""
    frontier = list(node.users)
    for _ in range(8):
        nxt: list[fx.Node] = []
        for u in frontier:
            c = kinds.get(u)
            if c and c[0] == "act":
                return True
            if c and c[0] == "transparent":
                nxt.extend(u.users)
        if not nxt:
            return False
        frontier = nxt
    return False


def _next_layers(node: fx.Node, kinds: dict[fx.Node, tuple[str, str] | None],
                 layer_of_node: dict[fx.Node, str]) -> list[str]:
    out: list[str] = []
    seen: set[fx.Node] = set()
    frontier = list(node.users)
    steps = 0
    while frontier and steps < 64:
        steps += 1
        u = frontier.pop(0)
        if u in seen:
            continue
        seen.add(u)
        c = kinds.get(u)
        if c and c[0] == "layer" and u in layer_of_node:
            if layer_of_node[u] not in out:
                out.append(layer_of_node[u])
            continue
        frontier.extend(u.users)
    return out
