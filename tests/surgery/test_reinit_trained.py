"""ReinitDead on a trained-like network: the default reset (``init="calibrated"``) revives
planted dead units where ReDo's plain draw (``init="layer"``) leaves them dormant.

The net is a conv stack whose site layer reads post-ReLU inputs (all >= 0) and whose live rows
have grown ~25x past the initialiser's scale, as a trained CREPE's conv5 has (row norms ~13
against the draw's ~0.6). A plain draw then scores ~1/25 of the layer's mean ``|h|``: dormant
by ReDo's own score (tau 0.1) on held-out data. The calibrated reset checks the drawn units on
the calibration batches and scales (re-centring those that would rarely fire) just past the
threshold; outgoing weights are zeroed, so the edit preserves the function (float64).
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

import graphsurg as gs
from graphsurg._problems import Problem
from graphsurg.library import ReinitDead, Target

DEAD = (0, 3, 6, 9, 12, 15, 18, 21)  # 8 of 24: at least the detector's 25% when dormant
GROWN = 25.0


def _net() -> tuple[nn.Sequential, list[torch.Tensor], list[torch.Tensor]]:
    """(float64 model with DEAD planted in layer "2", calibration batches, held-out batches)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv1d(3, 16, 3, padding=1), nn.ReLU(),
                      nn.Conv1d(16, 24, 3, padding=1), nn.ReLU(),
                      nn.Conv1d(24, 4, 1)).double()
    with torch.no_grad():
        m[2].weight.mul_(GROWN)  # grown live rows; its inputs are post-ReLU (all >= 0)
        m[2].weight[list(DEAD)] = 0.0
        m[2].bias[list(DEAD)] = -50.0
    batches = [torch.randn(8, 3, 32, dtype=torch.float64) for _ in range(6)]
    return m, batches[:3], batches[3:]


def _problem(model: nn.Module, batches: list[torch.Tensor]) -> Problem:
    """The diagnosis's DeadNeurons problem at layer "2" (its evidence: tau...), on the planted
    units only (a live unit the draw left dormant varies: resetting it is not exact)."""
    d = gs.diagnose(model, batches)
    (p,) = [p for p in d.problems if p.kind == "DeadNeurons" and p.site.module == "2"]
    assert set(DEAD) <= set(p.units)
    return dataclasses.replace(p, units=DEAD)


def _reset(init: str | None, seed: int = 0) -> tuple[nn.Sequential, Target, gs.Problem, dict]:
    model, calib, _ = _net()
    prob = _problem(model, calib)
    r = ReinitDead() if init is None else ReinitDead(init=init)
    t = Target(copy.deepcopy(model), calib, seed=seed)
    assert r.check(prob, t) is None
    a = r.apply(t, prob, r.propose(prob, t))
    assert a.exact
    return model, t, prob, a.details


def _flagged(model: nn.Module, batches: list[torch.Tensor]) -> set[int]:
    """Units of layer "2" the diagnosis flags DeadNeurons on ``batches``."""
    d = gs.diagnose(model, batches)
    return {u for p in d.problems if p.kind == "DeadNeurons" and p.site.module == "2"
            for u in p.units}


def test_plain_draw_leaves_the_units_dormant_on_held_out_data() -> None:
    _, t, _, _ = _reset("layer")
    _, _, held = _net()
    assert set(DEAD) & _flagged(t.model, held), "the plain draw is expected to stay dormant"


def test_default_reset_revives_the_units_on_held_out_data() -> None:
    _, t, _, details = _reset(None)
    _, _, held = _net()
    assert not set(DEAD) & _flagged(t.model, held)
    assert set(details["calibrated"]) <= set(DEAD) and details["calibrated"]
    # each treated unit fires on some held-out inputs and not on all (it varies)
    x = torch.cat(held)
    with torch.no_grad():
        z = t.model[2](t.model[1](t.model[0](x)))
    rate = (z[:, list(DEAD)] > 0).double().mean(dim=(0, 2))
    assert bool((rate > 0.05).all()) and bool((rate < 1.0).all()), rate


def test_default_reset_preserves_the_function() -> None:
    model, t, _, _ = _reset(None)
    _, calib, held = _net()
    with torch.no_grad():
        for x in calib + held:
            want, got = model(x), t.model(x)
            rel = float((got - want).norm() / want.norm())
            assert rel <= 1e-6, rel  # float64 model and reference; the fold is exact
    assert float(t.model[4].weight[:, list(DEAD)].abs().max()) == 0.0
    assert torch.equal(model[2].weight, _net()[0][2].weight)  # the user's model untouched


def test_default_reset_is_seeded() -> None:
    _, a, _, _ = _reset(None, seed=3)
    _, b, _, _ = _reset(None, seed=3)
    _, c, _, _ = _reset(None, seed=4)
    assert torch.equal(a.model[2].weight, b.model[2].weight)
    assert torch.equal(a.model[2].bias, b.model[2].bias)
    assert not torch.equal(a.model[2].weight, c.model[2].weight)


def test_units_that_pass_keep_the_plain_draw() -> None:
    """An untrained layer (rows at the initialiser's scale): most drawn units already score
    like the live ones and keep ReDo's draw bit for bit; only the others are adjusted, and
    never scaled down."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv1d(3, 16, 3, padding=1), nn.ReLU(),
                      nn.Conv1d(16, 24, 3, padding=1), nn.ReLU(), nn.Conv1d(24, 4, 1)).double()
    with torch.no_grad():
        m[2].weight[list(DEAD)] = 0.0
        m[2].bias[list(DEAD)] = -50.0
    _, calib, _ = _net()
    prob = _problem(m, calib)
    got = []
    for init in ("calibrated", "layer"):
        r = ReinitDead(init=init)
        t = Target(copy.deepcopy(m), calib)
        a = r.apply(t, prob, r.propose(prob, t))
        got.append((t.model[2].weight.detach().clone(), t.model[2].bias.detach().clone(),
                    a.details.get("calibrated")))
    changed = set(got[0][2] or {})
    kept = [u for u in DEAD if u not in changed]
    assert len(kept) >= len(DEAD) // 2, changed
    assert torch.equal(got[0][0][kept], got[1][0][kept])
    assert torch.equal(got[0][1][kept], got[1][1][kept])
    assert all(v >= 1.0 for v in (got[0][2] or {}).values())
