"""NeuronStats.all_reduce over 2 gloo processes on CPU equals single-process statistics of the
concatenated data."""

from __future__ import annotations

import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from graphsurg.kernels import neuron_stats
from graphsurg.kernels._stats import _FIELDS


def _data() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 37, 6, 5, generator=g) * 3 + 1e4
    x[1, 3, 2, 1] = float("nan")
    return x


def _worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2
    )
    try:
        x = _data()[rank]  # each rank holds half the batch: (37, 6, 5), channels at dim 1
        s = neuron_stats(x, channel_dim=1, sat_threshold=1e4).all_reduce()
        torch.save({f: getattr(s, f) for f in _FIELDS}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_all_reduce_two_gloo_ranks(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    whole = neuron_stats(_data().reshape(74, 6, 5), channel_dim=1, sat_threshold=1e4)
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    for f in _FIELDS:
        assert torch.equal(r0[f], r1[f]), f"ranks disagree on {f}"
        # float32 statistics merged in a different order: float32 rounding differences only
        torch.testing.assert_close(r0[f], getattr(whole, f), rtol=2e-6, atol=0.0)
    assert int(r0["n_nonfinite"].sum()) == 1 and int(r0["count"].sum()) == 74 * 6 * 5 - 1
