"""The monitor's per-sampled-call fast paths against float64 references computed eagerly:
the one-call C sum of squares of the gradients, sums kept by reference (CPU) and merged K
calls at a time, and the row sample of a site the graph returns (read from the output)."""

from __future__ import annotations

import pytest
import torch
from _compile_models import batches, mse
from graphsurg.kernels import multi_grad_sq_norms
from graphsurg.kernels._multi_stats import _sq_lib, _sq_sums_native

import graphsurg as gs


def _ref_sq(ts: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([t.double().square().sum() for t in ts])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_sum_of_squares_equals_float64(dtype: torch.dtype) -> None:
    """Sizes around the C loop's vector width (16) and block (2048), an empty tensor, a
    matrix and large values: within float32 rounding of the squares (float32 lanes sum at
    most 16 squares before float64 takes over), float64 to 1e-13."""
    if _sq_lib() is None:
        pytest.skip("no C compiler: multi_grad_sq_norms uses torch._foreach_norm")
    g = torch.Generator().manual_seed(0)
    sizes = [(0,), (1,), (15,), (16,), (17,), (2047,), (2048,), (2049,), (256, 256),
             (100_003,)]
    ts = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in sizes]
    ts.append((torch.randn(33, 17, generator=g, dtype=torch.float64) * 1e4).to(dtype))
    got = _sq_sums_native(ts)
    assert got is not None and got.dtype == torch.float64
    rtol = 1e-6 if dtype == torch.float32 else 1e-13
    torch.testing.assert_close(got, _ref_sq(ts), rtol=rtol, atol=0)
    torch.testing.assert_close(multi_grad_sq_norms(ts), got, rtol=0, atol=0)


def test_sum_of_squares_fallbacks_equal_float64() -> None:
    """Tensors the C loop does not take (a transposed view, mixed dtypes, bfloat16) go
    through torch's reductions, still within float32 rounding of float64."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(64, 48, generator=g)
    cases = [[a.t(), a], [a, a.double()], [a.bfloat16(), a]]
    for ts in cases:
        if len({t.dtype for t in ts}) == 1:
            assert _sq_sums_native(ts) is None  # not contiguous
        torch.testing.assert_close(multi_grad_sq_norms(ts), _ref_sq(ts), rtol=1e-5, atol=0)


def _relu_mlp() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(),
                               torch.nn.Linear(16, 16), torch.nn.ReLU(),
                               torch.nn.Linear(16, 2))


def _monitored(in_graph: bool, n: int, k: int, monkeypatch: pytest.MonkeyPatch
               ) -> tuple[gs.Monitor, torch.nn.Module]:
    import graphsurg.passes.fx.observe_compiled as oc
    from torch._dynamo.backends.registry import lookup_backend

    monkeypatch.setattr(oc, "_MERGE_CALLS", k)
    torch._dynamo.reset()
    model = _relu_mlp()
    mon = gs.Monitor(every=1)
    inner = lookup_backend("aot_eager")

    def backend(gm, example_inputs):  # type: ignore[no-untyped-def]
        return oc.monitor_graph(mon, gm, example_inputs, inner, in_graph=in_graph)[0]

    c = torch.compile(model, backend=backend)
    for x, y in batches(n):
        mse(c(x), (x, y)).backward()
    return mon, model


@pytest.mark.parametrize("in_graph", [True, False])
def test_kept_sums_merge_to_float64_statistics(in_graph: bool,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Seven sampled calls, sums kept by reference and merged three at a time (two full
    merges, one partial at read): every site's statistics and every layer's gradient norm
    equal the float64 ones of all seven batches (float32 sums of 32 rows: 1e-5)."""
    n = 7
    mon, _ = _monitored(in_graph, n, 3, monkeypatch)
    rec = mon.graphs[0]
    assert mon.sampled == n and len(rec.kept) == n % 3 and rec.n_sums == 0
    stats = mon.stats()
    model = _relu_mlp().double()
    data = batches(n)
    xs = torch.cat([x for x, _ in data]).double()
    h1 = torch.relu(model[0](xs))
    h2 = torch.relu(model[2](h1))
    ref = {"0": h1, "2": h2, "4": model[4](h2)}
    assert sorted(a.split(":")[0] for a in stats) == ["0", "2", "4"]
    for addr, s in stats.items():
        r = ref[addr.split(":")[0]]
        assert torch.equal(s.count, torch.full((r.shape[1],), r.shape[0]))
        assert torch.equal(s.n_nonpos, (r <= 0).sum(0))
        torch.testing.assert_close(s.exact_mean(), r.mean(0), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(s.var.double(), r.var(0, correction=0), atol=1e-6,
                                   rtol=1e-4)
        torch.testing.assert_close(s.absmax.double(), r.abs().amax(0), atol=0, rtol=1e-6)
    # gradient norms: root mean square over the steps of each layer's gradient norm
    sq: dict[str, float] = {}
    for x, y in data:
        model.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(x.double()), y.double()).backward()
        for i in (0, 2, 4):
            layer = model[i]
            assert isinstance(layer, torch.nn.Linear)
            assert layer.weight.grad is not None and layer.bias.grad is not None
            v = float(layer.weight.grad.square().sum() + layer.bias.grad.square().sum())
            sq[str(i)] = sq.get(str(i), 0.0) + v
    norms = mon.grad_norms()
    assert sorted(norms) == ["0", "2", "4"]
    for layer, v in sq.items():
        assert norms[layer] == pytest.approx((v / n) ** 0.5, rel=1e-5)


def test_row_sample_of_an_output_site_is_read_from_the_output(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """In the graph path the head's output is a site and the graph's output: the graph
    returns no copy of it (an empty placeholder) and its row sample, taken from the output,
    equals the kernel path's and the eager activations' first rows."""
    samples = {}
    for in_graph in (True, False):
        mon, _ = _monitored(in_graph, 3, 64, monkeypatch)
        mon.stats()  # fills the observers (statistics and row samples) from the graph
        call_rows = {o.site.node: o.sample() for o in mon._observers.values()}
        samples[in_graph] = call_rows
    assert samples[True].keys() == samples[False].keys() and len(samples[True]) == 3
    model = _relu_mlp()
    xs = torch.cat([x for x, _ in batches(3)])
    with torch.no_grad():
        h1 = torch.relu(model[0](xs))
        h2 = torch.relu(model[2](h1))
        out = model[4](h2)
    for node, rows in samples[True].items():
        other = samples[False][node]
        assert rows is not None and other is not None
        torch.testing.assert_close(rows, other, atol=0, rtol=0)
    got_out = [r for r in samples[True].values() if r is not None and r.shape[1] == 2]
    assert len(got_out) == 1
    torch.testing.assert_close(got_out[0], out[: got_out[0].shape[0]], atol=1e-6, rtol=1e-5)


def test_in_graph_path_returns_no_copy_of_an_output_site() -> None:
    """The observed graph's extra output for a site that is also the graph's output is an
    empty placeholder, and the wrapper knows to read that site's rows from the output."""
    import graphsurg.passes.fx.observe_compiled as oc
    from torch._dynamo.backends.registry import lookup_backend

    mon = gs.Monitor(every=1)
    calls: list[oc.MonitoredCall] = []
    inner = lookup_backend("aot_eager")

    def backend(gm, example_inputs):  # type: ignore[no-untyped-def]
        fn, _ = oc.monitor_graph(mon, gm, example_inputs, inner, in_graph=True)
        calls.append(fn)
        return fn

    model = _relu_mlp()
    c = torch.compile(model, backend=backend)
    x, y = batches(1)[0]
    mse(c(x), (x, y)).backward()
    (call,) = calls
    assert len(call.row_outputs) == 1
    (site, pos), = call.row_outputs.items()
    assert pos == 0  # Dynamo's graph returns a tuple: the model's output is its first
    assert mon.graphs[0].observers[site].site.module == "4"  # the head's output


def test_merge_of_raw_sums_equals_packed_merge_and_float64() -> None:
    """``merge_sums_many`` (what a graph's flush runs on its kept sums) is bit for bit the
    merge of the packed statistics of each call, and matches float64 statistics of all the
    calls' values (offset data, a non-finite value, a saturation threshold)."""
    from graphsurg.kernels import packed_from_sums, partial_sums
    from graphsurg.kernels._multi_stats import merge_packed_many, merge_sums_many

    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(37, 50, generator=g) * 3 + 1e4 for _ in range(6)]
    xs[2][3, 3] = float("nan")  # (not in a first row: that column would pivot at 0)
    xs[4][5, 7] = float("inf")
    sums = torch.stack([partial_sums(x, -1, 1e4 + 2.0) for x in xs])
    got = merge_sums_many(sums)
    assert torch.equal(got, merge_packed_many(packed_from_sums(sums)))
    work = sums.clone()  # in place, the intermediates in the sums' own rows: the same bits
    assert torch.equal(merge_sums_many(work, scratch=True), got)
    allx = torch.cat(xs).double()
    fin = torch.isfinite(allx)
    n = fin.sum(0).double()
    xf = torch.where(fin, allx, 0.0)
    mean = xf.sum(0) / n
    m2 = (torch.where(fin, allx - mean, 0.0) ** 2).sum(0)
    torch.testing.assert_close(got[0], n, atol=0, rtol=0)
    torch.testing.assert_close(got[1], mean, atol=1e-6, rtol=0)  # float32 sums of 37 rows
    torch.testing.assert_close(got[2], m2, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(got[3], xf.abs().sum(0), atol=0, rtol=1e-6)
    torch.testing.assert_close(got[5], xf.abs().amax(0), atol=0, rtol=0)
    torch.testing.assert_close(got[6], (~fin).sum(0).double(), atol=0, rtol=0)
    torch.testing.assert_close(got[7], (fin & (allx.abs() >= 1e4 + 2.0)).sum(0).double(),
                               atol=0, rtol=0)


@pytest.mark.parametrize("rows", [7, 1024])
def test_batched_kernel_sums_side_by_side_equal_float64(rows: int) -> None:
    """``partial_sums_many`` (the batched C call; 1024 rows run as 4 blocks whose sums and
    maxima are combined) puts each site's seven sums side by side: per column, the
    statistics equal float64 ones -- a row layout with a stride, a non-finite first value
    (pivot 0), a saturation threshold, and a site whose float32 squares overflow (exact
    per-site fallback)."""
    from graphsurg.kernels import packed_from_sums, partial_sums_many

    g = torch.Generator().manual_seed(2)
    a = torch.randn(rows, 40, generator=g) * 2 + 5
    b = torch.randn(rows, 64, generator=g)[:, 8:56]  # row stride 64, 48 channels
    c = torch.randn(rows, 3, 24, generator=g).reshape(rows * 3, 24)
    a[0, 1] = float("nan")
    c[2, 5] = float("inf")
    big = torch.randn(rows, 8, generator=g) * 1e25 + 1e30  # float32 d*d overflows
    xs = [a, b, c]
    thrs: list[float | None] = [None, 1.5, 0.5]
    for sites, ts in ((xs, thrs), (xs + [big], thrs + [None])):
        packed = packed_from_sums(partial_sums_many(sites, [-1] * len(sites), ts))
        off = 0
        for x, thr in zip(sites, ts, strict=True):
            w = x.shape[1]
            p = packed[:, off: off + w]
            off += w
            xd = x.double()
            fin = torch.isfinite(xd)
            n = fin.sum(0).double()
            xf = torch.where(fin, xd, 0.0)
            mean = xf.sum(0) / n
            var = (torch.where(fin, xd - mean, 0.0) ** 2).sum(0) / n
            scale = xf.abs().amax(0)
            torch.testing.assert_close(p[0], n, atol=0, rtol=0)
            torch.testing.assert_close(p[1], mean, atol=1e-6 * float(scale.max()), rtol=1e-5)
            torch.testing.assert_close(p[2] / n, var, atol=1e-6 * float(scale.max()) ** 2,
                                       rtol=1e-4)
            torch.testing.assert_close(p[3], xf.abs().sum(0), atol=0, rtol=1e-5)
            torch.testing.assert_close(p[4], ((xd <= 0) & fin).sum(0).double(), atol=0,
                                       rtol=0)
            torch.testing.assert_close(p[5], scale, atol=0, rtol=0)
            torch.testing.assert_close(p[6], (~fin).sum(0).double(), atol=0, rtol=0)
            sat = (fin & (xd.abs() >= thr)).sum(0).double() if thr is not None else 0 * n
            torch.testing.assert_close(p[7], sat, atol=0, rtol=0)


def test_packed_partial_sums_is_the_sites_partial_sums_side_by_side() -> None:
    """What the observed graph computes (one cat of every site's rows; float32 when every
    value is exact in float32) converts to float64 bit for bit equal to each site's
    ``partial_sums`` side by side; a float64 site makes the whole result float64; and the
    statistics match float64 ones."""
    from graphsurg.kernels import packed_from_sums, partial_sums
    from graphsurg.kernels._multi_stats import packed_partial_sums

    g = torch.Generator().manual_seed(3)
    a = torch.randn(33, 20, generator=g) * 4 + 1e3
    b = torch.randn(5, 12, 7, generator=g)  # channels on dim 1 of a 3-d tensor
    a[4, 2] = float("nan")
    b[0, 3, 0] = float("-inf")  # the first value of channel 3: pivot 0
    specs = [(a, -1, None), (b, 1, 0.5)]
    whole = torch.cat([partial_sums(x, cd, t) for x, cd, t in specs], dim=1)
    got = packed_partial_sums([x for x, _, _ in specs], [cd for _, cd, _ in specs],
                              [t for _, _, t in specs])
    assert got.dtype == torch.float32
    assert torch.equal(got.double(), whole)
    got64 = packed_partial_sums([a.double(), b], [-1, 1], [None, 0.5])
    assert got64.dtype == torch.float64
    assert torch.equal(got64[:, 20:], whole[:, 20:])
    ad = a.double()
    fin = torch.isfinite(ad)
    mean = torch.where(fin, ad, 0.0).sum(0) / fin.sum(0)
    torch.testing.assert_close(packed_from_sums(got.double())[1, :20], mean, atol=1e-4,
                               rtol=0)  # float32 sums of 33 values near 1e3
