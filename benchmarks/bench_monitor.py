"""Training-step time under torch.compile: graphsurg backend + Monitor vs the inner backend.

One training step = forward, MSE loss, backward, SGD step, zero_grad. Configurations, each
on its own copy of the same model (same weights), all with the same inner backend
(``INNER``; aot_eager on CPU -- inductor's compile takes minutes on 2 cores):

* ``inner``: ``torch.compile(model, backend=INNER)``, the baseline;
* ``monitor every=16``: ``backend="graphsurg"``, ``options={"monitor": Monitor(every=16)}``;
* ``monitor every=1``: the same, measuring every step.

The pytest-benchmark tests time each configuration alone; ``test_interleaved_ratios``
alternates the configurations step by step (so load from other processes hits them alike)
and prints the median step-time ratios against ``inner``. Run::

    pytest benchmarks/bench_monitor.py --benchmark-enable -s
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import graphsurg as gs

WIDTH, DEPTH, BATCH = 512, 4, 256
INNER = "aot_eager"
ROUNDS = 60  # interleaved steps per configuration


def _model() -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(DEPTH):
        layers += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(WIDTH, WIDTH))


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(BATCH, WIDTH, generator=g), torch.randn(BATCH, WIDTH, generator=g)


def _stepper(config: str) -> tuple[Callable[[], None], gs.Monitor | None]:
    model = _model()
    monitor: gs.Monitor | None = None
    if config == "inner":
        cm = torch.compile(model, backend=INNER)
    else:
        monitor = gs.Monitor(every=int(config.split("=")[1]))
        cm = torch.compile(model, backend="graphsurg",
                           options={"monitor": monitor, "inner": INNER})
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = _batch()

    def step() -> None:
        F.mse_loss(cm(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):  # compile + warm up
        step()
    return step, monitor


CONFIGS = ["inner", "every=16", "every=1"]


@pytest.mark.parametrize("config", CONFIGS)
def test_step(benchmark, config: str) -> None:  # type: ignore[no-untyped-def]
    torch._dynamo.reset()
    step, monitor = _stepper(config)
    benchmark.group = f"train step, MLP {DEPTH}x{WIDTH}, batch {BATCH}, inner={INNER}"
    benchmark.pedantic(step, rounds=30, warmup_rounds=2)
    if monitor is not None:
        assert monitor.sampled >= 1


def test_interleaved_ratios() -> None:
    torch._dynamo.reset()
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 16)
    steps = {c: _stepper(c)[0] for c in CONFIGS}
    times: dict[str, list[float]] = {c: [] for c in CONFIGS}
    for _ in range(ROUNDS):
        for c in CONFIGS:
            t = time.perf_counter()
            steps[c]()
            times[c].append(time.perf_counter() - t)
    med = {c: statistics.median(v) for c, v in times.items()}
    low = {c: min(v) for c, v in times.items()}  # the least-disturbed step (shared machines)
    print(f"\nbench_monitor: MLP {DEPTH}x{WIDTH}, batch {BATCH}, inner={INNER}, "
          f"{torch.get_num_threads()} threads, {ROUNDS} interleaved steps per configuration")
    for c in CONFIGS:
        print(f"  {c:>9}: min {low[c] * 1e3:8.2f} ms (x{low[c] / low['inner']:.3f})   "
              f"median {med[c] * 1e3:8.2f} ms (x{med[c] / med['inner']:.3f})")
    assert all(v > 0 for v in med.values())


def test_monitor_overhead_sane() -> None:
    """Not a target check (CPU timings here are noisy), a guard against pathologies."""
    torch._dynamo.reset()
    step, _ = _stepper("every=16")
    base, _ = _stepper("inner")
    t0 = time.perf_counter()
    for _ in range(10):
        base()
    t1 = time.perf_counter()
    for _ in range(10):
        step()
    t2 = time.perf_counter()
    assert (t2 - t1) < 3 * (t1 - t0)



def _min_time(fn: Callable[[], object], n: int) -> float:
    best = float("inf")
    for _ in range(n):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def test_overhead_components() -> None:
    """What the monitor adds to a step, timed in isolation (min over repeats: robust to
    other processes on a shared machine), against the inner backend's minimum step time."""
    from graphsurg.kernels import grad_sq_norms
    from graphsurg.passes.fx.instrument import Observer
    from graphsurg.passes.fx.observe_compiled import GraphRecord, MonitoredCall
    from graphsurg.passes.fx.dynamo_sites import DynamoSites

    torch._dynamo.reset()
    base_step, _ = _stepper("inner")
    base = _min_time(base_step, 30)
    # a skipped call: the wrapper's bookkeeping around the plain compiled function
    mon = gs.Monitor(every=16)
    rec = GraphRecord(0, DynamoSites([], []), [])
    plain = lambda *a: a  # noqa: E731
    call = MonitoredCall(mon, rec, plain, plain, 1, 0, {}, {})
    rec.calls = 1
    n_calls = 20000
    t = time.perf_counter()
    for _ in range(n_calls):
        rec.calls = 1  # stay on a skipped call
        call(1)
    skipped = (time.perf_counter() - t) / n_calls - _min_time(lambda: plain(1), 2000)
    # a sampled call: observers on every activation + gradient norms of every parameter
    model = _model()
    x, _ = _batch()
    acts: list[torch.Tensor] = []
    h = x
    for m in model:
        h = m(h)
        if isinstance(m, nn.ReLU) or m is model[-1]:
            acts.append(h.detach())
    from graphsurg.passes.fx.capture import ActSite

    obs = [Observer(ActSite(f"n{i}", "relu", "relu", str(i), -1, i, str(i)),
                    saturation_margin=0.01, sample_rows=0) for i in range(len(acts))]
    grads = [p.detach().clone() for p in model.parameters()]

    def sampled() -> None:
        for o, a in zip(obs, acts, strict=True):
            o(a)
        for g in grads:
            grad_sq_norms([g])

    extra = _min_time(sampled, 30)
    print(f"\nbench_monitor components: inner step min {base * 1e3:.2f} ms; skipped-call "
          f"wrapper {skipped * 1e6:.2f} us; sampled-step extra work {extra * 1e3:.2f} ms")
    print(f"  estimated ratio every=1: x{(base + extra) / base:.3f}   every=16: "
          f"x{(base + extra / 16 + skipped) / base:.4f}")
    assert skipped < 1e-4 and extra > 0
