"""Detectors that know design from disease (issue 14, class 6).

A narrow layer is a Bottleneck only with measured evidence that it loses information (no
parallel path around it, more information arriving than its width, its own width used); a
gradient span is judged on layers without a residual path around them (LayerScale and
zero-initialised branches are design); dormancy needs ``min_unit_samples`` observations per
unit; NonFinite reads the outputs the ONNX adapter counts. Each test failed before the change.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zoo
from torch import nn

import graphsurg as gs
from graphsurg._config import DiagnoseConfig

KINDS_GRAD = {"VanishingGradient", "ExplodingGradient"}


def _kinds(d: gs.Diagnosis) -> list[tuple[str, str]]:
    return [(p.kind, p.site.module) for p in d.problems]


def _mse(out: torch.Tensor, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return nn.functional.mse_loss(out, batch[1])


def _ce(out: object, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = out.logits if hasattr(out, "logits") else out
    return nn.functional.cross_entropy(logits, batch["labels"])  # type: ignore[arg-type]


def _images(n: int, batch: int, classes: int = 3, size: int = 32, seed: int = 0
            ) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"pixel_values": torch.randn(batch, 3, size, size, generator=g),
             "labels": torch.randint(0, classes, (batch,), generator=g)} for _ in range(n)]


def _pixels(b: dict[str, torch.Tensor]) -> tuple[tuple[torch.Tensor], dict[str, object]]:
    return (b["pixel_values"],), {}


# -- narrow layers ----------------------------------------------------------------------------


def test_mobilenet_v2_inverted_residual_reductions_are_not_bottlenecks() -> None:
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = tf.MobileNetV2ForImageClassification(tf.MobileNetV2Config(
        image_size=32, depth_multiplier=0.25, num_labels=3))
    d = gs.diagnose(model, _images(2, 4), input_fn=_pixels)
    assert d.capture == "export"
    assert not d.of_kind("Bottleneck"), d.summary()  # was 16 "narrow" reduce_1x1 convs


class SEBlock(nn.Module):
    """Conv + squeeze-and-excitation (32 -> 4 -> 32, ReLU then sigmoid gate) + head."""

    def __init__(self, c: int = 32, r: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.reduce = nn.Conv2d(c, c // r, 1)
        self.expand = nn.Conv2d(c // r, c, 1)
        self.head = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        s = torch.sigmoid(self.expand(torch.relu(self.reduce(h.mean((2, 3), keepdim=True)))))
        return self.head((h * s).mean((2, 3)))  # type: ignore[no-any-return]


def test_squeeze_excite_reduction_is_neither_narrow_nor_judged_dormant_on_few_images() -> None:
    torch.manual_seed(0)
    model = SEBlock()
    with torch.no_grad():  # SE units that rarely fire: on 8 images they look dead
        model.reduce.bias[1] = -0.5
    data = [(b["pixel_values"], b["labels"]) for b in _images(2, 4)]
    d = gs.diagnose(model, data, loss_fn=lambda o, b: nn.functional.cross_entropy(o, b[1]))
    assert d.capture == "export"
    assert not d.of_kind("Bottleneck"), d.summary()
    assert not any(p.site.module == "reduce" for p in d.of_kind("DeadNeurons")), d.summary()
    # 8 pooled vectors per unit < min_unit_samples: said in the notes, not judged
    assert any("reduce" in n and "dormancy not judged" in n for n in d.notes), d.notes
    # with the minimum lowered to what was seen, the same site is judged (and found dormant)
    cfg = DiagnoseConfig(min_unit_samples=8)
    d8 = gs.diagnose(model, data, config=cfg)
    assert [p.site.module for p in d8.of_kind("DeadNeurons")] == ["reduce"], d8.summary()


def test_grouped_query_attention_single_kv_head_is_not_a_bottleneck() -> None:
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
        intermediate_size=64, vocab_size=64, max_position_embeddings=32, use_cache=False))
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(0, 64, (4, 16), generator=g) for _ in range(2)]
    d = gs.diagnose(model, data)
    assert d.capture == "export"
    kv = [lm for lm in ("model.layers.0.self_attn.k_proj",) if any(
        r.site.module == lm for r in d.layers.values())]
    assert kv, "k_proj not measured"
    assert not d.of_kind("Bottleneck"), d.summary()  # k_proj/v_proj: 8 of 32, was "narrow"


class Residual(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.inner(x)  # type: ignore[no-any-return]


def test_narrow_layer_with_a_residual_path_around_it_is_not_a_bottleneck() -> None:
    case = zoo.bottleneck_mlp()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(),
                          Residual(nn.Sequential(nn.Linear(64, 4), nn.Tanh(), nn.Linear(4, 64))),
                          nn.Tanh(), nn.Linear(64, 16))
    d = gs.diagnose(model, case.batches, loss_fn=case.loss_fn)
    assert not d.of_kind("Bottleneck"), d.summary()
    # the same width without the residual path is found, with its evidence
    (p,) = gs.diagnose(case.model, case.batches).of_kind("Bottleneck")
    assert p.evidence["reason"] == "narrow" and p.evidence["bypassed"] is False
    assert p.evidence["input_rank"] >= 2 * 4 and p.evidence["output_rank"] >= 3


def test_bypassed_layers_from_the_graph() -> None:
    from graphsurg.passes.fx.capture import capture, find_sites
    from graphsurg.passes.fx.structure import bypassed_layers, layer_nodes_of

    model = SEBlock()
    cap = capture(model, (torch.randn(2, 3, 8, 8),), {})
    assert cap.gm is not None
    layers, _ = find_sites(cap.gm)
    got = bypassed_layers(cap.gm, layer_nodes_of(layers))
    # reduce/expand feed the gate that multiplies h: h reaches the head around them
    assert got == {"conv": False, "reduce": True, "expand": True, "head": False}


# -- gradients ----------------------------------------------------------------------------------


class LayerScaleBlock(nn.Module):
    """Pre-norm residual MLP block with LayerScale (gamma initialised at 1e-6, CaiT/ConvNeXt)."""

    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)
        self.gamma = nn.Parameter(torch.full((d,), 1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gamma * self.fc2(nn.functional.gelu(self.fc1(self.norm(x))))


def test_layerscale_blocks_have_no_gradient_problem() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), *[LayerScaleBlock() for _ in range(3)],
                          nn.Linear(32, 4))
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(64, 16, generator=g), torch.randn(64, 4, generator=g))
            for _ in range(2)]
    d = gs.diagnose(model, data, loss_fn=_mse)
    assert d.gradients_checked and d.capture == "export"
    norms = {r.site.module: r.grad_norm for r in d.layers.values() if r.grad_norm is not None}
    assert norms["1.fc1"] < 1e-4 * norms["0"]  # the designed scale is there ...
    assert not [p for p in d.problems if p.kind in KINDS_GRAD], d.summary()  # ... not a problem


def test_convnext_layerscale_has_no_gradient_problem() -> None:
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = tf.ConvNextForImageClassification(tf.ConvNextConfig(
        num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], num_labels=3))
    d = gs.diagnose(model, _images(2, 4), loss_fn=_ce, input_fn=_pixels)
    assert d.gradients_checked and d.capture == "export"
    assert not [p for p in d.problems if p.kind in KINDS_GRAD], d.summary()


def test_plain_vanishing_span_is_still_found() -> None:
    case = zoo.deep_sigmoid()
    d = gs.diagnose(case.model, case.batches, loss_fn=case.loss_fn)
    (p,) = d.of_kind("VanishingGradient")
    plain = [r for r in d.layers.values() if r.kind == "parameters"]
    assert p.span[0] == "0" and p.evidence["judged_layers"] == len(plain)  # none bypassed


# -- non-finite outputs (ONNX) ------------------------------------------------------------------


def test_onnx_nonfinite_output_is_reported() -> None:
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from graphsurg.passes.onnx.adapter import OnnxAdapter
    from onnx import TensorProto, helper, numpy_helper

    from graphsurg._diagnose import diagnose_adapter

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "W")
    zero = numpy_helper.from_array(np.zeros((1,), np.float32), "zero")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["h"], name="mm"),
         helper.make_node("Relu", ["h"], ["a"], name="relu"),
         helper.make_node("Div", ["a", "zero"], ["Y"], name="div")],  # a / 0: inf or nan
        "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 16])], [w, zero])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(proto)
    adapter, _ = OnnxAdapter.open(proto)
    feeds = [{"X": rng.standard_normal((64, 8)).astype(np.float32)} for _ in range(2)]
    d = diagnose_adapter(adapter, feeds)
    (p,) = d.of_kind("NonFinite")
    assert p.evidence["where"] == "output" and p.evidence["count"] == 2 * 64 * 16
    assert p.site.ir == "onnx"


def test_effective_rank_ignores_non_finite_rows() -> None:
    """A sample with NaN rows (a model whose activations go NaN on finite inputs) used to
    crash the SVD (exit 3); NaN rows are left out, an all-NaN sample has rank 0."""
    from graphsurg.detect.bottleneck import effective_rank

    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    clean = effective_rank(x[1:], 0.99)
    x[0, 3] = float("nan")
    assert effective_rank(x, 0.99) == clean
    assert effective_rank(torch.full((5, 4), float("nan")), 0.99) == 0
