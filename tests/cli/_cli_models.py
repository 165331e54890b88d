"""Factories, data and losses named by ``package.module:callable`` specs in the CLI tests
(the subprocess gets this folder on PYTHONPATH)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def dead_mlp() -> nn.Module:
    from graphsurg._zoo import dead_mlp as build

    return build(0).model


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    from graphsurg._zoo import dead_mlp as build

    return build(0).batches[:4]


def mse(out: torch.Tensor, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.mse_loss(out, batch[1])


def not_a_model() -> int:
    return 3


NOT_CALLABLE = 5
