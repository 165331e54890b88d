"""ONNX excision on the structures real exporters write for MobileNetV2 / EfficientNet /
ALBERT (the conformance failures of issue 14), each on a small graph built with
``onnx.helper``:

* a depthwise chain (expand 1x1 -> depthwise 3x3 -> project 1x1): the depthwise conv's site
  excised on its own (its groups go, and with them the expand conv's rows), and after the
  expand site's edit already removed the same channels (the second site is a no-op, not an
  out-of-range index);
* ``Pad`` whose pads are computed at run time (the legacy exporter's "same" padding chain
  ``ConstantOfShape -> Concat -> Reshape -> Slice -> Transpose -> Reshape -> Cast``, with
  entries read from ``Shape``): the channel axis is proven unpadded, or the site is refused;
* squeeze-and-excitation with ``ReduceMean`` (the dynamo exporter's squeeze);
* a weight shared by two layers (ALBERT's one FFN): edited once and kept shared, or refused.

Every kept edit is checked against a float64 reference of the original model (torch /
numpy): ``max |y - ref| <= TOL * max(1, max |ref|)`` with ``TOL = 1e-5`` on held-out inputs.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from graphsurg.passes.onnx.excise_dead_units import excise_site
from onnx import TensorProto, helper, numpy_helper

from graphsurg import onnx as gso
from graphsurg._errors import Refused
from graphsurg._problems import Problem, Site
from tests.onnx.test_onnx_coupling import Graph

TOL = 1e-5  # float32 round-off of the folded sums against a float64 reference
OPSET = 18
DEAD = [1, 4]
BIG = np.iinfo(np.int64).max


class G(Graph):
    """test_onnx_coupling's graph builder, with the input shape given whole (symbolic dims
    allowed), opset 18 and IR 9."""

    def model(self, out: str, x_shape: list[object], out_rank: int = 4  # type: ignore[override]
              ) -> onnx.ModelProto:
        g = helper.make_graph(
            self.nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
            [helper.make_tensor_value_info(out, TensorProto.FLOAT,
                                           [f"d{i}" for i in range(out_rank)])], self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)])
        m.ir_version = 9
        onnx.checker.check_model(m, full_check=True)
        return m


def dead_conv(g: G, c_out: int, c_in: int, value: float = 0.0
              ) -> tuple[np.ndarray, np.ndarray]:
    """A 1x1 conv whose ``DEAD`` channels are ``value`` after a ReLU (zero rows, bias -1 for
    0, else ``value``)."""
    w, b = g.w(c_out, c_in, 1, 1), g.w(c_out, scale=0.1) + 0.5
    w[DEAD] = 0
    b[DEAD] = value if value > 0 else -1.0
    return w, b


def feeds(shape: tuple[int, ...], n: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(n)]


def run(m: onnx.ModelProto | ir.Model, feed: dict[str, np.ndarray]) -> np.ndarray:
    proto = ir.serde.serialize_model(m) if isinstance(m, ir.Model) else m
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(proto.SerializeToString(), opts).run(None, feed)[0]


def assert_close_to_reference(m: onnx.ModelProto | ir.Model,
                              ref: Callable[[np.ndarray], np.ndarray],
                              shape: tuple[int, ...]) -> None:
    for feed in feeds(shape, 2, seed=99):  # held out: not the calibration batches
        y, r = run(m, feed).astype(np.float64), ref(feed["x"].astype(np.float64))
        assert y.shape == r.shape
        err = float(np.abs(y - r).max())
        assert err <= TOL * max(1.0, float(np.abs(r).max())), err


def conv_weights(m: ir.Model) -> dict[str, tuple[tuple[int, ...], int]]:
    """Conv node name -> (weight shape, group)."""
    out = {}
    for n in m.graph:
        if n.op_type == "Conv":
            g = n.attributes.get("group")
            out[n.name] = (tuple(n.inputs[1].const_value.shape), 1 if g is None else g.as_int())
    return out


def n_params(m: ir.Model) -> int:
    return sum(int(np.prod(v.const_value.shape)) for v in m.graph.initializers.values()
               if v.const_value is not None and v.const_value.dtype.is_floating_point())


def hand_problem(module: str, value: str, units: list[int], consts: np.ndarray,
                 width: int) -> Problem:
    """A DeadNeurons problem as the detector writes it (by hand where the detector calls a
    non-zero constant saturation)."""
    return Problem("DeadNeurons", Site(module, value, "relu", "onnx"), 0.5, units=tuple(units),
                   evidence={"constant": units, "constant_values": [float(c) for c in consts],
                             "channel_dim": 1, "width": width})


def detected(m: onnx.ModelProto, value: str, shape: tuple[int, ...]) -> Problem:
    d = gso.analyze(m, feeds(shape, 6, seed=0))
    (p,) = [p for p in d.of_kind("DeadNeurons") if p.site.node == value]
    assert sorted(p.evidence["constant"]) == DEAD
    return p


# -- depthwise chain ---------------------------------------------------------------------
X = (4, 4, 6, 6)


def depthwise_chain() -> tuple[onnx.ModelProto, dict[str, str], Callable[[np.ndarray],
                                                                          np.ndarray], dict]:
    g = G()
    we, be = dead_conv(g, 6, 4)
    wd, bd = g.w(6, 1, 3, 3), g.w(6, scale=0.3) + 0.5  # depthwise: bias > 0 keeps it alive
    wp, bp = g.w(3, 6, 1, 1), g.w(3)
    e = g.op("Conv", ["x", g.const(we, "we"), g.const(be, "be")])
    a = g.op("Relu", [e])
    d = g.op("Conv", [a, g.const(wd, "wd"), g.const(bd, "bd")], group=6, pads=[1, 1, 1, 1])
    r = g.op("Relu", [d])
    y = g.op("Conv", [r, g.const(wp, "wp"), g.const(bp, "bp")])

    def ref(x: np.ndarray) -> np.ndarray:
        t = {k: torch.from_numpy(v.astype(np.float64)) for k, v in
             dict(we=we, be=be, wd=wd, bd=bd, wp=wp, bp=bp).items()}
        h = F.relu(F.conv2d(torch.from_numpy(x), t["we"], t["be"]))
        h = F.relu(F.conv2d(h, t["wd"], t["bd"], padding=1, groups=6))
        return F.conv2d(h, t["wp"], t["bp"]).numpy()

    return g.model(y, ["N", 4, 6, 6], 4), {"e": e, "a": a, "d": d, "r": r, "y": y}, ref, \
        {"bd": bd}


def test_depthwise_site_alone_removes_its_groups_and_their_input_channels() -> None:
    """The depthwise conv's own site (units constant at relu(bias)): its groups 1 and 4 go
    (group 6 -> 4) and the expand conv loses the rows that fed them; before: refused, "is
    grouped (group=6): removing units [1, 4] leaves the groups uneven or empty"."""
    m, v, ref, w = depthwise_chain()
    model = ir.serde.deserialize_model(m)
    p = hand_problem(v["d"], v["r"], DEAD, np.maximum(w["bd"][DEAD], 0), 6)
    excised: dict[str, set[int]] = {}
    done = excise_site(model, p, excised, batches=feeds(X, 4, seed=0))
    assert done.units == DEAD and (done.width_before, done.width_after) == (6, 4)
    assert conv_weights(model) == {v["e"]: ((4, 4, 1, 1), 1), v["d"]: ((4, 1, 3, 3), 4),
                                   v["y"]: ((3, 4, 1, 1), 1)}
    assert excised[f"{v['e']}:{v['a']}"] == set(DEAD)  # the expand site's units went too
    assert_close_to_reference(model, ref, X)


def test_expand_then_depthwise_site_refer_to_the_same_channels() -> None:
    """The expand site's edit removes the depthwise groups fed by its dead channels (their
    constant relu(bias) folded into the project conv); the depthwise site's units are then
    already gone: a no-op, not "unit 4 is out of range for width 4" (before)."""
    m, v, ref, w = depthwise_chain()
    p1 = detected(m, v["a"], X)
    model = ir.serde.deserialize_model(m)
    excised: dict[str, set[int]] = {}
    done = excise_site(model, p1, excised, batches=feeds(X, 4, seed=0))
    assert done.units == DEAD
    shapes = conv_weights(model)
    p2 = hand_problem(v["d"], v["r"], DEAD, np.maximum(w["bd"][DEAD], 0), 6)
    second = excise_site(model, p2, excised, batches=feeds(X, 4, seed=0))
    assert second.units == [] and second.width_before == second.width_after == 4
    assert conv_weights(model) == shapes == {v["e"]: ((4, 4, 1, 1), 1),
                                             v["d"]: ((4, 1, 3, 3), 4),
                                             v["y"]: ((3, 4, 1, 1), 1)}
    assert_close_to_reference(model, ref, X)


def test_depthwise_site_keeps_partial_groups() -> None:
    """A depthwise conv with 2 outputs per group losing one of them in one group only: its
    input channel is still read and the groups would be uneven, refused with the reason (one
    output of every group goes the grouped way: the groups stay)."""
    g = G()
    we, be = g.w(4, 4, 1, 1), g.w(4)
    wd, bd = g.w(8, 1, 3, 3), g.w(8)
    wd[[1]] = 0
    bd[1] = -1.0
    d = g.op("Conv", [g.op("Relu", [g.op("Conv", ["x", g.const(we), g.const(be)])]),
                      g.const(wd), g.const(bd)], group=4, pads=[1, 1, 1, 1])
    r = g.op("Relu", [d])
    y = g.op("Conv", [r, g.const(g.w(3, 8, 1, 1)), g.const(g.w(3))])
    model = ir.serde.deserialize_model(g.model(y, ["N", 4, 6, 6], 4))
    with pytest.raises(Refused, match=rf"depthwise Conv '{d}' would lose part of a group"):
        excise_site(model, hand_problem(d, r, [1], np.zeros(1), 8), {})


# -- pads computed at run time -------------------------------------------------------------
def runtime_pads(g: G, a: str, *, channel_runtime: bool) -> str:
    """The legacy exporter's "same" padding chain; the spatial pads (1 each side) are read
    from ``Shape(x)`` (unknown until run time: H is symbolic); ``channel_runtime``: the
    channel axis' pads are too."""
    hw = g.op("Shape", ["x"], start=2, end=3)
    one = g.op("Add", [g.op("Sub", [hw, hw]), g.const(np.array([1], np.int64))])  # = [1]
    spatial = g.op("Concat", [one, one, one, one], axis=0)  # torch order (wl, wr, ht, hb)
    zeros = g.op("ConstantOfShape", [g.const(np.array([4], np.int64))],
                 value=numpy_helper.from_array(np.array([0], np.int64)))
    if channel_runtime:  # (N, C) pads also read from the shape: not provable
        zeros = g.op("Concat", [one, one, g.const(np.array([0, 0], np.int64))], axis=0)
    cat = g.op("Concat", [spatial, zeros], axis=0)
    pairs = g.op("Reshape", [cat, g.const(np.array([-1, 2], np.int64))])
    rev = g.op("Slice", [pairs, g.const(np.array([-1], np.int64)),
                         g.const(np.array([-BIG], np.int64)), g.const(np.array([0], np.int64)),
                         g.const(np.array([-1], np.int64))])
    flat = g.op("Reshape", [g.op("Transpose", [rev], perm=[1, 0]),
                            g.const(np.array([-1], np.int64))])
    pads = g.op("Cast", [flat], to=TensorProto.INT64)
    return g.op("Pad", [a, pads, g.const(np.array(0.0, np.float32))], mode="constant")


def pad_model(*, channel_runtime: bool) -> tuple[onnx.ModelProto, dict[str, str],
                                                  Callable[[np.ndarray], np.ndarray]]:
    g = G(seed=1)
    we, be = dead_conv(g, 6, 4)
    wc, bc = g.w(3, 6, 3, 3), g.w(3)
    e = g.op("Conv", ["x", g.const(we), g.const(be)])
    a = g.op("Relu", [e])
    y = g.op("Conv", [runtime_pads(g, a, channel_runtime=channel_runtime), g.const(wc),
                      g.const(bc)])

    def ref(x: np.ndarray) -> np.ndarray:
        h = F.relu(F.conv2d(torch.from_numpy(x), torch.from_numpy(we.astype(np.float64)),
                            torch.from_numpy(be.astype(np.float64))))
        return F.conv2d(F.pad(h, (1, 1, 1, 1)), torch.from_numpy(wc.astype(np.float64)),
                        torch.from_numpy(bc.astype(np.float64))).numpy()

    return g.model(y, ["N", 4, "H", "W"], 4), {"e": e, "a": a, "y": y}, ref


def test_pad_with_runtime_pads_leaving_the_channel_axis() -> None:
    """Pads computed at run time whose channel entries are constant 0: the units pass the
    Pad (their constant 0 is the pad value) into the 3x3 conv; before: refused, "Pad ... has
    non-constant pads"."""
    m, v, ref = pad_model(channel_runtime=False)
    model = ir.serde.deserialize_model(m)
    done = excise_site(model, detected(m, v["a"], X), {}, batches=feeds(X, 4, seed=0))
    assert done.units == DEAD
    assert conv_weights(model) == {v["e"]: ((4, 4, 1, 1), 1), v["y"]: ((3, 4, 3, 3), 1)}
    assert_close_to_reference(model, ref, X)


def test_pad_with_runtime_channel_pads_is_refused() -> None:
    m, v, _ = pad_model(channel_runtime=True)
    model = ir.serde.deserialize_model(m)
    before = conv_weights(model)
    with pytest.raises(Refused, match=r"Pad 'pad_\d+' has pads computed at run time whose "
                                      r"channel-axis entries are not constant"):
        excise_site(model, hand_problem(v["e"], v["a"], DEAD, np.zeros(2), 6), {})
    assert conv_weights(model) == before


# -- squeeze-and-excitation with ReduceMean ----------------------------------------------------
def se_model(axes: list[int], value: float = 0.0, k: int = 1
             ) -> tuple[onnx.ModelProto, dict[str, str], Callable[[np.ndarray], np.ndarray]]:
    """x -> expand 1x1 -> ReLU (a) -> a * sigmoid(X(relu(R(ReduceMean(a))))) -> project
    (``k`` x ``k``, padded when k > 1); units ``DEAD`` of ``a`` are ``value``."""
    g = G(seed=2)
    we, be = dead_conv(g, 6, 4, value)
    wr, br, wx, bx = g.w(2, 6, 1, 1), g.w(2), g.w(6, 2, 1, 1), g.w(6)
    wp, bp = g.w(3, 6, k, k), g.w(3)
    e = g.op("Conv", ["x", g.const(we), g.const(be)])
    a = g.op("Relu", [e])
    s = g.op("ReduceMean", [a, g.const(np.array(axes, np.int64))], keepdims=1)
    rc = g.op("Conv", [s, g.const(wr), g.const(br)])
    xc = g.op("Conv", [g.op("Relu", [rc]), g.const(wx), g.const(bx)])
    gated = g.op("Mul", [a, g.op("Sigmoid", [xc])])
    y = g.op("Conv", [gated, g.const(wp), g.const(bp)], pads=[k // 2] * 4)

    def ref(x: np.ndarray) -> np.ndarray:
        t = {k: torch.from_numpy(v.astype(np.float64)) for k, v in
             dict(we=we, be=be, wr=wr, br=br, wx=wx, bx=bx, wp=wp, bp=bp).items()}
        h = F.relu(F.conv2d(torch.from_numpy(x), t["we"], t["be"]))
        z = F.relu(F.conv2d(h.mean(dim=(2, 3), keepdim=True), t["wr"], t["br"]))
        gate = torch.sigmoid(F.conv2d(z, t["wx"], t["bx"]))
        return F.conv2d(h * gate, t["wp"], t["bp"], padding=k // 2).numpy()

    return g.model(y, ["N", 4, 6, 6], 4), {"e": e, "a": a, "r": rc, "x": xc, "y": y,
                                           "gated": gated}, ref


def test_se_reduce_mean_squeeze_and_gate() -> None:
    """Units 0 before the SE block: the squeeze (ReduceMean over H, W) carries them to the
    reduce conv (a sink), the gate's conv loses their rows, 0 * gate = 0 reaches the project
    conv; through ``gso.apply`` (verified on held-out data). Before: "coupling through
    ReduceMean is not understood"."""
    m, v, ref = se_model([2, 3])
    out, res = gso.apply(m, feeds(X, 6, seed=0))
    assert [len(a.units) for a in res.applied.values()] == [2], res.summary()
    model = ir.serde.deserialize_model(out)
    assert conv_weights(model) == {v["e"]: ((4, 4, 1, 1), 1), v["r"]: ((2, 4, 1, 1), 1),
                                   v["x"]: ((4, 2, 1, 1), 1), v["y"]: ((3, 4, 1, 1), 1)}
    assert_close_to_reference(model, ref, X)


def test_reduce_mean_over_the_channel_axis_is_refused() -> None:
    m, v, _ = se_model([1, 2, 3])
    model = ir.serde.deserialize_model(m)
    with pytest.raises(Refused, match=r"ReduceMean 'reducemean_\d+' reduces the channel axis"):
        excise_site(model, hand_problem(v["e"], v["a"], DEAD, np.zeros(2), 6), {})


def test_se_gate_of_a_nonzero_constant_adds_the_gated_constants_back() -> None:
    """Units constant at 0.8 before the gate (EfficientNet: the depthwise conv's bias through
    BN and SiLU) are ``0.8 * gate`` after it, not constant: the project conv loses their
    columns and gets ``sum P[:, u] * 0.8 * gate_u`` back from the gate's two removed channels
    (Gather -> 1x1 Conv -> Add); the gate's conv keeps its rows. Before: refused, "gates the
    units ... only 0 * gate = 0 passes"."""
    m, v, ref = se_model([2, 3], value=0.8)
    model = ir.serde.deserialize_model(m)
    p = hand_problem(v["e"], v["a"], DEAD, np.full(2, 0.8), 6)
    done = excise_site(model, p, {}, batches=feeds(X, 4, seed=0))
    assert done.units == DEAD
    shapes = conv_weights(model)
    assert shapes[v["e"]] == ((4, 4, 1, 1), 1) and shapes[v["r"]] == ((2, 4, 1, 1), 1)
    assert shapes[v["x"]] == ((6, 2, 1, 1), 1) and shapes[v["y"]] == ((3, 4, 1, 1), 1)
    original = {n.name for n in m.graph.node}
    added = [n.op_type for n in model.graph if n.name not in original]
    assert sorted(added) == ["Add", "Conv", "Gather", "Gather"]
    assert_close_to_reference(model, ref, X)


def test_se_gate_of_a_nonzero_constant_into_a_padded_conv_is_refused() -> None:
    """A 3x3 padded project conv sees the gated constants unevenly at the border: refused."""
    m, v, _ = se_model([2, 3], value=0.8, k=3)
    model = ir.serde.deserialize_model(m)
    with pytest.raises(Refused, match=rf"Mul '{v['gated']}' gates the units .* not read by "
                                      "one ungrouped Conv without padding"):
        excise_site(model, hand_problem(v["e"], v["a"], DEAD, np.full(2, 0.8), 6), {},
                    batches=feeds(X, 4, seed=0))


# -- a weight shared by two layers (ALBERT) --------------------------------------------------
T = (3, 5, 8)


def shared_ffn(*, second_bias_alive: bool) -> tuple[onnx.ModelProto, dict[str, str],
                                                    Callable[[np.ndarray], np.ndarray]]:
    """h1 = relu(x W1 + b1); z = h1 W2 + b2; h2 = relu(z W1 + c1); y = h2 W2 + b2, W1 / W2 /
    b2 shared (the second use of W1 through Identity, as the legacy exporter writes it).
    Units 1 and 4 of W1 are 0; b1 = -1 there (dead at 0), c1 = b1 or, with
    ``second_bias_alive``, +1 there (constant 1 in the second layer)."""
    g = G(seed=3)
    w1, b1, w2, b2 = g.w(8, 16), g.w(16, scale=0.1) + 0.5, g.w(16, 8), g.w(8)
    w1[:, DEAD] = 0
    b1[DEAD] = -1.0
    c1 = b1.copy()
    if second_bias_alive:
        c1[DEAD] = 1.0
    W1, W2, B1, B2 = g.const(w1, "W1"), g.const(w2, "W2"), g.const(b1, "b1"), g.const(b2, "b2")
    C1 = B1 if not second_bias_alive else g.const(c1, "c1")
    m1 = g.op("MatMul", ["x", W1])
    h1 = g.op("Relu", [g.op("Add", [m1, B1])])
    z = g.op("Add", [g.op("MatMul", [h1, W2]), B2])
    m2 = g.op("MatMul", [z, g.op("Identity", [W1])])
    h2 = g.op("Relu", [g.op("Add", [m2, C1])])
    y = g.op("Add", [g.op("MatMul", [h2, W2]), B2])

    def ref(x: np.ndarray) -> np.ndarray:
        f = [a.astype(np.float64) for a in (w1, b1, w2, b2, c1)]
        h = np.maximum(x @ f[0] + f[1], 0) @ f[2] + f[3]
        return np.maximum(h @ f[0] + f[4], 0) @ f[2] + f[3]

    return g.model(y, ["N", 5, 8], 3), {"m1": m1, "h1": h1, "m2": m2, "h2": h2}, ref


def test_shared_weight_edited_once_and_kept_shared() -> None:
    """Both layers reading W1 lose units 1, 4 in one edit: W1 / W2 stay one initializer
    each, the parameter count drops by 2 x (8 + 8) + 2 (before: the edit copied W1 and the
    model grew); the second layer's site is then a no-op."""
    m, v, ref = shared_ffn(second_bias_alive=False)
    model = ir.serde.deserialize_model(m)
    before = n_params(model)
    inits = set(model.graph.initializers)
    excised: dict[str, set[int]] = {}
    done = excise_site(model, detected(m, v["h1"], T), excised, batches=feeds(T, 4, seed=0))
    assert done.units == DEAD
    assert set(model.graph.initializers) == inits  # nothing copied
    assert model.graph.initializers["W1_1"].const_value.shape == (8, 14)
    assert model.graph.initializers["W2_2"].const_value.shape == (14, 8)
    assert before - n_params(model) == 2 * (8 + 8) + 2
    second = excise_site(model, detected(m, v["h2"], T), excised, batches=feeds(T, 4, seed=0))
    assert second.units == []
    assert_close_to_reference(model, ref, T)
    out, res = gso.apply(m, feeds(T, 6, seed=0))  # the real entry point: the model shrinks
    assert res.size["params_before"] - res.size["params_after"] == 2 * (8 + 8) + 2
    assert_close_to_reference(out, ref, T)


def test_shared_weight_with_a_different_constant_at_its_second_use() -> None:
    """The second layer's units are constant 1, not 0: the tied weights W1 / W2 are still
    edited once (kept shared), only the bias b2 the two uses fold different constants into is
    copied (8 numbers, said by its new name)."""
    m, v, ref = shared_ffn(second_bias_alive=True)
    model = ir.serde.deserialize_model(m)
    before = n_params(model)
    done = excise_site(model, detected(m, v["h1"], T), {}, batches=feeds(T, 4, seed=0))
    assert done.units == DEAD
    inits = set(model.graph.initializers)
    assert {"W1_1", "W2_2", "b1_3", "c1_5"} <= inits and len(inits) == 6
    assert model.graph.initializers["W1_1"].const_value.shape == (8, 14)
    assert before - n_params(model) == 2 * (8 + 8) + 2 + 2 - 8
    assert_close_to_reference(model, ref, T)


def test_shared_weight_refused_without_batches_to_measure_its_other_use() -> None:
    """The other layer reading the tied weight must be measured constant on the units;
    without calibration batches the site is refused (nothing changed, nothing copied)."""
    m, v, _ = shared_ffn(second_bias_alive=False)
    model = ir.serde.deserialize_model(m)
    before = n_params(model)
    p = detected(m, v["h1"], T)
    with pytest.raises(Refused, match=rf"layer '{v['m2']}' sharing the weight of '{v['m1']}' "
                                      r"is not constant on the units .*no calibration batches"):
        excise_site(model, p, {})
    assert n_params(model) == before and set(model.graph.initializers) == {
        "W1_1", "W2_2", "b1_3", "b2_4"}


def test_depthwise_multiplier_losing_one_output_of_every_group() -> None:
    """Depthwise with 2 outputs per group, output 1 of each of the 4 groups constant 0: every
    group loses as many, the groups and the input channels stay (8 -> 4 outputs)."""
    g = G(seed=4)
    we, be = g.w(4, 4, 1, 1), g.w(4)
    wd, bd = g.w(8, 1, 3, 3), g.w(8, scale=0.1) + 0.5
    dead = [1, 3, 5, 7]
    wd[dead] = 0
    bd[dead] = -1.0
    wp, bp = g.w(3, 8, 1, 1), g.w(3)
    e = g.op("Conv", ["x", g.const(we), g.const(be)])
    d = g.op("Conv", [g.op("Relu", [e]), g.const(wd), g.const(bd)], group=4, pads=[1, 1, 1, 1])
    r = g.op("Relu", [d])
    y = g.op("Conv", [r, g.const(wp), g.const(bp)])
    model = ir.serde.deserialize_model(g.model(y, ["N", 4, 6, 6], 4))
    excise_site(model, hand_problem(d, r, dead, np.zeros(4), 8), {})
    assert conv_weights(model) == {e: ((4, 4, 1, 1), 1), d: ((4, 1, 3, 3), 4),
                                   y: ((3, 4, 1, 1), 1)}

    def ref(x: np.ndarray) -> np.ndarray:
        t = [torch.from_numpy(a.astype(np.float64)) for a in (we, be, wd, bd, wp, bp)]
        h = F.relu(F.conv2d(torch.from_numpy(x), t[0], t[1]))
        h = F.relu(F.conv2d(h, t[2], t[3], padding=1, groups=4))
        return F.conv2d(h, t[4], t[5]).numpy()

    assert_close_to_reference(model, ref, X)
