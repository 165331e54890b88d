"""An independent float64 reference for the kernel tests (plain, slow, obviously right)."""

from __future__ import annotations

import torch


def reference_stats(x: torch.Tensor, channel_dim: int, sat_threshold: float | None) -> dict:
    """Per-channel statistics of ``x`` computed in float64, as a dict of (C,) tensors."""
    c = x.shape[channel_dim]
    v = x.detach().movedim(channel_dim, -1).reshape(-1, c).to(torch.float64)
    fin = torch.isfinite(v)
    z = torch.where(fin, v, torch.zeros((), dtype=torch.float64))
    count = fin.sum(0)
    mean = z.sum(0) / count.clamp_min(1)
    dev = torch.where(fin, v - mean, torch.zeros((), dtype=torch.float64))
    a = z.abs()
    thr = float("inf") if sat_threshold is None else sat_threshold
    return {
        "count": count,
        "mean": mean,
        "m2": (dev * dev).sum(0),
        "abs_sum": a.sum(0),
        "n_nonpos": (fin & (v <= 0)).sum(0),
        "absmax": a.amax(0),
        "n_nonfinite": (~fin).sum(0),
        "n_sat": (fin & (a >= thr)).sum(0),
    }


# Tolerances against the float64 reference, by input dtype. fp16/bf16 inputs convert to
# float32 exactly and accumulate in float32, so they share float32's tolerances (the reference
# reads the same converted values). Counts and absmax must be exact in every dtype.
#   mean: |err| <= tol * (|mean| + std)   -- float32 rounding of a shifted sum
#   m2, abs_sum: |err| <= tol * value     -- relative
TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float64: {"mean": 1e-11, "m2": 1e-10, "abs_sum": 1e-11},
    torch.float32: {"mean": 2e-6, "m2": 2e-5, "abs_sum": 2e-6},
    torch.float16: {"mean": 2e-6, "m2": 2e-5, "abs_sum": 2e-6},
    torch.bfloat16: {"mean": 2e-6, "m2": 2e-5, "abs_sum": 2e-6},
}
EXACT = ("count", "n_nonpos", "n_nonfinite", "n_sat", "absmax")


def assert_matches(stats: object, ref: dict, dtype: torch.dtype) -> None:
    tol = TOLERANCES[dtype]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for f in ("mean", "m2", "abs_sum", "absmax"):
        assert getattr(stats, f).dtype == acc, f"{f} has dtype {getattr(stats, f).dtype}"
    for f in EXACT:
        got = getattr(stats, f).to(torch.float64)
        assert torch.equal(got, ref[f].to(torch.float64)), f"{f}: {got} != {ref[f]}"
    std = (ref["m2"] / ref["count"].clamp_min(1)).sqrt()
    scale = {
        "mean": ref["mean"].abs() + std,
        "m2": ref["m2"],
        "abs_sum": ref["abs_sum"],
    }
    for f in ("mean", "m2", "abs_sum"):
        err = (getattr(stats, f).to(torch.float64) - ref[f]).abs()
        bound = tol[f] * scale[f] + 1e-30
        worst = float((err / bound).max())
        assert worst <= 1.0, f"{f}: error {worst:.3g}x the tolerance {tol[f]} ({dtype})"
