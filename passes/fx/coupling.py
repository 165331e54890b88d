"""Channel coupling: which dimensions are bound to a layer's output units.

Changing a layer's output units (re-initialising, removing or adding them) changes every
dimension bound to them: the next layers' input features, per-channel norm layers in
between, residual-add operands, concat slices, reshapes into attention heads. This module
finds those bindings once, for every edit, instead of trusting hand-picked neighbours.

Two analyses return the same :class:`CouplingGroup`:

* :func:`analyze_fx` walks a ``torch.fx`` graph (``symbolic_trace``) forward from the
  producer's node with shapes from ``ShapeProp``, through channel-local operations
  (activations, dropout, BatchNorm, pooling, reductions over other dims, ``flatten`` of a
  channel-major layout, concat along the channel dim) to the layers that consume the units.
* :func:`probe_coupling` handles models ``symbolic_trace`` cannot capture (most Hugging Face
  models): it perturbs single output units of the producer with forward hooks, records which
  input columns of every leaf module changed, and then proves the result by checking that
  with the consumers' columns zeroed the perturbation no longer reaches the model output.

Anything not understood (a LayerNorm that mixes the units, a residual add, a reshape into
heads, a slice of the channel dim, an unknown op) is recorded in ``refusals`` with the
reason: callers refuse the edit rather than apply it halfway.

Index maps: unit ``c`` of the producer feeds columns ``start + c*S ... start + (c+1)*S - 1``
of a consumer's input (``S = 1`` for a plain Linear/Conv consumer; ``S = H*W`` after
flattening an ``(N, C, H, W)`` map).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

__all__ = [
    "ChannelOp",
    "Consumer",
    "CouplingGroup",
    "analyze",
    "analyze_fx",
    "column_dim",
    "is_conv1d",
    "is_layer",
    "probe_coupling",
    "producer_channel_dim",
    "trace",
    "unit_dim",
    "weight_rows",
]

_CHANNEL_LOCAL_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.Sigmoid, nn.Tanh, nn.SiLU, nn.ELU, nn.SELU,
    nn.CELU, nn.Softplus, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Mish, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)
_POOL_MODULES: tuple[type[nn.Module], ...] = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_MIXING_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.LocalResponseNorm)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: pads that fill with a value (ZeroPad*d subclasses ConstantPad*d); reflection and
#: replication pads repeat the unit's own values, so a constant unit stays constant
_FILL_PADS = (nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d)

_F = torch.nn.functional
_ELEMENTWISE_FUNCS: set[Any] = {
    _F.relu, _F.relu6, _F.leaky_relu, _F.gelu, _F.silu, _F.elu, _F.selu, _F.celu, _F.softplus,
    _F.hardtanh, _F.hardswish, _F.hardsigmoid, _F.mish, _F.dropout, _F.dropout1d, _F.dropout2d,
    _F.dropout3d, _F.sigmoid, _F.tanh, torch.relu, torch.sigmoid, torch.tanh, torch.exp,
    torch.abs, torch.neg, operator.neg, torch.square, torch.sqrt, torch.clamp, torch.clip,
    torch.nn.functional.alpha_dropout, torch.erf,
}
_ELEMENTWISE_METHODS = {
    "relu", "sigmoid", "tanh", "exp", "abs", "neg", "clamp", "clip", "square", "sqrt",
    "contiguous", "float", "to", "type_as", "clone", "detach", "erf",
}
_BINARY = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub,
           torch.mul, torch.div, operator.iadd, operator.imul}
_BINARY_METHODS = {"add", "sub", "mul", "div", "add_", "mul_"}
_POOL_FUNCS: set[Any] = {
    _F.adaptive_avg_pool1d, _F.adaptive_avg_pool2d, _F.adaptive_avg_pool3d, _F.avg_pool1d,
    _F.avg_pool2d, _F.avg_pool3d, _F.max_pool1d, _F.max_pool2d, _F.max_pool3d,
    _F.adaptive_max_pool1d, _F.adaptive_max_pool2d,
}
_REDUCE_FUNCS: set[Any] = {torch.mean, torch.sum, torch.amax, torch.amin}
#: norms of a tensor (as ``x.norm(dim=...)``, the method, is handled by name)
_NORM_FUNCS: set[Any] = {torch.norm, torch.linalg.norm, torch.linalg.vector_norm}
#: functional pads (as traced; the aten overloads for an exported GraphModule)
_PAD_FUNCS: set[Any] = {_F.pad, torch.constant_pad_nd, torch.ops.aten.pad.default,
                        torch.ops.aten.constant_pad_nd.default}
_REDUCE_METHODS = {"mean", "sum", "amax", "amin"}


@dataclass(frozen=True)
class Consumer:
    """A layer whose input features are bound to the producer's units.

    Unit ``c`` feeds input columns ``start + c*stride ... start + (c+1)*stride - 1`` (the
    weight's dim 1 for Linear and Conv).
    """

    module: str
    kind: str  # "linear" | "conv"
    start: int = 0
    stride: int = 1
    groups: int = 1  # a grouped conv reads input channel c with the rows of c's group only
    #: the units reach it zero-padded (a ZeroPad/ConstantPad module in the chain): a constant
    #: unit is not constant at the borders, so folding it into the bias is exact only inside
    padded: bool = False

    def columns(self, unit: int) -> list[int]:
        return list(range(self.start + unit * self.stride, self.start + (unit + 1) * self.stride))

    def weight_index(self, unit: int, weight_shape: Sequence[int]) -> tuple[slice, list[int]]:
        """``(rows, cols)`` of the consumer's weight that read ``unit``: every row and the
        unit's input columns, or for a grouped conv the rows of the unit's group and its
        columns within the group."""
        cols = self.columns(unit)
        if self.groups == 1:
            return slice(None), cols
        per_in = int(weight_shape[1])
        per_out = int(weight_shape[0]) // self.groups
        g = cols[0] // per_in
        if any(c // per_in != g for c in cols):
            raise ValueError(f"unit {unit} spans two groups of {self.module!r}")
        return slice(g * per_out, (g + 1) * per_out), [c - g * per_in for c in cols]


@dataclass(frozen=True)
class ChannelOp:
    """A channel-local operation between the producer and its consumers."""

    kind: str  # "activation" | "batchnorm" | "dropout" | "pool" | "reshape" | "reduce" | "pad"
    #           | "prelu" | "gate" | "other"
    op: str  # e.g. "relu", "BatchNorm2d", "flatten"
    module: str = ""  # module path for call_module ops, "" for functions
    node: str = ""


@dataclass
class CouplingGroup:
    """Everything bound to the output units of one producer layer.

    Attributes:
        producer: module path of the Linear/Conv whose output units are the subject.
        width: its number of output units.
        channel_dim: the dim of the producer's output that holds the units.
        consumers: layers whose input columns read the units.
        chain: channel-local operations between producer and consumers, in forward order.
        refusals: reasons the coupling is not fully understood (empty when it is).
        mixed: where the units meet another tensor on their way to a consumer (a residual
            add, a gate's product): the consumer's columns read more than the producer, so a
            width change of the producer alone cannot be made, and zeroing the columns cuts
            the other tensor as well (exact only where the columns are constant).
        probed: the units the probe perturbed (empty for the FX analysis, which is
            structural and holds for every unit).
        source: ``"fx"`` or ``"probe"``.
        partners: layers whose units multiply the producer's unit by unit before the
            consumers (a gated unit ``act(gate(x)) * up(x)``: the up projection is the gate's
            partner and the other way round). A product with a partner is not ``mixed``: the
            unit of the product is the gated unit, edited in producer and partners together.
        calls: how many times the producer runs per forward (a layer shared by repeated
            blocks, as ALBERT's, runs once per block): the group holds only when every call
            feeds the same consumers the same way, so one edit of the shared parameters acts
            alike on every call (whether the edited units are dead on every call is the
            editor's to check, see :func:`graphsurg.library._edit.coupled`).
    """

    producer: str
    width: int
    channel_dim: int
    consumers: list[Consumer] = field(default_factory=list)
    chain: list[ChannelOp] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)
    mixed: list[str] = field(default_factory=list)
    probed: tuple[int, ...] = ()
    source: str = "fx"
    partners: tuple[str, ...] = ()
    calls: int = 1

    @property
    def ok(self) -> bool:
        return not self.refusals and bool(self.consumers)

    def reason(self) -> str:
        """Why the group cannot be edited ('' when it can)."""
        if self.refusals:
            return "; ".join(dict.fromkeys(self.refusals))
        if not self.consumers:
            return f"no layer consumes the output units of {self.producer!r}"
        return ""

    def width_change_refusal(self) -> str:
        """Why the producer's width cannot change with its consumers ('' when it can)."""
        why = [f"the units meet another tensor ({m}); its width would have to change too"
               for m in self.mixed]
        why += [f"grouped conv {c.module!r} (groups={c.groups}) reads the units; its own width "
                "would change" for c in self.consumers if c.groups != 1]
        return "; ".join(why)

    def batchnorms(self) -> list[str]:
        return [op.module for op in self.chain if op.kind == "batchnorm"]

    def per_unit_modules(self) -> list[str]:
        """Modules in the chain whose parameters are per unit (BatchNorm, per-channel PReLU):
        a width change takes their parameters at the producer's index."""
        return [op.module for op in self.chain if op.kind in ("batchnorm", "prelu")]

    def activation(self) -> ChannelOp | None:
        acts = [op for op in self.chain if op.kind == "activation"]
        return acts[0] if acts else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "producer": self.producer,
            "width": self.width,
            "channel_dim": self.channel_dim,
            "consumers": [c.__dict__ for c in self.consumers],
            "chain": [c.__dict__ for c in self.chain],
            "refusals": list(self.refusals),
            "mixed": list(self.mixed),
            "probed": list(self.probed),
            "source": self.source,
            "partners": list(self.partners),
            "calls": self.calls,
        }


def is_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2, GPT-J's ancestors...): ``y = x @ W + b`` with ``W``
    of shape ``(in, out)`` -- a Linear with a transposed weight. Recognised by class name, its
    ``nf`` (output width) and the weight's shape, so transformers is never imported here."""
    w = getattr(module, "weight", None)
    nf = getattr(module, "nf", None)
    return (type(module).__name__ == "Conv1D" and isinstance(nf, int)
            and isinstance(w, torch.Tensor) and w.dim() == 2 and int(w.shape[1]) == nf)


def is_layer(module: nn.Module) -> bool:
    """A layer whose output units and input columns graphsurg edits: Linear, Conv1d/2d/3d or
    Hugging Face's ``Conv1D``."""
    return isinstance(module, (nn.Linear, *_CONV)) or is_conv1d(module)


def weight_rows(module: nn.Module) -> torch.Tensor:
    """The layer's weight as ``(out units, in columns, *kernel)``: the weight itself, or for a
    ``Conv1D`` its transpose -- a view, so in-place edits of the rows edit the weight."""
    w = module.weight
    assert isinstance(w, torch.Tensor)
    return w.t() if is_conv1d(module) else w


def unit_dim(module: nn.Module) -> int:
    """The dim of the layer's ``weight`` that holds its output units (1 for ``Conv1D``)."""
    return 1 if is_conv1d(module) else 0


def column_dim(module: nn.Module) -> int:
    """The dim of the layer's ``weight`` that holds its input columns (0 for ``Conv1D``)."""
    return 0 if is_conv1d(module) else 1


def producer_channel_dim(module: nn.Module) -> int:
    """The dim of a producer's output that holds its units: -1 for Linear/Conv1D, 1 for Conv."""
    return 1 if isinstance(module, _CONV) else -1


def _width(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return int(module.out_features)
    if isinstance(module, _CONV):
        return int(module.out_channels)
    if is_conv1d(module):
        return int(weight_rows(module).shape[0])
    raise TypeError(f"{type(module).__name__} is not a Linear or Conv layer")


def trace(model: nn.Module) -> tuple[fx.GraphModule | None, str]:
    """``symbolic_trace`` the model, or return ``(None, reason)`` when it cannot be traced."""
    if isinstance(model, fx.GraphModule):
        return model, ""
    try:
        return fx.symbolic_trace(model), ""
    except Exception as e:  # tracing failures are reported, not raised
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return None, f"torch.fx.symbolic_trace failed ({type(e).__name__}: {msg[:160]})"


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    tm = node.meta.get("tensor_meta")
    if tm is None or not hasattr(tm, "shape"):
        return None
    return tuple(int(s) for s in tm.shape)


def propagate_shapes(gm: fx.GraphModule, args: Sequence[Any], kwargs: dict[str, Any] | None = None
                     ) -> None:
    """Fill ``node.meta['tensor_meta']`` by running ``gm`` once on example inputs (no grad).

    Keyword inputs are matched to placeholders by name.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    values = list(args)
    kwargs = kwargs or {}
    for p in placeholders[len(values):]:
        if p.target in kwargs:
            values.append(kwargs[p.target])
        elif p.args:
            values.append(p.args[0])
        else:
            values.append(None)
    with torch.no_grad():
        ShapeProp(gm).propagate(*values)


@dataclass
class _Walk:
    """A tensor in flight: the node that holds it and where the units sit in it."""

    node: fx.Node
    dim: int  # positive index of the unit dim
    start: int
    stride: int


def analyze_fx(gm: fx.GraphModule, producer: str, partners: Iterable[str] = ()
               ) -> CouplingGroup:
    """The coupling group of ``producer`` in a shape-propagated GraphModule.

    ``gm`` must have ``tensor_meta`` on its nodes (see :func:`propagate_shapes`). A product
    with the output of one of ``partners`` (through channel-local ops) is a gated unit's
    product, followed as part of the unit (see :attr:`CouplingGroup.partners`).
    """
    mod = gm.get_submodule(producer)
    group = CouplingGroup(producer, _width(mod), producer_channel_dim(mod), source="fx",
                          partners=tuple(partners))
    nodes = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == producer]
    if not nodes:
        group.refusals.append(f"module {producer!r} is not called in the traced graph")
        return group
    calls = []
    for node in nodes:
        g = CouplingGroup(producer, group.width, group.channel_dim, source="fx",
                          partners=group.partners)
        _walk_fx(gm, g, node)
        if any(op.kind == "pad" for op in g.chain):
            g.consumers = [replace(c, padded=True) for c in g.consumers]
        calls.append(g)
    _merge_calls(group, calls)
    return group


def _walk_fx(gm: fx.GraphModule, group: CouplingGroup, node: fx.Node) -> None:
    """Follow the units from one call ``node`` of the producer to their consumers."""
    shape = _shape(node)
    if shape is None:
        group.refusals.append(f"no shape for node {node.name!r}")
        return
    ndim = len(shape)
    todo = [_Walk(node, group.channel_dim % ndim, 0, 1)]
    seen: set[str] = set()
    while todo:
        w = todo.pop()
        for user in list(w.node.users):
            key = f"{user.name}@{w.node.name}"
            if key in seen:
                continue
            seen.add(key)
            nxt = _step(gm, group, w, user)
            if nxt is not None:
                todo.append(nxt)


# --------------------------------------------------------------------------------------------
# one handler per op (Torch-Pruning's "one handler per layer type"): the walk looks up what a
# node does to the units in three tables -- module class, function, tensor method -- and an op
# with no handler is refused with the node and the reason, never guessed at.


@dataclass
class _Step:
    """One edge of the walk: the units, held by ``w.node``, flow into ``user``."""

    gm: fx.GraphModule
    group: CouplingGroup
    w: _Walk
    user: fx.Node
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...] | None
    op: str  # module path (call_module) or function / method name, for messages
    module: nn.Module | None = None

    def refuse(self, msg: str) -> None:
        self.group.refusals.append(msg)

    def consume(self, kind: str, stride: int) -> None:
        """``user`` is a layer reading the units as its input columns: the walk ends here."""
        self.group.consumers.append(Consumer(self.op, kind, self.w.start, stride))

    def follow(self, kind: str | None, op: str = "", *, dim: int | None = None,
               start: int | None = None, stride: int | None = None) -> _Walk:
        """Continue through ``user`` (recorded in the chain as ``kind`` unless None), with the
        units at ``dim`` / ``start`` / ``stride`` (default: where they were)."""
        if kind is not None:
            module = self.op if self.module is not None else ""
            self.group.chain.append(ChannelOp(kind, op or self.op, module, self.user.name))
        w = self.w
        return _Walk(self.user, w.dim if dim is None else dim,
                     w.start if start is None else start, w.stride if stride is None else stride)


_Handler = Callable[[_Step], "_Walk | None"]


# -- modules


def _linear(s: _Step) -> _Walk | None:
    last = len(s.in_shape) - 1
    if s.w.dim != last:
        s.refuse(f"Linear {s.op!r} reads dim {last}, the units are on dim {s.w.dim}")
    else:
        s.consume("linear", s.w.stride)
    return None


def _conv(s: _Step) -> _Walk | None:
    groups = int(getattr(s.module, "groups", 1))
    if s.w.dim != 1 or s.w.stride != 1:
        s.refuse(f"conv {s.op!r} (groups={groups}) does not read the units as plain input "
                 "channels")
    else:
        s.group.consumers.append(Consumer(s.op, "conv", s.w.start, 1, groups))
    return None


def _batchnorm(s: _Step) -> _Walk | None:
    if s.w.dim != 1 or s.w.stride != 1 or s.w.start != 0:
        s.refuse(f"BatchNorm {s.op!r} normalises dim 1, the units sit elsewhere")
        return None
    return s.follow("batchnorm", type(s.module).__name__)


def _local_module(s: _Step) -> _Walk | None:
    cls = type(s.module).__name__
    kind = "dropout" if "Dropout" in cls else (
        "other" if isinstance(s.module, nn.Identity) else "activation")
    return s.follow(kind, cls.lower())


def _prelu(s: _Step) -> _Walk | None:
    if getattr(s.module, "num_parameters", 0) == 1:  # one slope for all units: channel-local
        return _local_module(s)
    # one slope per channel of dim 1 (as MTCNN's trained nets use it): the slopes follow the
    # units, like a BatchNorm's parameters -- a width change takes them at the same index
    if s.w.dim != 1 or s.w.stride != 1 or s.w.start != 0:
        s.refuse(f"PReLU {s.op!r} has one slope per channel of dim 1; the units sit elsewhere")
        return None
    return s.follow("prelu", "prelu")


def _pad_module(s: _Step) -> _Walk | None:
    """Padding of the trailing dims: channel-local unless the units sit on a padded dim."""
    padded = len(getattr(s.module, "padding", ())) // 2
    if s.w.dim >= len(s.in_shape) - padded:
        s.refuse(f"{type(s.module).__name__} {s.op!r} pads the unit dim")
        return None
    kind = "pad" if isinstance(s.module, _FILL_PADS) else "other"
    return s.follow(kind, type(s.module).__name__.lower())


def _pad_function(s: _Step) -> _Walk | None:
    """``F.pad`` / ``aten.pad`` / ``aten.constant_pad_nd``: the pad list pads the trailing
    dims (last dim first); channel-local unless the units sit on a dim padded by a non-zero
    amount. A constant-mode pad fills the border with a value, recorded as ``"pad"`` (its
    consumers see the units ``padded``); reflect / replicate / circular repeat the units' own
    values."""
    user = s.user
    raw: Any = user.kwargs.get("pad", user.args[1] if len(user.args) > 1 else None)
    mode: Any = user.kwargs.get("mode", user.args[2] if len(user.args) > 2 else "constant")
    if "constant_pad_nd" in s.op:
        mode = "constant"
    if not isinstance(raw, list | tuple) or len(raw) % 2 or not all(
            isinstance(p, int) for p in raw) or not isinstance(mode, str):
        s.refuse(f"pad at {user.name!r} has a pad list the coupling analysis cannot read "
                 f"({raw!r}, mode {mode!r})")
        return None
    ndim = len(s.in_shape)
    at = ndim - 1 - s.w.dim  # the unit dim's pair in the pad list (last dim first)
    if 2 * at + 1 < len(raw) and (raw[2 * at] or raw[2 * at + 1]):
        s.refuse(f"pad at {user.name!r} pads the unit dim {s.w.dim} by "
                 f"({raw[2 * at]}, {raw[2 * at + 1]})")
        return None
    return s.follow("pad" if mode == "constant" else "other", f"pad({mode})")


def _pool_module(s: _Step) -> _Walk | None:
    if s.w.dim != 1:
        s.refuse(f"pooling {s.op!r} over the unit dim")
        return None
    return s.follow("pool", type(s.module).__name__)


def _mixing_norm(s: _Step) -> _Walk | None:
    s.refuse(f"{type(s.module).__name__} {s.op!r} normalises across the units of "
             f"{s.group.producer!r} (changing one unit changes them all)")
    return None


def _unknown_module(s: _Step) -> _Walk | None:
    s.refuse(f"module {s.op!r} ({type(s.module).__name__}) consumes the units; the coupling "
             "analysis does not know it")
    return None


# -- functions and tensor methods


def _tensor_args(s: _Step) -> list[fx.Node]:
    return [a for a in s.user.all_input_nodes if _shape(a) is not None]


def _elementwise(s: _Step) -> _Walk | None:
    if len(_tensor_args(s)) > 1:
        s.refuse(f"{s.op} at {s.user.name!r} mixes the units with another tensor")
        return None
    return s.follow("dropout" if "dropout" in s.op else "activation")


def _norm_dims(node: fx.Node, ndim: int) -> list[int] | None:
    """The dims a ``norm`` / ``vector_norm`` / ``F.normalize`` node reduces (None: all)."""
    # every one of them is (input, p / ord, dim, ...); F.normalize's dim defaults to 1
    dims: Any = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else (
        1 if node.target is _F.normalize else None))
    if dims is None:
        return None
    return [int(d) % ndim for d in (dims if isinstance(dims, list | tuple) else [dims])]


def _normalisation(s: _Step, at: fx.Node) -> None:
    """The units are divided by a norm taken over them (``x / x.norm(dim)``,
    ``F.normalize``): every output element depends on every unit, so no edit of some units
    keeps the function; refused, saying whether the normalised units are the model output
    (then an excision would change its width too)."""
    out = _reaches_output(at)
    if out:
        s.refuse(f"the units of {s.group.producer!r} are model outputs (through an L2 "
                 f"normalisation at {at.name!r}): no surgery keeps the function (a reset "
                 "changes the output, an excision its width)")
    else:
        s.refuse(f"L2 normalisation at {at.name!r} divides the units of {s.group.producer!r} "
                 "by their norm (changing one unit changes them all)")


def _reaches_output(node: fx.Node) -> bool:
    """True when ``node`` is returned by the graph, directly or through one-input functions
    or methods that keep its shape (a cast, a clone; never a module)."""
    todo, seen = [node], set()
    while todo:
        n = todo.pop()
        for u in n.users:
            if u.op == "output":
                return True
            if u.name not in seen and u.op != "call_module" and len(_tensor_args_of(u)) == 1 \
                    and _shape(u) == _shape(n):
                seen.add(u.name)
                todo.append(u)
    return False


def _tensor_args_of(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.all_input_nodes if _shape(a) is not None]


def _is_own_norm(other: fx.Node, w: _Walk, ndim: int) -> bool:
    """``other`` is a norm of the units' tensor taken over the unit dim."""
    is_norm = (other.op == "call_method" and other.target == "norm") or (
        other.op == "call_function" and other.target in _NORM_FUNCS)
    if not is_norm or not other.args or other.args[0] is not w.node:
        return False
    dims = _norm_dims(other, ndim)
    return dims is None or w.dim in dims


def _norm(s: _Step) -> _Walk | None:
    """A norm over the units: silent when it only divides its own input (the division is
    the normalisation, refused there), else refused as mixing the units."""
    dims = _norm_dims(s.user, len(s.in_shape))
    if dims is not None and s.w.dim not in dims:
        return _unknown(s)
    divides = [u for u in s.user.users
               if (u.op == "call_function" and u.target in (operator.truediv, torch.div))
               or (u.op == "call_method" and u.target == "div")]
    if divides and len(divides) == len(s.user.users) and all(
            u.args and u.args[0] is s.w.node for u in divides):
        return None
    s.refuse(f"norm at {s.user.name!r} reduces over the units of {s.group.producer!r}")
    return None


def _normalize(s: _Step) -> _Walk | None:
    dims = _norm_dims(s.user, len(s.in_shape))
    if dims is not None and s.w.dim not in dims:
        return s.follow("other")
    _normalisation(s, s.user)
    return None


def _binary(s: _Step) -> _Walk | None:
    others = [a for a in _tensor_args(s) if a is not s.w.node]
    if (s.op in ("truediv", "div") and len(others) == 1 and s.user.args
            and s.user.args[0] is s.w.node and _is_own_norm(others[0], s.w, len(s.in_shape))):
        _normalisation(s, s.user)
        return None
    if not others or all(_shape(a) in ((), (1,)) for a in others):  # a scalar operand
        return s.follow("other")
    if (s.op in ("mul", "imul", "mul_") and len(others) == 1 and s.group.partners
            and _shape(others[0]) == s.in_shape and s.out_shape == s.in_shape
            and _partner_of(s.gm, others[0], s.group.partners)):
        return s.follow("gate", "mul")
    s.refuse(f"residual {s.op} at {s.user.name!r} binds the units of {s.group.producer!r} "
             f"to {', '.join(repr(a.name) for a in others)} (a residual stream)")
    return None


def _partner_of(gm: fx.GraphModule, node: fx.Node, partners: Sequence[str]) -> bool:
    """True when ``node`` is a partner layer's output, directly or through channel-local
    one-input ops (an activation, dropout, a dtype cast)."""
    for _ in range(_PARTNER_WALK):
        if node.op == "call_module" and node.target in partners:
            return True
        ins = [a for a in node.all_input_nodes if _shape(a) is not None]
        local = (node.op == "call_function" and node.target in _ELEMENTWISE_FUNCS) or (
            node.op == "call_method" and node.target in _ELEMENTWISE_METHODS) or (
            node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)),
                                                    _CHANNEL_LOCAL_MODULES))
        if not local or len(ins) != 1 or _shape(ins[0]) != _shape(node):
            return False
        node = ins[0]
    return False


#: how many channel-local ops may sit between a partner layer and the gate's product
_PARTNER_WALK = 8


def _pool(s: _Step) -> _Walk | None:
    if s.w.dim != 1:
        s.refuse(f"pooling at {s.user.name!r} over the unit dim")
        return None
    return s.follow("pool")


def _reduce(s: _Step) -> _Walk | None:
    user = s.user
    dims: Any = user.kwargs.get("dim", user.args[1] if len(user.args) > 1 else None)
    keep = bool(user.kwargs.get("keepdim", user.args[2] if len(user.args) > 2 else False))
    if dims is None:
        s.refuse(f"{s.op} at {user.name!r} reduces over the units")
        return None
    ds = [d % len(s.in_shape) for d in (dims if isinstance(dims, list | tuple) else [dims])]
    if s.w.dim in ds:
        s.refuse(f"{s.op} at {user.name!r} reduces over the units")
        return None
    new_dim = s.w.dim if keep else s.w.dim - sum(1 for d in ds if d < s.w.dim)
    return s.follow("reduce", dim=new_dim)


def _reshape(s: _Step) -> _Walk | None:
    """Follow the unit dim through flatten/view/reshape (merging it with trailing dims)."""
    if s.out_shape is None:
        return _unknown(s)
    w, in_shape, out_shape, user = s.w, s.in_shape, s.out_shape, s.user
    # the dims before the unit dim must be kept as they are
    if tuple(out_shape[: w.dim]) != tuple(in_shape[: w.dim]):
        s.refuse(f"{s.op} at {user.name!r} reshapes the dims before the units")
        return None
    rest_in = in_shape[w.dim:]
    rest_out = out_shape[w.dim:]
    if rest_in == rest_out:
        return s.follow(None)
    if len(rest_out) >= 1 and rest_out[0] == _prod(rest_in[: len(rest_in) - len(rest_out) + 1]) \
            and tuple(rest_out[1:]) == tuple(rest_in[len(rest_in) - len(rest_out) + 1:]):
        merged = _prod(rest_in[1: len(rest_in) - len(rest_out) + 1])
        return s.follow("reshape", start=w.start * merged, stride=w.stride * merged)
    if len(rest_out) > len(rest_in) and rest_out[0] * rest_out[1] == rest_in[0]:
        s.refuse(f"{s.op} at {user.name!r} splits the units into heads "
                 f"({rest_out[0]} x {rest_out[1]}); edit whole heads instead")
        return None
    s.refuse(f"{s.op} at {user.name!r} ({list(in_shape)} -> {list(out_shape)}) is not "
             "understood by the coupling analysis")
    return None


def _transpose(s: _Step) -> _Walk | None:
    if s.out_shape is None:
        return _unknown(s)
    targs: Any = s.user.args[1:3]
    a, b = (int(x) % len(s.in_shape) for x in targs)
    perm = list(range(len(s.in_shape)))
    perm[a], perm[b] = perm[b], perm[a]
    return s.follow("reshape", dim=perm.index(s.w.dim))


def _permute(s: _Step) -> _Walk | None:
    if s.out_shape is None:
        return _unknown(s)
    args = s.user.args
    raw: Any = args[1] if isinstance(args[1], list | tuple) else args[1:]
    perm = [int(x) % len(s.in_shape) for x in raw]
    return s.follow("reshape", dim=perm.index(s.w.dim))


def _cat(s: _Step) -> _Walk | None:
    user, w = s.user, s.w
    seq = user.args[0]
    dim_arg: Any = user.kwargs.get("dim", user.args[1] if len(user.args) > 1 else 0)
    dim = int(dim_arg) % len(s.in_shape)
    if dim != w.dim:
        s.refuse(f"cat at {user.name!r} along dim {dim} stacks the units with other tensors "
                 "(they would have to change together)")
        return None
    offset = 0
    assert isinstance(seq, list | tuple)
    for a in seq:
        if a is w.node:
            break
        shape = _shape(a) if isinstance(a, fx.Node) else None
        if shape is None:
            s.refuse(f"cat at {user.name!r} has an input without a shape")
            return None
        offset += shape[dim]
    return s.follow("reshape", "cat", start=w.start + offset * w.stride)


def _getitem(s: _Step) -> _Walk | None:
    s.refuse(f"indexing at {s.user.name!r} is not followed by the coupling analysis")
    return None


def _unknown(s: _Step) -> _Walk | None:
    s.refuse(f"node {s.user.name!r} ({s.op}) is not understood by the coupling analysis")
    return None


def _table(*rows: tuple[Iterable[Any], _Handler]) -> dict[Any, _Handler]:
    """A handler table from ``(keys, handler)`` rows; a key listed twice is a bug here."""
    table: dict[Any, _Handler] = {}
    for keys, handler in rows:
        for k in keys:
            if k in table:
                raise AssertionError(f"coupling: {k!r} has two handlers")
            table[k] = handler
    return table


_MODULE_HANDLERS = _table(
    ((nn.Linear,), _linear),
    (_CONV, _conv),
    (_BN, _batchnorm),
    (_CHANNEL_LOCAL_MODULES, _local_module),
    ((nn.PReLU,), _prelu),
    (_POOL_MODULES, _pool_module),
    ((nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d, nn.ReflectionPad1d,
      nn.ReflectionPad2d, nn.ReflectionPad3d, nn.ReplicationPad1d, nn.ReplicationPad2d,
      nn.ReplicationPad3d), _pad_module),
    (_MIXING_NORMS, _mixing_norm),
)
_FUNCTION_HANDLERS = _table(
    (_ELEMENTWISE_FUNCS, _elementwise),
    (_BINARY, _binary),
    (_POOL_FUNCS, _pool),
    (_REDUCE_FUNCS, _reduce),
    ((torch.flatten, torch.reshape), _reshape),
    ((torch.transpose,), _transpose),
    ((torch.permute,), _permute),
    ((torch.cat,), _cat),
    ((operator.getitem,), _getitem),
    (_PAD_FUNCS, _pad_function),
    (_NORM_FUNCS, _norm),
    ((_F.normalize,), _normalize),
)
_METHOD_HANDLERS = _table(
    (_ELEMENTWISE_METHODS, _elementwise),
    (_BINARY_METHODS, _binary),
    (_REDUCE_METHODS, _reduce),
    (("flatten", "view", "reshape"), _reshape),
    (("transpose",), _transpose),
    (("permute",), _permute),
    (("norm",), _norm),
)


def _module_handler(m: nn.Module) -> _Handler:
    if is_conv1d(m):  # Hugging Face's Conv1D reads the last dim, as a Linear does
        return _linear
    for cls in type(m).__mro__:  # a subclass of a known layer is handled as that layer
        handler = _MODULE_HANDLERS.get(cls)
        if handler is not None:
            return handler
    return _unknown_module


def _step(gm: fx.GraphModule, group: CouplingGroup, w: _Walk, user: fx.Node) -> _Walk | None:
    """Follow the units from ``w.node`` into ``user``; return the new position or None."""
    in_shape = _shape(w.node)
    assert in_shape is not None
    if user.op == "output":
        group.refusals.append(f"the units of {group.producer!r} reach the model output "
                              f"directly (via {w.node.name!r})")
        return None
    fn = user.target
    name = fn if isinstance(fn, str) else getattr(fn, "__name__", str(fn))
    s = _Step(gm, group, w, user, in_shape, _shape(user), str(name))
    if user.op == "call_module":
        s.module = gm.get_submodule(str(fn))
        return _module_handler(s.module)(s)
    if user.op == "call_function":
        return _FUNCTION_HANDLERS.get(fn, _unknown)(s)
    if user.op == "call_method":
        return _METHOD_HANDLERS.get(fn, _unknown)(s)
    group.refusals.append(f"node {user.name!r} ({user.op}) is not understood")
    return None


def _prod(xs: Sequence[int]) -> int:
    p = 1
    for x in xs:
        p *= int(x)
    return p


# --------------------------------------------------------------------------------------------
# probe (no graph): perturb units, watch which input columns change


def _float_leaves(out: Any) -> list[torch.Tensor]:
    leaves, _ = torch.utils._pytree.tree_flatten(out)
    if hasattr(out, "to_tuple"):  # transformers ModelOutput
        leaves, _ = torch.utils._pytree.tree_flatten(out.to_tuple())
    return [t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _in_dim(m: nn.Module, x: torch.Tensor, like: torch.Tensor | None = None,
            channel_dim: int = -1) -> int:
    """The dim of ``m``'s input ``x`` that holds features: 1 for Conv/BatchNorm, the last for
    Linear; for any other module the producer's unit dim when ``x`` has the producer's output
    shape (``like``), else the last."""
    if isinstance(m, _CONV) or isinstance(m, _BN):
        return 1
    if like is not None and not is_layer(m) and x.shape == like.shape:
        return channel_dim % x.dim()
    return x.dim() - 1


#: perturbations tried per probed unit, as multiples of the base size (see
#: :func:`_probe_delta`): a unit held dead by a large negative pre-activation needs a large
#: positive push, one behind a negative BatchNorm scale a negative one
_PROBE_SCALES = (1.0, -1.0, 1e3, -1e3)


def probe_coupling(model: nn.Module, producer: str, run: Callable[[nn.Module], Any],
                   *, units: Iterable[int] = (), tol: float = 1e-6,
                   partners: Iterable[str] = ()) -> CouplingGroup:
    """The coupling group of ``producer`` measured by perturbing its units (no graph needed).

    Args:
        model: the model (its mode is switched to eval during the probe and restored; its
            parameters are restored bit for bit).
        producer: module path of a Linear/Conv layer.
        run: ``run(model)`` runs the model on one calibration batch and returns its output.
        units: the units that will be edited. Each is probed, together with units 0 and
            ``width - 1`` (which fix the index map): coupling is measured where the edit
            happens, not extrapolated from two samples.
        tol: a column changed when some element moved by more than ``tol`` (relative).
        partners: layers whose units multiply the producer's (a gated unit's up projection
            for its gate, see :attr:`CouplingGroup.partners`): a probed unit is perturbed in
            them too (the gated unit is probed whole: a dead gate's zero would stop a
            perturbation of the up projection alone), and they are held at their per-unit
            mean too in the run that measures ``mixed``, so a product with them is not mixing.

    A module called more than once per forward (a layer shared by repeated blocks) is probed
    on each call alone (the perturbation goes to that call only) and understood only when
    every call feeds the same consumers through the same index maps (see
    :attr:`CouplingGroup.calls`).

    A perturbation that a zero BatchNorm scale would stop (a channel killed through its norm)
    is let through: while probing, BatchNorm scales that are exactly 0 read as 1. A unit whose
    perturbation reaches no layer, or reaches a layer the other probed units do not, is a
    refusal naming the units.

    The group is proven, not assumed: with every consumer's columns of a probed unit zeroed,
    perturbing that unit must leave the model output unchanged; otherwise a refusal says the
    unit reaches the output some other way. Whether the consumers read the units *alone* is
    measured too: with the producer's output (and the partners') held at a per-unit
    constant, a consumer whose input still varies over the batch reads the units together
    with another tensor (a residual add, a gate), recorded in ``mixed``.
    """
    mod = model.get_submodule(producer)
    partners = tuple(p for p in partners if p != producer)
    group = CouplingGroup(producer, _width(mod), producer_channel_dim(mod), source="probe",
                          partners=partners)
    probes = sorted({0, group.width - 1} | {int(u) for u in units if 0 <= int(u) < group.width})
    group.probed = tuple(probes)
    leaves = {name: m for name, m in model.named_modules()
              if name != producer and not list(m.children())}
    records: dict[str, list[torch.Tensor]] = {}
    # "call": the producer's call (0, 1, ... within one forward) a unit perturbation goes to;
    # "seen" / "pseen": its calls and each partner's so far in the current forward
    # "tick" orders the hooks' calls in the unperturbed run: "ticks" per leaf call, "at" per
    # producer call (a leaf call after a producer call is downstream of it)
    state: dict[str, Any] = {"mode": None, "unit": 0, "delta": 0.0, "call": 0, "seen": 0,
                             "pseen": {}, "outs": [], "tick": 0, "ticks": {}, "at": []}

    def pre_hook(name: str) -> Callable[..., None]:
        def hook(m: nn.Module, args: tuple[Any, ...]) -> None:
            if args and isinstance(args[0], torch.Tensor):
                records.setdefault(name, []).append(args[0].detach().clone())
                if state["mode"] is None:
                    state["tick"] += 1
                    state["ticks"].setdefault(name, []).append(state["tick"])
        return hook

    def edit(out: torch.Tensor, cd: int, k: int) -> torch.Tensor:
        """The output of call ``k`` of the producer or a partner, as the mode wants it."""
        if state["mode"] == "constant":
            return out.mean([d for d in range(out.dim()) if d != cd], keepdim=True
                            ).expand_as(out).clone()
        if state["mode"] == "unit" and k == state["call"]:
            out = out.clone()
            idx: list[Any] = [slice(None)] * out.dim()
            idx[cd] = state["unit"]
            out[tuple(idx)] += state["delta"]
        return out

    def fwd_hook(m: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
        k = state["seen"]
        state["seen"] += 1
        if state["mode"] is None:
            state["outs"].append(out.detach())
            state["tick"] += 1
            state["at"].append(state["tick"])
            return out
        return edit(out, group.channel_dim % out.dim(), k)

    def perturbed(u: int | None, delta: float = 0.0, mode: str | None = "unit") -> Any:
        records.clear()
        state["mode"] = "constant" if mode == "constant" else (None if u is None else "unit")
        state["unit"], state["delta"] = u, delta
        state["seen"], state["pseen"] = 0, {}
        try:
            return run(model)
        finally:
            state["mode"] = None

    def partner_hook(name: str) -> Callable[..., torch.Tensor]:
        def hook(m: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
            # the gated unit is probed whole (gate and up together, on the same call)
            k = state["pseen"].get(name, 0)
            state["pseen"][name] = k + 1
            return edit(out, producer_channel_dim(m) % out.dim(), k)
        return hook

    for p in partners:
        try:
            pm = model.get_submodule(p)
        except AttributeError:
            group.refusals.append(f"the model has no module {p!r} (the partner of "
                                  f"{producer!r})")
            return group
        if not is_layer(pm) or _width(pm) != group.width:
            group.refusals.append(f"partner {p!r} of {producer!r} is not a layer of its width "
                                  f"{group.width} ({type(pm).__name__})")
            return group
    handles = [m.register_forward_pre_hook(pre_hook(n)) for n, m in leaves.items()]
    handles.append(mod.register_forward_hook(fwd_hook))
    handles += [model.get_submodule(p).register_forward_hook(partner_hook(p)) for p in partners]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _open_zero_bn_scales(model):
            perturbed(None)
            base = dict(records)
            outs, ticks = list(state["outs"]), dict(state["ticks"])
            if not outs:
                group.refusals.append(f"module {producer!r} is not called when the model runs")
                return group
            calls = []
            for k, out in enumerate(outs):
                state["call"] = k
                after = sum(t > state["at"][k] for ts in ticks.values() for t in ts)
                calls.append(_probe_call(group, model, probes, leaves, base, records,
                                         perturbed, out, tol, after))
            _merge_calls(group, calls)
            if group.consumers and not group.refusals:
                perturbed(None, mode="constant")
                _mixed_from_constant(group, leaves, records, tol)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return group


def _probe_call(group: CouplingGroup, model: nn.Module, probes: list[int],
                leaves: dict[str, nn.Module], base: dict[str, list[torch.Tensor]],
                records: dict[str, list[torch.Tensor]], perturbed: Callable[..., Any],
                out: torch.Tensor, tol: float, downstream: int) -> CouplingGroup:
    """The coupling of one call of the producer (``perturbed`` sends a unit's perturbation to
    that call only; ``out`` is that call's output; ``downstream`` leaf calls follow it)."""
    g = CouplingGroup(group.producer, group.width, group.channel_dim, source="probe",
                      partners=group.partners, probed=group.probed)
    found, chain, deltas = _probe_units(g, probes, leaves, base, records, perturbed, out, tol,
                                        downstream)
    odd = _consumers_from_spans(g, probes, leaves, found)
    proof = _Proof(g, model, probes, deltas, perturbed, records, tol)
    if len(g.consumers) > 1 and not g.refusals:
        proof.drop_downstream_consumers()
    upstream = proof.run() if g.consumers and not g.refusals else set(leaves)
    # a layer read through an odd index map matters only where the units reach it
    # directly (not through a consumer: e.g. a squeeze-excite conv after a grouped one)
    g.refusals += [why for name, why in odd.items() if name in upstream]
    _chain_from_probe(g, leaves, {k: v for k, v in chain.items() if k in upstream}, found)
    if any(op.kind == "pad" for op in g.chain):
        g.consumers = [replace(c, padded=True) for c in g.consumers]
    return g


def _merge_calls(group: CouplingGroup, calls: list[CouplingGroup]) -> None:
    """One group from the groups of every call of the producer (a layer shared by repeated
    blocks, as ALBERT's): understood when every call is understood and feeds the same
    consumers through the same index maps and chain -- then an edit of the shared parameters
    (the producer's rows, the consumers' columns) acts alike on every call."""
    n = group.calls = len(calls)
    for k, g in enumerate(calls):
        group.refusals += [why if n == 1 else f"call {k} of {n}: {why}" for why in g.refusals]
    first = calls[0]
    group.consumers, group.chain = list(first.consumers), list(first.chain)
    if group.refusals or n == 1:
        return
    key0 = sorted((c.module, c.start, c.stride, c.groups) for c in first.consumers)
    chain0 = [(op.kind, op.module) for op in first.chain]
    for k, g in enumerate(calls[1:], 1):
        key = sorted((c.module, c.start, c.stride, c.groups) for c in g.consumers)
        if key != key0:
            group.refusals.append(
                f"module {group.producer!r} is called {n} times and its calls feed different "
                f"consumers (call 0: {[c[0] for c in key0]}, call {k}: {[c[0] for c in key]}):"
                " an edit of its shared weights cannot suit every call")
        elif [(op.kind, op.module) for op in g.chain] != chain0:
            group.refusals.append(
                f"module {group.producer!r} is called {n} times and its units pass through "
                f"different operations on call 0 and call {k}")


class _open_zero_bn_scales:
    """While active, BatchNorm scales that are exactly 0 are 1 (restored on exit)."""

    def __init__(self, model: nn.Module) -> None:
        self.saved: list[tuple[torch.Tensor, torch.Tensor]] = []
        for m in model.modules():
            w = getattr(m, "weight", None)
            if isinstance(m, _BN) and isinstance(w, torch.Tensor) and bool((w == 0).any()):
                self.saved.append((w, w.detach().clone()))

    def __enter__(self) -> None:
        with torch.no_grad():
            for w, _ in self.saved:
                w.masked_fill_(w == 0, 1.0)

    def __exit__(self, *exc: object) -> None:
        with torch.no_grad():
            for w, old in self.saved:
                w.copy_(old)


def _probe_units(group: CouplingGroup, probes: list[int], leaves: dict[str, nn.Module],
                 base: dict[str, list[torch.Tensor]], records: dict[str, list[torch.Tensor]],
                 perturbed: Callable[..., Any], out: torch.Tensor, tol: float,
                 downstream: int | None = None
                 ) -> tuple[dict[str, dict[int, tuple[int, int]]], dict[str, str],
                            dict[int, float]]:
    """Perturb each probed unit; return, per leaf, the changed column span per unit (layers),
    the leaves that saw only the unit's own column (the channel-local chain) and the delta
    that got through per unit. A unit that reaches no leaf is a refusal.

    Of the perturbation sizes (:data:`_PROBE_SCALES`) the one that reaches the most leaf
    calls is kept (the first on a tie; trying stops once all ``downstream`` leaf calls are
    reached): a size too small to wake a dead unit (SiLU(-23) ~ 1e-9 after a BatchNorm)
    leaves only rounding ripples that surface a few layers downstream, past the layers that
    really read the unit, and would be read as a slice of the units."""
    found: dict[str, dict[int, tuple[int, int]]] = {}
    chain: dict[str, str] = {}
    deltas: dict[int, float] = {}
    blocked: list[int] = []
    for u in probes:
        size = _probe_delta(out, group.channel_dim, u)
        best: tuple[int, float, dict[str, tuple[int, int]], dict[str, str]] | None = None
        for scale in _PROBE_SCALES:
            perturbed(u, scale * size)
            hit, reach, spans, local_ops = False, 0, {}, {}
            for name, xs in records.items():
                m = leaves[name]
                for x, x0 in zip(xs, base.get(name, []), strict=False):
                    if x.shape != x0.shape:
                        continue
                    diff = (x - x0).abs() > tol * (1.0 + x0.abs())
                    if not diff.any():
                        continue
                    reach += 1
                    d = _in_dim(m, x, out, group.channel_dim)
                    cols = [int(c) for c in
                            diff.movedim(d, 0).reshape(x.shape[d], -1).any(1).nonzero().flatten()]
                    lo, hi = cols[0], cols[-1]
                    local = len(cols) == 1 and lo == u and not is_layer(m)
                    hit = hit or not local  # past the channel-local chain
                    if is_layer(m) and hi - lo + 1 == len(cols) and \
                            len(cols) < x.shape[d]:
                        spans[name] = (lo, len(cols))
                    elif local:
                        local_ops[name] = type(m).__name__
            if hit and (best is None or reach > best[0]):
                best = (reach, scale * size, spans, local_ops)
            if best is not None and downstream is not None and best[0] >= downstream:
                break
        if best is None:
            blocked.append(u)
            continue
        deltas[u] = best[1]
        for name, span in best[2].items():
            found.setdefault(name, {})[u] = span
        chain.update(best[3])
    if blocked:
        group.refusals.append(f"perturbing units {blocked} of {group.producer!r} changed no "
                              "layer's input (the units are cut off, or read by something the "
                              "probe cannot see)")
    return found, chain, deltas


def _consumers_from_spans(group: CouplingGroup, probes: list[int], leaves: dict[str, nn.Module],
                          found: dict[str, dict[int, tuple[int, int]]]) -> dict[str, str]:
    """Consumers from the column spans each probed unit changed: every probed unit must hit
    the layer, with one stride and ``start + u * stride`` as the first column. Returns the
    other layers the units changed, with why they are not consumers (a refusal where the
    units reach them directly)."""
    odd: dict[str, str] = {}
    for name, spans in found.items():
        m = leaves[name]
        missing = [u for u in probes if u not in spans]
        if missing:
            odd[name] = (
                f"layer {name!r} reads units {sorted(spans)} of {group.producer!r} but not "
                f"units {missing} (a slice or a gather of the units)")
            continue
        stride = spans[probes[0]][1]
        start = spans[probes[0]][0] - probes[0] * stride
        if any(n != stride or lo != start + u * stride for u, (lo, n) in spans.items()):
            odd[name] = (f"layer {name!r} reads the units through an index map the probe "
                         "does not understand")
            continue
        groups = int(getattr(m, "groups", 1)) if isinstance(m, _CONV) else 1
        if isinstance(m, _CONV) and stride != 1:
            odd[name] = (f"conv {name!r} (groups={groups}) does not read the units as plain "
                         "input channels")
            continue
        group.consumers.append(
            Consumer(name, "conv" if isinstance(m, _CONV) else "linear", start, stride, groups))
    return odd


def _chain_from_probe(group: CouplingGroup, leaves: dict[str, nn.Module], chain: dict[str, str],
                      found: dict[str, dict[int, tuple[int, int]]]) -> None:
    order = list(leaves)
    for name in sorted(chain, key=order.index):
        m = leaves[name]
        if name in found:
            continue
        if isinstance(m, _BN):
            group.chain.append(ChannelOp("batchnorm", type(m).__name__, name))
        elif isinstance(m, _MIXING_NORMS):
            group.refusals.append(
                f"{type(m).__name__} {name!r} normalises across the units of "
                f"{group.producer!r} (changing one unit changes them all)")
        elif "Dropout" in type(m).__name__:
            group.chain.append(ChannelOp("dropout", type(m).__name__.lower(), name))
        elif isinstance(m, _FILL_PADS):
            group.chain.append(ChannelOp("pad", type(m).__name__.lower(), name))
        elif isinstance(m, nn.PReLU) and m.num_parameters > 1:
            group.chain.append(ChannelOp("prelu", "prelu", name))
        elif not any(True for _ in m.parameters()) or isinstance(m, nn.PReLU):
            group.chain.append(ChannelOp("activation", _act_name(m), name))
        else:
            group.refusals.append(f"module {name!r} ({type(m).__name__}) reads the units;"
                                  " the probe does not know it")


def _mixed_from_constant(group: CouplingGroup, leaves: dict[str, nn.Module],
                         records: dict[str, list[torch.Tensor]], tol: float) -> None:
    """After a run with the producer's output held at its per-unit mean: a consumer whose
    columns for the units still vary over the batch reads them with another tensor (on any
    of its calls: a shared layer's every call is checked)."""
    for c in group.consumers:
        xs = records.get(c.module)
        if not xs:
            continue
        if xs[0].shape[0] < 2:
            group.mixed.append(f"{c.module!r}: a batch of one cannot show whether the units "
                               "are read alone")
            continue
        vary = False
        for x in xs:
            d = _in_dim(leaves[c.module], x)
            block = x.movedim(d, -1)[..., c.start: c.start + group.width * c.stride]
            vary = vary or bool(((block - block[:1]).abs() > tol * (1.0 + block[:1].abs())
                                 ).any())
        if vary:
            group.mixed.append(
                f"{c.module!r} reads the units of {group.producer!r} together with another "
                "tensor (its input varies over the batch with the producer's output held "
                "constant: a residual add or a gate)")


def _changed(records: dict[str, list[torch.Tensor]], base: dict[str, list[torch.Tensor]],
             tol: float) -> set[str]:
    """The leaves whose recorded input differs from ``base``."""
    out: set[str] = set()
    for name, xs in records.items():
        for x, x0 in zip(xs, base.get(name, []), strict=False):
            if x.shape == x0.shape and bool(((x - x0).abs() > tol * (1.0 + x0.abs())).any()):
                out.add(name)
                break
    return out


class _Proof:
    """Runs with consumers' weights for a probed unit zeroed (weights restored bit for bit)."""

    def __init__(self, group: CouplingGroup, model: nn.Module, probes: list[int],
                 deltas: dict[int, float], perturbed: Callable[..., Any],
                 records: dict[str, list[torch.Tensor]], tol: float) -> None:
        self.group, self.model, self.probes, self.deltas = group, model, probes, deltas
        self.perturbed, self.records, self.tol = perturbed, records, tol

    def _zeroed(self, consumers: list[Consumer], u: int
                ) -> tuple[list[torch.Tensor], list[torch.Tensor], set[str]]:
        """Outputs without / with the perturbation of ``u`` and the leaves it still reaches,
        with ``consumers``' weights for ``u`` zeroed."""
        saved = {c.module: _weight(self.model, c.module).detach().clone() for c in consumers}
        try:
            for c in consumers:
                wt = _weight(self.model, c.module)
                rows, cols = c.weight_index(u, wt.shape)
                wt[rows, cols] = 0.0
            ref = _float_leaves(self.perturbed(None))
            ref_records = dict(self.records)
            got = _float_leaves(self.perturbed(u, self.deltas[u]))
            return ref, got, _changed(self.records, ref_records, self.tol)
        finally:
            for c in consumers:
                _weight(self.model, c.module).copy_(saved[c.module])

    def drop_downstream_consumers(self) -> None:
        """A candidate that no probed unit reaches once another consumer's weights for the
        unit are zeroed reads that consumer's output, not the units (e.g. the 1x1 conv after a
        depthwise conv, which passes each channel on alone): it is not a consumer."""
        for c in list(self.group.consumers):
            if c not in self.group.consumers:
                continue
            reached: set[str] = set()
            for u in self.probes:
                reached |= self._zeroed([c], u)[2]
            self.group.consumers = [d for d in self.group.consumers
                                    if d is c or d.module in reached]

    def run(self) -> set[str]:
        """The proof: with every consumer's weights for a probed unit zeroed, perturbing the
        unit must leave the output unchanged. Returns the leaves the perturbations still
        reach (those between the producer and its consumers)."""
        upstream: set[str] = set()
        for u in self.probes:
            ref, got, reached = self._zeroed(self.group.consumers, u)
            upstream |= reached
            for a, b in zip(ref, got, strict=False):
                if a.shape == b.shape and not torch.allclose(a, b, rtol=1e-5, atol=1e-6):
                    self.group.refusals.append(
                        f"unit {u} of {self.group.producer!r} reaches the output through a "
                        "path the probe does not understand (e.g. a residual add)")
                    break
        return upstream


def _weight(model: nn.Module, path: str) -> torch.Tensor:
    """The weight of layer ``path`` as rows (a view; see :func:`weight_rows`)."""
    return weight_rows(model.get_submodule(path))


def _probe_delta(out: torch.Tensor, channel_dim: int, unit: int) -> float:
    """A perturbation large enough to wake a dead unit (a ReLU at bias -50 must fire)."""
    ch = out.select(channel_dim % out.dim(), unit)
    return 2.0 * float(ch.abs().max()) + 1.0 + float(out.abs().mean())


def _act_name(m: nn.Module) -> str:
    name = type(m).__name__.lower()
    for known in ("leakyrelu", "relu6", "relu", "gelu", "sigmoid", "tanh", "silu", "elu", "prelu"):
        if known in name:
            return known
    return name.replace("activation", "") or name


def analyze(model: nn.Module, producer: str, run: Callable[[nn.Module], Any],
            example: tuple[tuple[Any, ...], dict[str, Any]], *, units: Iterable[int] = (),
            partners: Iterable[str] = ()) -> CouplingGroup:
    """The coupling group of ``producer``: the FX analysis when the model traces, else the probe.

    Args:
        model: the model (not modified; its mode is restored).
        producer: module path of a Linear or Conv layer.
        run: ``run(model)`` runs one calibration batch (for the probe).
        example: ``(args, kwargs)`` of one calibration batch (for shape propagation).
        units: the units that will be edited (the probe perturbs each of them; the FX
            analysis is structural and holds for every unit).
        partners: a gated unit's other projections (:attr:`CouplingGroup.partners`).
    """
    try:
        mod = model.get_submodule(producer)
    except AttributeError:
        g = CouplingGroup(producer, 0, -1)
        g.refusals.append(f"the model has no module {producer!r}")
        return g
    if not is_layer(mod):
        g = CouplingGroup(producer, 0, -1)
        g.refusals.append(f"{producer!r} is a {type(mod).__name__}, not a Linear or Conv layer")
        return g
    gm, _ = trace(model)
    if gm is not None:
        was_training = model.training
        gm.eval()
        try:
            propagate_shapes(gm, *example)
        except Exception:  # fall back to the probe, which explains itself
            gm = None
        finally:
            model.train(was_training)
            if gm is not None:
                gm.train(was_training)
    if gm is not None:
        return analyze_fx(gm, producer, partners)
    return probe_coupling(model, producer, run, units=units, partners=partners)
