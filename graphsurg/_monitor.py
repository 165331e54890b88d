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
compiled graphs report to its public ``add_graph``, ``observer``, ``add_layer``,
``record_weight`` and ``record_grad`` methods.
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
        self._grad_sq: dict[str, torch.Tensor] = {}
        self._grad_steps: dict[str, int] = {}

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

    def record_weight(self, module: str, weight: torch.Tensor) -> None:
        """The current weight of a layer, read on sampled calls (sink interface)."""
        layer = self._layers.get(module)
        if layer is not None:
            layer.weight = weight

    def record_grad(self, layer: str, sq: torch.Tensor, step: bool) -> None:
        """Add a squared gradient norm of ``layer``; ``step`` counts a measured step (sink
        interface)."""
        prev = self._grad_sq.get(layer)
        self._grad_sq[layer] = sq if prev is None else prev + sq
        if step:
            self._grad_steps[layer] = self._grad_steps.get(layer, 0) + 1

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
            o.stats = None
            o.sat_stats = None
            o._sample = []
            o._sampled = 0
            o.error = None
            o.enabled = True
        self._grad_sq.clear()
        self._grad_steps.clear()
        for r in self.graphs:
            r.sampled = 0

    def _grad_means(self) -> dict[str, float]:
        out = {}
        for layer, v in self._grad_sq.items():
            n = self._grad_steps.get(layer, 0)
            if n:
                out[layer] = float(v) / n
        return out

    def diagnose(self, *, group: object | None = None) -> Diagnosis:
        """Run graphsurg's detectors on the statistics accumulated so far.

        No data is run through the model. Under an initialised ``torch.distributed`` process
        group (``group``; default: the world), statistics are merged across ranks first
        (:meth:`NeuronStats.all_reduce`; gradient norms averaged; the rank-0 row samples
        broadcast), so every rank gets the same diagnosis. Collective: call it on every rank.
        The monitor's own statistics are left as they were (call :meth:`reset` to restart).
        """
        from graphsurg.passes.fx.instrument import measurements_from

        from ._diagnose import diagnosis_from

        observers = list(self._observers.values())
        grad_means = self._grad_means()
        notes = [f"measured under torch.compile by the graphsurg backend: {self.sampled} of "
                 f"{self.calls} calls (every={self.every})"]
        if len(self.graphs) > 1:
            notes.append(f"Dynamo compiled {len(self.graphs)} graphs (graph breaks and "
                         "recompilations); the monitor observed all of them")
        for b in self.graph_breaks:
            notes.append(f"graph break: {b}")
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            observers, grad_means = _all_reduce(observers, grad_means, group)
            notes.append(f"statistics merged across {dist.get_world_size(group)} ranks")  # type: ignore[arg-type]
        nonfinite = {k for k, v in grad_means.items() if not math.isfinite(v)}
        layers = [(m, lay.kind, lay.weight.detach(), lay.next_modules)
                  for m, lay in self._layers.items() if lay.weight is not None]
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


def _all_reduce(observers: list[Observer], grad_means: dict[str, float], group: object | None
                ) -> tuple[list[Observer], dict[str, float]]:
    """Copies of the observers with rank-merged statistics, and rank-averaged grad means."""
    import torch.distributed as dist

    from graphsurg.passes.fx.instrument import Observer

    merged: list[Observer] = []
    for o in observers:
        c = Observer(o.site, saturation_margin=o.margin, sample_rows=o.sample_rows)
        c.error = o.error
        if o.stats is not None:
            c.stats = o.stats.to(o.stats.mean.device).all_reduce(group)
        if o.sat_stats is not None:
            c.sat_stats = o.sat_stats.to(o.sat_stats.mean.device).all_reduce(group)
        sample = [o.sample()]
        dist.broadcast_object_list(sample, src=0, group=group)  # type: ignore[arg-type]
        if sample[0] is not None:
            c._sample = [sample[0]]
            c._sampled = int(sample[0].shape[0])
        merged.append(c)
    keys = sorted(grad_means)
    world = dist.get_world_size(group)  # type: ignore[arg-type]
    if keys:
        t = torch.tensor([grad_means[k] for k in keys], dtype=torch.float64)
        dist.all_reduce(t, group=group)  # type: ignore[arg-type]
        grad_means = {k: float(v) / world for k, v in zip(keys, t.tolist(), strict=True)}
    return merged, grad_means


__all__ = ["Monitor"]
