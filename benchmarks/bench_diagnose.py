"""diagnose vs plain training steps vs naive hook-based statistics (issue 3's benchmark).

8-layer ReLU MLP, width 1024, batch 512, 20 batches, on CPU:
  * plain: 20 forward+backward steps;
  * naive hooks: the same with forward hooks computing var, mean, firing rate and absmax per
    layer (what hook-based tools do);
  * diagnose: gs.diagnose over the same 20 batches (capture, instrumentation, gradient norms
    and every detector, SVDs included);
  * diagnose_x2: gs.diagnose over 40 batches -- (diagnose_x2 - diagnose) / 20 is the marginal
    per-batch cost of the instrumented step, compared with a plain step.
Run with `make bench`; the ratios are printed and recorded in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import graphsurg as gs

WIDTH, DEPTH, BATCH, STEPS = 1024, 8, 512, 20
_results: dict[str, float] = {}


def _model() -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(DEPTH):
        layers += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
    return nn.Sequential(*layers)


def _data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(BATCH, WIDTH, generator=g), torch.randn(BATCH, WIDTH, generator=g))
            for _ in range(STEPS)]


def _loss(out: torch.Tensor, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.mse_loss(out, batch[1])


def _plain(model: nn.Module, data: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for b in data:
        model.zero_grad(set_to_none=True)
        _loss(model(b[0]), b).backward()


def _naive_hooks(model: nn.Module, data: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    stats: dict[int, list[torch.Tensor]] = {}

    def hook(mod: nn.Module, inp: object, out: torch.Tensor) -> None:
        x = out.detach()
        stats[id(mod)] = [x.var(0), x.mean(0), (x <= 0).float().mean(0), x.abs().amax(0)]

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.ReLU)]
    try:
        _plain(model, data)
    finally:
        for h in hs:
            h.remove()


def _diagnose_x2(model: nn.Module, data: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    _diagnose(model, data + data)


def _diagnose(model: nn.Module, data: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    d = gs.diagnose(model, data, loss_fn=_loss, config=gs.DiagnoseConfig(max_batches=None))
    assert d.batches == len(data)


@pytest.mark.parametrize("variant", ["plain", "naive_hooks", "diagnose", "diagnose_x2"])
def test_bench_diagnose(benchmark, variant: str) -> None:  # type: ignore[no-untyped-def]
    torch.set_num_threads(2)
    model, data = _model(), _data()
    fn = {"plain": _plain, "naive_hooks": _naive_hooks, "diagnose": _diagnose,
          "diagnose_x2": _diagnose_x2}[variant]
    fn(model, data[:2])  # warm-up (first export, allocator)
    benchmark.pedantic(fn, args=(model, data), rounds=3, iterations=1)
    _results[variant] = benchmark.stats.stats.min
    if len(_results) == 4:
        base = _results["plain"]
        marginal = (_results["diagnose_x2"] - _results["diagnose"]) / base
        print(f"\n[bench_diagnose] plain {base:.3f}s; naive hooks "
              f"{_results['naive_hooks'] / base:.3f}x; diagnose {_results['diagnose'] / base:.3f}x; "
              f"instrumented step (marginal) {marginal:.3f}x a plain step")
