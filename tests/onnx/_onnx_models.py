"""Small torch models with planted problems, exported to ONNX for the ONNX adapter tests."""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import torch
from torch import nn

DEAD_BIAS = -1e3  # a bias this negative keeps a ReLU unit at 0 for any input in [-3, 3]


def plant_dead(linear: nn.Linear | nn.Conv2d, units: list[int]) -> None:
    """Make ``units`` of a layer dead behind a ReLU: zero weights, strongly negative bias."""
    with torch.no_grad():
        linear.weight[units] = 0.0
        assert linear.bias is not None
        linear.bias[units] = DEAD_BIAS


class MLP(nn.Module):
    """16 -> 32 -> 32 -> 4 with ReLUs; with ``dead``, 16 units of fc1 and 3 of fc2 are dead,
    without it the network is healthy (no dormant unit, full-rank weights)."""

    def __init__(self, dead: bool = True, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 32)
        self.fc3 = nn.Linear(32, 4)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        if dead:
            plant_dead(self.fc1, list(range(0, 32, 2)))  # 50% dead
            plant_dead(self.fc2, [1, 5, 7])
        else:  # healthy: every unit fires on about 90% of inputs
            with torch.no_grad():
                self.fc1.bias.fill_(0.6)
                self.fc2.weight.mul_(0.3)
                self.fc2.bias.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class ResidualMLP(nn.Module):
    """A residual block: h + fc2(relu(fc1(h))), with dead units in fc1 (excisable) and in the
    stem whose output feeds the residual Add (coupled: refused)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.stem = nn.Linear(8, 16)
        self.fc1 = nn.Linear(16, 24)
        self.fc2 = nn.Linear(24, 16)
        self.head = nn.Linear(16, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        plant_dead(self.stem, [2, 3])
        plant_dead(self.fc1, [0, 1, 2, 10])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        h = h + self.fc2(torch.relu(self.fc1(h)))
        return self.head(h)


class ConcatBN(nn.Module):
    """Two branches concatenated on channels, then BatchNorm1d and a head: dead units of
    branch ``a`` flow through Concat and BatchNormalization (a non-zero constant there)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a = nn.Linear(8, 12)
        self.b = nn.Linear(8, 6)
        self.bn = nn.BatchNorm1d(18)
        self.head = nn.Linear(18, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            self.bn.running_mean.copy_(torch.randn(18, generator=g) * 0.1)
            self.bn.running_var.copy_(torch.rand(18, generator=g) + 0.5)
            self.bn.weight.copy_(torch.rand(18, generator=g) + 0.5)
        plant_dead(self.a, [1, 4, 5])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([torch.relu(self.a(x)), torch.tanh(self.b(x))], dim=1)
        return self.head(torch.relu(self.bn(h)))


class CNN(nn.Module):
    """conv(3->8) relu conv(8->8, no padding) relu flatten linear: dead channels planted in
    both convolutions (the second feeds a Flatten/Reshape + Gemm)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=0)
        self.fc = nn.Linear(8 * 4 * 4, 5)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        plant_dead(self.c1, [0, 3])
        plant_dead(self.c2, [2, 5, 6])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.c1(x))
        h = torch.relu(self.c2(h))
        return self.fc(torch.flatten(h, 1))


def export(model: nn.Module, example: torch.Tensor, path: Path, *, dynamo: bool,
           opset: int | None = None) -> Path:  # fmt: skip
    """Export ``model`` (eval mode) with a dynamic batch dimension, quietly."""
    model.eval()
    kw: dict = {}
    if dynamo:
        kw["dynamic_shapes"] = {"x": {0: torch.export.Dim("batch", min=1, max=1024)}}
    else:
        kw["dynamic_axes"] = {"x": {0: "batch"}, "y": {0: "batch"}}
    if opset is not None:
        kw["opset_version"] = opset
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (example,), str(path), dynamo=dynamo, input_names=["x"], output_names=["y"],
            **kw,
        )  # fmt: skip
    return path


class PaddedTanhCNN(nn.Module):
    """conv -> tanh -> padded conv: two tanh channels are constant at tanh(0.5) != 0, which a
    zero-padded convolution's bias cannot absorb (the border sees the padding): excision adds
    their exact contribution as a constant map after the conv."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 4, 3, padding=1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            self.c1.weight[[1, 4]] = 0.0
            assert self.c1.bias is not None
            self.c1.bias[[1, 4]] = 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c2(torch.tanh(self.c1(x)))


class DyingMLP(nn.Module):
    """16 -> 32 -> 4 where 8 hidden units rarely fire (dormant but not dead): the case for
    relu_to_leaky_relu; the output changes only slightly when those ReLUs leak."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 4)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            self.fc1.weight[:8] *= 0.1
            self.fc1.bias[:8] = -0.3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


#: example input shape per model name (the first dimension is the batch)
SHAPES: dict[str, tuple[int, ...]] = {
    "mlp": (16, 16),
    "healthy_mlp": (16, 16),
    "residual": (16, 8),
    "concat_bn": (16, 8),
    "cnn": (4, 3, 6, 6),
    "padded_tanh": (4, 3, 6, 6),
    "dying": (16, 16),
}


class LowRank(torch.nn.Module):
    """48 -> 40 -> 3 MLP whose first weight has rank 3 (what factor_low_rank treats)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.fc = torch.nn.Linear(48, 40)
        self.out = torch.nn.Linear(40, 3)
        with torch.no_grad():
            a, b = torch.randn(40, 3, generator=g), torch.randn(3, 48, generator=g)
            self.fc.weight.copy_(a @ b / 8)  # rank 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.fc(x)))
