"""Monitor.diagnose under torch.distributed: 2 gloo processes on CPU, each seeing half the
batches, get the same diagnosis, with the statistics of all the batches."""

from __future__ import annotations

import socket
from pathlib import Path

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
