"""Small models and a training-step helper for the torch.compile tests."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class BreakMLP(nn.Module):
    """Two halves with a graph break between them (``torch._dynamo.graph_break()``)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, width)
        self.fc2 = nn.Linear(width, width)
        self.head = nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        torch._dynamo.graph_break()
        h = torch.tanh(self.fc2(h))
        return self.head(h)


def mlp(seed: int = 0, width: int = 16) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, width), nn.Tanh(),
                         nn.Linear(width, 2))


def batches(n: int, seed: int = 1, rows: int = 32, d_in: int = 8
            ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(rows, d_in, generator=g), torch.randn(rows, 2, generator=g))
            for _ in range(n)]


def mse(out: torch.Tensor, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.mse_loss(out, batch[1])
