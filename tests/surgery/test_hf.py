"""Real architectures: Hugging Face BERT / ViT / ResNet (small random configs) with planted
dead units. symbolic_trace cannot capture them, so coupling goes through the probe."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import graphsurg as gs

transformers = pytest.importorskip("transformers")


def _bert() -> tuple[torch.nn.Module, list[Any], str]:
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, vocab_size=100)
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, 100, (8, 12), generator=g)} for _ in range(3)]
    return transformers.BertModel(cfg), data, "encoder.layer.0.intermediate.dense"


def _vit() -> tuple[torch.nn.Module, list[Any], str]:
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, image_size=16, patch_size=8)
    g = torch.Generator().manual_seed(0)
    data = [{"pixel_values": torch.randn(8, 3, 16, 16, generator=g)} for _ in range(3)]
    return transformers.ViTModel(cfg), data, "layers.0.mlp.fc1"


def _resnet() -> tuple[torch.nn.Module, list[Any], str]:
    cfg = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                    layer_type="basic")
    g = torch.Generator().manual_seed(0)
    data = [{"pixel_values": torch.randn(4, 3, 32, 32, generator=g)} for _ in range(3)]
    return (transformers.ResNetModel(cfg), data,
            "encoder.stages.1.layers.0.layer.0.convolution")


@pytest.mark.parametrize("build", [_bert, _vit, _resnet], ids=["bert", "vit", "resnet"])
def test_planted_dead_units_are_treated(build: Any) -> None:
    torch.manual_seed(0)
    model, data, path = build()
    model.eval()
    layer = model.get_submodule(path)
    units = (1, 4, 6)
    with torch.no_grad():
        if layer.bias is not None:
            layer.bias[list(units)] = -50.0
        else:  # conv without bias (ResNet): kill the units through their weights and BN
            layer.weight[list(units)] = 0.0
            bn = model.get_submodule(path.rsplit(".", 1)[0] + ".normalization")
            bn.bias[list(units)] = -50.0
    d = gs.Diagnosis(problems=[gs.Problem("DeadNeurons", gs.Site(path, "", "act"), 0.1, units)])
    res = gs.operate(model, data, diagnosis=d, rediagnose=False)
    (v,) = res.verification
    assert v.kept, res.summary()
    assert v.output_change is not None and v.output_change <= 1e-5
    assert res.applied[0].units == list(units)
    assert res.applied[0].details["coupling"] == "probe"
