"""ReinitDead's reset initialisation: ``init="layer"`` is the layer's plain initialiser (ReDo's
choice, nn.Linear's kaiming-uniform: |w| <= 1/sqrt(fan_in), not rescaled), the default
``"calibrated"`` adds a check on the calibration data (tests/surgery/test_reinit_trained.py),
the live-median rescale on request; the edit stays exact for dead units either way."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from graphsurg._problems import Problem, Site
from graphsurg.library import ReinitDead, Target


def _model() -> tuple[nn.Sequential, list[torch.Tensor]]:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4)).double()
    with torch.no_grad():
        m[0].weight.mul_(20.0)  # grown live rows: norm ~20x the initialiser's
        m[0].bias[[1, 5]] = -1e4  # two dead units
    return m, [torch.randn(16, 64, dtype=torch.float64) for _ in range(2)]


def _reset(init: str | None) -> tuple[nn.Sequential, nn.Sequential, list[torch.Tensor]]:
    model, batches = _model()
    r = ReinitDead() if init is None else ReinitDead(init=init)
    t = Target(copy.deepcopy(model), batches)
    prob = Problem("DeadNeurons", Site("0", "", "relu"), 0.1, (1, 5))
    assert r.check(prob, t) is None
    a = r.apply(t, prob, r.propose(prob, t))
    assert a.exact
    return model, t.model, batches


@pytest.mark.parametrize("init", [None, "layer", "median_live"])
def test_reset_is_exact_on_dead_units(init: str | None) -> None:
    model, m, batches = _reset(init)
    x = torch.cat(batches)
    with torch.no_grad():
        want, got = model(x), m(x)
    assert float((got - want).norm() / want.norm()) <= 1e-12  # float64, exact fold
    assert float(m[2].weight[:, [1, 5]].abs().max()) == 0.0
    assert float(m[0].bias[[1, 5]].abs().max()) == 0.0


def test_layer_reset_draws_from_the_layer_initialiser() -> None:
    _, m, _ = _reset("layer")
    rows = m[0].weight.detach()[[1, 5]]
    bound = 1 / math.sqrt(64)
    assert float(rows.abs().max()) <= bound
    # a U(-b, b) row of 64 entries has norm ~ b*sqrt(64/3) = 0.577; not rescaled to ~20x that
    assert 0.3 < float(rows.norm(dim=1).mean()) < 0.9


def test_median_live_rescales_to_the_live_rows() -> None:
    model, m, _ = _reset("median_live")
    live = [u for u in range(32) if u not in (1, 5)]
    ref = float(model[0].weight.detach()[live].norm(dim=1).median())
    norms = m[0].weight.detach()[[1, 5]].norm(dim=1)
    assert torch.allclose(norms, torch.full_like(norms, ref), rtol=1e-9)


def test_unknown_init_is_one_line_error() -> None:
    with pytest.raises(ValueError, match="use one of"):
        ReinitDead(init="xavier")


def test_fold_uses_the_callers_unit_means() -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2)).double()
    with torch.no_grad():
        m[0].bias.fill_(1.0)  # live, varying units
    batches = [torch.randn(4, 8, dtype=torch.float64)]
    r = ReinitDead()
    t = Target(copy.deepcopy(m), batches)
    prob = Problem("DeadNeurons", Site("0", "", "relu"), 0.1, (2, 4))
    params = {**r.propose(prob, t), "unit_means": [0.5, 2.0]}
    r.apply(t, prob, params)
    want = m[2].bias.detach() + m[2].weight.detach()[:, 2] * 0.5 + m[2].weight.detach()[:, 4] * 2
    torch.testing.assert_close(t.model[2].bias.detach(), want, rtol=1e-12, atol=1e-12)
    assert float(t.model[2].weight[:, [2, 4]].abs().max()) == 0.0
