"""Observation of an ONNX model: what :meth:`OnnxAdapter.observe` measures.

The ONNX twin of ``passes/fx/capture.find_sites`` + ``passes/fx/instrument``: the same sites,
named and classified the same way, so ``graphsurg.detect`` judges a torch model and its ONNX
export alike.

* **Sites** (observed values), in graph order: the output of every activation node (op types
  of :data:`graphsurg._activations.ONNX_OPS`; ``Clip`` is read from its bounds with
  :func:`graphsurg._activations.bounded`); the output of every *pointwise region* the one
  pattern table names (:func:`graphsurg._activations.match_regions`: Erf- and Tanh-form
  GELU, x*Sigmoid(x), x*HardSigmoid(x), Clip/Div/Mul HardSwish...; the region is evaluated
  on the table's grid by a small numpy interpreter of its ops, and its inner Erf/Tanh/Sigmoid
  are no sites); a gated unit ``act(gate) * up`` as one site, the product (``partner``: the
  up projection); and the output of every layer (Gemm / MatMul / Conv / Einsum with a
  constant weight, through its bias ``Add``) that no activation follows, as family
  ``"linear"`` (op ``"linear"``/``"conv"``) like torch's bare layer outputs.
  ``Site.module`` is the *producer* layer's node name (found by walking back through bias
  ``Add``, normalisation, Dropout and Identity, as torch walks through its transparent ops),
  or the activation node's own name when no layer produces its units; ``Site.node`` is the
  observed value's name. The unit axis is the producer's (1 after a convolution, the last
  after Gemm/MatMul, -2 after a MatMul with its constant first), carried through Transpose,
  Reshape, Flatten, Squeeze and Unsqueeze to the observed value.
* **Layers**: one :class:`LayerMeasure` per Gemm / MatMul (constant on either side) / Conv /
  ConvTranspose / two-operand Einsum whose weight is a constant, with the weight oriented like torch's (``(d_out, d_in[, k...])``: a Gemm
  with ``transB=0`` and a MatMul's ``(K, N)`` weight are transposed), so the one rank routine
  in ``graphsurg.detect.bottleneck`` judges it; ``next_modules`` are the next layers in the
  graph (shape computations are not followed).

onnxruntime runs the model with the observed values as extra outputs (added while its
session is built, then taken off again: the model is not copied, and the session reads the
model's own weight arrays); each batch's values are reduced at once with
:func:`graphsurg.kernels.neuron_stats` (in float32, whatever the model's float type) and
dropped, except a bounded row sample per site (``DiagnoseConfig.rank_sample`` rows) for the
effective rank. The layers' weights reach the detectors as tensors sharing the model's
memory (:func:`weight_tensor`), not as float32 copies.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import torch
from graphsurg.kernels import NeuronStats, neuron_stats

from graphsurg._activations import (
    ACTIVATIONS,
    GRID,
    ONNX_OPS,
    Activation,
    Region,
    bounded,
    gated,
    match_regions,
    pointwise_regions,
)
from graphsurg._config import DiagnoseConfig
from graphsurg._layers import einsum_layer
from graphsurg._measurements import LayerMeasure, Measurements, SiteMeasure

from ._common import KNOWN_DOMAINS, Feed, OrtSession, ort_session, weights_apart
from ._pass import const_array
from .structure import bypassed_layers

#: layer op type -> layer kind (torch's names)
LAYER_OPS: dict[str, str] = {"Gemm": "linear", "MatMul": "linear", "Conv": "conv",
                             "ConvTranspose": "conv_transpose", "Einsum": "linear"}
#: ops that move a unit axis without mixing units (followed with their shapes / perm)
LAYOUT = frozenset({"Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze"})
#: ops a unit's identity passes through between its layer and its activation (torch's
#: transparent ops: normalisation, dropout, identity); a bias Add is transparent too
TRANSPARENT = frozenset({"BatchNormalization", "LayerNormalization", "GroupNormalization",
                         "Dropout", "Identity"})
_CHANNEL_FIRST = frozenset({"Conv", "ConvTranspose", "BatchNormalization"})
_SHAPE_OPS = frozenset({"Shape", "Size"})
_WALK = 12  # like torch's producer walk


def _default_domain(node: ir.Node) -> bool:
    return node.domain in ("", "ai.onnx")


def _float_const(v: ir.Value | None) -> float | None:
    a = const_array(v) if v is not None else None
    if a is None or a.size != 1:
        return None
    return float(a.reshape(()))


def activation_of(node: ir.Node) -> Activation | None:
    """The activation of an ONNX node (canonical name, family, bounds), or None."""
    if not _default_domain(node) or node.op_type not in ONNX_OPS:
        return None
    if not node.inputs or node.inputs[0] is None or not node.outputs[0].name:
        return None
    if node.op_type != "Clip":
        return ACTIVATIONS[ONNX_OPS[node.op_type]]
    low = high = None
    if len(node.inputs) > 1:
        low = _float_const(node.inputs[1])
    if len(node.inputs) > 2:
        high = _float_const(node.inputs[2])
    if "min" in node.attributes:  # opset < 11
        low = float(node.attributes["min"].as_float())
    if "max" in node.attributes:
        high = float(node.attributes["max"].as_float())
    inf = float("inf")
    low = None if low is not None and low == -inf else low
    high = None if high is not None and high == inf else high
    return bounded(ONNX_OPS["Clip"], low, high)


def _is_bias_add(node: ir.Node, through: ir.Value) -> bool:
    """An Add of ``through`` and a constant (a layer's bias, as exporters write MatMul+Add)."""
    if node.op_type != "Add" or not _default_domain(node) or len(node.inputs) != 2:
        return False
    other = node.inputs[1] if node.inputs[0] is through else node.inputs[0]
    return other is not through and const_array(other) is not None


@dataclass(frozen=True)
class LayerOp:
    """How a node is a layer: its constant weight (value, array oriented like torch's
    ``(d_out, d_in[, k...])``) and the axis of its output that holds the units."""

    value: ir.Value
    weight: np.ndarray
    unit_axis: int


def _float_weight(v: ir.Value | None) -> np.ndarray | None:
    arr = const_array(v) if v is not None else None
    if arr is None or arr.ndim < 2 or not np.issubdtype(arr.dtype, np.floating):
        return None
    return arr


def _einsum_op(node: ir.Node) -> LayerOp | None:
    eq = node.attributes["equation"].as_string() if "equation" in node.attributes else ""
    if len(node.inputs) != 2:
        return None
    arrs = [_float_weight(w) for w in node.inputs]
    found = einsum_layer(eq, [a is not None and a.ndim == 2 for a in arrs])
    if found is None:
        return None
    k, transposed, axis = found
    w, arr = node.inputs[k], arrs[k]
    assert w is not None and arr is not None
    return LayerOp(w, arr.T if transposed else arr, axis)


def layer_op(node: ir.Node) -> LayerOp | None:
    """How ``node`` is a layer with a constant weight (see :class:`LayerOp`), or None."""
    if node.op_type not in LAYER_OPS or not _default_domain(node) or len(node.inputs) < 2:
        return None
    if node.op_type == "Einsum":
        return _einsum_op(node)
    w = node.inputs[1]
    arr = _float_weight(w)
    if node.op_type == "MatMul" and arr is None:  # W @ x: the constant first, units at -2
        w0 = node.inputs[0]
        a0 = _float_weight(w0)
        if w0 is not None and a0 is not None and a0.ndim == 2:
            return LayerOp(w0, a0, -2)
        return None
    if w is None or arr is None:
        return None
    if node.op_type == "Gemm":
        trans_b = node.attributes["transB"].as_int() if "transB" in node.attributes else 0
        return LayerOp(w, arr if trans_b else arr.T, -1)
    if node.op_type == "MatMul":
        return LayerOp(w, arr.T, -1) if arr.ndim == 2 else None
    return LayerOp(w, arr, 1)


def layer_weight(node: ir.Node) -> tuple[ir.Value, np.ndarray] | None:
    """A layer node's constant float weight as ``(value, array oriented like torch's weight:
    (d_out, d_in[, k...]))``, or None when the node is not a layer with a constant weight."""
    lo = layer_op(node)
    return (lo.value, lo.weight) if lo is not None else None


def find_producer(value: ir.Value) -> tuple[ir.Node | None, list[ir.Node]]:
    """Walk back from an activation's input through bias Add / normalisation / Dropout /
    Identity / layout ops (:data:`LAYOUT`) to the layer that produces its units. Returns the layer node (or None) and the
    nodes walked through, nearest first."""
    chain: list[ir.Node] = []
    v: ir.Value | None = value
    for _ in range(_WALK):
        p = v.producer() if v is not None else None
        if p is None or not _default_domain(p):
            return None, chain
        if layer_weight(p) is not None:
            return p, chain
        if (p.op_type in TRANSPARENT or p.op_type in LAYOUT) and p.inputs:
            chain.append(p)
            v = p.inputs[0]
            continue
        if p.op_type == "Add" and len(p.inputs) == 2:
            a, b = p.inputs
            if b is not None and const_array(a) is not None:
                chain.append(p)
                v = b
                continue
            if a is not None and const_array(b) is not None:
                chain.append(p)
                v = a
                continue
        return None, chain
    return None, chain


def _follows_activation(node: ir.Node, recognised: dict[ir.Node, Activation | None]) -> bool:
    """True when a layer's output flows (through transparent and layout ops, and the pieces
    of recognised activations) into an activation."""
    frontier = [(u, v) for v in node.outputs for u, _ in v.uses()]
    for _ in range(_WALK):
        nxt: list[tuple[ir.Node, ir.Value]] = []
        for u, via in frontier:
            if recognised.get(u) is not None or (u not in recognised
                                                 and activation_of(u) is not None):
                return True
            if ((u.op_type in TRANSPARENT or u.op_type in LAYOUT) and _default_domain(u)
                    or _is_bias_add(u, via) or u in recognised):
                nxt.extend((c, o) for o in u.outputs for c, _ in o.uses())
        if not nxt:
            return False
        frontier = nxt
    return False


def _layer_output(node: ir.Node) -> ir.Value:
    """A layer's output as torch's layer computes it: through its bias Add (MatMul + Add)."""
    out = node.outputs[0]
    uses = list(out.uses())
    if len(uses) == 1 and _is_bias_add(uses[0][0], out) and out not in _graph_outputs(node):
        return uses[0][0].outputs[0]
    return out


def _graph_outputs(node: ir.Node) -> set[ir.Value]:
    g = node.graph
    return set(g.outputs) if g is not None else set()


def _next_layers(node: ir.Node, layer_nodes: set[ir.Node]) -> list[ir.Node]:
    out: list[ir.Node] = []
    seen: set[ir.Node] = set()
    frontier = [u for v in node.outputs for u, _ in v.uses()]
    steps = 0
    while frontier and steps < 64:
        steps += 1
        u = frontier.pop(0)
        if u in seen or u.op_type in _SHAPE_OPS:
            continue
        seen.add(u)
        if u in layer_nodes:
            if u not in out:
                out.append(u)
            continue
        frontier.extend(c for v in u.outputs for c, _ in v.uses())
    return out


def node_label(node: ir.Node, index: int) -> str:
    """A node's name, or a stable stand-in for an unnamed node."""
    return node.name or f"{node.op_type}_{index}"


# -- decomposed activations: pointwise regions named by the one pattern table -------------
def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


_np_erf = np.vectorize(math.erf, otypes=[np.float64])


def _attr_f(node: ir.Node, name: str, default: float) -> float:
    return float(node.attributes[name].as_float()) if name in node.attributes else default


def _clip(node: ir.Node, x: np.ndarray, c: list[Any]) -> np.ndarray:
    lo = c[1] if len(c) > 1 and c[1] is not None else None
    hi = c[2] if len(c) > 2 and c[2] is not None else None
    lo = np.float64(_attr_f(node, "min", -np.inf)) if lo is None else lo
    hi = np.float64(_attr_f(node, "max", np.inf)) if hi is None else hi
    return np.minimum(np.maximum(x, lo), hi)


def _gelu(node: ir.Node, x: np.ndarray) -> np.ndarray:
    approx = node.attributes["approximate"].as_string() if "approximate" in node.attributes \
        else "none"
    if approx == "tanh":
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    return 0.5 * x * (1.0 + _np_erf(x / math.sqrt(2.0)))


#: the numpy interpreter of the ops a decomposed activation is made of: op type ->
#: f(node, [input arrays]) (float64; an absent optional input is None)
_POINTWISE: dict[str, Callable[[ir.Node, list[Any]], np.ndarray]] = {
    "Add": lambda n, a: a[0] + a[1], "Sub": lambda n, a: a[0] - a[1],
    "Mul": lambda n, a: a[0] * a[1], "Div": lambda n, a: a[0] / a[1],
    "Pow": lambda n, a: np.power(a[0], a[1]), "Neg": lambda n, a: -a[0],
    "Exp": lambda n, a: np.exp(a[0]), "Log": lambda n, a: np.log(a[0]),
    "Sqrt": lambda n, a: np.sqrt(a[0]), "Abs": lambda n, a: np.abs(a[0]),
    "Reciprocal": lambda n, a: 1.0 / a[0],
    "Tanh": lambda n, a: np.tanh(a[0]), "Sigmoid": lambda n, a: _sigmoid(a[0]),
    "Erf": lambda n, a: _np_erf(a[0]), "Relu": lambda n, a: np.maximum(a[0], 0.0),
    "Clip": lambda n, a: _clip(n, a[0], a),
    "HardSigmoid": lambda n, a: np.clip(_attr_f(n, "alpha", 0.2) * a[0]
                                        + _attr_f(n, "beta", 0.5), 0.0, 1.0),
    "HardSwish": lambda n, a: a[0] * np.clip(a[0] / 6.0 + 0.5, 0.0, 1.0),
    "Gelu": lambda n, a: _gelu(n, a[0]),
    "Softplus": lambda n, a: np.logaddexp(0.0, a[0]),
    "LeakyRelu": lambda n, a: np.where(a[0] > 0, a[0], _attr_f(n, "alpha", 0.01) * a[0]),
    "Elu": lambda n, a: np.where(a[0] > 0, a[0], _attr_f(n, "alpha", 1.0)
                                 * np.expm1(np.minimum(a[0], 0.0))),
}


def _scalar(v: ir.Value | None) -> np.ndarray | None:
    a = const_array(v) if v is not None else None
    if a is None or a.size != 1 or not (np.issubdtype(a.dtype, np.floating)
                                        or np.issubdtype(a.dtype, np.integer)):
        return None
    return np.float64(a.reshape(()))  # type: ignore[return-value]


def _tensor_inputs(node: ir.Node) -> list[ir.Value]:
    return [v for v in node.inputs if v is not None and _scalar(v) is None]


def _pointwise(node: ir.Node) -> bool:
    return (_default_domain(node) and node.op_type in _POINTWISE and len(node.outputs) == 1
            and bool(_tensor_inputs(node)))


def _evaluate(reg: Region[ir.Value, ir.Node]) -> dict[ir.Node, np.ndarray] | None:
    vals: dict[ir.Value, np.ndarray] = {reg.root: GRID.copy()}
    out: dict[ir.Node, np.ndarray] = {}
    with np.errstate(all="ignore"):
        for n in reg.ops:
            args: list[np.ndarray | None] = []
            for v in n.inputs:
                if v is None:
                    args.append(None)
                elif v in vals:
                    args.append(vals[v])
                else:
                    c = _scalar(v)
                    if c is None:
                        return None
                    args.append(c)
            y = np.asarray(_POINTWISE[n.op_type](n, args), dtype=np.float64)
            if y.shape != GRID.shape:
                return None
            vals[n.outputs[0]] = out[n] = y
    return out


def recognise(nodes: list[ir.Node]) -> tuple[dict[ir.Node, Activation | None],
                                              dict[ir.Node, ir.Value]]:
    """Decomposed activations among ``nodes``: ``{site node: activation, inner node: None}``
    and ``{site node: the value the region is a function of}``."""
    regions = pointwise_regions(nodes, pointwise=_pointwise, tensor_inputs=_tensor_inputs,
                                output=lambda n: n.outputs[0])
    matched = match_regions(regions, evaluate=_evaluate, tensor_inputs=_tensor_inputs,
                            output=lambda n: n.outputs[0],
                            users=lambda v: [u for u, _ in v.uses()])
    acts: dict[ir.Node, Activation | None] = {}
    roots: dict[ir.Node, ir.Value] = {}
    for r in matched:
        for n in r.inner:
            acts[n] = None
        assert r.site is not None
        acts[r.site] = r.activation
        roots[r.site] = r.root
    return acts, roots


def _dims(v: ir.Value | None) -> list[object] | None:
    shape = v.shape if v is not None else None
    if shape is None:
        return None
    return [d if isinstance(d, int) else str(d) for d in shape]


def _trailing(dims: list[object]) -> tuple[int, tuple[str, ...]]:
    p, syms = 1, []
    for d in dims:
        if isinstance(d, int):
            p *= d
        else:
            syms.append(str(d))
    return p, tuple(sorted(syms))


def _map_axis(node: ir.Node, axis: int) -> int | None:
    """The unit axis after the layout op ``node`` given the axis in its first input."""
    ins, outs = _dims(node.inputs[0]), _dims(node.outputs[0])
    if node.op_type == "Transpose":
        perm = list(node.attributes["perm"].as_ints()) if "perm" in node.attributes else None
        rank = len(perm) if perm is not None else len(ins) if ins is not None else None
        if rank is None:
            return None
        a = axis % rank
        perm = perm if perm is not None else list(range(rank))[::-1]
        return perm.index(a) if a in perm else None
    if ins is None or outs is None:
        return None
    a = axis % len(ins)
    size, tail = ins[a], _trailing(ins[a + 1:])
    for j, d in enumerate(outs):
        if d == size and _trailing(outs[j + 1:]) == tail:
            return j
    return None


def unit_axis(producer: ir.Node, chain: list[ir.Node]) -> int | None:
    """The producer's unit axis carried through ``chain`` (nearest first) to the value at its
    head: -1 when it is the last axis, None when a layout op loses it."""
    lo = layer_op(producer)
    axis = lo.unit_axis if lo is not None else (1 if producer.op_type in _CHANNEL_FIRST else -1)
    rank_v: ir.Value | None = producer.outputs[0]
    rank: int | None = None  # known from a Transpose's perm when shapes are not
    for n in reversed(chain):
        if n.op_type in LAYOUT:
            nxt = _map_axis(n, axis)
            if nxt is None:
                return None
            axis = nxt
            rank = len(n.attributes["perm"].as_ints()) if (
                n.op_type == "Transpose" and "perm" in n.attributes) else None
        rank_v = n.outputs[0]
    dims = _dims(rank_v)
    if dims is None:
        if rank is not None:
            return -1 if axis % rank == rank - 1 else axis % rank
        return axis
    a = axis % len(dims)
    return -1 if a == len(dims) - 1 else a


def _gate(site_node: ir.Node, producer: ir.Node, axis: int
          ) -> tuple[ir.Node, ir.Node] | None:
    """``(product node, up projection)`` when the activation's output is used only by a Mul
    with another layer's output (same unit axis and shape): a gated unit."""
    out = site_node.outputs[0]
    uses = list(out.uses())
    if len(uses) != 1 or out in _graph_outputs(site_node):
        return None
    mul = uses[0][0]
    if mul.op_type != "Mul" or not _default_domain(mul) or len(mul.inputs) != 2:
        return None
    other = mul.inputs[1] if mul.inputs[0] is out else mul.inputs[0]
    if other is None or other is out:
        return None
    up, chain = find_producer(other)
    if up is None or up is producer or unit_axis(up, chain) != axis:
        return None
    a, b = _dims(other), _dims(out)
    if a is not None and b is not None and a != b:
        return None
    return mul, up


@dataclass
class ObservedSite:
    """One value to observe (see the module documentation)."""

    value: str  # the observed value's name
    module: str  # the producer layer's node name (or the activation's own)
    op: str  # canonical activation name, or "linear"/"conv"
    family: str
    activation: Activation | None
    channel_dim: int
    order: int
    partner: str = ""  # a gated unit's up projection
    role: str = ""  # "output" | "gate" | "" (see graphsurg._measurements.SiteMeasure.role)


@dataclass
class LayerSite:
    """One layer with a constant weight."""

    node: ir.Node
    module: str
    kind: str
    weight_name: str
    weight: np.ndarray  # oriented like torch's
    next_modules: list[str] = field(default_factory=list)


def find_sites(model: ir.Model) -> tuple[list[LayerSite], list[ObservedSite]]:
    """Layers and observed sites of the main graph, in graph order."""
    nodes = list(model.graph)
    label = {n: node_label(n, i) for i, n in enumerate(nodes)}
    index = {n: i for i, n in enumerate(nodes)}
    recognised, roots = recognise(nodes)
    layers: list[LayerSite] = []
    layer_nodes: set[ir.Node] = set()
    seen_weights: set[str] = set()
    found: list[tuple[int, ObservedSite]] = []
    observed: set[str] = set()
    gated_muls: dict[ir.Node, Activation] = {}
    acts_at: list[tuple[ir.Node, Activation, ObservedSite | None]] = []

    def add(at: ir.Node, s: ObservedSite) -> None:
        if s.value and s.value not in observed:
            observed.add(s.value)
            found.append((index[at], s))

    for n in nodes:
        lo = layer_op(n)
        if lo is not None:
            layer_nodes.add(n)
            wname = lo.value.name or label[n]
            if wname not in seen_weights:  # a shared weight is one layer, as in torch
                seen_weights.add(wname)
                layers.append(LayerSite(n, label[n], LAYER_OPS[n.op_type], wname, lo.weight))
            continue
        act = recognised.get(n) if n in recognised else activation_of(n)
        if act is None:
            continue
        inp = roots.get(n) or n.inputs[0]
        assert inp is not None
        producer, chain = find_producer(inp)
        axis = unit_axis(producer, chain) if producer is not None else None
        if axis is None:  # no producer, or a layout op lost its units
            ops = {c.op_type for c in chain}
            producer, axis = None, 1 if ops & {"BatchNormalization"} else -1
        module = label[producer] if producer is not None else label[n]
        g = _gate(n, producer, axis) if producer is not None and act.family == "relu" else None
        if g is not None:
            mul, up = g
            ga = gated(act.name)
            gated_muls[mul] = ga
            add(mul, ObservedSite(mul.outputs[0].name or "", module, ga.name, ga.family, ga,
                                  axis, 0, label[up]))
            continue
        add(n, ObservedSite(n.outputs[0].name or "", module, act.name, act.family, act, axis, 0))
        acts_at.append((n, act, found[-1][1] if found and found[-1][0] == index[n] else None))
    for n, act, site in acts_at:  # roles need every layer known (layer_nodes is complete)
        if site is not None:
            site.role = site_role(n, act, layer_nodes, index)
    follows = {**recognised, **gated_muls}
    for n in layers_in_order(nodes, layer_nodes):
        if not _follows_activation(n, follows):
            v = _layer_output(n)
            kind = LAYER_OPS[n.op_type]
            lo = layer_op(n)
            axis = unit_axis(n, []) if lo is not None else -1
            add(n, ObservedSite(v.name or "", label[n], kind, "linear", None,
                                -1 if axis is None else axis, 0))
    found.sort(key=lambda t: t[0])
    sites = [s for _, s in found]
    for k, s in enumerate(sites):
        s.order = k
    for ls in layers:
        ls.next_modules = [label[u] for u in _next_layers(ls.node, layer_nodes)]
    return layers, sites


#: ops a gate's values pass through unchanged on their way to the product (besides
#: :data:`LAYOUT`): copies, dropout and broadcasts
_GATE_PASS = frozenset({"Identity", "Dropout", "Expand"})
#: how many nodes a role walk visits at most (beyond it the role is unknown: "")
_ROLE_WALK = 512


def _value_uses(v: ir.Value) -> list[ir.Node]:
    return [u for u, _ in v.uses() if u.op_type not in _SHAPE_OPS]


def site_role(node: ir.Node, act: Activation, layer_nodes: set[ir.Node],
              index: dict[ir.Node, int]) -> str:
    """What the graph says the activation ``node`` is for (``SiteMeasure.role``), as the
    torch adapter reads it (``passes.fx.capture.site_role``):

    * ``"output"``: every value derived from it through non-layer nodes reaches a graph
      output and no layer of ``layer_nodes``;
    * ``"gate"``: ``act`` is bounded below by 0 (sigmoid family) and its output, through
      layout/copy/broadcast ops only, is used solely as a factor of two-input ``Mul`` nodes
      whose other input does not derive from it (squeeze-excite, GLU-style gates);
    * ``""`` otherwise, or when a walk is longer than ``_ROLE_WALK`` nodes.
    """
    if _is_output_head(node, layer_nodes):
        return "output"
    if act.low == 0.0 and act.high is not None and _is_gate(node, index):
        return "gate"
    return ""


def _is_output_head(node: ir.Node, layer_nodes: set[ir.Node]) -> bool:
    outputs = _graph_outputs(node)
    reached = any(v in outputs for v in node.outputs)
    todo = [u for v in node.outputs for u in _value_uses(v)]
    seen: set[ir.Node] = set()
    while todo:
        u = todo.pop()
        if u in seen:
            continue
        seen.add(u)
        if len(seen) > _ROLE_WALK or u in layer_nodes:
            return False
        for v in u.outputs:
            reached = reached or v in outputs
            todo.extend(_value_uses(v))
    return reached


def _derives_from(value: ir.Value, node: ir.Node, index: dict[ir.Node, int]) -> bool | None:
    """Whether ``value`` is computed from ``node`` (only nodes after ``node`` in graph order
    can be); None when the walk is too long to tell."""
    start = index[node]
    todo = [value.producer()]
    seen: set[ir.Node] = set()
    while todo:
        p = todo.pop()
        if p is node:
            return True
        if p is None or p in seen or index.get(p, -1) <= start:
            continue
        seen.add(p)
        if len(seen) > _ROLE_WALK:
            return None
        todo.extend(i.producer() for i in p.inputs if i is not None)
    return False


def _is_gate(node: ir.Node, index: dict[ir.Node, int]) -> bool:
    outputs = _graph_outputs(node)
    if any(v in outputs for v in node.outputs):
        return False
    frontier = [(u, v) for v in node.outputs for u in _value_uses(v)]
    carried = set(node.outputs)  # the gate's values, as they travel to the products
    seen: set[ir.Node] = set()
    products = 0
    while frontier:
        u, via = frontier.pop()
        if u in seen:
            continue
        seen.add(u)
        if len(seen) > _ROLE_WALK or not _default_domain(u):
            return False
        if (u.op_type in LAYOUT or u.op_type in _GATE_PASS) and u.inputs and u.inputs[0] is via:
            if any(v in outputs for v in u.outputs):
                return False
            carried.update(u.outputs)
            frontier.extend((c, v) for v in u.outputs for c in _value_uses(v))
            continue
        if u.op_type != "Mul" or len(u.inputs) != 2:
            return False
        gates = [i for i in u.inputs if i in carried]
        others = [i for i in u.inputs if i not in carried]
        if len(gates) != 1 or len(others) != 1 or others[0] is None:
            return False  # the gate times itself
        if const_array(others[0]) is not None:
            return False  # a product with a constant scales the gate; it gates nothing
        if _derives_from(others[0], node, index) is not False:
            return False
        products += 1
    return products > 0


def layers_in_order(nodes: list[ir.Node], layer_nodes: set[ir.Node]) -> list[ir.Node]:
    return [n for n in nodes if n in layer_nodes]


# -- observation ----------------------------------------------------------------------------
def _inferred_types(model: ir.Model) -> dict[str, ir.DataType]:
    """Element types of every value, from ONNX shape inference (no tensor data is read)."""
    try:  # the weights stay out of it: inference needs their types and shapes only
        with weights_apart(model):
            bare = ir.serde.serialize_model(model)
        proto = onnx.shape_inference.infer_shapes(bare)
    except Exception:  # inference is best effort: the walk below covers the common cases
        return {}
    out: dict[str, ir.DataType] = {}
    for vi in [*proto.graph.value_info, *proto.graph.output, *proto.graph.input]:
        et = vi.type.tensor_type.elem_type
        if et:
            out[vi.name] = ir.DataType(et)
    return out


def _type_of(v: ir.Value, inferred: dict[str, ir.DataType] | None) -> ir.DataType | None:
    """The element type of ``v``: declared, else through its producers' first inputs
    (activations, layers, bias Adds and normalisations keep their input's type)."""
    cur: ir.Value | None = v
    for _ in range(16):
        if cur is None:
            break
        if cur.dtype is not None:
            return cur.dtype
        p = cur.producer()
        cur = p.inputs[0] if p is not None and p.inputs else None
    if inferred is not None and v.name in inferred:
        return inferred[v.name]
    return None


def _floating_of(model: ir.Model) -> Callable[[ir.Value], bool]:
    """``floating(v)``: ``v`` may hold floating-point values (its declared type, else ONNX
    shape inference's, run once and only when needed; unknown: True)."""
    inferred: dict[str, ir.DataType] | None = None

    def floating(v: ir.Value) -> bool:
        nonlocal inferred
        dt = v.dtype
        if dt is None and v.name:
            inferred = _inferred_types(model) if inferred is None else inferred
            dt = inferred.get(v.name)
        return dt is None or dt.is_floating_point()

    return floating


class _Accumulator:
    """Streams one site's values into NeuronStats (the ONNX twin of fx's Observer)."""

    def __init__(self, site: ObservedSite, margin: float, sample_rows: int) -> None:
        self.site = site
        sat = (site.activation.saturation(margin)
               if site.activation is not None and site.family == "saturating" else None)
        self.centre: float
        self.threshold: float | None
        self.centre, self.threshold = sat if sat is not None else (0.0, None)
        self.stats: NeuronStats | None = None
        self.sat_stats: NeuronStats | None = None
        self.sample_rows = sample_rows
        self._sample: list[torch.Tensor] = []
        self._sampled = 0
        self.error: str | None = None

    def add(self, arr: np.ndarray) -> None:
        if self.error is not None or arr.ndim == 0 or not np.issubdtype(arr.dtype, np.floating):
            return
        x = torch.from_numpy(np.ascontiguousarray(arr)).float()  # statistics in float32
        cd = self.site.channel_dim if x.dim() > 1 else -1
        centred = self.threshold is not None and self.centre != 0.0
        try:
            s = neuron_stats(x, cd, sat_threshold=None if centred else self.threshold)
            self.stats = s if self.stats is None else self.stats.merge(s)
            if centred:
                ss = neuron_stats(x - self.centre, cd, sat_threshold=self.threshold)
                self.sat_stats = ss if self.sat_stats is None else self.sat_stats.merge(ss)
        except ValueError as e:  # e.g. a width change between batches: report, don't crash
            self.error = str(e)
            return
        if self._sampled < self.sample_rows:
            rows = x.movedim(cd, -1).reshape(-1, x.shape[cd])
            # a copy of the rows: a view would keep the batch's whole activation alive
            take = rows[: self.sample_rows - self._sampled].clone()
            self._sample.append(take)
            self._sampled += int(take.shape[0])

    def measure(self) -> SiteMeasure | None:
        if self.stats is None:
            return None
        src = self.sat_stats if self.sat_stats is not None else self.stats
        satf = src.saturated_fraction if self.threshold is not None else None
        return SiteMeasure(
            module=self.site.module, node=self.site.value, op=self.site.op,
            family=self.site.family, order=self.site.order, stats=self.stats,
            saturated_fraction=satf, sample=torch.cat(self._sample) if self._sample else None,
            channel_dim=self.site.channel_dim, partner=self.site.partner, role=self.site.role)


def weight_tensor(arr: np.ndarray) -> torch.Tensor:
    """A weight as a torch tensor for the detectors, sharing the model's memory (no copy:
    they only read it, converting one layer at a time to float32 where they compute).
    float32/float16/float64 arrays are shared as they are, bfloat16 through its bits; a
    read-only array (memory-mapped external data) is shared read-only; other types are
    copied to float32."""
    import warnings

    if arr.dtype.name == "bfloat16":
        bits = arr.view(np.uint16)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only: never written
            return torch.from_numpy(bits).view(torch.bfloat16)
    if arr.dtype in (np.float32, np.float16, np.float64):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only: never written
            return torch.from_numpy(arr)
    return torch.from_numpy(np.array(arr, dtype=np.float32))


def observe_model(model: ir.Model, batches: Iterable[Feed], config: DiagnoseConfig, *,
                  threads: int | None = None,
                  on_session: Callable[[OrtSession, list[str]], None] | None = None
                  ) -> Measurements:
    """Measure ``model`` (left unchanged) on validated feed dicts. See the module doc.
    ``on_session(session, output names)``: the session built (the model's outputs plus the
    observed values) is handed over, to run the unchanged model again without building
    another."""
    layers, sites = find_sites(model)
    notes: list[str] = []
    custom = sorted({f"{n.domain}::{n.op_type}" for n in model.graph.all_nodes()
                     if n.domain not in KNOWN_DOMAINS})
    if custom:
        notes.append(f"custom-domain ops left untouched and unanalysed: {', '.join(custom)}")

    # the observed values become extra outputs of the model itself for as long as the
    # session is built (no copy of the model; its outputs and value types are put back)
    values: dict[str, ir.Value] = {}
    for n in model.graph:
        for o in n.outputs:
            if o.name:
                values[o.name] = o
    outputs = {v.name for v in model.graph.outputs}
    n_outputs = len(model.graph.outputs)
    typed: list[ir.Value] = []
    inferred: dict[str, ir.DataType] | None = None
    kept: list[ObservedSite] = []
    try:
        for s in sites:
            v = values.get(s.value)
            if v is None:
                continue
            if v.type is None:
                dt = _type_of(v, None)
                if dt is None:
                    inferred = _inferred_types(model) if inferred is None else inferred
                    dt = _type_of(v, inferred)
                if dt is None:
                    notes.append(f"site {s.value}: its element type is unknown; not observed")
                    continue
                v.type = ir.TensorType(dt)  # its real type (float16, bfloat16...), never assumed
                typed.append(v)
            if s.value not in outputs:
                model.graph.outputs.append(v)
                outputs.add(s.value)
            kept.append(s)
        sess = ort_session(model, threads=threads)
    finally:
        while len(model.graph.outputs) > n_outputs:
            model.graph.outputs.pop()
        for v in typed:
            v.type = None
    out_names = [o.name for o in sess.get_outputs()]
    final = [v.name or "" for v in model.graph.outputs]
    if on_session is not None:
        on_session(sess, final)
    accs = [_Accumulator(s, config.saturation_margin, config.rank_sample) for s in kept]

    n_batches = input_nonfinite = output_nonfinite = 0
    for feed in batches:
        if config.max_batches is not None and n_batches >= config.max_batches:
            break
        for a in feed.values():
            if np.issubdtype(a.dtype, np.floating):
                input_nonfinite += int((~np.isfinite(a)).sum())
        res = dict(zip(out_names, sess.run(None, feed), strict=True))
        n_batches += 1
        for name in final:
            r = res.get(name)
            if r is not None and np.issubdtype(r.dtype, np.floating):
                output_nonfinite += int((~np.isfinite(r)).sum())
        for acc in accs:
            acc.add(res[acc.site.value])
        del res
    measures = [m for m in (acc.measure() for acc in accs) if m is not None]
    notes.extend(f"site {a.site.value}: {a.error}" for a in accs if a.error)
    bypassed = bypassed_layers(model.graph, {ls.module: ls.node for ls in layers},
                               _floating_of(model))
    layer_measures = [
        LayerMeasure(module=ls.module, kind=ls.kind, order=k, d_in=int(ls.weight.shape[1]),
                     d_out=int(ls.weight.shape[0]), weight=weight_tensor(ls.weight),
                     next_modules=ls.next_modules, node=ls.weight_name,
                     bypassed=bypassed.get(ls.module))
        for k, ls in enumerate(layers)
    ]
    return Measurements(sites=measures, layers=layer_measures, gradients=False,
                        input_nonfinite=input_nonfinite, output_nonfinite=output_nonfinite,
                        ir="onnx", batches=n_batches, capture="onnxruntime", notes=notes)


__all__ = ["LAYER_OPS", "LayerSite", "ObservedSite", "activation_of", "find_producer",
           "find_sites", "layer_weight", "node_label", "observe_model"]
