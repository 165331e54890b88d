"""Observation of an ONNX model: what :meth:`OnnxAdapter.observe` measures.

The ONNX twin of ``passes/fx/capture.find_sites`` + ``passes/fx/instrument``: the same sites,
named and classified the same way, so ``graphsurg.detect`` judges a torch model and its ONNX
export alike.

* **Sites** (observed values), in graph order: the output of every activation node (op types
  of :data:`graphsurg._activations.ONNX_OPS`; ``Clip`` is read from its bounds with
  :func:`graphsurg._activations.bounded`), and the output of every layer (Gemm / MatMul /
  Conv with a constant weight, through its bias ``Add``) that no activation follows, as
  family ``"linear"`` (op ``"linear"``/``"conv"``) like torch's bare layer outputs.
  ``Site.module`` is the *producer* layer's node name (found by walking back through bias
  ``Add``, normalisation, Dropout and Identity, as torch walks through its transparent ops),
  or the activation node's own name when no layer produces its units; ``Site.node`` is the
  observed value's name. Units are along axis 1 after a convolution or a
  BatchNormalization, else along the last axis.
* **Layers**: one :class:`LayerMeasure` per Gemm / MatMul / Conv / ConvTranspose whose weight
  is a constant, with the weight oriented like torch's (``(d_out, d_in[, k...])``: a Gemm
  with ``transB=0`` and a MatMul's ``(K, N)`` weight are transposed), so the one rank routine
  in ``graphsurg.detect.bottleneck`` judges it; ``next_modules`` are the next layers in the
  graph (shape computations are not followed).

onnxruntime runs a private copy of the model with the observed values as extra outputs; each
batch's values are reduced at once with :func:`graphsurg.kernels.neuron_stats` (in float32,
whatever the model's float type) and dropped, except a bounded row sample per site
(``DiagnoseConfig.rank_sample`` rows) for the effective rank.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir
import torch
from graphsurg.kernels import NeuronStats, neuron_stats

from graphsurg._activations import ACTIVATIONS, ONNX_OPS, Activation, bounded
from graphsurg._config import DiagnoseConfig
from graphsurg._measurements import LayerMeasure, Measurements, SiteMeasure

from ._common import KNOWN_DOMAINS, Feed, ort_session
from ._pass import const_array

#: layer op type -> layer kind (torch's names)
LAYER_OPS: dict[str, str] = {"Gemm": "linear", "MatMul": "linear", "Conv": "conv",
                             "ConvTranspose": "conv_transpose"}
#: ops a unit's identity passes through between its layer and its activation (torch's
#: transparent ops: normalisation, dropout, identity); a bias Add is transparent too
TRANSPARENT = frozenset({"BatchNormalization", "LayerNormalization", "GroupNormalization",
                         "Dropout", "Identity"})
_CHANNEL_FIRST = frozenset({"Conv", "ConvTranspose", "BatchNormalization"})
_SHAPE_OPS = frozenset({"Shape", "Size"})
_WALK = 8  # like torch's producer walk


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


def layer_weight(node: ir.Node) -> tuple[ir.Value, np.ndarray] | None:
    """A layer node's constant float weight as ``(value, array oriented like torch's weight:
    (d_out, d_in[, k...]))``, or None when the node is not a layer with a constant weight."""
    if node.op_type not in LAYER_OPS or not _default_domain(node) or len(node.inputs) < 2:
        return None
    w = node.inputs[1]
    arr = const_array(w)
    if w is None or arr is None or arr.ndim < 2 or not np.issubdtype(arr.dtype, np.floating):
        return None
    if node.op_type == "Gemm":
        trans_b = node.attributes["transB"].as_int() if "transB" in node.attributes else 0
        return w, (arr if trans_b else arr.T)
    if node.op_type == "MatMul":
        return (w, arr.T) if arr.ndim == 2 else None
    return w, arr


def find_producer(value: ir.Value) -> tuple[ir.Node | None, list[ir.Node]]:
    """Walk back from an activation's input through bias Add / normalisation / Dropout /
    Identity to the layer that produces its units. Returns the layer node (or None) and the
    nodes walked through, nearest first."""
    chain: list[ir.Node] = []
    v: ir.Value | None = value
    for _ in range(_WALK):
        p = v.producer() if v is not None else None
        if p is None or not _default_domain(p):
            return None, chain
        if layer_weight(p) is not None:
            return p, chain
        if p.op_type in TRANSPARENT and p.inputs:
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


def _follows_activation(node: ir.Node) -> bool:
    """True when a layer's output flows (through transparent ops) into an activation."""
    frontier = [(u, v) for v in node.outputs for u, _ in v.uses()]
    for _ in range(_WALK):
        nxt: list[tuple[ir.Node, ir.Value]] = []
        for u, via in frontier:
            if activation_of(u) is not None:
                return True
            if (u.op_type in TRANSPARENT and _default_domain(u)) or _is_bias_add(u, via):
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
    layers: list[LayerSite] = []
    layer_nodes: set[ir.Node] = set()
    seen_weights: set[str] = set()
    sites: list[ObservedSite] = []
    observed: set[str] = set()
    for n in nodes:
        lw = layer_weight(n)
        if lw is not None:
            layer_nodes.add(n)
            w, arr = lw
            wname = w.name or label[n]
            if wname not in seen_weights:  # a shared weight is one layer, as in torch
                seen_weights.add(wname)
                layers.append(LayerSite(n, label[n], LAYER_OPS[n.op_type], wname, arr))
            if not _follows_activation(n):
                v = _layer_output(n)
                kind = LAYER_OPS[n.op_type]
                if v.name and v.name not in observed:
                    observed.add(v.name)
                    sites.append(ObservedSite(v.name, label[n], kind, "linear", None,
                                              1 if kind != "linear" else -1, len(sites)))
            continue
        act = activation_of(n)
        if act is None:
            continue
        inp = n.inputs[0]
        assert inp is not None
        producer, chain = find_producer(inp)
        ops = {c.op_type for c in chain} | ({producer.op_type} if producer is not None else set())
        name = n.outputs[0].name
        assert name is not None
        if name in observed:
            continue
        observed.add(name)
        module = label[producer] if producer is not None else label[n]
        sites.append(ObservedSite(name, module, act.name, act.family, act,
                                  1 if ops & _CHANNEL_FIRST else -1, len(sites)))
    for ls in layers:
        ls.next_modules = [label[u] for u in _next_layers(ls.node, layer_nodes)]
    return layers, sites


# -- observation ----------------------------------------------------------------------------
def _inferred_types(model: ir.Model) -> dict[str, ir.DataType]:
    """Element types of every value, from ONNX shape inference (no tensor data is read)."""
    try:
        proto = onnx.shape_inference.infer_shapes(ir.serde.serialize_model(model))
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


class _Accumulator:
    """Streams one site's values into NeuronStats (the ONNX twin of fx's Observer)."""

    def __init__(self, site: ObservedSite, margin: float, sample_rows: int) -> None:
        self.site = site
        sat = (site.activation.saturation(margin)
               if site.activation is not None and site.family == "saturating" else None)
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
            take = rows[: self.sample_rows - self._sampled]
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
            channel_dim=self.site.channel_dim)


def observe_model(model: ir.Model, batches: Iterable[Feed], config: DiagnoseConfig, *,
                  threads: int | None = None) -> Measurements:
    """Measure ``model`` (left unchanged) on validated feed dicts. See the module doc."""
    layers, sites = find_sites(model)
    notes: list[str] = []
    custom = sorted({f"{n.domain}::{n.op_type}" for n in model.graph.all_nodes()
                     if n.domain not in KNOWN_DOMAINS})
    if custom:
        notes.append(f"custom-domain ops left untouched and unanalysed: {', '.join(custom)}")

    observed = model.clone()
    values: dict[str, ir.Value] = {}
    for n in observed.graph:
        for o in n.outputs:
            if o.name:
                values[o.name] = o
    outputs = {v.name for v in observed.graph.outputs}
    inferred: dict[str, ir.DataType] | None = None
    kept: list[ObservedSite] = []
    for s in sites:
        v = values.get(s.value)
        if v is None:
            continue
        if v.type is None:
            dt = _type_of(v, None)
            if dt is None:
                inferred = _inferred_types(observed) if inferred is None else inferred
                dt = _type_of(v, inferred)
            if dt is None:
                notes.append(f"site {s.value}: its element type is unknown; not observed")
                continue
            v.type = ir.TensorType(dt)  # its real type (float16, bfloat16...), never assumed
        if s.value not in outputs:
            observed.graph.outputs.append(v)
            outputs.add(s.value)
        kept.append(s)
    sess = ort_session(observed, threads=threads)
    out_names = [o.name for o in sess.get_outputs()]
    final = [v.name or "" for v in model.graph.outputs]
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
    layer_measures = [
        LayerMeasure(module=ls.module, kind=ls.kind, order=k, d_in=int(ls.weight.shape[1]),
                     d_out=int(ls.weight.shape[0]),
                     weight=torch.from_numpy(np.array(ls.weight, dtype=np.float32)),
                     next_modules=ls.next_modules, node=ls.weight_name)
        for k, ls in enumerate(layers)
    ]
    return Measurements(sites=measures, layers=layer_measures, gradients=False,
                        input_nonfinite=input_nonfinite, output_nonfinite=output_nonfinite,
                        ir="onnx", batches=n_batches, capture="onnxruntime", notes=notes)


__all__ = ["LAYER_OPS", "LayerSite", "ObservedSite", "activation_of", "find_producer",
           "find_sites", "layer_weight", "node_label", "observe_model"]
