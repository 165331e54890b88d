"""Continual backprop's contribution utility (mean|h| x sum|outgoing weights|): computed from
measurements for detection, and used by gs.SurgeryCallback(replace_rate=...) to replace
live-but-useless units (they fire, but nothing reads them)."""

from __future__ import annotations

import pytest
import torch
from graphsurg.passes.fx.adapter import TorchAdapter
from torch import nn

import graphsurg as gs
from graphsurg._config import DiagnoseConfig
from graphsurg.detect.dead import contribution_utility, lowest_utility, site_utility


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    with torch.no_grad():
        m[0].bias.fill_(0.5)  # every unit fires
        m[2].weight[:, [1, 4]] = 0.0  # units 1 and 4: live, useless
    return m


def test_site_utility_matches_a_float64_reference() -> None:
    m = _mlp()
    xs = [torch.randn(64, 8) for _ in range(2)]
    meas = TorchAdapter(m).observe(xs, DiagnoseConfig())
    site = next(s for s in meas.sites if s.module == "0")
    got = site_utility(meas, site)
    assert got is not None
    x = torch.cat(xs).double()
    h = torch.relu(x @ m[0].weight.double().T + m[0].bias.double())
    want = h.abs().mean(0) * m[2].weight.double().abs().sum(0)
    # float32 activations streamed into float64 statistics: 1e-5 relative
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert got[1] == 0 and got[4] == 0 and bool((got[[0, 2, 3, 5]] > 0).all())
    assert lowest_utility(got, torch.ones(6, dtype=torch.bool), 2) == [1, 4]


def test_lowest_utility_respects_eligibility_and_never_takes_the_whole_layer() -> None:
    u = torch.tensor([0.1, 0.0, 0.3, 0.2], dtype=torch.float64)
    young = torch.tensor([True, False, True, True])
    assert lowest_utility(u, young, 1) == [0]
    assert lowest_utility(u, young, 2, exclude=[0]) == [2, 3]
    assert len(lowest_utility(u, torch.ones(4, dtype=torch.bool), 10)) == 3
    with pytest.raises(ValueError, match="one per unit"):
        contribution_utility(u, u[:2])


def test_callback_replaces_live_useless_units() -> None:
    model = _mlp()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(32, 8, generator=g), torch.randn(32, 3, generator=g))
               for _ in range(4)]
    useless_rows = model[0].weight.detach()[[1, 4]].clone()
    mon = gs.Monitor(every=1)
    c = torch.compile(model, backend="graphsurg", options={"monitor": mon, "inner": "aot_eager"})
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: only the callback edits
    cb = gs.SurgeryCallback(model, opt, mon, every=10, replace_rate=0.05, maturity=10,
                            utility_every=5)
    for step in range(40):
        b = batches[step % len(batches)]
        loss = ((c(b[0]) - b[1]) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        cb.step(b)
    torch._dynamo.reset()
    assert cb.replaced >= 2
    applied = [a for e in cb.history for a in e.applied]
    assert any("(utility" in a for a in applied), applied
    # the useless units were the first replaced: fresh incoming rows, outgoing still zero
    new_rows = model[0].weight.detach()[[1, 4]]
    assert not torch.equal(new_rows, useless_rows)
    assert float(new_rows.abs().max()) <= 1 / 8 ** 0.5  # the layer's initialiser bound
    assert float(model[2].weight[:, [1, 4]].abs().max()) == 0.0
    assert bool((cb.age["0"][[1, 4]] < 40).all())


def test_callback_rejects_bad_utility_settings() -> None:
    m = _mlp()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with pytest.raises(gs.BadInputError, match="replace_rate"):
        gs.SurgeryCallback(m, opt, gs.Monitor(), replace_rate=1.5)
    with pytest.raises(gs.BadInputError, match="utility_every"):
        gs.SurgeryCallback(m, opt, gs.Monitor(), replace_rate=0.1, utility_every=0)


def test_dormant_every_layer_reports_the_first_layer_with_the_broken_one() -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                      nn.Linear(16, 2))
    with torch.no_grad():
        m[0].bias[[3]] = -1e3  # one unit of the first layer dead: flagged (a dead unit)
        m[0].weight[5] *= 1e-3  # one dormant, firing unit: below the 25% threshold
        m[0].bias[5] = 0.0
        m[2].bias[:10] = -1e3  # the second layer: 10 of 16 dead
    data = [torch.randn(64, 8) for _ in range(2)]
    cfg = gs.DiagnoseConfig()
    plain = gs.diagnose(m, data, config=cfg).of_kind("DeadNeurons")
    assert {p.site.module: p.units for p in plain} == {"0": (3, 5), "2": tuple(range(10))}
    with torch.no_grad():
        m[0].bias[3] = 0.5  # the first layer alone is healthy now (one dormant unit)
    plain = gs.diagnose(m, data, config=cfg).of_kind("DeadNeurons")
    assert [p.site.module for p in plain] == ["2"]
    every = gs.diagnose(m, data, config=cfg.replace(dormant_every_layer=True)).of_kind(
        "DeadNeurons")
    assert [p.site.module for p in every] == ["0", "2"]  # forward order
    assert every[0].units == (5,) and every[0].evidence["n_dead"] == 0
    # nothing broken anywhere: nothing reported, whatever the option
    with torch.no_grad():
        m[2].bias[:10] = 0.5
    assert gs.diagnose(m, data, config=cfg.replace(dormant_every_layer=True)).of_kind(
        "DeadNeurons") == []
