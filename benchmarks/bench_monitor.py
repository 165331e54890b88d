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


def _model(width: int = WIDTH, depth: int = DEPTH) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, width))


def _batch(width: int = WIDTH, batch: int = BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, width, generator=g), torch.randn(batch, width, generator=g)


def _stepper(config: str, inner: str = INNER, width: int = WIDTH, depth: int = DEPTH,
             batch: int = BATCH) -> tuple[Callable[[], None], gs.Monitor | None]:
    model = _model(width, depth)
    monitor: gs.Monitor | None = None
    if config == "inner":
        cm = torch.compile(model, backend=inner)
    else:
        monitor = gs.Monitor(every=int(config.split("=")[1]))
        cm = torch.compile(model, backend="graphsurg",
                           options={"monitor": monitor, "inner": inner})
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = _batch(width, batch)

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


def interleaved(inner: str = INNER, width: int = WIDTH, depth: int = DEPTH, batch: int = BATCH,
                rounds: int = ROUNDS) -> dict[str, tuple[float, float]]:
    """Per configuration: (min, median) step time in seconds, the configurations alternating
    step by step so load from other processes hits them alike; under ``"<config>/cpu"`` the
    same of the thread's CPU time per step (robust to load with ``OMP_NUM_THREADS=1``)."""
    torch._dynamo.reset()
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 16)
    steps = {c: _stepper(c, inner, width, depth, batch)[0] for c in CONFIGS}
    times: dict[str, list[float]] = {c: [] for c in CONFIGS}
    cpu: dict[str, list[float]] = {c: [] for c in CONFIGS}
    for _ in range(rounds):
        for c in CONFIGS:
            u = time.thread_time()
            t = time.perf_counter()
            steps[c]()
            times[c].append(time.perf_counter() - t)
            cpu[c].append(time.thread_time() - u)
    out = {c: (min(v), statistics.median(v)) for c, v in times.items()}
    # the calling thread's CPU time per step: with one OpenMP thread every kernel and the
    # CPU backward run on it, and time other processes take the core from it is not counted
    out.update({f"{c}/cpu": (min(v), statistics.median(v)) for c, v in cpu.items()})
    return out


def _print(title: str, r: dict[str, tuple[float, float]]) -> None:
    print(f"\n{title}, {torch.get_num_threads()} threads")
    for c in CONFIGS:
        lo, med = r[c]
        print(f"  {c:>9}: min {lo * 1e3:8.2f} ms (x{lo / r['inner'][0]:.3f})   "
              f"median {med * 1e3:8.2f} ms (x{med / r['inner'][1]:.3f})   thread CPU median "
              f"x{r[c + '/cpu'][1] / r['inner/cpu'][1]:.3f}")


def test_interleaved_ratios() -> None:
    r = interleaved()
    _print(f"bench_monitor: MLP {DEPTH}x{WIDTH}, batch {BATCH}, inner={INNER}, {ROUNDS} "
           "interleaved steps per configuration", r)
    assert all(v[1] > 0 for v in r.values())


#: a model whose inductor compile (plain + observed graph, three configurations) fits the
#: benchmark budget on 2 CPU cores
INDUCTOR_MODEL = {"width": 256, "depth": 2, "batch": 256}


def test_interleaved_ratios_inductor() -> None:
    r = interleaved("inductor", rounds=ROUNDS, **INDUCTOR_MODEL)
    _print(f"bench_monitor: MLP {INDUCTOR_MODEL['depth']}x{INDUCTOR_MODEL['width']}, batch "
           f"{INDUCTOR_MODEL['batch']}, inner=inductor (statistics inside the graph)", r)
    assert all(v[1] > 0 for v in r.values())


#: (width, depth, interleaved rounds): the model grows 8x wider and 8x deeper
GROWTH = [(512, 4, 30), (1024, 4, 20), (2048, 4, 10), (4096, 4, 6),
          (512, 8, 30), (512, 16, 20), (512, 32, 12)]


def growth(inner: str = INNER, show: bool = False
           ) -> list[tuple[int, int, float, float, float, float, float]]:
    """(width, depth, inner min ms, every=1 ratio, every=16 ratio, every=1 median ratio,
    every=1 median ratio of thread CPU time);
    ``show`` prints each row as it is measured."""
    rows = []
    if show:
        print(f"\nbench_monitor growth: batch {BATCH}, inner={inner} (ratios of min step "
              "times; last column: of medians)")
        print(f"  {'width':>6} {'depth':>5} {'inner ms':>9} {'every=1':>8} {'every=16':>9} "
              f"{'every=1 median':>14} {'every=1 cpu med':>15}", flush=True)
    for width, depth, rounds in GROWTH:
        r = interleaved(inner, width, depth, BATCH, rounds)
        base = r["inner"][0]
        row = (width, depth, base * 1e3, r["every=1"][0] / base, r["every=16"][0] / base,
               r["every=1"][1] / r["inner"][1], r["every=1/cpu"][1] / r["inner/cpu"][1])
        rows.append(row)
        if show:
            w, d, ms, r1, r16, m1, c1 = row
            print(f"  {w:6d} {d:5d} {ms:9.2f} {r1:8.3f} {r16:9.3f} {m1:14.3f} {c1:15.3f}",
                  flush=True)
    return rows


def test_growth_table() -> None:
    rows = growth(show=True)
    assert all(r[2] > 0 for r in rows)


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
    from graphsurg.passes.fx.dynamo_sites import DynamoSites
    from graphsurg.passes.fx.observe_compiled import GraphRecord, MonitoredCall

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
    # a sampled call: every site's sums in one batched call kept in the graph's buffer (the
    # exact merge runs once per K calls, amortised here), every parameter's gradient norm in
    # one multi-tensor call added to the per-gradient totals (what MonitoredCall does)
    from graphsurg.kernels import multi_grad_sq_norms, partial_sums_many
    from graphsurg.passes.fx.observe_compiled import _MERGE_CALLS

    model = _model()
    x, _ = _batch()
    acts: list[torch.Tensor] = []
    h = x
    for m in model:
        h = m(h)
        if isinstance(m, nn.ReLU) or m is model[-1]:
            acts.append(h.detach())
    grads = [p.detach().clone() for p in model.parameters()]
    rec2 = GraphRecord(0, DynamoSites([], []), [])
    rec2.layers = [str(i) for i in range(len(grads) // 2)]
    rec2.param_layer = torch.arange(len(grads)) // 2
    rec2.param_steps = torch.ones(len(grads) // 2, dtype=torch.int64)

    def sampled() -> None:
        rec2.accumulate(partial_sums_many(acts, [-1] * len(acts), [None] * len(acts)))
        rec2.add_all_grads(multi_grad_sq_norms(grads))

    # the merge of K kept calls, once per K sampled calls
    from graphsurg.kernels import merge_packed, packed_from_sums
    from graphsurg.kernels._multi_stats import merge_packed_many

    sums = partial_sums_many(acts, [-1] * len(acts), [None] * len(acts))
    kept = sums.expand(_MERGE_CALLS, *sums.shape).clone()
    acc = packed_from_sums(sums)
    merge = _min_time(lambda: merge_packed(acc, merge_packed_many(packed_from_sums(kept))), 10)
    extra = _min_time(sampled, 30) + merge / _MERGE_CALLS
    print(f"\nbench_monitor components: inner step min {base * 1e3:.2f} ms; skipped-call "
          f"wrapper {skipped * 1e6:.2f} us; sampled-step extra work {extra * 1e3:.2f} ms")
    print(f"  estimated ratio every=1: x{(base + extra) / base:.3f}   every=16: "
          f"x{(base + extra / 16 + skipped) / base:.4f}")
    assert skipped < 1e-4 and extra > 0


def _loadavg() -> str:
    import os

    return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def quick() -> None:
    """The figures issue 16 asks for, in one run (~5 minutes on 2 quiet cores with a warm
    inductor cache): every=1 / every=16 ratios for inner aot_eager (MLP 4x512) and inductor
    (MLP 2x256 and 4x512), then the growth table (aot_eager, width 512 -> 4096, depth
    4 -> 32). Ratios are of min and median step times, configurations interleaved step by
    step. Run it with ``OMP_NUM_THREADS=1 taskset -c 1`` so other processes' load hits
    every configuration alike."""
    t0 = time.perf_counter()
    print(f"bench_monitor quick: torch {torch.__version__}, {torch.get_num_threads()} "
          f"thread(s), batch {BATCH}, {ROUNDS} interleaved steps; start: {_loadavg()}")
    print(f"  {'inner':>9} {'model':>6} {'time':>4} {'inner min':>10} {'inner med':>10} "
          f"{'every=16 min/med':>17} {'every=1 min/med':>16}")
    for inner, width, depth in (("aot_eager", WIDTH, DEPTH), ("inductor", 256, 2),
                                ("inductor", WIDTH, DEPTH)):
        r = interleaved(inner, width, depth, BATCH, ROUNDS)
        lo, med = r["inner"]
        for clock in ("", "/cpu"):
            lo, med = r["inner" + clock]
            e16, e1 = r["every=16" + clock], r["every=1" + clock]
            print(f"  {inner:>9} {depth}x{width:<4} {clock or 'wall':>4} {lo * 1e3:8.2f}ms "
                  f"{med * 1e3:8.2f}ms {e16[0] / lo:8.3f}/{e16[1] / med:.3f} "
                  f"{e1[0] / lo:8.3f}/{e1[1] / med:.3f}", flush=True)
    test_growth_table()
    print(f"done in {time.perf_counter() - t0:.0f} s; end: {_loadavg()}")


if __name__ == "__main__":
    # python benchmarks/bench_monitor.py [aot_eager|inductor|growth|quick]
    import sys

    what = sys.argv[1] if len(sys.argv) > 1 else "aot_eager"
    if what == "growth":
        test_growth_table()
    elif what == "inductor":
        test_interleaved_ratios_inductor()
    elif what == "quick":
        quick()
    else:
        test_interleaved_ratios()
