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

Coupling is followed, never guessed (one handler per op type, a dry run plans the whole edit
before anything changes):

* **Sources** (whose output rows are removed): Gemm / MatMul / Conv / ConvTranspose (grouped
  when every group loses as many channels; a depthwise Conv loses whole groups, ``group``
  decremented, and the input channels that fed them are removed at their own producers,
  through Pad / BatchNormalization / activations, whatever their values), through per-channel ``Add``/``Sub``/``Mul``/``Div``
  by constants, BatchNormalization, element-wise ops and Reshapes that keep the units on the
  last axis (GPT-2's Conv1D: ``Reshape(x, [-1, d]) -> MatMul -> Add -> Reshape(y, [B, T, -1])``,
  targets constant or ``Concat`` of constants and ``Shape -> Gather`` dimensions; a constant
  width entry is rewritten) -- a decomposed activation
  (``x * HardSigmoid(x)``, Clip/Div/Mul HardSwish) and a sum of layers whose values nothing
  else reads (``relu(conv1(x) + conv2(y))``) included.
* **Pass-through** (the constants are carried): element-wise activations (PRelu with a
  constant slope, scalar or per channel: ``c if c >= 0 else slope[u] * c``, the slope loses
  the rows; also between the layer and the units, as MTCNN's exports have it), Identity/Dropout,
  per-channel constant arithmetic, BatchNormalization, pooling, Resize/Upsample that keep the
  channel axis, Pad that leaves the channel axis alone (a constant pad value only equal to the
  constant; pads computed at run time -- the legacy exporter's "same" padding -- are
  evaluated partially, and the channel axis' entries must come out constant 0),
  ReduceMean/Max/Min over other axes (a squeeze-and-excitation squeeze), Slice on other axes, Transpose, Reshape that keeps the channel dimension (or the
  last axis and its width: ``x.view(-1, x.size(-1))``, whose ``Shape`` read follows), depthwise
  Conv/ConvTranspose (a channel whose input is constant 0 becomes its bias), Flatten and
  flattening Reshape (channels first ``[N, C, H, W]`` or channels last ``[N, H, W, C]`` as
  tf2onnx writes it, trailing dims known: unit ``c`` is the flat positions
  ``(o * C + c) * inner + i``), Squeeze / Unsqueeze of other axes (axes as an attribute
  before opset 13, a constant input after), channel Concat.
* **Joins**: a residual ``Add``/``Sub`` is excised only where the unit is constant in *every*
  branch (the constants summed): a branch that is not itself a flow of the site is measured on
  the calibration ``batches`` and excised at its own source. A gating ``Mul`` (squeeze-and-
  excitation: ``x * gate`` with ``gate`` ``[N, C, 1, 1]``) passes a unit whose constant is 0
  (``0 * gate = 0``; the gate's source loses the same rows); a non-zero constant ``k`` is
  ``k * gate`` after it: the one unpadded, ungrouped Conv reading the product loses the
  columns and gets ``sum P[:, u] k_u gate_u`` back through ``Gather(gate, units) -> 1x1 Conv
  -> Add`` (a computation on ``N x |units|`` numbers).
* **Shared weights**: a layer whose weight another layer reads too (ALBERT's one FFN, shared
  directly or through Identity) is edited with it: the other layer's units are measured
  constant on the calibration batches and followed to their sinks, and the initializer is
  edited once, in place, staying shared; a tied weight the edit would change at one use only
  refuses the site (other shared constants, e.g. biases the exporter deduplicated, are copied
  where their uses differ).
* **Sites reached by the edit** (the depthwise site after the expand site's edit, the other
  branch of a residual sum, the other layer of a shared weight) are recorded in ``excised``
  (original numbering); their own edit then removes only what is left (a no-op when
  nothing is).
* **Sinks** (columns removed, constant folded into the bias): Gemm / MatMul / Conv (grouped when
  every group loses as many channels) / ConvTranspose (only a zero constant folds: a transposed
  convolution spreads its input unevenly over the output). A Conv that zero-pads (``pads``,
  ``auto_pad``, or an explicit constant-mode ``Pad`` before it, the legacy exporter's way; any
  pad value) sees a non-zero constant ``k`` inside and the pad value on the border (CREPE:
  ReLU -> BatchNormalization makes a dead channel ``k != 0``): the removed channels'
  contribution is a fixed map ``M[o, ...] = sum_c k_c conv(1-image, W[o, c])`` computed in
  float64 and added after the Conv as a constant ``[1, C_out, *spatial_out]`` (folded into the
  bias when no padding reaches it). It needs the input's spatial dims: static, inferred, or
  measured on one calibration batch when every graph input is static; symbolic refuses.

Weights stored in another type behind a ``Cast`` (bf16/fp16 checkpoints run in float32) are
edited in their stored type when the edited array round-trips exactly (removed rows/columns
do); otherwise (a folded bias) the new constant is a float32 initializer.

Anything else (a graph output, an If / Loop branch that returns the units -- the refusal
names the node, the branch and what reads its result --, Shape/LSTM readers, a padded Conv
fed a non-zero constant whose input dims are symbolic, a gate applied to a non-zero constant, a residual branch that
varies) refuses the site with the node and the reason; nothing is changed there.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from graphsurg._config import DiagnoseConfig
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
    if op == "Erf":  # the inside of Erf-form GELU (opset < 20 exports)
        return _erf
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
    {"Relu", "LeakyRelu", "Sigmoid", "Tanh", "Elu", "Softplus", "Gelu", "HardSigmoid", "Clip",
     "Erf"}
)
#: ops whose output can be a diagnosis site (an activation, or the Mul of a decomposed one)
_SITE_OPS = _ACT_OPS | {"Mul", "Erf", "Softsign", "HardSwish", "Mish", "Selu", "Celu", "PRelu"}
_POOLS = frozenset({"MaxPool", "GlobalAveragePool", "GlobalMaxPool", "AveragePool"})


#: element-wise binary ops whose constants pass through (numpy, operand order kept)
_BINARY: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide,
    "Pow": np.power,  # x**3 in tanh-form GELU (GPT-2, Phi, GPT-J as exported)
}
_LAYERS = frozenset({"Gemm", "MatMul", "Conv", "ConvTranspose"})


@dataclass
class _Flow:
    """Removed indices along the channel axis of ``value`` and the constants there."""

    value: ir.Value
    axis: int  # the channel position (>= 0), or -1 for the last axis when the rank is unknown
    rank: int | None
    rows: np.ndarray
    vals: np.ndarray
    #: the layer whose output units these are (a site's address is ``layer:value``)
    layer: str = ""
    #: set by a constant-mode Pad whose value differs from the constants, read by one Conv:
    #: ``(pads before, pads after, pad value, the Pad input's value)`` -- the units hold
    #: their constants on the interior only, the pad value on that border
    border: tuple[list[int], list[int], float, ir.Value] | None = None


@dataclass
class _Plan:
    """The planned edit: new constants per (node, input), attributes, value shapes."""

    edits: dict[tuple[int, int], tuple[ir.Node, int, np.ndarray]] = field(default_factory=dict)
    attrs: list[tuple[ir.Node, str, int]] = field(default_factory=list)
    shapes: dict[int, tuple[ir.Value, int, int]] = field(default_factory=dict)
    add_bias_after: list[tuple[ir.Node, np.ndarray]] = field(default_factory=list)
    sinks: list[str] = field(default_factory=list)
    joined: dict[str, list[int]] = field(default_factory=dict)
    #: Reshapes before the units whose output width is inferred (-1), not known statically:
    #: the site's observed width must be the layer's
    inferred: list[str] = field(default_factory=list)
    #: site address (``layer:value``) -> rows removed there (numbering before this edit)
    removed: dict[str, np.ndarray] = field(default_factory=dict)
    #: the layers that lose output rows, by id
    sources: dict[int, ir.Node] = field(default_factory=dict)
    source_rows: dict[int, np.ndarray] = field(default_factory=dict)
    #: gated constants added back: (Mul, gate input, kept, units, Conv, correction weight)
    gated: list[tuple[ir.Node, int, np.ndarray, np.ndarray, ir.Node, np.ndarray]] = field(
        default_factory=list)
    #: :func:`_shared_alike` of the finished plan (set by :func:`_check_shared`, read by
    #: :func:`_execute`: the edits do not change in between)
    shared: dict[int, tuple[ir.Value, list[np.ndarray], bool]] | None = None

    def record(self, layer: str, v: ir.Value, rows: np.ndarray) -> None:
        """Note that ``rows`` of ``v`` go: a diagnosis site there (an activation's output,
        ``layer:value``) must not remove them again."""
        node = v.producer()
        if node is None or node.op_type not in _SITE_OPS:
            return
        if layer and v.name:
            self.removed.setdefault(f"{layer}:{v.name}", np.asarray(rows, np.int64))

    def arr(self, node: ir.Node, i: int) -> np.ndarray | None:
        """Input ``i`` of ``node`` as planned so far (a constant), or None."""
        e = self.edits.get((id(node), i))
        if e is not None:
            return e[2]
        return const_array(node.inputs[i]) if i < len(node.inputs) else None

    def set(self, node: ir.Node, i: int, a: np.ndarray) -> None:
        self.edits[(id(node), i)] = (node, i, a)

    def shape(self, v: ir.Value, axis: int, removed: int) -> None:
        self.shapes.setdefault(id(v), (v, axis, removed))


def _pos(axis: int, rank: int | None) -> int | None:
    """The channel axis as a non-negative position (None when it cannot be known)."""
    if axis >= 0:
        return axis
    return None if rank is None else rank + axis


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


def _per_channel_edit(c: np.ndarray, axis: int, rank: int | None, width: int,
                      rows: np.ndarray, what: str) -> np.ndarray | None:  # fmt: skip
    """Delete ``rows`` from a broadcast constant aligned with the channel axis; None when the
    constant does not vary along it; refuse when it broadcasts in a way not understood.
    ``width`` <= 0: the channel width is not checked (only that the rows are in range)."""
    if c.ndim == 0 or c.size == 1:
        return None
    r = rank if rank is not None else c.ndim
    if c.ndim > r:
        raise Refused(f"{what} has more dimensions than the value it is added to")
    full = c.reshape((1,) * (r - c.ndim) + c.shape)
    pos = r - 1 if axis == -1 else axis
    others = [d for i, d in enumerate(full.shape) if i != pos]
    n = full.shape[pos]
    if any(d != 1 for d in others) or (width > 0 and n not in (1, width)) or (
            n != 1 and len(rows) and int(rows.max()) >= n):  # fmt: skip
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
        joined: other sites (address -> units) whose units went with these: the other
            branches of a residual sum, constant there too.
    """

    site: str
    producer: str
    units: list[int]
    width_before: int
    width_after: int
    sinks: list[str]
    joined: dict[str, list[int]] = field(default_factory=dict)


def _values(graph: ir.Graph) -> dict[str, ir.Value]:
    values: dict[str, ir.Value] = {}
    for node in graph:
        for o in node.outputs:
            if o.name:
                values[o.name] = o
    return values


#: per model: its values by name and whether shapes were made static, kept across the sites
#: of one apply (scanning the whole graph at every site made apply quadratic in its size)
_INDEX: weakref.WeakKeyDictionary[ir.Model, dict[str, Any]] = weakref.WeakKeyDictionary()


def _value_named(model: ir.Model, name: str) -> ir.Value | None:
    """The value ``name`` of the main graph, from an index rebuilt only when the indexed
    value is gone (its producer removed by an edit) or missing."""
    idx = _INDEX.setdefault(model, {})
    values = idx.get("values")
    v = values.get(name) if values is not None else None
    node = v.producer() if v is not None else None
    if v is None or node is None or node.graph is not model.graph or v.name != name:
        values = idx["values"] = _values(model.graph)
        v = values.get(name)
    return v


def _shapes_ready(model: ir.Model) -> None:
    """Infer shapes once per model when a Flatten/Reshape/Concat lacks static shapes (edits
    keep the shapes they change up to date)."""
    idx = _INDEX.setdefault(model, {})
    if not idx.get("shapes") and _needs_shapes(model.graph):
        _infer_shapes(model)
    idx["shapes"] = True


def _needs_shapes(graph: ir.Graph) -> bool:
    """Flatten/Reshape/Concat offsets need static shapes: is one of their inputs without?"""
    for n in graph:
        if n.op_type in ("Flatten", "Reshape", "Concat") and any(
                v is not None and _static(v) is None for v in n.inputs[:1 if n.op_type != "Concat"
                                                                          else None]):
            return True
    return False


def excise_site(model: ir.Model, problem: Problem,
                excised: dict[str, set[int]] | None = None, *,
                batches: Sequence[Mapping[str, np.ndarray]] | None = None) -> Excision:
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
        batches: calibration feed dicts; with them a residual ``Add`` whose other branch is
            constant on the units is excised in both branches (measured on the batches),
            without them it is refused.

    Raises:
        Refused: with the reason (coupling not understood, no constant unit, ...).
    """
    site = problem.site.address
    left = units_left(problem, excised)
    if isinstance(left, Excision):
        return left
    units, consts, all_units, gone, seen_w = left
    graph = model.graph
    _shapes_ready(model)
    v = _value_named(model, problem.site.node)
    if v is None:
        raise Refused(f"value '{problem.site.node}' is not in the model")
    plan, axis, rank, width, producer = _plan(model, v, units,
                                               np.asarray(consts, np.float64), batches)
    if seen_w is None and plan.inferred:
        raise Refused(f"the width after Reshape '{plan.inferred[0]}' is not known statically "
                      f"and the evidence at {site} does not say it ('width')")
    check_measured(problem, seen_w, width, axis, rank, producer)
    _execute(graph, plan)
    if excised is not None:
        done = {k: {int(r) for r in v} for k, v in plan.joined.items()}
        for addr, removed in plan.removed.items():
            done.setdefault(addr, set()).update(int(r) for r in removed)
        record_excised(excised, site, done, all_units)
    kept_units = sorted(units) if gone else all_units
    return Excision(site, producer, kept_units, width, width - len(units),
                    list(plan.sinks), dict(plan.joined))


def units_left(problem: Problem, excised: dict[str, set[int]] | None
               ) -> Excision | tuple[list[int], list[Any], list[int], list[int], int | None]:
    """The evidence's constant units at ``problem``'s site and their values, renumbered
    past the units another site's edit already removed there (``excised``), as
    ``(units, values, all units, gone, width seen now)``; a no-op :class:`Excision` when
    none is left.

    Raises:
        Refused: not DeadNeurons, no constant unit, or values that do not match them.
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
    gone = sorted(excised.get(site, set())) if excised is not None else []
    all_units = sorted(units)
    seen_w = problem.evidence.get("width")
    if gone:  # removed with another site (a depthwise conv's groups, a residual branch...)
        left = [(u, c) for u, c in zip(units, consts, strict=True) if u not in set(gone)]
        w = int(seen_w) - len(gone) if seen_w is not None else None
        if not left:  # nothing to do here; kept as a no-op, so that when the edit that
            # removed them is rolled back, this site's own edit is made on the rebuilt model
            return Excision(site, problem.site.module, [], -1 if w is None else w,
                            -1 if w is None else w,
                            [f"none: units {all_units[:8]} were already removed with another "
                             "site's edit (depthwise groups, a residual branch, a shared "
                             "weight)"])
        return [_renumber(u, gone) for u, _ in left], [c for _, c in left], all_units, gone, w
    return units, list(consts), all_units, gone, None if seen_w is None else int(seen_w)


def check_measured(problem: Problem, seen_w: int | None, width: int, axis: int,
                   rank: int | None, producer: str) -> None:
    """Refuse when the evidence measured another width (``seen_w``, after the units already
    removed) or another unit axis (``channel_dim``) than the producer has."""
    v = problem.site.node
    if seen_w is not None and int(seen_w) != width:
        raise Refused(f"the evidence measured {seen_w} units at '{v}' but its producer "
                      f"{producer} has {width}")
    dim = problem.evidence.get("channel_dim")
    if dim is not None and rank is not None and int(dim) % rank != _pos(axis, rank):
        raise Refused(f"the evidence measured units along axis {dim} of '{v}' but its "
                      f"producer's units are along axis {axis}")


def record_excised(excised: dict[str, set[int]], site: str, done: dict[str, set[int]],
                   all_units: list[int]) -> None:
    """Note in ``excised`` the units of ``site`` and of every other site the edit reached
    (``done``: address -> rows numbered as before this edit), in their original numbering."""
    done.pop(site, None)
    before = {k: sorted(excised.get(k, set())) for k in done}
    for addr, reached in done.items():
        excised.setdefault(addr, set()).update(_original(r, before[addr]) for r in reached)
    excised.setdefault(site, set()).update(all_units)


def _renumber(u: int, gone: Sequence[int]) -> int:
    """Unit ``u`` (original numbering) after the units ``gone`` were removed."""
    return u - sum(1 for g in gone if g < u)


def _original(r: int, gone: Sequence[int]) -> int:
    """Index ``r`` after the units ``gone`` (sorted, original numbering) were removed, in the
    original numbering."""
    for g in gone:
        if g <= r:
            r += 1
    return r


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
def _plan(model: ir.Model, a: ir.Value, units: list[int], consts: np.ndarray,
          batches: Sequence[Mapping[str, np.ndarray]] | None
          ) -> tuple[_Plan, int, int | None, int, str]:
    """The whole edit for the units of the site value ``a`` (a dry run) and
    ``(axis, rank, width, producer name)`` of its source."""
    plan = _Plan()
    if a.producer() is None:
        raise Refused(f"'{a.name}' is a graph input: no layer produces its units")
    rows = np.asarray(sorted(units), dtype=np.int64)
    vals = consts[np.argsort(np.asarray(units))]
    axis, rank, width, producer = _plan_source(a, rows, plan)
    if len(rows) >= width:
        raise Refused(
            f"all {width} units are constant: removing the whole layer is a module-scale "
            "edit, not done by this pass"
        )
    fw = _Forward(model, plan, batches)
    first = producer.split(", ")[0]
    plan.record(first, a, rows)
    fw.run(_Flow(a, axis, rank, rows, vals, first))
    _plan_shared(model, plan, fw, batches)
    plan.joined = fw.joined
    return plan, axis, rank, width, producer


def _plan_source(a: ir.Value, rows: np.ndarray, plan: _Plan
                 ) -> tuple[int, int | None, int, str]:
    """Remove output ``rows`` at every layer that produces ``a``: walk back through
    element-wise ops, per-channel constant arithmetic and BatchNormalization to Gemm / MatMul /
    Conv / ConvTranspose layers; every value on the way must be read only on the way."""
    layers: dict[int, ir.Node] = {}
    region: dict[int, ir.Node] = {}
    reshapes: list[ir.Node] = []
    walked: dict[int, ir.Value] = {}
    stack = [a]
    while stack:
        v = stack.pop()
        if id(v) in walked:
            continue
        walked[id(v)] = v
        node = v.producer()
        if node is None:
            raise Refused(f"value '{v.name}' is a graph input: no layer produces its units")
        op = node.op_type
        if node.domain not in _ONNX:
            raise Refused(f"the units are produced by custom op '{node.name}' "
                          f"({node.domain}::{op})")
        if op in _LAYERS:
            layers[id(node)] = node
            continue
        if op == "Reshape":  # Conv1D as exported: Reshape(x, [-1, d]) @ W + b -> Reshape
            region[id(node)] = node
            reshapes.append(node)
            stack.append(_input(node, 0))
            continue
        if op == "Pad":  # checked to leave the channel axis alone below
            region[id(node)] = node
            stack.append(_input(node, 0))
            continue
        if op == "PRelu" and len(node.inputs) == 2 and const_array(node.inputs[1]) is not None:
            region[id(node)] = node  # the per-channel slope loses the rows below
            stack.append(_input(node, 0))
            continue
        if op == "BatchNormalization" or (op in (_ACT_OPS | {"Identity", "Dropout"})
                                          and _unary(node) is not None):
            region[id(node)] = node
            stack.append(_input(node, 0))
            continue
        if op in _BINARY and len(node.inputs) == 2:
            cs = [const_array(x) for x in node.inputs]
            if cs[0] is not None and cs[1] is not None:
                raise Refused(f"{op} '{node.name}' before the units combines two constants")
            region[id(node)] = node
            stack.extend(_input(node, i) for i in (0, 1) if cs[i] is None)
            continue
        raise Refused(
            f"the units are produced by '{node.name}' (op {op}); only Gemm/MatMul/Conv/"
            "ConvTranspose (+ bias Add, BatchNormalization, element-wise ops, Reshape keeping "
            "the last axis) producers are understood"
        )
    for v in walked.values():
        if v is a:
            continue
        others = [n for n, _ in v.uses() if id(n) not in region]
        if v.is_graph_output() or others:
            users = ", ".join(sorted({n.name or n.op_type for n in others}))
            raise Refused(
                f"value '{v.name}' between the layer and the activation is also read by "
                f"{users or 'the graph outputs'}: its units are coupled to another consumer"
            )
    found = [_source_layer(n, rows, plan) for n in layers.values()]
    axis, rank, width = found[0]
    if any((_pos(x, r), w) != (_pos(axis, rank), width) for x, r, w in found):
        raise Refused("the layers summed into the units have different widths or unit axes: "
                      + ", ".join(f"'{n.name}'" for n in layers.values()))
    if reshapes:  # the unit axis is the last one of every value, whatever its rank
        if not _is_last(axis, rank):
            raise Refused(f"Reshape '{reshapes[0].name}' between the layer and the units: "
                          "only a layer whose units are on the last axis is understood there")
        for node in reshapes:
            _source_reshape(node, width, rows, walked, plan)
        axis, rank = -1, None
    for node in region.values():
        if node.op_type != "Reshape":
            _source_region_node(node, axis, rank, width, rows, plan)
    for v in walked.values():
        d = _dim(v, axis, rank)
        if d == 1 and width > 1:
            raise Refused(f"value '{v.name}' broadcasts over the unit axis")
        plan.shape(v, axis, len(rows))
    if reshapes:
        rank = _rank(a)
        axis = -1 if rank is None else rank - 1
    for n in layers.values():
        plan.sources[id(n)] = n
        plan.source_rows[id(n)] = rows
        if len(layers) == 1:
            for v in walked.values():
                plan.record(n.name or "", v, rows)
    return axis, rank, width, ", ".join(n.name or n.op_type for n in layers.values())


#: one entry of a Reshape's target shape: ("const", value, (node, input, index)) -- editable
#: through the plan --, or ("dim", value, axis): a dimension read by Shape -> Gather
_Entry = tuple[str, Any, Any]


def _shape_entries(node: ir.Node, plan: _Plan) -> list[_Entry] | None:
    """The entries of Reshape ``node``'s target: a constant, or a Concat (read only by this
    Reshape) of constants and ``Unsqueeze(Gather(Shape(v), i))`` (as the legacy exporter
    writes ``x.view(B, T, -1)``); None when not understood."""
    t = plan.arr(node, 1) if len(node.inputs) > 1 else None
    if t is not None:
        return [("const", int(x), (node, 1, j)) for j, x in enumerate(t.reshape(-1))]
    tv = node.inputs[1] if len(node.inputs) > 1 else None
    cat = tv.producer() if tv is not None else None
    if (tv is None or cat is None or cat.op_type != "Concat" or cat.domain not in _ONNX
            or len(tv.uses()) != 1 or tv.is_graph_output()):  # fmt: skip
        return None
    out: list[_Entry] = []
    for i, x in enumerate(cat.inputs):
        c = plan.arr(cat, i)
        if c is not None:
            out.extend(("const", int(e), (cat, i, j)) for j, e in enumerate(c.reshape(-1)))
            continue
        d = _shape_dim(x)
        if d is None:
            return None
        out.append(("dim", d[0], d[1]))
    return out


def _shape_dim(x: ir.Value | None) -> tuple[ir.Value, int] | None:
    """``(v, i)`` when ``x`` is ``Unsqueeze(Gather(Shape(v), i))`` of a scalar index."""
    un = x.producer() if x is not None else None
    if un is None or un.op_type != "Unsqueeze" or not un.inputs:
        return None
    ga = un.inputs[0].producer() if un.inputs[0] is not None else None
    if ga is None or ga.op_type != "Gather" or len(ga.inputs) < 2:
        return None
    idx = const_array(ga.inputs[1])
    sh = ga.inputs[0].producer() if ga.inputs[0] is not None else None
    if (idx is None or idx.size != 1 or idx.ndim > 1 or sh is None or sh.op_type != "Shape"
            or sh.attributes.get("start") is not None or sh.attributes.get("end") is not None
            or sh.inputs[0] is None):  # fmt: skip
        return None
    v = sh.inputs[0]
    i = int(idx.reshape(-1)[0])
    r = _rank(v)
    if i < 0:
        if r is None:
            return None
        i += r
    return v, i


def _reshape_last(node: ir.Node, src: ir.Value, width: int | None, rows: np.ndarray,
                  moving: Callable[[ir.Value, int], bool], plan: _Plan,
                  out_width: int | None) -> int | None:
    """Plan a Reshape whose input and output both hold the units on their LAST axis, the
    last dimension kept (``[..., W] -> [..., W]``); returns the output rank, or None when the
    Reshape is not of that kind. ``moving(v, i)``: does dimension ``i`` of ``v`` lose the
    units (it is the unit axis of a value on the flow)?"""
    entries = _shape_entries(node, plan)
    r_in = _rank(src)
    if entries is None or r_in is None or not entries:
        return None
    allow_zero = int_attr(node, "allowzero", 0)
    n = len(entries)
    for j, (kind, val, _) in enumerate(entries[:-1]):  # the leading dims must not move
        if kind == "dim" and moving(val, int(_)):
            return None
        if kind == "const" and val == 0 and not allow_zero and j >= r_in - 1:
            return None
    kind, val, where = entries[-1]
    if kind == "dim":
        if not moving(val, where):
            return None  # the last dimension is read from a value that keeps its width
        return n
    if val == 0 and not allow_zero:
        return n if n - 1 == r_in - 1 else None  # copies the input's last (unit) axis
    if val == -1:
        # inferred from the total: the last dim is the width iff it was (then it follows)
        if out_width is None or width is None or out_width != width:
            return None
        return n
    if width is None or val != width:
        return None
    at, i, j = where
    new = plan.arr(at, i)
    assert new is not None
    new = new.copy()
    new.reshape(-1)[j] = width - len(rows)
    plan.set(at, i, new)
    return n


def _last_static(v: ir.Value) -> int | None:
    if v.shape is None or not len(v.shape):
        return None
    d = v.shape[len(v.shape) - 1]
    return d if isinstance(d, int) else None


def _source_reshape(node: ir.Node, width: int, rows: np.ndarray,
                    walked: dict[int, ir.Value], plan: _Plan) -> None:
    """A Reshape between the layer and the units keeps the last (unit) axis, or refuse."""
    src, out = _input(node, 0), node.outputs[0]
    if _last_static(src) not in (None, width):
        raise Refused(f"Reshape '{node.name}' before the units reads a value whose last axis "
                      "is not the layer's units")
    out_w = _last_static(out)
    if out_w is None:  # the site's observed width is checked against the layer's after
        out_w = width
        plan.inferred.append(node.name or "Reshape")
    def moving(v: ir.Value, i: int) -> bool:
        return id(v) in walked and (_rank(v) is None or i == len(v.shape) - 1)  # type: ignore[arg-type]
    if _reshape_last(node, src, width, rows, moving, plan, out_w) is None:
        raise Refused(f"Reshape '{node.name}' between the layer and the units does not keep "
                      "the units on the last axis (target shape not understood)")


def _input(node: ir.Node, i: int) -> ir.Value:
    v = node.inputs[i] if i < len(node.inputs) else None
    if v is None:
        raise Refused(f"'{node.name}' ({node.op_type}) has no input {i}")
    return v


def _dim(v: ir.Value, axis: int, rank: int | None) -> int | None:
    if v.shape is None:
        return None
    p = _pos(axis, len(v.shape) if rank is None else rank)
    if p is None or p >= len(v.shape):
        return None
    d = v.shape[p]
    return d if isinstance(d, int) else None


def _source_region_node(node: ir.Node, axis: int, rank: int | None, width: int,
                        rows: np.ndarray, plan: _Plan) -> None:
    if node.op_type == "Pad":
        _pad_channel_free(node, plan, axis, rank)
        mode = node.attributes.get("mode")
        if mode is not None and mode.as_string() not in ("constant", "reflect", "edge", "wrap"):
            raise Refused(f"Pad '{node.name}' has mode {mode.as_string()!r}")
    elif node.op_type == "BatchNormalization":
        if not _is_first(axis, rank):
            raise Refused(f"BatchNormalization '{node.name}' normalises another axis")
        for i in range(1, 5):
            arr = plan.arr(node, i)
            if arr is None:
                raise Refused(f"BatchNormalization '{node.name}' has non-constant parameters")
            plan.set(node, i, np.delete(arr, rows, axis=0))
    elif node.op_type == "PRelu":
        slope = plan.arr(node, 1)
        assert slope is not None
        e = _per_channel_edit(slope, axis, rank, width, rows, f"slope of PRelu '{node.name}'")
        if e is not None:
            plan.set(node, 1, e)
    elif node.op_type in _BINARY:
        for i in (0, 1):
            c = plan.arr(node, i)
            if c is None:
                continue
            e = _per_channel_edit(c, axis, rank, width, rows,
                                  f"constant of {node.op_type} '{node.name}'")
            if e is not None:
                plan.set(node, i, e)


def _groups_even(rows: np.ndarray, per: int, groups: int, what: str) -> np.ndarray:
    """Which group each row is in; refuse unless every group loses as many rows (fewer than
    it has)."""
    g = rows // per
    counts = np.bincount(g, minlength=groups)
    if len(set(counts.tolist())) != 1 or counts[0] >= per:
        raise Refused(f"{what} is grouped (group={groups}): removing units "
                      f"{rows.tolist()} leaves the groups uneven or empty")
    return g


def _source_layer(layer: ir.Node, rows: np.ndarray, plan: _Plan
                  ) -> tuple[int, int | None, int]:
    """Plan removing output ``rows`` of one layer; ``(axis, rank, width)``."""
    op, name = layer.op_type, layer.name
    w = plan.arr(layer, 1) if len(layer.inputs) > 1 else None
    if w is None or const_array(layer.inputs[0]) is not None:
        raise Refused(f"'{name}' ({op}) has no constant weight")
    rank: int | None
    if op == "Gemm":
        if int_attr(layer, "transA", 0):
            raise Refused(f"Gemm '{name}' has transA=1")
        trans_b = int_attr(layer, "transB", 0)
        width = w.shape[0] if trans_b else w.shape[1]
        _check_rows(rows, width)
        plan.set(layer, 1, np.delete(w, rows, axis=0 if trans_b else 1))
        has_c = len(layer.inputs) > 2 and layer.inputs[2] is not None
        c = plan.arr(layer, 2) if has_c else None
        if has_c and c is None:
            raise Refused(f"Gemm '{name}' has a non-constant C input")
        if c is not None:
            e = _per_channel_edit(c, 1, 2, width, rows, f"Gemm '{name}' bias")
            if e is not None:
                plan.set(layer, 2, e)
        axis, rank = 1, 2
    elif op == "MatMul":
        if w.ndim != 2:
            raise Refused(f"MatMul '{name}' weight is not a 2-D constant right operand")
        width = w.shape[1]
        _check_rows(rows, width)
        plan.set(layer, 1, np.delete(w, rows, axis=1))
        rank = _rank(layer.outputs[0])
        axis = -1 if rank is None else rank - 1
    else:  # Conv: (C_out, C_in/g, k...); ConvTranspose: (C_in, C_out/g, k...)
        g = int_attr(layer, "group", 1)
        if op == "Conv":
            width = w.shape[0]
            _check_rows(rows, width)
            m = width // g
            if g > 1 and w.shape[1] == 1 and len(np.unique(rows // m)) * m == len(rows):
                _source_depthwise(layer, rows, m, g, plan)
            elif g > 1 and w.shape[1] == 1:  # part of every group: the groups stay
                try:
                    _groups_even(rows, m, g, f"Conv '{name}'")
                except Refused:
                    raise Refused(f"depthwise Conv '{name}' would lose part of a group (units "
                                  f"{rows.tolist()[:8]}, {m} per group) and the groups "
                                  "would be uneven: its input channels stay read") from None
            elif g > 1:
                _groups_even(rows, width // g, g, f"Conv '{name}'")
            plan.set(layer, 1, np.delete(w, rows, axis=0))
        else:
            per = w.shape[1]
            width = per * g
            _check_rows(rows, width)
            if g == 1:
                plan.set(layer, 1, np.delete(w, rows, axis=1))
            else:
                grp = _groups_even(rows, per, g, f"ConvTranspose '{name}'")
                wg = w.reshape(g, w.shape[0] // g, *w.shape[1:])
                parts = [np.delete(wg[i], rows[grp == i] - i * per, axis=1) for i in range(g)]
                plan.set(layer, 1, np.concatenate(parts, axis=0))
        if len(layer.inputs) > 2 and layer.inputs[2] is not None:
            b = plan.arr(layer, 2)
            if b is None:
                raise Refused(f"{op} '{name}' has a non-constant bias")
            plan.set(layer, 2, np.delete(b, rows, axis=0))
        axis, rank = 1, w.ndim
    plan.shape(layer.outputs[0], axis, len(rows))
    return axis, rank, width


def _source_depthwise(layer: ir.Node, rows: np.ndarray, m: int, g: int, plan: _Plan) -> None:
    """A depthwise Conv (one input channel per group, ``m`` outputs each) losing output
    ``rows``: they must be whole groups; the groups go (``group`` decremented) and with them
    their input channels, which nothing else reads: those are removed at the layers that
    produce them (through Pad, BatchNormalization, activations), whatever their values."""
    name = layer.name
    groups = np.unique(rows // m)
    if len(groups) >= g:
        raise Refused(f"depthwise Conv '{name}' would lose all its {g} groups")
    x = _input(layer, 0)
    if x.is_graph_output() or len(x.uses()) != 1:
        raise Refused(f"the input '{x.name}' of depthwise Conv '{name}' is also read elsewhere: "
                      "its channels cannot be removed with the groups")
    _plan_source(x, groups, plan)
    plan.attrs.append((layer, "group", g - len(groups)))


def _root(v: ir.Value | None) -> ir.Value | None:
    """The initializer behind ``v`` (itself, or through Identity nodes: the legacy exporter
    shares weights that way), or None."""
    for _ in range(8):
        if v is None:
            return None
        if v.is_initializer():
            return v
        node = v.producer()
        if node is None or node.op_type != "Identity" or node.domain not in _ONNX:
            return None
        v = node.inputs[0] if node.inputs else None
    return None


def _readers(root: ir.Value) -> list[tuple[ir.Node, int]]:
    """Every ``(node, input)`` reading initializer ``root``, through Identity nodes."""
    out: list[tuple[ir.Node, int]] = []
    stack = [root]
    while stack:
        v = stack.pop()
        for n, i in v.uses():
            if n.op_type == "Identity" and n.domain in _ONNX and not n.outputs[0].is_graph_output():
                stack.append(n.outputs[0])
            else:
                out.append((n, i))
    return out


def _plan_shared(model: ir.Model, plan: _Plan, fw: _Forward,
                 batches: Sequence[Mapping[str, np.ndarray]] | None) -> None:
    """A source layer whose weight is shared with other layers (ALBERT's one FFN used by
    every layer): the other layers lose the same rows in the same edit -- their units are
    measured constant on the calibration ``batches`` and followed to their sinks -- so that
    the shared initializer is edited once and stays shared. Then every edited shared
    initializer must be edited alike at every use, or the site is refused."""
    done: set[int] = set()
    while True:
        todo: list[ir.Node] = []
        for layer in list(plan.sources.values()):
            root = _root(layer.inputs[1]) if len(layer.inputs) > 1 else None
            if root is None or id(root) in done:
                continue
            done.add(id(root))
            todo.extend(n for n, i in _readers(root)
                        if i == 1 and n.op_type in _LAYERS and id(n) not in plan.sources)
        if not todo:
            break
        for sib in todo:
            if id(sib) in plan.sources:
                continue
            first = next(iter(plan.sources.values()))
            rows = plan.source_rows[id(first)]
            axis, rank, _ = _source_layer(sib, rows, plan)
            plan.sources[id(sib)] = sib
            plan.source_rows[id(sib)] = rows
            out = sib.outputs[0]
            vals = fw.measure(sib, out, _Flow(out, axis, rank, rows, np.zeros(len(rows))),
                              what=f"layer '{sib.name}' sharing the weight of '{first.name}'")
            plan.record(sib.name or "", out, rows)
            fw.run(_Flow(out, axis, rank, rows, vals, sib.name or ""))
    _check_shared(plan)


def _shared_alike(plan: _Plan) -> dict[int, tuple[ir.Value, list[np.ndarray], bool]]:
    """Initializers with several readers that the plan edits: root id -> (root, planned
    arrays, whether every reader gets the same edit)."""
    by_root: dict[int, tuple[ir.Value, list[np.ndarray], bool]] = {}
    for node, i, arr in plan.edits.values():
        root = _root(node.inputs[i]) if i < len(node.inputs) else None
        if root is None:
            continue
        by_root.setdefault(id(root), (root, [], False))[1].append(arr)
    out = {}
    for k, (root, arrs, _) in by_root.items():
        readers = _readers(root)
        if len(readers) < 2 or root.is_graph_input() or root.is_graph_output():
            continue
        alike = all((id(n), i) in plan.edits for n, i in readers) and all(
            a.shape == arrs[0].shape and np.array_equal(a, arrs[0]) for a in arrs[1:])
        out[k] = (root, arrs, alike)
    return out


def _check_shared(plan: _Plan) -> None:
    """A layer weight read by several layers (tied, not merely equal constants the exporter
    deduplicated) must get the same edit at every use: copying it would grow the model.
    Other shared constants (biases, per-channel scales) are copied where their uses differ."""
    plan.shared = _shared_alike(plan)
    for root, arrs, alike in plan.shared.values():
        readers = _readers(root)
        if alike or not any(i == 1 and n.op_type in _LAYERS for n, i in readers):
            continue
        covered = [(n, i) for n, i in readers if (id(n), i) in plan.edits]
        if len(covered) < len(readers):
            left = [n.name or n.op_type for n, i in readers if (id(n), i) not in plan.edits]
            raise Refused(f"initializer '{root.name}' is shared with {', '.join(left[:3])}, "
                          "which this edit does not change alike: excising it would copy it")
        if any(a.shape != arrs[0].shape or not np.array_equal(a, arrs[0]) for a in arrs[1:]):
            raise Refused(f"initializer '{root.name}' is shared and its uses would need "
                          "different edits (different units or constants): excising would "
                          "copy it")


def _check_rows(rows: np.ndarray, width: int) -> None:
    if len(rows) and int(rows.max()) >= width:
        raise Refused(f"unit {int(rows.max())} is out of range for width {width}")


class _Forward:
    """Follow the removed units from the site to every sink (a dry run into ``plan``).

    Nodes with two non-constant inputs (residual ``Add``, gating ``Mul``) wait until every
    flow that reaches them has arrived; they are resolved in graph order."""

    def __init__(self, model: ir.Model, plan: _Plan,
                 batches: Sequence[Mapping[str, np.ndarray]] | None) -> None:
        self.model, self.plan, self.batches = model, plan, batches
        self._order: dict[int, int] | None = None  # graph order, built when a join waits
        self.seen: set[int] = set()
        self.pending: dict[int, tuple[ir.Node, dict[int, _Flow]]] = {}
        #: other sites whose units are removed with the site's (residual branches)
        self.joined: dict[str, list[int]] = {}

    def run(self, f: _Flow) -> None:
        self.flow(f)
        while self.pending:
            if self._order is None:
                self._order = {id(n): i for i, n in enumerate(self.model.graph)}
            order = self._order
            key = min(self.pending, key=lambda k: order.get(k, -1))
            node, arrived = self.pending.pop(key)
            self.seen.add(key)
            self.join(node, arrived)

    def flow(self, f: _Flow) -> None:
        v = f.value
        if v.is_graph_output():
            owner = _subgraph_owner(self.model, v.graph)
            if owner is not None:
                raise Refused(_leaves_subgraph(self.model, owner, v))
            raise Refused(f"value '{v.name}' is a graph output: its units are visible to the "
                          "caller")
        for node, idx in list(v.uses()):
            if (node.op_type in _BINARY and node.domain in _ONNX and len(node.inputs) == 2
                    and const_array(node.inputs[1 - idx]) is None):  # fmt: skip
                node_, arrived = self.pending.setdefault(id(node), (node, {}))
                if id(node) in self.seen or idx in arrived:
                    raise Refused(f"'{node.name}' is reached twice: coupling not understood")
                arrived[idx] = f
                continue
            if id(node) in self.seen:
                raise Refused(f"'{node.name}' is reached twice: coupling not understood")
            self.seen.add(id(node))
            self.use(f, node, idx)

    def carry(self, f: _Flow, out: ir.Value, *, axis: int | None = None,
              rank: int | None = None, rows: np.ndarray | None = None,
              vals: np.ndarray | None = None,
              border: tuple[list[int], list[int], float, ir.Value] | None = None) -> None:
        """Continue the flow at ``out`` (same units unless given)."""
        f2 = _Flow(out, f.axis if axis is None else axis, f.rank if rank is None else rank,
                   f.rows if rows is None else rows, f.vals if vals is None else vals,
                   f.layer, border)
        self.plan.shape(out, f2.axis, len(f2.rows))
        self.plan.record(f2.layer, out, f2.rows)
        self.flow(f2)

    # -- joins -------------------------------------------------------------------------
    def join(self, node: ir.Node, arrived: dict[int, _Flow]) -> None:
        op, name = node.op_type, node.name
        if len(arrived) == 2:
            f0, f1 = arrived[0], arrived[1]
            if not np.array_equal(f0.rows, f1.rows) or (
                    _pos(f0.axis, f0.rank) != _pos(f1.axis, f1.rank)):  # fmt: skip
                raise Refused(f"{op} '{name}' joins different units of its two inputs")
            self.carry(f0, node.outputs[0], vals=_BINARY[op](f0.vals, f1.vals))
            return
        ((idx, f),) = arrived.items()
        other = _input(node, 1 - idx)
        if op == "Mul":
            self.gate(node, other, f)
            return
        if op in ("Add", "Sub"):
            vals = self.measure(node, other, f)
            producer = _plan_source(other, f.rows, self.plan)[3]
            self.joined[f"{producer}:{other.name}"] = f.rows.tolist()
            # wait for the other branch's flow to reach this node, then join the two
            self.pending[id(node)] = (node, {idx: f})
            self.seen.discard(id(node))
            self.flow(_Flow(other, f.axis, f.rank, f.rows, vals, producer.split(", ")[0]))
            return
        raise Refused(f"{op} '{name}' divides the units by another branch ('{other.name}'): "
                      "coupling through it is not understood")

    def gate(self, node: ir.Node, gate: ir.Value, f: _Flow) -> None:
        """``x * gate``: 0 * gate = 0 passes; the gate's source loses the same rows. A
        non-zero constant ``k`` is not constant after the gate (``k * gate`` varies): see
        :meth:`gated_sink`."""
        if np.any(f.vals != 0):
            self.gated_sink(node, gate, f)
            return
        d = _dim(gate, f.axis, f.rank)
        if d != 1:
            if gate.is_graph_output() or len(gate.uses()) != 1:
                raise Refused(f"gate '{gate.name}' of Mul '{node.name}' is also read elsewhere: "
                              "its channels cannot be removed")
            _plan_source(gate, f.rows, self.plan)
        self.carry(f, node.outputs[0], vals=np.zeros_like(f.vals))

    def gated_sink(self, node: ir.Node, gate: ir.Value, f: _Flow) -> None:
        """Squeeze-and-excitation ``x * gate`` with ``gate`` of shape ``[N, C, 1, 1]`` and
        units of ``x`` constant at ``k != 0``, read by one ungrouped Conv ``P`` that does not
        pad: ``P`` loses the columns, and what they contributed, ``sum_s P[:, u, s] k_u
        gate_u`` (the same at every position), is added back to ``P``'s output from the
        gate's units alone: ``Gather(gate, units) -> Conv 1x1 (weights P[:, u].sum * k_u)``,
        a computation on ``N x |units|`` numbers; the Mul reads ``Gather(gate, kept)``."""
        name = node.name
        why = (f"Mul '{name}' gates the units by '{gate.name}', which is not constant: a unit "
               "constant at a non-zero value is not constant after the gate")
        if gate.shape is None:
            _infer_shapes(self.model)
        shape = gate.shape
        p = _pos(f.axis, f.rank)
        if shape is None or p != 1 or len(shape) < 3 or any(d != 1 for d in list(shape)[2:]):
            raise Refused(why + " (and the gate is not a per-channel [N, C, 1, 1] value)")
        width = shape[1]
        out = node.outputs[0]
        use = _only_use(out)
        conv = use[0] if use is not None else None
        if use is None or conv is None or conv.op_type != "Conv" or use[1] != 0 or int_attr(
                conv, "group", 1) != 1 or _padded(conv) or conv.domain not in _ONNX:  # fmt: skip
            raise Refused(why + " (and the gated value is not read by one ungrouped Conv "
                          "without padding, where the gated constants could be added back)")
        w = self.plan.arr(conv, 1)
        if w is None or not isinstance(width, int) or w.shape[1] != width:
            raise Refused(why + f" (Conv '{conv.name}' has no constant weight of width "
                          f"{width})")
        wsum = w.astype(np.float64).sum(axis=tuple(range(2, w.ndim)))[:, f.rows]
        corr = (wsum * f.vals[None, :]).reshape(w.shape[0], len(f.rows), *([1] * (w.ndim - 2)))
        keep = np.setdiff1d(np.arange(width), f.rows)
        self.plan.set(conv, 1, np.delete(w, f.rows, axis=1))
        self.plan.shape(out, 1, len(f.rows))
        self.plan.gated.append((node, 1 if node.inputs[1] is gate else 0, keep, f.rows,
                                conv, corr.astype(w.dtype)))
        self.plan.sinks.append(f"Conv '{conv.name}' (+ the gated constants from "
                               f"'{gate.name}')")

    def measure(self, node: ir.Node, other: ir.Value, f: _Flow, what: str | None = None
                ) -> np.ndarray:
        """The constants of ``other`` at the flow's units on the calibration batches, or
        refuse: a residual sum is excised only where every branch is constant."""
        kind = "residual Add" if node.op_type == "Add" else f"{node.op_type}"
        why = (f"{kind} '{node.name}' couples the units with another branch ('{other.name}') "
               "that is not constant on them") if what is None else (
               f"{what} is not constant on the units ('{other.name}')")
        if not self.batches:
            raise Refused(why + " (no calibration batches to measure it on)")
        if not other.name:
            raise Refused(why + " (the branch has no name to observe)")
        values = _observe(self.model, other.name, self.batches)
        pos = _pos(f.axis, values[0].ndim)
        assert pos is not None
        cols = [np.moveaxis(x.astype(np.float64), pos, -1).reshape(-1, x.shape[pos])
                for x in values]
        allv = np.concatenate(cols)[:, f.rows]
        mean, var = allv.mean(0), allv.var(0)
        tol = DiagnoseConfig().dead_var
        varying = f.rows[var > tol * (1.0 + mean * mean)]
        if len(varying):
            raise Refused(why + f" (units {varying.tolist()[:8]} vary on the data)")
        return mean

    # -- one consumer --------------------------------------------------------------------
    def use(self, f: _Flow, node: ir.Node, idx: int) -> None:
        op, name = node.op_type, node.name
        if node.domain not in _ONNX:
            raise Refused(f"consumer '{name}' is a custom op ({node.domain}::{op})")
        handler = _HANDLERS.get(op)
        if handler is not None and (idx == 0 or op in ("Concat", *_BINARY)):
            handler(self, f, node, idx)
            return
        raise Refused(
            f"units flow into '{name}' (op {op}, input {idx}): coupling through {op} is not "
            "understood"
        )


def _subgraph_owner(model: ir.Model, graph: ir.Graph | None
                    ) -> tuple[ir.Node, str] | None:
    """The node (If, Loop, Scan) and attribute that own ``graph``, when it is a subgraph."""
    if graph is None or graph is model.graph:
        return None
    for node in model.graph.all_nodes():
        for name, attr in node.attributes.items():
            if attr.type == ir.AttributeType.GRAPH and attr.value is graph:
                return node, name
            if attr.type == ir.AttributeType.GRAPHS and any(g is graph for g in attr.value):
                return node, name
    return None


def _leaves_subgraph(model: ir.Model, owner: tuple[ir.Node, str], v: ir.Value) -> str:
    """The refusal for units that leave a subgraph as an output of its If / Loop: name the
    node, the branch and what reads the result."""
    node, branch = owner
    where = f"{node.op_type} '{node.name}' returns the units from its {branch} ('{v.name}')"
    graph = v.graph
    i = next((k for k, o in enumerate(graph.outputs) if o is v), None) if graph else None
    out = node.outputs[i] if i is not None and i < len(node.outputs) else None
    if out is not None:
        readers = sorted({f"{u.op_type} '{u.name}'" for u, _ in out.uses()})
        if readers:
            where += f", read by {', '.join(readers[:4])}"
        inside = sorted({f"{o[0].op_type} '{o[0].name}'" for u, _ in out.uses()
                         if (o := _subgraph_owner(model, u.graph)) is not None})
        if inside:
            where += f" inside {', '.join(inside[:4])}"
    return where + f": coupling through {node.op_type} is not understood"


def _observe(model: ir.Model, name: str, batches: Sequence[Mapping[str, np.ndarray]]
             ) -> list[np.ndarray]:
    """The values of ``name`` on ``batches`` (a private copy of the model runs them)."""
    from ._common import ort_session

    copy = model.clone()
    v = _values(copy.graph).get(name)
    if v is None:
        raise Refused(f"value '{name}' is not in the model")
    if not v.is_graph_output():
        copy.graph.outputs.append(v)
    sess = ort_session(copy)
    inputs = {i.name for i in sess.get_inputs()}
    return [np.asarray(sess.run([name], {k: b[k] for k in b if k in inputs})[0])
            for b in batches]


def _use_unary(fw: _Forward, f: _Flow, node: ir.Node, idx: int) -> None:
    fn = _unary(node)
    if fn is None:
        raise Refused(f"{node.op_type} '{node.name}' has non-constant parameters")
    if node.op_type == "Dropout" and len(node.inputs) > 2 and node.inputs[2] is not None:
        raise Refused(f"Dropout '{node.name}' has a training_mode input")
    fw.carry(f, node.outputs[0], vals=fn(f.vals))


def _const_at_rows(fw: _Forward, f: _Flow, node: ir.Node, i: int, what: str) -> np.ndarray:
    """The broadcast constant input ``i`` of ``node`` at the flow's units (float64, one per
    unit); a per-channel constant loses the rows in the plan."""
    c = fw.plan.arr(node, i)
    assert c is not None
    rank = f.rank if f.rank is not None else _rank(node.outputs[0])
    if rank is None and f.axis == -1:  # broadcasting aligns the last axes: the constant's
        rank = max(np.ndim(c), 1)      # own rank places the units
    e = _per_channel_edit(c, f.axis, rank, -1, f.rows, what)
    cv = np.asarray(c, np.float64)
    if e is None:
        return np.broadcast_to(cv.reshape(-1)[:1] if cv.size else cv, f.vals.shape)
    p = _pos(f.axis, rank)
    assert p is not None and rank is not None
    full = cv.reshape((1,) * (rank - cv.ndim) + cv.shape)
    fw.plan.set(node, i, e)
    return np.take(full, f.rows, axis=p).reshape(-1)


def _use_prelu(fw: _Forward, f: _Flow, node: ir.Node, idx: int) -> None:
    """``PRelu(x, slope)`` with a constant slope (scalar or per channel): element-wise per
    unit, ``c -> c if c >= 0 else slope[u] * c``; a per-channel slope loses the rows."""
    if len(node.inputs) < 2 or fw.plan.arr(node, 1) is None:
        raise Refused(f"PRelu '{node.name}' has a non-constant slope")
    slope = _const_at_rows(fw, f, node, 1, f"slope of PRelu '{node.name}'")
    fw.carry(f, node.outputs[0], vals=np.where(f.vals >= 0, f.vals, slope * f.vals))


def _use_binary_const(fw: _Forward, f: _Flow, node: ir.Node, idx: int) -> None:
    """``x op c`` / ``c op x`` with a constant ``c``: per-channel constants lose the rows."""
    at = _const_at_rows(fw, f, node, 1 - idx, f"constant of {node.op_type} '{node.name}'")
    fn = _BINARY[node.op_type]
    vals = fn(f.vals, at) if idx == 0 else fn(at, f.vals)
    fw.carry(f, node.outputs[0], vals=np.asarray(vals, np.float64))


def _use_pool(fw: _Forward, f: _Flow, node: ir.Node, idx: int) -> None:
    op, name = node.op_type, node.name
    if not _is_first(f.axis, f.rank):
        raise Refused(f"{op} '{name}' pools over the channel axis")
    if op == "AveragePool" and int_attr(node, "count_include_pad", 0) and any(
        ints_attr(node, "pads") or [0]
    ):
        raise Refused(f"AveragePool '{name}' counts padding: constants do not pass exactly")
    fw.carry(f, node.outputs[0], axis=1)


def _use_reduce(fw: _Forward, f: _Flow, node: ir.Node, idx: int) -> None:
    """ReduceMean/Max/Min over axes other than the channel axis (a squeeze-and-excitation
    squeeze): a constant channel reduces to the same constant, the channel axis stays (at
    its position less the reduced axes before it when ``keepdims=0``)."""
    op, name = node.op_type, node.name
    rank = f.rank if f.rank is not None else _rank(f.value)
    p = _pos(f.axis, rank)
    if p is None or rank is None:
        raise Refused(f"{op} '{name}': rank unknown")
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        a = fw.plan.arr(node, 1)
        if a is None:
            raise Refused(f"{op} '{name}' has non-constant axes")
        axes: list[int] | None = [int(x) for x in a.reshape(-1)]
    else:
        axes = ints_attr(node, "axes")
    if not axes:
        if int_attr(node, "noop_with_empty_axes", 0) and axes is not None:
            fw.carry(f, node.outputs[0], rank=rank)
            return
        raise Refused(f"{op} '{name}' reduces every axis, the channel axis included")
    norm = sorted({x % rank for x in axes})
    if p in norm:
        raise Refused(f"{op} '{name}' reduces the channel axis")
    if int_attr(node, "keepdims", 1):
        fw.carry(f, node.outputs[0], axis=p, rank=rank)
    else:
        fw.carry(f, node.outputs[0], axis=p - sum(x < p for x in norm), rank=rank - len(norm))


def _use_batchnorm(fw: _Forward, f: _Flow, node: ir.Node, idx: int) -> None:
    name = node.name
    if not _is_first(f.axis, f.rank):
        raise Refused(f"BatchNormalization '{name}' normalises another axis")
    ps = [fw.plan.arr(node, i) for i in range(1, 5)]
    if any(x is None for x in ps):
        raise Refused(f"BatchNormalization '{name}' has non-constant parameters")
    scale, bias, mean, var = (np.asarray(x, np.float64) for x in ps)  # type: ignore[arg-type]
    eps = float_attr(node, "epsilon", 1e-5)
    r = f.rows
    vals = (f.vals - mean[r]) / np.sqrt(var[r] + eps) * scale[r] + bias[r]
    for i, x in zip(range(1, 5), ps, strict=True):
        assert x is not None
        fw.plan.set(node, i, np.delete(x, r, axis=0))
    fw.carry(f, node.outputs[0], axis=1, vals=vals)


def _use_transpose(fw: _Forward, f: _Flow, node: ir.Node, idx: int) -> None:
    perm = ints_attr(node, "perm")
    rank = len(perm) if perm is not None else f.rank
    if rank is None:
        raise Refused(f"Transpose '{node.name}': rank unknown")
    perm = perm if perm is not None else list(range(rank))[::-1]
    p = _pos(f.axis, rank)
    assert p is not None
    fw.carry(f, node.outputs[0], axis=perm.index(p), rank=rank)


def _use_resize(fw: _Forward, f: _Flow, node: ir.Node, idx: int) -> None:
    """Resize / Upsample that keep the channel axis (a constant image resizes to itself)."""
    op, name = node.op_type, node.name
    mode = node.attributes.get("coordinate_transformation_mode")
    if mode is not None and mode.as_string() == "tf_crop_and_resize":
        raise Refused(f"{op} '{name}' crops with an extrapolation value")
    rank = f.rank if f.rank is not None else _rank(node.outputs[0])
    p = _pos(f.axis, rank)
    if p is None:
        raise Refused(f"{op} '{name}': rank unknown")
    axes = ints_attr(node, "axes")
    k: int | None = p
    if axes is not None:
        norm = [a % rank if rank else a for a in axes]
        k = norm.index(p) if p in norm else None
    def present(i: int) -> bool:
        return len(node.inputs) > i and node.inputs[i] is not None
    if op == "Upsample" or len(node.inputs) == 2:  # Upsample / Resize-10: (X, scales)
        scales = fw.plan.arr(node, 1) if present(1) else None
        if scales is None and "scales" in node.attributes:
            scales = np.asarray(node.attributes["scales"].as_floats())
        sizes = None
    else:
        scales = fw.plan.arr(node, 2) if present(2) else None
        sizes = fw.plan.arr(node, 3) if present(3) else None
        if present(3) and sizes is None:
            raise Refused(f"{op} '{name}' has non-constant sizes")
    if scales is not None and scales.size and k is not None and float(scales.reshape(-1)[k]) != 1.0:
        raise Refused(f"{op} '{name}' scales the channel axis")
    if scales is None and sizes is None:
        raise Refused(f"{op} '{name}' has non-constant scales")
    if sizes is not None and sizes.size and k is not None:
        new = sizes.copy()
        new.reshape(-1)[k] -= len(f.rows)
        fw.plan.set(node, 3, new)
    fw.carry(f, node.outputs[0], rank=rank)


#: how many ops :func:`_partial` follows back from a value
_PARTIAL_DEPTH = 24
_PARTIAL_BINARY: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Max": np.fmax, "Min": np.fmin,
}


def _partial(v: ir.Value | None, depth: int = _PARTIAL_DEPTH) -> np.ndarray | None:
    """Partial constant evaluation of a small integer/shape subgraph: the value of ``v`` as
    float64 with NaN where an entry depends on the data (a symbolic dimension read by
    ``Shape``), or None when an op is not understood. Follows Constant/initializers,
    Shape, ConstantOfShape, Concat, Cast, Identity, Reshape, Transpose, Slice, Gather,
    Unsqueeze/Squeeze, Add/Sub/Mul/Max/Min/Neg (NaN propagates through arithmetic)."""
    if v is None or depth <= 0:
        return None
    c = const_array(v)
    if c is not None:
        return np.asarray(c, np.float64) if c.dtype.kind in "biuf" else None
    node = v.producer()
    if node is None or node.domain not in _ONNX or len(node.outputs) != 1:
        return None
    op = node.op_type
    if op == "Shape":
        x = node.inputs[0] if node.inputs else None
        if x is None or x.shape is None:
            return None
        dims = np.asarray([float(d) if isinstance(d, int) else np.nan for d in x.shape])
        start, end = int_attr(node, "start", 0), node.attributes.get("end")
        return dims[start:None if end is None else int(end.as_int())]
    args = [_partial(i, depth - 1) if i is not None else None for i in node.inputs]
    a0 = args[0] if args else None
    if op in ("Identity", "Cast"):
        return a0
    if op == "Neg":
        return None if a0 is None else -a0
    if op in _PARTIAL_BINARY and len(args) == 2:
        if a0 is None or args[1] is None:
            return None
        return _PARTIAL_BINARY[op](a0, args[1])
    if op == "ConstantOfShape":
        if a0 is None or np.isnan(a0).any():
            return None
        t = node.attributes.get("value")
        fill = 0.0 if t is None else float(np.asarray(t.as_tensor().numpy()).reshape(-1)[0])
        return np.full([int(d) for d in a0.reshape(-1)], fill)
    if op == "Concat":
        if any(a is None for a in args):
            return None
        return np.concatenate(args, axis=int_attr(node, "axis", 0))  # type: ignore[arg-type]
    if op == "Transpose":
        return None if a0 is None else np.transpose(a0, ints_attr(node, "perm"))
    if a0 is None:
        return None
    known = [a for a in args[1:]]
    if any(a is not None and np.isnan(a).any() for a in known):
        return None
    if op == "Reshape":
        if len(args) < 2 or args[1] is None:
            return None
        shape = [a0.shape[i] if d == 0 and not int_attr(node, "allowzero", 0) else int(d)
                 for i, d in enumerate(args[1].reshape(-1))]
        try:
            return a0.reshape(shape)
        except ValueError:
            return None
    if op in ("Unsqueeze", "Squeeze"):
        axes = ([int(a) for a in args[1].reshape(-1)] if len(args) > 1 and args[1] is not None
                else ints_attr(node, "axes"))
        if op == "Squeeze":
            return np.squeeze(a0) if axes is None else np.squeeze(
                a0, axis=tuple(a % max(a0.ndim, 1) for a in axes))
        if axes is None:
            return None
        r = a0.ndim + len(axes)
        for a in sorted(a % r for a in axes):
            a0 = np.expand_dims(a0, a)
        return a0
    if op == "Gather":
        if len(args) < 2 or args[1] is None:
            return None
        return np.take(a0, args[1].astype(np.int64), axis=int_attr(node, "axis", 0))
    if op == "Slice":
        if len(args) < 3 or args[1] is None or args[2] is None:
            return None
        starts, ends = args[1].reshape(-1), args[2].reshape(-1)
        axes_ = (args[3].reshape(-1) if len(args) > 3 and args[3] is not None
                 else np.arange(len(starts)))
        steps = (args[4].reshape(-1) if len(args) > 4 and args[4] is not None
                 else np.ones(len(starts)))
        sl = [slice(None)] * a0.ndim
        big = np.iinfo(np.int64).max
        for st, en, ax, sp in zip(starts, ends, axes_, steps, strict=False):
            def idx(x: float) -> int | None:
                return None if abs(x) >= big / 2 else int(x)
            sl[int(ax) % a0.ndim] = slice(idx(st), idx(en), int(sp))
        return a0[tuple(sl)]
    return None


def _pad_channel_free(node: ir.Node, plan: _Plan, axis: int, rank: int | None
                      ) -> tuple[np.ndarray, int | None]:
    """The pads of Pad ``node`` (NaN where computed at run time) and the rank it pads, after
    proving that the channel axis ``axis`` is padded by exactly 0 on both sides, or refuse.
    Pads computed at run time (the legacy exporter's "same" padding) are evaluated as far
    as they are constant (:func:`_partial`): only the channel axis' entries must be known."""
    name = node.name
    pads: np.ndarray | None = None
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        c = plan.arr(node, 1)
        pads = np.asarray(c, np.float64) if c is not None else _partial(node.inputs[1])
        if pads is None:
            raise Refused(f"Pad '{name}' has pads computed by ops whose entries cannot be "
                          "evaluated (only Constant/Shape/Concat/Cast/Slice/Reshape/Transpose/"
                          "ConstantOfShape/Gather/arithmetic are)")
    else:
        attr = ints_attr(node, "pads")
        if attr is None:
            raise Refused(f"Pad '{name}' has non-constant pads")
        pads = np.asarray(attr, np.float64)
    pads = pads.reshape(-1)
    n = len(pads) // 2
    axes = plan.arr(node, 3) if len(node.inputs) > 3 and node.inputs[3] is not None else None
    if len(node.inputs) > 3 and node.inputs[3] is not None and axes is None:
        raise Refused(f"Pad '{name}' has non-constant axes")
    r = rank if rank is not None else (n if axes is None else None)
    p = _pos(axis, r)
    if p is None or r is None:
        raise Refused(f"Pad '{name}': rank unknown")
    ax = list(range(n)) if axes is None else [int(a) % r for a in axes.reshape(-1)]
    if p in ax:
        lo, hi = pads[ax.index(p)], pads[ax.index(p) + n]
        if np.isnan(lo) or np.isnan(hi):
            raise Refused(f"Pad '{name}' has pads computed at run time whose channel-axis "
                          f"entries are not constant: it may pad the channel axis")
        if lo or hi:
            raise Refused(f"Pad '{name}' pads the channel axis")
    return pads, r


def _use_pad(fw: _Forward, f: _Flow, node: ir.Node, idx: int) -> None:
    """Pad that leaves the channel axis alone; a constant pad value must equal the units'
    constants (0 for dead ReLU units), reflect/edge/wrap pad a constant with itself."""
    name = node.name
    pads, rank = _pad_channel_free(node, fw.plan, f.axis, f.rank)
    mode = node.attributes.get("mode")
    if (mode is None or mode.as_string() == "constant") and np.any(pads != 0):
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            cv = fw.plan.arr(node, 2)
            if cv is None:
                raise Refused(f"Pad '{name}' has a non-constant pad value")
            value = float(cv.reshape(-1)[0]) if cv.size else 0.0
        else:
            value = float_attr(node, "value", 0.0)
        if np.any(f.vals != value):
            why = (f"Pad '{name}' pads with {value:g}, not the units' constant "
                   f"{float(f.vals[f.vals != value][0]):g}: the border is not constant")
            border = _pad_border(node, pads, rank, f, value, why)
            fw.carry(f, node.outputs[0], rank=rank, border=border)
            return
    fw.carry(f, node.outputs[0], rank=rank)


def _pad_border(node: ir.Node, pads: np.ndarray, rank: int | None, f: _Flow, value: float,
                why: str) -> tuple[list[int], list[int], float, ir.Value]:
    """A constant-mode Pad (``value``) of units constant at ``k != value`` read by one
    ungrouped Conv (the legacy exporter's explicit padding): the Conv sees ``k`` on the
    interior and ``value`` on the border, a fixed map it adds back
    (:func:`_padded_constant_map`); the pads of the spatial axes must be known and not
    negative, the batch axis unpadded."""
    use = _only_use(node.outputs[0])
    conv = use[0] if use is not None else None
    wc = const_array(conv.inputs[1]) if conv is not None and len(conv.inputs) > 1 else None
    if (use is None or conv is None or conv.op_type != "Conv" or conv.domain not in _ONNX
            or use[1] != 0 or wc is None
            or (int_attr(conv, "group", 1) > 1 and wc.shape[1] == 1)):  # fmt: skip
        raise Refused(why + " (and it is not read by one ungrouped Conv that could add the "
                      "border's map back)")
    if rank is None or _pos(f.axis, rank) != 1:
        raise Refused(why + " (rank unknown)")
    n = len(pads) // 2
    axes = const_array(node.inputs[3]) if len(node.inputs) > 3 else None
    ax = list(range(n)) if axes is None else [int(a) % rank for a in axes.reshape(-1)]
    lo, hi = [0.0] * rank, [0.0] * rank
    for j, a in enumerate(ax):
        lo[a], hi[a] = float(pads[j]), float(pads[j + n])
    if any(np.isnan(x) for x in lo + hi):
        raise Refused(why + " (pads computed at run time from symbolic dimensions)")
    if lo[0] or hi[0] or any(x < 0 for x in lo + hi):
        raise Refused(why + " (it pads the batch axis or crops)")
    return [int(x) for x in lo[2:]], [int(x) for x in hi[2:]], value, _input(node, 0)


def _use_slice(fw: _Forward, f: _Flow, node: ir.Node, idx: int) -> None:
    name = node.name
    if len(node.inputs) > 1:  # opset 10+: (data, starts, ends, axes, steps)
        got = [fw.plan.arr(node, i) if len(node.inputs) > i and node.inputs[i] is not None
               else None for i in range(1, 4)]
        if got[0] is None or got[1] is None or (
                len(node.inputs) > 3 and node.inputs[3] is not None and got[2] is None):  # fmt: skip
            raise Refused(f"Slice '{name}' has non-constant starts/ends/axes")
        n = got[0].size
        axes = list(range(n)) if got[2] is None else [int(a) for a in got[2].reshape(-1)]
    else:
        starts = ints_attr(node, "starts") or []
        axes = ints_attr(node, "axes") or list(range(len(starts)))
    rank = f.rank if f.rank is not None else _rank(node.outputs[0])
    p = _pos(f.axis, rank)
    if p is None or (rank is None and any(a < 0 for a in axes)):
        raise Refused(f"Slice '{name}': rank unknown")
    if p in [a % rank if rank else a for a in axes]:
        raise Refused(f"Slice '{name}' slices the channel axis")
    fw.carry(f, node.outputs[0], rank=rank)


def _squeeze_axes(fw: _Forward, node: ir.Node) -> list[int] | None:
    """The ``axes`` of a Squeeze / Unsqueeze: an attribute before opset 13, an input after
    (None when absent; refuse when computed at run time)."""
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        a = fw.plan.arr(node, 1)
        if a is None:
            raise Refused(f"{node.op_type} '{node.name}' has non-constant axes")
        return [int(x) for x in a.reshape(-1)]
    return ints_attr(node, "axes")


def _use_squeeze(fw: _Forward, f: _Flow, node: ir.Node, idx: int) -> None:
    """Squeeze / Unsqueeze of other axes than the units' carry the units to their new
    position (axes mapped through); squeezing the channel axis refuses."""
    op, name = node.op_type, node.name
    src = _input(node, 0)
    rank = f.rank if f.rank is not None else _rank(src)
    if rank is None:
        _infer_shapes(fw.model)
        rank = _rank(src)
    p = _pos(f.axis, rank)
    if rank is None or p is None:
        raise Refused(f"{op} '{name}': rank of '{src.name}' unknown")
    axes = _squeeze_axes(fw, node)
    if op == "Squeeze":
        if axes is None:  # every dimension of size 1
            if src.shape is None or any(not isinstance(d, int) for d in src.shape):
                raise Refused(f"Squeeze '{name}' has no axes and the shape of '{src.name}' "
                              "is not known")
            axes = [i for i, d in enumerate(src.shape) if d == 1]
        norm = sorted({a % rank for a in axes})
        if p in norm:
            raise Refused(f"Squeeze '{name}' squeezes the units' axis {p}")
        fw.carry(f, node.outputs[0], axis=p - sum(a < p for a in norm), rank=rank - len(norm))
        return
    if axes is None:
        raise Refused(f"Unsqueeze '{name}' has no axes")
    out_rank = rank + len(axes)
    inserted = {a % out_rank for a in axes}
    kept = [i for i in range(out_rank) if i not in inserted]
    fw.carry(f, node.outputs[0], axis=kept[p], rank=out_rank)


def _use_reshape(fw: _Forward, f: _Flow, node: ir.Node, idx: int) -> None:
    """A Reshape that keeps the channel dimension (the dims before it kept, the ones after it
    regrouped) carries the units to their new position; else it must be a flatten."""
    target = fw.plan.arr(node, 1) if node.op_type == "Reshape" else None
    src = _input(node, 0)
    keep = _reshape_keeps(src, target, f, node) if target is not None else None
    if keep is None and node.op_type == "Reshape" and _is_last(f.axis, f.rank or _rank(src)):
        def moving(v: ir.Value, i: int) -> bool:
            return v is src and i == (f.rank or _rank(src) or 0) - 1
        n = _reshape_last(node, src, _last_static(src), f.rows, moving, fw.plan, None)
        if n is not None:
            fw.carry(f, node.outputs[0], axis=n - 1, rank=n)
            return
    if keep is None:
        _use_flatten(fw, f, node, idx)
        return
    k, new_t = keep
    if new_t is not None:
        fw.plan.set(node, 1, new_t)
    fw.carry(f, node.outputs[0], axis=k, rank=len(target))  # type: ignore[arg-type]


def _reshape_keeps(src: ir.Value, target: np.ndarray, f: _Flow, node: ir.Node
                   ) -> tuple[int, np.ndarray | None] | None:
    if src.shape is None:
        return None
    dims = [d if isinstance(d, int) else None for d in src.shape]
    p = _pos(f.axis, len(dims))
    t = [int(x) for x in target.reshape(-1)]
    allow_zero = int_attr(node, "allowzero", 0)
    if p is None or p >= len(t) or dims[p] is None:
        return None
    for i in range(p):  # the dims before the channel axis are kept one by one
        if not ((t[i] == 0 and not allow_zero) or (dims[i] is not None and t[i] == dims[i])
                or (t[i] == -1 and i == 0 and -1 not in t[1:])):  # fmt: skip
            return None
    c = dims[p]
    if t[p] not in (c, 0) or (t[p] == 0 and allow_zero):
        return None
    tail_in = dims[p + 1:]
    tail_t = t[p + 1:]
    if any(d is None for d in tail_in) or any(x == 0 for x in tail_t):
        return None
    n_in = int(np.prod([int(d) for d in tail_in if d is not None])) if tail_in else 1
    if -1 in tail_t:
        if -1 in t[:p] or tail_t.count(-1) > 1:
            return None
        rest = int(np.prod([x for x in tail_t if x != -1])) if len(tail_t) > 1 else 1
        if n_in % rest:
            return None
    elif (int(np.prod(tail_t)) if tail_t else 1) != n_in:
        return None
    if t[p] == 0:
        return p, None
    assert c is not None  # t[p] == c != 0 here
    new = target.copy()
    new.reshape(-1)[p] = c - len(f.rows)
    return p, new


def _only_use(v: ir.Value) -> tuple[ir.Node, int] | None:
    """The one ``(node, input)`` reading ``v``, or None (several, none, a graph output)."""
    uses = list(v.uses())
    return None if len(uses) != 1 or v.is_graph_output() else (uses[0][0], uses[0][1])


def _use_shape(fw: _Forward, f: _Flow, node: ir.Node, idx: int) -> None:
    """``Shape(x)`` read only for ``Gather`` of single dimensions: other dimensions than the
    units' are unchanged; the units' dimension only as the last entry of the target of a
    Reshape of ``x`` itself (``x.view(-1, x.size(-1))``), which that Reshape's handler plans."""
    name = node.name
    rank = f.rank if f.rank is not None else _rank(f.value)
    p = _pos(f.axis, rank)
    if p is None or node.attributes.get("start") is not None or (
            node.attributes.get("end") is not None) or node.outputs[0].is_graph_output():  # fmt: skip
        raise Refused(f"Shape '{name}' reads the units' width: coupling not understood")
    for ga, _ in node.outputs[0].uses():
        idx_c = const_array(ga.inputs[1]) if ga.op_type == "Gather" and len(ga.inputs) > 1 else None
        if idx_c is None or idx_c.size != 1 or idx_c.ndim > 1:
            raise Refused(f"Shape '{name}' is read by '{ga.name}' ({ga.op_type}): only a "
                          "Gather of one dimension is understood")
        if int(idx_c.reshape(-1)[0]) % (rank or 1) != p:
            continue
        ok = [(un, cat) for un, _ in ga.outputs[0].uses() if un.op_type == "Unsqueeze"
              for cat, ci in un.outputs[0].uses()
              if cat.op_type == "Concat" and ci == len(cat.inputs) - 1]
        n_uses = len(ga.outputs[0].uses())
        readers = [(_only_use(un.outputs[0]), _only_use(cat.outputs[0])) for un, cat in ok]
        if not ok or len(ok) != n_uses or any(
                u is None or r is None or r[0].op_type != "Reshape" or r[1] != 1
                or r[0].inputs[0] is not f.value for u, r in readers):  # fmt: skip
            raise Refused(f"Shape '{name}' reads the units' width into something else than "
                          "the last entry of a Reshape of the same value")


def _use_flatten(fw: _Forward, f: _Flow, node: ir.Node, idx: int) -> None:
    """Flatten (axis 1) / Reshape to ``(N, -1)`` of ``[N, d1, ..., dk]`` with the units on
    axis ``p >= 1`` (channels first ``[N, C, H, W]`` or channels last ``[N, H, W, C]``, as
    tf2onnx writes it): unit ``c`` keeps the flat positions ``(o * C + c) * inner + i`` for
    ``o`` over the dims before ``p`` and ``i`` over those after. The dims after the batch
    must be known (static or inferred)."""
    src = _input(node, 0)
    shape = _static(src)
    if shape is None:  # not inferred yet, or partly: infer once more before refusing
        _infer_shapes(fw.model)
        shape = _static(src)
    name = node.name
    p = None if shape is None else _pos(f.axis, len(shape))
    if shape is None or len(shape) < 2 or p is None or p < 1:
        raise Refused(f"{node.op_type} '{name}': input shape unknown or the units on the "
                      "batch axis")
    outer = int(np.prod(shape[1:p])) if p > 1 else 1
    inner = int(np.prod(shape[p + 1:])) if len(shape) > p + 1 else 1
    c = shape[p]
    total = outer * c * inner
    if node.op_type == "Flatten":
        if int_attr(node, "axis", 1) != 1:
            raise Refused(f"Flatten '{name}' flattens at axis {int_attr(node, 'axis', 1)}")
    else:
        target = fw.plan.arr(node, 1)
        if (target is None or target.shape != (2,) or int(target[1]) != total
                or int(target[0]) not in (-1, 0, shape[0])):  # fmt: skip
            raise Refused(f"Reshape '{name}' is not a flatten to (N, {total}) and does not "
                          "keep the channel axis")
        new_t = target.copy()
        new_t[1] = total - len(f.rows) * outer * inner
        fw.plan.set(node, 1, new_t)
    grid = (np.arange(outer)[:, None, None] * c + f.rows[None, :, None]) * inner + np.arange(
        inner)[None, None, :]
    vals = np.broadcast_to(f.vals[None, :, None], grid.shape)
    order = np.argsort(grid.reshape(-1), kind="stable")
    fw.carry(f, node.outputs[0], axis=1, rank=2, rows=grid.reshape(-1)[order],
             vals=vals.reshape(-1)[order])


def _use_concat(fw: _Forward, f: _Flow, node: ir.Node, idx: int) -> None:
    out = node.outputs[0]
    rank = _rank(out) or f.rank
    ax = int_attr(node, "axis", 0)
    if rank is None:
        raise Refused(f"Concat '{node.name}': rank unknown")
    own = _pos(f.axis, rank)
    if ax % rank != own:
        raise Refused(f"Concat '{node.name}' joins along axis {ax}, not the units' axis")
    offset = 0
    for i in range(idx):
        s = node.inputs[i]
        d = None if s is None or s.shape is None else s.shape[ax % rank]
        if not isinstance(d, int):
            raise Refused(f"Concat '{node.name}': width of input {i} unknown")
        offset += d
    fw.carry(f, out, rank=rank, rows=f.rows + offset)


def _use_gemm(fw: _Forward, f: _Flow, node: ir.Node, idx: int) -> None:
    name, plan = node.name, fw.plan
    if int_attr(node, "transA", 0) or not _is_last(f.axis, 2):
        raise Refused(f"Gemm '{name}' reads the units transposed")
    b = plan.arr(node, 1)
    if b is None:
        raise Refused(f"Gemm '{name}' has no constant weight")
    tb = int_attr(node, "transB", 0)
    wk = b.T if tb else b
    alpha, beta = float_attr(node, "alpha", 1.0), float_attr(node, "beta", 1.0)
    fold = alpha * (f.vals @ wk[f.rows, :].astype(np.float64))
    plan.set(node, 1, np.delete(b, f.rows, axis=1 if tb else 0))
    plan.sinks.append(f"Gemm '{name}'")
    if not np.any(fold):
        return
    has_c = len(node.inputs) > 2 and node.inputs[2] is not None
    if beta == 0:
        raise Refused(f"Gemm '{name}' has beta=0: no bias to fold the constant into")
    if has_c:
        c = plan.arr(node, 2)
        if c is None:
            raise Refused(f"Gemm '{name}' has a non-constant C input")
        plan.set(node, 2, (c + fold / beta).astype(c.dtype))
    else:
        plan.set(node, 2, (fold / beta).astype(b.dtype))


def _use_matmul(fw: _Forward, f: _Flow, node: ir.Node, idx: int) -> None:
    name, plan = node.name, fw.plan
    w = plan.arr(node, 1)
    if w is None or w.ndim != 2:
        raise Refused(f"MatMul '{name}' has no 2-D constant weight")
    if not _is_last(f.axis, f.rank):
        raise Refused(f"MatMul '{name}' reads the units along another axis")
    fold = f.vals @ w[f.rows, :].astype(np.float64)
    plan.set(node, 1, np.delete(w, f.rows, axis=0))
    plan.sinks.append(f"MatMul '{name}'")
    if not np.any(fold):
        return
    out = node.outputs[0]
    uses = list(out.uses())
    if len(uses) == 1 and not out.is_graph_output():
        add, ai = uses[0]
        c = plan.arr(add, 1 - ai) if add.op_type == "Add" and add.domain in _ONNX else None
        if c is not None and c.shape[-1:] == fold.shape and c.size == fold.size:
            plan.set(add, 1 - ai, (c + fold.reshape(c.shape)).astype(c.dtype))
            return
    if out.is_graph_output():
        raise Refused(f"MatMul '{name}' output is a graph output: no bias to fold into")
    plan.add_bias_after.append((node, fold.astype(w.dtype)))


def _padded(node: ir.Node) -> bool:
    """Does the conv pad its input? ``auto_pad=SAME_*`` pads nothing when every kernel
    dimension is 1 with stride 1 (Hugging Face's ``padding="same"`` 1x1 convs)."""
    auto = node.attributes.get("auto_pad")
    if auto is not None and auto.as_string().startswith("SAME"):
        w = node.inputs[1] if len(node.inputs) > 1 else None
        kernel = ints_attr(node, "kernel_shape") or (
            None if w is None or w.shape is None else list(w.shape)[2:])
        strides = ints_attr(node, "strides") or [1]
        return kernel is None or any(k != 1 for k in kernel) or any(s != 1 for s in strides)
    return any(ints_attr(node, "pads") or [0]) or (
        auto is not None and auto.as_string() not in ("NOTSET", "VALID"))


def _bias(plan: _Plan, node: ir.Node, width: int, dtype: np.dtype) -> tuple[np.ndarray, bool]:
    """A conv's bias as planned (zeros when it has none) and whether it has one."""
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        b = plan.arr(node, 2)
        if b is None:
            raise Refused(f"{node.op_type} '{node.name}' has a non-constant bias")
        return b, True
    return np.zeros(width, dtype), False


def _use_conv(fw: _Forward, f: _Flow, node: ir.Node, idx: int) -> None:
    """Conv (w: C_out, C_in/g, k...) and ConvTranspose (w: C_in, C_out/g, k...) reading the
    units as input channels: a sink (columns removed, constant folded), or, depthwise, a
    pass-through whose channels keep only their bias."""
    op, name, plan = node.op_type, node.name, fw.plan
    if not _is_first(f.axis, f.rank):
        raise Refused(f"{op} '{name}' reads the units along another axis")
    w = plan.arr(node, 1)
    if w is None:
        raise Refused(f"{op} '{name}' has no constant weight")
    g = int_attr(node, "group", 1)
    rows, vals = f.rows, f.vals
    nonzero = bool(np.any(vals != 0))
    spatial = tuple(range(2, w.ndim))
    if op == "ConvTranspose":
        c_in, per_out = w.shape[0], w.shape[1]
        if nonzero and np.any(w[rows]):
            raise Refused(f"ConvTranspose '{name}' spreads its input unevenly over the output "
                          "(strides, borders): only a zero constant folds")
        if g > 1 and c_in == g:  # depthwise: channel j feeds outputs j*m .. j*m+m-1
            _depthwise(fw, f, node, per_out, np.delete(w, rows, axis=0), np.zeros(0))
            return
        if g > 1:
            _groups_even(rows, c_in // g, g, f"ConvTranspose '{name}'")
        plan.set(node, 1, np.delete(w, rows, axis=0))
        plan.sinks.append(f"ConvTranspose '{name}'")
        return
    c_out, per_in = w.shape[0], w.shape[1]
    if g > 1 and per_in == 1:  # depthwise
        m = c_out // g
        out_rows = (rows[:, None] * m + np.arange(m)[None, :]).reshape(-1)
        if nonzero and _padded(node):
            raise Refused(f"Conv '{name}' pads its input: a non-zero constant channel is not "
                          "foldable exactly")
        through = np.repeat(vals, m) * w[out_rows].reshape(len(out_rows), -1).sum(1)
        _depthwise(fw, f, node, m, np.delete(w, out_rows, axis=0), through)
        return
    per_out = c_out // g
    grp = _groups_even(rows, per_in, g, f"Conv '{name}'") if g > 1 else np.zeros_like(rows)
    local = rows - grp * per_in
    wsum = w.astype(np.float64).sum(axis=spatial) if spatial else w.astype(np.float64)
    fold = np.zeros(c_out)
    parts = []
    removed_w = np.zeros((c_out, len(rows), *w.shape[2:]))  # the removed columns, ungrouped
    for i in range(g):
        sl = slice(i * per_out, (i + 1) * per_out)
        sel = grp == i
        fold[sl] = wsum[sl][:, local[sel]] @ vals[sel]
        removed_w[sl, np.flatnonzero(sel)] = w[sl][:, local[sel]].astype(np.float64)
        parts.append(np.delete(w[sl], local[sel], axis=1))
    if not np.any(fold) and not (nonzero and _padded(node)) and f.border is None:
        plan.set(node, 1, np.concatenate(parts, axis=0))
        plan.sinks.append(f"Conv '{name}'")
        return
    if _padded(node) or f.border is not None:
        cmap = _padded_constant_map(fw, node, removed_w, vals, f.border)
        if not np.allclose(cmap, cmap.reshape(c_out, -1)[:, :1].reshape(
                (c_out,) + (1,) * (cmap.ndim - 1)), rtol=0.0, atol=0.0):
            plan.set(node, 1, np.concatenate(parts, axis=0))
            plan.sinks.append(f"Conv '{name}' (+ the constant channels' map, zero padding)")
            plan.add_bias_after.append((node, cmap[None].astype(w.dtype)))
            return
        fold = cmap.reshape(c_out, -1)[:, 0]  # no padding reaches the constant channels
    plan.set(node, 1, np.concatenate(parts, axis=0))
    plan.sinks.append(f"Conv '{name}'")
    if not np.any(fold):
        return
    b, has = _bias(plan, node, c_out, w.dtype)
    plan.set(node, 2, (b + fold).astype(b.dtype if has else w.dtype))


def _observed_dims(fw: _Forward, x: ir.Value) -> list[int] | None:
    """The spatial dims of ``x`` measured on one calibration batch, when every graph input
    has a fully static shape (then so has ``x``: shape inference lost them only through ops
    it does not fold, such as Pad amounts computed from ``Shape``); else None."""
    ins = list(fw.model.graph.inputs)
    if not fw.batches or not x.name or any(
            v.shape is None or any(not isinstance(d, int) for d in v.shape) for v in ins):
        return None
    (got,) = _observe(fw.model, x.name, fw.batches[:1])
    return [int(d) for d in got.shape[2:]]


def _conv_geometry(node: ir.Node, spatial: Sequence[int], kernel: Sequence[int]
                   ) -> tuple[list[int], list[int], list[int], list[int]]:
    """``(pads_lo, pads_hi, strides, dilations)`` of Conv ``node`` on an input of the given
    spatial dims (``auto_pad`` resolved as onnxruntime does)."""
    n = len(spatial)
    strides = ints_attr(node, "strides") or [1] * n
    dil = ints_attr(node, "dilations") or [1] * n
    auto = node.attributes.get("auto_pad")
    mode = "NOTSET" if auto is None else auto.as_string()
    if mode in ("SAME_UPPER", "SAME_LOWER"):
        lo, hi = [], []
        for d, k, s_, dl in zip(spatial, kernel, strides, dil, strict=True):
            out = -(-d // s_)
            total = max(0, (out - 1) * s_ + (k - 1) * dl + 1 - d)
            small = total // 2
            lo.append(small if mode == "SAME_UPPER" else total - small)
            hi.append(total - lo[-1])
        return lo, hi, strides, dil
    if mode == "VALID":
        return [0] * n, [0] * n, strides, dil
    pads = ints_attr(node, "pads") or [0] * (2 * n)
    return list(pads[:n]), list(pads[n:]), strides, dil


def _padded_constant_map(fw: _Forward, node: ir.Node, removed_w: np.ndarray,
                         vals: np.ndarray,
                         border: tuple[list[int], list[int], float, ir.Value] | None = None
                         ) -> np.ndarray:
    """What the removed input channels, constant at ``vals``, contribute to the output of the
    zero-padded Conv ``node`` (weights of those columns ``removed_w``: ``[C_out, n, k...]``):
    ``M[o, ...] = sum_c vals_c * conv(1-image with zero padding, W[o, c])``, exactly in
    float64; needs the input's spatial dims static, or refuses. With ``border`` (a Pad
    before the Conv, value ``v``): the image is 1 on the Pad's input, and the Pad's border
    adds ``v * conv(border indicator, sum_c W[o, c])``."""
    name = node.name
    x = _input(node, 0) if border is None else border[3]
    dims: list[Any] | None = None if x.shape is None else list(x.shape)[2:]
    if dims is None or any(not isinstance(d, int) for d in dims):
        _infer_shapes(fw.model)
        dims = None if x.shape is None else list(x.shape)[2:]
    if dims is None or any(not isinstance(d, int) for d in dims):
        dims = _observed_dims(fw, x)
    if dims is None or len(dims) != removed_w.ndim - 2 or any(
            not isinstance(d, int) or d <= 0 for d in dims):  # fmt: skip
        raise Refused(f"Conv '{name}' pads its input and the spatial shape of '{x.name}' is "
                      f"symbolic ({'unknown' if x.shape is None else list(x.shape)}) and "
                      "cannot be measured (a graph input has symbolic dims, or no calibration "
                      "batch): the border map of the non-zero constant channels cannot be "
                      "computed")
    inner = [int(d) for d in dims]  # type: ignore[arg-type]
    b_lo, b_hi = (border[0], border[1]) if border is not None else ([0] * len(inner),) * 2
    if len(b_lo) != len(inner):
        raise Refused(f"Conv '{name}': the Pad before it has another rank")
    spatial = [d + a + b for d, a, b in zip(inner, b_lo, b_hi, strict=True)]
    kernel = list(removed_w.shape[2:])
    lo, hi, strides, dil = _conv_geometry(node, spatial, kernel)
    ones = np.zeros([d + a + b for d, a, b in zip(spatial, lo, hi, strict=True)])
    frame = ones.copy()
    frame[tuple(slice(a, a + d) for a, d in zip(lo, spatial, strict=True))] = 1.0
    ones[tuple(slice(a + e, a + e + d) for a, e, d in zip(lo, b_lo, inner, strict=True))] = 1.0
    out_dims = [(p - ((k - 1) * dl + 1)) // s_ + 1
                for p, k, dl, s_ in zip(ones.shape, kernel, dil, strides, strict=True)]
    if any(d <= 0 for d in out_dims):
        raise Refused(f"Conv '{name}': kernel larger than its padded input")
    wk = np.einsum("oc...,c->o...", removed_w, np.asarray(vals, np.float64))
    images = [(wk, ones)]
    if border is not None and border[2] != 0.0:  # the Pad's border holds its value v
        images.append((removed_w.sum(axis=1) * border[2], frame - ones))
    out = np.zeros([removed_w.shape[0], *out_dims])
    for kern, img in images:
        for off in np.ndindex(*kernel):
            win = img[tuple(slice(o * dl, o * dl + (n - 1) * s_ + 1, s_)
                            for o, dl, n, s_ in zip(off, dil, out_dims, strides, strict=True))]
            out += kern[(slice(None), *off)].reshape(-1, *([1] * len(out_dims))) * win[None]
    return out


def _depthwise(fw: _Forward, f: _Flow, node: ir.Node, m: int, new_w: np.ndarray,
               through: np.ndarray) -> None:
    """A depthwise conv loses whole groups: their outputs were constant (bias + the folded
    input), so the flow goes on from its output channels."""
    out_rows = (f.rows[:, None] * m + np.arange(m)[None, :]).reshape(-1)
    g = int_attr(node, "group", 1)
    width = g * m
    b, has = _bias(fw.plan, node, width, new_w.dtype)
    vals = np.asarray(b, np.float64)[out_rows] + (through if through.size else 0.0)
    fw.plan.set(node, 1, new_w)
    if has:
        fw.plan.set(node, 2, np.delete(b, out_rows, axis=0))
    fw.plan.attrs.append((node, "group", g - len(f.rows)))
    f = _Flow(f.value, f.axis, f.rank, f.rows, f.vals, node.name or "")
    fw.carry(f, node.outputs[0], axis=1, rows=out_rows, vals=vals)


_Handler = Callable[[_Forward, _Flow, ir.Node, int], None]
_HANDLERS: dict[str, _Handler] = {
    **{op: _use_unary for op in (*_ACT_OPS, "Identity", "Dropout")},
    **{op: _use_binary_const for op in _BINARY},
    **{op: _use_pool for op in _POOLS},
    **{op: _use_reduce for op in ("ReduceMean", "ReduceMax", "ReduceMin")},
    "BatchNormalization": _use_batchnorm,
    "PRelu": _use_prelu,
    "Flatten": _use_flatten,
    "Reshape": _use_reshape,
    "Shape": _use_shape,
    "Transpose": _use_transpose,
    "Resize": _use_resize,
    "Upsample": _use_resize,
    "Pad": _use_pad,
    "Slice": _use_slice,
    "Squeeze": _use_squeeze,
    "Unsqueeze": _use_squeeze,
    "Concat": _use_concat,
    "Gemm": _use_gemm,
    "MatMul": _use_matmul,
    "Conv": _use_conv,
    "ConvTranspose": _use_conv,
}

# -- execution ---------------------------------------------------------------------------
def _execute(graph: ir.Graph, plan: _Plan) -> None:
    shared_done: set[int] = set()
    shared = plan.shared if plan.shared is not None else _shared_alike(plan)
    alike = {k for k, (_, _, same) in shared.items() if same}
    for node, i, arr in plan.edits.values():
        root = _root(node.inputs[i]) if i < len(node.inputs) else None
        if root is not None and id(root) in alike:  # edited alike at every use: once, shared
            if id(root) not in shared_done:
                shared_done.add(id(root))
                root.const_value = ir.Tensor(np.ascontiguousarray(arr), name=root.name)
                root.shape = ir.Shape(arr.shape)
                stack = [root]
                while stack:
                    v = stack.pop()
                    for n, _ in v.uses():
                        if n.op_type == "Identity" and n.domain in _ONNX:
                            n.outputs[0].shape = ir.Shape(arr.shape)
                            stack.append(n.outputs[0])
            continue
        if i >= len(node.inputs):
            node.resize_inputs(i + 1)
        if node.inputs[i] is None:
            node.replace_input_with(i, new_initializer(graph, f"{node.name or node.op_type}_bias", arr))
        elif not _set_stored(node, i, arr):
            set_const(graph, node, i, arr)
    for node, name, value in plan.attrs:
        node.attributes[name] = ir.AttrInt64(name, value)
    for v, axis, removed in plan.shapes.values():
        if v.shape is None:
            continue
        dims = list(v.shape)
        pos = _pos(axis, len(dims))
        if pos is not None and pos < len(dims) and isinstance(dims[pos], int):
            dims[pos] = int(dims[pos]) - removed  # type: ignore[arg-type]
            v.shape = ir.Shape(dims)
    for mul, gi, keep, rows, conv, corr in plan.gated:
        _add_back_gated(graph, mul, gi, keep, rows, conv, corr)
    for node, fold in plan.add_bias_after:
        bias = new_initializer(graph, f"{node.name or 'MatMul'}_folded_bias", fold)
        _add_after(graph, node, bias, "folded_bias")


def _set_stored(node: ir.Node, i: int, arr: np.ndarray) -> bool:
    """Input ``i`` of ``node`` is ``Cast(initializer)`` (bf16/fp16 weights cast to float32
    where used), read only there: edit the initializer in its stored element type, when
    ``arr`` round-trips through it exactly (a removed row or column does; a folded bias may
    not, and is then written as a new float32 initializer by the caller). True when done."""
    v = node.inputs[i]
    cast = v.producer() if v is not None else None
    if (v is None or cast is None or cast.op_type != "Cast" or cast.domain not in _ONNX
            or _only_use(v) is None or not cast.inputs or cast.inputs[0] is None):  # fmt: skip
        return False
    src = cast.inputs[0]
    if (not src.is_initializer() or src.const_value is None or src.is_graph_input()
            or src.is_graph_output() or len(src.uses()) != 1):  # fmt: skip
        return False
    stored = src.const_value.dtype.numpy()
    back = arr.astype(stored)
    if not np.array_equal(back.astype(arr.dtype), arr):
        return False
    src.const_value = ir.Tensor(np.ascontiguousarray(back), name=src.name)
    src.shape = ir.Shape(arr.shape)
    v.shape = ir.Shape(arr.shape)
    return True


def _add_after(graph: ir.Graph, node: ir.Node, addend: ir.Value, tag: str) -> None:
    """Insert ``Add(node's output, addend)`` after ``node`` and rewire every reader of the
    output to it; a graph output's place and name pass to the Add's result."""
    out = node.outputs[0]
    uses = list(out.uses())
    add = ir.Node("", "Add", [out, addend], name=f"{node.name}_{tag}_add", num_outputs=1)
    add.outputs[0].name = f"{out.name}_{tag}"
    add.outputs[0].type = out.type
    add.outputs[0].shape = out.shape
    graph.insert_after(node, add)
    for n, i in uses:
        n.replace_input_with(i, add.outputs[0])
    if out.is_graph_output():
        outs = graph.outputs
        outs[list(outs).index(out)] = add.outputs[0]
        add.outputs[0].name, out.name = out.name, f"{out.name}_before_{tag}"


def _add_back_gated(graph: ir.Graph, mul: ir.Node, gi: int, keep: np.ndarray, rows: np.ndarray,
                    conv: ir.Node, corr: np.ndarray) -> None:
    """Wire :meth:`_Forward.gated_sink`'s edit: the Mul reads the gate's kept channels; the
    removed channels' gate values, through a 1x1 Conv of weights ``corr``, are added to the
    output of ``conv``."""
    g = mul.inputs[gi]
    assert g is not None
    base = mul.name or "gate"

    def gather(idx: np.ndarray, tag: str) -> ir.Node:
        c = new_initializer(graph, f"{base}_{tag}_idx", idx.astype(np.int64))
        n = ir.Node("", "Gather", [g, c], attributes=[ir.AttrInt64("axis", 1)],
                    name=f"{base}_{tag}", num_outputs=1)
        n.outputs[0].name = f"{g.name}_{tag}"
        n.outputs[0].type = g.type
        if g.shape is not None:
            dims = list(g.shape)
            dims[1] = len(idx)
            n.outputs[0].shape = ir.Shape(dims)
        graph.insert_before(mul, n)
        return n

    kept = gather(keep, "kept")
    mul.replace_input_with(gi, kept.outputs[0])
    gone = gather(rows, "removed")
    cw = new_initializer(graph, f"{base}_gated_constants", corr)
    cc = ir.Node("", "Conv", [gone.outputs[0], cw], name=f"{base}_gated_constants",
                 num_outputs=1)
    cc.outputs[0].name = f"{base}_gated_constants_out"
    cc.outputs[0].type = g.type
    graph.insert_before(mul, cc)
    _add_after(graph, conv, cc.outputs[0], "gated_constants")
