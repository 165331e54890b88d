"""GPU check and timing of the Triton statistics kernels (run: ``python benchmarks/gpu.py``).

On a CUDA machine it
1. checks ``neuron_stats``, ``grad_sq_norms`` and ``row_sq_norms`` (Triton path) against the
   float64 reference on fresh inputs -- rows, (N, T, C) bf16, NCHW, channels-last, x + 1e4,
   NaN/Inf -- and exits 1 on any mismatch;
2. times them against the naive torch statistics and against a device-to-device copy of
   the same tensor, and reports bytes read per second as a fraction of the copy's bandwidth
   (copy bandwidth counts bytes read + bytes written). Target: >= 80% for ``neuron_stats``
   and ``grad_sq_norms``.
3. checks the monitor's batched statistics (``partial_sums`` as the observed graph computes
   them, packed and Chan-merged across sites and batches; ``multi_grad_sq_norms``) against
   float64 (:func:`check_batched`);
4. times a training step compiled with ``backend="graphsurg"`` and a ``gs.Monitor`` at
   every=1 and every=16 against the same model compiled with inductor alone, side by side
   (targets: <= 1.05x at every=1, <= 1.01x at every=16; with inductor the statistics are
   computed inside the compiled graph), then the same ratios as the model grows
   (:data:`GROWTH`; the ratio should stay flat or fall), skipping rows once the time budget
   is spent.
It finishes within 10 minutes (inductor compiles included). Without a CUDA device it says
so and exits 0.

``python benchmarks/gpu.py --cpu-smoke`` runs the same code on the CPU at toy sizes (checks 1
and 3, the training-step and growth tables with inner ``aot_eager``; the Triton timings of 2
need CUDA and are skipped), so a machine without a GPU proves the script runs end to end.
"""

from __future__ import annotations

import sys
import time


def main(smoke: bool = False) -> int:
    """``smoke``: run on the CPU at toy sizes (see the module docstring)."""
    import torch

    if not smoke and not torch.cuda.is_available():
        print("benchmarks/gpu.py: no CUDA device here; nothing checked or measured.")
        return 0

    from graphsurg.kernels import grad_sq_norms, neuron_stats, row_sq_norms

    t_start = time.time()
    dev = torch.device("cpu" if smoke else "cuda")
    torch.manual_seed(0)
    if smoke:
        print(f"device: cpu (--cpu-smoke: toy sizes, no Triton timings), torch "
              f"{torch.__version__}")
    else:
        import triton

        props = torch.cuda.get_device_properties(dev)
        print(f"device: {props.name}, {props.multi_processor_count} SMs, torch "
              f"{torch.__version__}, triton {triton.__version__}")
    # the training-step tables: inner backend, MLP width / depth, batch, steps, width divisor
    inner, width, depth, batch, steps, div = (("aot_eager", 64, 2, 32, 3, 32) if smoke else
                                              ("inductor", 2048, 8, 4096, 50, 1))

    # ---------------------------------------------------------------- 1. correctness
    failures: list[str] = []
    # float32 accumulation vs float64: relative tolerances (as in tests/kernels)
    tol = {"mean": 2e-6, "m2": 2e-5, "abs_sum": 2e-6}

    def check_stats(name: str, x: torch.Tensor, cd: int) -> None:
        s = neuron_stats(x, cd, sat_threshold=1.5)
        ref = neuron_stats(x.detach().cpu().double(), cd, sat_threshold=1.5, backend="torch")
        s = s.to("cpu")
        for f in ("count", "n_nonpos", "n_nonfinite", "n_sat", "absmax"):
            if not torch.equal(getattr(s, f).double(), getattr(ref, f).double()):
                failures.append(f"neuron_stats {name}: {f} differs")
        std = ref.std
        scale = {"mean": ref.mean.abs() + std, "m2": ref.m2, "abs_sum": ref.abs_sum}
        for f in ("mean", "m2", "abs_sum"):
            err = (getattr(s, f).double() - getattr(ref, f)).abs()
            worst = float((err / (tol[f] * scale[f] + 1e-30)).max())
            if worst > 1.0:
                failures.append(f"neuron_stats {name}: {f} error {worst:.3g}x tolerance")
        print(f"  neuron_stats {name:28s} ok" if not any(name in m for m in failures)
              else f"  neuron_stats {name:28s} MISMATCH")

    x = torch.randn(4099, 1023, device=dev)
    check_stats("rows 4099x1023", x, -1)
    check_stats("one row", torch.randn(1, 1023, device=dev), -1)
    check_stats("x + 1e4", x * 0.5 + 1e4, -1)
    xn = x.clone()
    xn.view(-1)[torch.randint(0, xn.numel(), (500,), device=dev)] = float("nan")
    xn[0, :7] = float("inf")
    check_stats("NaN/Inf injected", xn, -1)
    check_stats("strided channels", x[:, ::2], -1)
    check_stats("transposed", torch.randn(300, 2000, device=dev).t(), -1)
    check_stats("(N,T,C) bf16", torch.randn(8, 513, 768, device=dev).bfloat16(), -1)
    check_stats("(N,T,C) fp16", torch.randn(8, 513, 768, device=dev).half(), -1)
    y = torch.randn(16, 64, 28, 28, device=dev)
    check_stats("NCHW", y, 1)
    check_stats("NCHW channels-last", y.contiguous(memory_format=torch.channels_last), 1)
    check_stats("NCHW 7x7 fp64", torch.randn(32, 512, 7, 7, device=dev).double(), 1)

    params = [torch.randn(s, device=dev) for s in [(4096, 1024), (1024,), (64, 3, 7, 7),
                                                    (1000, 2048), (3,), (1,)]]
    params.append(torch.randn(777, 333, device=dev).half())
    got = grad_sq_norms(params).cpu().double()
    want = torch.stack([p.double().pow(2).sum().cpu() for p in params])
    # the CPU path (torch's float32 reductions; no Triton) sums 4M squares in float32:
    # measured 5.7e-5 relative, so the smoke run checks it at 1e-4
    if not torch.allclose(got, want, rtol=1e-4 if smoke else 1e-5, atol=0):
        failures.append(f"grad_sq_norms: max rel err {float(((got - want) / want).abs().max()):.3g}")
    for w in [params[0], params[2], torch.randn(3, 200000, device=dev), params[1]]:
        got = row_sq_norms(w).cpu().double()
        want = w.double().reshape(w.shape[0], -1).pow(2).sum(1).cpu()
        if not torch.allclose(got, want, rtol=1e-5, atol=0):
            failures.append(f"row_sq_norms {tuple(w.shape)} mismatch")
    norm_fail = [m for m in failures if "norms" in m]
    print("  grad_sq_norms / row_sq_norms", "MISMATCH" if norm_fail else "ok")
    batched = check_batched(dev)
    failures += batched
    print("  monitor batched statistics (partial_sums, packed merge, multi_grad_sq_norms)",
          "MISMATCH" if batched else "ok")

    # ---------------------------------------------------------------- 2. timing
    if smoke:
        print("\n(--cpu-smoke: Triton timings skipped)")
    else:
        _timings(t_start)

    print(f"\ntraining step with the graphsurg backend + Monitor (MLP {depth}x{width}, batch "
          f"{batch}, inner={inner}):")
    for name, ms, ratio in monitor_overhead(dev, inner, width=width, depth=depth, batch=batch,
                                            steps=steps):
        print(f"  {name:10s} {ms:8.3f} ms  x{ratio:.3f}")
    print("  targets: every=1 <= 1.05x, every=16 <= 1.01x")
    print(f"\ngrowth (inner={inner}, batch {batch}; median step ratios to {inner} alone):")
    print(f"  {'width':>6} {'depth':>5} {'inner ms':>9} {'every=16':>9} {'every=1':>8}")
    for w, d in GROWTH:
        if time.time() - t_start > BUDGET_S:
            print(f"  {w // div:6d} {d:5d}  skipped: the {BUDGET_S} s budget is spent")
            continue
        rows = monitor_overhead(dev, inner, width=w // div, depth=d, batch=batch,
                                steps=max(2, steps * 2 // 5))
        r = {k: (ms, ratio) for k, ms, ratio in rows}
        print(f"  {w // div:6d} {d:5d} {r['inner'][0]:9.3f} {r['every=16'][1]:9.3f} "
              f"{r['every=1'][1]:8.3f}")
    print(f"finished in {time.time() - t_start:.0f} s")

    if failures:
        print("\nFAILED checks:\n  " + "\n  ".join(failures))
        return 1
    print("all checks passed")
    return 0


def _timings(t_start: float) -> None:
    """Section 2: the Triton kernels against naive torch and a copy (CUDA only)."""
    import torch
    import triton.testing
    from graphsurg.kernels import grad_sq_norms, neuron_stats, row_sq_norms

    dev = torch.device("cuda")
    def bench(fn) -> float:
        return float(triton.testing.do_bench(fn, warmup=25, rep=200))  # ms

    def naive(t: torch.Tensor, dims: tuple[int, ...]) -> object:
        return t.var(dims), t.mean(dims), (t <= 0).float().mean(dims), t.abs().amax(dims)

    print("\ntimings (ms; GB/s = bytes read by the reduction per second; copy GB/s counts "
          "read + write):")
    rows = []
    cases = [
        ("rows 65536x1024 fp32", torch.randn(65536, 1024, device=dev), -1, (0,)),
        ("(N,T,C) 32x2048x1024 bf16",
         torch.randn(32, 2048, 1024, device=dev).bfloat16(), -1, (0, 1)),
        ("NCHW 128x64x56x56 fp32", torch.randn(128, 64, 56, 56, device=dev), 1, (0, 2, 3)),
        ("NCHW channels-last", torch.randn(128, 64, 56, 56, device=dev).contiguous(
            memory_format=torch.channels_last), 1, (0, 2, 3)),
    ]
    for name, t, cd, dims in cases:
        nbytes = t.numel() * t.element_size()
        out = torch.empty_like(t)
        t_copy = bench(lambda t=t, out=out: out.copy_(t))
        t_stats = bench(lambda t=t, cd=cd: neuron_stats(t, cd, sat_threshold=1.0))
        t_naive = bench(lambda t=t, dims=dims: naive(t, dims))
        t_vm = bench(lambda t=t, dims=dims: torch.var_mean(t, dims))
        copy_bw = 2 * nbytes / t_copy / 1e6
        bw = nbytes / t_stats / 1e6
        rows.append((name, t_stats, t_naive, t_vm, t_copy, bw, copy_bw))
        del out

    params = [torch.randn(s, device=dev) for s in
              [(4096, 1024), (1024,), (1024, 4096), (4096,)] * 12 + [(50257, 768)]]
    nbytes = sum(p.numel() * p.element_size() for p in params)
    flat = torch.empty(nbytes // 4, device=dev)
    flat_out = torch.empty_like(flat)
    t_copy = bench(lambda: flat_out.copy_(flat))
    t_g = bench(lambda: grad_sq_norms(params))
    t_gn = bench(lambda: torch.stack([p.pow(2).sum() for p in params]))
    t_fe = bench(lambda: torch.stack(torch._foreach_norm(params)) ** 2)
    rows.append((f"grad_sq_norms {len(params)} tensors", t_g, t_gn, t_fe, t_copy,
                 nbytes / t_g / 1e6, 2 * nbytes / t_copy / 1e6))
    w = torch.randn(4096, 4096, device=dev)
    t_r = bench(lambda: row_sq_norms(w))
    t_rn = bench(lambda: w.pow(2).sum(1))
    out_w = torch.empty_like(w)
    t_copy = bench(lambda: out_w.copy_(w))
    rows.append(("row_sq_norms 4096x4096", t_r, t_rn, float("nan"), t_copy,
                 w.numel() * 4 / t_r / 1e6, 2 * w.numel() * 4 / t_copy / 1e6))

    # block-size sweep for the two main layouts, so one GPU run also says how to tune
    from graphsurg.kernels._neuron_stats_triton import neuron_stats_triton

    print("\nneuron_stats block sweep (ms; default config marked *):")
    sweeps = [
        ("rows 65536x1024 fp32", cases[0][1], 1,
         [(bm, bc, nw) for bm in (16, 32, 64) for bc in (64, 128) for nw in (4, 8)]),
        ("NCHW 128x64x56x56 fp32", cases[2][1], 1,
         [(bm, bc, nw) for bm in (128, 256, 512) for bc in (2, 8) for nw in (4, 8)]),
    ]
    for name, t, cd, configs in sweeps:
        results = []
        for bm, bc, nw in configs:
            ms = bench(lambda t=t, cd=cd, bm=bm, bc=bc, nw=nw: neuron_stats_triton(
                t, cd, 1.0, block_m=bm, block_c=bc, num_warps=nw))
            results.append((ms, bm, bc, nw))
        results.sort()
        best = results[0]
        print(f"  {name}: best block_m={best[1]} block_c={best[2]} num_warps={best[3]} "
              f"{best[0]:.3f} ms ({t.numel() * t.element_size() / best[0] / 1e6:.0f} GB/s); "
              f"default {bench(lambda t=t, cd=cd: neuron_stats(t, cd, sat_threshold=1.0)):.3f} ms*")

    print(f"\n  {'case':34s} {'triton':>8s} {'naive':>8s} {'var_mean*':>9s} {'copy':>8s} "
          f"{'GB/s':>7s} {'copy GB/s':>9s} {'of copy':>7s}")
    for name, tk, tn, tv, tc, bw, cbw in rows:
        print(f"  {name:34s} {tk:8.3f} {tn:8.3f} {tv:9.3f} {tc:8.3f} {bw:7.0f} {cbw:9.0f} "
              f"{bw / cbw:7.0%}")
    print("  (*var_mean column: torch.var_mean for neuron_stats rows, torch._foreach_norm "
          "for grad_sq_norms; naive: the hook-tool set / per-tensor pow(2).sum())")
    print(f"\ntarget: neuron_stats and grad_sq_norms >= 80% of copy bandwidth; "
          f"finished in {time.time() - t_start:.0f} s")


#: (width, depth) of the growth rows, and the time after which rows are skipped
GROWTH = [(1024, 4), (4096, 4), (1024, 16)]
BUDGET_S = 420


def check_batched(device: object) -> list[str]:
    """The monitor's batched statistics against float64: three sites of different widths
    and layouts (rows, NCHW, x + 1e4 with NaN/Inf) reduced with ``partial_sums`` (the ops
    the observed graph runs), packed side by side, merged over two batches with
    ``merge_packed``; and ``multi_grad_sq_norms`` of mixed dtypes. Returns the mismatches."""
    import torch
    from graphsurg.kernels import (
        merge_packed,
        multi_grad_sq_norms,
        neuron_stats,
        packed_from_sums,
        packed_to_stats,
        partial_sums,
    )

    g = torch.Generator(device="cpu").manual_seed(0)
    failures: list[str] = []
    batches = []
    for _ in range(2):
        x3 = torch.randn(300, 96, generator=g) * 0.5 + 1e4
        x3[5, 7] = float("nan")
        x3[9, 1] = float("inf")
        batches.append([(torch.randn(257, 129, generator=g).relu(), -1, None),
                        (torch.randn(6, 24, 5, 5, generator=g), 1, 1.5), (x3, -1, 2.0)])
    acc = None
    for sites in batches:
        sums = torch.cat([partial_sums(x.to(device), cd, thr) for x, cd, thr in sites], dim=1)
        acc = merge_packed(acc, packed_from_sums(sums))
    assert acc is not None
    acc = acc.cpu()
    off = 0
    for k, (_, cd, thr) in enumerate(batches[0]):
        whole = torch.cat([b[k][0] for b in batches], dim=0).double()
        ref = neuron_stats(whole, cd, sat_threshold=thr, backend="torch")
        got = packed_to_stats(acc[:, off: off + ref.channels], torch.float32, thr)
        off += ref.channels
        for f in ("count", "n_nonpos", "n_nonfinite", "n_sat"):
            if not torch.equal(getattr(got, f), getattr(ref, f)):
                failures.append(f"batched stats site {k}: {f} differs")
        if not torch.equal(got.absmax.double(), ref.absmax.float().double()):
            failures.append(f"batched stats site {k}: absmax differs")
        # float32 sums against float64: |mean| + std and m2 relative (as in tests/kernels)
        if float(((got.exact_mean() - ref.mean).abs() / (ref.mean.abs() * 2e-6 + ref.std
                                                           * 1e-5 + 1e-30)).max()) > 1:
            failures.append(f"batched stats site {k}: mean off by more than the tolerance")
        if float(((got.m2.double() - ref.m2).abs() / (ref.m2 * 1e-4 + 1e-30)).max()) > 1:
            failures.append(f"batched stats site {k}: m2 off by more than the tolerance")
    ts = [torch.randn(s, generator=g) for s in [(512, 300), (300,), (7, 3, 3, 3)]]
    ts.append(torch.randn(64, 33, generator=g).half())
    got_sq = multi_grad_sq_norms([t.to(device) for t in ts]).cpu()
    want = torch.stack([t.double().square().sum() for t in ts])
    if not torch.allclose(got_sq, want, rtol=1e-5, atol=0):
        failures.append("multi_grad_sq_norms differs from float64 by more than 1e-5")
    return failures


def monitor_overhead(device: object, inner: str, *, width: int, depth: int, batch: int,
                     steps: int) -> list[tuple[str, float, float]]:
    """Median training-step time (ms) and ratio to the inner backend alone, interleaved:
    inner, graphsurg + Monitor(every=16), graphsurg + Monitor(every=1)."""
    import torch
    from torch import nn

    import graphsurg as gs

    def model() -> nn.Module:
        torch.manual_seed(0)
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Linear(width, width), nn.ReLU()]
        return nn.Sequential(*layers).to(device)

    # each call compiles three new models of one nn.Sequential code object: start from an
    # empty Dynamo cache, or past config.recompile_limit (8) entries torch runs them eagerly
    torch._dynamo.reset()
    x = torch.randn(batch, width, device=device)
    y = torch.randn(batch, width, device=device)
    arms = {
        "inner": torch.compile(model(), backend=inner),
        "every=16": torch.compile(model(), backend="graphsurg",
                                  options={"monitor": gs.Monitor(every=16), "inner": inner}),
        "every=1": torch.compile(model(), backend="graphsurg",
                                 options={"monitor": gs.Monitor(every=1), "inner": inner}),
    }
    opts = {k: torch.optim.SGD(m.parameters(), lr=1e-3) for k, m in arms.items()}
    cuda = str(device).startswith("cuda")

    def step(k: str) -> float:
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        loss = torch.nn.functional.mse_loss(arms[k](x), y)
        loss.backward()
        opts[k].step()
        opts[k].zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - t) * 1e3

    for k in arms:  # compile and warm up
        for _ in range(3):
            step(k)
    times: dict[str, list[float]] = {k: [] for k in arms}
    for _ in range(steps):
        for k in arms:
            times[k].append(step(k))
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    return [(k, med[k], med[k] / med["inner"]) for k in arms]


if __name__ == "__main__":
    sys.exit(main(smoke="--cpu-smoke" in sys.argv[1:]))
