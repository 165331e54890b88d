"""neuron_stats across float32's whole finite range, on the CPU paths (C kernel, chunked
fallback, torch reference), against a float64 reference.

The statistics are stored in float32 (``mean``, ``m2``, ``abs_sum``): where the float64
value fits in float32 the result must match it; where it does not (a variance above 3.4e38)
the result must be +inf -- never NaN, never a count of non-finite inputs that were finite.
Tolerances: ``mean`` within 2e-6 * (|mean| + std) (float32 rounding of a shifted sum),
``var`` within 2e-5 relative (or 1e-30 absolute for a constant), counts and absmax exact.
"""

from __future__ import annotations

import pytest
import torch
from graphsurg.kernels import _neuron_stats_cpu as cpu
from graphsurg.kernels import neuron_stats

F32_MAX = float(torch.finfo(torch.float32).max)


def _backends() -> list[str]:
    return ["native", "chunked", "torch"] if cpu.available() else ["chunked", "torch"]


def _reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    v = x.to(torch.float64)
    mean = v.mean(0)
    var = ((v - mean) ** 2).mean(0)
    return mean, var, v.abs().amax(0)


def _check(x: torch.Tensor, backend: str) -> None:
    s = neuron_stats(x, backend=backend)  # type: ignore[arg-type]
    mean, var, absmax = _reference(x)
    assert int(s.n_nonfinite.sum()) == 0, f"{backend}: finite input counted as non-finite"
    assert torch.isfinite(s.mean).all(), f"{backend}: mean {s.mean}"
    assert not torch.isnan(s.var).any(), f"{backend}: var {s.var}"
    std = var.sqrt()
    err = (s.mean.double() - mean).abs()
    assert (err <= 2e-6 * (mean.abs() + std) + 1e-45).all(), f"{backend}: mean {s.mean} vs {mean}"
    assert torch.equal(s.absmax.double(), absmax), f"{backend}: absmax {s.absmax} vs {absmax}"
    abs_sum = x.to(torch.float64).abs().sum(0)
    fits = abs_sum <= F32_MAX
    assert (s.abs_sum.double()[~fits] == float("inf")).all()
    assert ((s.abs_sum.double()[fits] - abs_sum[fits]).abs() <= 2e-6 * abs_sum[fits]).all()
    m2 = var * x.shape[0]  # what NeuronStats stores, in float32
    fits = m2 <= F32_MAX
    got = s.var.double()
    assert (got[~fits] == float("inf")).all(), f"{backend}: var beyond float32 is {got[~fits]}"
    rel = (got[fits] - var[fits]).abs() <= 2e-5 * var[fits] + 1e-30
    assert rel.all(), f"{backend}: var {got[fits]} vs {var[fits]}"


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("value", [1e30, 3e38, 3.4e38, F32_MAX, -F32_MAX, 1e-38, 1e-45, 0.0])
@pytest.mark.parametrize("layout", ["rows", "nchw", "nchw_short"])
def test_constant_activations_anywhere_in_float32(backend: str, value: float,
                                                  layout: str) -> None:
    """The issue's case: a constant of 1e30 gave var = inf and 3e38 gave NaN on the C path."""
    shape = {"rows": (300, 70), "nchw": (3, 5, 20, 20), "nchw_short": (40, 6, 3, 3)}[layout]
    x = torch.full(shape, value, dtype=torch.float32)
    s = neuron_stats(x, channel_dim=-1 if layout == "rows" else 1, backend=backend)  # type: ignore[arg-type]
    assert int(s.n_nonfinite.sum()) == 0
    assert torch.equal(s.mean, torch.full_like(s.mean, torch.tensor(value).item())), s.mean
    assert torch.equal(s.var, torch.zeros_like(s.var)), s.var
    assert torch.equal(s.absmax, torch.full_like(s.absmax, abs(torch.tensor(value).item())))


@pytest.mark.parametrize("backend", _backends())
def test_mixed_magnitudes_match_float64(backend: str) -> None:
    g = torch.Generator().manual_seed(0)
    n = 257
    cols = [
        torch.randn(n, generator=g) * 1e18,                      # var 1e36 (m2 fits)
        torch.randn(n, generator=g) * 1e17 + 3e38,               # near the top, small spread
        torch.where(torch.arange(n) % 2 == 0, 3e38, -3e38),      # var 9e76: beyond float32
        # the pivot (mean of the first 64 rows) far from the mean: float32 sums of (x-pivot)^2
        # overflow (193 * 4e36) while m2 (1.9e38) fits
        torch.cat([torch.zeros(64), torch.full((n - 64,), 2e18)]),
        torch.randn(n, generator=g) * 1e-20,                     # tiny
        torch.randn(n, generator=g),                             # ordinary
        torch.full((n,), F32_MAX),
    ]
    x = torch.stack(cols, 1).to(torch.float32)
    x = torch.cat([x] * 20, 1)  # 140 channels: past the C kernel's vector blocks into its tail
    _check(x, backend)
    _check(x[:, :70].t().contiguous().t(), backend)  # the transposed (channels-strided) read
    for j in range(len(cols)):  # each alone: no other channel sends a path to its slow branch
        _check(x[:, j : j + 1].contiguous(), backend)


@pytest.mark.parametrize("backend", _backends())
def test_large_values_with_non_finite_values_counted(backend: str) -> None:
    x = torch.full((128, 4), 3e38)
    x[5, 1] = float("nan")
    x[7, 2] = float("inf")
    s = neuron_stats(x, backend=backend)  # type: ignore[arg-type]
    assert s.n_nonfinite.tolist() == [0, 1, 1, 0]
    assert s.count.tolist() == [128, 127, 127, 128]
    assert torch.equal(s.mean, torch.full((4,), 3e38)) and torch.equal(s.var, torch.zeros(4))
