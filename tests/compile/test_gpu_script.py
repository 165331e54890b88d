"""benchmarks/gpu.py's monitor timing runs end to end (on CPU, tiny, inner aot_eager), and
the script exits 0 with a message where there is no GPU."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import torch

GPU = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu.py"


def _load():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("gs_gpu_script", GPU)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_monitor_overhead_rows() -> None:
    mod = _load()
    rows = mod.monitor_overhead("cpu", "aot_eager", width=16, depth=2, batch=8, steps=3)
    assert [r[0] for r in rows] == ["inner", "every=16", "every=1"]
    assert rows[0][2] == 1.0 and all(r[1] > 0 for r in rows)


def test_batched_statistics_check_passes_on_cpu_and_catches_a_bad_merge(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    mod = _load()
    assert mod.check_batched("cpu") == []
    import graphsurg.kernels as k

    real = k.merge_packed

    def sloppy(a, b):  # type: ignore[no-untyped-def]
        out = real(a, b)
        if a is not None:
            out[2] = a[2] + b[2]  # drops Chan's between-batch term of M2
        return out

    monkeypatch.setattr(k, "merge_packed", sloppy)
    assert any("m2" in f for f in mod.check_batched("cpu"))


def test_script_without_gpu_exits_zero() -> None:
    if torch.cuda.is_available():
        return
    p = subprocess.run([sys.executable, str(GPU)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "no CUDA device" in p.stdout
