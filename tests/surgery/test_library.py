"""The replacements, one by one: exactness, widths, coupling through BatchNorm and adds."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import zoo
from _helpers import rel_change
from torch import nn

import graphsurg as gs
from graphsurg._problems import Problem, Site
from graphsurg.library import Applied, RampLeakyReLU, Refused, Target


def _apply(model: nn.Module, batches: list[Any], problem: Problem, name: str,
           **params: Any) -> tuple[nn.Module, Applied, dict[str, Any]]:
    lib = gs.default_library()
    t = Target(copy.deepcopy(model), batches[:2])
    r = lib.get(name)
    assert r.check(problem, t) is None, r.check(problem, t)
    p = {**r.propose(problem, t), **params}
    a = r.apply(t, problem, p)
    return t.model, a, p


def _dead(case: zoo.ZooCase, i: int = 0) -> Problem:
    tr = case.truth[i]
    return Problem("DeadNeurons", Site(tr.module, "", "relu"), 0.2, tr.units)


def test_default_library_declares_its_entries() -> None:
    lib = gs.default_library()
    assert lib.names() == ["reinit_dead", "activation_swap", "residual_bypass", "widen",
                           "norm_insert", "excise_dead", "factor_low_rank", "dropout",
                           "attention", "distill", "plasticity_injection"]
    for r in lib:
        assert r.treats and r.scales and r.guarantee in ("exact", "bounded")
    assert [r.name for r in lib.treating("DeadNeurons")][0] == "reinit_dead"
    with pytest.raises(ValueError, match="already registered"):
        lib.register(gs.default_library().get("widen"))


@pytest.mark.parametrize("name", ["reinit_dead", "excise_dead"])
def test_dead_unit_edits_are_exact(name: str) -> None:
    case = zoo.dead_mlp()
    for i in range(2):
        m, a, _ = _apply(case.model, case.batches, _dead(case, i), name)
        assert a.exact
        # float32 round-off of a sum with the same terms in another order
        assert rel_change(m, case.model, case.batches) <= 1e-5
    if name == "excise_dead":
        assert m.get_submodule("2").out_features == 64 - len(case.truth[1].units)


def test_reinit_resets_a_batchnorm_channel_between_producer_and_activation() -> None:
    case = zoo.dead_cnn()
    prob = Problem("DeadNeurons", Site("conv1", "", "relu"), 0.1, (1, 3))
    m, a, _ = _apply(case.model, case.batches, prob, "reinit_dead")
    assert "bn1.weight" in a.touched and "conv2.weight" in a.touched
    assert torch.all(m.get_submodule("conv2").weight[:, [1, 3]] == 0)
    assert torch.all(m.get_submodule("bn1").weight[[1, 3]] == 1)


def test_widen_is_exact_and_grows_as_planned() -> None:
    case = zoo.bottleneck_mlp()
    m, a, p = _apply(case.model, case.batches, Problem("Bottleneck", Site("2")), "widen")
    assert m.get_submodule("2").out_features == p["new_width"] > 4
    assert m.get_submodule("4").in_features == p["new_width"]
    assert rel_change(m, case.model, case.batches) <= 1e-5


@pytest.mark.parametrize("training", [False, True])
def test_widen_through_batchnorm_keeps_the_output(training: bool) -> None:
    # the Net2Net-with-BatchNorm case: the BN channel (affine and running stats) is copied
    case = zoo.dead_cnn()
    m, a, _ = _apply(case.model, case.batches, Problem("Bottleneck", Site("conv1")), "widen")
    assert m.get_submodule("bn1").num_features == 32
    ref = copy.deepcopy(case.model).train(training)
    m.train(training)
    x = case.batches[0][0]
    with torch.no_grad():
        # in training mode BN uses batch statistics; a copied channel has the same ones
        got, want = m(x), ref(x)
    assert float((got - want).norm() / want.norm()) <= 1e-5


class ResBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)
        self.head = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        h = h + self.fc2(torch.relu(self.fc1(h)))
        return self.head(torch.relu(h))


def test_residual_network_stays_correct_or_refuses() -> None:
    torch.manual_seed(0)
    model = ResBlock()
    with torch.no_grad():
        model.fc1.bias[[3, 7]] = -50.0
    batches = [torch.randn(32, 8) for _ in range(2)]
    # fc1 is coupled to fc2 inside the block; the add is downstream of fc2 -> exact
    m, _, _ = _apply(model, batches, Problem("Bottleneck", Site("fc1")), "widen")
    assert rel_change(m, model, batches) <= 1e-5
    m, _, _ = _apply(model, batches, Problem("DeadNeurons", Site("fc1"), units=(3, 7)),
                     "excise_dead")
    assert m.get_submodule("fc1").out_features == 30
    assert rel_change(m, model, batches) <= 1e-5
    # fc2's units are bound to the residual stream through the add: refused, with the reason
    t = Target(copy.deepcopy(model), batches)
    why = gs.default_library().get("widen").check(Problem("Bottleneck", Site("fc2")), t)
    assert why is not None and "residual" in why
    with pytest.raises(Refused, match="residual"):
        gs.default_library().get("widen").apply(t, Problem("Bottleneck", Site("fc2")),
                                                {"new_width": 32})


def test_activation_swap_variants() -> None:
    case = zoo.dead_mlp()
    m, a, _ = _apply(case.model, case.batches, _dead(case), "activation_swap")
    assert isinstance(m.get_submodule("1"), nn.LeakyReLU) and not a.exact
    assert rel_change(m, case.model, case.batches) > 1e-3
    m, a, _ = _apply(case.model, case.batches, _dead(case), "activation_swap", variant="ramp")
    act = m.get_submodule("1")
    assert isinstance(act, RampLeakyReLU) and a.exact and a.on_step is not None
    assert rel_change(m, case.model, case.batches) == 0.0
    a.on_step(9, 10)
    assert float(act.negative_slope) == pytest.approx(0.01)
    # a functional F.relu is swapped through an FX rewrite
    cnn = zoo.dead_cnn()
    m, a, _ = _apply(cnn.model, cnn.batches, _dead(cnn), "activation_swap")
    assert isinstance(m, torch.fx.GraphModule)
    assert isinstance(m.get_submodule(a.details["module"]), nn.LeakyReLU)


def test_bypass_gated_is_exact_residual_is_not() -> None:
    case = zoo.deep_sigmoid()
    span = tuple(str(i) for i in range(0, 46, 2))
    prob = Problem("VanishingGradient", Site("0"), span=span)
    m, a, _ = _apply(case.model, case.batches, prob, "residual_bypass", variant="gated")
    assert a.exact and len(a.new_parameters) >= len(span)
    assert rel_change(m, case.model, case.batches) <= 1e-6
    m, a, _ = _apply(case.model, case.batches, prob, "residual_bypass", variant="residual")
    assert not a.exact and rel_change(m, case.model, case.batches) > 1e-3


def test_norm_insert_is_identity_in_eval_mode() -> None:
    case = zoo.dead_mlp()
    prob = Problem("ExplodingGradient", Site("0"), span=("0", "2"))
    m, a, _ = _apply(case.model, case.batches, prob, "norm_insert")
    assert a.exact and len(a.new_parameters) == 4
    assert rel_change(m, case.model, case.batches) <= 1e-5


def test_nonfinite_rows_are_reset() -> None:
    case = zoo.nan_mlp()
    m, a, _ = _apply(case.model, case.batches, Problem("NonFinite", Site("4")), "reinit_dead")
    assert a.units == [3]
    with torch.no_grad():
        assert torch.isfinite(m(case.batches[0][0])).all()


# -- factor_low_rank (torch applier) ---------------------------------------------------------


def _rank_deficient(rank: int, d_in: int = 48, d_out: int = 40) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    m = nn.Sequential(nn.Linear(d_in, d_out), nn.ReLU(), nn.Linear(d_out, 3))
    with torch.no_grad():
        m[0].weight.copy_(torch.randn(d_out, rank, generator=g)
                          @ torch.randn(rank, d_in, generator=g) / 8)
    return m


def _bottleneck(rank: int) -> Problem:
    return Problem("Bottleneck", Site("0", "", "linear"), 0.9,
                   evidence={"reason": "rank", "rank": rank, "max_rank": 40})


def test_factor_low_rank_torch_preserves_the_function() -> None:
    model = _rank_deficient(3).double()
    x = [torch.randn(32, 48, generator=torch.Generator().manual_seed(1), dtype=torch.float64)]
    m, a, p = _apply(model, x, _bottleneck(3), "factor_low_rank")
    assert p["rank"] == 3 and a.exact
    new = m.get_submodule("0")
    assert isinstance(new, nn.Sequential) and [type(x).__name__ for x in new] == ["Linear"] * 2
    assert (new[0].in_features, new[0].out_features, new[0].bias) == (48, 3, None)
    assert (new[1].in_features, new[1].out_features) == (3, 40)
    assert sum(q.numel() for q in m.parameters()) == (
        sum(q.numel() for q in model.parameters()) - 40 * 48 + 3 * (48 + 40))
    # the weight is rank 3 up to float32 round-off (built in float32): the dropped singular
    # values are below the rank tolerance max(d_in, d_out) x eps(float32) x sigma_max
    tol = 48 * torch.finfo(torch.float32).eps * a.details["sigma_max"]
    assert 0 <= a.details["dropped_sigma"] <= tol
    # float64 model and reference; the dropped part is ~2e-8 relative, so 1e-6 holds
    with torch.no_grad():
        ref, got = model(x[0]), m(x[0])
    assert float((got - ref).norm() / ref.norm()) <= 1e-6
    assert model[0].weight.shape == (40, 48)  # the input model is untouched


def test_factor_low_rank_refuses_a_full_rank_weight_and_a_narrow_bottleneck() -> None:
    lib = gs.default_library()
    r = lib.get("factor_low_rank")
    model = _rank_deficient(40)
    t = Target(copy.deepcopy(model), [torch.randn(8, 48)])
    why = r.check(_bottleneck(40), t)
    assert why is not None and "would not be smaller" in why and "rank 40" in why
    with pytest.raises(Refused, match="would not be smaller"):
        r.apply(t, _bottleneck(40), {"rank": 40})
    narrow = Problem("Bottleneck", Site("0", "", "linear"), 0.5, evidence={"reason": "narrow"})
    assert not r.accepts(narrow)
    assert "not 'narrow'" in (r.check(narrow, t) or "")


def test_bottleneck_candidates_follow_the_declarations_and_the_evidence() -> None:
    from graphsurg._plan import candidates

    lib = gs.default_library()
    narrow = Problem("Bottleneck", Site("0", "", "linear"), 0.5, evidence={"reason": "narrow"})
    rank = _bottleneck(3)
    names = lambda opts: [[r.name for r in g] for g, _ in opts]  # noqa: E731
    assert names(candidates(lib, narrow)) == [["widen"]]
    assert names(candidates(lib, rank)) == [["factor_low_rank"], ["widen"]]
    # the same rule on ONNX: only replacements with an ONNX applier
    assert names(candidates(lib, rank, ir="onnx")) == [["factor_low_rank"]]
    assert names(candidates(lib, narrow, ir="onnx")) == []


def test_planner_factors_a_rank_deficient_layer_and_widens_a_narrow_one() -> None:
    model = _rank_deficient(3)
    x = [torch.randn(16, 48, generator=torch.Generator().manual_seed(2))]
    d = gs.Diagnosis(problems=[_bottleneck(3)])
    p = gs.plan(model, d, data=x, probe=False)
    (s,) = p.schemas
    assert (s.replacement, s.exact, s.params["rank"]) == ("factor_low_rank", True, 3)
    full = _rank_deficient(40)
    p = gs.plan(full, gs.Diagnosis(problems=[_bottleneck(40)]), data=x, probe=False)
    (s,) = p.schemas
    assert s.replacement == "widen"  # factoring would not make it smaller: widen instead


def test_declarations_replace_names() -> None:
    lib = gs.default_library()
    assert [r.name for r in lib if r.removes_units] == ["excise_dead"]
    assert [r.name for r in lib if r.reinitialises_units] == ["reinit_dead"]
    assert [r.name for r in lib if r.graph_level] == ["activation_swap"]
    swap = lib.get("activation_swap")
    assert swap.graph_rewrite({"variant": "leaky", "negative_slope": 0.1}) == {
        "activation": "leaky_relu", "negative_slope": 0.1}
    assert swap.graph_rewrite({"variant": "prelu"}) is None
    assert not swap.live_editable({"variant": "prelu"})
    assert {r.name for r in lib if r.supports("onnx")} == {
        "activation_swap", "excise_dead", "factor_low_rank"}
