"""Module-scale surgery and the rest of the canonical library (issue 9): zero-gated attention,
dropout, plasticity injection (exact at insertion), local distillation (bounded, error
reported on held-out inputs), planner escalation, over-fitting diagnosis."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import zoo
from _helpers import rel_change
from torch import nn
from torch.nn import functional as F

import graphsurg as gs
from graphsurg._heal import heal, mean_loss
from graphsurg._problems import Diagnosis, Problem, Site
from graphsurg.library import Applied, Target, canonical_library
from graphsurg.library.distill import Distill, build_replacement
from graphsurg.library.reinit_dead import ReinitDead

# Exact edits: float32 round-off only (the default Certificates.exact_tolerance).
EXACT = 1e-5


def _apply(model: nn.Module, batches: list[Any], problem: Problem, name: str,
           **params: Any) -> tuple[nn.Module, Applied]:
    lib = canonical_library()
    t = Target(copy.deepcopy(model), batches[:2])
    r = lib.get(name)
    assert r.check(problem, t) is None, r.check(problem, t)
    a = r.apply(t, problem, {**r.propose(problem, t), **params})
    return t.model, a


def _mse(out: torch.Tensor, batch: Any) -> torch.Tensor:
    return F.mse_loss(out, batch[1])


# -- exact at insertion -------------------------------------------------------------------


def test_gated_attention_is_exact_at_insertion_and_its_gate_learns() -> None:
    case = zoo.transformer_block(dead=False)
    prob = Problem("MixingCollapse", Site("embed"), 1.0)
    m, a = _apply(case.model, case.batches, prob, "attention")
    assert a.exact and a.details["dim"] == 32 and not a.details["spatial"]
    assert rel_change(m, case.model, case.batches) <= EXACT
    gate = dict(m.named_parameters())[f"{a.details['inserted']}.alpha"]
    loss = case.loss_fn(m(case.batches[0][0]), case.batches[0])
    loss.backward()
    assert gate.grad is not None and float(gate.grad.abs()) > 0  # the gate opens by training


def test_gated_attention_over_spatial_positions() -> None:
    case = zoo.healthy_cnn()
    m, a = _apply(case.model, case.batches, Problem("MixingCollapse", Site("conv1")),
                  "attention")
    assert a.details["spatial"] and a.details["dim"] == 16
    assert rel_change(m, case.model, case.batches) <= EXACT


def test_attention_refuses_a_value_without_positions() -> None:
    case = zoo.dead_mlp()
    t = Target(copy.deepcopy(case.model), case.batches[:1])
    why = canonical_library().get("attention").check(
        Problem("MixingCollapse", Site("0")), t)
    assert why is not None and "no positions" in why


def test_dropout_is_exact_in_eval_mode_and_changes_training_only() -> None:
    case = zoo.dead_mlp()
    m, a = _apply(case.model, case.batches, Problem("Overfitting", Site("0"), 0.5), "dropout",
                  p=0.2)
    assert a.exact and "training only" in a.details["changes"]
    assert rel_change(m, case.model, case.batches) <= EXACT  # eval mode
    x = case.batches[0][0]
    m.train()
    torch.manual_seed(0)
    assert not torch.allclose(m(x), case.model(x))  # dropout acts in training


def test_plasticity_injection_is_exact_and_only_the_fresh_copy_is_new() -> None:
    case = zoo.dead_mlp()
    m, a = _apply(case.model, case.batches, Problem("LostPlasticity", Site("4")),
                  "plasticity_injection")
    assert rel_change(m, case.model, case.batches) == 0.0  # fresh - frozen is exactly 0
    head: Any = m.get_submodule("4")
    assert all(not p.requires_grad for p in head.frozen.parameters())
    assert a.new_parameters == ["4.fresh.weight", "4.fresh.bias"]
    assert not torch.equal(head.fresh.weight, head.old.weight)


# -- distillation -------------------------------------------------------------------------


def test_distill_fits_a_block_and_reports_the_held_out_error() -> None:
    case = zoo.dead_mlp()
    prob = Problem("DeadNeurons", Site("2", "", "relu"), 0.125, case.truth[1].units)
    t = Target(copy.deepcopy(case.model), case.batches[:2])
    r = Distill(steps=100, augment=1024)  # the defaults (200, 2048) measured 0.25
    assert r.check(prob, t) is None
    a = r.apply(t, prob, r.propose(prob, t))
    m, d = t.model, a.details
    assert d["architecture"] == "mlp_block" and d["mode"] == "block" and not a.exact
    assert d["heldout_samples"] > 0 and d["distill_steps"] > 0
    # measured 0.13 train / 0.28 held-out with 205 recorded samples of a 64-unit ReLU layer
    assert d["distill_error_train"] <= d["distill_error_heldout"] + 0.05
    assert d["distill_error_heldout"] <= 0.4
    assert "2" not in dict(m.named_modules())  # the old layer is gone from the graph
    # the whole network's output on batches never used for fitting
    assert rel_change(m, case.model, case.batches[4:]) <= 0.4


def test_distill_picks_the_library_module_by_interface() -> None:
    conv = nn.Conv2d(3, 8, 3, padding=1)
    x = torch.randn(2, 3, 6, 6)
    new, arch = build_replacement(conv, x, conv(x))
    assert arch == "conv_block" and new(x).shape == (2, 8, 6, 6)
    case = zoo.transformer_block(dead=False)
    seq = torch.randn(2, 8, 32)

    class Mixer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = case.model.attn

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            return h + self.attn(h, h, h, need_weights=False)[0]

    new, arch = build_replacement(Mixer(), seq, seq)
    assert arch == "transformer_block" and new(seq).shape == seq.shape
    lin = nn.Linear(32, 16)
    new, arch = build_replacement(lin, seq, lin(seq))
    assert arch == "mlp_block" and new(seq).shape == (2, 8, 16)


def test_distill_refuses_when_the_fit_is_too_poor() -> None:
    case = zoo.dead_mlp()
    prob = Problem("DeadNeurons", Site("2", "", "relu"), 0.125, case.truth[1].units)
    t = Target(copy.deepcopy(case.model), case.batches[:2])
    r = canonical_library().get("distill")
    with pytest.raises(gs.library.Refused, match="held-out error"):
        r.apply(t, prob, {**r.propose(prob, t), "max_error": 1e-4, "steps": 5})


def test_distill_is_not_a_first_choice_but_can_be_requested() -> None:
    case = zoo.dead_mlp()
    d = Diagnosis(problems=[Problem("DeadNeurons", Site("2", "", "relu"), 0.125,
                                    case.truth[1].units, evidence={"fraction": 0.125})])
    lib = canonical_library()
    p = gs.plan(case.model, d, library=lib, data=case.batches[:2], probe=False)
    assert [s.replacement for s in p.schemas] == ["reinit_dead"]
    p = gs.plan(case.model, d, library=lib, data=case.batches[:2], probe=False,
                prefer=["distill"])
    assert [(s.replacement, s.scale) for s in p.schemas] == [("distill", "module")]


transformers = pytest.importorskip("transformers")


def test_distill_a_bert_mlp_block() -> None:
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, vocab_size=100)
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).eval()
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, 100, (8, 12), generator=g)} for _ in range(4)]
    path = "encoder.layer.0.intermediate.dense"
    d = Diagnosis(problems=[Problem("DeadNeurons", Site(path, "", "gelu"), 0.1, (1, 4))])
    lib = canonical_library()
    lib.register(Distill(steps=100), replace=True)
    res = gs.operate(model, data, diagnosis=d, library=lib, prefer=["distill"],
                     rediagnose=False, held_out=data[2:])
    (v,) = res.verification
    assert v.kept, res.summary()
    # the dense layer and its GELU (BertIntermediate) are replaced together
    assert v.details["replaced"] == "encoder.layer.0.intermediate"
    assert v.details["mode"] == "module" and v.details["architecture"] == "mlp_block"
    assert v.details["distill_error_heldout"] <= 0.3  # measured 0.08 (36 held-out tokens)
    assert v.output_change is not None and v.output_change <= 0.1
    assert rel_change(res.model, model, data[2:]) <= 0.1


# -- escalation ---------------------------------------------------------------------------


def _redying_case() -> tuple[nn.Module, list[Any]]:
    """A ReLU layer fed inputs far from the origin (mean 4, spread 0.1): its live units'
    biases centre them on the data, its planted dead units have bias -50. A ReDo reset
    (fresh rows, zero bias) puts a unit's pre-activation near ``4 * sum(w)``: about half the
    reset units never fire again; leaky ReLU leaves them dormant too."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
    mu = 4.0
    lin: Any = model[0]
    with torch.no_grad():
        lin.bias.copy_(-(lin.weight.sum(1) * mu) + 0.05 * torch.randn(64))
        lin.bias[::8] = -50.0
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 4, generator=g)
    batches = []
    for _ in range(6):
        x = mu + 0.1 * torch.randn(64, 16, generator=g)
        batches.append((x, torch.tanh((x - mu) @ w)))
    return model, batches


def test_planner_escalates_from_reinit_to_distill_when_units_re_die() -> None:
    model, batches = _redying_case()
    d = gs.diagnose(model, batches, loss_fn=_mse)
    assert [(p.kind, p.site.module) for p in d.problems] == [("DeadNeurons", "0")]
    lib = canonical_library()
    lib.register(Distill(steps=100, augment=1024), replace=True)
    # the plain ReDo draw (the calibrated default re-centres the reset units on the data and
    # revives them here, so nothing would escalate)
    lib.register(ReinitDead(init="layer"), replace=True)
    res = gs.operate(model, batches, loss_fn=_mse, diagnosis=d, library=lib, escalate=2,
                     heal_steps=10)
    steps = [(e["from"], e["from_scale"], e["to"], e["to_scale"]) for e in res.escalations]
    # neuron -> layer -> module, one scale at a time. At neuron scale reinit_dead's units
    # re-die and its exact alternative, excise_dead, is tried in its place: the planted units
    # fire on the held-out batch, so the excision is not exact either
    assert steps == [("excise_dead", "neuron", "reinit_dead+activation_swap", "layer"),
                     ("reinit_dead+activation_swap", "layer", "distill", "module")]
    assert "exact tolerance" in res.escalations[0]["outcome"]
    assert "still flagged" in res.escalations[1]["outcome"]
    (s,) = res.plan.schemas
    assert s.replacement == "distill" and s.escalated_from is not None
    (v,) = res.verification
    assert v.kept, res.summary()
    assert v.details["distill_error_heldout"] <= 0.5
    assert res.after is not None and not res.after.problems  # no dormant units left
    assert "escalation (round 2)" in res.summary() and "escalated:" in res.plan.summary()
    # the plan (with its escalation record) round-trips
    back = gs.SurgeryPlan.from_json(res.plan.to_json())
    assert back.schemas[0].escalated_from == s.escalated_from


def test_no_escalation_when_the_first_plan_works() -> None:
    case = zoo.dead_mlp()
    d = Diagnosis(problems=[Problem("DeadNeurons", Site("2", "", "relu"), 0.125,
                                    case.truth[1].units, evidence={"fraction": 0.125})])
    res = gs.operate(case.model, case.batches, loss_fn=case.loss_fn, diagnosis=d,
                     library=canonical_library(), escalate=2, heal_steps=10)
    assert res.escalations == [] and [v.replacement for v in res.verification] == [
        "reinit_dead"]


# -- plasticity -----------------------------------------------------------------------------


def _dormant_head() -> tuple[nn.Module, list[Any]]:
    """A frozen feature layer and a ReLU head trained into dormancy (SGD at lr 4 for 30 steps
    on noise targets kills ~78% of its units), then given a new task."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(),
                          nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4)))
    model[0].requires_grad_(False)
    x = torch.randn(512, 16, generator=g)
    noise = 3 * torch.randn(512, 4, generator=g)
    opt = torch.optim.SGD(model[2].parameters(), lr=4.0)
    for _ in range(30):
        opt.zero_grad()
        F.mse_loss(model(x), noise).backward()
        opt.step()
    w = torch.randn(16, 4, generator=g)
    return model, [(xb, torch.sin(2 * xb) @ w) for xb in x.split(128)]


def test_plasticity_injection_restores_learning_on_a_dormant_head() -> None:
    from graphsurg.detect.plasticity import detect_lost_plasticity

    model, batches = _dormant_head()
    diag = gs.diagnose(model, batches, loss_fn=_mse)
    stalled = [9.0, 8.99, 8.99, 8.98, 8.98, 8.98, 8.97, 8.97]
    assert detect_lost_plasticity(diag, head="2", losses=[9.0, 8.0, 7.0, 6.0]) == []
    (p,) = detect_lost_plasticity(diag, head="2", losses=stalled)
    assert p.evidence["dormant_fraction"] >= 0.7 and "2.0:relu" in p.evidence["sites"]
    d = Diagnosis(problems=[p])
    res = gs.operate(model, batches, loss_fn=_mse, diagnosis=d, library=canonical_library(),
                     heal_steps=0, rediagnose=False)
    (v,) = res.verification
    assert v.kept and v.exact and v.output_change == 0.0
    start = mean_loss(model, batches, _mse)
    finals = []
    for m in (copy.deepcopy(model), copy.deepcopy(res.model)):
        heal(m, batches, _mse, steps=200, seed=0)
        finals.append(mean_loss(m, batches, _mse))
    untreated, injected = finals
    # measured: 14.6 -> 9.8 untreated, 14.6 -> 5.2 injected
    assert start - injected >= 1.5 * (start - untreated)
    assert injected <= 0.7 * untreated


# -- JSON ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["Overfitting", "LostPlasticity", "MixingCollapse"])
def test_new_problem_kinds_round_trip(kind: str) -> None:
    p = Problem(kind, Site("a.b", "n", "relu"), 0.5, (1, 2), evidence={"x": 1.0})
    d = Diagnosis(problems=[p])
    back = Diagnosis.from_json(d.to_json())
    assert back.problems == [p] and p.describe() != ""


# -- over-fitting ---------------------------------------------------------------------------


def _memoriser() -> tuple[nn.Module, list[Any], list[Any]]:
    """A wide ReLU MLP fitted to 64 noisy samples (it memorises them), with units 8..15 of
    its first layer made scaled copies of units 0..7 (``h_{8+k} = 1.5 h_k``): co-adapting
    pairs with correlation 1."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 1))
    x = torch.randn(64, 8, generator=g)
    y = x[:, :1] + 0.5 * torch.randn(64, 1, generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
    lin: Any = model[0]
    with torch.no_grad():
        lin.weight[8:16] = 1.5 * lin.weight[:8]
        lin.bias[8:16] = 1.5 * lin.bias[:8]
    xv = torch.randn(64, 8, generator=g)
    yv = xv[:, :1] + 0.5 * torch.randn(64, 1, generator=g)
    return model, [(x[:32], y[:32]), (x[32:], y[32:])], [(xv, yv)]


def test_overfitting_is_diagnosed_with_val_data_and_localised_to_co_adapting_units() -> None:
    model, train, val = _memoriser()
    assert not [p for p in gs.diagnose(model, train, loss_fn=_mse).problems
                if p.kind == "Overfitting"]  # only with val_data=
    d = gs.diagnose(model, train, loss_fn=_mse, val_data=iter(val))
    (p,) = [p for p in d.problems if p.kind == "Overfitting"]
    assert p.site.module == "0" and p.evidence["localised"]
    assert p.evidence["val_loss"] > 1.5 * p.evidence["train_loss"]
    live = {u for u in range(8) if u not in p.evidence.get("dead", [])}
    assert {u for u in range(16) if u % 8 in live} <= set(p.units)
    plan = gs.plan(model, Diagnosis(problems=[p]), library=canonical_library(),
                   data=train, probe=False)
    assert [(s.replacement, s.scale, s.exact) for s in plan.schemas] == [
        ("dropout", "layer", True)]
    # the same model on held-out data from its training set: no gap, no problem
    d2 = gs.diagnose(model, train, loss_fn=_mse, val_data=train[:1])
    assert not [p for p in d2.problems if p.kind == "Overfitting"]


# -- token mixing -----------------------------------------------------------------------------


def test_mixing_collapse_is_found_where_positions_collapse_and_attention_is_planned() -> None:
    from graphsurg.detect.mixing import detect_mixing_collapse

    case = zoo.transformer_block(dead=False)
    assert detect_mixing_collapse(case.model, case.batches) == []
    broken = copy.deepcopy(case.model)
    with torch.no_grad():  # every position embeds to the same vector
        broken.embed.weight.zero_()
    (p,) = detect_mixing_collapse(broken, case.batches)
    assert p.kind == "MixingCollapse" and p.site.module == "embed"
    assert p.evidence["position_rank"] == 0 and p.evidence["positions"] == 8
    plan = gs.plan(broken, Diagnosis(problems=[p]), library=canonical_library(),
                   data=case.batches[:2], probe=False)
    assert [(s.replacement, s.scale, s.exact) for s in plan.schemas] == [
        ("attention", "block", True)]
