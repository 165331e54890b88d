"""Channel coupling: FX analysis, probe fallback, refusals with reasons."""

from __future__ import annotations

import pytest
import torch
import zoo
from graphsurg.passes.fx.coupling import analyze, probe_coupling
from torch import nn

from graphsurg._data import default_input_fn


def _group(model: nn.Module, producer: str, x: torch.Tensor, probe: bool = False):  # type: ignore[no-untyped-def]
    ex = default_input_fn(x)
    if probe:
        return probe_coupling(model, producer, lambda m: m(x))
    return analyze(model, producer, lambda m: m(x), ex)


class Cat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 6)
        self.b = nn.Linear(8, 5)
        self.head = nn.Linear(11, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], dim=-1))


class Heads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(8, 8)
        self.out = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, _ = x.shape
        h = self.q(x).view(n, t, 2, 4)
        return self.out(h.mean(2))


def test_linear_relu_linear_is_coupled_to_the_next_layer() -> None:
    case = zoo.dead_mlp()
    g = _group(case.model, "0", case.batches[0][0])
    assert g.ok and g.source == "fx"
    assert [(c.module, c.start, c.stride) for c in g.consumers] == [("2", 0, 1)]
    assert [op.op for op in g.chain] == ["relu"]


def test_batchnorm_and_flatten_are_followed() -> None:
    case = zoo.dead_cnn()
    x = case.batches[0][0]
    g1 = _group(case.model, "conv1", x)
    assert g1.ok and g1.batchnorms() == ["bn1"] and g1.consumers[0].module == "conv2"
    g2 = _group(case.model, "conv2", x)
    assert g2.ok and [(c.module, c.kind, c.stride) for c in g2.consumers] == [("head", "linear", 1)]


def test_probe_agrees_with_fx_where_both_work() -> None:
    for case, prod in ((zoo.dead_mlp(), "0"), (zoo.dead_cnn(), "conv1"),
                       (zoo.transformer_block(), "fc1")):
        x = case.batches[0][0]
        a, b = _group(case.model, prod, x), _group(case.model, prod, x, probe=True)
        assert a.ok and b.ok, (a.reason(), b.reason())
        assert [(c.module, c.start, c.stride) for c in a.consumers] == \
            [(c.module, c.start, c.stride) for c in b.consumers]
        assert a.batchnorms() == b.batchnorms()


def test_concat_gives_offsets() -> None:
    m = Cat()
    x = torch.randn(4, 8)
    ga, gb = _group(m, "a", x), _group(m, "b", x)
    assert ga.ok and gb.ok
    assert (ga.consumers[0].start, gb.consumers[0].start) == (0, 6)


def test_refusals_name_the_reason() -> None:
    tb = zoo.transformer_block()
    x = tb.batches[0][0]
    g = _group(tb.model, "fc2", x)  # fc2's output is added to the residual stream
    assert not g.ok and "residual" in g.reason()
    g = _group(tb.model, "embed", x)
    assert not g.ok and "LayerNorm" in g.reason()
    g = _group(Heads(), "q", torch.randn(2, 3, 8))
    assert not g.ok and "heads" in g.reason()
    g = _group(zoo.dead_mlp().model, "4", torch.randn(2, 16))
    assert not g.ok and "output" in g.reason()


class _MyReLU(nn.ReLU):
    """A user subclass of a known layer: handled as that layer."""


class Unknown(nn.Module):
    def __init__(self, tail: nn.Module | None = None) -> None:
        super().__init__()
        self.a = nn.Linear(8, 6)
        self.tail = tail
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        h = self.tail(h) if self.tail is not None else torch.roll(h, 1, 0)
        return self.head(h)


def test_unknown_ops_are_refused_with_the_node_and_a_reason() -> None:
    x = torch.randn(4, 8)
    g = _group(Unknown(), "a", x)  # a function without a handler
    assert not g.ok and g.reason() == \
        "node 'roll' (roll) is not understood by the coupling analysis"
    g = _group(Unknown(nn.Softmax(-1)), "a", x)  # a module without a handler
    assert not g.ok and "'tail' (Softmax)" in g.reason() and "does not know it" in g.reason()
    g = _group(Unknown(nn.PReLU(6)), "a", x)  # per-unit slopes: followed, taken per unit
    assert g.ok and g.per_unit_modules() == ["tail"]


class _Leaves(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _MyReLU) or super().is_leaf_module(m, qualname)


def test_handlers_follow_subclasses_and_shared_slopes() -> None:
    x = torch.randn(4, 8)
    model = Unknown(_MyReLU())
    gm = torch.fx.GraphModule(model, _Leaves().trace(model))  # _MyReLU stays a module call
    g = _group(gm, "a", x)
    assert g.ok and [(op.kind, op.op, op.module) for op in g.chain] == \
        [("activation", "_myrelu", "tail")]
    g = _group(Unknown(nn.PReLU(1)), "a", x)
    assert g.ok and [c.module for c in g.consumers] == ["head"]


# --------------------------------------------------------------------------------------------
# issue 14 class 5: coupling proven at the edited units, residual adds followed


class _DeadEnds(nn.Module):
    """``layer -> BatchNorm -> ReLU -> head`` that ``symbolic_trace`` cannot capture (control
    flow on a tensor), so coupling must be measured by the probe. Units 0 and width-1 are
    killed through the BatchNorm: scale 0, shift -50."""

    def __init__(self, conv: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = conv
        self.layer: nn.Module = nn.Conv2d(3, 6, 3, padding=1) if conv else nn.Linear(8, 6)
        self.bn: nn.Module = nn.BatchNorm2d(6) if conv else nn.BatchNorm1d(6)
        self.head: nn.Module = nn.Conv2d(6, 4, 1) if conv else nn.Linear(6, 4)
        with torch.no_grad():
            self.bn.weight[[0, 5]] = 0.0
            self.bn.bias[[0, 5]] = -50.0
            self.bn.running_var.uniform_(0.5, 2.0)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.layer(x)))
        if bool(h.sum() > -1.0):  # data-dependent branch: not symbolically traceable
            h = h * 1.0
        return self.head(h)


def _dead_problem(path: str, units: tuple[int, ...]):  # type: ignore[no-untyped-def]
    import graphsurg as gs

    return gs.Problem("DeadNeurons", gs.Site(path, "", "relu"), 0.3, units)


def _f64(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    import copy

    with torch.no_grad():
        return copy.deepcopy(model).double().eval()(x.double())


@pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv"])
@pytest.mark.parametrize("name", ["reinit_dead", "excise_dead"])
def test_dead_units_at_both_ends_through_batchnorm_are_treated(conv: bool, name: str) -> None:
    """Units 0 and width-1 dead through a BatchNorm of an untraceable model: the probe used to
    perturb exactly those two units, the zero scale stopped both perturbations, and the group
    read "no layer consumes the output units" (reinit_dead and excise_dead refused). Now
    every edited unit is probed, the zero scale is opened while probing, and the edit is
    exact: within 1e-6 relative of the input's float64 output."""
    import copy

    from graphsurg.passes.fx.target import Target

    from graphsurg.library import default_library

    model = _DeadEnds(conv)
    x = torch.randn(6, 3, 5, 5) if conv else torch.randn(6, 8)
    with pytest.raises(Exception, match="control flow"):
        torch.fx.symbolic_trace(model)
    rep = default_library().get(name)
    target = Target(copy.deepcopy(model), [x])
    problem = _dead_problem("layer", (0, 5))
    assert rep.check(problem, target) is None
    params = rep.propose(problem, target)
    assert params["units"] == [0, 5] and params["exact"]
    applied = rep.apply(target, problem, params)
    g = Target(copy.deepcopy(model), [x]).coupling("layer", (0, 5))
    assert g.probed == (0, 5) and [c.module for c in g.consumers] == ["head"]
    assert g.batchnorms() == ["bn"]
    ref, got = _f64(model, x), _f64(target.model, x)
    assert float((got - ref).norm() / ref.norm()) <= 1e-6
    if name == "excise_dead":
        assert applied.details["width_after"] == 4
        assert target.model.get_submodule("head").weight.shape[1] == 4


class _ResidualConv(nn.Module):
    """``relu(bn(conv1(x)) + x)`` read by a single conv: the residual add binds conv1's units
    to the block input; untraceable, so the probe measures it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 4, 1)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv1(x)) + x)
        if bool(h.sum() > -1.0):
            h = h * 1.0
        return self.conv2(h)


def test_residual_add_read_by_a_single_conv_is_followed() -> None:
    """A residual add read only by conv2: the probe saw conv2 as the sole consumer and
    planned a widening that crashed ("size of tensor a (16) must match ... (8)"). Now the
    constant-producer run shows conv2 reads the units together with another tensor: widen
    and excise_dead refuse with that reason; reinit_dead refuses where zeroing conv2's columns
    would cut the residual stream (units 4, 5: relu(0 + x) varies) and is exact where the
    columns are constant (units 2, 3: relu(-50 + x) = 0); nothing crashes."""
    import copy

    from graphsurg.passes.fx.target import Target

    import graphsurg as gs
    from graphsurg.library import default_library

    model = _ResidualConv()
    x = torch.randn(4, 8, 6, 6)
    with torch.no_grad():
        model.conv1.weight[[2, 3, 4, 5]] = 0.0
        model.conv1.bias[[2, 3]] = -50.0
        model.conv1.bias[[4, 5]] = 0.0
    lib = default_library()
    target = Target(copy.deepcopy(model), [x])
    narrow = gs.Problem("Bottleneck", gs.Site("conv1", "", "conv"), 0.5)
    why = lib.get("widen").check(narrow, target)
    assert why is not None and "another tensor" in why
    g = target.coupling("conv1", (2, 3))
    assert g.ok and [c.module for c in g.consumers] == ["conv2"]
    assert g.mixed and "another tensor" in g.mixed[0]
    for units in ((2, 3), (4, 5)):
        why = lib.get("excise_dead").check(_dead_problem("conv1", units), target)
        assert why is not None and "another tensor" in why, why
    why = lib.get("reinit_dead").check(_dead_problem("conv1", (4, 5)), target)
    assert why is not None and "another tensor" in why, why
    dead = _dead_problem("conv1", (2, 3))
    rep = lib.get("reinit_dead")
    assert rep.check(dead, target) is None
    rep.apply(target, dead, rep.propose(dead, target))
    ref, got = _f64(model, x), _f64(target.model, x)
    assert float((got - ref).norm() / ref.norm()) <= 1e-6


class _InvertedResidual(nn.Module):
    """MobileNetV2's block without the skip: expand 1x1 -> BN -> ReLU6 -> depthwise 3x3 ->
    BN -> ReLU6 -> reduce 1x1; untraceable, so the probe measures it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.expand = nn.Conv2d(4, 12, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(12)
        self.dw = nn.Conv2d(12, 12, 3, padding=1, groups=12, bias=False)
        self.bn2 = nn.BatchNorm2d(12)
        self.reduce = nn.Conv2d(12, 4, 1)
        with torch.no_grad():
            self.bn1.weight[[0, 5, 11]] = 0.0
            self.bn1.bias[[0, 5, 11]] = -50.0
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.relu6(self.bn1(self.expand(x)))
        if bool(h.sum() > -1.0):
            h = h * 1.0
        return self.reduce(nn.functional.relu6(self.bn2(self.dw(h))))


def test_depthwise_consumer_is_edited_per_group() -> None:
    """Dead expansion channels read by a depthwise conv (MobileNetV2): the probe refused
    ("groups=12 does not read the units as plain input channels"), and once grouped convs
    were read, the 1x1 conv and BatchNorm after the depthwise one (which pass each channel on
    alone) looked coupled too and reinit reset the wrong norm (output change 2.0 on the
    corpus's MobileNetV2). Now the depthwise conv is the one consumer, edited per group,
    reinit_dead is exact and width changes are refused with the reason."""
    import copy

    from graphsurg.passes.fx.target import Target

    from graphsurg.library import default_library

    model = _InvertedResidual()
    x = torch.randn(4, 4, 6, 6)
    target = Target(copy.deepcopy(model), [x])
    dead = _dead_problem("expand", (0, 5, 11))
    lib = default_library()
    why = lib.get("excise_dead").check(dead, target)
    assert why is not None and "grouped conv 'dw'" in why
    rep = lib.get("reinit_dead")
    assert rep.check(dead, target) is None
    g = target.coupling("expand", (0, 5, 11))
    assert [(c.module, c.groups) for c in g.consumers] == [("dw", 12)]
    assert g.batchnorms() == ["bn1"]
    rep.apply(target, dead, rep.propose(dead, target))
    ref, got = _f64(model, x), _f64(target.model, x)
    assert float((got - ref).norm() / ref.norm()) <= 1e-6
    assert not torch.equal(target.model.dw.weight, model.dw.weight)  # columns zeroed per group


@pytest.mark.parametrize("trace", [True, False], ids=["fx", "probe"])
def test_per_channel_prelu_slopes_follow_the_units(trace: bool) -> None:
    """A per-channel PReLU (MTCNN's trained nets) between a layer and its consumer: its
    slopes are per unit, like a BatchNorm's parameters. Before: "module ... (PReLU)
    consumes the units; the coupling analysis does not know it" (FX) and a width change left
    the PReLU at the old width (probe). Excision is exact and takes the slopes along."""
    import copy

    from graphsurg.passes.fx.target import Target

    from graphsurg.library import default_library

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.layer, self.act, self.head = nn.Linear(8, 6), nn.PReLU(6), nn.Linear(6, 3)
            with torch.no_grad():
                self.layer.weight[[1, 4]] = 0.0
                self.layer.bias[[1, 4]] = 0.0  # units 1 and 4 output 0: dead
                self.act.weight.copy_(torch.linspace(0.05, 0.5, 6))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.act(self.layer(x))
            if not trace and bool(h.sum() > -1e9):  # data-dependent: symbolic_trace fails
                h = h * 1.0
            return self.head(h)

    model = Net().eval()
    x = torch.randn(16, 8)
    target = Target(copy.deepcopy(model), [x])
    assert target.coupling("layer", (1, 4)).per_unit_modules() == ["act"]
    rep = default_library().get("excise_dead")
    problem = _dead_problem("layer", (1, 4))
    rep.apply(target, problem, rep.propose(problem, target))
    act = target.model.get_submodule("act")
    assert act.weight.shape == (4,)
    assert torch.equal(act.weight.detach(), model.act.weight.detach()[[0, 2, 3, 5]])
    ref, got = _f64(model, x), _f64(target.model, x)
    assert float((got - ref).norm() / ref.norm()) <= 1e-6
