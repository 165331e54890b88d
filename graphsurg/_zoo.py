"""Broken networks with known ground truth (used by tests, benchmarks and ``graphsurg demo``).

Each builder is deterministic in its ``seed`` and returns a :class:`ZooCase`. Problems are
planted the way they arise in practice: dead ReLU units through strongly negative biases, a
plain deep sigmoid stack for vanishing gradients, a narrow or low-rank layer for a rank
bottleneck, large weights for tanh saturation, a NaN weight for non-finite activations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

Batch = Any


@dataclass(frozen=True)
class Truth:
    """One planted problem: its kind, the module path of its site, the affected units."""

    kind: str
    module: str
    units: tuple[int, ...] = ()


@dataclass
class ZooCase:
    name: str
    model: nn.Module
    batches: list[Batch]
    loss_fn: Callable[[Any, Batch], torch.Tensor]
    truth: list[Truth] = field(default_factory=list)
    description: str = ""

    def example_input(self) -> Any:
        return self.batches[0][0]


def _mse(out: torch.Tensor, batch: Batch) -> torch.Tensor:
    return F.mse_loss(out, batch[1])


def _ce(out: torch.Tensor, batch: Batch) -> torch.Tensor:
    return F.cross_entropy(out, batch[1])


def _teacher_batches(
    in_shape: tuple[int, ...],
    out_dim: int,
    n_batches: int,
    batch_size: int,
    seed: int,
    *,
    hidden: int = 64,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Regression batches y = teacher(x) for a fixed random 2-layer teacher."""
    g = torch.Generator().manual_seed(10_000 + seed)
    d_in = 1
    for s in in_shape:
        d_in *= s
    w1 = torch.randn(d_in, hidden, generator=g) / d_in**0.5
    w2 = torch.randn(hidden, out_dim, generator=g) / hidden**0.5
    out = []
    for _ in range(n_batches):
        x = torch.randn((batch_size, *in_shape), generator=g)
        y = torch.tanh(x.reshape(batch_size, -1) @ w1) @ w2
        out.append((x, y))
    return out


def _param(layer: nn.Module, name: str) -> torch.Tensor:
    t = getattr(layer, name)
    assert isinstance(t, torch.Tensor)
    return t


def _plant_dead(layer: nn.Module, units: tuple[int, ...], bias: float = -50.0) -> None:
    b = layer.bias
    assert isinstance(b, torch.Tensor)
    with torch.no_grad():
        for u in units:
            b[u] = bias


def dead_mlp(seed: int = 0, *, width: int = 64, n_batches: int = 8, batch_size: int = 128) -> ZooCase:
    """A 3-layer ReLU MLP with dead units planted in both hidden layers (bias -50)."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(16, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 4)
    )
    dead0 = tuple(range(0, width, 4))  # 25% of layer 0
    dead2 = tuple(range(1, width, 8))  # 12.5% of layer 2
    _plant_dead(model[0], dead0)
    _plant_dead(model[2], dead2)
    return ZooCase(
        "dead_mlp",
        model,
        _teacher_batches((16,), 4, n_batches, batch_size, seed),
        _mse,
        [Truth("DeadNeurons", "0", dead0), Truth("DeadNeurons", "2", dead2)],
        "ReLU MLP 16-64-64-4 with 25% and 12.5% dead units planted",
    )


def healthy_mlp(seed: int = 0, *, width: int = 64, n_batches: int = 8, batch_size: int = 128) -> ZooCase:
    """A well-initialised ReLU MLP: the diagnosis must find nothing."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(16, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 4)
    )
    return ZooCase(
        "healthy_mlp", model, _teacher_batches((16,), 4, n_batches, batch_size, seed), _mse, [],
        "well-initialised ReLU MLP 16-64-64-4",
    )


def deep_sigmoid(seed: int = 0, *, depth: int = 24, width: int = 32, n_batches: int = 4,
                 batch_size: int = 128) -> ZooCase:
    """A plain (no skips) deep sigmoid MLP: gradients vanish towards the first layers."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(16, width), nn.Sigmoid()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.Sigmoid()]
    layers.append(nn.Linear(width, 4))
    model = nn.Sequential(*layers)
    return ZooCase(
        "deep_sigmoid", model, _teacher_batches((16,), 4, n_batches, batch_size, seed), _mse,
        [Truth("VanishingGradient", "0")],
        f"plain {depth}-layer sigmoid MLP, width {width}",
    )


class SmallCNN(nn.Module):
    def __init__(self, channels: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.head = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.conv2(x))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.head(x)


def _cnn_batches(n_batches: int, batch_size: int, seed: int, classes: int = 10
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(20_000 + seed)
    proto = torch.randn(classes, 3, 8, 8, generator=g)
    out = []
    for _ in range(n_batches):
        y = torch.randint(0, classes, (batch_size,), generator=g)
        x = proto[y] + 0.5 * torch.randn(batch_size, 3, 8, 8, generator=g)
        out.append((x, y))
    return out


def dead_cnn(seed: int = 0, *, n_batches: int = 4, batch_size: int = 64) -> ZooCase:
    """A small CNN (conv-BN-ReLU, conv-ReLU, pool, linear) with dead channels in conv2."""
    torch.manual_seed(seed)
    model = SmallCNN()
    dead = (2, 5, 11)
    _plant_dead(model.conv2, dead)
    return ZooCase(
        "dead_cnn", model, _cnn_batches(n_batches, batch_size, seed), _ce,
        [Truth("DeadNeurons", "conv2", dead)],
        "CNN 3-16-16 on 8x8 images with 3 dead channels in conv2",
    )


def healthy_cnn(seed: int = 0, *, n_batches: int = 4, batch_size: int = 64) -> ZooCase:
    torch.manual_seed(seed)
    return ZooCase("healthy_cnn", SmallCNN(), _cnn_batches(n_batches, batch_size, seed), _ce, [],
                   "well-initialised CNN 3-16-16")


def bottleneck_mlp(seed: int = 0, *, narrow: int = 4, width: int = 64, n_batches: int = 8,
                   batch_size: int = 128) -> ZooCase:
    """An MLP with a width-``narrow`` layer on a task that needs more (Net2Net's case)."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(32, width), nn.ReLU(), nn.Linear(width, narrow), nn.Tanh(),
        nn.Linear(narrow, width), nn.Tanh(), nn.Linear(width, 16),
    )
    return ZooCase(
        "bottleneck_mlp", model, _teacher_batches((32,), 16, n_batches, batch_size, seed), _mse,
        [Truth("Bottleneck", "2")],
        f"MLP 32-{width}-{narrow}-{width}-16: a width-{narrow} layer on a rank-16 task",
    )


def lowrank_mlp(seed: int = 0, *, rank: int = 3, width: int = 64, n_batches: int = 8,
                batch_size: int = 128) -> ZooCase:
    """An MLP whose middle layer's weight has rank ``rank`` (collapsed)."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(32, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 16)
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        u = torch.randn(width, rank, generator=g)
        v = torch.randn(rank, width, generator=g)
        _param(model[2], "weight").copy_(u @ v / width**0.5)
    return ZooCase(
        "lowrank_mlp", model, _teacher_batches((32,), 16, n_batches, batch_size, seed), _mse,
        [Truth("Bottleneck", "2")],
        f"MLP 32-{width}-{width}-16 whose middle weight has rank {rank}",
    )


def saturated_mlp(seed: int = 0, *, width: int = 32, n_batches: int = 4, batch_size: int = 128
                  ) -> ZooCase:
    """A tanh MLP with 8 units driven into saturation (bias +-20) in its first layer."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, width), nn.Tanh(), nn.Linear(width, 4))
    units = tuple(range(0, width, 4))
    with torch.no_grad():
        for k, u in enumerate(units):
            _param(model[0], "bias")[u] = 20.0 if k % 2 == 0 else -20.0
    return ZooCase(
        "saturated_mlp", model, _teacher_batches((16,), 4, n_batches, batch_size, seed), _mse,
        [Truth("Saturation", "0", units)],
        "tanh MLP 16-32-4 with 8 saturated units (bias +-20)",
    )


def nan_mlp(seed: int = 0, *, n_batches: int = 4, batch_size: int = 128) -> ZooCase:
    """An MLP whose third Linear has a NaN weight: non-finite values start at module '4'."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
        nn.Linear(32, 4),
    )
    with torch.no_grad():
        _param(model[4], "weight")[3, 5] = float("nan")
    return ZooCase(
        "nan_mlp", model, _teacher_batches((16,), 4, n_batches, batch_size, seed), _mse,
        [Truth("NonFinite", "4")],
        "tanh MLP with one NaN weight in its third Linear",
    )


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: attention + GELU MLP, LayerNorm, residual adds."""

    def __init__(self, d: int = 32, heads: int = 4, hidden: int = 64, classes: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, d)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        a = self.ln1(h)
        h = h + self.attn(a, a, a, need_weights=False)[0]
        h = h + self.fc2(self.act(self.fc1(self.ln2(h))))
        return self.head(h.mean(1))


def transformer_block(seed: int = 0, *, dead: bool = True, n_batches: int = 4, batch_size: int = 32
                      ) -> ZooCase:
    """A small transformer block on (N, 8 tokens, 8 features); dead GELU units in fc1 if
    ``dead``."""
    torch.manual_seed(seed)
    model = TransformerBlock()
    units: tuple[int, ...] = (0, 9, 17, 33, 50) if dead else ()
    if units:
        _plant_dead(model.fc1, units)
    g = torch.Generator().manual_seed(30_000 + seed)
    batches = []
    for _ in range(n_batches):
        x = torch.randn(batch_size, 8, 8, generator=g)
        y = (x.mean((1, 2)) > 0).long() + 2 * (x[:, 0, 0] > 0).long()
        batches.append((x, y))
    truth = [Truth("DeadNeurons", "fc1", units)] if units else []
    return ZooCase("transformer_block", model, batches, _ce, truth,
                   "pre-norm transformer block (d=32, 4 heads) " + ("with 5 dead GELU units" if dead else ""))


ZOO: dict[str, Callable[..., ZooCase]] = {
    "dead_mlp": dead_mlp,
    "healthy_mlp": healthy_mlp,
    "deep_sigmoid": deep_sigmoid,
    "dead_cnn": dead_cnn,
    "healthy_cnn": healthy_cnn,
    "bottleneck_mlp": bottleneck_mlp,
    "lowrank_mlp": lowrank_mlp,
    "saturated_mlp": saturated_mlp,
    "nan_mlp": nan_mlp,
    "transformer_block": transformer_block,
}


def build(name: str, seed: int = 0, **kwargs: Any) -> ZooCase:
    """Build a zoo case by name."""
    if name not in ZOO:
        raise ValueError(f"unknown zoo model {name!r}; known: {', '.join(sorted(ZOO))}")
    return ZOO[name](seed, **kwargs)
