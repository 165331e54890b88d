"""The torch.fx rewrites are torch.fx passes: ``PassResult(graph_module, modified)``, usable
in a ``PassManager``, with ``val`` and ``nn_module_stack`` on every node they create."""

from __future__ import annotations

import operator

import pytest
import torch
from graphsurg.passes.fx.lift_modules import LiftModules
from graphsurg.passes.fx.rewrite import (
    InsertAfter,
    InsertBypass,
    ReplaceWithModule,
    RewriteError,
    insert_after,
)
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassResult
from torch.fx.passes.infra.pass_manager import PassManager


def _exported() -> tuple[fx.GraphModule, torch.Tensor]:
    """A torch.export module (aten calls, ``val`` and ``nn_module_stack`` on its nodes)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    x = torch.randn(3, 4)
    gm = torch.export.export(m, (x,)).module()
    assert isinstance(gm, fx.GraphModule)
    return gm, x


def _lifted() -> tuple[fx.GraphModule, torch.Tensor]:
    gm, x = _exported()
    res = LiftModules()(gm)
    assert res is not None
    return res.graph_module, x


def _by_name(gm: fx.GraphModule, name: str) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.name == name)


def _created(gm: fx.GraphModule, submodule: str) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == submodule)


def test_lift_is_an_out_of_place_pass_that_keeps_meta() -> None:
    gm, x = _exported()
    before = gm.code
    p = LiftModules()
    res = p(gm)
    assert isinstance(res, PassResult) and res.modified and res.graph_module is not gm
    assert gm.code == before  # the input is not modified
    assert p.lifted == ["0", "2"]
    for path, want in (("0", (3, 8)), ("2", (3, 2))):
        node = _created(res.graph_module, path)
        assert tuple(node.meta["val"].shape) == want
        assert list(node.meta["nn_module_stack"].values())[-1][0] == path
    with torch.no_grad():  # the same tensors in the same order: bit-exact
        assert torch.equal(res.graph_module(x), gm(x))
    q = LiftModules()
    again = q(res.graph_module)  # nothing left to lift
    assert again is not None and not again.modified and q.lifted == []


@pytest.mark.parametrize("make", [
    lambda: InsertAfter("relu", nn.Identity(), "probe"),
    lambda: InsertBypass("_0", "relu", _zero(8), "bypass"),
    lambda: ReplaceWithModule("relu", nn.ReLU(), "act"),
])
def test_module_passes_are_in_place_exact_and_give_new_nodes_meta(make) -> None:  # type: ignore[no-untyped-def]
    gm, x = _lifted()
    with torch.no_grad():
        ref = gm(x)
    src = _by_name(gm, "relu")
    val, stack = src.meta["val"], src.meta["nn_module_stack"]
    p = make()
    res = p(gm)
    assert isinstance(res, PassResult) and res.modified and res.graph_module is gm
    node = _created(gm, p.submodule)
    assert node.meta["val"] is val  # the value it stands for has the same shape and dtype
    new_stack = node.meta["nn_module_stack"]
    assert list(new_stack.items())[:-1] == list(stack.items())
    assert list(new_stack.values())[-1] == (p.submodule, f"torch.nn.modules.{_mod(p)}")
    with torch.no_grad():  # identity / zero bypass / the same activation: bit-exact
        assert torch.equal(gm(x), ref)


def _zero(width: int) -> nn.Linear:
    lin = nn.Linear(width, width)
    nn.init.zeros_(lin.weight)
    nn.init.zeros_(lin.bias)
    return lin


def _mod(p: InsertAfter | InsertBypass | ReplaceWithModule) -> str:
    cls = type(p.module)
    return f"{cls.__module__.removeprefix('torch.nn.modules.')}.{cls.__qualname__}"


def test_passes_compose_in_a_pass_manager_and_names_stay_unique() -> None:
    gm, x = _exported()
    res = PassManager([LiftModules(), InsertAfter("relu", nn.Identity(), "probe"),
                       InsertAfter("relu", nn.Identity(), "probe")])(gm)
    out = res.graph_module
    assert res.modified
    assert [n.target for n in out.graph.nodes if n.op == "call_module"
            and str(n.target).startswith("probe")] == ["probe_1", "probe"]
    with torch.no_grad():
        assert torch.equal(out(x), gm(x))


def test_compat_function_returns_the_submodule_and_refusals_name_the_node() -> None:
    gm, _ = _lifted()
    assert insert_after(gm, _by_name(gm, "relu"), nn.Identity(), "a.b") == "a_b"
    with pytest.raises(RewriteError, match="no node 'nope'"):
        InsertAfter("nope", nn.Identity(), "x")(gm)
    other, _ = _lifted()
    with pytest.raises(RewriteError, match="belongs to another graph"):
        InsertAfter(_by_name(other, "relu"), nn.Identity(), "x")(gm)
    InsertBypass("_0", "relu", _zero(8), "b")(gm)
    add = next(n for n in gm.graph.nodes if n.target is operator.add)
    with pytest.raises(RewriteError, match="has 2 tensor inputs"):
        ReplaceWithModule(add, nn.ReLU(), "r")(gm)
