"""tf2onnx-style graphs (issue 15, "Producers and opsets"), built with ``onnx.helper``.

tf2onnx is not installable here, so the graphs are written the way it writes a Keras model:
an NHWC input with symbolic dims (``unk__12``), ``Transpose`` to NCHW before each ``Conv``
and back to NHWC after, a ``Reshape`` flatten of the channels-last tensor, ``MatMul`` +
``Add`` bias, ``:0`` value names, weights as initializers or as ``Constant`` nodes; and a
Keras ``Conv1D`` as tf2onnx writes it (``Unsqueeze`` -> Conv -> ``Squeeze``, axes as an
attribute at opset 11 and as an input at 13).

Dead units are planted (zero weights, bias -1e3 before a Relu). ``graphsurg.onnx.apply``
must excise every site, the parameter count must drop by exactly the planted units' weights,
and onnxruntime's outputs on held-out inputs must equal a float64 numpy evaluation of the
*original* graph within 1e-5 relative to the output's largest magnitude
(``max|y - ref| <= 1e-5 * max|ref|``).

Constant-node weights come back as initializers under the Constant's output name (the
Constant nodes are gone), with the excised shapes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphsurg import onnx as gso

RTOL = 1e-5
PREFIX = "StatefulPartitionedCall/model"


@dataclass(frozen=True)
class Spec:
    """A Keras-like CNN: convs (3x3, pad 1) of ``convs`` channels on an ``hw`` x ``hw`` x 3
    NHWC image, flatten, dense ``dense`` + Relu, dense 4; dead units per layer."""

    convs: tuple[int, ...] = (6,)
    dense: int = 12
    hw: int = 5
    dead_convs: tuple[tuple[int, ...], ...] = ((1, 4),)
    dead_dense: tuple[int, ...] = (0, 3, 7)
    const_nodes: bool = False
    symbolic_hw: bool = False
    #: the convs' activation: Relu (dead units 0) or Elu (dead units -1, a non-zero constant)
    conv_act: str = "Relu"

    def params(self, drop: bool = False) -> int:
        """The parameter count, with the dead units absent when ``drop``."""
        widths = [c - (len(d) if drop else 0) for c, d in zip(self.convs, self.dead_convs,
                                                            strict=True)]
        d = self.dense - (len(self.dead_dense) if drop else 0)
        n, cin = 0, 3
        for c in widths:
            n += c * cin * 9 + c
            cin = c
        return n + self.hw * self.hw * cin * d + d + d * 4 + 4  # int64 targets do not count


def _value(name: str, dims: Sequence[int | str] | None) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT,
                                         None if dims is None else list(dims))


def build(spec: Spec) -> onnx.ModelProto:
    """The tf2onnx-style graph of ``spec`` (opset 13, tf2onnx's producer and names)."""
    rng = np.random.default_rng(0)
    inits: dict[str, np.ndarray] = {}
    nodes: list[onnx.NodeProto] = []
    x, cin = "input_1", 3
    for i, (c, dead) in enumerate(zip(spec.convs, spec.dead_convs, strict=True)):
        layer = f"{PREFIX}/conv2d{'_' + str(i) if i else ''}"
        w = (rng.standard_normal((c, cin, 3, 3)) * 0.3).astype(np.float32)
        b = (rng.standard_normal(c) * 0.1).astype(np.float32)
        w[list(dead)], b[list(dead)] = 0.0, -1e3
        wn, bn = f"{layer}/Conv2D/ReadVariableOp:0", f"{layer}/BiasAdd/ReadVariableOp:0"
        inits[wn], inits[bn] = w, b
        nodes += [
            helper.make_node("Transpose", [x], [f"{layer}/Conv2D__6:0"], perm=[0, 3, 1, 2],
                             name=f"{layer}/Conv2D__6"),
            helper.make_node("Conv", [f"{layer}/Conv2D__6:0", wn, bn], [f"{layer}/BiasAdd:0"],
                             pads=[1, 1, 1, 1], kernel_shape=[3, 3], name=f"{layer}/BiasAdd"),
            helper.make_node(spec.conv_act, [f"{layer}/BiasAdd:0"], [f"{layer}/Relu:0"],
                             name=f"{layer}/Relu"),
            helper.make_node("Transpose", [f"{layer}/Relu:0"], [f"{layer}/Relu__8:0"],
                             perm=[0, 2, 3, 1], name=f"{layer}/Relu__8"),
        ]
        x, cin = f"{layer}/Relu__8:0", c
    flat = spec.hw * spec.hw * cin
    w2 = (rng.standard_normal((flat, spec.dense)) * 0.1).astype(np.float32)
    # live units fire on most inputs (a positive bias), so only the planted ones are dead
    b2 = rng.uniform(0.5, 1.0, spec.dense).astype(np.float32)
    w2[:, list(spec.dead_dense)], b2[list(spec.dead_dense)] = 0.0, -1e3
    w3 = (rng.standard_normal((spec.dense, 4)) * 0.3).astype(np.float32)
    b3 = (rng.standard_normal(4) * 0.1).astype(np.float32)
    d1, d2 = f"{PREFIX}/dense", f"{PREFIX}/dense_1"
    inits.update({f"{d1}/MatMul/ReadVariableOp:0": w2, f"{d1}/BiasAdd/ReadVariableOp:0": b2,
                  f"{d2}/MatMul/ReadVariableOp:0": w3, f"{d2}/BiasAdd/ReadVariableOp:0": b3,
                  "const_fold_opt__7": np.array([-1, flat], np.int64)})
    nodes += [
        helper.make_node("Reshape", [x, "const_fold_opt__7"], [f"{PREFIX}/flatten/Reshape:0"],
                         name=f"{PREFIX}/flatten/Reshape"),
        helper.make_node("MatMul", [f"{PREFIX}/flatten/Reshape:0",
                                    f"{d1}/MatMul/ReadVariableOp:0"], [f"{d1}/MatMul:0"],
                         name=f"{d1}/MatMul"),
        helper.make_node("Add", [f"{d1}/MatMul:0", f"{d1}/BiasAdd/ReadVariableOp:0"],
                         [f"{d1}/BiasAdd:0"], name=f"{d1}/BiasAdd"),
        helper.make_node("Relu", [f"{d1}/BiasAdd:0"], [f"{d1}/Relu:0"], name=f"{d1}/Relu"),
        helper.make_node("MatMul", [f"{d1}/Relu:0", f"{d2}/MatMul/ReadVariableOp:0"],
                         [f"{d2}/MatMul:0"], name=f"{d2}/MatMul"),
        helper.make_node("Add", [f"{d2}/MatMul:0", f"{d2}/BiasAdd/ReadVariableOp:0"],
                         ["dense_1"], name=f"{d2}/BiasAdd"),
    ]
    hw: Sequence[int | str] = ("unk__13", "unk__14") if spec.symbolic_hw else (spec.hw,
                                                                                spec.hw)
    return _model(nodes, inits, [_value("input_1", ["unk__12", *hw, 3])],
                  [_value("dense_1", ["unk__15", 4])], spec.const_nodes, 13)


def _model(nodes: list[onnx.NodeProto], inits: dict[str, np.ndarray],
           inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto],
           const_nodes: bool, opset: int) -> onnx.ModelProto:
    if const_nodes:  # tf2onnx, Paddle2ONNX and older exporters keep weights in Constants
        nodes = [helper.make_node("Constant", [], [k], value=numpy_helper.from_array(v, k),
                                  name=f"{k}_const") for k, v in inits.items()] + nodes
        initializers = []
    else:
        initializers = [numpy_helper.from_array(v, k) for k, v in inits.items()]
    g = helper.make_graph(nodes, "tf2onnx", inputs, outputs, initializers)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset),
                                            helper.make_opsetid("ai.onnx.ml", 2)],
                          producer_name="tf2onnx", producer_version="1.16.1")
    onnx.checker.check_model(m)
    return m


# -- a float64 numpy evaluation of these graphs ----------------------------------------------
def _conv(x: np.ndarray, w: np.ndarray, b: np.ndarray, pads: Sequence[int]) -> np.ndarray:
    n = len(pads) // 2
    xp = np.pad(x, [(0, 0), (0, 0), *zip(pads[:n], pads[n:], strict=True)])
    win = np.lib.stride_tricks.sliding_window_view(xp, w.shape[2:], axis=tuple(range(2, 2 + n)))
    letters = "hwij"[:n] + "klmn"[:n]
    out = np.einsum(f"nc{letters[:n]}{letters[n:]},mc{letters[n:]}->nm{letters[:n]}", win, w)
    return out + b.reshape(1, -1, *([1] * n))


def reference(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> np.ndarray:
    """The graph's single output in float64 (the ops these tests use, nothing else)."""
    env: dict[str, np.ndarray] = {k: v.astype(np.float64) for k, v in feed.items()}
    env.update({t.name: numpy_helper.to_array(t) for t in model.graph.initializer})
    for node in model.graph.node:
        a = {at.name: helper.get_attribute_value(at) for at in node.attribute}
        xs = [env[i] for i in node.input]
        op = node.op_type
        if op == "Constant":
            y = numpy_helper.to_array(a["value"])
        elif op == "Transpose":
            y = xs[0].transpose(a["perm"])
        elif op == "Conv":
            y = _conv(xs[0], xs[1].astype(np.float64), xs[2].astype(np.float64), a["pads"])
        elif op == "Relu":
            y = np.maximum(xs[0], 0.0)
        elif op == "Elu":  # alpha 1
            y = np.where(xs[0] > 0, xs[0], np.expm1(np.minimum(xs[0], 0.0)))
        elif op == "Reshape":
            y = xs[0].reshape([int(s) for s in xs[1]])
        elif op == "MatMul":
            y = xs[0] @ xs[1].astype(np.float64)
        elif op == "Add":
            y = xs[0] + xs[1].astype(np.float64)
        elif op in ("Squeeze", "Unsqueeze"):
            axes = tuple(int(i) for i in (xs[1] if len(xs) > 1 else a["axes"]))
            y = np.squeeze(xs[0], axes) if op == "Squeeze" else np.expand_dims(xs[0], axes)
        else:
            raise AssertionError(f"reference: op {op} not modelled")
        env[node.output[0]] = y
    return env[model.graph.output[0].name]


def run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> np.ndarray:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])
    return sess.run(None, feed)[0]


def assert_matches_reference(model: onnx.ModelProto, original: onnx.ModelProto,
                             feed: dict[str, np.ndarray]) -> None:
    ref = reference(original, feed)
    got = run(model, feed)
    assert got.shape == ref.shape
    err = float(np.abs(got - ref).max())
    assert err <= RTOL * float(np.abs(ref).max()), f"max error {err:.3g} vs scale " \
        f"{float(np.abs(ref).max()):.3g}"


def images(seed: int, n: int = 16, hw: int = 5) -> dict[str, np.ndarray]:
    return {"input_1": np.random.default_rng(seed).uniform(-1, 1, (n, hw, hw, 3)).astype(
        np.float32)}


CALIB = [images(i) for i in range(3)]
HELD_OUT = [images(100 + i, n=8) for i in range(2)]


def _apply(m: onnx.ModelProto, spec: Spec) -> tuple[onnx.ModelProto, object]:
    out, res = gso.apply(m, CALIB)
    assert isinstance(out, onnx.ModelProto)
    return out, res


def _kept(res: object) -> dict[str, int]:
    return {v.site: v.details["width_before"] - v.details["width_after"]
            for v in res.kept_at("excise_dead")}  # type: ignore[attr-defined]


# -- tests -----------------------------------------------------------------------------------
@pytest.mark.parametrize("const_nodes", [False, True], ids=["initializers", "constants"])
def test_analyze_finds_the_conv_and_dense_sites(const_nodes: bool) -> None:
    spec = Spec(const_nodes=const_nodes)
    d = gso.analyze(build(spec), CALIB)
    found = {p.site.module: sorted(p.evidence["dead"]) for p in d.of_kind("DeadNeurons")}
    assert found == {f"{PREFIX}/conv2d/BiasAdd": [1, 4], f"{PREFIX}/dense/MatMul": [0, 3, 7]}


@pytest.mark.parametrize("const_nodes", [False, True], ids=["initializers", "constants"])
def test_apply_excises_the_channels_last_flatten_exactly(const_nodes: bool) -> None:
    """The conv's units reach the dense layer through Transpose to NHWC and a Reshape
    flatten: unit ``c`` is rows ``{p * C + c}`` of the MatMul weight."""
    spec = Spec(const_nodes=const_nodes)
    m = build(spec)
    out, res = _apply(m, spec)
    assert not res.rolled_back, res.rolled_back  # type: ignore[attr-defined]
    assert sorted(_kept(res).values()) == [2, 3]
    assert res.size["params_before"] == spec.params()  # type: ignore[attr-defined]
    assert res.size["params_after"] == spec.params(drop=True)  # type: ignore[attr-defined]
    inits = {t.name: tuple(t.dims) for t in out.graph.initializer}
    assert inits[f"{PREFIX}/dense/MatMul/ReadVariableOp:0"] == (5 * 5 * 4, 9)
    assert inits[f"{PREFIX}/conv2d/Conv2D/ReadVariableOp:0"] == (4, 3, 3, 3)
    if const_nodes:  # written back as initializers, under the Constant's output name
        assert not [n for n in out.graph.node if n.op_type == "Constant"]
    onnx.checker.check_model(out, full_check=True)
    for feed in HELD_OUT:
        assert_matches_reference(m, m, feed)  # the float64 reference models the graph
        assert_matches_reference(out, m, feed)


def test_non_zero_constants_fold_through_the_channels_last_flatten() -> None:
    """Elu units dead at -1: the MatMul rows at their flat NHWC positions are removed and
    what they contributed (-1 times those rows) folds into the dense bias; other rows
    would change the outputs."""
    spec = Spec(conv_act="Elu")
    m = build(spec)
    out, res = _apply(m, spec)
    assert not res.rolled_back, res.rolled_back  # type: ignore[attr-defined]
    assert sorted(_kept(res).values()) == [2, 3]
    assert res.size["params_after"] == spec.params(drop=True)  # type: ignore[attr-defined]
    for feed in HELD_OUT:
        assert_matches_reference(out, m, feed)


@pytest.mark.parametrize("const_nodes", [False, True], ids=["initializers", "constants"])
def test_two_conv_stack_through_transpose_pairs(const_nodes: bool) -> None:
    """conv -> Relu -> Transpose NHWC -> Transpose NCHW -> conv: the first conv's units
    cross tf2onnx's Transpose pair into the second conv (padded, constant 0 folds)."""
    spec = Spec(convs=(6, 5), dead_convs=((0, 5), (2,)), const_nodes=const_nodes)
    m = build(spec)
    out, res = _apply(m, spec)
    assert not res.rolled_back, res.rolled_back  # type: ignore[attr-defined]
    assert _kept(res) == {f"{PREFIX}/conv2d/BiasAdd:{PREFIX}/conv2d/Relu:0": 2,
                          f"{PREFIX}/conv2d_1/BiasAdd:{PREFIX}/conv2d_1/Relu:0": 1,
                          f"{PREFIX}/dense/MatMul:{PREFIX}/dense/Relu:0": 3}
    assert res.size["params_before"] - res.size["params_after"] == (  # type: ignore[attr-defined]
        spec.params() - spec.params(drop=True))
    for feed in HELD_OUT:
        assert_matches_reference(out, m, feed)


def test_unknown_trailing_dims_refuse_the_flatten() -> None:
    """With H and W symbolic the flat positions of a unit cannot be known: the conv site is
    refused naming the Reshape, the dense site is still excised."""
    spec = Spec(symbolic_hw=True)
    m = build(spec)
    out, res = _apply(m, spec)
    assert list(_kept(res)) == [f"{PREFIX}/dense/MatMul:{PREFIX}/dense/Relu:0"]
    (rb,) = res.rolled_back  # type: ignore[attr-defined]
    assert f"Reshape '{PREFIX}/flatten/Reshape': input shape unknown" in rb["reason"]
    for feed in HELD_OUT:
        assert_matches_reference(out, m, feed)


def conv1d(opset: int, dead: Sequence[int] = (1, 6)) -> onnx.ModelProto:
    """Keras Conv1D + Relu as tf2onnx writes it: [N, T, C] -> Unsqueeze(1) -> Transpose NCHW
    -> Conv (1x3) -> Relu -> Transpose NHWC -> Squeeze(1) -> [N, T, C'] -> Unsqueeze(2)
    -> MatMul + Add on the channel axis (last). Axes: attribute at opset 11, input at 13."""
    rng = np.random.default_rng(0)
    c, cin, d = 8, 3, 5
    w = (rng.standard_normal((c, cin, 1, 3)) * 0.3).astype(np.float32)
    b = (rng.standard_normal(c) * 0.1).astype(np.float32)
    w[list(dead)], b[list(dead)] = 0.0, -1e3
    inits = {"conv1d/w:0": w, "conv1d/b:0": b,
             "dense/w:0": (rng.standard_normal((c, d)) * 0.3).astype(np.float32),
             "dense/b:0": (rng.standard_normal(d) * 0.1).astype(np.float32)}

    def axes(op: str, x: str, y: str, ax: list[int]) -> onnx.NodeProto:
        if opset < 13:
            return helper.make_node(op, [x], [y], axes=ax, name=y[:-2])
        inits[f"{y[:-2]}/axes:0"] = np.array(ax, np.int64)
        return helper.make_node(op, [x, f"{y[:-2]}/axes:0"], [y], name=y[:-2])

    nodes = [axes("Unsqueeze", "input_1", "conv1d/ExpandDims:0", [1]),
             helper.make_node("Transpose", ["conv1d/ExpandDims:0"], ["conv1d/T0:0"],
                              perm=[0, 3, 1, 2], name="conv1d/T0"),
             helper.make_node("Conv", ["conv1d/T0:0", "conv1d/w:0", "conv1d/b:0"],
                              ["conv1d/Conv2D:0"], pads=[0, 1, 0, 1], kernel_shape=[1, 3],
                              name="conv1d/Conv2D"),
             helper.make_node("Relu", ["conv1d/Conv2D:0"], ["conv1d/Relu:0"],
                              name="conv1d/Relu"),
             helper.make_node("Transpose", ["conv1d/Relu:0"], ["conv1d/T1:0"],
                              perm=[0, 2, 3, 1], name="conv1d/T1"),
             axes("Squeeze", "conv1d/T1:0", "conv1d/Squeeze:0", [1]),
             axes("Unsqueeze", "conv1d/Squeeze:0", "dense/ExpandDims:0", [2]),
             helper.make_node("MatMul", ["dense/ExpandDims:0", "dense/w:0"], ["dense/MatMul:0"],
                              name="dense/MatMul"),
             helper.make_node("Add", ["dense/MatMul:0", "dense/b:0"], ["output_0"],
                              name="dense/BiasAdd")]
    return _model(nodes, inits, [_value("input_1", ["unk__12", 7, cin])],
                  [_value("output_0", ["unk__13", 7, 1, d])], False, opset)


@pytest.mark.parametrize("opset", [11, 13])
def test_conv1d_squeeze_unsqueeze_keep_the_channel_axis(opset: int) -> None:
    m = conv1d(opset)
    rng = np.random.default_rng(5)
    calib = [{"input_1": rng.uniform(-1, 1, (16, 7, 3)).astype(np.float32)} for _ in range(3)]
    out, res = gso.apply(m, calib)
    assert not res.rolled_back, res.rolled_back
    assert _kept(res) == {"conv1d/Conv2D:conv1d/Relu:0": 2}
    assert res.size["params_before"] - res.size["params_after"] == 2 * (3 * 3 + 1) + 2 * 5
    assert out.opset_import[0].version == opset
    for i in range(2):
        feed = {"input_1": np.random.default_rng(200 + i).uniform(-1, 1, (8, 7, 3)).astype(
            np.float32)}
        assert_matches_reference(out, m, feed)


def if_branch_model() -> onnx.ModelProto:
    """Dense -> Relu read inside both branches of an If (``Squeeze`` of a size-1 axis in one,
    ``Identity`` in the other, as the torch exporter writes ``x.squeeze(0)`` under a dynamic
    shape, Silero VAD's decoder), whose result a dense layer reads."""
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((6, 8)) * 0.5).astype(np.float32)
    b1 = rng.uniform(0.5, 1.0, 8).astype(np.float32)
    w1[:, [2, 5]], b1[[2, 5]] = 0.0, -1e3
    inits = {"w1": w1, "b1": b1, "w2": (rng.standard_normal((8, 3)) * 0.5).astype(np.float32),
             "zero": np.array([0], np.int64), "one": np.array(1, np.int64)}
    then = helper.make_graph(
        [helper.make_node("Squeeze", ["h", "zero"], ["sq"], name="dec/Squeeze")], "then", [],
        [_value("sq", None)])
    other = helper.make_graph(
        [helper.make_node("Identity", ["h"], ["id"], name="dec/Identity")], "else", [],
        [_value("id", None)])
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["mm"], name="enc/MatMul"),
             helper.make_node("Add", ["mm", "b1"], ["pre"], name="enc/Add"),
             helper.make_node("Relu", ["pre"], ["h"], name="enc/Relu"),
             helper.make_node("Shape", ["x"], ["shape"], name="dec/Shape"),
             helper.make_node("Gather", ["shape", "zero"], ["n"], name="dec/Gather"),
             helper.make_node("Equal", ["n", "one"], ["single"], name="dec/Equal"),
             helper.make_node("Squeeze", ["single"], ["cond"], name="dec/Cond"),
             helper.make_node("If", ["cond"], ["dec"], then_branch=then, else_branch=other,
                              name="dec/If"),
             helper.make_node("MatMul", ["dec", "w2"], ["y"], name="head/MatMul")]
    return _model(nodes, inits, [_value("x", ["n", 4, 6])], [_value("y", ["n", 4, 3])], False, 13)


def test_units_leaving_an_if_branch_are_refused_naming_the_if() -> None:
    m = if_branch_model()
    rng = np.random.default_rng(3)
    calib = [{"x": rng.uniform(-1, 1, (8, 4, 6)).astype(np.float32)} for _ in range(3)]
    d = gso.analyze(m, calib)
    assert [sorted(p.evidence["dead"]) for p in d.of_kind("DeadNeurons")] == [[2, 5]]
    out, res = gso.apply(m, calib)
    assert not _kept(res)
    (rb,) = res.rolled_back
    assert "If 'dec/If' returns the units from its " in rb["reason"], rb["reason"]
    assert "read by MatMul 'head/MatMul'" in rb["reason"]
    assert res.size["params_after"] == res.size["params_before"]
