"""Decomposed activations, gated units and linear-like layers on ONNX (issue 14 class 1/3,
issue 15 "Recognise decomposed activations"), read with the same pattern table as torch.

Exports use the legacy exporter (``dynamo=False``) at opset 17, where GELU is Erf-form and
tanh-GELU / QuickGELU / x*sigmoid(x) / HardSwish stay in pieces. Each test fails on the code
before this change (5b5ac34^): the pieces were either no site (Erf GELU, Clip/Div/Mul
HardSwish) or a saturating Tanh/Sigmoid site with no producer.
"""

from __future__ import annotations

import io

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from graphsurg.passes.onnx.adapter import OnnxAdapter
from torch import nn

from graphsurg import onnx as gso
from graphsurg._config import DiagnoseConfig
from tests.diagnose.test_sites import DEAD, DECOMPOSED, MLP, SameConv, _plant_rows


def _export(m: nn.Module, x: torch.Tensor) -> onnx.ModelProto:
    buf = io.BytesIO()
    torch.onnx.export(m.eval(), (x,), buf, dynamo=False, opset_version=17, input_names=["x"],
                      dynamic_axes={"x": {0: "b"}})
    return onnx.load_from_string(buf.getvalue())


def _feeds(shape: tuple[int, ...]) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(3)]


@pytest.mark.parametrize("name", sorted(DECOMPOSED))
def test_decomposed_activation_is_one_onnx_site(name: str) -> None:
    torch.manual_seed(0)
    m = MLP(DECOMPOSED[name])
    _plant_rows(m.fc1.weight, m.fc1.bias, DEAD)
    proto = _export(m, torch.randn(4, 8))
    ops = {n.op_type for n in proto.graph.node}
    assert not ops & {"Gelu", "HardSwish"}  # really decomposed
    d = gso.analyze(proto, _feeds((64, 8)))
    assert not [p for p in d.problems if p.kind == "Saturation"], d.summary()
    (p,) = [p for p in d.problems if p.kind == "DeadNeurons"]
    assert (p.site.module, p.site.op, p.units, p.site.ir) == ("/fc1/Gemm", name, DEAD, "onnx")
    # the inner Tanh / Sigmoid / Erf are no sites
    adapter, _ = OnnxAdapter.open(proto)
    sites = adapter.observe(_feeds((16, 8)), DiagnoseConfig()).sites
    assert [(s.module, s.op) for s in sites] == [("/fc1/Gemm", name), ("/fc2/Gemm", "linear")]


def test_conv_permute_units_on_onnx() -> None:
    """A Transpose between Conv and Relu: the Conv stays the producer, units last."""
    torch.manual_seed(0)
    m = SameConv(permute=True)
    _plant_rows(m.conv.weight, m.conv.bias, DEAD)
    proto = _export(m, torch.randn(2, 3, 6, 6))
    adapter, _ = OnnxAdapter.open(proto)
    (s,) = [s for s in adapter.observe(_feeds((4, 3, 6, 6)), DiagnoseConfig()).sites
            if s.op == "relu"]
    assert (s.module, s.channel_dim, s.stats.channels) == ("/conv/Conv", -1, 16)
    d = gso.analyze(proto, _feeds((4, 3, 6, 6)))
    (p,) = [p for p in d.problems if p.kind == "DeadNeurons"]
    assert (p.site.module, p.units) == ("/conv/Conv", DEAD)


class Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(8, 32, bias=False)
        self.up = nn.Linear(8, 32, bias=False)
        self.down = nn.Linear(32, 4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gate(x)
        return self.down(g * torch.sigmoid(g) * self.up(x))


def test_gated_unit_and_matmul_weight_on_onnx() -> None:
    """SwiGLU exported as MatMul (weight (d_in, d_out)) + x*Sigmoid(x) + Mul: one site, the
    product, producer the gate MatMul, partner the up MatMul; weights oriented (d_out, d_in)."""
    torch.manual_seed(0)
    m = Gated()
    _plant_rows(m.gate.weight, None, DEAD)
    proto = _export(m, torch.randn(4, 8))
    adapter, _ = OnnxAdapter.open(proto)
    meas = adapter.observe(_feeds((16, 8)), DiagnoseConfig())
    assert sorted((lm.module, lm.d_out, lm.d_in) for lm in meas.layers) == [
        ("/down/MatMul", 4, 32), ("/gate/MatMul", 32, 8), ("/up/MatMul", 32, 8)]
    (s,) = [s for s in meas.sites if s.family == "relu"]
    assert (s.module, s.op, s.partner) == ("/gate/MatMul", "swiglu", "/up/MatMul")
    d = gso.analyze(proto, _feeds((64, 8)))
    (p,) = [p for p in d.problems if p.kind == "DeadNeurons"]
    assert (p.site.module, p.units) == ("/gate/MatMul", DEAD)


# -- design is not disease on ONNX (issue 14 class 6): the parallel path read from the graph --
class _Residual(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.inner(x)  # type: ignore[no-any-return]


def _bottleneck(residual: bool) -> nn.Module:
    torch.manual_seed(0)
    mid: nn.Module = nn.Sequential(nn.Linear(64, 4), nn.Tanh(), nn.Linear(4, 64))
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), _Residual(mid) if residual else mid,
                         nn.Tanh(), nn.Linear(64, 16))


def test_onnx_narrow_layer_with_a_residual_path_is_not_a_bottleneck() -> None:
    """The width-4 layer has a residual add around it: information flows past it (was
    "Bottleneck narrow" on ONNX, whose layers carried no ``bypassed``); without the add it is
    found, with ``bypassed`` False in its evidence."""
    feeds = _feeds((128, 32))
    d = gso.analyze(_export(_bottleneck(True), torch.randn(4, 32)), feeds)
    assert not [p for p in d.problems if p.kind == "Bottleneck"], d.summary()
    d = gso.analyze(_export(_bottleneck(False), torch.randn(4, 32)), feeds)
    (p,) = [p for p in d.problems if p.kind == "Bottleneck"]
    assert p.evidence["reason"] == "narrow" and p.evidence["bypassed"] is False


class _Attention(nn.Module):
    """One query projection of 32, one key/value head of 8 (grouped-query attention)."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(32, 32, bias=False)
        self.k = nn.Linear(32, 8, bias=False)
        self.v = nn.Linear(32, 8, bias=False)
        self.o = nn.Linear(32, 32, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q(x).view(b, t, 4, 8).transpose(1, 2)
        k = self.k(x).unsqueeze(1).expand(b, 4, t, 8)
        v = self.v(x).unsqueeze(1).expand(b, 4, t, 8)
        a = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1) @ v
        return self.o(a.transpose(1, 2).reshape(b, t, 32))  # type: ignore[no-any-return]


def test_onnx_bypassed_layers_match_torch() -> None:
    """Key and value projections meet the query projection in attention's MatMuls; the
    squeeze-excite reduce/expand convs meet ``h`` in the gate Mul. Shapes (Shape/Reshape) are
    no parallel path."""
    from graphsurg.passes.fx.capture import capture, find_sites
    from graphsurg.passes.fx.structure import bypassed_layers as fx_bypassed
    from graphsurg.passes.fx.structure import layer_nodes_of
    from graphsurg.passes.onnx.observe import _floating_of
    from graphsurg.passes.onnx.observe import find_sites as onnx_sites
    from graphsurg.passes.onnx.structure import bypassed_layers

    from tests.diagnose.test_detectors import SEBlock

    for model, x, names in (
        (_Attention(), torch.randn(2, 5, 32), {"q": "/q/MatMul", "k": "/k/MatMul",
                                                "v": "/v/MatMul", "o": "/o/MatMul"}),
        (SEBlock(), torch.randn(2, 3, 8, 8), {"conv": "/conv/Conv", "reduce": "/reduce/Conv",
                                               "expand": "/expand/Conv", "head": "/head/Gemm"}),
    ):
        cap = capture(model, (x,), {})
        assert cap.gm is not None
        want = fx_bypassed(cap.gm, layer_nodes_of(find_sites(cap.gm)[0]))
        buf = io.BytesIO()
        torch.onnx.export(model.eval(), (x,), buf, dynamo=False, opset_version=17,
                          input_names=["x"])
        m = ir.serde.deserialize_model(onnx.load_from_string(buf.getvalue()))
        layers, _ = onnx_sites(m)
        got = bypassed_layers(m.graph, {ls.module: ls.node for ls in layers}, _floating_of(m))
        assert {t: got[o] for t, o in names.items()} == want, (got, want)
