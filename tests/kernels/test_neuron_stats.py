"""neuron_stats on every path (torch reference, C kernel, Triton kernel through the
interpreter) against an independent float64 reference, over layouts, dtypes and bad values."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from _kernel_reference import assert_matches, reference_stats
from graphsurg.kernels import NeuronStats, neuron_stats
from graphsurg.kernels import _neuron_stats_cpu as cpu

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
BACKENDS = ["torch", "native", "chunked", "triton"]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# name -> (builder(generator, dtype) -> x, channel_dim). Sizes are small: the Triton
# interpreter runs every tile in numpy.
Case = tuple[Callable[[torch.Generator, torch.dtype], torch.Tensor], int]


def _randn(g: torch.Generator, dt: torch.dtype, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g).to(dt)


CASES: dict[str, Case] = {
    "one_row": (lambda g, dt: _randn(g, dt, 1, 1023), -1),
    "rows_1023_channels": (lambda g, dt: _randn(g, dt, 67, 1023), -1),
    "one_channel": (lambda g, dt: _randn(g, dt, 300, 1), 1),
    "ntc": (lambda g, dt: _randn(g, dt, 3, 11, 37), -1),
    "ntc_channel_middle": (lambda g, dt: _randn(g, dt, 3, 37, 5), 1),
    "nchw": (lambda g, dt: _randn(g, dt, 3, 6, 5, 7), 1),
    "nchw_long_spatial": (lambda g, dt: _randn(g, dt, 2, 3, 20, 17), 1),
    "channels_last": (
        lambda g, dt: _randn(g, dt, 3, 6, 5, 7).contiguous(memory_format=torch.channels_last),
        1,
    ),
    "strided_channels": (lambda g, dt: _randn(g, dt, 41, 60)[:, ::2], -1),
    "strided_rows": (lambda g, dt: _randn(g, dt, 80, 24)[::3], -1),
    "transposed": (lambda g, dt: _randn(g, dt, 24, 50).t(), -1),
    "permuted_nchw": (lambda g, dt: _randn(g, dt, 5, 3, 6, 4).permute(0, 3, 1, 2), 1),
    "offset_1e4": (lambda g, dt: (torch.randn(97, 33, generator=g) * 0.5 + 1e4).to(dt), -1),
    "offset_1e4_nchw": (
        lambda g, dt: (torch.randn(2, 5, 9, 9, generator=g) * 0.5 - 1e4).to(dt),
        1,
    ),
}


def _inject_nonfinite(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    x = x.clone()
    flat = x.view(-1) if x.is_contiguous() else None
    if flat is None:
        return x
    n = flat.numel()
    idx = torch.randperm(n, generator=g)[: max(3, n // 50)]
    vals = torch.tensor([float("nan"), float("inf"), float("-inf")])
    flat[idx] = vals[torch.arange(idx.numel()) % 3].to(x.dtype)
    flat[0] = float("nan")  # the first value, used by the pivots, is not finite
    return x


def _skip_if_unavailable(backend: str) -> None:
    if backend == "native" and not cpu.available():
        pytest.skip("the C kernel could not be built on this machine (no gcc)")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_float64_reference(case: str, dtype: torch.dtype, backend: str) -> None:
    _skip_if_unavailable(backend)
    build, cd = CASES[case]
    x = build(_gen(hash(case) % 2**31), dtype)
    before = x.clone()
    s = neuron_stats(x, cd, sat_threshold=1.5, backend=backend)
    assert torch.equal(x, before), "neuron_stats modified its input"
    assert s.channels == x.shape[cd]
    assert_matches(s, reference_stats(x, cd, 1.5), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["rows_1023_channels", "nchw", "offset_1e4", "ntc"])
def test_nonfinite_counted_and_excluded(case: str, dtype: torch.dtype, backend: str) -> None:
    _skip_if_unavailable(backend)
    build, cd = CASES[case]
    g = _gen(7)
    x = _inject_nonfinite(build(g, dtype), g)
    s = neuron_stats(x, cd, sat_threshold=1.5, backend=backend)
    ref = reference_stats(x, cd, 1.5)
    assert int(s.n_nonfinite.sum()) > 0
    assert bool(torch.isfinite(s.mean).all() and torch.isfinite(s.m2).all())
    assert_matches(s, ref, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_nonfinite_channel(backend: str) -> None:
    _skip_if_unavailable(backend)
    x = torch.randn(20, 4)
    x[:, 2] = float("nan")
    s = neuron_stats(x, backend=backend)
    assert s.count.tolist() == [20, 20, 0, 20]
    assert s.n_nonfinite.tolist() == [0, 0, 20, 0]
    assert float(s.mean[2]) == 0.0 and float(s.m2[2]) == 0.0 and float(s.absmax[2]) == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_threshold_counts_no_saturation(backend: str) -> None:
    _skip_if_unavailable(backend)
    s = neuron_stats(torch.randn(30, 5) * 1e15, backend=backend)
    assert s.sat_threshold is None
    assert int(s.n_sat.sum()) == 0


def test_native_large_input_uses_threads_and_tiles() -> None:
    """Sizes past the kernel's thread split (256 rows), row tile (64), channel block (256)
    and segment flush, against float64."""
    if not cpu.available():
        pytest.skip("the C kernel could not be built on this machine")
    g = _gen(3)
    for x, cd in [
        (torch.randn(3001, 300, generator=g) * 2 + 1e4, -1),
        (torch.randn(3, 4, 130, 131, generator=g) - 5, 1),
        (torch.randn(600, 7, 3, generator=g), 1),
    ]:
        s = neuron_stats(x, cd, sat_threshold=1e4, backend="native")
        assert_matches(s, reference_stats(x, cd, 1e4), torch.float32)


def test_triton_small_blocks_many_splits() -> None:
    """Force many tiles and splits so the in-kernel and cross-split Chan merges both run."""
    from graphsurg.kernels._neuron_stats_triton import neuron_stats_triton

    g = _gen(5)
    x = torch.randn(53, 13, generator=g) * 3 + 1e4
    s = neuron_stats_triton(x, 1, 1e4, block_m=4, block_c=4, splits=5)
    assert_matches(s, reference_stats(x, 1, 1e4), torch.float32)
    y = torch.randn(3, 5, 6, 7, generator=g)
    s = neuron_stats_triton(y, 1, None, block_m=8, block_c=2, splits=4)
    assert_matches(s, reference_stats(y, 1, None), torch.float32)
    # several slot flushes per program, with NaN/Inf inside and a partial last block per row
    z = _inject_nonfinite(torch.randn(4, 3, 7, 5, generator=g) * 2 - 1e4, g)
    s = neuron_stats_triton(z, 1, 1e4, block_m=4, block_c=2, splits=2, flush_iters=3)
    assert_matches(s, reference_stats(z, 1, 1e4), torch.float32)


def test_auto_falls_back_to_torch_without_compiler(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu, "_lib", None)
    monkeypatch.setattr(cpu, "_tried", True)
    assert not cpu.available()
    x = torch.randn(40, 6)
    s = neuron_stats(x)  # auto: no error, torch path
    assert_matches(s, reference_stats(x, -1, None), torch.float32)
    with pytest.raises(ValueError, match="backend='native'"):
        neuron_stats(x, backend="native")


def test_build_failure_returns_none(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("GRAPHSURG_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    monkeypatch.setattr(cpu.tempfile, "gettempdir", lambda: str(tmp_path))
    assert cpu._build() is None
    monkeypatch.setattr(cpu.shutil, "which", lambda _name: None)
    assert cpu._build() is None


def test_update_streams_batches() -> None:
    g = _gen(11)
    x = torch.randn(90, 7, generator=g) + 3
    s = NeuronStats.empty(7, sat_threshold=3.0)
    for chunk in x.split(25):
        s.update(chunk)
    assert_matches(s, reference_stats(x, -1, 3.0), torch.float32)


def test_derived_fields() -> None:
    x = torch.tensor([[1.0, -2.0], [3.0, 0.0], [-1.0, 4.0], [1.0, 0.0]])
    s = neuron_stats(x, sat_threshold=3.0)
    torch.testing.assert_close(s.var, x.var(0, unbiased=False))
    torch.testing.assert_close(s.std, x.std(0, unbiased=False))
    torch.testing.assert_close(s.mean_abs, x.abs().mean(0))
    torch.testing.assert_close(s.firing_rate, torch.tensor([0.75, 0.25]))
    torch.testing.assert_close(s.saturated_fraction, torch.tensor([0.25, 0.25]))
    ma = x.abs().mean(0)
    torch.testing.assert_close(s.dormancy_score, ma / ma.mean())


def test_native_works_in_a_forked_child() -> None:
    """The worker threads do not survive fork; a forked child must build its own."""
    import multiprocessing as mp

    if not cpu.available():
        pytest.skip("the C kernel could not be built on this machine")
    x = torch.randn(4096, 64)
    neuron_stats(x, backend="native")  # start the parent's thread pool
    ctx = mp.get_context("fork")
    with ctx.Pool(1) as pool:
        got = pool.apply_async(_child_stats, (x,)).get(timeout=60)
    torch.testing.assert_close(got, neuron_stats(x, backend="native").mean, rtol=0, atol=0)


def _child_stats(x: torch.Tensor) -> torch.Tensor:
    return neuron_stats(x, backend="native").mean


@pytest.mark.parametrize("backend", ["auto", "torch", "chunked"])
def test_no_autograd_graph(backend: str) -> None:
    x = torch.randn(30, 4, requires_grad=True) * 2
    s = neuron_stats(x, backend=backend)
    assert not s.mean.requires_grad and not s.m2.requires_grad
