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
