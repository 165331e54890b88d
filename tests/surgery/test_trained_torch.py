"""Trained torch networks from a pinned PyPI wheel: facenet-pytorch 2.6.0's MTCNN R-Net and
O-Net (``facenet_pytorch/data/{rnet,onet}.pt``, state dicts, per-channel PReLU).

The wheel (1.9 MB) is fetched at test time by ``tests/_wheels.py`` (``pip download --no-deps``,
not installed, no package code imported; sha256-pinned members); without pip or network the
tests are skipped with the reason. The architectures (``tests/conformance/trained.py``, shared
with the corpus entries ``mtcnn_rnet`` / ``mtcnn_onet``) are written from the state-dict keys
and follow facenet's ``mtcnn.py`` (including the W/H permute of the Caffe port before the
dense layers). Inputs are synthetic face-like crops (a skin-toned blob with darker eyes and
mouth on a graded background, RGB, ``(x - 127.5) / 128``): 24x24 for R-Net, 48x48 for O-Net.
"""

from __future__ import annotations

import pytest
import torch
from _helpers import rel_change, same_state, snapshot
from torch import nn

import graphsurg as gs
from tests.conformance.trained import MTCNN, faces, mtcnn

#: float32 round-off of an exact edit on outputs of order 1 (relative, float64 comparison)
EXACT_RTOL = 1e-5
HEALED_RTOL = 0.05  # outputs after treatment and default healing stay within 5%
PLANTED = [3, 17, 40, 99]  # units of the dense layer made dead (constant 0 after the PReLU)


#: name -> (wheel member, architecture, crop size, dense layer whose output units get planted)
NETS = MTCNN


def load(name: str) -> nn.Module:
    return mtcnn(name)


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
