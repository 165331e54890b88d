"""diagnose on Hugging Face architectures built from small configs (random weights, offline)."""

from __future__ import annotations

import pytest
import torch

import graphsurg as gs

pytest.importorskip("transformers")
import _hf_models as _hf

_bert, _vit, _resnet, _loss = _hf.bert, _hf.vit, _hf.resnet, _hf.loss


@pytest.mark.parametrize("build", [_bert, _vit, _resnet], ids=["bert", "vit", "resnet"])
def test_healthy_hf_models_have_no_problems(build) -> None:  # type: ignore[no-untyped-def]
    model, data = build()
    d = gs.diagnose(model, data, loss_fn=_loss)
    assert d.problems == [], d.summary()
    assert d.capture == "export" and d.gradients_checked
    assert any(r.grad_norm for r in d.layers.values())


def _plant(model: torch.nn.Module, path: str, units: list[int]) -> None:
    with torch.no_grad():
        model.get_submodule(path).bias[units] = -50.0


@pytest.mark.parametrize(
    "build,path",
    [(_bert, "bert.encoder.layer.1.intermediate.dense"), (_vit, "vit.layers.0.mlp.fc1")],
    ids=["bert", "vit"],
)
def test_planted_dead_gelu_units_in_hf_models(build, path: str) -> None:  # type: ignore[no-untyped-def]
    model, data = build()
    if not any(n == path for n, _ in model.named_modules()):
        pytest.skip(f"{path} not in this transformers version's model")
    units = [1, 7, 30]
    _plant(model, path, units)
    d = gs.diagnose(model, data, loss_fn=_loss)
    (p,) = d.problems
    assert p.kind == "DeadNeurons" and p.site.module == path and p.site.op == "gelu"
    assert p.evidence["dead"] == units


def test_planted_dead_channels_in_hf_resnet() -> None:
    model, data = _resnet()
    conv = next(n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)
                and "stages.1" in n and "shortcut" not in n)
    bn_path = conv.rsplit(".", 1)[0] + ".normalization"
    with torch.no_grad():  # dead after BN: a strongly negative BN shift
        model.get_submodule(bn_path).bias[[0, 5]] = -50.0
    d = gs.diagnose(model, data, loss_fn=_loss)
    dead = d.of_kind("DeadNeurons")
    assert [p.site.module for p in dead] == [conv]
    assert dead[0].evidence["dead"] == [0, 5]
