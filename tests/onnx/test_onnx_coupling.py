"""Coupling of the ONNX excision (``passes/onnx/excise_dead_units``) on graphs built with
``onnx.helper`` the way exporters write them (some with Constant-node weights and
``Reshape(bias, [1, C, 1, 1])`` biases, Paddle2ONNX style).

Each case plants units that are constant on every input (a ReLU fed a zero weight row and a
negative bias is 0; a positive bias makes it a non-zero constant), runs the real entry point
``graphsurg.onnx.apply`` (or :func:`excise_site` where the library applier cannot reach the
case) and asserts: how many units were removed, the op types after, onnxruntime outputs equal
to the original's within ``EXACT_RTOL`` on held-out inputs, ``full_check``, and for the
negative cases the refusal's reason naming the node.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from _onnx_helpers import assert_same_outputs, full_check, op_types
from graphsurg.passes.onnx.excise_dead_units import excise_site
from onnx import TensorProto, helper, numpy_helper

from graphsurg import SurgeryResult
from graphsurg import onnx as gso
from graphsurg._errors import Refused
from graphsurg._problems import Problem, Site

# folding c * w out of float32 sums into a bias: summation-order round-off, a few ulps of the
# largest output
EXACT_RTOL = 1e-5
OPSET = 17


class Graph:
    """A small ONNX graph under construction (weights as initializers or Constant nodes)."""

    def __init__(self, *, const_nodes: bool = False, seed: int = 0) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.const_nodes = const_nodes
        self.rng = np.random.default_rng(seed)
        self.n = 0

    def name(self, base: str) -> str:
        self.n += 1
        return f"{base}_{self.n}"

    def const(self, a: np.ndarray, base: str = "w") -> str:
        name = self.name(base)
        t = numpy_helper.from_array(np.asarray(a), name)
        if self.const_nodes:
            self.nodes.append(helper.make_node("Constant", [], [name], value=t,
                                               name=f"{name}_const"))
        else:
            self.inits.append(t)
        return name

    def op(self, op: str, inputs: list[str], **attrs: object) -> str:
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def w(self, *shape: int, scale: float = 0.5) -> np.ndarray:
        return (self.rng.standard_normal(shape) * scale).astype(np.float32)

    def conv(self, x: str, w: np.ndarray, b: np.ndarray | None, *, transpose: bool = False,
             reshape_bias: bool = False, **attrs: object) -> str:
        """Conv / ConvTranspose; ``reshape_bias``: bias as ``Add(conv, Reshape(b, [1,C,1,1]))``
        (Paddle2ONNX)."""
        op = "ConvTranspose" if transpose else "Conv"
        if b is None or not reshape_bias:
            ins = [x, self.const(w)] + ([] if b is None else [self.const(b, "b")])
            return self.op(op, ins, **attrs)
        y = self.op(op, [x, self.const(w)], **attrs)
        rb = self.op("Reshape", [self.const(b, "b"),
                                 self.const(np.array([1, -1, 1, 1], np.int64), "shape")])
        return self.op("Add", [y, rb])

    def model(self, out: str, x_shape: tuple[int, ...], out_rank: int = 4) -> onnx.ModelProto:
        g = helper.make_graph(
            self.nodes, "coupling",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *x_shape[1:]])],
            [helper.make_tensor_value_info(out, TensorProto.FLOAT,
                                           [f"d{i}" for i in range(out_rank)])], self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)])
        m.ir_version = 8
        onnx.checker.check_model(m, full_check=True)
        return m


def dead_layer(g: Graph, c_out: int, c_in: int, k: int, dead: list[int], *,
               value: float = 0.0, transpose: bool = False, groups: int = 1,
               ) -> tuple[np.ndarray, np.ndarray]:
    """Weights whose ``dead`` output channels are the constant ``value`` after a ReLU (their
    weights are 0, their bias ``value`` or -1 for 0)."""
    if transpose:
        w = g.w(c_in, c_out // groups, k, k)
        per = c_out // groups
        for u in dead:
            w[(u // per) * (c_in // groups):(u // per + 1) * (c_in // groups), u % per] = 0
    else:
        w = g.w(c_out, c_in // groups, k, k)
        w[dead] = 0
    b = np.full(c_out, 0.5, np.float32) + g.w(c_out, scale=0.1)
    b[dead] = value if value > 0 else -1.0
    return w, b


def calib(shape: tuple[int, ...], n: int = 6, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(n)]


def run_apply(m: onnx.ModelProto, shape: tuple[int, ...]
              ) -> tuple[onnx.ModelProto, SurgeryResult, dict[str, int]]:
    """``gso.apply`` with the defaults; the model after, the result and units removed per
    kept site (site address -> count); checked exact on held-out inputs and full_check."""
    out, res = gso.apply(m, calib(shape))
    removed = {v.site: v.details["width_before"] - v.details["width_after"]
               for v in res.kept_at("excise_dead")}
    full_check(out)
    assert_same_outputs(m, out, calib(shape, n=1, seed=99)[0], EXACT_RTOL)
    return out, res, removed


def refuse(m: onnx.ModelProto, value: str, units: list[int], const: float) -> str:
    """The reason :func:`excise_site` refuses the units of ``value`` constant at ``const``
    (written as the applier reads the evidence: the detector flags non-zero constant units as
    saturation, not as dead); asserts that nothing was changed."""
    model = ir.serde.deserialize_model(m)
    p = Problem("DeadNeurons", Site("layer", value, "relu", "onnx"), 0.5, units=tuple(units),
                evidence={"constant": units, "constant_values": [const] * len(units),
                          "channel_dim": 1})
    excised: dict[str, set[int]] = {}
    with pytest.raises(Refused) as e:
        excise_site(model, p, excised, batches=calib(X))
    assert excised == {}
    after = ir.serde.serialize_model(model)
    assert shapes(after) == shapes(m) and op_types(after) == op_types(m)
    return str(e.value)


def reasons(res: SurgeryResult) -> list[str]:
    return [r for _, r in res.plan.untreated] + [r["reason"] for r in res.rolled_back]


def shapes(m: onnx.ModelProto) -> list[tuple[int, ...]]:
    """The weight shapes of the Conv / ConvTranspose nodes (initializers or Constant nodes)."""
    consts = {t.name: tuple(t.dims) for t in m.graph.initializer}
    consts.update({n.output[0]: tuple(n.attribute[0].t.dims) for n in m.graph.node
                   if n.op_type == "Constant"})
    return sorted(consts[n.input[1]] for n in m.graph.node
                  if n.op_type in ("Conv", "ConvTranspose"))


X = (8, 4, 8, 8)


# -- ConvTranspose -------------------------------------------------------------------------
@pytest.mark.parametrize("groups", [1, 2])
def test_conv_transpose_as_producer(groups: int) -> None:
    """ConvTranspose (4 -> 6, stride 2) whose output channels 1 and 4 are dead (one per group
    when grouped) -> Relu -> Conv 3x3 padded: both lose the channels."""
    g = Graph(const_nodes=groups == 2)
    w, b = dead_layer(g, 6, 4, 2, [1, 4], transpose=True, groups=groups)
    h = g.op("Relu", [g.conv("x", w, b, transpose=True, strides=[2, 2], group=groups)])
    y = g.conv(h, g.w(5, 6, 3, 3), g.w(5), pads=[1, 1, 1, 1])
    m = g.model(y, X)
    out, res, removed = run_apply(m, X)
    assert list(removed.values()) == [2]
    assert op_types(out) == ["ConvTranspose", "Relu", "Conv"]
    assert shapes(out) == [(4, 4 // groups, 2, 2), (5, 4, 3, 3)]


def test_conv_transpose_as_consumer() -> None:
    """Conv -> Relu (channels 0 and 3 dead, 0) -> ConvTranspose: its input rows go."""
    g = Graph()
    w, b = dead_layer(g, 6, 4, 3, [0, 3])
    h = g.op("Relu", [g.conv("x", w, b, pads=[1, 1, 1, 1])])
    y = g.conv(h, g.w(6, 3, 2, 2), g.w(3), transpose=True, strides=[2, 2])
    m = g.model(y, X)
    out, res, removed = run_apply(m, X)
    assert list(removed.values()) == [2]
    assert shapes(out) == [(4, 3, 2, 2), (4, 4, 3, 3)]


def test_conv_transpose_refuses_a_nonzero_constant() -> None:
    """A constant 0.7 channel spread by a stride-2 ConvTranspose is not a bias (borders and
    stride phases see different kernel taps): refused, naming the node."""
    g = Graph()
    w, b = dead_layer(g, 6, 4, 3, [2], value=0.7)
    h = g.op("Relu", [g.conv("x", w, b, pads=[1, 1, 1, 1])])
    y = g.conv(h, g.w(6, 3, 3, 3), g.w(3), transpose=True, strides=[2, 2])
    why = refuse(g.model(y, X), h, [2], 0.7)
    assert "ConvTranspose 'convtranspose_" in why and "only a zero constant folds" in why


# -- squeeze-and-excitation gate -----------------------------------------------------------
def se_block(g: Graph, value: float) -> tuple[str, str]:
    """Conv 1x1 -> Relu (units 2 and 5 constant ``value``) = A; A * HardSigmoid(Conv(Relu(
    Conv(GlobalAveragePool(A))))) -> Conv 1x1. Returns (output, gate conv's output)."""
    w, b = dead_layer(g, 8, 4, 1, [2, 5], value=value)
    a = g.op("Relu", [g.conv("x", w, b, reshape_bias=True)])
    s = g.op("GlobalAveragePool", [a])
    s = g.op("Relu", [g.conv(s, g.w(4, 8, 1, 1), np.full(4, 2.0, np.float32),
                             reshape_bias=True)])
    gate = g.op("HardSigmoid", [g.conv(s, g.w(8, 4, 1, 1), g.w(8), reshape_bias=True)],
                alpha=1 / 6, beta=0.5)
    y = g.op("Mul", [a, gate])
    return g.conv(y, g.w(3, 8, 1, 1), g.w(3)), gate


def test_se_gate_passes_zero_units() -> None:
    """Dead (0) units of the gated branch: 0 * gate = 0; the channel leaves A's conv, the
    squeeze conv's input, the excitation conv's output rows and the last conv."""
    g = Graph(const_nodes=True)
    y, _ = se_block(g, 0.0)
    m = g.model(y, X)
    out, res, removed = run_apply(m, X)
    assert sorted(removed.values()) == [2]
    assert shapes(out) == [(3, 6, 1, 1), (4, 6, 1, 1), (6, 4, 1, 1), (6, 4, 1, 1)]
    assert op_types(out).count("Mul") == 1 and "HardSigmoid" in op_types(out)


def test_se_gate_of_a_nonzero_constant_is_excised_exactly() -> None:
    """Units constant at 0.8 before the gate are 0.8 * gate after it (varying per image): the
    last conv loses their columns and their gated contribution is added back from the gate's
    removed channels (Gather -> 1x1 Conv -> Add); outputs equal within EXACT_RTOL."""
    g = Graph(const_nodes=True)
    y, _ = se_block(g, 0.8)
    m = g.model(y, X)
    relu = next(n.output[0] for n in m.graph.node if n.op_type == "Relu")
    model = ir.serde.deserialize_model(m)
    p = Problem("DeadNeurons", Site("layer", relu, "relu", "onnx"), 0.5, units=(2, 5),
                evidence={"constant": [2, 5], "constant_values": [0.8, 0.8], "channel_dim": 1})
    excised: dict[str, set[int]] = {}
    excise_site(model, p, excised, batches=calib(X))
    out = ir.serde.serialize_model(model)
    full_check(out)
    assert (3, 6, 1, 1) in shapes(out)  # the last conv lost the two columns
    assert "Gather" in op_types(out)
    assert_same_outputs(m, out, calib(X, n=1, seed=99)[0], EXACT_RTOL)


# -- residual Add --------------------------------------------------------------------------
def residual(g: Graph, dead_b: list[int]) -> tuple[onnx.ModelProto, str, str]:
    """A = Relu(Conv1 x) (units 1, 3 dead); B = Relu(Conv2 A) (units ``dead_b`` dead);
    Conv3(A + B). Returns the model and the two Relu outputs."""
    w1, b1 = dead_layer(g, 6, 4, 3, [1, 3])
    a = g.op("Relu", [g.conv("x", w1, b1, pads=[1, 1, 1, 1])])
    w2, b2 = dead_layer(g, 6, 6, 3, dead_b)
    bb = g.op("Relu", [g.conv(a, w2, b2, pads=[1, 1, 1, 1])])
    y = g.conv(g.op("Add", [a, bb]), g.w(2, 6, 1, 1), g.w(2))
    return g.model(y, X), a, bb


def _site(m: onnx.ModelProto, value: str) -> tuple[ir.Model, object]:
    d = gso.analyze(m, calib(X))
    (p,) = [p for p in d.of_kind("DeadNeurons") if p.site.node == value]
    return ir.serde.deserialize_model(m), p


def test_residual_add_constant_in_every_branch() -> None:
    """Units 1 and 3 are 0 in both branches of the sum: both producers lose them (the other
    branch measured on the calibration batches), the sum's consumer too; the other branch's
    site is recorded as excised."""
    m, a, bb = residual(Graph(), [1, 3])
    model, p = _site(m, a)
    excised: dict[str, set[int]] = {}
    done = excise_site(model, p, excised, batches=calib(X))
    assert done.units == [1, 3] and list(done.joined.values()) == [[1, 3]]
    assert any(k.endswith(bb) for k in excised) and len(excised) == 2
    out = ir.serde.serialize_model(model)
    full_check(out)
    assert shapes(out) == [(2, 4, 1, 1), (4, 4, 3, 3), (4, 4, 3, 3)]
    assert_same_outputs(m, out, calib(X, n=1, seed=99)[0], EXACT_RTOL)


def test_residual_add_through_apply() -> None:
    """The same residual model through ``gso.apply``: the library applier hands the
    calibration batches to the edit, so the units dead in both branches are removed (before:
    refused, "no calibration batches")."""
    m, _a, _bb = residual(Graph(), [1, 3])
    out, res, removed = run_apply(m, X)
    assert sum(removed.values()) == 2, res.summary()
    assert shapes(out) == [(2, 4, 1, 1), (4, 4, 3, 3), (4, 4, 3, 3)]


def test_residual_add_refuses_a_varying_branch() -> None:
    m, a, bb = residual(Graph(), [0])
    model, p = _site(m, a)
    excised: dict[str, set[int]] = {}
    with pytest.raises(Refused, match=r"residual Add 'add_\d+' couples the units with another "
                                      rf"branch \('{bb}'\) that is not constant on them \(units "
                                      r"\[1, 3\] vary"):
        excise_site(model, p, excised, batches=calib(X))
    assert excised == {}
    # without calibration batches the branch cannot be measured: refused, said so
    with pytest.raises(Refused, match="no calibration batches"):
        excise_site(model, p, excised)


# -- channel-preserving layout ops ---------------------------------------------------------
def test_resize_pad_slice_then_conv() -> None:
    """Relu (units 0, 2 dead) -> Resize x2 (nearest) -> Pad 1 (constant 0) -> Slice on H, W
    -> Conv 3x3: the constants pass, the Conv loses the channels."""
    g = Graph()
    w, b = dead_layer(g, 6, 4, 1, [0, 2])
    h = g.op("Relu", [g.conv("x", w, b)])
    h = g.op("Resize", [h, "", g.const(np.array([1, 1, 2, 2], np.float32), "scales")],
             mode="nearest")
    h = g.op("Pad", [h, g.const(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads")])
    h = g.op("Slice", [h, g.const(np.array([1, 1], np.int64), "s"),
                       g.const(np.array([17, 17], np.int64), "e"),
                       g.const(np.array([2, 3], np.int64), "a")])
    y = g.conv(h, g.w(3, 6, 3, 3), g.w(3))
    m = g.model(y, X)
    out, res, removed = run_apply(m, X)
    assert list(removed.values()) == [2]
    assert op_types(out) == ["Conv", "Relu", "Resize", "Pad", "Slice", "Conv"]
    assert shapes(out) == [(3, 4, 3, 3), (4, 4, 1, 1)]


def test_reshape_transpose_keep_the_channel_axis() -> None:
    """Relu (units 1, 5 dead) -> Reshape [0, 6, -1] -> Transpose [0, 2, 1] -> MatMul: the
    Reshape's channel dim and the MatMul's rows shrink."""
    g = Graph()
    w, b = dead_layer(g, 6, 4, 1, [1, 5])
    h = g.op("Relu", [g.conv("x", w, b)])
    h = g.op("Reshape", [h, g.const(np.array([0, 6, -1], np.int64), "shape")])
    h = g.op("Transpose", [h], perm=[0, 2, 1])
    y = g.op("MatMul", [h, g.const(g.w(6, 5), "proj")])
    m = g.model(y, X, out_rank=3)
    out, res, removed = run_apply(m, X)
    assert list(removed.values()) == [2]
    init = {tuple(t.dims) for t in out.graph.initializer}
    assert (4, 5) in init and (4, 4, 1, 1) in init
    reshape = next(n for n in out.graph.node if n.op_type == "Reshape")
    target = next(t for t in out.graph.initializer if t.name == reshape.input[1])
    assert numpy_helper.to_array(target).tolist() == [0, 4, -1]


def test_depthwise_conv_passes_the_bias() -> None:
    """Relu (units 1, 4 dead) -> depthwise Conv 3x3 padded (those groups see 0: their output
    is their bias) -> Relu -> Conv 1x1 (the bias constant is folded into its bias)."""
    g = Graph()
    w, b = dead_layer(g, 6, 4, 1, [1, 4])
    h = g.op("Relu", [g.conv("x", w, b)])
    h = g.op("Relu", [g.conv(h, g.w(6, 1, 3, 3), g.w(6) + 0.5, pads=[1, 1, 1, 1], group=6)])
    y = g.conv(h, g.w(3, 6, 1, 1), g.w(3))
    m = g.model(y, X)
    out, res, removed = run_apply(m, X)
    assert list(removed.values()) == [2]
    assert shapes(out) == [(3, 4, 1, 1), (4, 1, 3, 3), (4, 4, 1, 1)]
    dw = next(n for n in out.graph.node if n.op_type == "Conv" and
              any(a.name == "group" for a in n.attribute))
    assert helper.get_attribute_value(next(a for a in dw.attribute if a.name == "group")) == 4


def test_decomposed_hardswish_site() -> None:
    """Conv -> x * Clip(x + 3, 0, 6) / 6 (HardSwish as Paddle2ONNX writes it; units 0 and 3
    have x = -5: 0) -> Conv: the site is the product; its conv loses the units."""
    g = Graph(const_nodes=True)
    w, b = dead_layer(g, 6, 4, 1, [0, 3])
    b[[0, 3]] = -5.0
    x = g.conv("x", w, b, reshape_bias=True)
    t = g.op("Clip", [g.op("Add", [x, g.const(np.array(3.0, np.float32), "three")]),
                      g.const(np.array(0.0, np.float32), "lo"),
                      g.const(np.array(6.0, np.float32), "hi")])
    h = g.op("Mul", [x, g.op("Div", [t, g.const(np.array(6.0, np.float32), "six")])])
    y = g.conv(h, g.w(3, 6, 3, 3), g.w(3), pads=[1, 1, 1, 1])
    m = g.model(y, X)
    out, res, removed = run_apply(m, X)
    assert list(removed.values()) == [2]
    assert shapes(out) == [(3, 4, 3, 3), (4, 4, 1, 1)]


# -- refusals of the layout ops (units constant at 0.9) -----------------------------------
def _refused(build) -> str:  # type: ignore[no-untyped-def]
    g = Graph()
    w, b = dead_layer(g, 6, 4, 1, [0, 2], value=0.9)
    relu = g.op("Relu", [g.conv("x", w, b)])
    h = build(g, relu)
    return refuse(g.model(g.conv(h, g.w(3, 6, 1, 1), g.w(3)), X), relu, [0, 2], 0.9)


def test_pad_with_zero_refuses_a_nonzero_constant() -> None:
    # a Pad read directly by a Conv is excised with the border's map added back
    # (test_excise_prelu_pad.py); read by anything else, the border is not constant
    why = _refused(lambda g, h: g.op("Relu", [g.op(
        "Pad", [h, g.const(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads")])]))
    assert "Pad 'pad_" in why and "pads with 0, not the units' constant 0.9" in why


def test_layout_ops_on_the_channel_axis_are_refused() -> None:
    why = _refused(lambda g, h: g.op(
        "Pad", [h, g.const(np.array([0, 1, 0, 0, 0, 0, 0, 0], np.int64), "pads")], mode="edge"))
    assert "Pad 'pad_" in why and "pads the channel axis" in why
    why = _refused(lambda g, h: g.op("Slice", [
        h, g.const(np.array([0], np.int64), "s"), g.const(np.array([6], np.int64), "e"),
        g.const(np.array([1], np.int64), "a")]))
    assert "Slice 'slice_" in why and "slices the channel axis" in why
    why = _refused(lambda g, h: g.op("Resize", [
        h, "", g.const(np.array([1, 1, 2, 2], np.float32), "scales")],
        coordinate_transformation_mode="tf_crop_and_resize"))
    assert "Resize 'resize_" in why and "extrapolation value" in why


def test_reshape_that_mixes_the_channel_axis_is_refused() -> None:
    why = _refused(lambda g, h: g.op("Reshape", [
        g.op("Reshape", [h, g.const(np.array([0, 3, -1], np.int64), "shape")]),
        g.const(np.array([0, 6, 8, 8], np.int64), "back")]))
    assert "Reshape 'reshape_" in why and "does not keep the channel axis" in why


def test_tanh_gelu_with_pow_is_an_elementwise_producer_region() -> None:
    """tanh-form GELU as GPT-2/Phi/GPT-J export it computes x**3 with ``Pow``: the units
    still come from the MatMul before it. Before: refused, "produced by ... (op Pow)"."""
    import math

    import torch

    class TanhGeluMLP(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = torch.nn.Linear(8, 16), torch.nn.Linear(16, 3)
            with torch.no_grad():
                self.fc1.weight[[2, 5, 11]] = 0.0
                self.fc1.bias[[2, 5, 11]] = -30.0  # gelu(-30) = 0: dead

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.fc1(x)
            h = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi)
                                          * (h + 0.044715 * torch.pow(h, 3.0))))
            return self.fc2(h)

    torch.manual_seed(0)
    buf = __import__("io").BytesIO()
    torch.onnx.export(TanhGeluMLP(), (torch.randn(4, 8),), buf, dynamo=False,
                      input_names=["x"], dynamic_axes={"x": {0: "b"}})
    m = onnx.load_from_string(buf.getvalue())
    assert "Pow" in op_types(m)
    out, res, removed = run_apply(m, (32, 8))
    assert sum(removed.values()) == 3, res.summary()


def test_gpt2_conv1d_reshapes_around_the_layers() -> None:
    """GPT-2's Conv1D exports as ``Reshape(x, [-1, d]) -> MatMul -> Add -> Reshape(y, [B, T,
    -1])`` with the targets computed from ``Shape`` (legacy exporter): the Reshape after the
    layer keeps the units on the last axis, and the consumer's ``x.view(-1, x.size(-1))``
    reads the new width. Before: refused, "produced by '/fc/Reshape_1' (op Reshape)"."""
    import math

    import torch

    class Conv1D(torch.nn.Module):
        def __init__(self, d_in: int, d_out: int) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(d_in, d_out) * 0.3)
            self.bias = torch.nn.Parameter(torch.randn(d_out) * 0.1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, t, _ = x.shape
            return (x.view(-1, x.shape[-1]) @ self.weight + self.bias).view(b, t, -1)

    class MLP(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.proj = Conv1D(8, 16), Conv1D(16, 8)
            with torch.no_grad():
                self.fc.weight[:, [2, 5, 11]] = 0.0
                self.fc.bias[[2, 5, 11]] = -30.0  # gelu(-30) = 0: dead

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.fc(x)
            h = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi)
                                          * (h + 0.044715 * torch.pow(h, 3.0))))
            return x + self.proj(h)

    torch.manual_seed(0)
    buf = __import__("io").BytesIO()
    torch.onnx.export(MLP(), (torch.randn(2, 5, 8),), buf, dynamo=False, input_names=["x"],
                      dynamic_axes={"x": {0: "b", 1: "t"}})
    m = onnx.load_from_string(buf.getvalue())
    assert op_types(m).count("Reshape") == 4
    out, res, removed = run_apply(m, (4, 5, 8))
    assert sum(removed.values()) == 3, res.summary()
    weights = {t.name: tuple(t.dims) for t in out.graph.initializer}
    assert weights["fc.weight"] == (8, 13) and weights["proj.weight"] == (13, 8)


def conv1d_mlp(target: list[int]) -> tuple[onnx.ModelProto, str]:
    """``x [N, 5, 8] -> Reshape [-1, 8] -> MatMul -> Add -> Reshape target -> Relu ->
    Reshape [-1, 16] -> MatMul``, units 2, 5, 11 of the first layer dead; the Relu's output."""
    g = Graph(seed=3)
    w, b = g.w(8, 16), g.w(16)
    w[:, [2, 5, 11]], b[[2, 5, 11]] = 0.0, -1.0
    h = g.op("Reshape", ["x", g.const(np.array([-1, 8], np.int64), "shape")])
    h = g.op("Add", [g.op("MatMul", [h, g.const(w)]), g.const(b, "b")])
    a = g.op("Relu", [g.op("Reshape", [h, g.const(np.array(target, np.int64), "shape")])])
    h = g.op("Reshape", [a, g.const(np.array([-1, 16], np.int64), "shape")])
    return g.model(g.op("MatMul", [h, g.const(g.w(16, 3))]), (4, 5, 8), out_rank=2), a


def test_conv1d_reshape_keeping_the_last_axis() -> None:
    m, _ = conv1d_mlp([-1, 5, 16])
    out, res, removed = run_apply(m, (4, 5, 8))
    assert sum(removed.values()) == 3, res.summary()


@pytest.mark.parametrize("target", [[-1, 5, 4, 4], [-1, 80]])
def test_conv1d_reshape_that_moves_the_units_is_refused(target: list[int]) -> None:
    m, a = conv1d_mlp(target)
    model = ir.serde.deserialize_model(m)
    p = Problem("DeadNeurons", Site("layer", a, "relu", "onnx"), 0.5, units=(2, 5, 11),
                evidence={"constant": [2, 5, 11], "constant_values": [0.0] * 3})
    with pytest.raises(Refused) as e:
        excise_site(model, p, {})
    assert "Reshape 'reshape_" in str(e.value), str(e.value)
    assert "does not keep the units on the last axis" in str(e.value)
    assert op_types(ir.serde.serialize_model(model)) == op_types(m)
