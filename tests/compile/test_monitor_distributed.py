"""Monitor.diagnose under torch.distributed: 2 gloo processes on CPU, each seeing half the
batches, get the same diagnosis, with the statistics of all the batches."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import graphsurg as gs
from graphsurg._zoo import dead_mlp


def _worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    try:
        torch.set_num_threads(1)
        case = dead_mlp(0, n_batches=4, batch_size=32)
        mon = gs.Monitor(every=1)
        c = torch.compile(case.model, backend="graphsurg",
                          options={"monitor": mon, "inner": "eager"})
        for b in case.batches[rank::2]:
            case.loss_fn(c(b[0]), b).backward()
        d = mon.diagnose()
        torch.save({"problems": [(p.kind, p.site.module, p.units) for p in d.problems],
                    "means": {a: s.mean for a, s in mon.stats().items()},
                    "merged_mean": {k: r.mean for k, r in d.layers.items() if r.mean},
                    "grad": {k: r.grad_norm for k, r in d.layers.items()
                             if r.grad_norm is not None},
                    "notes": d.notes}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_gloo_ranks_same_diagnosis(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert r0["problems"] == r1["problems"] and r0["problems"]
    assert r0["merged_mean"] == r1["merged_mean"] and r0["grad"] == r1["grad"]
    assert any("merged across 2 ranks" in n for n in r0["notes"])
    # local statistics differ (different halves); merged ones are those of all batches
    assert any(not torch.equal(r0["means"][a], r1["means"][a]) for a in r0["means"])
    case = dead_mlp(0, n_batches=4, batch_size=32)
    ref = gs.diagnose(case.model, case.batches, loss_fn=case.loss_fn)
    assert r0["problems"] == [(p.kind, p.site.module, p.units) for p in ref.problems]
    ref_means = {k.split(":")[0]: v.mean for k, v in ref.layers.items() if v.mean}
    for k, mean in r0["merged_mean"].items():
        # float32 statistics merged in another order: float32 rounding only
        torch.testing.assert_close(torch.tensor(mean), torch.tensor(ref_means[k.split(":")[0]]),
                                   atol=1e-6, rtol=1e-5)
    for k, g in r0["grad"].items():
        assert abs(g - ref.layers[k].grad_norm) <= 1e-5 * ref.layers[k].grad_norm


# -- DDP and FSDP2: every rank monitored, statistics equal to one process over the same data --

STEPS, GLOBAL_ROWS = 4, 16


def _wrapped_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16),
                               torch.nn.Sigmoid(), torch.nn.Linear(16, 2))


def _global_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(GLOBAL_ROWS, 8, generator=g), torch.randn(GLOBAL_ROWS, 2, generator=g))
            for _ in range(STEPS)]


def _summary(d: gs.Diagnosis) -> dict[str, tuple[list[float], list[float], list[float],
                                                   float | None, int]]:
    # keyed by producer module and op: eager hooks and Dynamo graphs name nodes differently
    return {f"{r.site.module}:{r.site.op}:{r.kind}": (r.mean, r.var, r.saturated_fraction,
                                                     r.grad_norm, r.count)
            for r in d.layers.values()}


def _train(step_model: object, params: list[torch.Tensor], batches: list) -> None:
    opt = torch.optim.SGD(params, lr=0.1)
    for x, y in batches:
        torch.nn.functional.mse_loss(step_model(x), y).backward()  # type: ignore[operator]
        opt.step()
        opt.zero_grad(set_to_none=True)


def _wrapped_worker(rank: int, port: int, out_dir: str) -> None:
    import warnings

    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    try:
        torch.set_num_threads(1)
        half = GLOBAL_ROWS // 2
        local = [(x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half])
                 for x, y in _global_batches()]
        out = {}
        for kind in ("ddp", "fsdp2"):
            model = _wrapped_model()
            if kind == "ddp":
                wrapped: torch.nn.Module = DistributedDataParallel(model)
            else:
                for m in (model[0], model[2], model[4]):
                    fully_shard(m)
                wrapped = fully_shard(model)
            mon = gs.Monitor(every=1)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                step = mon.compile(wrapped, inner="aot_eager")
                _train(step, list(wrapped.parameters()), local)
            d = mon.diagnose()
            out[kind] = {"layers": _summary(d), "notes": d.notes, "sampled": mon.sampled,
                         "warnings": [str(w.message) for w in caught
                                      if "captured no graph" in str(w.message)]}
        torch.save(out, Path(out_dir) / f"wrapped{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_and_fsdp2_monitored_on_every_rank_equal_one_process(tmp_path: Path) -> None:
    mp.spawn(_wrapped_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "wrapped0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "wrapped1.pt", weights_only=False)
    # one process, the whole global batch per step; the wrapped runs' first call found out
    # that torch compiled no graph and was not measured: the reference forgets step 0 too
    model = _wrapped_model()
    mon = gs.Monitor(every=1)
    step = mon.compile(model, inner="aot_eager")
    batches = _global_batches()
    _train(step, list(model.parameters()), batches[:1])
    mon.reset()
    _train(step, list(model.parameters()), batches[1:])
    ref = _summary(mon.diagnose())
    for kind in ("ddp", "fsdp2"):
        a, b = r0[kind], r1[kind]
        assert a["layers"] == b["layers"], kind  # every rank gets the same merged statistics
        # torch compiled no graph: monitored eagerly, said once, not silently
        assert len(a["warnings"]) == 1 and any("captured no graph" in n for n in a["notes"])
        assert any("merged across 2 ranks" in n for n in a["notes"])
        assert a["sampled"] == STEPS - 1
        assert set(a["layers"]) == set(ref), kind
        for k, (mean, var, sat, grad, count) in a["layers"].items():
            rm, rv, rs, rg, rc = ref[k]
            assert count == rc, (kind, k)
            # float32 training steps and merges in another order: float32 rounding (the
            # weights went through 3 SGD steps on each side)
            torch.testing.assert_close(torch.tensor(mean), torch.tensor(rm), atol=1e-5,
                                       rtol=1e-4)
            torch.testing.assert_close(torch.tensor(var), torch.tensor(rv), atol=1e-6,
                                       rtol=1e-4)
            assert sat == rs, (kind, k)
            if rg is None:
                assert grad is None
            else:  # DDP: the reduced (averaged) gradient; FSDP2: shards' squares summed
                assert grad == pytest.approx(rg, rel=1e-4), (kind, k)
