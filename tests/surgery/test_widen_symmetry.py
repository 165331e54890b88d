"""Widen's symmetry breaking: new units in output-cancelling pairs (the default) keep the
widening exact at surgery and are not copies of the old units, so they part under training;
Net2Net copies (``symmetry="copies"``) stay available."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import zoo
from torch import nn

from graphsurg._problems import Problem, Site
from graphsurg.library import Target, Widen


def _mlp() -> tuple[nn.Sequential, list[torch.Tensor]]:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3), nn.Tanh(),
                      nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 4)).double()
    return m, [torch.randn(32, 8, dtype=torch.float64) for _ in range(2)]


def _widen(model: nn.Module, batches: list[torch.Tensor], site: str, **kw: Any
           ) -> tuple[nn.Module, dict]:
    t = Target(copy.deepcopy(model), batches)
    r = Widen(**kw)
    prob = Problem("Bottleneck", Site(site))
    assert r.check(prob, t) is None
    params = r.propose(prob, t)
    a = r.apply(t, prob, params)
    return t.model, {**params, **a.details}


def test_pairs_are_exact_in_float64_and_fresh() -> None:
    model, batches = _mlp()
    m, d = _widen(model, batches, "2")
    assert d["symmetry"] == "pairs" and d["width_after"] == 8
    x = torch.cat(batches)
    with torch.no_grad():
        want, got = model(x), m(x)
    # float64: a pair's +a*h and -a*h cancel to round-off (tolerance 1e-12 relative)
    assert float((got - want).norm() / want.norm()) <= 1e-12
    w, w_old = m[2].weight.detach(), model[2].weight.detach()
    assert torch.equal(w[:3], w_old)  # existing units untouched
    assert torch.equal(m[4].weight[:, :3], model[4].weight)  # their outgoing weights too
    for k in (3, 5):  # each pair: one fresh row, opposite outgoing columns
        assert torch.equal(w[k], w[k + 1]) and float(m[2].bias[k]) == 0.0
        assert torch.equal(m[4].weight[:, k], -m[4].weight[:, k + 1])
        assert float(m[4].weight[:, k].abs().min()) > 0
        # not a copy (or a scaled copy) of an old unit
        cos = (w_old @ w[k]).abs() / (w_old.norm(dim=1) * w[k].norm())
        assert float(cos.max()) < 0.99
    assert float(m[4].weight[:, 7].abs().max()) == 0.0  # the odd one out: no output yet


def test_pairs_part_under_training_where_copies_stay_close() -> None:
    model, batches = _mlp()
    x = torch.cat(batches)
    y = torch.randn(x.shape[0], 4, dtype=torch.float64, generator=torch.Generator()
                    .manual_seed(1))

    def spread(symmetry: str) -> float:
        m, _ = _widen(model, batches, "2", symmetry=symmetry)
        opt = torch.optim.SGD(m.parameters(), lr=0.05)
        for _ in range(20):
            opt.zero_grad()
            ((m(x) - y) ** 2).mean().backward()
            opt.step()
        with torch.no_grad():
            h = m[:4](x)  # the widened layer's units
        c = torch.corrcoef(h.T).abs().nan_to_num(1.0)
        c.fill_diagonal_(0.0)
        return float(c[3:].max(dim=1).values.mean())  # new units' nearest twin

    pairs, copies = spread("pairs"), spread("copies")
    assert pairs < 0.99  # the pair members parted
    assert copies > 0.99  # Net2Net copies are still (almost) their sources
    assert pairs < copies


@pytest.mark.parametrize("training", [False, True])
def test_pairs_through_batchnorm_are_exact(training: bool) -> None:
    case = zoo.dead_cnn()
    m, _ = _widen(case.model, case.batches[:2], "conv1")
    ref = copy.deepcopy(case.model).train(training)
    m.train(training)
    x = case.batches[0][0]
    with torch.no_grad():
        got, want = m(x), ref(x)
    assert float((got - want).norm() / want.norm()) <= 1e-5  # float32 model


def test_unknown_symmetry_is_one_line_error() -> None:
    with pytest.raises(ValueError, match="use one of"):
        Widen(symmetry="mirror")


def test_row_and_column_scales_scale_the_draw_and_stay_exact() -> None:
    """``row_scale`` / ``column_scale`` multiply the pairs' fresh rows / outgoing columns (the
    same seeded draw as at 1.0); the widening stays exact (float64, 1e-12 relative)."""
    model, batches = _mlp()
    x = torch.cat(batches)
    ref, d1 = _widen(model, batches, "2", row_scale=1.0, column_scale=1.0)
    m, d = _widen(model, batches, "2", row_scale=0.25, column_scale=2.0)
    assert (d1["row_scale"], d1["column_scale"]) == (1.0, 1.0)
    assert (d["row_scale"], d["column_scale"]) == (0.25, 2.0)
    with torch.no_grad():
        want, got = model(x), m(x)
    assert float((got - want).norm() / want.norm()) <= 1e-12
    assert torch.equal(m[2].weight[:3], model[2].weight)  # existing units untouched
    assert torch.equal(m[4].weight[:, :3], model[4].weight)
    # the draws are float32 (then cast): 1e-6 relative
    torch.testing.assert_close(m[2].weight[3:], 0.25 * ref[2].weight[3:], rtol=1e-6, atol=0)
    torch.testing.assert_close(m[4].weight[:, 3:], 2.0 * ref[4].weight[:, 3:], rtol=1e-6,
                               atol=0)
    assert float(m[2].weight[3:].abs().max()) > 0  # not zero rows (those read as rank collapse)


def test_default_scales_are_carried_by_the_plan() -> None:
    model, batches = _mlp()
    _, d = _widen(model, batches, "2")
    assert (d["row_scale"], d["column_scale"]) == (Widen().row_scale, Widen().column_scale)
    assert (Widen().row_scale, Widen().column_scale) == (0.25, 2.0)


@pytest.mark.parametrize("kw", [{"row_scale": 0.0}, {"column_scale": -1.0},
                                {"row_scale": float("nan")}])
def test_bad_scale_is_one_line_error(kw: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="positive finite"):
        Widen(**kw)
