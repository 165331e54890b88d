"""Continual backprop's contribution utility (mean|h| x sum|outgoing weights|): computed from
measurements for detection, and used by gs.SurgeryCallback(replace_rate=...) to replace
live-but-useless units (they fire, but nothing reads them)."""

from __future__ import annotations

from typing import Any

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


# -- the callback against continual backprop (Dohare et al., Nature 2024, Algorithm 1) ------
RHO, MATURITY, ETA = 0.05, 5, 0.9


class _CBP:
    """Float64 reference of CBP's rule for one hidden layer, step by step: age +1, utility
    ``eta u + (1 - eta) mean|h| sum|w_out|``, the units older than the maturity add ``rho``
    each to the count, ``int(count)`` of them, lowest utility first (ties: lowest index), are
    replaced (utility and age 0)."""

    def __init__(self, width: int) -> None:
        self.u = torch.zeros(width, dtype=torch.float64)
        self.age = torch.zeros(width, dtype=torch.float64)
        self.acc = 0.0

    def _due(self) -> tuple[torch.Tensor, int]:
        """Age +1; the units past maturity and how many of them are replaced this step."""
        self.age += 1
        eligible = (self.age > MATURITY).nonzero().flatten()
        self.acc += RHO * eligible.numel()
        k = int(self.acc)
        if k < 1:
            return eligible, 0
        self.acc -= k
        return eligible, k

    def ages(self) -> list[int]:
        """Only the schedule (no utility): the units due this step."""
        eligible, k = self._due()
        self.age[eligible[:k]] = 0.0
        return [int(i) for i in eligible[:k]]

    def step(self, h: torch.Tensor, w_out: torch.Tensor) -> list[int]:
        contrib = h.double().abs().mean(0) * w_out.double().abs().sum(0)
        self.u = ETA * self.u + (1 - ETA) * contrib
        eligible, k = self._due()
        worst = eligible[self.u[eligible].argsort(stable=True)[:k]]
        self.u[worst] = 0.0
        self.age[worst] = 0.0
        return sorted(int(i) for i in worst)


def _cbp_setup(every: int, opt_cls: type = torch.optim.SGD, lr: float = 0.05
               ) -> tuple[nn.Sequential, Any, torch.optim.Optimizer, gs.Monitor]:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    mon = gs.Monitor(every=every)
    c = torch.compile(model, backend="graphsurg", options={"monitor": mon, "inner": "aot_eager"})
    return model, c, opt_cls(model.parameters(), lr=lr), mon


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(2)
    return [(torch.randn(8, 4, generator=g), torch.randn(8, 2, generator=g)) for _ in range(n)]


def test_callback_replaces_the_units_cbp_replaces_step_by_step() -> None:
    """utility_every=1 with a monitor measuring every step: CBP exactly -- the same units
    replaced at the same steps, the same utilities (float32 activations: 1e-5 relative)."""
    model, c, opt, mon = _cbp_setup(every=1, lr=0.5)  # fast learning: utilities move
    cb = gs.SurgeryCallback(model, opt, mon, every=10**6, replace_rate=RHO, maturity=MATURITY,
                            utility_decay=ETA, utility_every=1)
    ref = _CBP(6)
    got_all, want_all = [], []
    for step, (x, y) in enumerate(_batches(80)):
        with torch.no_grad():
            h = torch.relu(model[0](x))  # what the forward below measures
        loss = ((c(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        want = ref.step(h, model[2].weight.detach())  # outgoing weights after the update
        rows = model[0].weight.detach().clone()
        cb.step((x, y))
        got = sorted(int(i) for i in (model[0].weight.detach() != rows).any(1).nonzero())
        got_all.append(got)
        want_all.append(want)
        assert got == want, (step, got, want)
        torch.testing.assert_close(cb.utility["0"], ref.u, rtol=1e-5, atol=1e-9)
        assert torch.equal(cb.age["0"], ref.age)
    torch._dynamo.reset()
    n = sum(len(w) for w in want_all)
    assert cb.replaced == n >= 10  # CBP's count: 0.05 x 6 eligible units per step
    assert len({u for w in want_all for u in w}) >= 4  # not the same fresh units over and over


def test_callback_follows_cbps_count_with_sparse_updates() -> None:
    """utility_every=7 and a monitor measuring one step in 3: the replacements due in a
    window are made at its end, as many as CBP's step-by-step count, and the replaced
    units' ages are the steps since CBP would have replaced them."""
    model, c, opt, mon = _cbp_setup(every=3)
    cb = gs.SurgeryCallback(model, opt, mon, every=10**6, replace_rate=RHO, maturity=MATURITY,
                            utility_decay=ETA, utility_every=7)
    ref = _CBP(6)
    due = 0
    for step, (x, y) in enumerate(_batches(140)):
        loss = ((c(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        due += len(ref.ages())
        cb.step((x, y))
        if (step + 1) % 7 == 0:
            assert cb.replaced == due, (step, cb.replaced, due)
            # the same multiset of ages as CBP's (which unit differs with the utility)
            assert sorted(cb.age["0"].tolist()) == sorted(ref.age.tolist()), step
    torch._dynamo.reset()
    assert due >= 25


def test_utility_replacement_is_cbps_generator() -> None:
    """A replaced unit: fresh incoming weights from the layer's initialiser (a new draw each
    time), bias 0, outgoing weights 0, the consumer's bias untouched (no fold) and Adam's
    moments zeroed for exactly those slices; never rolled back on the output change."""
    model, c, opt, mon = _cbp_setup(every=1, opt_cls=torch.optim.Adam, lr=1e-3)
    with torch.no_grad():
        model[2].weight.mul_(50.0)  # replacing any unit changes the output a lot
    cb = gs.SurgeryCallback(model, opt, mon, every=10**6, replace_rate=RHO, maturity=MATURITY,
                            utility_decay=ETA, utility_every=1)
    fresh: list[torch.Tensor] = []
    for x, y in _batches(60):
        loss = ((c(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        before = {k: v.detach().clone() for k, v in model.state_dict().items()}
        moments = {n: opt.state[p]["exp_avg"].clone() for n, p in model.named_parameters()}
        cb.step((x, y))
        rows = (model[0].weight.detach() != before["0.weight"]).any(1).nonzero().flatten()
        if rows.numel() == 0:
            continue
        fresh += list(model[0].weight.detach()[rows])
        assert float(model[0].weight[rows].abs().max()) <= 1 / 4 ** 0.5  # U(+-1/sqrt(fan_in))
        assert float(model[0].bias[rows].abs().max()) == 0.0
        assert float(model[2].weight[:, rows].abs().max()) == 0.0
        assert torch.equal(model[2].bias, before["2.bias"])  # no fold
        keep = torch.ones(6, dtype=torch.bool)
        keep[rows] = False
        st = {n: opt.state[p]["exp_avg"] for n, p in model.named_parameters()}
        assert float(st["0.weight"][rows].abs().max()) == 0.0
        assert float(st["0.bias"][rows].abs().max()) == 0.0
        assert float(st["2.weight"][:, rows].abs().max()) == 0.0
        assert torch.equal(st["0.weight"][keep], moments["0.weight"][keep])
        assert torch.equal(st["2.weight"][:, keep], moments["2.weight"][:, keep])
        assert torch.equal(st["2.bias"], moments["2.bias"])
    torch._dynamo.reset()
    assert not [r for e in cb.history for r in e.rolled_back]
    assert len(fresh) == cb.replaced >= 5
    # a fresh draw every time (not the same seeded row again)
    assert len({tuple(r.tolist()) for r in fresh}) == len(fresh)
