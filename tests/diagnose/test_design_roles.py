"""Design read as disease (issue 14, class 6): a saturating activation's role in the graph.

An output head (a sigmoid that reaches a graph output through no layer) and a gate stuck
open (a squeeze-excite sigmoid at its upper bound) saturate by design: no Saturation problem,
one note naming the site. A gate stuck closed, and saturation planted inside a network, are
still found. Each case on both IRs: torch (the exported graph) and ONNX (onnx.helper graphs).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import graphsurg as gs
from graphsurg import onnx as gso
from graphsurg._problems import Diagnosis

SHUT = (0, 1, 2)  # units planted at a large negative bias: saturated at the lower bound
OPEN = (3, 4, 5)  # ... at a large positive bias: saturated at the upper bound


def _plant(bias: torch.Tensor | np.ndarray, low: tuple[int, ...], high: tuple[int, ...],
           shift: float) -> None:
    for u in low:
        bias[u] = -shift
    for u in high:
        bias[u] = shift


def _saturation(d: Diagnosis) -> dict[str, tuple[int, ...]]:
    return {p.site.module: p.units for p in d.of_kind("Saturation")}


def _notes_naming(d: Diagnosis, text: str) -> list[str]:
    return [n for n in d.notes if text in n and "saturation not reported" in n]


# -- torch -----------------------------------------------------------------------------------
class Mid(nn.Module):
    """Linear -> sigmoid -> Linear: a hidden sigmoid."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 12)
        self.b = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.sigmoid(self.a(x)))  # type: ignore[no-any-return]


class Head(nn.Module):
    """Linear -> tanh -> Linear -> sigmoid (the output head: the model's probabilities)."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(8, 16)
        self.out = nn.Linear(16, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.out(torch.tanh(self.hidden(x))))


class SE(nn.Module):
    """conv -> ReLU -> squeeze-excite (sigmoid gate) -> conv -> pooled linear head."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.reduce = nn.Conv2d(c, 4, 1)
        self.expand = nn.Conv2d(4, c, 1)
        self.post = nn.Conv2d(c, c, 1)
        self.head = nn.Linear(c, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        s = torch.sigmoid(self.expand(torch.relu(self.reduce(h.mean((2, 3), keepdim=True)))))
        return self.head(torch.relu(self.post(h * s)).mean((2, 3)))  # type: ignore[no-any-return]


def _torch_data(shape: tuple[int, ...], n: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=g) for _ in range(n)]


def test_torch_output_head_sigmoid_is_design_and_hidden_tanh_is_found() -> None:
    torch.manual_seed(0)
    m = Head()
    with torch.no_grad():
        _plant(m.out.bias, SHUT, OPEN, 30.0)  # absent classes ~0, certain ones ~1: design
        m.hidden.bias[:4] = 30.0  # a planted hidden saturated tanh: disease
    d = gs.diagnose(m, _torch_data((32, 8)))
    assert d.capture == "export"
    sat = _saturation(d)
    assert "out" not in sat, d.summary()
    assert sat.get("hidden") == (0, 1, 2, 3), d.summary()
    (note,) = _notes_naming(d, "out")
    assert "6/12" in note and "output head" in note
    # the same saturated sigmoid on the way to a layer is neither a head nor a gate: found
    m2 = Mid()
    with torch.no_grad():
        _plant(m2.a.bias, SHUT, OPEN, 30.0)
    d2 = gs.diagnose(m2, _torch_data((32, 8)))
    assert _saturation(d2).get("a") == SHUT + OPEN, d2.summary()
    assert not [n for n in d2.notes if "saturation not reported" in n], d2.notes


@pytest.mark.parametrize(("shut", "opened"), [((), OPEN), (SHUT, OPEN)])
def test_torch_se_gate_open_is_design_closed_is_reported(shut: tuple[int, ...],
                                                         opened: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    m = SE()
    with torch.no_grad():
        _plant(m.expand.bias, shut, opened, 30.0)
    d = gs.diagnose(m, _torch_data((8, 3, 6, 6)))
    sat = _saturation(d)
    if shut:
        assert sat.get("expand") == shut, d.summary()  # a closed gate silences its channel
    else:
        assert "expand" not in sat, d.summary()
    (note,) = _notes_naming(d, "expand")
    assert f"{len(opened)}/16" in note and "gate stuck open" in note


# -- ONNX ------------------------------------------------------------------------------------
def _init(name: str, arr: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(arr.astype(np.float32), name)


def _model(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto],
           x_shape: list[object], outputs: dict[str, list[object]]) -> onnx.ModelProto:
    g = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, sh) for o, sh in outputs.items()], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def _feeds(shape: tuple[int, ...], n: int = 3) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(n)]


def test_onnx_output_head_sigmoid_through_concat_is_design_hidden_tanh_found() -> None:
    """A detector-style head: the Sigmoid over class logits is concatenated with box outputs
    (no producer layer reaches past it to a layer) into the graph output."""
    rng = np.random.default_rng(1)
    w1 = rng.standard_normal((16, 8)) * 0.3
    b1 = np.zeros(16)
    b1[:4] = 30.0  # planted hidden saturated tanh
    b2 = rng.standard_normal(12) * 0.1
    _plant(b2, SHUT, OPEN, 30.0)
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="hidden", transB=1),
        helper.make_node("Tanh", ["h"], ["t"], name="tanh"),
        helper.make_node("Gemm", ["t", "w2", "b2"], ["logits"], name="cls", transB=1),
        helper.make_node("Gemm", ["t", "w3", "b3"], ["boxes"], name="box", transB=1),
        helper.make_node("Sigmoid", ["logits"], ["scores"], name="sig"),
        helper.make_node("Concat", ["boxes", "scores"], ["y"], name="cat", axis=1),
    ]
    inits = [_init("w1", w1), _init("b1", b1),
             _init("w2", rng.standard_normal((12, 16)) * 0.3), _init("b2", b2),
             _init("w3", rng.standard_normal((4, 16)) * 0.3), _init("b3", np.zeros(4))]
    d = gso.analyze(_model(nodes, inits, ["b", 8], {"y": ["b", 16]}), _feeds((32, 8)))
    sat = _saturation(d)
    assert "cls" not in sat, d.summary()
    assert sat.get("hidden") == (0, 1, 2, 3), d.summary()
    (note,) = _notes_naming(d, "cls")
    assert "6/12" in note and "output head" in note


def _se_onnx(bias: np.ndarray, *, gate_feeds_layer: bool = False) -> onnx.ModelProto:
    """conv -> Relu -> GlobalAveragePool -> conv -> Relu -> conv -> HardSigmoid -> Mul -> conv
    (PP-OCR's squeeze-excite); ``gate_feeds_layer``: the gate also feeds a conv (no gate)."""
    rng = np.random.default_rng(2)
    c = 16
    nodes = [
        helper.make_node("Conv", ["x", "wc", "bc"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["h"], name="relu"),
        helper.make_node("GlobalAveragePool", ["h"], ["p"], name="pool"),
        helper.make_node("Conv", ["p", "wr", "br"], ["r"], name="reduce"),
        helper.make_node("Relu", ["r"], ["rr"], name="relu_r"),
        helper.make_node("Conv", ["rr", "we", "be"], ["e"], name="expand"),
        helper.make_node("HardSigmoid", ["e"], ["s"], name="hsig", alpha=0.2, beta=0.5),
        helper.make_node("Mul", ["h", "s"], ["g"], name="gate"),
        helper.make_node("Conv", ["g", "wp", "bp"], ["y"], name="post"),
    ]
    inits = [_init("wc", rng.standard_normal((c, 3, 3, 3)) * 0.3), _init("bc", np.zeros(c)),
             _init("wr", rng.standard_normal((4, c, 1, 1)) * 0.3), _init("br", np.zeros(4)),
             _init("we", rng.standard_normal((c, 4, 1, 1)) * 0.3), _init("be", bias),
             _init("wp", rng.standard_normal((c, c, 1, 1)) * 0.3), _init("bp", np.zeros(c))]
    outputs: dict[str, list[object]] = {"y": ["b", c, 6, 6]}
    if gate_feeds_layer:
        nodes.append(helper.make_node("Conv", ["s", "wz"], ["z"], name="also"))
        inits.append(_init("wz", rng.standard_normal((2, c, 1, 1))))
        outputs["z"] = ["b", 2, 1, 1]
    return _model(nodes, inits, ["b", 3, 6, 6], outputs)


@pytest.mark.parametrize(("shut", "opened"), [((), OPEN), (SHUT, OPEN)])
def test_onnx_se_hardsigmoid_gate_open_is_design_closed_is_reported(
        shut: tuple[int, ...], opened: tuple[int, ...]) -> None:
    bias = np.zeros(16)
    _plant(bias, shut, opened, 10.0)  # HardSigmoid(0.2, 0.5): flat beyond |e| >= 2.5
    d = gso.analyze(_se_onnx(bias), _feeds((8, 3, 6, 6)))
    sat = _saturation(d)
    if shut:
        assert sat.get("expand") == shut, d.summary()
    else:
        assert "expand" not in sat, d.summary()
    (note,) = _notes_naming(d, "expand")
    assert f"{len(opened)}/16" in note and "gate stuck open" in note
    # the same HardSigmoid also read by a conv is no gate: every saturated unit is found
    d2 = gso.analyze(_se_onnx(bias, gate_feeds_layer=True), _feeds((8, 3, 6, 6)))
    assert _saturation(d2).get("expand") == tuple(sorted(shut + opened)), d2.summary()
    assert not [n for n in d2.notes if "saturation not reported" in n], d2.notes


def test_roles_agree_across_irs() -> None:
    """The torch adapter and the ONNX adapter read the same roles off the same model."""
    import io

    from graphsurg.passes.fx.adapter import TorchAdapter
    from graphsurg.passes.onnx.adapter import OnnxAdapter

    from graphsurg._config import DiagnoseConfig

    torch.manual_seed(0)
    for m, shape in ((Head(), (4, 8)), (SE(), (2, 3, 6, 6))):
        x = torch.randn(shape)
        t_sites = TorchAdapter(m).observe([x], DiagnoseConfig()).sites
        buf = io.BytesIO()
        torch.onnx.export(m.eval(), (x,), buf, dynamo=False, opset_version=17,
                          input_names=["x"])
        adapter, _ = OnnxAdapter.open(onnx.load_from_string(buf.getvalue()))
        o_sites = adapter.observe([{"x": x.numpy()}], DiagnoseConfig()).sites
        t_roles = [(s.op, s.role) for s in t_sites if s.family == "saturating"]
        o_roles = [(s.op, s.role) for s in o_sites if s.family == "saturating"]
        assert t_roles == o_roles and t_roles, (t_roles, o_roles)
        assert {r for _, r in t_roles} == ({"", "output"} if isinstance(m, Head) else {"gate"})


def test_onnx_gate_that_flips_between_shut_and_open_is_reported() -> None:
    """A GLU-style gate ``sigmoid(a(x)) * b(x)``: units pinned open are design; units that
    saturate but flip between shut and open with the input are no gate stuck open."""
    rng = np.random.default_rng(3)
    wa = rng.standard_normal((8, 8)) * 0.3
    ba = np.zeros(8)
    ba[:3] = 30.0  # always open
    wa[3:6] = 0.0
    wa[3:6, 0] = 3000.0  # sign of x[:, 0]: shut about half the time, open the rest
    nodes = [
        helper.make_node("Gemm", ["x", "wa", "ba"], ["a"], name="a", transB=1),
        helper.make_node("Sigmoid", ["a"], ["s"], name="sig"),
        helper.make_node("Gemm", ["x", "wb", "bb"], ["b"], name="b", transB=1),
        helper.make_node("Mul", ["s", "b"], ["g"], name="glu"),
        helper.make_node("Gemm", ["g", "wo", "bo"], ["y"], name="out", transB=1),
    ]
    inits = [_init("wa", wa), _init("ba", ba),
             _init("wb", rng.standard_normal((8, 8)) * 0.3), _init("bb", np.zeros(8)),
             _init("wo", rng.standard_normal((2, 8)) * 0.3), _init("bo", np.zeros(2))]
    d = gso.analyze(_model(nodes, inits, ["n", 8], {"y": ["n", 2]}), _feeds((64, 8)))
    assert _saturation(d).get("a") == (3, 4, 5), d.summary()
    (note,) = _notes_naming(d, "a:")
    assert "3/8" in note and "gate stuck open" in note
