"""Merging: split the batch anywhere, merge, get the statistics of the whole (hypothesis)."""

from __future__ import annotations

import pytest
import torch
from _kernel_reference import assert_matches, reference_stats
from graphsurg.kernels import NeuronStats, neuron_stats
from graphsurg.kernels import _neuron_stats_cpu as cpu
from graphsurg.kernels._stats import _FIELDS
from hypothesis import assume, given, settings
from hypothesis import strategies as st

# merged vs whole: both float32 results from the same data; the merge adds float32 rounding
# of its own, bounded by the float32 tolerances of the float64 comparison.


@st.composite
def batches(draw: st.DrawFn) -> tuple[torch.Tensor, list[int]]:
    n = draw(st.integers(2, 80))
    c = draw(st.integers(1, 9))
    seed = draw(st.integers(0, 2**31 - 1))
    offset = draw(st.sampled_from([0.0, 1e4, -3.0]))
    cuts = sorted(draw(st.lists(st.integers(1, n - 1), min_size=1, max_size=4, unique=True)))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=g) * draw(st.sampled_from([1e-3, 1.0, 50.0])) + offset
    if draw(st.booleans()):
        x[draw(st.integers(0, n - 1)), draw(st.integers(0, c - 1))] = float("nan")
    return x, cuts


@settings(max_examples=60, deadline=None)
@given(batches(), st.sampled_from(["torch", "native", "chunked"]))
def test_split_anywhere_merged_equals_whole(data: tuple[torch.Tensor, list[int]], backend: str):
    x, cuts = data
    bounds = [0, *cuts, x.shape[0]]
    parts = [x[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    merged = NeuronStats.empty(x.shape[1], sat_threshold=1.0)
    for p in parts:
        merged = merged.merge(neuron_stats(p, sat_threshold=1.0, backend=backend))
    assert_matches(merged, reference_stats(x, -1, 1.0), torch.float32)


@settings(max_examples=25, deadline=None)
@given(batches())
def test_merge_is_associative_up_to_rounding(data: tuple[torch.Tensor, list[int]]) -> None:
    x, cuts = data
    assume(len(cuts) >= 2)
    a, b, c = x[: cuts[0]], x[cuts[0] : cuts[1]], x[cuts[1] :]
    sa, sb, sc = neuron_stats(a), neuron_stats(b), neuron_stats(c)
    left, right = sa.merge(sb).merge(sc), sa.merge(sb.merge(sc))
    for f in _FIELDS:
        torch.testing.assert_close(getattr(left, f), getattr(right, f), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "native", "triton"])
def test_merge_far_from_zero_keeps_precision(backend: str) -> None:
    """float32 statistics of data at 1e4 with spread 1e-3: the float32 mean alone is off by
    half a spread, so the merge must use the mean's residual to stay exact."""
    if backend == "native" and not cpu.available():
        pytest.skip("the C kernel could not be built on this machine")
    x = torch.randn(90, 4, generator=torch.Generator().manual_seed(9)) * 1e-3 + 1e4
    merged = NeuronStats.empty(4)
    for part in (x[:17], x[17:50], x[50:]):
        merged.update(part, backend=backend)
    assert_matches(merged, reference_stats(x, -1, None), torch.float32)
    ref_mean = reference_stats(x, -1, None)["mean"]
    assert float((merged.exact_mean() - ref_mean).abs().max()) < 1e-7


def test_empty_is_identity() -> None:
    s = neuron_stats(torch.randn(10, 3), sat_threshold=2.0)
    e = NeuronStats.empty(3, sat_threshold=2.0)
    for m in (s.merge(e), e.merge(s)):
        for f in _FIELDS:
            assert torch.equal(getattr(m, f), getattr(s, f)), f


@settings(max_examples=40, deadline=None)
@given(batches())
def test_packed_sums_of_k_calls_merged_at_once_equal_the_whole_in_float64(
        data: tuple[torch.Tensor, list[int]]) -> None:
    """What the compiled-graph monitor does with the sums of K sampled calls
    (``partial_sums`` per call, ``merge_packed_many`` of all K, then ``merge_packed`` into the
    running statistics) equals the statistics of the whole batch computed in float64."""
    from graphsurg.kernels import merge_packed, packed_from_sums, partial_sums
    from graphsurg.kernels._multi_stats import merge_packed_many

    x, cuts = data
    bounds = [0, *cuts, x.shape[0]]
    parts = [x[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    sums = torch.stack([partial_sums(p, -1, 1.0) for p in parts])
    head = merge_packed(None, packed_from_sums(sums[0]))  # the running statistics
    p = merge_packed(head, merge_packed_many(packed_from_sums(sums[1:]))) \
        if len(parts) > 1 else head
    x64 = x.double()
    fin = torch.isfinite(x64)
    n = fin.sum(0)
    assert torch.equal(p[0], n.double())
    assert torch.equal(p[6], (~fin).sum(0).double())
    assert torch.equal(p[4], (fin & (x64 <= 0)).sum(0).double())
    assert torch.equal(p[7], (fin & (x64.abs() >= 1.0)).sum(0).double())
    z = torch.where(fin, x64, torch.zeros((), dtype=torch.float64))
    mean = z.sum(0) / n.clamp_min(1)
    m2 = torch.where(fin, (x64 - mean) ** 2, torch.zeros((), dtype=torch.float64)).sum(0)
    scale = x64[fin].abs().max() if bool(fin.any()) else torch.tensor(1.0, dtype=torch.float64)
    # float32 sums of at most 80 values shifted by a pivot from the channel: float32 rounding
    # of the deviations (|x - pivot| <= 2 * scale), relative to the scale of the data
    ok = n > 0
    torch.testing.assert_close(p[1][ok], mean[ok], atol=1e-5 * float(scale), rtol=1e-6)
    torch.testing.assert_close(p[2][ok], m2[ok], atol=1e-3 * float(scale) ** 2,
                               rtol=1e-4)
    torch.testing.assert_close(p[3], z.abs().sum(0), atol=1e-4 * float(scale), rtol=1e-5)
    torch.testing.assert_close(p[5], z.abs().amax(0), atol=0.0, rtol=1e-7)
