"""The statistics engine on CPU, side by side on a (65536, 1024) float32 activation.

1. ``x.sum(0)`` -- one read pass, the floor;
2. the naive hook-tool set: ``x.var(0)``, ``x.mean(0)``, ``(x <= 0).float().mean(0)``,
   ``x.abs().amax(0)``;
3. ``torch.var_mean(x, 0)`` alone;
4. graphsurg's CPU path (``neuron_stats``, the compiled C kernel) -- every statistic;
5. for orientation: the chunked torch fallback (what runs when the C kernel cannot be
   built) and the pure-torch reference.

A benchmark measures, it does not assert speed: the ratios against the floor are printed at
the end of the run (``make bench``) and recorded in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import pytest
import torch
from graphsurg.kernels import _neuron_stats_cpu as cpu
from graphsurg.kernels import neuron_stats

SHAPE = (65536, 1024)
_means: dict[str, float] = {}
_interleaved: dict[str, float] = {}


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(*SHAPE, generator=g)


def _naive(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return x.var(0), x.mean(0), (x <= 0).float().mean(0), x.abs().amax(0)


CASES: dict[str, Callable[[torch.Tensor], object]] = {
    "floor_sum": lambda x: x.sum(0),
    "naive_hook_set": _naive,
    "var_mean": lambda x: torch.var_mean(x, 0),
    "graphsurg_cpu": lambda x: neuron_stats(x, sat_threshold=3.0),
    "graphsurg_chunked_fallback": lambda x: neuron_stats(x, sat_threshold=3.0, backend="chunked"),
    "graphsurg_torch_reference": lambda x: neuron_stats(x, sat_threshold=3.0, backend="torch"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_stats_cpu(benchmark, x: torch.Tensor, name: str) -> None:
    if name == "graphsurg_cpu" and not cpu.available():
        pytest.skip("the C kernel could not be built here; graphsurg runs the torch path")
    fn = CASES[name]
    fn(x)  # warm-up (and the one-time build of the C kernel)
    rounds = {"naive_hook_set": 3, "var_mean": 3, "graphsurg_torch_reference": 1,
              "graphsurg_chunked_fallback": 3}.get(name, 20)
    benchmark.group = f"neuron_stats {SHAPE[0]}x{SHAPE[1]} float32 CPU"
    benchmark.pedantic(fn, args=(x,), rounds=rounds, iterations=1, warmup_rounds=0)
    if benchmark.stats is not None:
        _means[name] = benchmark.stats.stats.median


def test_interleaved_ratio(benchmark, x: torch.Tensor) -> None:
    """The floor and graphsurg's CPU path run alternately, pair by pair: on a machine other
    jobs share, the per-pair ratio is steadier than the ratio of separately taken medians."""
    if not cpu.available():
        pytest.skip("the C kernel could not be built here")
    floor, ours = CASES["floor_sum"], CASES["graphsurg_cpu"]
    pairs: list[tuple[float, float]] = []

    def run_pairs() -> None:
        for _ in range(10):
            t0 = time.perf_counter()
            floor(x)
            t1 = time.perf_counter()
            ours(x)
            t2 = time.perf_counter()
            pairs.append((t1 - t0, t2 - t1))

    benchmark.group = "interleaved floor / graphsurg_cpu pairs"
    benchmark.pedantic(run_pairs, rounds=1, iterations=1)
    ratios = sorted(b / a for a, b in pairs)
    _interleaved["median_ratio"] = statistics.median(ratios)
    _interleaved["best_floor_ms"] = min(a for a, _ in pairs) * 1e3
    _interleaved["best_ours_ms"] = min(b for _, b in pairs) * 1e3


def teardown_module() -> None:
    floor = _means.get("floor_sum")
    if not floor:
        floor = float("nan")
    lines = [f"\nstatistics engine, {SHAPE} float32, {torch.get_num_threads()} threads "
             "(median; ratio to x.sum(0)):"]
    for name, t in _means.items():
        lines.append(f"  {name:28s} {t * 1e3:9.2f} ms  {t / floor:6.2f}x")
    if _interleaved:
        lines.append(
            f"  interleaved pairs: median ratio {_interleaved['median_ratio']:.2f}x; best "
            f"{_interleaved['best_ours_ms']:.1f} ms vs floor {_interleaved['best_floor_ms']:.1f}"
            f" ms ({_interleaved['best_ours_ms'] / _interleaved['best_floor_ms']:.2f}x)"
        )
    print("\n".join(lines))
