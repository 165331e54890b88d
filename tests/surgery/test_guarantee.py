"""The surgery guarantee (issue 13): issues(f') is a strict subset of issues(f), checked on
held-out batches, achieved by closed-loop surgery, and a schema that creates problems is
treated in a follow-up round or rolled back alone."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from torch import nn

import graphsurg as gs
from graphsurg import _zoo
from graphsurg._problems import Diagnosis, Problem, Site
from graphsurg._verify import UnitMap, relate
from graphsurg.library import Applied, Target
from graphsurg.library.reinit_dead import ReinitDead

HEAL = 30  # healing steps (CPU budget); the demo uses 100
BROKEN = [n for n in _zoo.ZOO if not n.startswith("healthy")]


@pytest.mark.parametrize("name", BROKEN)
def test_every_broken_zoo_network_ends_with_a_strict_subset(name: str) -> None:
    torch.set_num_threads(1)
    case = _zoo.build(name)
    res = gs.operate(case.model, case.batches, loss_fn=case.loss_fn, heal_steps=HEAL)
    g = res.guarantee
    assert g["checked"] and res.strict_subset, res.summary()
    assert not g["new"] and len(g["resolved"]) >= 1 and g["after"] < g["before"]
    d = json.loads(res.to_json())
    assert d["guarantee"]["strict_subset"] is True and d["diagnoses"] >= 1
    assert "is a strict subset of issues(f)" in res.summary()
    if name == "deep_sigmoid":  # treated without trading it for saturation, and it trains
        h = res.healing
        assert h["treated_loss"] < h["untreated_loss"], res.summary()
        assert h["treated_loss"] <= h["input_loss"]


def test_healthy_network_has_nothing_to_operate_on() -> None:
    case = _zoo.build("healthy_mlp")
    with pytest.raises(gs.SurgeryFailed, match="no problems"):
        gs.operate(case.model, case.batches, loss_fn=case.loss_fn, heal_steps=HEAL)


# -- matching through renames --------------------------------------------------------------
def _p(kind: str, module: str, units: tuple[int, ...] = (), node: str = "") -> Problem:
    return Problem(kind, Site(module, node, "relu"), 0.1, units)


def test_relate_matches_by_module_through_node_renames_and_excised_units() -> None:
    before = Diagnosis(problems=[_p("DeadNeurons", "0", (1, 5, 9), "relu"),
                                 _p("DeadNeurons", "2", (3,), "relu_1"),
                                 _p("Bottleneck", "4")])
    # layer 0 lost units 0 and 1 (excised): new index 3 was 5, new 7 was 9; the swap renamed
    # relu_1 -> relu_7; 4 was split into 4.0/4.1 and still has its bottleneck
    um = UnitMap(split={"0": "0", "4": "4"}, kept={"0": list(range(2, 12))})
    after = Diagnosis(problems=[_p("DeadNeurons", "0", (3, 7), "relu"),
                                _p("Bottleneck", "4.0")])
    rel = relate(before, after, [um])
    assert [p.site.module for p in rel.resolved] == ["2"]
    assert len(rel.remaining) == 2 and not rel.new and rel.strict_subset
    # a unit that was healthy before (new index 0 = old 2) is a new problem, in f' numbering
    after2 = Diagnosis(problems=[_p("DeadNeurons", "0", (0, 3), "relu")])
    rel2 = relate(before, after2, [um])
    assert [p.units for p in rel2.new] == [(0,)] and not rel2.strict_subset
    assert [p.units for p in rel2.remaining] == [(3,)]


# -- a planted schema that creates a problem ------------------------------------------------
class SaturatesLater(ReinitDead):
    """Revives dead units at its site -- and drives 4 units of the later tanh layer '2' into
    saturation (bias +20): a schema that creates a new problem."""

    name = "saturates_later"
    treats = ("DeadNeurons",)
    priority = 0

    def check(self, problem: Problem, target: Target) -> str | None:
        if problem.site.module != "0":
            return "planted only at layer 0"
        return super().check(problem, target)

    def apply_torch(self, target: Target, problem: Problem, params: dict[str, Any]) -> Applied:
        a = super().apply_torch(target, problem, params)
        with torch.no_grad():
            target.model.get_submodule("2").bias[:4] = 20.0
        a.exact = False
        return a


def _case() -> tuple[nn.Module, list[Any], Any]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh(),
                          nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    with torch.no_grad():
        model[0].bias[::4] = -50.0  # 8 dead units at layer 0
        model[4].bias[1::8] = -50.0  # 4 dead units at layer 4
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(64, 16, generator=g), torch.randn(64, 4, generator=g))
               for _ in range(8)]
    return model, batches, lambda out, b: nn.functional.mse_loss(out, b[1])


def test_a_new_problem_is_treated_by_a_follow_up_round() -> None:
    model, batches, loss = _case()
    lib = gs.Library([SaturatesLater(), ReinitDead()])
    res = gs.operate(model, batches, loss_fn=loss, library=lib, heal_steps=HEAL)
    assert res.rounds and res.rounds[0]["problems"][0].startswith("Saturation at 2"), \
        res.summary()
    follow = [v for v in res.verification if v.round == 1]
    assert follow and all(v.kept for v in follow) and follow[0].site.startswith("2")
    assert res.strict_subset, res.summary()
    assert res.kept_at("saturates_later")


def test_a_schema_whose_new_problem_cannot_be_treated_is_rolled_back_alone() -> None:
    model, batches, loss = _case()
    lib = gs.Library([SaturatesLater(), ReinitDead()])
    res = gs.operate(model, batches, loss_fn=loss, library=lib, heal_steps=HEAL,
                     certificates=gs.Certificates(max_rounds=0))
    (bad,) = [v for v in res.verification if not v.kept]
    assert bad.replacement == "saturates_later" and "created Saturation at 2" in bad.reasons[0]
    assert bad.created and res.rolled_back[0]["replacement"] == "saturates_later"
    kept = [v for v in res.verification if v.kept]
    assert kept and all(v.replacement == "reinit_dead" for v in kept)  # the other site stays
    g = res.guarantee
    assert res.strict_subset and not g["new"], res.summary()
    assert [r["site"] for r in g["resolved"]] == ["4:relu_1"]
    assert "rolled back: #" in res.summary()


def test_surgery_failed_lists_what_was_tried_and_what_it_created() -> None:
    model, batches, loss = _case()
    with torch.no_grad():
        model[4].bias.zero_()  # only layer 0 is broken now
    lib = gs.Library([SaturatesLater()])  # nothing in it treats Saturation
    with pytest.raises(gs.SurgeryFailed) as e:
        gs.operate(model, batches, loss_fn=loss, library=lib, heal_steps=HEAL,
                   certificates=gs.Certificates(max_output_change=1.0))
    assert "without creating problems" in str(e.value)
    (problem, why), = e.value.untreated
    assert problem.kind == "DeadNeurons" and problem.site.module == "0"
    assert "tried saturates_later" in why and "Saturation at 2" in why


def test_defaults_treat_a_mostly_dormant_relu_network() -> None:
    """Issue 13: the old default (treated loss <= healed untreated loss exactly) rolled back
    every schema of a 54%-dormant ReLU network 1% above it; the defaults now treat it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 4))
    with torch.no_grad():
        model[0].bias[:35] = -50.0  # 55% of layer 0 dormant
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(128, 16, generator=g), torch.randn(128, 4, generator=g))
               for _ in range(8)]
    res = gs.operate(model, batches, loss_fn=lambda o, b: nn.functional.mse_loss(o, b[1]),
                     heal_steps=HEAL)
    assert res.kept and not res.rolled_back, res.summary()
    assert res.strict_subset, res.summary()
    h = res.healing
    assert h.get("loss_vs_input_ok", True) and h["input_loss"] is not None


def test_certificates_validate_the_new_bounds() -> None:
    with pytest.raises(ValueError, match="max_rounds"):
        gs.Certificates(max_rounds=-1)
    with pytest.raises(ValueError, match="max_relative_loss_increase"):
        gs.Certificates(max_relative_loss_increase=float("nan"))
    c = gs.Certificates()
    assert c.require_strict_subset and c.max_rounds == 2
    assert gs.Certificates.from_dict(c.to_dict()) == c
