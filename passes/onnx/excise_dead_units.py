"""``excise_dead_units``: remove units that are constant on the calibration data.

The ONNX applier of the library's ``excise_dead`` replacement is :func:`excise_site` (one
``DeadNeurons`` problem at a time, so the spine can roll back one site and keep the others);
:class:`ExciseDeadUnits` is the onnx-ir pass that loops over a diagnosis and calls it.

Rewrites, for a unit ``u`` of an activation ``A = act(layer(x))`` that the diagnosis found
constant (value ``c_u``)::

    layer(W, b) -> act -> ... -> consumer(V, d)
    ==>  layer(W[:, keep], b[keep]) -> act -> ... -> consumer(V[keep, :], d + sum_u c'_u V[u, :])

where ``c'_u`` is the constant as it reaches the consumer. Exact on the calibration data up
to float32 round-off; the model gets smaller and faster.

Coupling is followed, never guessed: the producer is a Gemm/MatMul/Conv(group=1), optionally
through a per-channel bias Add and BatchNormalization; from ``A`` every path is followed
through element-wise activations, Identity/Dropout, BatchNormalization, pooling, Flatten,
flattening Reshape and channel Concat to every consuming Gemm/MatMul/Conv, whose input rows or
channels are removed and whose bias absorbs the constant. Anything else (a residual Add that
couples the unit with another branch, a graph output, a value read twice, a padded Conv fed a
non-zero constant, grouped convolutions) refuses the site with the reason; nothing is changed
there.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from graphsurg._errors import Refused
from graphsurg._problems import Problem

from ._pass import (
    GraphsurgPass,
    const_array,
    float_attr,
    int_attr,
    ints_attr,
    new_initializer,
    set_const,
)

_ONNX = ("", "ai.onnx")


def _erf(x: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erf, otypes=[np.float64])(x)


def _unary(node: ir.Node) -> Callable[[np.ndarray], np.ndarray] | None:
    """The numpy function of an element-wise single-input op (constants flow through it)."""
    op = node.op_type
    if op in ("Identity", "Dropout"):
        return lambda c: c
    if op == "Relu":
        return lambda c: np.maximum(c, 0.0)
    if op == "LeakyRelu":
        a = float_attr(node, "alpha", 0.01)
        return lambda c: np.where(c >= 0, c, a * c)
    if op == "Sigmoid":
        return lambda c: 1.0 / (1.0 + np.exp(-c))
    if op == "Tanh":
        return np.tanh
    if op == "Elu":
        a = float_attr(node, "alpha", 1.0)
        return lambda c: np.where(c > 0, c, a * (np.exp(c) - 1.0))
    if op == "Softplus":
        return lambda c: np.logaddexp(0.0, c)
    if op == "Gelu":
        if (node.attributes.get("approximate") is not None
                and node.attributes["approximate"].as_string() == "tanh"):  # fmt: skip
            return lambda c: 0.5 * c * (1 + np.tanh(math.sqrt(2 / math.pi) * (c + 0.044715 * c**3)))
        return lambda c: 0.5 * c * (1.0 + _erf(c / math.sqrt(2.0)))
    if op == "HardSigmoid":
        a, b = float_attr(node, "alpha", 0.2), float_attr(node, "beta", 0.5)
        return lambda c: np.clip(a * c + b, 0.0, 1.0)
    if op == "Clip":
        lo = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
        hi = const_array(node.inputs[2]) if len(node.inputs) > 2 else None
        if (len(node.inputs) > 1 and node.inputs[1] is not None and lo is None) or (
            len(node.inputs) > 2 and node.inputs[2] is not None and hi is None
        ):
            return None
        return lambda c: np.clip(
            c,
            -np.inf if lo is None else float(lo),
            np.inf if hi is None else float(hi),
        )
    return None


_ACT_OPS = frozenset(
    {"Relu", "LeakyRelu", "Sigmoid", "Tanh", "Elu", "Softplus", "Gelu", "HardSigmoid", "Clip"}
)
_POOLS = frozenset({"MaxPool", "GlobalAveragePool", "GlobalMaxPool", "AveragePool"})


@dataclass
class _Flow:
    """Removed indices along the channel axis of ``value`` and the constants there."""

    value: ir.Value
    axis: int  # 1 (channels first) or -1 (channels last)
    rank: int | None
    rows: np.ndarray
    vals: np.ndarray


@dataclass
class _Plan:
    params: list[tuple[ir.Node, int, np.ndarray]] = field(default_factory=list)
    shapes: list[tuple[ir.Value, int, int]] = field(default_factory=list)
    add_bias_after: list[tuple[ir.Node, np.ndarray]] = field(default_factory=list)
    sinks: list[str] = field(default_factory=list)


def _is_last(axis: int, rank: int | None) -> bool:
    return axis == -1 or (rank is not None and axis == rank - 1)


def _is_first(axis: int, rank: int | None) -> bool:
    return axis == 1 or (rank == 2 and axis == -1)


def _rank(v: ir.Value) -> int | None:
    return None if v.shape is None else len(v.shape)


def _static(v: ir.Value) -> list[int] | None:
    if v.shape is None:
        return None
    dims = [d if isinstance(d, int) else None for d in v.shape]
    return None if any(d is None for d in dims[1:]) else [d if d is not None else -1 for d in dims]


def _per_channel_edit(c: np.ndarray, axis: int, rank: int | None, width: int, rows: np.ndarray,
                      what: str) -> np.ndarray | None:  # fmt: skip
    """Delete ``rows`` from a broadcast constant aligned with the channel axis; None when the
    constant does not vary along it; refuse when it broadcasts in a way not understood."""
    if c.ndim == 0 or c.size == 1:
        return None
    r = rank if rank is not None else c.ndim
    if c.ndim > r:
        raise Refused(f"{what} has more dimensions than the value it is added to")
    full = c.reshape((1,) * (r - c.ndim) + c.shape)
    pos = r - 1 if axis == -1 else axis
    others = [d for i, d in enumerate(full.shape) if i != pos]
    if any(d != 1 for d in others) or full.shape[pos] not in (1, width):
        raise Refused(f"{what} of shape {c.shape} is not a per-channel constant")
    if full.shape[pos] == 1:
        return None
    out = np.delete(full, rows, axis=pos)
    return out.reshape(out.shape[r - c.ndim :])


def _infer_shapes(model: ir.Model) -> None:
    from onnx_ir.passes.common import ShapeInferencePass

    try:
        ShapeInferencePass(strict_mode=False)(model)
    except Exception:  # best effort: sites that need a shape refuse with the reason
        return


@dataclass
class Excision:
    """What :func:`excise_site` removed at one site.

    Attributes:
        site: the site's address.
        producer: the producing layer's node name.
        units: the units removed (indices in the width before the edit), ascending.
        width_before / width_after: the producer's width.
        sinks: the consumers the constants were folded into (``"Gemm 'fc2'"``...).
    """

    site: str
    producer: str
    units: list[int]
    width_before: int
    width_after: int
    sinks: list[str]


def _values(graph: ir.Graph) -> dict[str, ir.Value]:
    values: dict[str, ir.Value] = {}
    for node in graph:
        for o in node.outputs:
            if o.name:
                values[o.name] = o
    return values


def _needs_shapes(graph: ir.Graph) -> bool:
    """Flatten/Reshape/Concat offsets need static shapes: is one of their inputs without?"""
    for n in graph:
        if n.op_type in ("Flatten", "Reshape", "Concat") and any(
                v is not None and _static(v) is None for v in n.inputs[:1 if n.op_type != "Concat"
                                                                          else None]):
            return True
    return False


def excise_site(model: ir.Model, problem: Problem,
                excised: dict[str, set[int]] | None = None) -> Excision:
    """Remove the constant units of one ``DeadNeurons`` problem from ``model`` (in place).

    Reads the evidence keys ``constant`` (unit indices constant on the data),
    ``constant_values`` (their values, same order) and ``channel_dim`` (the unit axis of the
    observed value). Nothing is changed unless every check passes (a dry run plans the whole
    edit first).

    Args:
        model: the private ``onnx_ir.Model`` (edited in place).
        problem: a ``DeadNeurons`` problem whose ``site.node`` is the activation's output value.
        excised: site address -> units already removed (updated; a site excised before is
            refused: its unit indices no longer hold).

    Raises:
        Refused: with the reason (coupling not understood, no constant unit, ...).
    """
    site = problem.site.address
    if problem.kind != "DeadNeurons":
        raise Refused(f"excise_dead_units treats DeadNeurons, not {problem.kind}")
    units = [int(u) for u in problem.evidence.get("constant", [])]
    if not units:
        raise Refused(f"no unit at {site} is constant on the data (evidence 'constant' is "
                      "empty): removing dormant units would change the function")
    consts = problem.evidence.get("constant_values")
    if consts is None or len(consts) != len(units):
        raise Refused(f"evidence at {site} has {len(units)} constant unit(s) but "
                      f"{0 if consts is None else len(consts)} constant value(s)")
    if excised is not None and excised.get(site):
        raise Refused(f"units were already excised at {site}: its unit indices changed")
    graph = model.graph
    if _needs_shapes(graph):
        _infer_shapes(model)
    v = _values(graph).get(problem.site.node)
    if v is None:
        raise Refused(f"value '{problem.site.node}' is not in the model")
    plan, axis, rank, width, producer = _plan(graph, v, units, np.asarray(consts, np.float64))
    dim = problem.evidence.get("channel_dim")
    if dim is not None and rank is not None and int(dim) % rank != axis % rank:
        raise Refused(f"the evidence measured units along axis {dim} of '{v.name}' but its "
                      f"producer's units are along axis {axis}")
    _execute(graph, plan)
    if excised is not None:
        excised.setdefault(site, set()).update(units)
    return Excision(site, producer, sorted(units), width, width - len(units), list(plan.sinks))


class ExciseDeadUnits(GraphsurgPass):
    """Remove the constant units of every ``DeadNeurons`` site of the diagnosis with
    :func:`excise_site` (see module doc). ``rewrites`` counts excised sites; ``refusals``
    says why a site was left alone."""

    name = "excise_dead_units"
    exact = True

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if self.diagnosis is None:
            raise ValueError("excise_dead_units needs a diagnosis (run graphsurg.onnx.analyze)")
        for p in self.diagnosis.of_kind("DeadNeurons"):
            if not p.evidence.get("constant"):
                continue
            try:
                done = excise_site(model, p, self.state.excised)
            except Refused as e:
                self.refuse(p.site.address, str(e))
                continue
            self.rewrites += 1
            self.notes.append(f"{done.site}: removed {len(done.units)} unit(s); folded into "
                              + ", ".join(done.sinks))
        return ir.passes.PassResult(model, self.rewrites > 0)


# -- planning (a dry run: nothing is changed until every check passed) --------------------
def _plan(graph: ir.Graph, a: ir.Value, units: list[int], consts: np.ndarray
          ) -> tuple[_Plan, int, int | None, int, str]:
    """The whole edit for the units of activation output ``a`` (a dry run) and
    ``(axis, rank, width, producer name)`` of the producing layer."""
    plan = _Plan()
    act = a.producer()
    if act is None or act.domain not in _ONNX or act.op_type not in _ACT_OPS:
        raise Refused(f"'{a.name}' is not the output of an element-wise activation")
    rows = np.asarray(sorted(units), dtype=np.int64)
    order = np.argsort(np.asarray(units))
    vals = consts[order]
    axis, rank, width, producer = _plan_producer(act, rows, plan)
    if len(rows) >= width:
        raise Refused(
            f"all {width} units are constant: removing the whole layer is a module-scale "
            "edit, not done by this pass"
        )
    if max(units) >= width:
        raise Refused(f"unit {max(units)} is out of range for width {width}")
    plan.shapes.append((a, axis, len(rows)))
    _plan_consumers(graph, _Flow(a, axis, rank, rows, vals), plan, width, set())
    return plan, axis, rank, width, producer


def _plan_producer(act: ir.Node, rows: np.ndarray, plan: _Plan
                   ) -> tuple[int, int | None, int, str]:
    chain: list[ir.Node] = []
    v = act.inputs[0]
    node: ir.Node | None = None
    while True:
        if v is None:
            raise Refused("the activation has no input")
        if v.is_graph_output() or v.is_graph_input() or len(v.uses()) != 1:
            users = ", ".join(sorted({n.name or n.op_type for n, _ in v.uses()}))
            raise Refused(
                f"value '{v.name}' between the layer and the activation is also read by "
                f"{users or 'the graph outputs'}: its units are coupled to another consumer"
            )
        node = v.producer()
        if node is None or node.domain not in _ONNX:
            raise Refused(f"value '{v.name}' has no understood producer")
        if node.op_type in ("Gemm", "MatMul", "Conv"):
            break
        if node.op_type in ("Add", "BatchNormalization", "Identity"):
            chain.append(node)
            if node.op_type == "Add":
                c0, c1 = const_array(node.inputs[0]), const_array(node.inputs[1])
                if (c0 is None) == (c1 is None):
                    raise Refused(
                        f"Add '{node.name}' before the activation adds two "
                        f"{'constants' if c0 is not None else 'branches'}: coupling not understood"
                    )
                v = node.inputs[1] if c0 is not None else node.inputs[0]
            else:
                v = node.inputs[0]
            continue
        raise Refused(
            f"the units are produced by '{node.name}' (op {node.op_type}); only "
            "Gemm/MatMul/Conv (+ bias Add, BatchNormalization) producers are understood"
        )
    layer = node
    assert layer is not None
    rank: int | None
    w = const_array(layer.inputs[1]) if len(layer.inputs) > 1 else None
    if w is None:
        raise Refused(f"'{layer.name}' ({layer.op_type}) has no constant weight")
    if layer.op_type == "Gemm":
        if int_attr(layer, "transA", 0):
            raise Refused(f"Gemm '{layer.name}' has transA=1")
        trans_b = int_attr(layer, "transB", 0)
        width = w.shape[0] if trans_b else w.shape[1]
        _check_rows(rows, width)
        plan.params.append((layer, 1, np.delete(w, rows, axis=0 if trans_b else 1)))
        c = const_array(layer.inputs[2]) if len(layer.inputs) > 2 and layer.inputs[2] else None
        if len(layer.inputs) > 2 and layer.inputs[2] is not None and c is None:
            raise Refused(f"Gemm '{layer.name}' has a non-constant C input")
        if c is not None:
            e = _per_channel_edit(c, -1, 2, width, rows, f"Gemm '{layer.name}' bias")
            if e is not None:
                plan.params.append((layer, 2, e))
        axis, rank = -1, 2
    elif layer.op_type == "MatMul":
        if w.ndim != 2 or const_array(layer.inputs[0]) is not None:
            raise Refused(f"MatMul '{layer.name}' weight is not a 2-D constant right operand")
        width = w.shape[1]
        _check_rows(rows, width)
        plan.params.append((layer, 1, np.delete(w, rows, axis=1)))
        axis, rank = -1, _rank(layer.outputs[0])
    else:  # Conv
        if int_attr(layer, "group", 1) != 1:
            raise Refused(f"Conv '{layer.name}' is grouped (group={int_attr(layer, 'group', 1)})")
        width = w.shape[0]
        _check_rows(rows, width)
        plan.params.append((layer, 1, np.delete(w, rows, axis=0)))
        if len(layer.inputs) > 2 and layer.inputs[2] is not None:
            b = const_array(layer.inputs[2])
            if b is None:
                raise Refused(f"Conv '{layer.name}' has a non-constant bias")
            plan.params.append((layer, 2, np.delete(b, rows, axis=0)))
        axis, rank = 1, w.ndim
    plan.shapes.append((layer.outputs[0], axis, len(rows)))
    for node in reversed(chain):
        if node.op_type == "Add":
            ci = 0 if const_array(node.inputs[0]) is not None else 1
            c = const_array(node.inputs[ci])
            assert c is not None
            e = _per_channel_edit(c, axis, rank, width, rows, f"bias of Add '{node.name}'")
            if e is not None:
                plan.params.append((node, ci, e))
        elif node.op_type == "BatchNormalization":
            if not _is_first(axis, rank):
                raise Refused(f"BatchNormalization '{node.name}' normalises another axis")
            for i in range(1, 5):
                arr = const_array(node.inputs[i])
                if arr is None:
                    raise Refused(f"BatchNormalization '{node.name}' has non-constant parameters")
                plan.params.append((node, i, np.delete(arr, rows, axis=0)))
        plan.shapes.append((node.outputs[0], axis, len(rows)))
    return axis, rank, width, layer.name or layer.op_type

def _check_rows(rows: np.ndarray, width: int) -> None:
    if len(rows) and int(rows.max()) >= width:
        raise Refused(f"unit {int(rows.max())} is out of range for width {width}")

def _plan_consumers(graph: ir.Graph, f: _Flow, plan: _Plan, width: int,
                    seen: set[int]) -> None:  # fmt: skip
    v = f.value
    if v.is_graph_output():
        raise Refused(f"value '{v.name}' is a graph output: its units are visible to the caller")
    if not v.uses():
        return
    for node, idx in list(v.uses()):
        if id(node) in seen:
            raise Refused(f"'{node.name}' is reached twice: coupling not understood")
        seen.add(id(node))
        _plan_use(graph, f, node, idx, plan, width, seen)

def _plan_use(graph: ir.Graph, f: _Flow, node: ir.Node, idx: int, plan: _Plan,
              width: int, seen: set[int]) -> None:  # fmt: skip
    op, name = node.op_type, node.name
    if node.domain not in _ONNX:
        raise Refused(f"consumer '{name}' is a custom op ({node.domain}::{op})")
    fn = _unary(node) if idx == 0 else None
    if fn is not None and op in (_ACT_OPS | {"Identity", "Dropout"}):
        if op == "Dropout" and len(node.inputs) > 2 and node.inputs[2] is not None:
            raise Refused(f"Dropout '{name}' has a training_mode input")
        out = node.outputs[0]
        plan.shapes.append((out, f.axis, len(f.rows)))
        _plan_consumers(graph, _Flow(out, f.axis, f.rank, f.rows, fn(f.vals)), plan, width, seen)
        return
    if op in _POOLS and idx == 0:
        if not _is_first(f.axis, f.rank):
            raise Refused(f"{op} '{name}' pools over the channel axis")
        if op == "AveragePool" and int_attr(node, "count_include_pad", 0) and any(
            ints_attr(node, "pads") or [0]
        ):
            raise Refused(f"AveragePool '{name}' counts padding: constants do not pass exactly")
        out = node.outputs[0]
        plan.shapes.append((out, 1, len(f.rows)))
        _plan_consumers(graph, _Flow(out, 1, f.rank, f.rows, f.vals), plan, width, seen)
        return
    if op == "BatchNormalization" and idx == 0:
        if not _is_first(f.axis, f.rank):
            raise Refused(f"BatchNormalization '{name}' normalises another axis")
        ps = [const_array(node.inputs[i]) for i in range(1, 5)]
        if any(x is None for x in ps):
            raise Refused(f"BatchNormalization '{name}' has non-constant parameters")
        scale, bias, mean, var = (np.asarray(x, np.float64) for x in ps)  # type: ignore[arg-type]
        eps = float_attr(node, "epsilon", 1e-5)
        r = f.rows
        vals = (f.vals - mean[r]) / np.sqrt(var[r] + eps) * scale[r] + bias[r]
        for i, x in zip(range(1, 5), ps, strict=True):
            assert x is not None
            plan.params.append((node, i, np.delete(x, r, axis=0)))
        out = node.outputs[0]
        plan.shapes.append((out, 1, len(r)))
        _plan_consumers(graph, _Flow(out, 1, f.rank, r, vals), plan, width, seen)
        return
    if op in ("Flatten", "Reshape") and idx == 0:
        _plan_flatten(graph, f, node, plan, width, seen)
        return
    if op == "Concat":
        _plan_concat(graph, f, node, idx, plan, width, seen)
        return
    if op == "Gemm" and idx == 0:
        _plan_gemm(f, node, plan)
        return
    if op == "MatMul" and idx == 0:
        _plan_matmul(f, node, plan)
        return
    if op == "Conv" and idx == 0:
        _plan_conv(f, node, plan)
        return
    if op in ("Add", "Sub", "Mul", "Div") and node.inputs[1 - idx] is not None:
        other = node.inputs[1 - idx]
        assert other is not None
        if const_array(other) is None:
            kind = "residual Add" if op == "Add" else f"{op}"
            raise Refused(
                f"{kind} '{name}' couples the units with another branch ('{other.name}') "
                "that is not constant on them"
            )
    raise Refused(
        f"units flow into '{name}' (op {op}, input {idx}): coupling through {op} is not understood"
    )

def _plan_flatten(graph: ir.Graph, f: _Flow, node: ir.Node, plan: _Plan, width: int,
                  seen: set[int]) -> None:  # fmt: skip
    src = node.inputs[0]
    assert src is not None
    shape = _static(src)
    name = node.name
    if shape is None or len(shape) < 2 or not _is_first(f.axis, len(shape)):
        raise Refused(f"{node.op_type} '{name}': input shape unknown or channels not at axis 1")
    inner = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    total = shape[1] * inner
    if node.op_type == "Flatten":
        if int_attr(node, "axis", 1) != 1:
            raise Refused(f"Flatten '{name}' flattens at axis {int_attr(node, 'axis', 1)}")
    else:
        target = const_array(node.inputs[1])
        if target is None or target.shape != (2,) or int(target[1]) != total or int(target[0]) not in (-1, 0, shape[0]):
            raise Refused(f"Reshape '{name}' is not a flatten to (N, {total})")
        if int(target[0]) == -1 and shape[0] == -1:
            pass
        new_t = target.copy()
        new_t[1] = total - len(f.rows) * inner
        plan.params.append((node, 1, new_t))
    rows = (f.rows[:, None] * inner + np.arange(inner)[None, :]).reshape(-1)
    vals = np.repeat(f.vals, inner)
    out = node.outputs[0]
    plan.shapes.append((out, -1, len(rows)))
    _plan_consumers(graph, _Flow(out, -1, 2, rows, vals), plan, width, seen)

def _plan_concat(graph: ir.Graph, f: _Flow, node: ir.Node, idx: int, plan: _Plan,
                 width: int, seen: set[int]) -> None:  # fmt: skip
    out = node.outputs[0]
    rank = _rank(out) or f.rank
    ax = int_attr(node, "axis", 0)
    if rank is None:
        raise Refused(f"Concat '{node.name}': rank unknown")
    ax_n = ax % rank
    own = (rank - 1) if f.axis == -1 else f.axis
    if ax_n != own % rank:
        raise Refused(f"Concat '{node.name}' joins along axis {ax}, not the units' axis")
    offset = 0
    for i in range(idx):
        s = node.inputs[i]
        dims = None if s is None or s.shape is None else s.shape[ax_n]
        if not isinstance(dims, int):
            raise Refused(f"Concat '{node.name}': width of input {i} unknown")
        offset += dims
    plan.shapes.append((out, f.axis, len(f.rows)))
    _plan_consumers(
        graph, _Flow(out, f.axis, rank, f.rows + offset, f.vals), plan, width, seen
    )

def _plan_gemm(f: _Flow, node: ir.Node, plan: _Plan) -> None:
    name = node.name
    if int_attr(node, "transA", 0) or not _is_last(f.axis, 2):
        raise Refused(f"Gemm '{name}' reads the units transposed")
    b = const_array(node.inputs[1])
    if b is None:
        raise Refused(f"Gemm '{name}' has no constant weight")
    tb = int_attr(node, "transB", 0)
    wk = b.T if tb else b
    alpha, beta = float_attr(node, "alpha", 1.0), float_attr(node, "beta", 1.0)
    fold = alpha * (f.vals @ wk[f.rows, :].astype(np.float64))
    plan.params.append((node, 1, np.delete(b, f.rows, axis=1 if tb else 0)))
    plan.sinks.append(f"Gemm '{name}'")
    if not np.any(fold):
        return
    has_c = len(node.inputs) > 2 and node.inputs[2] is not None
    if beta == 0:
        raise Refused(f"Gemm '{name}' has beta=0: no bias to fold the constant into")
    if has_c:
        c = const_array(node.inputs[2])
        if c is None:
            raise Refused(f"Gemm '{name}' has a non-constant C input")
        plan.params.append((node, 2, (c + fold / beta).astype(c.dtype)))
    else:
        plan.params.append((node, 2, (fold / beta).astype(b.dtype)))

def _plan_matmul(f: _Flow, node: ir.Node, plan: _Plan) -> None:
    name = node.name
    w = const_array(node.inputs[1])
    if w is None or w.ndim != 2:
        raise Refused(f"MatMul '{name}' has no 2-D constant weight")
    if not _is_last(f.axis, f.rank):
        raise Refused(f"MatMul '{name}' reads the units along another axis")
    fold = f.vals @ w[f.rows, :].astype(np.float64)
    plan.params.append((node, 1, np.delete(w, f.rows, axis=0)))
    plan.sinks.append(f"MatMul '{name}'")
    if not np.any(fold):
        return
    out = node.outputs[0]
    uses = list(out.uses())
    if len(uses) == 1 and not out.is_graph_output():
        add, ai = uses[0]
        c = const_array(add.inputs[1 - ai]) if add.op_type == "Add" and add.domain in _ONNX else None
        if c is not None and c.shape[-1:] == fold.shape and c.size == fold.size:
            plan.params.append((add, 1 - ai, (c + fold.reshape(c.shape)).astype(c.dtype)))
            return
    if out.is_graph_output():
        raise Refused(f"MatMul '{name}' output is a graph output: no bias to fold into")
    plan.add_bias_after.append((node, fold.astype(w.dtype)))

def _plan_conv(f: _Flow, node: ir.Node, plan: _Plan) -> None:
    name = node.name
    if not _is_first(f.axis, f.rank):
        raise Refused(f"Conv '{name}' reads the units along another axis")
    if int_attr(node, "group", 1) != 1:
        raise Refused(f"Conv '{name}' is grouped")
    w = const_array(node.inputs[1])
    if w is None:
        raise Refused(f"Conv '{name}' has no constant weight")
    fold = np.einsum("j,mj->m", f.vals, w[:, f.rows].reshape(w.shape[0], len(f.rows), -1).sum(-1).astype(np.float64))
    plan.params.append((node, 1, np.delete(w, f.rows, axis=1)))
    plan.sinks.append(f"Conv '{name}'")
    if not np.any(fold):
        return
    auto = node.attributes.get("auto_pad")
    padded = any(ints_attr(node, "pads") or [0]) or (
        auto is not None and auto.as_string() not in ("NOTSET", "VALID")
    )
    if padded:
        raise Refused(
            f"Conv '{name}' pads its input: a non-zero constant channel is not foldable exactly"
        )
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        b = const_array(node.inputs[2])
        if b is None:
            raise Refused(f"Conv '{name}' has a non-constant bias")
        plan.params.append((node, 2, (b + fold).astype(b.dtype)))
    else:
        plan.params.append((node, 2, fold.astype(w.dtype)))

# -- execution ---------------------------------------------------------------------------
def _execute(graph: ir.Graph, plan: _Plan) -> None:
    for node, i, arr in plan.params:
        if i >= len(node.inputs):
            node.resize_inputs(i + 1)
        if node.inputs[i] is None:
            node.replace_input_with(i, new_initializer(graph, f"{node.name or node.op_type}_bias", arr))
        else:
            set_const(graph, node, i, arr)
    for v, axis, removed in plan.shapes:
        if v.shape is None:
            continue
        dims = list(v.shape)
        pos = len(dims) - 1 if axis == -1 else axis
        if pos < len(dims) and isinstance(dims[pos], int):
            dims[pos] = int(dims[pos]) - removed  # type: ignore[arg-type]
            v.shape = ir.Shape(dims)
    for node, fold in plan.add_bias_after:
        out = node.outputs[0]
        uses = list(out.uses())
        bias = new_initializer(graph, f"{node.name or 'MatMul'}_folded_bias", fold)
        add = ir.Node("", "Add", [out, bias], name=f"{node.name}_folded_bias_add",
                      num_outputs=1)  # fmt: skip
        add.outputs[0].name = f"{out.name}_biased"
        add.outputs[0].type = out.type
        add.outputs[0].shape = out.shape
        graph.insert_after(node, add)
        for n, i in uses:
            n.replace_input_with(i, add.outputs[0])
