"""graphsurg on a real-size ONNX model: wall time and peak memory (issue 15).

A BERT exported from a ``transformers.BertConfig`` (random weights, nothing downloaded;
``torch.onnx.export(dynamo=False)``, opset 17, one self-contained file), calibrated on 4
batches of token ids (``--batch-size`` rows of ``--seq`` tokens each). Every measurement
runs in its own process, one at a time, and reports that process's wall time and peak
resident memory (``ru_maxrss`` from ``os.wait4``: onnxruntime allocates outside Python, so
tracemalloc would not see it):

  * ``imports``: ``import graphsurg.onnx`` alone (Python, numpy, torch, onnx, onnxruntime),
    the floor under every graphsurg row;
  * ``ort``: onnxruntime alone -- an ``InferenceSession`` on the file (default options) and
    the same 4 batches;
  * ``ort_optimize``: onnxruntime's offline optimisation of the model
    (``SessionOptions.optimized_model_filepath``);
  * ``analyze``: ``graphsurg onnx analyze model.onnx --data calib.npz``;
  * ``apply``: ``graphsurg onnx apply model.onnx --data calib.npz -o out.onnx`` (a random
    BERT has nothing to rewrite: load, diagnose, plan, cleanup, verify and save).

Targets: ``apply`` within 2x of ``ort`` in time; peak memory within the model's size +
onnxruntime's session + one batch of observed activations.

Run (one size at a time; the models are cached under ``$GS_BENCH_CACHE`` or the temp dir)::

    python benchmarks/bench_onnx_size.py                 # BERT-base (~435 MB)
    python benchmarks/bench_onnx_size.py --growth        # 100 MB -> 1 GB growth table
    pytest benchmarks/bench_onnx_size.py --benchmark-enable -s   # pytest-benchmark, base only
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

#: name -> (hidden, layers, heads, intermediate): BERT configs of growing size
CONFIGS: dict[str, tuple[int, int, int, int]] = {
    "bert-100m": (384, 6, 6, 1536),
    "bert-200m": (512, 12, 8, 2048),
    "bert-base": (768, 12, 12, 3072),  # BertConfig() defaults: ~435 MB
    "bert-1g": (1024, 18, 16, 4096),
}
BATCHES = 4
PY = sys.executable
GRAPHSURG = [PY, "-m", "graphsurg"]


def cache_dir() -> Path:
    d = Path(os.environ.get("GS_BENCH_CACHE", Path(tempfile.gettempdir()) / "gs_bench_onnx_size"))
    d.mkdir(parents=True, exist_ok=True)
    return d


_EXPORT = """
import sys, torch, transformers
hidden, layers, heads, inter = map(int, sys.argv[2:6])
cfg = transformers.BertConfig(hidden_size=hidden, num_hidden_layers=layers,
                              num_attention_heads=heads, intermediate_size=inter)
torch.manual_seed(0)
bert = transformers.BertModel(cfg).eval()


class Wrapped(torch.nn.Module):  # keyword arguments: BertModel.forward's order changes
    def __init__(self):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask, token_type_ids):
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                        token_type_ids=token_type_ids, return_dict=False)
        return out[0], out[1]


model = Wrapped().eval()
ids = torch.ones(2, 16, dtype=torch.int64)
with torch.no_grad():
    torch.onnx.export(model, (ids, torch.ones_like(ids), torch.zeros_like(ids)), sys.argv[1],
                      input_names=["input_ids", "attention_mask", "token_type_ids"],
                      output_names=["last_hidden_state", "pooler_output"],
                      dynamic_axes={n: {0: "batch", 1: "seq"} for n in
                                    ["input_ids", "attention_mask", "token_type_ids"]},
                      opset_version=17, dynamo=False)
"""


def build(name: str, *, batch_size: int = 8, seq: int = 128) -> tuple[Path, Path]:
    """The exported model and its calibration ``.npz`` (``BATCHES * batch_size`` rows)."""
    d = cache_dir()
    model = d / f"{name}.onnx"
    if not model.exists():
        tmp = d / f"{name}.tmp.onnx"
        subprocess.run([PY, "-c", _EXPORT, str(tmp), *map(str, CONFIGS[name])], check=True)
        tmp.rename(model)
    data = d / f"calib_{batch_size}x{seq}.npz"
    if not data.exists():
        rng = np.random.default_rng(0)
        n = BATCHES * batch_size
        np.savez(data, input_ids=rng.integers(1000, 20000, (n, seq)).astype(np.int64),
                 attention_mask=np.ones((n, seq), np.int64),
                 token_type_ids=np.zeros((n, seq), np.int64))
    return model, data


_ORT = """
import sys, numpy as np, onnxruntime as ort
so = ort.SessionOptions()
so.log_severity_level = 3
z = np.load(sys.argv[2]); bs = int(sys.argv[3]); n = len(z["input_ids"])
if sys.argv[4] == "optimize":
    so.optimized_model_filepath = sys.argv[5]
    ort.InferenceSession(sys.argv[1], so, providers=["CPUExecutionProvider"])
else:
    s = ort.InferenceSession(sys.argv[1], so, providers=["CPUExecutionProvider"])
    for i in range(0, n, bs):
        s.run(None, {k: z[k][i:i + bs] for k in z.files})
"""


@dataclass
class Run:
    what: str
    seconds: float
    peak_mb: float
    rc: int
    cpu_s: float = 0.0  # user + system CPU seconds: steadier than wall time on a shared machine
    load: float = 0.0  # 1-minute load average when it started (``uptime``)


def measure(what: str, cmd: list[str]) -> Run:
    """Run ``cmd`` alone; its wall time and peak RSS (``ru_maxrss``, KiB on Linux)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    load = os.getloadavg()[0]
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    assert p.stderr is not None
    err = p.stderr.read()
    _, status, usage = os.wait4(p.pid, 0)
    dt = time.perf_counter() - t
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode not in (0, 1):  # 1: surgery could not meet the certificates (not an error)
        sys.stderr.write(err.decode(errors="replace")[-2000:])
    return Run(what, dt, usage.ru_maxrss / 1024, p.returncode,
               usage.ru_utime + usage.ru_stime, load)


def measure_all(name: str, *, batch_size: int = 8, seq: int = 128,
                which: tuple[str, ...] = ("imports", "ort", "ort_optimize", "analyze", "apply")
                ) -> list[Run]:
    model, data = build(name, batch_size=batch_size, seq=seq)
    out = cache_dir() / f"{name}.out.onnx"
    bs = str(batch_size)
    cmds = {
        "imports": [PY, "-c", "import graphsurg.onnx, onnxruntime"],
        "ort": [PY, "-c", _ORT, str(model), str(data), bs, "run"],
        "ort_optimize": [PY, "-c", _ORT, str(model), str(data), bs, "optimize",
                         str(cache_dir() / f"{name}.ortopt.onnx")],
        "analyze": [*GRAPHSURG, "onnx", "analyze", str(model), "--data", str(data),
                    "--batch-size", bs],
        "apply": [*GRAPHSURG, "onnx", "apply", str(model), "--data", str(data),
                  "--batch-size", bs, "-o", str(out)],
    }
    runs = [measure(w, cmds[w]) for w in which]
    for f in (out, out.with_name(out.name + ".data")):
        f.unlink(missing_ok=True)
    return runs


def table(name: str, runs: list[Run]) -> str:
    model, _ = build(name)
    size = model.stat().st_size / 2**20
    by = {r.what: r for r in runs}
    ort = by.get("ort")
    lines = [f"{name}: {size:.0f} MiB on disk"]
    for r in runs:
        ratio = (f"{r.seconds / ort.seconds:5.2f}x ort wall, {r.cpu_s / ort.cpu_s:5.2f}x ort cpu"
                 if ort else "")
        lines.append(f"  {r.what:>13}  {r.seconds:7.2f} s  {r.cpu_s:7.2f} s cpu  "
                     f"{r.peak_mb:7.0f} MiB peak  {ratio}  (load {r.load:.1f})"
                     + (f"  (exit {r.rc})" if r.rc else ""))
    return "\n".join(lines)


# -- pytest-benchmark (make bench) -----------------------------------------------------------
@pytest.mark.parametrize("what", ["ort", "analyze", "apply"])
def test_bert_base(benchmark, what: str) -> None:  # type: ignore[no-untyped-def]
    build("bert-base")
    runs: list[Run] = []
    benchmark.pedantic(lambda: runs.append(measure_all("bert-base", which=(what,))[0]),
                       rounds=1)
    benchmark.extra_info["peak_mb"] = runs[-1].peak_mb
    assert runs[-1].rc in (0, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--growth", action="store_true", help="every size of CONFIGS, in turn")
    ap.add_argument("--size", default="bert-base", choices=sorted(CONFIGS))
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--only", default="imports,ort,ort_optimize,analyze,apply")
    a = ap.parse_args()
    which = tuple(a.only.split(","))
    for name in (CONFIGS if a.growth else [a.size]):
        runs = measure_all(name, batch_size=a.batch_size, seq=a.seq, which=which)
        print(table(name, runs), flush=True)


if __name__ == "__main__":
    main()
