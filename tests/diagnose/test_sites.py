"""Sites as authors wrote them, on the torch side (issue 14, classes 1, 3 and 4).

Every test here fails on the code before this change (5b5ac34^): the inner
tanh/sigmoid of a decomposed activation was read as a saturating site with no producer
(Saturation at ``...:tanh``, the dead units not found at their layer), ``addmm`` /
``x @ W.T`` / ``conv2d.padding`` were no layers, and a permute between a conv and its
activation hid the producer. Planted dead units: zero weight rows and a bias of -6, so the
unit's pre-activation is the constant -6 on every input.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from graphsurg.passes.fx.adapter import TorchAdapter
from torch import nn

import graphsurg as gs
from graphsurg._config import DiagnoseConfig

DEAD = (3, 7, 11)

#: decomposed activations as authors write them (HF gelu_new, CLIP's QuickGELU, ...)
DECOMPOSED: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu_tanh": lambda h: 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi)
                                                     * (h + 0.044715 * torch.pow(h, 3)))),
    "quick_gelu": lambda h: h * torch.sigmoid(1.702 * h),
    "silu": lambda h: h * torch.sigmoid(h),
    "gelu": lambda h: h * 0.5 * (1 + torch.erf(h / math.sqrt(2))),
    "hardswish": lambda h: h * F.relu6(h + 3) / 6,
}


class MLP(nn.Module):
    def __init__(self, act: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 32)
        self.fc2 = nn.Linear(32, 4)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _data(shape: tuple[int, ...] = (64, 8), n: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


def _plant_rows(w: torch.Tensor, b: torch.Tensor | None, units: tuple[int, ...]) -> None:
    with torch.no_grad():
        w[list(units)] = 0.0
        if b is not None:
            b[list(units)] = -6.0


def _dead(d: gs.Diagnosis) -> list[gs.Problem]:
    return [p for p in d.problems if p.kind == "DeadNeurons"]


@pytest.mark.parametrize("name", sorted(DECOMPOSED))
def test_decomposed_activation_is_one_site_at_its_layer(name: str) -> None:
    """Before: tanh-GELU / QuickGELU / x*sigmoid(x) gave Saturation at the inner tanh/sigmoid
    with no producer, and erf-GELU / HardSwish pieces no relu-family site at fc1."""
    torch.manual_seed(0)
    m = MLP(DECOMPOSED[name])
    _plant_rows(m.fc1.weight, m.fc1.bias, DEAD)
    d = gs.diagnose(m, _data())
    assert d.capture == "export"
    assert not [p for p in d.problems if p.kind == "Saturation"], d.summary()
    (p,) = _dead(d)
    assert (p.site.module, p.site.op, p.units) == ("fc1", name, DEAD)


def test_healthy_decomposed_gelu_raises_nothing() -> None:
    """Before: the inner tanh of a healthy tanh-GELU MLP was a saturating site of its own."""
    torch.manual_seed(0)
    m = MLP(DECOMPOSED["gelu_tanh"])
    m_sites = TorchAdapter(m).observe(_data(), DiagnoseConfig()).sites
    assert [(s.module, s.op, s.family) for s in m_sites] == [
        ("fc1", "gelu_tanh", "relu"), ("fc2", "linear", "linear")]


def test_gpt2_conv1d_addmm_is_a_layer_with_its_dead_units() -> None:
    """GPT-2's Conv1D is ``addmm`` with a (d_in, d_out) weight and gelu_new is decomposed.
    Before: no layer at h.0.mlp.c_fc and 'Saturation 8/128' at the inner tanh."""
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tf.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50, n_positions=16,
                        use_cache=False)  # a DynamicCache output cannot be exported
    model = tf.GPT2Model(cfg).eval()
    dead = (5, 9, 20, 100)
    with torch.no_grad():
        model.h[0].mlp.c_fc.weight[:, list(dead)] = 0.0  # Conv1D: columns are units
        model.h[0].mlp.c_fc.bias[list(dead)] = -6.0
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(0, 50, (4, 16), generator=g) for _ in range(3)]
    a = TorchAdapter(model)
    m = a.observe(data, DiagnoseConfig())
    (fc,) = [lm for lm in m.layers if lm.module == "h.0.mlp.c_fc"]
    assert (fc.d_out, fc.d_in) == (128, 32)  # oriented like nn.Linear's weight
    assert torch.equal(fc.weight, model.h[0].mlp.c_fc.weight.t())
    d = gs.diagnose(model, data)
    assert not [p for p in d.problems if p.kind == "Saturation"], d.summary()
    found = {p.site.module: p.units for p in _dead(d)}
    assert found.get("h.0.mlp.c_fc") == dead, d.summary()


def test_decoder_with_its_default_cache_is_exported() -> None:
    """A Hugging Face decoder as configured by default (use_cache=True) returns a
    DynamicCache; observation passes use_cache=False so torch.export captures it. Before:
    capture fell back to module hooks and the gelu_new units were not one site."""
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tf.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50, n_positions=16)
    model = tf.GPT2LMHeadModel(cfg).eval()
    dead = (1, 5, 9)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[:, list(dead)] = 0.0
        model.transformer.h[0].mlp.c_fc.bias[list(dead)] = -6.0
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(0, 50, (4, 16), generator=g) for _ in range(3)]
    d = gs.diagnose(model, data)
    assert d.capture == "export", d.notes
    assert model.config.use_cache  # the user's model is untouched
    found = {p.site.module: p.units for p in _dead(d)}
    assert found.get("transformer.h.0.mlp.c_fc") == dead, d.summary()


def test_llama_gated_unit_is_the_product_with_its_partner() -> None:
    """SwiGLU: ``silu(gate_proj(x)) * up_proj(x)`` is one site, the product, with the gate
    as producer and up_proj as partner. Before: the site was silu(gate) alone (no partner)."""
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, vocab_size=50,
                         max_position_embeddings=32, use_cache=False)
    model = tf.LlamaModel(cfg).eval()
    dead = (2, 10, 33)
    _plant_rows(model.layers[0].mlp.gate_proj.weight, None, dead)  # silu(0) * up = 0
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(0, 50, (4, 16), generator=g) for _ in range(3)]
    m = TorchAdapter(model).observe(data, DiagnoseConfig())
    (s,) = [s for s in m.sites if s.module == "layers.0.mlp.gate_proj"]
    assert (s.op, s.family, s.partner) == ("swiglu", "relu", "layers.0.mlp.up_proj")
    d = gs.diagnose(model, data)
    found = {p.site.module: p.units for p in _dead(d)}
    assert found.get("layers.0.mlp.gate_proj") == dead, d.summary()
    (p,) = [p for p in _dead(d) if p.site.module == "layers.0.mlp.gate_proj"]
    assert p.evidence["partner"] == "layers.0.mlp.up_proj"  # surgery edits both projections


class SameConv(nn.Module):
    def __init__(self, permute: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding="same")
        self.permute = permute

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        if self.permute:
            h = h.permute(0, 2, 3, 1)  # NHWC: units last
        return torch.relu(h).mean()


@pytest.mark.parametrize("permute", [False, True])
def test_conv_with_string_padding_and_a_permute_is_the_producer(permute: bool) -> None:
    """Before: ``conv2d.padding`` was no layer (units read along the last axis, the image
    columns) and a permute between conv and ReLU hid the producer."""
    torch.manual_seed(0)
    m = SameConv(permute)
    _plant_rows(m.conv.weight, m.conv.bias, DEAD)
    data = _data((4, 3, 6, 6))
    sites = TorchAdapter(m).observe(data, DiagnoseConfig()).sites
    (s,) = [s for s in sites if s.op == "relu"]
    assert (s.module, s.channel_dim, s.stats.channels) == ("conv", -1 if permute else 1, 16)
    (p,) = _dead(gs.diagnose(m, data))
    assert (p.site.module, p.units) == ("conv", DEAD)


class MatmulT(nn.Module):
    def __init__(self, transposed: bool) -> None:
        super().__init__()
        self.proj = nn.Module()
        self.proj.weight = nn.Parameter(torch.randn(32, 8) * 0.3 if transposed
                                        else torch.randn(8, 32) * 0.3)
        self.proj.bias = nn.Parameter(torch.zeros(32))
        self.transposed = transposed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.proj.weight
        return torch.relu((x @ w.T if self.transposed else x @ w) + self.proj.bias)


@pytest.mark.parametrize("transposed", [True, False])
def test_matmul_with_a_parameter_is_a_layer(transposed: bool) -> None:
    """``x @ W.T`` and ``x @ W``: before, no layer and the ReLU had no producer."""
    torch.manual_seed(0)
    m = MatmulT(transposed)
    with torch.no_grad():
        w = m.proj.weight
        if transposed:
            w[list(DEAD)] = 0.0
        else:
            w[:, list(DEAD)] = 0.0
        m.proj.bias[list(DEAD)] = -6.0
    data = _data()
    meas = TorchAdapter(m).observe(data, DiagnoseConfig(), loss_fn=lambda o, b: o.sum())
    (lm,) = meas.layers
    assert (lm.module, lm.d_out, lm.d_in) == ("proj", 32, 8)
    assert not any("no layer" in n for n in meas.notes)
    (p,) = _dead(gs.diagnose(m, data))
    assert (p.site.module, p.units) == ("proj", DEAD)


def test_gradients_with_no_layer_say_so() -> None:
    """A model with gradients measured but no recognised layer gets a note (before: it
    claimed 'gradients checked' silently)."""

    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.s = nn.Parameter(torch.ones(8))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(x * self.s)

    meas = TorchAdapter(Scale()).observe(_data(), DiagnoseConfig(),
                                         loss_fn=lambda o, b: o.sum())
    assert meas.gradients and not meas.layers
    assert any("no parametrised layer" in n for n in meas.notes)


@pytest.mark.parametrize(("eq", "weights", "want"), [
    ("bi,oi->bo", (False, True), (1, False, -1)),     # x @ W.T (nn.Linear's layout)
    ("bi,io->bo", (False, True), (1, True, -1)),      # x @ W (Conv1D's layout)
    ("oi,bi->bo", (True, False), (0, False, -1)),
    ("...i,oi->...o", (False, True), (1, False, -1)),
    ("bij,jk->bik", (False, True), (1, True, -1)),
    ("bi,bi->b", (False, True), None),                # no unit axis: not a layer
    ("bi,oi->bo", (False, False), None),              # no weight operand
])
def test_einsum_layer_is_one_reading_for_both_irs(eq: str, weights: tuple[bool, bool],
                                                  want: tuple[int, bool, int] | None) -> None:
    from graphsurg._layers import einsum_layer

    assert einsum_layer(eq, weights) == want
