"""Hugging Face models from small configs (random weights, nothing downloaded) and their
batches, shared by the diagnosis and surgery tests. Import after
``pytest.importorskip("transformers")``."""

from __future__ import annotations

import torch
import transformers as tf

Batches = list[dict[str, torch.Tensor]]


def loss(out: object, batch: object) -> torch.Tensor:
    return out.loss  # type: ignore[attr-defined,no-any-return]


def bert(n_batches: int = 3) -> tuple[torch.nn.Module, Batches]:
    torch.manual_seed(0)
    cfg = tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, vocab_size=100, max_position_embeddings=64)
    model = tf.BertForSequenceClassification(cfg)
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, 100, (8, 16), generator=g),
             "labels": torch.randint(0, 2, (8,), generator=g)} for _ in range(n_batches)]
    return model, data


def vit(n_batches: int = 3) -> tuple[torch.nn.Module, Batches]:
    torch.manual_seed(0)
    cfg = tf.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, image_size=16, patch_size=4, num_labels=3)
    model = tf.ViTForImageClassification(cfg)
    g = torch.Generator().manual_seed(0)
    data = [{"pixel_values": torch.randn(4, 3, 16, 16, generator=g),
             "labels": torch.randint(0, 3, (4,), generator=g)} for _ in range(n_batches)]
    return model, data


def resnet(n_batches: int = 3) -> tuple[torch.nn.Module, Batches]:
    torch.manual_seed(0)
    cfg = tf.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                          layer_type="basic", num_labels=3)
    model = tf.ResNetForImageClassification(cfg)
    g = torch.Generator().manual_seed(0)
    data = [{"pixel_values": torch.randn(4, 3, 32, 32, generator=g),
             "labels": torch.randint(0, 3, (4,), generator=g)} for _ in range(n_batches)]
    return model, data
