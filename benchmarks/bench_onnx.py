"""graphsurg's ONNX passes at scale (issue 6's benchmark).

Synthetic Gemm+Relu chains (width 8, 2 of 8 units of every layer dead) of 1k, 10k and 50k
nodes; a diagnosis naming the dead units is built directly (analysis is excluded, as the
issue asks). Side by side in one run:

  * ``apply``: ``gso.apply(model_proto, diagnosis)`` -> ModelProto with every exact
    replacement (excision of 25% of the units at every layer, site by site), cleanup, shape
    inference and the final ``onnx.checker.check_model(full_check=True)`` (no verification
    data: the diagnosis is given). Every site of the chain is plain: apply edits the
    protobuf (``graphsurg.passes.onnx.plain``);
  * ``general``: the same apply with the plain lane off (the onnx-ir path of every model
    that is not plain), for comparison;
  * ``ir round trip`` and ``ort optimize``: one onnx-ir load+save of the model file, and
    onnxruntime's offline optimisation of it (issue 15's targets: apply <= 1.5x the first,
    <= 1x the second);
  * ``load+save``: ``onnx.load`` + ``onnx.save`` of the same model (the I/O floor);
  * ``onnxscript``: ``onnxscript.optimizer.optimize`` on it, for reference -- at 1k nodes
    only by default (it grows quadratically; ``GS_BENCH_ONNXSCRIPT_10K=1`` adds 10k).

Targets: apply(50k) / apply(10k) <= 6 (linear growth), apply <= 1.5x the ir round trip and
<= onnxruntime's offline optimisation (issue 15); apply(50k) <= 2 x load+save(50k) (issue 6).
Also: onnxruntime inference of a 50%-dead MLP (512 -> 1024 -> 1024 -> 10, batch 256) before
and after excision.

Run: ``make bench`` (pytest-benchmark) or ``python benchmarks/bench_onnx.py`` for the table.
The table's clock is CPU seconds of this process (``time.process_time``: onnxruntime's threads
included), steadier than wall time on a shared machine; ``GS_BENCH_CLOCK=wall`` for wall time.
Pin it (``taskset -c 0``) and note the load average printed with it.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphsurg import Diagnosis, Problem, Site, SurgeryResult
from graphsurg import onnx as gso

WIDTH = 8
DEAD = (1, 5)  # per layer
#: the table's clock: CPU seconds (default) or wall seconds (GS_BENCH_CLOCK=wall)
CLOCK = time.perf_counter if os.environ.get("GS_BENCH_CLOCK") == "wall" else time.process_time


def chain(n_nodes: int, seed: int = 0) -> tuple[onnx.ModelProto, Diagnosis]:
    """A Gemm+Relu chain of ``n_nodes`` nodes whose units ``DEAD`` are dead in every layer,
    and the diagnosis that says so."""
    rng = np.random.default_rng(seed)
    layers = n_nodes // 2
    nodes, inits, problems = [], [], []
    x = "x"
    for i in range(layers):
        w = (rng.standard_normal((WIDTH, WIDTH)) * 0.5).astype(np.float32)
        b = (rng.standard_normal(WIDTH) * 0.1 + 0.5).astype(np.float32)
        w[list(DEAD)] = 0.0
        b[list(DEAD)] = -1e3
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes.append(helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], [f"g{i}"], name=f"gemm{i}",
                                      transB=1))  # fmt: skip
        out = f"r{i}" if i < layers - 1 else "y"
        nodes.append(helper.make_node("Relu", [f"g{i}"], [out], name=f"relu{i}"))
        if i < layers - 1:
            problems.append(
                Problem("DeadNeurons", Site(f"gemm{i}", out, "relu", "onnx"), 0.25, DEAD,
                        evidence={"width": WIDTH, "constant": list(DEAD),
                                  "constant_values": [0.0, 0.0], "channel_dim": -1})  # fmt: skip
            )
        x = out
    g = helper.make_graph(
        nodes, "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", WIDTH])],
        inits,
    )  # fmt: skip
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model, Diagnosis(problems=problems, capture="onnxruntime", batches=1)


def excised_sites(result: SurgeryResult) -> int:
    """Sites whose dead units were removed and kept."""
    return len(result.kept_at("excise_dead"))


def time_apply(proto: onnx.ModelProto, diag: Diagnosis, *, general: bool = False
               ) -> tuple[float, int]:
    """``gso.apply`` of the diagnosis; ``general``: with the plain lane turned off (the
    onnx-ir path every model that is not plain takes)."""
    import graphsurg.onnx as G

    plain = G._apply_plain
    if general:
        G._apply_plain = lambda *a, **k: None  # type: ignore[assignment]
    try:
        t = CLOCK()
        out, result = gso.apply(proto, diag)
        dt = CLOCK() - t
    finally:
        G._apply_plain = plain  # type: ignore[assignment]
    return dt, excised_sites(result)


def time_load_save(path: Path) -> float:
    t = CLOCK()
    m = onnx.load(str(path))
    onnx.save(m, str(path.with_suffix(".copy.onnx")))
    return CLOCK() - t


def time_ir_round_trip(path: Path) -> float:
    """One onnx-ir deserialize + serialize of the model file (the issue's floor)."""
    t = CLOCK()
    m = ir.load(str(path))
    ir.save(m, str(path.with_suffix(".ir.onnx")))
    return CLOCK() - t


def time_ort_optimize(path: Path) -> float:
    """onnxruntime's own offline graph optimisation of the model (a session with
    ``optimized_model_filepath``, default level)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.optimized_model_filepath = str(path.with_suffix(".ort.onnx"))
    t = CLOCK()
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return CLOCK() - t


def time_onnxscript(proto: onnx.ModelProto) -> float:
    import onnxscript.optimizer

    m = ir.serde.deserialize_model(proto)
    t = time.perf_counter()
    onnxscript.optimizer.optimize(m)
    return time.perf_counter() - t


def ort_speedup(seed: int = 0) -> tuple[float, float, float]:
    """(original ms, excised ms, speed-up) of a 50%-dead MLP under onnxruntime."""
    import onnxruntime as ort

    rng = np.random.default_rng(seed)
    dims = [512, 1024, 1024, 10]
    nodes, inits, x = [], [], "x"
    for i in range(3):
        w = (rng.standard_normal((dims[i + 1], dims[i])) / np.sqrt(dims[i])).astype(np.float32)
        b = (rng.standard_normal(dims[i + 1]) * 0.1).astype(np.float32)
        if i < 2:
            w[::2] = 0.0
            b[::2] = -1e3
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes.append(helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], [f"g{i}"], transB=1, name=f"gemm{i}"))
        x = f"g{i}"
        if i < 2:
            nodes.append(helper.make_node("Relu", [x], [f"r{i}"], name=f"relu{i}"))
            x = f"r{i}"
    g = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 512])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["n", 10])], inits,
    )  # fmt: skip
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    calib = [{"x": rng.standard_normal((256, 512)).astype(np.float32)} for _ in range(8)]
    small, result = gso.apply(proto, calib)
    assert result.ok and excised_sites(result) == 2, result.summary()

    def bench(m: onnx.ModelProto) -> float:
        so = ort.SessionOptions()
        so.intra_op_num_threads = 2
        s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        feed = calib[0]
        for _ in range(5):
            s.run(None, feed)
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(20):
                s.run(None, feed)
            best = min(best, (time.perf_counter() - t) / 20)
        return best * 1e3

    a, b = bench(proto), bench(small)
    return a, b, a / b


# -- pytest-benchmark (make bench) -----------------------------------------------------------
@pytest.mark.parametrize("n_nodes", [1_000, 10_000, 50_000])
def test_apply_chain(benchmark, n_nodes: int) -> None:  # type: ignore[no-untyped-def]
    proto, diag = chain(n_nodes)

    out, result = benchmark.pedantic(lambda: gso.apply(proto, diag), rounds=1)
    assert excised_sites(result) == n_nodes // 2 - 1


@pytest.mark.parametrize("n_nodes", [1_000, 10_000])
def test_apply_chain_general(benchmark, n_nodes: int) -> None:  # type: ignore[no-untyped-def]
    """The same apply with the plain lane off: the onnx-ir path (the baseline of the run)."""
    proto, diag = chain(n_nodes)
    _, rewrites = benchmark.pedantic(lambda: time_apply(proto, diag, general=True), rounds=1)
    assert rewrites == n_nodes // 2 - 1


@pytest.mark.parametrize("n_nodes", [1_000, 10_000, 50_000])
def test_load_save_chain(benchmark, tmp_path, n_nodes: int) -> None:  # type: ignore[no-untyped-def]
    proto, _ = chain(n_nodes)
    path = tmp_path / "m.onnx"
    onnx.save(proto, str(path))
    benchmark.pedantic(lambda: time_load_save(path), rounds=3)


def test_onnxscript_optimize_1k(benchmark) -> None:  # type: ignore[no-untyped-def]
    proto, _ = chain(1_000)
    benchmark.pedantic(lambda: time_onnxscript(proto), rounds=1)


def main() -> None:
    sizes = [int(x) for x in os.environ.get("GS_BENCH_SIZES", "1000,10000,50000").split(",")]
    rows = []
    applied: dict[int, float] = {}
    floor: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as d:
        for n in sizes:
            proto, diag = chain(n)
            path = Path(d) / f"chain{n}.onnx"
            onnx.save(proto, str(path))
            reps = 3 if n < 50_000 else 2  # the least of a few runs: a shared machine
            ls = min(time_load_save(path) for _ in range(3))
            rt = min(time_ir_round_trip(path) for _ in range(reps))
            oo = min(time_ort_optimize(path) for _ in range(reps))
            ap, rewrites = min(time_apply(proto, diag) for _ in range(reps))
            gen, gen_rw = min(time_apply(proto, diag, general=True) for _ in range(reps))
            assert gen_rw == rewrites
            want_os = n == 1_000 or (n == 10_000 and os.environ.get("GS_BENCH_ONNXSCRIPT_10K"))
            osc = time_onnxscript(proto) if want_os else float("nan")
            applied[n], floor[n] = ap, ls
            rows.append((n, ls, rt, oo, ap, gen, osc, rewrites))
    clock = "wall" if CLOCK is time.perf_counter else "CPU"
    print(f"{clock} seconds, load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"{'nodes':>7} {'load+save s':>12} {'ir round trip s':>16} {'ort optimize s':>15} "
          f"{'apply s':>9} {'apply/round trip':>17} {'apply/ort':>10} {'general s':>10} "
          f"{'general/round trip':>19} {'onnxscript s':>13} {'excised sites':>14}")
    for n, ls, rt, oo, ap, gen, osc, rw in rows:
        print(f"{n:>7} {ls:>12.3f} {rt:>16.3f} {oo:>15.3f} {ap:>9.3f} {ap / rt:>17.2f} "
              f"{ap / oo:>10.2f} {gen:>10.3f} {gen / rt:>19.2f} {osc:>13.3f} {rw:>14}")
    if 50_000 in applied and 10_000 in applied:
        print(f"growth apply(50k)/apply(10k) = {applied[50_000] / applied[10_000]:.2f} "
              "(target <= 6)")
        print(f"apply(50k)/load+save(50k) = {applied[50_000] / floor[50_000]:.2f}")
    a, b, s = ort_speedup()
    print(f"onnxruntime, 50%-dead MLP 512-1024-1024-10, batch 256: {a:.2f} ms -> {b:.2f} ms ({s:.2f}x)")


if __name__ == "__main__":
    main()
