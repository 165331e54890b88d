"""The planner: scale selection, spectra, conflicts, JSON, SurgeryFailed."""

from __future__ import annotations

from typing import Any

import pytest
import zoo

import graphsurg as gs
from graphsurg._problems import Diagnosis, Problem, Site
from graphsurg.library import Applied, Replacement, Target


def _truth_diagnosis(case: zoo.ZooCase) -> Diagnosis:
    probs = []
    for t in case.truth:
        frac = len(t.units) / 64 if t.units else 1.0
        probs.append(Problem(t.kind, Site(t.module, "", "relu"), frac, t.units,
                             evidence={"fraction": frac}))
    return Diagnosis(problems=probs)


def test_dead_units_get_neuron_scale_reinit_with_a_spectrum() -> None:
    case = zoo.dead_mlp()
    p = gs.plan(case.model, _truth_diagnosis(case), data=case.batches[:2])
    assert [(s.replacement, s.scale, s.site.module) for s in p.schemas] == [
        ("reinit_dead", "neuron", "0"), ("reinit_dead", "neuron", "2")]
    assert all(s.exact for s in p.schemas)
    sp = p.schemas[0].spectrum
    assert len(sp["sigma"]) >= 1 and sp["sigma"] == sorted(sp["sigma"], reverse=True)
    assert "reinit_dead" in p.summary()


def test_most_of_a_layer_dead_escalates_to_layer_scale() -> None:
    case = zoo.dead_mlp()
    units = tuple(range(0, 64, 1))[:48]
    d = Diagnosis(problems=[Problem("DeadNeurons", Site("0", "", "relu"), 0.75, units,
                                    evidence={"fraction": 0.75})])
    p = gs.plan(case.model, d, data=case.batches[:2])
    assert [s.replacement for s in p.schemas] == ["reinit_dead", "activation_swap"]
    assert p.schemas[1].fallback is not None  # the exact ramp if the swap moves f too far


def test_vanishing_gradient_picks_residual_unless_exactness_is_required() -> None:
    case = zoo.deep_sigmoid()
    span = tuple(str(i) for i in range(0, 20, 2))
    d = Diagnosis(problems=[Problem("VanishingGradient", Site("0"), 1.0, span=span)])
    p = gs.plan(case.model, d, data=case.batches[:2])
    (s,) = p.schemas
    assert s.replacement == "residual_bypass" and s.params["variant"] == "residual"
    assert s.spectrum["collapsed"]
    p = gs.plan(case.model, d, data=case.batches[:2],
                certificates=gs.Certificates(require_exact=True))
    assert p.schemas[0].params["variant"] == "gated" and p.schemas[0].exact


def test_prefer_and_conflicts() -> None:
    case = zoo.dead_mlp()
    d = _truth_diagnosis(case)
    p = gs.plan(case.model, d, data=case.batches[:2], prefer=["excise_dead"])
    assert {s.replacement for s in p.schemas} == {"excise_dead"}
    # two problems at the same site: the second would re-edit the same units -> untreated
    dup = Diagnosis(problems=[d.problems[0], d.problems[0]])
    p = gs.plan(case.model, dup, data=case.batches[:2])
    assert len(p.schemas) == 1 and "conflicts" in p.untreated[0][1]


def test_plan_json_round_trip() -> None:
    case = zoo.dead_mlp()
    p = gs.plan(case.model, _truth_diagnosis(case), data=case.batches[:2])
    q = gs.SurgeryPlan.from_json(p.to_json())
    assert q.to_dict() == p.to_dict()
    with pytest.raises(ValueError, match="not a graphsurg plan"):
        gs.SurgeryPlan.from_json("{}")


def test_surgery_failed_only_when_nothing_can_be_treated() -> None:
    case = zoo.dead_mlp()
    with pytest.raises(gs.SurgeryFailed, match="no problems"):
        gs.plan(case.model, Diagnosis(), data=case.batches[:2])
    gone = Problem("DeadNeurons", Site("nope", "", "relu"), 0.1, (1,))
    with pytest.raises(gs.SurgeryFailed, match="nope") as e:
        gs.plan(case.model, Diagnosis(problems=[gone]), data=case.batches[:2])
    assert len(e.value.untreated) == 1
    # one treatable problem is enough: the other is listed with its reason
    p = gs.plan(case.model, Diagnosis(problems=[gone, _truth_diagnosis(case).problems[0]]),
                data=case.batches[:2])
    assert len(p.schemas) == 1 and p.untreated[0][0] == gone


class Zeroise(Replacement):
    """A user replacement: sets the flagged units' bias to 0 (treats DeadNeurons)."""

    name = "zeroise"
    treats = ("DeadNeurons",)
    scales = ("neuron",)
    guarantee = "bounded"
    priority = 0

    def apply(self, target: Target, problem: Problem, params: dict[str, Any]) -> Applied:
        layer: Any = target.model.get_submodule(problem.site.module)
        layer.bias.data[list(problem.units)] = 0.0
        return Applied(exact=False, modules=[problem.site.module], units=list(problem.units))


def test_a_registered_replacement_is_planned_and_applied() -> None:
    case = zoo.dead_mlp()
    lib = gs.default_library()
    lib.register(Zeroise())
    d = _truth_diagnosis(case)
    p = gs.plan(case.model, d, library=lib, data=case.batches[:2], prefer=["zeroise"])
    assert {s.replacement for s in p.schemas} == {"zeroise"}
    res = gs.operate(case.model, case.batches, loss_fn=case.loss_fn, library=lib, diagnosis=d,
                     surgery_plan=p, heal_steps=5, rediagnose=False,
                     certificates=gs.Certificates(max_loss_increase=10.0))
    assert res.kept == [0, 1]
    assert abs(float(res.model.get_submodule("0").bias[0].detach())) < 1.0  # was -50; healed 5 steps
