"""Trained torch networks from a pinned PyPI wheel: facenet-pytorch 2.6.0's MTCNN R-Net and
O-Net (``facenet_pytorch/data/{rnet,onet}.pt``, state dicts, per-channel PReLU).

The wheel (1.9 MB) is fetched at test time by ``tests/_wheels.py`` (``pip download --no-deps``,
not installed, no package code imported; sha256-pinned members); without pip or network the
tests are skipped with the reason. The architectures below are written from the state-dict
keys and follow facenet's ``mtcnn.py`` (including the W/H permute of the Caffe port before
the dense layers). Inputs are synthetic face-like crops (a skin-toned blob with darker eyes and
mouth on a graded background, RGB, ``(x - 127.5) / 128``): 24x24 for R-Net, 48x48 for O-Net.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from _helpers import rel_change, same_state, snapshot
from _wheels import WheelModel, fetch
from torch import nn

import graphsurg as gs

FACENET = ("facenet-pytorch", "2.6.0")
RNET = WheelModel(*FACENET, "facenet_pytorch/data/rnet.pt", "bbb937de72efc9ef")
ONET = WheelModel(*FACENET, "facenet_pytorch/data/onet.pt", "165bfbe42940416c")

#: float32 round-off of an exact edit on outputs of order 1 (relative, float64 comparison)
EXACT_RTOL = 1e-5
HEALED_RTOL = 0.05  # outputs after treatment and default healing stay within 5%
PLANTED = [3, 17, 40, 99]  # units of the dense layer made dead (constant 0 after the PReLU)


class RNet(nn.Module):
    """MTCNN refine net: 24x24 crop -> (box regression [N, 4], face probability [N, 2])."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), nn.PReLU(28)
        self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), nn.PReLU(48)
        self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)
        self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.dense5_1, self.dense5_2 = nn.Linear(128, 2), nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 3, 2, ceil_mode=True)
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

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu3(self.conv3(x)), 2, 2, ceil_mode=True)
        x = self.prelu4(self.conv4(x)).permute(0, 3, 2, 1).flatten(1)
        x = self.prelu5(self.dense5(x))
        return self.dense6_2(x), self.dense6_3(x), F.softmax(self.dense6_1(x), 1)


#: name -> (wheel member, architecture, crop size, dense layer whose output units get planted)
NETS: dict[str, tuple[WheelModel, Callable[[], nn.Module], int, str]] = {
    "rnet": (RNET, RNet, 24, "dense4"),
    "onet": (ONET, ONet, 48, "dense5"),
}


def load(name: str) -> nn.Module:
    member, arch, _, _ = NETS[name]
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


def batches(name: str, seeds: range, n: int = 16) -> list[torch.Tensor]:
    return [faces(s, n, NETS[name][2]) for s in seeds]


def plant(model: nn.Module, layer: str) -> None:
    """Zero rows and bias of ``layer`` for PLANTED: pre-activation 0, so the units are
    constant 0 after the learned-slope PReLU (dead whatever the slope)."""
    lin = model.get_submodule(layer)
    with torch.no_grad():
        lin.weight[PLANTED] = 0
        lin.bias[PLANTED] = 0


def keys(d: gs.Diagnosis) -> set[tuple[str, str, tuple[int, ...]]]:
    return {(p.kind, p.site.module, tuple(p.evidence.get("dead", ()))) for p in d.problems}


@pytest.mark.parametrize("name", sorted(NETS))
def test_trained_mtcnn_raises_no_false_alarm(name: str) -> None:
    model = load(name)
    s0 = snapshot(model)
    d = gs.diagnose(model, batches(name, range(4)))
    assert keys(d) == set()  # trained, healthy: no dead, exploding or saturated layer
    assert same_state(s0, model.state_dict())


def test_rnet_sees_faces() -> None:
    """The crops are in R-Net's domain: it calls them faces (a sanity check of the data)."""
    with torch.no_grad():
        prob = load("rnet")(faces(7, 32, 24))[1][:, 1]
    assert prob.mean().item() > 0.9


@pytest.mark.parametrize("name", sorted(NETS))
def test_planted_dead_units_found_at_their_site(name: str) -> None:
    model = load(name)
    plant(model, NETS[name][3])
    d = gs.diagnose(model, batches(name, range(4)))
    assert keys(d) == {("DeadNeurons", NETS[name][3], tuple(PLANTED))}
    (p,) = d.problems
    assert p.site.op == "prelu"
    assert p.evidence["constant"] == PLANTED
    assert p.evidence["constant_values"] == pytest.approx([0.0] * 4, abs=0)


@pytest.mark.parametrize("name", sorted(NETS))
def test_operate_treats_planted_dead_units(name: str) -> None:
    model = load(name)
    layer = NETS[name][3]
    plant(model, layer)
    s0 = snapshot(model)
    data, held = batches(name, range(4)), batches(name, range(100, 102))
    # the dead units sit behind a per-channel PReLU: its slopes follow the units
    # (passes/fx/coupling.py); before that was supported every replacement was refused
    res = gs.operate(model, data)
    assert same_state(s0, model.state_dict())
    before, after = keys(res.before), keys(res.after)
    assert ("DeadNeurons", layer, tuple(PLANTED)) in before
    assert after < before
    if all(a.exact for a in res.applied.values()):  # before healing, on operate's held-out
        assert res.output_change <= EXACT_RTOL
    # after the default healing (100 steps): ~0.6% (R-Net) / ~0.4% (O-Net) when PReLU
    # coupling is simulated; our own held-out crops, float64 comparison
    assert rel_change(res.model, model, held) <= HEALED_RTOL
