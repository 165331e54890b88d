"""Bad input gets a ValueError that names the argument; never a silent wrong answer."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from graphsurg.kernels import NeuronStats, grad_sq_norms, neuron_stats, row_sq_norms

BACKENDS = ["auto", "torch", "native", "chunked", "triton"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "x, kwargs, names",
    [
        (torch.randn(4, 3), {"channel_dim": 2}, "channel_dim"),
        (torch.randn(4, 3), {"channel_dim": -3}, "channel_dim"),
        (torch.zeros(0, 3), {}, "x"),
        (torch.zeros(3, 0), {}, "x"),
        (torch.tensor(1.0), {}, "x"),
        (torch.arange(12).reshape(4, 3), {}, "x"),
        (torch.ones(4, 3, dtype=torch.bool), {}, "x"),
        (torch.randn(4, 3), {"sat_threshold": float("nan")}, "sat_threshold"),
    ],
    ids=["dim_too_big", "dim_too_small", "no_rows", "no_channels", "zero_dim", "int64",
         "bool", "nan_threshold"],
)
def test_neuron_stats_rejects(x: torch.Tensor, kwargs: dict, names: str, backend: str) -> None:
    with pytest.raises(ValueError, match=names):
        neuron_stats(x, **kwargs, backend=backend)  # type: ignore[arg-type]


def test_unknown_backend() -> None:
    with pytest.raises(ValueError, match="backend"):
        neuron_stats(torch.randn(3, 2), backend="cuda")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="backend"):
        grad_sq_norms([torch.randn(3)], backend="fast")  # type: ignore[arg-type]


def test_merge_different_widths() -> None:
    with pytest.raises(ValueError, match="other"):
        neuron_stats(torch.randn(4, 3)).merge(neuron_stats(torch.randn(4, 5)))
    with pytest.raises(ValueError, match="sat_threshold"):
        neuron_stats(torch.randn(4, 3), sat_threshold=1.0).merge(neuron_stats(torch.randn(4, 3)))
    with pytest.raises(ValueError, match="channel"):
        neuron_stats(torch.randn(4, 3)).update(torch.randn(4, 5))


def test_empty_needs_channels() -> None:
    with pytest.raises(ValueError, match="channels"):
        NeuronStats.empty(0)


def test_grad_sq_norms_rejects() -> None:
    with pytest.raises(ValueError, match="tensors"):
        grad_sq_norms([])
    with pytest.raises(ValueError, match=r"tensors\[1\]"):
        grad_sq_norms([torch.randn(3), torch.arange(3)])


def test_row_sq_norms_rejects() -> None:
    with pytest.raises(ValueError, match="g is 0-dim"):
        row_sq_norms(torch.tensor(2.0))
    with pytest.raises(ValueError, match="g has dtype"):
        row_sq_norms(torch.ones(3, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="g has no rows"):
        row_sq_norms(torch.zeros(0, 4))


def test_cpu_path_works_without_triton() -> None:
    """`import graphsurg` and the CPU statistics work where triton cannot be imported."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, graphsurg\n"
        "from graphsurg.kernels import neuron_stats, grad_sq_norms, row_sq_norms\n"
        "s = neuron_stats(torch.randn(50, 4) + 2)\n"
        "assert abs(float(s.mean.mean()) - 2) < 0.5\n"
        "assert grad_sq_norms([torch.ones(3)]).tolist() == [3.0]\n"
        "assert row_sq_norms(torch.ones(2, 3)).tolist() == [3.0, 3.0]\n"
        "assert 'triton' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
