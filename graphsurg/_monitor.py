"""``gs.Monitor``: diagnose a model while it trains under ``torch.compile``, at low cost.

Pass a monitor to the graphsurg backend::

    monitor = gs.Monitor(every=16)
    step_model = torch.compile(model, backend="graphsurg", options={"monitor": monitor})
    ...train as usual...
    print(monitor.diagnose().summary())

Every ``every``-th call of each compiled graph measures: per-neuron activation statistics
of the forward (the observers ``gs.diagnose`` uses, fed from extra outputs of the compiled
graph) and per-layer gradient norms of the following backward. The other calls run the
graph exactly as the inner backend compiled it. ``diagnose()`` is ``gs.diagnose``'s own
judgement (``graphsurg._diagnose.diagnosis_from``) of what was accumulated, with no extra
pass over the data.

A monitor is the backend's :class:`~graphsurg.passes.fx.observe_compiled.MonitorSink`: the
compiled graphs register with its public ``add_graph``, ``observer`` and ``add_layer``
methods and accumulate, batched across sites, in their ``GraphRecord``; the monitor merges
the records into per-site statistics when they are read. ``Monitor.compile`` also monitors
models torch cannot compile (DDP / FSDP2 on CPU) eagerly, and says so once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ._config import DiagnoseConfig
from ._errors import BadInputError
from ._problems import Diagnosis

if TYPE_CHECKING:
    from graphsurg.kernels import NeuronStats
    from graphsurg.passes.fx.instrument import Observer
    from graphsurg.passes.fx.observe_compiled import GraphRecord


@dataclass
class _Layer:
    kind: str
    next_modules: list[str]
    weight: torch.Tensor | None = None


class Monitor:
    """Accumulates activation and gradient statistics from graphs compiled by graphsurg.

    Args:
        every: measure one call in ``every`` of each compiled graph (the 1st, the
            ``every+1``-th, ...); ``every=1`` measures every call. The calls in between run
            the unmodified compiled graph.
        config: thresholds for :meth:`diagnose` (:class:`DiagnoseConfig`;
            ``saturation_margin`` and ``rank_sample`` are used while measuring).

    A monitor holds statistics, not activations (apart from ``config.rank_sample`` rows
    per site for the effective rank). It does not modify the model, its parameters or
    their gradients; gradients are read through one-shot tensor hooks on sampled steps.

    Example:
        >>> mon = gs.Monitor(every=16)
        >>> cmodel = torch.compile(model, backend="graphsurg",
        ...                        options={"monitor": mon, "inner": "aot_eager"})
        >>> for x, y in loader:
        ...     loss_fn(cmodel(x), y).backward(); opt.step(); opt.zero_grad()
        >>> mon.diagnose().of_kind("DeadNeurons")
    """

    def __init__(self, every: int = 16, config: DiagnoseConfig | None = None) -> None:
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise BadInputError(f"Monitor(every={every!r}): every must be an int >= 1")
        self.every = every
        self.config = config or DiagnoseConfig()
        self.enabled = True
        self.graphs: list[GraphRecord] = []
        self._observers: dict[tuple[str, ...], Observer] = {}
        self._layers: dict[str, _Layer] = {}
        self.notes: list[str] = []  # said once, repeated in every diagnosis

    # -- the sink the backend reports to (graphsurg.passes.fx.observe_compiled.MonitorSink) --
    def add_graph(self, record: GraphRecord) -> int:
        """Keep a newly compiled graph's record; returns its index (sink interface)."""
        self.graphs.append(record)
        return len(self.graphs) - 1

    def observer(self, key: tuple[str, ...], site: Any) -> Observer:
        """The observer of one activation site; recompilations of a graph (new shapes, grad
        mode) get the same observer for the same ``key`` (sink interface)."""
        from graphsurg.passes.fx.instrument import Observer

        obs = self._observers.get(key)
        if obs is None:
            obs = Observer(site, saturation_margin=self.config.saturation_margin,
                           sample_rows=self.config.rank_sample)
            self._observers[key] = obs
        return obs

    def add_layer(self, module: str, kind: str, next_modules: list[str]) -> None:
        """A parametrised layer of a compiled graph and the layers reading it (sink
        interface; the first report of a layer wins)."""
        if module not in self._layers:
            self._layers[module] = _Layer(kind, list(next_modules))

    def compile(self, model: torch.nn.Module, *, inner: str | Any = "inductor",
                **compile_kwargs: Any) -> Any:
        """``torch.compile(model, backend="graphsurg", options={"monitor": self, "inner":
        inner}, **compile_kwargs)``, falling back to eager monitoring where torch compiles
        no graph of the model.

        A DDP- or FSDP2-wrapped model on CPU/gloo compiles no graph today (Dynamo breaks
        inside the wrapper's forward): after the first call finds that, the returned
        callable runs the model eagerly with module hooks on sampled calls (statistics
        batched as in the compiled path; gradients read after the wrapper's reduction) and
        warns once. The first call, which found it out, is not measured.
        """
        from graphsurg.passes.fx.observe_eager import CompiledOrEager

        options: dict[str, Any] = {"monitor": self, "inner": inner}
        compiled = torch.compile(model, backend="graphsurg", options=options, **compile_kwargs)
        return CompiledOrEager(self, model, compiled)

    # -- public ----------------------------------------------------------------------------
    @property
    def calls(self) -> int:
        """Calls of the first compiled graph (training steps, for one graph per step)."""
        return self.graphs[0].calls if self.graphs else 0

    @property
    def sampled(self) -> int:
        """Calls of the first compiled graph that were measured."""
        return self.graphs[0].sampled if self.graphs else 0

    @property
    def graph_breaks(self) -> list[str]:
        """Why Dynamo split the model, one line per graph break (empty: one graph)."""
        lines = [r.break_reason for r in self.graphs if r.break_reason]
        return list(dict.fromkeys(lines))  # a recompiled graph breaks at the same place

    def stats(self) -> dict[str, NeuronStats]:
        """Accumulated activation statistics per site address (``module:node``)."""
        from ._problems import Site

        self._sync()
        out = {}
        for o in self._observers.values():
            if o.stats is not None:
                out[Site(o.site.producer or o.site.module, o.site.node, o.site.op).address] = (
                    o.stats)
        return out

    def grad_norms(self) -> dict[str, float]:
        """Per layer: root mean square over measured steps of its gradient norm."""
        return {k: math.sqrt(v) for k, v in self._grad_means().items()}

    def reset(self) -> None:
        """Forget the statistics (the compiled graphs stay compiled)."""
        for o in self._observers.values():
            o.reset()
        for r in self.graphs:
            r.reset()

    def _sync(self) -> None:
        """Fill each observer from the packed statistics of every graph that measured it
        (read time: one slice per site and graph, then an exact merge)."""
        from graphsurg.kernels import merge_packed, packed_to_stats, stats_to_packed

        merged: dict[int, tuple[list[NeuronStats], list[NeuronStats], list[torch.Tensor]]] = {}
        for r in self.graphs:
            for o, st, sat, rows in r.site_stats():
                slot = merged.setdefault(id(o), ([], [], []))
                if st is not None:
                    slot[0].append(st)
                if sat is not None:
                    slot[1].append(sat)
                if rows is not None:
                    slot[2].append(rows)

        def fold(parts: list[NeuronStats]) -> NeuronStats | None:
            if len(parts) <= 1:
                return parts[0] if parts else None
            p = None
            for st in parts:
                p = merge_packed(p, stats_to_packed(st))
            assert p is not None
            return packed_to_stats(p, parts[0].mean.dtype, parts[0].sat_threshold)

        for o in self._observers.values():
            slot = merged.get(id(o), ([], [], []))
            o.stats = fold(slot[0])
            o.sat_stats = fold(slot[1])
            o.set_sample(torch.cat(slot[2]) if slot[2] else None)
        for r in self.graphs:
            for module, w in r.weights.items():
                layer = self._layers.get(module)
                if layer is not None:
                    layer.weight = w

    def _grad_totals(self) -> dict[str, tuple[float, int, bool]]:
        out: dict[str, tuple[float, int, bool]] = {}
        for r in self.graphs:
            for layer, (sq, n, sharded) in r.grad_totals().items():
                v, k, sh = out.get(layer, (0.0, 0, False))
                out[layer] = (v + float(sq), k + n, sh or sharded)
        return out

    def _grad_means(self) -> dict[str, float]:
        return {k: v / n for k, (v, n, _) in self._grad_totals().items() if n}

    def diagnose(self, *, group: object | None = None) -> Diagnosis:
        """Run graphsurg's detectors on the statistics accumulated so far.

        No data is run through the model. Under an initialised ``torch.distributed`` process
        group (``group``; default: the world), statistics are merged across ranks first (one
        all-gather of every site's packed statistics, merged exactly; squared gradient norms
        of sharded parameters summed across ranks -- the shards add up to the whole --, of
        replicated ones averaged; the rank-0 row samples broadcast), so every rank gets the
        same diagnosis. Collective: call it on every rank. The monitor's own statistics are
        left as they were (call :meth:`reset` to restart).
        """
        from graphsurg.passes.fx.instrument import measurements_from

        from ._diagnose import diagnosis_from

        self._sync()
        observers = list(self._observers.values())
        grad_means = self._grad_means()
        notes = [f"measured under torch.compile by the graphsurg backend: {self.sampled} of "
                 f"{self.calls} calls (every={self.every})"]
        if len(self.graphs) > 1:
            notes.append(f"Dynamo compiled {len(self.graphs)} graphs (graph breaks and "
                         "recompilations); the monitor observed all of them")
        for b in self.graph_breaks:
            notes.append(f"graph break: {b}")
        notes.extend(self.notes)
        import torch.distributed as dist

        layers_w = {m: lay.weight for m, lay in self._layers.items() if lay.weight is not None}
        distributed = dist.is_available() and dist.is_initialized()
        if distributed:
            observers, grad_means = _all_reduce(observers, self._grad_totals(), group)
            layers_w = {m: _full(w) for m, w in sorted(layers_w.items())}
            notes.append(f"statistics merged across {dist.get_world_size(group)} ranks")  # type: ignore[arg-type]
        nonfinite = {k for k, v in grad_means.items() if not math.isfinite(v)}
        layers = [(m, lay.kind, layers_w[m].detach(), lay.next_modules)
                  for m, lay in self._layers.items() if m in layers_w]
        gradients = bool(grad_means)
        # grad_means are already means over measured steps: one "batch" each
        m = measurements_from(observers, layers, grad_sq=grad_means, grad_nonfinite=nonfinite,
                              n_batches=1, gradients=gradients, capture="torch.compile",
                              notes=notes)
        m.batches = self.sampled
        if not gradients:
            m.notes.append("gradients not checked: no backward ran on a measured step")
        return diagnosis_from(m, self.config)

    def __repr__(self) -> str:
        return (f"Monitor(every={self.every}, graphs={len(self.graphs)}, "
                f"sites={len(self._observers)}, sampled={self.sampled}/{self.calls})")


def _full(w: torch.Tensor) -> torch.Tensor:
    """A whole weight from a sharded one (a DTensor: all-gathered, collective)."""
    full = getattr(w, "full_tensor", None)
    return full() if callable(full) else w


def _all_reduce(observers: list[Observer], grads: dict[str, tuple[float, int, bool]],
                group: object | None) -> tuple[list[Observer], dict[str, float]]:
    """Copies of the observers with rank-merged statistics (one all-gather for every site),
    and rank-merged gradient means: sharded layers' squared norms summed over ranks,
    replicated ones averaged."""
    import torch.distributed as dist

    from graphsurg.kernels import all_reduce_packed, packed_to_stats, stats_to_packed
    from graphsurg.passes.fx.instrument import Observer

    world = dist.get_world_size(group)  # type: ignore[arg-type]
    # every rank must pack the same columns: widths agreed through the sites' keys
    parts: list[tuple[int, str, NeuronStats]] = []
    for i, o in enumerate(observers):
        for kind, s in (("stats", o.stats), ("sat", o.sat_stats)):
            if s is not None:
                parts.append((i, kind, s))
    merged: list[Observer] = []
    for o in observers:
        c = Observer(o.site, saturation_margin=o.margin, sample_rows=o.sample_rows)
        c.error = o.error
        merged.append(c)
    if parts:
        packed = torch.cat([stats_to_packed(s.to("cpu")) for _, _, s in parts], dim=1)
        packed = all_reduce_packed(packed, group)
        off = 0
        for i, kind, s in parts:
            cols = packed[:, off: off + s.channels]
            off += s.channels
            setattr(merged[i], "stats" if kind == "stats" else "sat_stats",
                    packed_to_stats(cols, s.mean.dtype, s.sat_threshold))
    samples = [[o.sample() for o in observers]]
    dist.broadcast_object_list(samples, src=0, group=group)  # type: ignore[arg-type]
    for c, rows in zip(merged, samples[0], strict=True):
        c.set_sample(rows)
    keys = sorted(grads)
    means: dict[str, float] = {}
    if keys:
        t = torch.tensor([[grads[k][0], grads[k][1]] for k in keys], dtype=torch.float64)
        dist.all_reduce(t, group=group)  # type: ignore[arg-type]
        for k, (sq, n) in zip(keys, t.tolist(), strict=True):
            steps = n / world  # every rank measures the same steps
            if steps:
                # sharded: the shards' squared norms add up to the parameter's; replicated
                # (DDP): every rank holds the same reduced gradient, so average the ranks
                means[k] = (sq if grads[k][2] else sq / world) / steps
    return merged, means


__all__ = ["Monitor"]
