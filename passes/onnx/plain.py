"""Dead-unit excision on the ``onnx.ModelProto`` itself, for plain couplings.

:func:`graphsurg.passes.onnx.excise_dead_units.excise_site` works on an ``onnx_ir.Model``:
reading a model into onnx-ir and writing it back costs ~50 us and ~40 us of Python a node,
more than onnxruntime's whole offline optimisation of the same graph. Most dead units sit in
the simplest coupling there is: a layer, element-wise activations, and layers that read the
activation. This module excises those on the protobuf (numpy edits of the initializers'
bytes, the value shapes' dims), with the same arithmetic and the same bookkeeping as
``excise_site`` -- its numpy helpers are shared -- so that both give the same model.

A site is *plain* when (:func:`site_reason` returns None):

* its value is produced by a Gemm (``transA=0``), a MatMul with a 2-D weight, or a Conv with
  ``group=1``, through bias Adds and element-wise single-input activations read only there;
* the value is read only by Gemm (``transA=0``), MatMul (2-D weight) and Conv (``group=1``)
  layers, as their data input, and is no graph output;
* every weight and bias edited is an initializer read only by that node, and a constant that
  folds lands in a bias that exists (a MatMul's: the Add after it);

and the graph is plain (:func:`graph_reason`): IR >= 4, no functions, subgraphs, Constant
nodes (those holding tensors are lifted to initializers first, :func:`lift_constants`, as
the general path lifts them), sparse or external initializers, no initializer listed as an
input or described by a value info, topologically sorted, nothing unused (shapes are
inferred first when a Flatten/Reshape/Concat lacks them, :func:`needs_shapes`, as
``excise_site`` infers them). Everything else (residual joins, gates, depthwise groups,
shared weights, Reshape/Flatten/Concat couplings...) is ``excise_site``'s:
:func:`graphsurg.onnx.apply` uses this module only when every site of the diagnosis is
plain, so that the two never mix in one model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from onnx import numpy_helper

from graphsurg._errors import Refused
from graphsurg._problems import Problem

from ._common import KNOWN_DOMAINS
from .excise_dead_units import (
    _SITE_OPS,
    Excision,
    _is_first,
    _is_last,
    _per_channel_edit,
    _pos,
    check_measured,
    record_excised,
    units_left,
)

_ONNX = ("", "ai.onnx")
#: element-wise single-input ops a plain site's units pass through on the way from the layer
_PASS = frozenset({"Relu", "LeakyRelu", "Sigmoid", "Tanh", "Elu", "Softplus", "Gelu",
                   "HardSigmoid", "Identity"})
#: ops whose output is a diagnosis site, among ``_PASS``
_SITE = _PASS & _SITE_OPS
#: weight types edited here (numpy holds them as they are stored)
_FLOAT = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16})


def _attr(node: onnx.NodeProto, name: str) -> onnx.AttributeProto | None:
    for a in node.attribute:
        if a.name == name:
            return a
    return None


def _int(node: onnx.NodeProto, name: str, default: int) -> int:
    a = _attr(node, name)
    return default if a is None else int(a.i)


def _float(node: onnx.NodeProto, name: str, default: float) -> float:
    a = _attr(node, name)
    return default if a is None else float(a.f)


class ProtoIndex:
    """Who produces and who reads every value of a ``ModelProto``'s main graph, and where its
    initializers and value infos are. Positions, not protos: the index holds for every copy
    of the model whose structure is unchanged (the excisions here change only tensors and
    dims)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        g = model.graph
        self.producer: dict[str, int] = {}
        self.uses: dict[str, list[tuple[int, int]]] = {}
        self.ops: list[tuple[str, str]] = []
        self.init: dict[str, int] = {}
        #: each initializer's element type, by position
        self.init_types: list[int] = []
        for i, t in enumerate(g.initializer):
            self.init[t.name] = i
            self.init_types.append(t.data_type)
        self.value_info = {v.name: i for i, v in enumerate(g.value_info)}
        self.outputs = {o.name for o in g.output}
        self.inputs = {x.name for x in g.input}
        #: the first node that reads a value produced after it (None: sorted), the first
        #: Constant or node with subgraphs, the Flatten/Reshape/Concat nodes
        self.unsorted: int | None = None
        self.special: int | None = None
        self.shaping: list[int] = []
        known = self.inputs | set(self.init)
        graphs = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
        for i, n in enumerate(g.node):
            op = n.op_type
            self.ops.append((n.domain, op))
            for j, x in enumerate(n.input):
                if x:
                    self.uses.setdefault(x, []).append((i, j))
                    if x not in known and self.unsorted is None:
                        self.unsorted = i
            for y in n.output:
                if y:
                    self.producer[y] = i
                    known.add(y)
            if self.special is None and (op == "Constant" or (
                    len(n.attribute) and any(a.type in graphs for a in n.attribute))):
                self.special = i
            if op in ("Flatten", "Reshape", "Concat"):
                self.shaping.append(i)
        #: the plain coupling of each site value found so far (:func:`_site`)
        self.sites: dict[str, _Site] = {}

    def initializer(self, name: str) -> int | None:
        """The position of initializer ``name`` when it is floating-point (numpy-editable)
        and one node input reads it, else None."""
        i = self.init.get(name)
        return i if i is not None and len(self.uses.get(name, ())) == 1 \
            and name not in self.outputs and self.init_types[i] in _FLOAT else None


def graph_reason(model: onnx.ModelProto, index: ProtoIndex) -> str | None:
    """Why the model is not plain (see the module documentation), or None."""
    g = model.graph
    if model.ir_version < 4:
        return "IR < 4 (initializers are graph inputs)"
    if model.functions or len(g.sparse_initializer) or model.training_info:
        return "functions, sparse initializers or training info"
    for t in g.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL or t.name in index.inputs \
                or t.name in index.value_info or t.name in index.producer:
            return f"initializer '{t.name}' is external, an input, described or produced"
    if len(index.init) != len(g.initializer):
        return "initializer names repeat"
    if index.special is not None:
        return f"node {index.special} is a Constant or has subgraphs"
    if index.unsorted is not None:
        return f"node {index.unsorted} reads a value produced later (not sorted)"
    live = {i for y, i in index.producer.items() if y in index.uses or y in index.outputs}
    if len(live) != len(index.ops):
        return "a node is unused"
    if any(name not in index.uses and name not in index.outputs for name in index.init):
        return "an initializer is unused"
    return None


def needs_shapes(model: onnx.ModelProto, index: ProtoIndex) -> bool:
    """``excise_dead_units._needs_shapes`` on the proto: does a Flatten/Reshape (its data
    input) or Concat (any input) lack a static shape?"""
    g = model.graph
    for i in index.shaping:
        n = g.node[i]
        if n.domain in _ONNX:
            ins = n.input[:None if n.op_type == "Concat" else 1]
            if any(_dims(model, index, x) is None for x in ins if x):
                return True
    return False


def _dims(model: onnx.ModelProto, index: ProtoIndex, name: str) -> list[int] | None:
    """The static shape of value ``name`` (value info, graph input or initializer)."""
    g = model.graph
    if name in index.init:
        return list(g.initializer[index.init[name]].dims)
    vi = g.value_info[index.value_info[name]] if name in index.value_info else next(
        (x for x in (*g.input, *g.output) if x.name == name), None)
    if vi is None or not vi.type.HasField("tensor_type") \
            or not vi.type.tensor_type.HasField("shape"):
        return None
    dims = vi.type.tensor_type.shape.dim
    return [int(d.dim_value) for d in dims] if all(d.HasField("dim_value") for d in dims) \
        else None


def _rank(model: onnx.ModelProto, index: ProtoIndex, name: str) -> int | None:
    if name not in index.value_info:
        return None
    t = model.graph.value_info[index.value_info[name]].type
    if not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
        return None
    return len(t.tensor_type.shape.dim)


@dataclass
class _Site:
    layer: int  # node position
    walked: list[str]  # the values from the layer's output to the site value
    sinks: list[tuple[int, int]]  # (node position, input) reading the site value
    consts: list[str]  # per-channel constants added on the way (bias Adds)
    trans_b: list[int]  # transB of the layer, then of each sink (0 for MatMul and Conv)


def _site(model: onnx.ModelProto, index: ProtoIndex, problem: Problem) -> _Site:
    """The plain coupling of ``problem``'s site (found once per index: it depends on the
    structure only); raises :class:`Refused` when it is not."""
    v = problem.site.node
    s = index.sites.get(v)
    if s is None:
        s = index.sites[v] = _find_site(model, index, v)
    return s


def _find_site(model: onnx.ModelProto, index: ProtoIndex, v: str) -> _Site:
    g = model.graph
    walked = [v]
    consts: list[str] = []  # bias Adds' constants on the way (a MatMul's bias)
    while True:
        p = index.producer.get(walked[-1])
        if p is None:
            raise Refused(f"'{walked[-1]}' has no producer")
        n = g.node[p]
        if n.domain not in _ONNX:
            raise Refused(f"custom op '{n.name}'")
        if n.op_type in ("Gemm", "MatMul", "Conv"):
            break
        if n.op_type == "Add" and len(n.input) == 2 and all(n.input):
            own = [index.initializer(x) is not None for x in n.input]
            if own.count(True) != 1 or any(x in index.init for x, o in zip(n.input, own,
                                                                            strict=True)
                                           if not o):
                raise Refused(f"Add '{n.name}' before the units is not a bias of its own")
            consts.append(n.input[own.index(True)])
            walked.append(n.input[own.index(False)])
        elif n.op_type not in _PASS or len([x for x in n.input if x]) != 1:
            raise Refused(f"'{n.name}' ({n.op_type}) before the units")
        else:
            walked.append(n.input[0])
        if len(index.uses.get(walked[-1], ())) != 1 or walked[-1] in index.outputs:
            raise Refused(f"'{walked[-1]}' is read elsewhere")
    layer = p
    n = g.node[layer]
    if len(n.input) < 2 or n.input[0] in index.init or index.initializer(n.input[1]) is None:
        raise Refused(f"'{n.name}' has no weight of its own")
    if n.op_type == "Gemm" and _int(n, "transA", 0):
        raise Refused(f"Gemm '{n.name}' has transA=1")
    w = g.initializer[index.init[n.input[1]]]
    if n.op_type == "MatMul" and len(w.dims) != 2:
        raise Refused(f"MatMul '{n.name}' weight is not 2-D")
    if n.op_type == "Conv" and _int(n, "group", 1) != 1:
        raise Refused(f"Conv '{n.name}' is grouped")
    if len(n.input) > 2 and n.input[2] and index.initializer(n.input[2]) is None:
        raise Refused(f"'{n.name}' bias is not its own initializer")
    if v in index.outputs:
        raise Refused(f"'{v}' is a graph output")
    sinks = index.uses.get(v, [])
    for i, j in sinks:
        c = g.node[i]
        ok = (j == 0 and c.domain in _ONNX and c.op_type in ("Gemm", "MatMul", "Conv")
              and len(c.input) > 1 and index.initializer(c.input[1]) is not None)
        if ok and c.op_type == "Gemm":
            ok = not _int(c, "transA", 0) and n.op_type != "Conv"
        if ok and c.op_type == "MatMul":
            ok = len(g.initializer[index.init[c.input[1]]].dims) == 2 and n.op_type != "Conv"
        if ok and c.op_type == "Conv":
            ok = _int(c, "group", 1) == 1 and n.op_type == "Conv"
        if ok and len(c.input) > 2 and c.input[2]:
            ok = index.initializer(c.input[2]) is not None
        if not ok:
            raise Refused(f"'{c.name}' ({c.op_type}) reads the units")
    if not sinks:
        raise Refused(f"nothing reads '{v}'")
    trans_b = [_int(g.node[i], "transB", 0) if g.node[i].op_type == "Gemm" else 0
               for i in (layer, *(i for i, _ in sinks))]
    return _Site(layer, walked, list(sinks), consts, trans_b)


def site_reason(model: onnx.ModelProto, index: ProtoIndex, problem: Problem) -> str | None:
    """Why ``problem``'s site is not plain (see the module documentation), or None."""
    try:
        s = _site(model, index, problem)
    except Refused as e:
        return str(e)
    consts = problem.evidence.get("constant_values") or []
    if not any(float(c) != 0.0 for c in consts):
        return None  # a zero constant folds into nothing
    g = model.graph
    for i, _ in s.sinks:
        c = g.node[i]
        has_bias = len(c.input) > 2 and bool(c.input[2])
        if c.op_type == "Gemm" and not has_bias:
            return f"Gemm '{c.name}' has no bias to fold a constant into"
        if c.op_type == "Conv" and (not has_bias or _conv_padded(c)):
            return f"Conv '{c.name}' pads or has no bias"
        if c.op_type == "MatMul":
            at = _matmul_add(model, index, i)
            n_out = g.initializer[index.init[c.input[1]]].dims[1]
            b = g.initializer[index.init[g.node[at[0]].input[at[1]]]].dims if at else None
            if b is None or not b or b[-1] != n_out or math.prod(b) != n_out:
                return f"MatMul '{c.name}' has no per-unit bias Add after it"
    return None


def _conv_padded(node: onnx.NodeProto) -> bool:
    auto = _attr(node, "auto_pad")
    if auto is not None and auto.s.decode() not in ("NOTSET", "VALID"):
        return True  # (SAME_* with 1x1 kernels pads nothing, but is excise_site's)
    pads = _attr(node, "pads")
    return pads is not None and any(pads.ints)


def _matmul_add(model: onnx.ModelProto, index: ProtoIndex, i: int) -> tuple[int, int] | None:
    """(Add position, constant input) of the bias Add read only after MatMul ``i``."""
    out = model.graph.node[i].output[0]
    uses = index.uses.get(out, [])
    if len(uses) != 1 or out in index.outputs:
        return None
    a, ai = uses[0]
    add = model.graph.node[a]
    if add.op_type != "Add" or add.domain not in _ONNX or len(add.input) != 2:
        return None
    other = add.input[1 - ai]
    return (a, 1 - ai) if index.initializer(other) is not None else None


#: the numpy types of ``_FLOAT``'s raw bytes
_NUMPY: dict[int, np.dtype[Any]] = {onnx.TensorProto.FLOAT: np.dtype("<f4"),
                                    onnx.TensorProto.DOUBLE: np.dtype("<f8"),
                                    onnx.TensorProto.FLOAT16: np.dtype("<f2")}


class _Tensors:
    """The initializers of one model as numpy arrays, read once and written back in place
    (raw bytes, little-endian, as onnx-ir writes them)."""

    def __init__(self, model: onnx.ModelProto, index: ProtoIndex) -> None:
        self.model, self.index = model, index
        self.arrays: dict[str, np.ndarray] = {}

    def get(self, name: str) -> np.ndarray:
        a = self.arrays.get(name)
        if a is None:
            t = self.model.graph.initializer[self.index.init[name]]
            dt = _NUMPY.get(t.data_type)
            if dt is not None and t.HasField("raw_data"):  # a view of the bytes: no parse
                a = np.frombuffer(t.raw_data, dtype=dt).reshape(tuple(t.dims))
            else:
                a = numpy_helper.to_array(t)
            self.arrays[name] = a
        return a

    def set(self, name: str, a: np.ndarray) -> None:
        t = self.model.graph.initializer[self.index.init[name]]
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        raw = a.tobytes()  # (C order, whatever the array's layout)
        if not t.HasField("raw_data"):
            for f in ("float_data", "double_data", "int32_data"):
                t.ClearField(f)
        del t.dims[:]
        t.dims.extend(a.shape)
        t.raw_data = raw
        self.arrays[name] = a


def excise(model: onnx.ModelProto, index: ProtoIndex, tensors: _Tensors, problem: Problem,
           excised: dict[str, set[int]]) -> Excision:
    """``excise_site`` on the proto for a plain site (in place; see the module doc). The
    checks, refusals and the ``excised`` bookkeeping are ``excise_site``'s.

    Raises:
        Refused: as ``excise_site`` (the site is not plain: :func:`site_reason` first).
    """
    site = problem.site.address
    left = units_left(problem, excised)
    if isinstance(left, Excision):
        return left
    units, consts, all_units, gone, seen_w = left
    s = _site(model, index, problem)
    g = model.graph
    layer = g.node[s.layer]
    rows = np.asarray(sorted(units), dtype=np.int64)
    vals = np.asarray(consts, np.float64)[np.argsort(np.asarray(units))]
    # a zero constant folds to nothing: its fold is not computed (excise_site computes it,
    # and with a non-finite weight column would fold NaN into the bias; here nothing)
    nonzero = bool(vals.any())
    edits: dict[str, np.ndarray] = {}
    # -- the source: the layer's output rows (excise_dead_units._source_layer)
    w = tensors.get(layer.input[1])
    op = layer.op_type
    bias = layer.input[2] if len(layer.input) > 2 and layer.input[2] else None
    tb = 0
    rank: int | None
    if op == "Gemm":
        tb = s.trans_b[0]
        width = w.shape[0] if tb else w.shape[1]
        axis, rank = 1, 2
    elif op == "MatMul":
        width = w.shape[1]
        rank = _rank(model, index, layer.output[0])
        axis = -1 if rank is None else rank - 1
    else:
        width = w.shape[0]
        axis, rank = 1, w.ndim
    if rows[-1] >= width or rows[0] < 0:
        raise Refused(f"unit indices {rows.tolist()[:8]} out of range for width {width}")
    if len(rows) >= width:
        raise Refused(f"all {width} units are constant: removing the whole layer is a "
                      "module-scale edit, not done by this pass")
    check_measured(problem, seen_w, width, axis, rank, layer.name or op)
    keep = np.ones(width, bool)
    keep[rows] = False
    if op == "Gemm":
        edits[layer.input[1]] = w[keep] if tb else w[:, keep]
        if bias is not None:
            c = tensors.get(bias)
            e = c[keep] if c.shape == (width,) else _per_channel_edit(
                c, 1, 2, width, rows, f"Gemm '{layer.name}' bias")
            if e is not None:
                edits[bias] = e
    elif op == "MatMul":
        edits[layer.input[1]] = w[:, keep]
    else:
        edits[layer.input[1]] = w[keep]
        if bias is not None:
            edits[bias] = tensors.get(bias)[keep]
    for name in s.consts:  # (excise_dead_units._source_region_node)
        e = _per_channel_edit(tensors.get(name), axis, rank, width, rows,
                              f"constant of Add '{name}'")
        if e is not None:
            edits[name] = e
    # -- the sinks (excise_dead_units._use_gemm / _use_matmul / _use_conv)
    sinks: list[str] = []
    for (i, _), ctb in zip(s.sinks, s.trans_b[1:], strict=True):
        c = g.node[i]
        cw = tensors.get(c.input[1])
        cb = c.input[2] if len(c.input) > 2 and c.input[2] else None
        if c.op_type == "Gemm":
            if not _is_last(axis, 2):
                raise Refused(f"Gemm '{c.name}' reads the units transposed")
            edits[c.input[1]] = cw[:, keep] if ctb else cw[keep]
            sinks.append(f"Gemm '{c.name}'")
            if not nonzero:
                continue
            wk = cw.T if ctb else cw
            alpha, beta = _float(c, "alpha", 1.0), _float(c, "beta", 1.0)
            fold = alpha * (vals @ wk[rows, :].astype(np.float64))
            if np.any(fold):
                if beta == 0 or cb is None:
                    raise Refused(f"Gemm '{c.name}' has no bias to fold the constant into")
                b = tensors.get(cb)
                edits[cb] = (b + fold / beta).astype(b.dtype)
        elif c.op_type == "MatMul":
            if not _is_last(axis, rank):
                raise Refused(f"MatMul '{c.name}' reads the units along another axis")
            edits[c.input[1]] = cw[keep]
            sinks.append(f"MatMul '{c.name}'")
            if not nonzero:
                continue
            fold = vals @ cw[rows, :].astype(np.float64)
            if np.any(fold):
                at = _matmul_add(model, index, i)
                if at is None:
                    raise Refused(f"MatMul '{c.name}' has no bias Add to fold into")
                name = g.node[at[0]].input[at[1]]
                b = tensors.get(name)
                if not (b.shape[-1:] == fold.shape and b.size == fold.size):
                    raise Refused(f"the bias after MatMul '{c.name}' is not per unit")
                edits[name] = (b + fold.reshape(b.shape)).astype(b.dtype)
        else:
            if not _is_first(axis, rank):
                raise Refused(f"Conv '{c.name}' reads the units along another axis")
            edits[c.input[1]] = cw[:, keep]
            sinks.append(f"Conv '{c.name}'")
            if not nonzero:
                continue
            spatial = tuple(range(2, cw.ndim))
            wsum = cw.astype(np.float64).sum(axis=spatial) if spatial else cw.astype(np.float64)
            fold = wsum[:, rows] @ vals
            if np.any(fold):
                if cb is None or _conv_padded(c):
                    raise Refused(f"Conv '{c.name}' pads or has no bias to fold into")
                b = tensors.get(cb)
                edits[cb] = (b + fold).astype(b.dtype)
    for name, a in edits.items():
        tensors.set(name, a)
    # the value shapes (excise_dead_units._execute): the layer's output to the site value
    for name in s.walked:
        k = index.value_info.get(name)
        if k is None:
            continue
        t = g.value_info[k].type
        if not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
            continue
        dims = t.tensor_type.shape.dim
        p = _pos(axis, len(dims))
        if p is not None and p < len(dims) and dims[p].HasField("dim_value"):
            dims[p].dim_value -= len(rows)
    # the bookkeeping (excise_site's): every site value on the way, in original numbering
    producer = layer.name or op
    done: dict[str, set[int]] = {}
    # (an unnamed layer's values are recorded under "" by excise_site, that is not at all)
    for name in s.walked if layer.name else s.walked[:1]:
        p = index.producer.get(name)
        if p is not None and g.node[p].op_type in _SITE and g.node[p].domain in _ONNX:
            done.setdefault(f"{producer}:{name}", set()).update(int(r) for r in rows)
    record_excised(excised, site, done, all_units)
    kept_units = sorted(units) if gone else all_units
    return Excision(site, producer, kept_units, width, width - len(units), sinks)


def lift_constants(model: onnx.ModelProto) -> int:
    """``_common.lift_constants`` on the proto's main graph: every ``Constant`` node holding a
    tensor (``value``, ``value_float(s)``, ``value_int(s)``; Paddle2ONNX, tf2onnx and older
    exporters keep weights so) becomes an initializer named as its output, appended in node
    order, as the general path writes them. Constants that are graph outputs or hold strings
    or sparse values stay (and keep the model from being plain); an IR < 4 model is left as
    it is. Returns the number lifted."""
    if model.ir_version < 4:
        return 0
    g = model.graph
    outputs = {o.name for o in g.output}
    names = {t.name for t in g.initializer}
    kept: list[onnx.NodeProto] = []
    lifted: list[onnx.TensorProto] = []
    for n in g.node:
        t = _constant(n) if n.op_type == "Constant" and n.domain in _ONNX else None
        out = n.output[0] if len(n.output) else ""
        if t is None or not out or out in outputs or out in names:
            kept.append(n)
            continue
        t.name = out
        names.add(out)
        lifted.append(t)
    if lifted:
        del g.node[:]
        g.node.extend(kept)
        g.initializer.extend(lifted)
    return len(lifted)


def _constant(node: onnx.NodeProto) -> onnx.TensorProto | None:
    """The tensor of a ``Constant`` node (``_common.constant_tensor``'s attributes, in its
    order), or None."""
    a = {x.name: x for x in node.attribute}
    if "value" in a:
        t = onnx.TensorProto()
        t.CopyFrom(a["value"].t)
        return t
    if "value_float" in a:
        return numpy_helper.from_array(np.array(a["value_float"].f, dtype=np.float32))
    if "value_floats" in a:
        return numpy_helper.from_array(np.array(list(a["value_floats"].floats), np.float32))
    if "value_int" in a:
        return numpy_helper.from_array(np.array(a["value_int"].i, dtype=np.int64))
    if "value_ints" in a:
        return numpy_helper.from_array(np.array(list(a["value_ints"].ints), np.int64))
    return None


def parameters(model: onnx.ModelProto) -> int:
    """Elements of the floating-point initializers (a plain model has no Constant nodes or
    subgraphs): ``_common.parameter_count``'s figure."""
    floating: dict[int, bool] = {}
    total = 0
    for t in model.graph.initializer:
        f = floating.get(t.data_type)
        if f is None:
            f = floating[t.data_type] = ir.DataType(t.data_type).is_floating_point()
        if f:
            total += math.prod(t.dims)
    return total


def custom_ops(model: onnx.ModelProto) -> list[str]:
    """``graphsurg.onnx._custom_ops`` on the proto."""
    custom = sorted({f"{n.domain}::{n.op_type} ('{n.name}')" for n in model.graph.node
                     if n.domain not in KNOWN_DOMAINS})
    return ["custom-domain ops left untouched: " + ", ".join(custom)] if custom else []


def plain_reason(model: onnx.ModelProto, index: ProtoIndex, problems: Sequence[Problem]
                 ) -> str | None:
    """Why ``model`` (indexed by ``index``) and the excision sites among ``problems``
    (``DeadNeurons`` with constant units) are not all plain, or None."""
    why = graph_reason(model, index)
    if why:
        return why
    for p in problems:
        if p.kind == "DeadNeurons" and p.evidence.get("constant") and p.site.ir == "onnx":
            why = site_reason(model, index, p)
            if why:
                return f"{p.site.address}: {why}"
    return None


__all__ = ["ProtoIndex", "excise", "graph_reason", "lift_constants", "needs_shapes",
           "parameters", "plain_reason", "site_reason"]
