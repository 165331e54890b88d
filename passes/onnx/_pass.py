"""The base of graphsurg's ONNX passes: an ``onnx_ir`` in-place pass that counts its rewrites
and records, per site, why it refused one."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from graphsurg._problems import Diagnosis


@dataclass(frozen=True)
class Refusal:
    """A rewrite the pass did not make, and why."""

    site: str
    reason: str

    def __str__(self) -> str:
        return f"{self.site}: {self.reason}"


@dataclass
class PassState:
    """What passes of one ``apply`` share: units already excised per site address."""

    excised: dict[str, set[int]] = field(default_factory=dict)


class GraphsurgPass(ir.passes.InPlacePass):
    """An in-place ``onnx_ir`` pass with a snake_case ``name``, an ``exact`` flag (function
    preserving on the calibration data up to float round-off), and, after ``call``, the
    number of ``rewrites``, the ``refusals`` and ``notes`` for the report."""

    name: str = ""
    exact: bool = True
    needs_diagnosis: bool = True

    def __init__(self, diagnosis: Diagnosis | None = None, state: PassState | None = None):
        super().__init__()
        self.diagnosis = diagnosis
        self.state = state or PassState()
        self.rewrites = 0
        self.refusals: list[Refusal] = []
        self.notes: list[str] = []

    def refuse(self, site: str, reason: str) -> None:
        self.refusals.append(Refusal(site, reason))


#: ops that turn constants into constants without arithmetic (exporters write biases as
#: ``Reshape(bias, [1, C, 1, 1])``, Paddle2ONNX and tf2onnx most of all)
_CONST_LAYOUT = frozenset({"Identity", "Reshape", "Unsqueeze", "Squeeze", "Cast"})
#: how many such ops ``const_array`` follows back from a value
CONST_DEPTH = 8


def const_array(v: ir.Value | None, _depth: int = CONST_DEPTH) -> np.ndarray | None:
    """The numpy value of a constant -- an initializer, a Constant node's output (``value``,
    ``value_float(s)``, ``value_int(s)``), or either through Identity, Reshape, Unsqueeze,
    Squeeze and Cast of constants (the legacy exporter shares weights through Identity;
    Paddle2ONNX reshapes biases to ``[1, C, 1, 1]``) -- or None. Nothing is changed."""
    if v is None or _depth <= 0:
        return None
    if v.const_value is not None:
        return np.asarray(v.const_value.numpy())
    node = v.producer()
    if node is None or node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "Constant":  # value, value_float(s), value_int(s)
        from ._common import constant_tensor  # sparse values are made dense on load

        t = constant_tensor(node)
        return None if t is None else np.asarray(t.numpy())
    if node.op_type not in _CONST_LAYOUT or not node.inputs:
        return None
    x = const_array(node.inputs[0], _depth - 1)
    if x is None:
        return None
    return _fold_layout(node, x, _depth)


def _fold_layout(node: ir.Node, x: np.ndarray, depth: int) -> np.ndarray | None:
    op = node.op_type
    if op == "Identity":
        return x
    if op == "Cast":
        to = node.attributes.get("to")
        return None if to is None else x.astype(ir.DataType(to.as_int()).numpy())
    second = const_array(node.inputs[1], depth - 1) if len(node.inputs) > 1 else None
    if len(node.inputs) > 1 and node.inputs[1] is not None and second is None:
        return None
    if op == "Reshape":
        if second is None:
            return None
        zero_copies = not int_attr(node, "allowzero", 0)
        shape = [x.shape[i] if d == 0 and zero_copies and i < x.ndim else int(d)
                 for i, d in enumerate(second.reshape(-1).tolist())]
        try:
            return x.reshape(shape)
        except ValueError:
            return None
    axes = second.reshape(-1).tolist() if second is not None else ints_attr(node, "axes")
    if op == "Unsqueeze":
        if axes is None:
            return None
        rank = x.ndim + len(axes)
        for a in sorted(int(a) % rank for a in axes):
            x = np.expand_dims(x, a)
        return x
    if axes is None:  # Squeeze without axes: every dimension of size 1
        return np.squeeze(x)
    try:
        return np.squeeze(x, axis=tuple(int(a) % max(x.ndim, 1) for a in axes))
    except ValueError:
        return None


def new_initializer(graph: ir.Graph, base: str, array: np.ndarray) -> ir.Value:
    """Register ``array`` as a new initializer with a name derived from ``base``."""
    name = base
    i = 0
    while name in graph.initializers:
        i += 1
        name = f"{base}_{i}"
    t = ir.Tensor(np.ascontiguousarray(array), name=name)
    v = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(t.dtype), const_value=t)
    graph.register_initializer(v)
    return v


def set_const(graph: ir.Graph, node: ir.Node, index: int, array: np.ndarray) -> None:
    """Give ``node`` input ``index`` the constant ``array``: in place when the initializer has
    no other use, else through a new initializer (the shared one is left as it is)."""
    v = node.inputs[index]
    assert v is not None
    if v.is_initializer() and len(v.uses()) == 1 and not v.is_graph_input() and not v.is_graph_output():
        v.const_value = ir.Tensor(np.ascontiguousarray(array), name=v.name)
        v.shape = ir.Shape(array.shape)
        return
    nv = new_initializer(graph, f"{v.name or 'const'}_gs", array)
    node.replace_input_with(index, nv)


def int_attr(node: ir.Node, name: str, default: int) -> int:
    a = node.attributes.get(name)
    return default if a is None else int(a.as_int())


def float_attr(node: ir.Node, name: str, default: float) -> float:
    a = node.attributes.get(name)
    return default if a is None else float(a.as_float())


def ints_attr(node: ir.Node, name: str) -> list[int] | None:
    a = node.attributes.get(name)
    return None if a is None else [int(x) for x in a.as_ints()]
