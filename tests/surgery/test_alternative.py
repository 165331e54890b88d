"""A bounded treatment that is rolled back gives way to the exact alternative the planner
found for the same problem (issue 14: MTCNN O-Net's ``reinit_dead`` -- bounded there, a
consumer fold it cannot make exact -- was rolled back for held-out loss and the problem left
untreated, although ``excise_dead`` removes the dead units exactly).

The bounded treatment here is ``Jolt``: a replacement written for the test that the planner
prefers (priority 1) and that breaks a certificate on purpose -- its output change breaks
``max_output_change`` (rolled back at build), or it leaves the dead units dead (rolled back
by the dead-unit certificate after verification). Function preservation of the result is
measured in float64 with a relative tolerance of 1e-6 (an exact excision leaves only
float32 rounding of the re-run).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from _helpers import assert_treated, same_state, snapshot
from torch import nn

import graphsurg as gs
from graphsurg.library import ExciseDead, Library
from graphsurg.library._base import Applied, Replacement
from graphsurg.library._edit import get_layer

TOL = 1e-6
DEAD = (2, 7, 11)


class Jolt(Replacement):
    """Scales the site layer's live rows by ``factor`` (a bounded edit that treats nothing)."""

    name = "jolt"
    treats = ("DeadNeurons",)
    scales = ("neuron",)
    guarantee = "bounded"
    priority = 1

    def __init__(self, factor: float) -> None:
        self.factor = factor

    def check(self, problem: gs.Problem, target: Any) -> str | None:
        return None

    def propose(self, problem: gs.Problem, target: Any, *, exact: bool = False
                ) -> dict[str, Any]:
        return {"units": list(problem.units), "exact": False}

    def apply_torch(self, target: Any, problem: gs.Problem, params: dict[str, Any]) -> Applied:
        layer = get_layer(target, problem.site.module)
        with torch.no_grad():
            layer.weight.mul_(self.factor)
        target.invalidate()
        return Applied(exact=False, modules=[problem.site.module], units=list(params["units"]))


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _model() -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    m = _MLP().eval()
    with torch.no_grad():
        m.fc1.weight[list(DEAD)] = 0.0
        m.fc1.bias[list(DEAD)] = -5.0
    g = torch.Generator().manual_seed(1)
    return m, [torch.randn(32, 6, generator=g) for _ in range(4)]


def _rel64(a: nn.Module, b: nn.Module, data: list[torch.Tensor]) -> float:
    a64, b64 = copy.deepcopy(a).double(), copy.deepcopy(b).double()
    with torch.no_grad():
        return max(float((a64(x.double()) - b64(x.double())).norm() / b64(x.double()).norm())
                   for x in data)


def _library(factor: float) -> Library:
    return Library([Jolt(factor), ExciseDead()])


def test_plan_records_the_exact_alternative_of_a_bounded_schema() -> None:
    model, data = _model()
    d = gs.diagnose(model, data)
    p = gs.plan(model, d, library=_library(3.0), data=data)
    (s,) = p.schemas
    assert (s.replacement, s.exact, s.fallback) == ("jolt", False, None)
    assert s.alternative is not None and s.alternative["replacement"] == "excise_dead"
    assert s.alternative["params"]["units"] == list(DEAD)
    assert type(s).from_dict(s.to_dict()).alternative == s.alternative


def _check_alternative_applied(res: gs.SurgeryResult, model: nn.Module,
                               data: list[torch.Tensor], why: str) -> None:
    assert_treated(res, "DeadNeurons", "fc1", DEAD)
    (v,) = res.verification
    assert (v.replacement, v.kept, v.exact, v.variant) == ("excise_dead", True, True,
                                                           "alternative")
    assert any("jolt" in n and why in n and "excise_dead" in n for n in res.notes), res.notes
    assert res.model.fc1.out_features == 16 - len(DEAD)
    assert _rel64(res.model, model, data) <= TOL


def test_alternative_applied_when_the_bounded_edit_moves_the_output_too_far() -> None:
    """Jolt x3 moves the output far beyond max_output_change 0.5: rolled back at build."""
    model, data = _model()
    state = snapshot(model)
    res = gs.operate(model, data, library=_library(3.0))
    assert same_state(snapshot(model), state)
    _check_alternative_applied(res, model, data, "max_output_change")


def test_alternative_applied_when_the_bounded_edit_leaves_the_problem() -> None:
    """Jolt x1.01 stays within max_output_change but leaves the dead units dead: rolled back
    by the dead-unit certificate after verification, then excised."""
    model, data = _model()
    state = snapshot(model)
    res = gs.operate(model, data, library=_library(1.01))
    assert same_state(snapshot(model), state)
    _check_alternative_applied(res, model, data, "dead")


def test_without_an_alternative_the_bounded_edit_is_only_rolled_back() -> None:
    model, data = _model()
    try:
        res = gs.operate(model, data, library=Library([Jolt(3.0)]))
    except gs.SurgeryFailed as e:
        assert "jolt" in str(e) or "rolled back" in str(e)
        return
    assert not res.kept and res.rolled_back[0]["replacement"] == "jolt"
