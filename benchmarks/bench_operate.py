"""gs.operate on the 8x1024 ReLU MLP of bench_diagnose (issue 13's cost check).

The MLP of :mod:`benchmarks.bench_diagnose` (8 Linear(1024, 1024) + ReLU, batch 512, 20
batches), with 25% dead units planted in layers 0 and 4 (bias -50), operated with the
default certificates (`heal_steps` as given, default 100). Prints the wall time of each run,
the median, and the extra diagnosis rounds the result reports. Run:

    OMP_NUM_THREADS=2 python -m benchmarks.bench_operate [--repeats 3] [--heal-steps 100]

A benchmark measures; the 2x bound of issue 13 is read from its output, not asserted.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import graphsurg as gs
from benchmarks.bench_diagnose import DEPTH, WIDTH, _data, _loss, _model


def broken_model() -> torch.nn.Module:
    model = _model()
    with torch.no_grad():
        for layer in (0, 2 * (DEPTH // 2)):
            model[layer].bias[::4] = -50.0
    return model


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--heal-steps", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", type=int, default=20, help="batches of 512 (default 20)")
    ap.add_argument("--no-guarantee", action="store_true",
                    help="Certificates(require_strict_subset=False): the cost without the "
                         "global certificate and closed loop (issue 13's baseline)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, data = broken_model(), _data()[:args.batches]
    cert = gs.Certificates(require_strict_subset=not args.no_guarantee)
    times = []
    res = None
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        res = gs.operate(model, data, loss_fn=_loss, heal_steps=args.heal_steps,
                         config=gs.DiagnoseConfig(max_batches=None), certificates=cert)
        times.append(time.perf_counter() - t0)
    assert res is not None
    print(f"gs.operate, {DEPTH}x{WIDTH} ReLU MLP, {len(data)} batches: "
          + ", ".join(f"{t:.2f}s" for t in times) + f"; median {statistics.median(times):.2f}s")
    print(f"kept {len(res.kept)}/{len(res.verification)}; "
          f"follow-up rounds: {len(res.rounds)}; extra diagnosis runs: {res.diagnoses}; "
          f"strict subset: {res.strict_subset}")


if __name__ == "__main__":
    main()
