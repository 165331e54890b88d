"""Capture a model as a torch.fx graph and find its measurement sites.

``capture`` tries ``torch.export`` first (aten-level graph, module origin in
``node.meta["nn_module_stack"]``, parameters as ``get_attr`` nodes of the unlifted module),
then ``torch.fx.symbolic_trace`` (``call_module`` nodes), and reports which one worked.
When neither can capture the model, the caller falls back to module hooks.

``find_sites`` walks the graph and returns, in forward order, the parametrised layers and the
activation sites, each linked to its producer layer:

* **layers**: every linear-like op with a parameter weight: Linear/Conv modules, ``linear``,
  ``conv*`` (string padding included), ``addmm`` (GPT-2's Conv1D, weight ``(d_in, d_out)``),
  ``mm``/``matmul`` with a parameter operand (``x @ W`` and ``x @ W.T``) and two-operand
  ``einsum`` with a 2-D parameter; :func:`layer_weight` gives the weight oriented like
  torch's Linear, ``(d_out, d_in[, k...])``.
* **activation sites**: an activation op's output, or the output of a *pointwise region*
  identified by :func:`graphsurg._activations.match_regions` (tanh/erf GELU, QuickGELU,
  x*sigmoid(x), decomposed HardSwish... as authors wrote them: the inner tanh/sigmoid are no
  sites); a gated unit ``act(gate(x)) * up(x)`` is one site, the product, with the gate as
  producer and the up projection as ``partner``; a layer output no activation follows is
  observed as family ``"linear"``.
* **unit axis**: taken from the producer (1 after a convolution, the last axis after a
  linear-like op) and carried through transparent ops (norms, dropout, bias adds) and layout
  ops (permute, transpose, view/reshape/flatten) to the observed value.
"""

from __future__ import annotations

import contextlib
import logging
import operator
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn
from torch.nn import functional as F

from graphsurg._activations import (
    ACTIVATIONS,
    CLASS_NAME_HINTS,
    GRID,
    Activation,
    Region,
    bounded,
    gated,
    match_regions,
    pointwise_regions,
)
from graphsurg._errors import first_line
from graphsurg._layers import einsum_layer

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
    aten.conv1d.padding: "conv", aten.conv2d.padding: "conv", aten.conv3d.padding: "conv",
    aten.conv_transpose2d.input: "conv_transpose", aten.conv_transpose1d.default: "conv_transpose",
}
_FN_LAYER = {F.linear: "linear", F.conv1d: "conv", F.conv2d: "conv", F.conv3d: "conv"}
_METHOD_ACT = ("relu", "sigmoid", "tanh")
_MOD_LAYER: dict[type[nn.Module], str] = {
    nn.Linear: "linear", nn.Conv1d: "conv", nn.Conv2d: "conv", nn.Conv3d: "conv",
}
# ops a unit's identity passes through between its producer layer and its activation
_TRANSPARENT_ATEN = {
    aten._to_copy.default, aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default,
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
    """A parametrised layer (linear-like or conv) in forward order.

    ``unit_axis``: the axis of the layer's output that holds its units (1 for a conv, -1 for
    a linear-like op; an einsum's from its equation)."""

    module: str
    kind: str  # "linear" | "conv" | "conv_transpose"
    node: str
    order: int
    next_modules: list[str] = field(default_factory=list)
    unit_axis: int = -1


@dataclass
class ActSite:
    """An observed value: an activation's output, or a layer's output no activation follows.

    ``partner``: for a gated unit (``act(gate(x)) * up(x)``), the up projection's module
    path (``producer`` is the gate's)."""

    node: str
    op: str  # activation name, or "linear"/"conv"
    family: str  # "relu" | "saturating" | "smooth" | "linear"
    producer: str  # module path of the producer layer ("" if none)
    channel_dim: int
    order: int
    module: str  # module path owning the node (for messages)
    activation: Activation | None = None  # family and bounds (None for a bare layer output)
    partner: str = ""
    role: str = ""  # "output" | "gate" | "" (see graphsurg._measurements.SiteMeasure.role)


# transposes a weight goes through in `x @ W.T` (aten, torch functions, methods)
_TRANSPOSE_FN = {aten.t.default, aten.numpy_T.default, aten.transpose.int, aten.permute.default,
                 torch.t, torch.transpose, torch.permute}
_TRANSPOSE_METHOD = {"t", "transpose", "permute"}
_ADDMM = {aten.addmm.default, torch.addmm}
_MATMUL = {aten.mm.default, aten.matmul.default, torch.mm, torch.matmul, operator.matmul}
_EINSUM = {aten.einsum.default, torch.einsum, torch.functional.einsum}


def _is_param_node(n: fx.Node) -> bool:
    """A ``get_attr`` node, or a Dynamo graph's parameter placeholder (its ``grapharg``
    source reads ``..._parameters[...]``: Dynamo passes parameters as graph inputs)."""
    if n.op == "get_attr":
        return True
    if n.op != "placeholder":
        return False
    src = getattr(n.meta.get("grapharg"), "source", None)
    name = getattr(src, "name", None)
    name = name() if callable(name) else name
    return name is not None and "_parameters" in str(name)


def _param(w: Any) -> tuple[fx.Node, bool] | None:
    """``(get_attr node, transposed)`` when ``w`` is a parameter or one transpose of it."""
    if not isinstance(w, fx.Node):
        return None
    if _is_param_node(w):
        return w, False
    inner = w.args[0] if w.args else None
    if not (isinstance(inner, fx.Node) and _is_param_node(inner)):
        return None
    if w.op == "call_function" and w.target is getattr and w.args[1:] in (("T",), ("mT",)):
        return inner, True
    if (w.op == "call_function" and w.target in _TRANSPOSE_FN) or (
            w.op == "call_method" and w.target in _TRANSPOSE_METHOD):
        rest: list[Any] = list(w.args[1:])
        if len(rest) == 1 and isinstance(rest[0], list | tuple):
            rest = list(rest[0])
        if rest and [int(r) % 2 for r in rest] not in ([1, 0], [0, 1]):
            return None
        if rest and [int(r) % 2 for r in rest] == [0, 1] and len(rest) == 2 and w.target in (
                aten.permute.default, torch.permute, "permute"):
            return None  # the identity permutation
        return inner, True
    return None


@dataclass(frozen=True)
class _LayerOp:
    kind: str
    weight: fx.Node | None  # the get_attr (None: a call_module)
    transposed: bool  # the stored weight is (d_in, d_out)
    unit_axis: int


def _einsum_layer(node: fx.Node) -> _LayerOp | None:
    eq = node.args[0] if node.args else None
    ops = node.args[1] if len(node.args) > 1 else None
    if not isinstance(eq, str) or not isinstance(ops, list | tuple) or len(ops) != 2:
        return None
    params = [_param(o) for o in ops]
    found = einsum_layer(eq, [p is not None and not p[1] for p in params])
    if found is None:
        return None
    k, transposed, axis = found
    p = params[k]
    assert p is not None
    return _LayerOp("linear", p[0], transposed, axis)


def layer_op(gm: fx.GraphModule, node: fx.Node) -> _LayerOp | None:
    """How ``node`` is a layer: kind, weight node, orientation and output unit axis."""
    if node.op == "call_module":
        k = layer_kind_of_module(gm.get_submodule(str(node.target)))
        return _LayerOp(k, None, False, -1 if k == "linear" else 1) if k else None
    if node.op != "call_function":
        return None
    t: Any = node.target
    if t in _ATEN_LAYER or t in _FN_LAYER:
        kind = _ATEN_LAYER.get(t) or _FN_LAYER[t]
        w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        p = _param(w)
        if p is None or p[1]:
            return None
        return _LayerOp(kind, p[0], False, -1 if kind == "linear" else 1)
    if t in _ADDMM:
        p = _param(node.args[2] if len(node.args) > 2 else None)
        return _LayerOp("linear", p[0], not p[1], -1) if p else None
    if t in _MATMUL:
        p = _param(node.args[1] if len(node.args) > 1 else None)
        return _LayerOp("linear", p[0], not p[1], -1) if p else None
    if t in _EINSUM:
        return _einsum_layer(node)
    return None


def layer_weight(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor | None:
    """A layer node's weight oriented like torch's Linear/Conv, ``(d_out, d_in[, k...])``
    (GPT-2's Conv1D ``addmm`` weight and ``x @ W``'s are transposed), or None."""
    lo = layer_op(gm, node)
    if lo is None:
        return None
    if lo.weight is None:
        w = getattr(gm.get_submodule(str(node.target)), "weight", None)
        return w if isinstance(w, torch.Tensor) else None
    name = str(lo.weight.target)
    for get in (gm.get_parameter, gm.get_buffer):
        try:
            t = get(name)
        except AttributeError:
            continue
        if t.dim() < 2 or not t.is_floating_point():
            return None
        return t.t() if lo.transposed else t
    return None


def _weight_module(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """Module path of a layer node's weight (export: get_attr; symbolic: call_module)."""
    if node.op == "call_module":
        return str(node.target)
    lo = layer_op(gm, node)
    if lo is None or lo.weight is None:
        return None
    target = str(lo.weight.target)
    return target.rsplit(".", 1)[0] if "." in target else target


# pointwise ops a decomposed activation is made of (aten, torch functions, operators,
# methods): regions of them are identified against graphsurg._activations.REFERENCES
_POINTWISE = {
    aten.mul.Tensor, aten.mul.Scalar, aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor,
    aten.sub.Scalar, aten.rsub.Scalar, aten.div.Tensor, aten.div.Scalar,
    aten.pow.Tensor_Scalar, aten.neg.default, aten.exp.default, aten.log1p.default,
    aten.log.default, aten.erf.default, aten.reciprocal.default, aten.sqrt.default,
    aten.rsqrt.default, aten.abs.default, aten.clamp_max.default, aten.softplus.default,
    operator.mul, operator.add, operator.sub, operator.truediv, operator.pow, operator.neg,
    torch.mul, torch.add, torch.sub, torch.div, torch.pow, torch.erf, torch.exp, torch.neg,
    torch.log1p, torch.abs, torch.rsqrt, torch.sqrt, torch.reciprocal,
}
_POINTWISE_METHOD = {"mul", "add", "sub", "div", "pow", "neg", "exp", "erf", "tanh", "sigmoid",
                     "relu", "clamp", "clip", "abs", "sqrt", "rsqrt", "reciprocal",
                     "__mul__", "__add__", "__sub__", "__truediv__", "__rmul__", "__radd__"}


def _scalar_const(gm: fx.GraphModule, a: fx.Node) -> torch.Tensor | None:
    """A one-element constant tensor (a lifted ``_tensor_constant``), else None."""
    if a.op != "get_attr":
        return None
    t: Any
    try:
        t = gm.get_buffer(str(a.target))
    except AttributeError:
        t = getattr(gm, str(a.target), None)
    if isinstance(t, torch.Tensor) and t.numel() == 1 and not isinstance(t, nn.Parameter):
        return t
    return None


def _pointwise(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_function":
        if node.target not in _POINTWISE and activation_of_node(gm, node) is None:
            return False
    elif node.op == "call_method":
        if node.target not in _POINTWISE_METHOD:
            return False
    elif node.op == "call_module":
        if activation_of_node(gm, node) is None:
            return False
    else:
        return False
    leaves, _ = torch.utils._pytree.tree_flatten((node.args, node.kwargs))
    return all(isinstance(a, fx.Node | int | float | bool | str | type(None)) for a in leaves)


def _tensor_inputs(gm: fx.GraphModule, node: fx.Node) -> list[fx.Node]:
    return [a for a in node.all_input_nodes if _scalar_const(gm, a) is None]


def _evaluate(gm: fx.GraphModule, reg: Region[fx.Node, fx.Node]) -> dict[fx.Node, np.ndarray] | None:
    """Every op of a region on GRID (float64), run in the graph's own ops; None when an op
    cannot run on a 1-D float64 tensor (a per-channel PReLU, ...)."""
    vals: dict[fx.Node, torch.Tensor] = {reg.root: torch.from_numpy(GRID.copy())}

    def arg(a: fx.Node) -> Any:
        if a in vals:
            return vals[a]
        c = _scalar_const(gm, a)
        return c.double().reshape(()) if c is not None else a

    out: dict[fx.Node, np.ndarray] = {}
    try:
        for n in reg.ops:
            args = fx.node.map_arg(n.args, arg)
            kwargs = fx.node.map_arg(n.kwargs, arg)
            if n.op == "call_function":
                v = n.target(*args, **kwargs)  # type: ignore[operator]
            elif n.op == "call_method":
                v = getattr(args[0], str(n.target))(*args[1:], **kwargs)
            else:
                v = gm.get_submodule(str(n.target))(*args, **kwargs)
            if not isinstance(v, torch.Tensor) or v.shape != GRID.shape:
                return None
            vals[n] = v
            out[n] = v.detach().double().numpy()
    except (RuntimeError, TypeError, ValueError, IndexError):
        return None
    return out


def recognise(gm: fx.GraphModule) -> dict[fx.Node, Activation | None]:
    """Decomposed activations of a graph: ``{site node: activation}`` for each identified
    pointwise region's output, and ``{inner node: None}`` for the ops it absorbed."""
    order = list(gm.graph.nodes)
    regions = pointwise_regions(order, pointwise=lambda n: _pointwise(gm, n),
                                tensor_inputs=lambda n: _tensor_inputs(gm, n),
                                output=lambda n: n)
    matched = match_regions(regions, evaluate=lambda r: _evaluate(gm, r),
                            tensor_inputs=lambda n: _tensor_inputs(gm, n),
                            output=lambda n: n, users=lambda v: list(v.users))
    out: dict[fx.Node, Activation | None] = {}
    for r in matched:
        for n in r.inner:
            out[n] = None
        assert r.site is not None
        out[r.site] = r.activation
    return out


def _classify(gm: fx.GraphModule, node: fx.Node,
              recognised: dict[fx.Node, Activation | None] | None = None
              ) -> tuple[str, str] | None:
    """('act', canonical name) | ('layer', kind) | ('transparent', '') | ('layout', '') |
    ('inner', '') (a piece of a recognised activation) | None."""
    if recognised is not None and node in recognised:
        a = recognised[node]
        return ("act", a.name) if a is not None else ("inner", "")
    act = activation_of_node(gm, node)
    if act is not None:
        return "act", act.name
    lo = layer_op(gm, node)
    if lo is not None:
        return "layer", lo.kind
    if node.op == "call_function":
        t = node.target
        if t in _TRANSPARENT_ATEN or t in _TRANSPARENT_FN:
            return "transparent", ""
        if t in _LAYOUT_FN:
            return "layout", ""
        if t in (aten.add.Tensor, operator.add, torch.add) and _bias_input(gm, node) is not None:
            return "transparent", ""
    elif node.op == "call_method":
        if node.target in ("contiguous",):
            return "transparent", ""
        if node.target in _LAYOUT_METHOD:
            return "layout", ""
    elif node.op == "call_module":
        m = gm.get_submodule(str(node.target))
        if isinstance(m, _TRANSPARENT_MOD):
            return "transparent", ""
        if isinstance(m, nn.Flatten):
            return "layout", ""
    return None


def _bias_input(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """For ``y = x + b`` with ``b`` a parameter/buffer (a bias): ``x``."""
    if len(node.args) != 2 or not all(isinstance(a, fx.Node) for a in node.args):
        return None
    a, b = node.args
    assert isinstance(a, fx.Node) and isinstance(b, fx.Node)
    if b.op == "get_attr" and a.op != "get_attr":
        return a
    if a.op == "get_attr" and b.op != "get_attr":
        return b
    return None


_LAYOUT_FN = {
    aten.permute.default, aten.transpose.int, aten.t.default, aten.numpy_T.default,
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
    aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.default, torch.permute,
    torch.transpose, torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze,
}
_LAYOUT_METHOD = {"permute", "transpose", "view", "reshape", "flatten", "squeeze", "unsqueeze"}


def _owner(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        return str(path).replace("L['self'].", "").replace("L__self___", "")
    if node.op == "call_module":
        return str(node.target)
    return ""


def _shape(node: Any) -> list[Any] | None:
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    if v is None:
        v = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    shape = getattr(v, "shape", None)
    if shape is None:
        return None
    return [int(d) if isinstance(d, int) else str(d) for d in shape]


def _trailing(dims: list[Any]) -> tuple[int, tuple[str, ...]]:
    """A product of dims as (integer part, sorted symbolic factors)."""
    p = 1
    syms: list[str] = []
    for d in dims:
        if isinstance(d, int):
            p *= d
        else:
            syms.append(d)
    return p, tuple(sorted(syms))


def _map_axis(node: fx.Node, src: fx.Node, axis: int) -> int | None:
    """The unit axis after the layout op ``node`` (input ``src``, unit axis ``axis``)."""
    ins, outs = _shape(src), _shape(node)
    if ins is None or outs is None:
        return None
    a = axis % len(ins)
    t = node.target
    if t in (aten.permute.default, torch.permute, "permute"):
        dims: Any = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], list | tuple) \
            else node.args[1:]
        perm = [int(d) % len(ins) for d in dims]  # type: ignore[union-attr]
        return perm.index(a) if a in perm else None
    if t in (aten.transpose.int, torch.transpose, "transpose"):
        d0, d1 = (int(d) % len(ins) for d in node.args[1:3])  # type: ignore[arg-type]
        return d1 if a == d0 else d0 if a == d1 else a
    if t in (aten.t.default, aten.numpy_T.default):
        return len(ins) - 1 - a
    # reshapes: the unit dim survives when some output dim has its size and the same
    # trailing product (the batch dim may be symbolic)
    size, tail = ins[a], _trailing(ins[a + 1:])
    for j, d in enumerate(outs):
        if d == size and _trailing(outs[j + 1:]) == tail:
            return j
    return None


def _walk_back(start: fx.Node, kinds: dict[fx.Node, tuple[str, str] | None],
               gm: fx.GraphModule) -> tuple[fx.Node | None, list[fx.Node]]:
    """From a value back through transparent and layout ops to the layer producing it:
    ``(layer node or None, the ops walked through, nearest first)``."""
    chain: list[fx.Node] = []
    cur: Any = start
    for _ in range(_WALK):
        if not isinstance(cur, fx.Node):
            return None, chain
        c = kinds.get(cur)
        if c and c[0] == "layer":
            return cur, chain
        if c and c[0] in ("transparent", "layout"):
            chain.append(cur)
            bias_of = _bias_input(gm, cur) if cur.op == "call_function" and cur.target in (
                aten.add.Tensor, operator.add, torch.add) else None
            cur = bias_of if bias_of is not None else (cur.args[0] if cur.args else None)
            continue
        return None, chain
    return None, chain


#: how far a producer / consumer walk goes through transparent and layout ops
_WALK = 12


def classify_nodes(gm: fx.GraphModule) -> dict[fx.Node, tuple[str, str] | None]:
    """Every node's class (see :func:`_classify`), for :func:`producer_of`."""
    return {n: _classify(gm, n) for n in gm.graph.nodes}


def producer_of(gm: fx.GraphModule, node: fx.Node,
                kinds: dict[fx.Node, tuple[str, str] | None] | None = None) -> fx.Node | None:
    """The layer node whose units the activation ``node`` activates (walking back through
    transparent and layout ops), or None. ``kinds``: :func:`classify_nodes` of ``gm``
    (computed when not given)."""
    kinds = classify_nodes(gm) if kinds is None else kinds
    start = node.args[0] if node.args else None
    if not isinstance(start, fx.Node):
        return None
    return _walk_back(start, kinds, gm)[0]


def _unit_axis(layer: fx.Node, axis: int, chain: list[fx.Node]) -> int | None:
    """The producer's unit axis carried forward through ``chain`` (nearest first) to the value
    at its head; -1 when it is the last axis, None when a layout op loses it."""
    prev = layer
    shape = _shape(layer)
    cur = axis % len(shape) if shape else axis
    for n in reversed(chain):
        if n.op == "call_module" or (n.target not in _LAYOUT_FN and n.target not in _LAYOUT_METHOD):
            prev = n
            continue
        nxt = _map_axis(n, prev, cur)
        if nxt is None:
            return None
        cur, prev = nxt, n
    out = _shape(prev)
    if out is None:
        return -1 if cur < 0 or not chain else None
    return -1 if cur % len(out) == len(out) - 1 else cur % len(out)


def find_sites(
    gm: fx.GraphModule,
    *,
    weight_module: Callable[[fx.GraphModule, fx.Node], str | None] | None = None,
    owner: Callable[[fx.Node], str] | None = None,
) -> tuple[list[LayerSite], list[ActSite]]:
    """Layers and observed sites of a captured graph, in forward order (module doc).

    ``weight_module(gm, node)`` names a layer node's module (default: from a ``get_attr``
    weight or a ``call_module`` target) and ``owner(node)`` the module owning a node (default:
    from ``nn_module_stack``); the torch.compile backend passes resolvers for Dynamo graphs,
    whose weights are placeholders.
    """
    weight_module = weight_module or _weight_module
    owner = owner or _owner
    recognised = recognise(gm)
    nodes = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    kinds: dict[fx.Node, tuple[str, str] | None] = {n: _classify(gm, n, recognised)
                                                     for n in nodes}
    layers: list[LayerSite] = []
    layer_of_node: dict[fx.Node, str] = {}
    axis_of_layer: dict[fx.Node, int] = {}
    for node in nodes:
        c = kinds[node]
        if c is None or c[0] != "layer":
            continue
        mod = weight_module(gm, node)
        lo = layer_op(gm, node)
        if mod is None:
            kinds[node] = None
            continue
        layer_of_node[node] = mod
        axis_of_layer[node] = lo.unit_axis if lo is not None else (-1 if c[1] == "linear" else 1)
        if not any(ls.module == mod for ls in layers):
            layers.append(LayerSite(mod, c[1], node.name, len(layers),
                                    unit_axis=axis_of_layer[node]))

    def producer_of(value: Any) -> tuple[str, int]:
        layer, chain = _walk_back(value, kinds, gm)
        if layer is None or layer not in layer_of_node:
            return "", -1
        axis = _unit_axis(layer, axis_of_layer[layer], chain)
        if axis is None:
            return "", -1
        return layer_of_node[layer], axis

    acts: list[ActSite] = []
    products: set[fx.Node] = set()  # gated products, already the site of their gate
    for node in nodes:
        c = kinds[node]
        if c is None or c[0] != "act" or node in products:
            continue
        act = recognised.get(node) or activation_of_node(gm, node) or ACTIVATIONS[c[1]]
        region_root = _root_of(node, recognised, gm)
        producer, cd = producer_of(region_root)
        site = ActSite(node.name, act.name, act.family, producer, cd, index[node],
                       owner(node) or producer, act)
        gate = _gated_product(node, site, kinds, gm, producer_of) if producer else None
        if gate is not None:
            mul, partner = gate
            g = gated(act.name)
            # the product is this site's node: marked an activation (so the up projection
            # is not observed as a bare layer output) but not visited again as one more site
            kinds[mul] = ("act", g.name)
            products.add(mul)
            site = ActSite(mul.name, g.name, g.family, producer, cd, index[mul],
                           owner(mul) or producer, g, partner)
        else:
            site.role = site_role(node, act, kinds, index)
        acts.append(site)
    for node, mod in layer_of_node.items():
        # a layer output that no activation follows is observed itself
        if not _follows_activation(node, kinds):
            kind = kinds[node][1]  # type: ignore[index]
            ax = _unit_axis(node, axis_of_layer[node], [])
            acts.append(ActSite(node.name, kind, "linear", mod, -1 if ax is None else ax,
                                index[node], mod))
    acts.sort(key=lambda s: s.order)
    # next layers of each layer (through non-layer nodes), for the "narrow layer" check
    by_name = {n.name: n for n in nodes}
    for ls in layers:
        ls.next_modules = _next_layers(by_name[ls.node], kinds, layer_of_node)
    return layers, acts


def _root_of(node: fx.Node, recognised: dict[fx.Node, Activation | None],
             gm: fx.GraphModule) -> Any:
    """The value an activation site is a function of: a recognised region's root (its first
    tensor input from outside the region), else the activation's input."""
    if node in recognised:
        seen = {node}
        todo = [node]
        while todo:
            for a in _tensor_inputs(gm, todo.pop()):
                if a in seen:
                    continue
                if recognised.get(a, 0) is None:  # an inner op
                    seen.add(a)
                    todo.append(a)
                else:
                    return a
    ins = _tensor_inputs(gm, node)
    return ins[0] if ins else None


_MUL = {aten.mul.Tensor, operator.mul, torch.mul}


def _gated_product(node: fx.Node, site: ActSite, kinds: dict[fx.Node, tuple[str, str] | None],
                   gm: fx.GraphModule, producer_of: Callable[[Any], tuple[str, int]]
                   ) -> tuple[fx.Node, str] | None:
    """``(product node, up projection)`` when the activation's only use is a product with
    another layer's output of the same shape (``act(gate(x)) * up(x)``), else None."""
    if site.family != "relu" or len(node.users) != 1:
        return None
    (mul,) = node.users
    if not ((mul.op == "call_function" and mul.target in _MUL) or
            (mul.op == "call_method" and mul.target == "mul")):
        return None
    others = [a for a in mul.args if isinstance(a, fx.Node) and a is not node]
    if len(others) != 1 or len(mul.args) != 2:
        return None
    partner, axis = producer_of(others[0])
    if not partner or partner == site.producer or axis != site.channel_dim:
        return None
    if _shape(others[0]) != _shape(node):
        return None
    return mul, partner


#: ops that only read a value's shape: they neither carry its values nor use them
_SHAPE_READ = {aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int}
#: ops a gate's values pass through unchanged on their way to the product (besides layout
#: ops): copies, dropout and broadcasts
_GATE_PASS = {aten.clone.default, aten.contiguous.default, aten._to_copy.default,
              aten.dropout.default, aten.expand.default, aten.expand_as.default, F.dropout,
              "contiguous", "expand", "expand_as", "clone"}
#: how many nodes a role walk visits at most (beyond it the role is unknown: "")
_ROLE_WALK = 512


def _reads_shape(u: fx.Node) -> bool:
    return (u.op == "call_function" and u.target in _SHAPE_READ) or (
        u.op == "call_method" and u.target in ("size", "dim"))


def site_role(node: fx.Node, act: Activation, kinds: dict[fx.Node, tuple[str, str] | None],
              index: dict[fx.Node, int]) -> str:
    """What the graph says the activation ``node`` is for (``SiteMeasure.role``):

    * ``"output"``: every value derived from it through non-layer ops reaches the graph's
      output and no parametrised layer (``kinds``: :func:`_classify` of the graph's nodes);
    * ``"gate"``: ``act`` is bounded below by 0 (sigmoid family) and its output, through
      layout/copy/broadcast ops only, is used solely as a factor of two-operand products whose
      other factor does not derive from it (squeeze-excite, GLU-style gates);
    * ``""`` otherwise, or when the walk is longer than ``_ROLE_WALK`` nodes.
    """
    if _is_output_head(node, kinds):
        return "output"
    if act.low == 0.0 and act.high is not None and _is_gate(node, kinds, index):
        return "gate"
    return ""


def _is_output_head(node: fx.Node, kinds: dict[fx.Node, tuple[str, str] | None]) -> bool:
    seen: set[fx.Node] = set()
    todo = [u for u in node.users if not _reads_shape(u)]
    reached = False
    while todo:
        u = todo.pop()
        if u in seen:
            continue
        seen.add(u)
        if len(seen) > _ROLE_WALK:
            return False
        if u.op == "output":
            reached = True
            continue
        c = kinds.get(u)
        if c is not None and c[0] == "layer":
            return False
        todo.extend(v for v in u.users if not _reads_shape(v))
    return reached


def _derives_from(value: Any, node: fx.Node, index: dict[fx.Node, int]) -> bool | None:
    """Whether ``value`` is computed from ``node`` (only nodes after ``node`` in graph order
    can be); None when the walk is too long to tell."""
    todo = [value] if isinstance(value, fx.Node) else []
    seen: set[fx.Node] = set()
    start = index[node]
    while todo:
        v = todo.pop()
        if v is node:
            return True
        if v in seen or index.get(v, -1) <= start:
            continue
        seen.add(v)
        if len(seen) > _ROLE_WALK:
            return None
        todo.extend(v.all_input_nodes)
    return False


def _is_gate(node: fx.Node, kinds: dict[fx.Node, tuple[str, str] | None],
             index: dict[fx.Node, int]) -> bool:
    frontier = [u for u in node.users if not _reads_shape(u)]
    seen: set[fx.Node] = set()
    products = 0
    while frontier:
        u = frontier.pop()
        if u in seen:
            continue
        seen.add(u)
        if len(seen) > _ROLE_WALK:
            return False
        c = kinds.get(u)
        passes = (c is not None and c[0] == "layout") or (
            u.op in ("call_function", "call_method") and u.target in _GATE_PASS)
        if passes:
            frontier.extend(v for v in u.users if not _reads_shape(v))
            continue
        is_mul = ((u.op == "call_function" and u.target in _MUL)
                  or (u.op == "call_method" and u.target == "mul"))
        if not is_mul or len(u.args) != 2 or u.kwargs:
            return False
        ins = [a for a in u.args if isinstance(a, fx.Node)]
        gates = [a for a in ins if a is node or a in seen]
        others = [a for a in ins if a not in gates]
        if len(gates) != 1 or len(others) != 1 or others[0].op == "get_attr":
            return False  # a product with a constant scales the gate; it gates nothing
        if _derives_from(others[0], node, index) is not False:
            return False
        products += 1
    return products > 0


def _follows_activation(node: fx.Node, kinds: dict[fx.Node, tuple[str, str] | None]) -> bool:
    """True when the layer's output flows (through transparent, layout and recognised
    pieces) into an activation."""
    frontier = list(node.users)
    for _ in range(_WALK):
        nxt: list[fx.Node] = []
        for u in frontier:
            c = kinds.get(u)
            if c and c[0] == "act":
                return True
            if c and c[0] in ("transparent", "layout", "inner"):
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
