"""gs.Monitor through the graphsurg torch.compile backend (inner eager / aot_eager on CPU)."""

from __future__ import annotations

import pytest
import torch
from _compile_models import BreakMLP, batches, mlp, mse
from torch._dynamo.utils import counters

import graphsurg as gs
from graphsurg._zoo import dead_mlp

# Dynamo itself reads ``.grad`` of the non-leaf tensor a frame resumes with after a graph
# break (torch._dynamo.utils.safe_has_grad); torch's UserWarning about it is torch's own, also
# under backend="aot_eager" alone, so the graph-break tests let it pass
DYNAMO_RESUME_WARNING = pytest.mark.filterwarnings(
    "ignore:The .grad attribute of a Tensor that is not a leaf Tensor:UserWarning")

# Compiled and eager graphs run the same float32 kernels on CPU (eager / aot_eager lower
# to the same aten calls), so outputs agree to a few float32 ulps.
ATOL, RTOL = 1e-6, 1e-5


def _train(cmodel: torch.nn.Module, data: list, model: torch.nn.Module) -> None:
    """Forward + backward on every batch, no optimizer step (weights stay fixed)."""
    for x, y in data:
        out = cmodel(x)
        mse(out, (x, y)).backward()
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("inner", ["eager", "aot_eager"])
def test_compiled_equals_eager_and_no_recompile(inner: str) -> None:
    model = mlp()
    mon = gs.Monitor(every=2)
    c = torch.compile(model, backend="graphsurg", options={"monitor": mon, "inner": inner})
    for x, _ in batches(5):
        torch.testing.assert_close(c(x), model(x), atol=ATOL, rtol=RTOL)
    assert counters["stats"]["unique_graphs"] == 1  # one graph, compiled once
    assert mon.calls == 5 and mon.sampled == 3  # calls 1, 3, 5 measured
    assert len(mon.graphs) == 1


def test_backward_gradients_unchanged() -> None:
    model = mlp()
    data = batches(2)
    mon = gs.Monitor(every=1)
    c = torch.compile(model, backend="graphsurg", options={"monitor": mon, "inner": "aot_eager"})
    x, y = data[0]
    mse(c(x), (x, y)).backward()
    compiled = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    mse(model(x), (x, y)).backward()
    for g, p in zip(compiled, model.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad, atol=ATOL, rtol=RTOL)


def test_monitor_stats_equal_diagnose() -> None:
    model = mlp(width=24)
    data = batches(4)
    ref = gs.diagnose(model, data, loss_fn=mse)
    mon = gs.Monitor(every=1)
    c = torch.compile(model, backend="graphsurg", options={"monitor": mon, "inner": "aot_eager"})
    _train(c, data, model)
    stats = mon.stats()
    acts = {(r.site.module, r.activation): r for r in ref.layers.values() if r.kind == "activation"}
    assert len(stats) == len(acts) == 3
    for addr, s in stats.items():
        module = addr.split(":")[0]
        op = next(o.site.op for o in mon._observers.values() if o.stats is s)
        r = acts[(module, op)]
        # same observer, same kernel, same batches: equal up to float32 summation order
        assert int(s.count.max()) == r.count == 4 * 32
        torch.testing.assert_close(s.mean, torch.tensor(r.mean), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(s.var, torch.tensor(r.var), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(s.firing_rate, torch.tensor(r.firing_rate), atol=0, rtol=0)
    grads = mon.grad_norms()
    for module in ("0", "2", "4"):
        assert grads[module] == pytest.approx(ref.layers[module].grad_norm, rel=1e-5)


def test_monitor_diagnosis_equals_diagnose_on_dead_mlp() -> None:
    case = dead_mlp(0, n_batches=4)
    ref = gs.diagnose(case.model, case.batches, loss_fn=case.loss_fn)
    mon = gs.Monitor(every=1)
    c = torch.compile(case.model, backend="graphsurg",
                      options={"monitor": mon, "inner": "eager"})
    for b in case.batches:
        case.loss_fn(c(b[0]), b).backward()
    d = mon.diagnose()
    assert [(p.kind, p.site.module) for p in d.problems] == [
        (p.kind, p.site.module) for p in ref.problems]
    dead = {p.site.module: p.evidence.get("dead_units") for p in d.of_kind("DeadNeurons")}
    assert dead == {p.site.module: p.evidence.get("dead_units")
                    for p in ref.of_kind("DeadNeurons")}
    assert {t.module for t in case.truth} == set(dead)
    assert d.capture == "torch.compile" and d.gradients_checked and d.batches == 4


def test_sampling_every_n_measures_only_those_calls() -> None:
    model = mlp()
    data = batches(8)
    mon = gs.Monitor(every=4)
    c = torch.compile(model, backend="graphsurg", options={"monitor": mon, "inner": "aot_eager"})
    _train(c, data, model)
    assert mon.sampled == 2
    # the statistics are those of batches 0 and 4 exactly
    ref = gs.diagnose(model, [data[0], data[4]], loss_fn=mse)
    first = next(iter(mon.stats().values()))
    r = next(r for r in ref.layers.values() if r.kind == "activation")
    assert int(first.count.max()) == r.count == 64
    torch.testing.assert_close(first.mean, torch.tensor(r.mean), atol=1e-6, rtol=1e-5)
    assert mon.grad_norms()["0"] == pytest.approx(ref.layers["0"].grad_norm, rel=1e-5)


@DYNAMO_RESUME_WARNING
def test_graph_break_both_graphs_observed_and_named() -> None:
    model = BreakMLP()
    data = batches(3)
    mon = gs.Monitor(every=1)
    c = torch.compile(model, backend="graphsurg", options={"monitor": mon, "inner": "aot_eager"})
    for x, y in data:
        torch.testing.assert_close(c(x), model(x), atol=ATOL, rtol=RTOL)
        mse(c(x), (x, y)).backward()
    assert len(mon.graphs) == 2
    mon.stats()  # per-site statistics are built from the graphs' packed ones when read
    ops = sorted(o.site.op for o in mon._observers.values() if o.stats is not None)
    assert ops == ["linear", "relu", "tanh"]  # relu before the break, tanh + head after
    assert set(mon.grad_norms()) == {"fc1", "fc2", "head"}
    d = mon.diagnose()
    breaks = [n for n in d.notes if n.startswith("graph break")]
    assert len(breaks) == 1 and "graph_break" in breaks[0] and "_compile_models.py" in breaks[0]
    ref = gs.diagnose(model, [(x, y) for x, y in data for _ in range(2)], loss_fn=mse)
    relu = next(s for a, s in mon.stats().items() if a.startswith("fc1:"))
    torch.testing.assert_close(relu.mean, torch.tensor(ref.layers["fc1:relu"].mean),
                               atol=1e-6, rtol=1e-5)


def test_reset_and_repr() -> None:
    model = mlp()
    mon = gs.Monitor(every=1)
    c = torch.compile(model, backend="graphsurg", options={"monitor": mon, "inner": "eager"})
    c(batches(1)[0][0])
    assert mon.stats()
    mon.reset()
    assert mon.stats() == {} and mon.sampled == 0
    assert "every=1" in repr(mon)
    d = mon.diagnose()
    assert not d.gradients_checked and d.problems == []


def test_disabled_monitor_runs_plain_graph() -> None:
    model = mlp()
    mon = gs.Monitor(every=2)
    mon.enabled = False
    c = torch.compile(model, backend="graphsurg", options={"monitor": mon, "inner": "eager"})
    for x, _ in batches(3):
        c(x)
    assert mon.stats() == {} and mon.sampled == 0 and mon.calls == 3


@pytest.mark.parametrize("every", [0, -1, 1.5, True])
def test_bad_every(every: object) -> None:
    with pytest.raises(gs.BadInputError, match="every must be an int"):
        gs.Monitor(every=every)  # type: ignore[arg-type]


@DYNAMO_RESUME_WARNING
def test_eval_calls_under_no_grad_share_the_sites() -> None:
    model = BreakMLP()
    data = batches(2)
    mon = gs.Monitor(every=1)
    c = torch.compile(model, backend="graphsurg", options={"monitor": mon, "inner": "eager"})
    for x, y in data:
        mse(c(x), (x, y)).backward()
    with torch.no_grad():
        c(data[0][0])  # grad mode changed: Dynamo recompiles; observers are shared
    assert len(mon.graphs) == 4 and len(mon._observers) == 3
    assert all(int(s.count.max()) == 3 * 32 for s in mon.stats().values())
    d = mon.diagnose()
    assert len(mon.graph_breaks) == 1
    assert len([n for n in d.notes if n.startswith("graph break")]) == 1


class RecordingSink:
    """A sink that is not a gs.Monitor: the backend needs only the public MonitorSink."""

    def __init__(self) -> None:
        from graphsurg.passes.fx.instrument import Observer

        self._observer_cls = Observer
        self.every, self.enabled = 1, True
        self.graphs: list[object] = []
        self.observers: dict[tuple[str, ...], Observer] = {}
        self.layers: dict[str, str] = {}

    def add_graph(self, record: object) -> int:
        self.graphs.append(record)
        return len(self.graphs) - 1

    def observer(self, key: tuple[str, ...], site: object):  # type: ignore[no-untyped-def]
        return self.observers.setdefault(
            key, self._observer_cls(site, saturation_margin=0.01, sample_rows=0))

    def add_layer(self, module: str, kind: str, next_modules: list[str]) -> None:
        self.layers[module] = kind


def test_a_sink_other_than_monitor_gets_the_public_reports() -> None:
    from graphsurg.passes.fx.observe_compiled import MonitorSink

    model = mlp()
    sink = RecordingSink()
    assert isinstance(sink, MonitorSink) and isinstance(gs.Monitor(), MonitorSink)
    c = torch.compile(model, backend="graphsurg", options={"monitor": sink, "inner": "eager"})
    x, y = batches(1)[0]
    mse(c(x), (x, y)).backward()
    (rec,) = sink.graphs
    assert rec.index == 0  # type: ignore[attr-defined]
    assert sink.layers == {"0": "linear", "2": "linear", "4": "linear"}
    got = rec.site_stats()  # type: ignore[attr-defined]
    assert sorted(o.site.op for o, *_ in got) == ["linear", "relu", "tanh"]
    assert all(int(s.count.max()) == 32 for _, s, _, _ in got)
    totals = rec.grad_totals()  # type: ignore[attr-defined]
    for path in ("0", "2", "4"):
        layer = model.get_submodule(path)
        assert rec.weights[path] is layer.weight  # type: ignore[attr-defined]
        # weight + bias, one step; float32 sums of squares against float64: float32 tolerance
        want = sum(float(p.grad.double().square().sum()) for p in layer.parameters())
        sq, steps, sharded = totals[path]
        assert steps == 1 and not sharded
        assert float(sq) == pytest.approx(want, rel=1e-5)


def test_an_object_that_is_not_a_sink_is_refused() -> None:
    c = torch.compile(mlp(), backend="graphsurg", options={"monitor": object(), "inner": "eager"})
    with pytest.raises(Exception, match="MonitorSink"):
        c(batches(1)[0][0])


def test_monitor_diagnosis_is_the_one_diagnosis(monkeypatch: pytest.MonkeyPatch) -> None:
    import graphsurg._diagnose as one

    seen = []
    real = one.diagnosis_from

    def spy(m, config=None):  # type: ignore[no-untyped-def]
        seen.append(m)
        return real(m, config)

    monkeypatch.setattr(one, "diagnosis_from", spy)
    model = mlp()
    mon = gs.Monitor(every=1)
    c = torch.compile(model, backend="graphsurg", options={"monitor": mon, "inner": "eager"})
    _train(c, batches(2), model)
    d = mon.diagnose()
    (m,) = seen
    assert m.ir == "torch" and m.capture == d.capture == "torch.compile"
    assert m.batches == d.batches == 2 and d.gradients_checked


def _sigmoid_mlp() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16),
                               torch.nn.Sigmoid(), torch.nn.Linear(16, 2))


def _stats_via(in_graph: bool) -> tuple[dict, dict, list]:
    from graphsurg.passes.fx.observe_compiled import monitor_graph
    from torch._dynamo.backends.registry import lookup_backend

    model = _sigmoid_mlp()
    mon = gs.Monitor(every=1)
    inner = lookup_backend("aot_eager")

    def backend(gm, example_inputs):  # type: ignore[no-untyped-def]
        return monitor_graph(mon, gm, example_inputs, inner, in_graph=in_graph)[0]

    c = torch.compile(model, backend=backend)
    _train(c, batches(3), model)
    stats = mon.stats()  # builds the observers' statistics from the graph's packed ones
    sat = [o.saturated_fraction() for o in mon._observers.values()]
    return stats, mon.grad_norms(), sat


def test_statistics_in_the_graph_equal_the_batched_kernel_and_float64() -> None:
    """The observed graph computing every site's sums itself (what inductor fuses) gives the
    statistics the batched C kernel gives, and both match a float64 reference."""
    in_graph, g_in, sat_in = _stats_via(True)
    kernel, g_k, sat_k = _stats_via(False)
    assert in_graph.keys() == kernel.keys() and len(in_graph) == 3
    model = _sigmoid_mlp()
    xs = torch.cat([x for x, _ in batches(3)]).double()
    h1 = torch.relu(model[0].double()(xs))
    h2 = torch.sigmoid(model[2].double()(h1))
    ref = {"0": h1, "2": h2, "4": model[4].double()(h2)}
    for addr, s in in_graph.items():
        k = kernel[addr]
        assert torch.equal(s.count, k.count) and torch.equal(s.n_nonpos, k.n_nonpos)
        r = ref[addr.split(":")[0]]
        # float32 sums of 96 rows against float64: float32 rounding
        torch.testing.assert_close(s.exact_mean(), r.mean(0), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(k.exact_mean(), r.mean(0), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(s.var.double(), r.var(0, correction=0), atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(k.var.double(), r.var(0, correction=0), atol=1e-6, rtol=1e-4)
    # the sigmoid site counts saturation around its centre 0.5 in both paths
    assert sum(f is not None for f in sat_in) == 1
    for a, b in zip(sat_in, sat_k, strict=True):
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b))
    for k, v in g_in.items():
        assert v == pytest.approx(g_k[k], rel=1e-6)


def test_one_batched_call_per_sampled_step_whatever_the_sites(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A sampled call reduces all sites in one call and all gradients in one call; a skipped
    call runs the plain compiled graph and measures nothing."""
    import graphsurg.passes.fx.observe_compiled as oc

    counts = {"sites": 0, "grads": 0}
    real_sites, real_grads = oc.partial_sums_many, oc.multi_grad_sq_norms

    def sites(*a, **k):  # type: ignore[no-untyped-def]
        counts["sites"] += 1
        return real_sites(*a, **k)

    def grads(*a, **k):  # type: ignore[no-untyped-def]
        counts["grads"] += 1
        return real_grads(*a, **k)

    monkeypatch.setattr(oc, "partial_sums_many", sites)
    monkeypatch.setattr(oc, "multi_grad_sq_norms", grads)
    model = mlp()  # three sites, six parameters
    mon = gs.Monitor(every=2)
    c = torch.compile(model, backend="graphsurg", options={"monitor": mon, "inner": "aot_eager"})
    _train(c, batches(4), model)
    assert mon.sampled == 2
    assert counts == {"sites": 2, "grads": 2}


def _saved_for_backward(backend) -> list[tuple[tuple[int, ...], torch.dtype]]:  # type: ignore[no-untyped-def]
    model = mlp()
    x, _ = batches(1)[0]
    out = torch.compile(model, backend=backend)(x)
    node = out.grad_fn
    assert type(node).__name__ == "CompiledFunctionBackward"
    return sorted(((tuple(t.shape), t.dtype) for t in node.saved_tensors), key=str)


def _inductor_without_codegen(gm, example_inputs):  # type: ignore[no-untyped-def]
    """Inductor's own pipeline (its decompositions, joint-graph passes and min-cut
    partitioner) with the forward and backward graphs run as FX code: what inductor would
    save for backward, in seconds instead of a C++ compile."""
    from functorch.compile import make_boxed_func
    from torch._inductor.compile_fx import compile_fx

    def inner_compile(g, ex, **kwargs):  # type: ignore[no-untyped-def]
        return make_boxed_func(g.forward)

    return compile_fx(gm, example_inputs, inner_compile=inner_compile)


def test_statistics_in_the_graph_do_not_change_what_backward_saves() -> None:
    """aot_autograd CSEs the joint graph: a statistic written as ``x <= 0`` on a ReLU output
    is ReLU backward's own mask, inductor's partitioner then saves that bool mask for
    backward, and inductor's CPU code stores it at ~8 ns a value (0.5 ms on a 256x256
    activation, 400x the ReLU; the cause of x1.2-1.6 at every=1 with inner="inductor"). The
    observed graph must save for backward exactly what the plain graph saves."""
    from graphsurg.passes.fx.observe_compiled import monitor_graph

    mon = gs.Monitor(every=1)

    def observed(gm, example_inputs):  # type: ignore[no-untyped-def]
        return monitor_graph(mon, gm, example_inputs, _inductor_without_codegen,
                             in_graph=True)[0]

    plain = _saved_for_backward(_inductor_without_codegen)
    torch._dynamo.reset()
    assert _saved_for_backward(observed) == plain
    assert torch.bool not in {dt for _, dt in plain}


def test_sums_kept_and_merged_k_calls_at_a_time_equal_merging_every_call(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A sampled call keeps its sums (by reference on CPU, no copy) and the graph merges them K calls at a time
    and before any read: K=1 (merge every call), K=2 (full buffers and a partial one) and
    the default give the same statistics and gradient norms."""
    import graphsurg.passes.fx.observe_compiled as oc

    def run(k: int) -> tuple[dict, dict]:  # type: ignore[type-arg]
        monkeypatch.setattr(oc, "_MERGE_CALLS", k)
        torch._dynamo.reset()
        model = mlp()
        mon = gs.Monitor(every=1)
        c = torch.compile(model, backend="graphsurg",
                          options={"monitor": mon, "inner": "aot_eager"})
        _train(c, batches(5), model)
        assert mon.sampled == 5
        return mon.stats(), mon.grad_norms()

    (s1, g1), (s2, g2), (s64, g64) = run(1), run(2), run(64)
    assert s1.keys() == s2.keys() == s64.keys() and len(s1) == 3
    for a, ref in s1.items():
        for other in (s2[a], s64[a]):
            assert torch.equal(other.count, ref.count)
            assert torch.equal(other.n_nonpos, ref.n_nonpos)
            # float64 merges of the same float32 sums in another order: float64 rounding
            torch.testing.assert_close(other.exact_mean(), ref.exact_mean(), atol=1e-12,
                                       rtol=1e-12)
            torch.testing.assert_close(other.m2.double(), ref.m2.double(), atol=1e-6,
                                       rtol=1e-6)
    for k, v in g1.items():
        assert g2[k] == pytest.approx(v, rel=1e-12) and g64[k] == pytest.approx(v, rel=1e-12)
