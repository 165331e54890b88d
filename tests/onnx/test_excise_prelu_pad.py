"""Three gaps of the ONNX excision (issue 15) on small ``onnx.helper`` graphs:

* PRelu with a per-channel slope is a unit-wise activation (MTCNN): constants flow through
  it (``c if c >= 0 else slope[u] * c``) and the slope loses the removed entries;
* a non-zero constant channel read by a zero-padded Conv (CREPE: ReLU -> BatchNormalization
  makes a dead channel ``k != 0``): the border sees 0 where the interior sees ``k``, so the
  removed channels' contribution is a fixed map added after the Conv (exact in float64);
  refused when the spatial shape is symbolic;
* bfloat16 weights stored behind a Cast keep their stored element type when edited.

Every rewrite is checked against a float64 numpy reference of the original graph on held-out
inputs: ``max|y - ref| <= 1e-5 * max(1, max|ref|)``.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from graphsurg.passes.onnx.excise_dead_units import excise_site
from onnx import TensorProto, helper, numpy_helper

from graphsurg._errors import Refused
from graphsurg._problems import Problem, Site

TOL = 1e-5


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, {"x": x})[0])


def _close(y: np.ndarray, ref: np.ndarray) -> None:
    err = float(np.abs(y.astype(np.float64) - ref).max())
    assert err <= TOL * max(1.0, float(np.abs(ref).max())), err


def _conv_ref(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, pad: int) -> np.ndarray:
    """float64 2-D convolution, stride 1, zero padding ``pad`` on every side."""
    x = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    k = w.shape[2]
    h, wd = x.shape[2] - k + 1, x.shape[3] - k + 1
    out = np.zeros((x.shape[0], w.shape[0], h, wd))
    w64 = w.astype(np.float64)
    for i in range(k):
        for j in range(k):
            out += np.einsum("nchw,oc->nohw", x[:, :, i:i + h, j:j + wd], w64[:, :, i, j])
    return out if b is None else out + b.astype(np.float64)[None, :, None, None]


def _model(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto],
           x_shape: list[int | str], y_shape: list[int | str]) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, x_shape)],
                          [helper.make_tensor_value_info("y", 1, y_shape)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m, full_check=True)
    return m


def _excise(m: onnx.ModelProto, value: str, units: list[int], consts: list[float],
            op: str) -> onnx.ModelProto:
    model = ir.serde.deserialize_model(m)
    p = Problem("DeadNeurons", Site("conv1", value, op, "onnx"), 0.5, units=tuple(units),
                evidence={"constant": units, "constant_values": consts, "channel_dim": 1})
    excise_site(model, p, {})
    out = ir.serde.serialize_model(model)
    onnx.checker.check_model(out, full_check=True)
    return out


def _shapes(m: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    return {t.name: tuple(t.dims) for t in m.graph.initializer}


# -- PRelu ------------------------------------------------------------------------------
DEAD = [1, 4]


@pytest.mark.parametrize("slope_shape", [(6, 1, 1), (1, 6, 1, 1)])
def test_prelu_per_channel_slope_is_unit_wise(slope_shape: tuple[int, ...]) -> None:
    """Conv -> PRelu(slope per channel) -> Conv 1x1: units with a zero weight row and a
    negative bias are constant ``slope[u] * b[u]`` after the PRelu; they go, the slope loses
    the same entries, the next Conv folds ``slope[u] * b[u] * W2[:, u]`` into its bias.
    The old code refused ("units are produced by ... (op PRelu)")."""
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((6, 3, 3, 3)) * 0.4).astype(np.float32)
    b1 = (rng.standard_normal(6) * 0.1).astype(np.float32)
    w1[DEAD] = 0.0
    b1[DEAD] = [-2.0, -0.5]
    slope = np.linspace(0.1, 0.6, 6).astype(np.float32)
    w2 = (rng.standard_normal((4, 6, 1, 1)) * 0.5).astype(np.float32)
    b2 = (rng.standard_normal(4) * 0.1).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in
             ((w1, "W1"), (b1, "B1"), (slope.reshape(slope_shape), "S"), (w2, "W2"),
              (b2, "B2"))]
    nodes = [helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], name="conv1", pads=[1] * 4),
             helper.make_node("PRelu", ["c1", "S"], ["a"], name="prelu"),
             helper.make_node("Conv", ["a", "W2", "B2"], ["y"], name="conv2")]
    m = _model(nodes, inits, ["n", 3, 8, 8], ["n", 4, 8, 8])
    consts = [float(slope[u] * b1[u]) for u in DEAD]
    out = _excise(m, "a", DEAD, consts, "prelu")
    sh = _shapes(out)
    assert sh["W1"] == (4, 3, 3, 3) and sh["W2"] == (4, 4, 1, 1)
    assert sh["S"] == (4, 1, 1) or sh["S"] == (1, 4, 1, 1)
    x = rng.standard_normal((5, 3, 8, 8)).astype(np.float32)
    h = _conv_ref(x, w1, b1, 1)
    s64 = slope.astype(np.float64)[None, :, None, None]
    ref = _conv_ref(np.where(h >= 0, h, s64 * h), w2, b2, 0)
    _close(_run(out, x), ref)
    _close(_run(m, x), ref)


def test_prelu_downstream_of_the_site_carries_the_constants() -> None:
    """Conv -> Relu (site) -> PRelu -> Conv 1x1: the dead units (constant 0.3 after the
    ReLU: zero weights, bias 0.3) pass the PRelu unchanged (c >= 0) and its slope loses
    their entries; a negative constant from a Sub picks its own slope."""
    rng = np.random.default_rng(1)
    w1 = (rng.standard_normal((6, 3, 3, 3)) * 0.4).astype(np.float32)
    b1 = (rng.standard_normal(6) * 0.1).astype(np.float32)
    w1[DEAD] = 0.0
    b1[DEAD] = 0.3
    slope = np.linspace(0.2, 0.7, 6).astype(np.float32).reshape(6, 1, 1)
    w2 = (rng.standard_normal((4, 6, 1, 1)) * 0.5).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in
             ((w1, "W1"), (b1, "B1"), (slope, "S"), (w2, "W2"),
              (np.float32(0.5).reshape(()), "half"))]
    nodes = [helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], name="conv1", pads=[1] * 4),
             helper.make_node("Relu", ["c1"], ["a"], name="relu"),
             helper.make_node("Sub", ["a", "half"], ["d"], name="shift"),
             helper.make_node("PRelu", ["d", "S"], ["p"], name="prelu"),
             helper.make_node("Conv", ["p", "W2"], ["y"], name="conv2")]
    m = _model(nodes, inits, ["n", 3, 8, 8], ["n", 4, 8, 8])
    out = _excise(m, "a", DEAD, [0.3, 0.3], "relu")
    sh = _shapes(out)
    assert sh["S"] == (4, 1, 1) and sh["W2"] == (4, 4, 1, 1)
    x = rng.standard_normal((5, 3, 8, 8)).astype(np.float32)
    d = np.maximum(_conv_ref(x, w1, b1, 1), 0.0) - 0.5
    ref = _conv_ref(np.where(d >= 0, d, slope.astype(np.float64)[None] * d), w2, None, 0)
    _close(_run(out, x), ref)


# -- a constant channel read by a zero-padded Conv ----------------------------------------
def _crepe_like(spatial: list[int | str], pad_node: float | None = None
                ) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """conv1 -> Relu -> BatchNormalization -> conv2 (3x3, zero padding 1): channels DEAD of
    conv1 have zero weights and a negative bias, 0 after the ReLU and
    ``k = bias_bn - mean * scale / sqrt(var + eps) != 0`` after the BatchNormalization.
    ``pad_node``: the padding as an explicit ``Pad`` (that value) before an unpadded conv2,
    the way the legacy exporter writes "same" padding."""
    rng = np.random.default_rng(2)
    p = {"W1": (rng.standard_normal((6, 3, 3, 3)) * 0.4).astype(np.float32),
         "B1": (rng.standard_normal(6) * 0.1).astype(np.float32),
         "scale": rng.uniform(0.5, 1.5, 6).astype(np.float32),
         "bias": rng.uniform(-1.0, 1.0, 6).astype(np.float32),
         "mean": rng.uniform(0.1, 0.5, 6).astype(np.float32),
         "var": rng.uniform(0.5, 2.0, 6).astype(np.float32),
         "W2": (rng.standard_normal((4, 6, 3, 3)) * 0.4).astype(np.float32),
         "B2": (rng.standard_normal(4) * 0.1).astype(np.float32)}
    p["W1"][DEAD] = 0.0
    p["B1"][DEAD] = -1.0
    nodes = [helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], name="conv1", pads=[1] * 4),
             helper.make_node("Relu", ["c1"], ["a"], name="relu"),
             helper.make_node("BatchNormalization", ["a", "scale", "bias", "mean", "var"],
                              ["bn"], name="bn", epsilon=1e-3),
             helper.make_node("Conv", ["bn", "W2", "B2"], ["y"], name="conv2", pads=[1] * 4)]
    inits = [numpy_helper.from_array(a, n) for n, a in p.items()]
    if pad_node is not None:
        nodes[-1:] = [
            helper.make_node("Pad", ["bn", "pads", "pad_value"], ["padded"], name="pad"),
            helper.make_node("Conv", ["padded", "W2", "B2"], ["y"], name="conv2")]
        inits += [numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads"),
                  numpy_helper.from_array(np.array(pad_node, np.float32), "pad_value")]
    return _model(nodes, inits, ["n", 3, *spatial], ["n", 4, *spatial]), p


def _crepe_ref(p: dict[str, np.ndarray], x: np.ndarray, pad_value: float = 0.0
               ) -> np.ndarray:
    a = np.maximum(_conv_ref(x, p["W1"], p["B1"], 1), 0.0)
    c = [p[k].astype(np.float64)[None, :, None, None] for k in ("scale", "bias", "mean", "var")]
    bn = (a - c[2]) / np.sqrt(c[3] + 1e-3) * c[0] + c[1]
    bn = np.pad(bn, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=pad_value)
    return _conv_ref(bn, p["W2"], p["B2"], 0)


def test_constant_channel_into_zero_padded_conv_adds_its_border_map() -> None:
    """The dead channels are removed from conv1, the BatchNormalization and conv2; their
    contribution to conv2 (k on the interior, 0 in the padding: not a bias) comes back as a
    constant [1, 4, 7, 9] map through an Add. The old code refused ("pads its input")."""
    m, p = _crepe_like([7, 9])
    c = {k: p[k].astype(np.float64)[DEAD] for k in ("scale", "bias", "mean", "var")}
    k = c["bias"] - c["mean"] * c["scale"] / np.sqrt(c["var"] + 1e-3)
    assert np.all(np.abs(k) > 1e-3)
    out = _excise(m, "a", DEAD, [0.0, 0.0], "relu")
    sh = _shapes(out)
    assert sh["W1"] == (4, 3, 3, 3) and sh["W2"] == (4, 4, 3, 3) and sh["scale"] == (4,)
    maps = [s for s in sh.values() if s == (1, 4, 7, 9)]
    assert len(maps) == 1, sh
    assert [n.op_type for n in out.graph.node][-1] == "Add"
    x = np.random.default_rng(3).standard_normal((5, 3, 7, 9)).astype(np.float32)
    ref = _crepe_ref(p, x)
    _close(_run(out, x), ref)
    _close(_run(m, x), ref)


@pytest.mark.parametrize("pad_value", [0.0, 0.75])
def test_constant_channel_through_explicit_pad_into_conv(pad_value: float) -> None:
    """The legacy exporter's explicit ``Pad`` (value 0, or another constant) before an
    unpadded conv: the constant channels see the pad value on the border, k inside; the
    same border map is added after the conv. The old code refused ("Pad 'pad' pads with
    0, not the units' constant")."""
    m, p = _crepe_like([6, 5], pad_node=pad_value)
    out = _excise(m, "a", DEAD, [0.0, 0.0], "relu")
    sh = _shapes(out)
    assert sh["W2"] == (4, 4, 3, 3) and [s for s in sh.values() if s == (1, 4, 6, 5)]
    x = np.random.default_rng(6).standard_normal((5, 3, 6, 5)).astype(np.float32)
    ref = _crepe_ref(p, x, pad_value)
    _close(_run(out, x), ref)
    _close(_run(m, x), ref)


def test_padded_conv_input_dims_lost_by_inference_are_measured() -> None:
    """A static-shape model (the runner's exports) whose first Pad takes its pads from a
    Concat (shape inference does not fold it, so every later spatial dim is unknown, as in
    CREPE's legacy export): the conv's input dims are measured on one calibration batch."""
    m, p = _crepe_like([7, 9])
    g = m.graph
    g.node[0].input[0] = "xp"
    g.node.insert(0, helper.make_node("Concat", ["p_lo", "p_hi"], ["p_all"], axis=0,
                                      name="pads_cat"))
    g.node.insert(1, helper.make_node("Pad", ["x", "p_all"], ["xp"], name="pad_in"))
    g.initializer.extend([numpy_helper.from_array(np.array([0, 0, 0, 0], np.int64), "p_lo"),
                          numpy_helper.from_array(np.array([0, 0, 0, 0], np.int64), "p_hi")])
    g.input[0].type.tensor_type.shape.dim[0].dim_value = 5
    g.output[0].type.tensor_type.shape.dim[0].dim_value = 5
    onnx.checker.check_model(m, full_check=True)
    model = ir.serde.deserialize_model(m)
    x = np.random.default_rng(7).standard_normal((5, 3, 7, 9)).astype(np.float32)
    prob = Problem("DeadNeurons", Site("conv1", "a", "relu", "onnx"), 0.5, units=tuple(DEAD),
                   evidence={"constant": DEAD, "constant_values": [0.0, 0.0],
                             "channel_dim": 1})
    excise_site(model, prob, {}, batches=[{"x": x}])
    out = ir.serde.serialize_model(model)
    onnx.checker.check_model(out, full_check=True)
    assert _shapes(out)["W2"] == (4, 4, 3, 3)
    x2 = np.random.default_rng(8).standard_normal((5, 3, 7, 9)).astype(np.float32)
    _close(_run(out, x2), _crepe_ref(p, x2))


def test_constant_channel_into_padded_conv_with_symbolic_shape_is_refused() -> None:
    """With symbolic spatial dims the border map cannot be computed: refused, saying so,
    and nothing changed."""
    m, _ = _crepe_like(["h", "w"])
    model = ir.serde.deserialize_model(m)
    p = Problem("DeadNeurons", Site("conv1", "a", "relu", "onnx"), 0.5, units=tuple(DEAD),
                evidence={"constant": DEAD, "constant_values": [0.0, 0.0], "channel_dim": 1})
    with pytest.raises(Refused) as e:
        excise_site(model, p, {})
    assert "Conv 'conv2' pads its input" in str(e.value) and "symbolic" in str(e.value)
    assert _shapes(ir.serde.serialize_model(model)) == _shapes(m)


# -- bfloat16 weights behind a Cast --------------------------------------------------------
def test_bfloat16_weights_behind_cast_keep_their_type() -> None:
    """x -> MatMul(Cast(W_bf16)) -> Add(Cast(b_bf16)) -> Relu -> MatMul(Cast(V_bf16)): the
    edited W and V stay bfloat16 initializers read through their Cast (half the bytes of
    float32); the old code wrote them back as float32 ``*_gs`` initializers."""
    rng = np.random.default_rng(4)
    w = (rng.standard_normal((16, 12)) * 0.3).astype(ml_dtypes.bfloat16)
    b = np.full(12, 0.25, np.float32)
    b[DEAD] = -100.0
    v = (rng.standard_normal((12, 4)) * 0.3).astype(ml_dtypes.bfloat16)
    b = b.astype(ml_dtypes.bfloat16)
    inits, nodes = [], []
    for name, a in (("W", w), ("b", b), ("V", v)):
        inits.append(helper.make_tensor(name, TensorProto.BFLOAT16, a.shape,
                                        a.view(np.uint16).tobytes(), raw=True))
        nodes.append(helper.make_node("Cast", [name], [name + "_f"], to=TensorProto.FLOAT,
                                      name=f"cast_{name}"))
    nodes += [helper.make_node("MatMul", ["x", "W_f"], ["z"], name="fc1"),
              helper.make_node("Add", ["z", "b_f"], ["h"], name="fc1_bias"),
              helper.make_node("Relu", ["h"], ["a"], name="act"),
              helper.make_node("MatMul", ["a", "V_f"], ["y"], name="fc2")]
    m = _model(nodes, inits, ["n", 16], ["n", 4])
    out = _excise(m, "a", DEAD, [0.0, 0.0], "relu")
    kinds = {t.name: (t.data_type, tuple(t.dims)) for t in out.graph.initializer}
    assert kinds["W"] == (TensorProto.BFLOAT16, (16, 10)), kinds
    assert kinds["V"] == (TensorProto.BFLOAT16, (10, 4)), kinds
    assert kinds["b"] == (TensorProto.BFLOAT16, (10,)), kinds
    assert all(t.data_type == TensorProto.BFLOAT16 for t in out.graph.initializer), kinds
    assert out.ByteSize() < m.ByteSize()
    x = np.random.default_rng(5).standard_normal((8, 16)).astype(np.float32)
    w64, b64, v64 = (a.astype(np.float64) for a in (w, b, v))
    ref = np.maximum(x.astype(np.float64) @ w64 + b64, 0.0) @ v64
    _close(_run(out, x), ref)
    assert math.isfinite(float(np.abs(ref).max()))
