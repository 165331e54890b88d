"""Backend registration, options and inner lowering."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
from _compile_models import mlp
from graphsurg.passes.fx.backend import graphsurg_backend

import graphsurg as gs


def test_entry_point_backend_without_importing_graphsurg() -> None:
    code = textwrap.dedent("""
        import sys, torch
        names = torch._dynamo.list_backends()
        assert "graphsurg" in names, names
        assert not any(m.startswith("graphsurg") for m in sys.modules), "imported early"
        m = torch.nn.Linear(3, 2)
        c = torch.compile(m, backend="graphsurg", options={"inner": "eager"})
        x = torch.randn(4, 3)
        assert torch.allclose(c(x), m(x))
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().endswith("ok")


def test_import_registers_backend() -> None:
    import graphsurg.passes.fx.backend  # noqa: F401
    from torch._dynamo.backends.registry import lookup_backend

    assert lookup_backend("graphsurg") is graphsurg_backend
    assert "graphsurg" in torch._dynamo.list_backends()


def test_inner_callable_receives_the_graph() -> None:
    seen: list[int] = []

    def inner(gm: torch.fx.GraphModule, ex: Sequence[Any]) -> Callable[..., Any]:
        seen.append(len(ex))
        return gm.forward

    model = mlp()
    c = torch.compile(model, backend="graphsurg", options={"inner": inner})
    x = torch.randn(3, 8)
    torch.testing.assert_close(c(x), model(x), atol=0, rtol=0)  # same graph, run eagerly
    assert seen == [7]  # 6 parameters + the input


def test_unknown_option_is_a_clear_error() -> None:
    c = torch.compile(mlp(), backend="graphsurg", options={"monitr": gs.Monitor()})
    with pytest.raises(Exception, match=r"unknown graphsurg backend option\(s\) \['monitr'\]"):
        c(torch.randn(2, 8))


def test_bad_inner_is_a_clear_error() -> None:
    c = torch.compile(mlp(), backend="graphsurg", options={"inner": "no_such_backend"})
    with pytest.raises(Exception, match="is not a torch.compile backend"):
        c(torch.randn(2, 8))


def test_inductor_with_monitor_small() -> None:
    """The one inductor test (a cold inductor compile takes ~25 s on 2 CPU cores): forward
    only, so that inductor compiles one graph; the backward path is covered with aot_eager."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    mon = gs.Monitor(every=1)
    c = torch.compile(model, backend="graphsurg", options={"monitor": mon})  # inner: inductor
    x = torch.randn(16, 4)
    with torch.no_grad():
        out = c(x)
    torch.testing.assert_close(out, model(x), atol=1e-5, rtol=1e-5)  # inductor reorders sums
    ref = gs.diagnose(model, [x])
    s = next(s for a, s in mon.stats().items() if a.startswith("0:"))
    torch.testing.assert_close(s.mean, torch.tensor(ref.layers["0:relu"].mean), atol=1e-5,
                               rtol=1e-5)
