"""Channel coupling: FX analysis, probe fallback, refusals with reasons."""

from __future__ import annotations

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
    g = _group(Unknown(nn.PReLU(6)), "a", x)  # per-unit slopes: not channel-local
    assert not g.ok and "'tail' (PReLU)" in g.reason()


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
