"""Monitor one Dynamo graph: observed outputs in the forward, gradient norms in the backward.

The backend compiles two variants of each Dynamo graph with the inner backend:

* the *plain* graph, unchanged -- what every skipped call runs, so a skipped call costs a
  counter increment and nothing else;
* the *observed* graph, which returns, next to the real outputs, a detached alias of every
  observed activation (no copy, no extra compute in the graph; the inner backend still fuses
  everything as before). On a sampled call the wrapper feeds those tensors to graphsurg's
  :class:`~graphsurg.passes.fx.instrument.Observer` -- the same observer ``gs.diagnose`` uses,
  so the statistics are the same (``neuron_stats``: Triton on GPU, the C kernel on CPU) -- and
  registers one-shot gradient hooks on the graph's parameter inputs; each hook reduces the
  parameter's gradient with :func:`graphsurg.kernels.grad_sq_norms` when backward reaches it
  and removes itself.

Statistics stay on the device; nothing is synchronised with the host on a sampled step
except the bounded row sample each site keeps for the effective rank.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
import torch.fx as fx
from graphsurg.kernels import grad_sq_norms

from .dynamo_sites import DynamoSites, find_dynamo_sites
from .instrument import Observer

CompiledFn = Callable[..., Any]


@runtime_checkable
class MonitorSink(Protocol):
    """Where the graphs compiled by the graphsurg backend report what they measure.

    ``graphsurg.Monitor`` implements it; the backend accepts any object that does
    (``options={"monitor": sink}``). :func:`monitor_graph` calls, per compiled graph,
    :meth:`add_graph` once, :meth:`observer` per activation site and :meth:`add_layer` per
    parametrised layer; on each sampled call the wrapper feeds the observers and calls
    :meth:`record_weight`, and the backward calls :meth:`record_grad`.

    Attributes:
        every: measure one call in ``every`` of each graph (read on every call).
        enabled: ``False`` runs the plain graph on every call (read on every call).
    """

    every: int
    enabled: bool

    def add_graph(self, record: GraphRecord) -> int:
        """Keep ``record`` (a newly compiled graph); return its index among the graphs."""
        ...

    def observer(self, key: tuple[str, ...], site: Any) -> Observer:
        """The :class:`Observer` of the activation site ``site`` (a ``DynamoSite``).
        ``key`` (:func:`site_key`) is the same for the site in every recompilation of the
        graph: return the same observer for the same key so statistics accumulate."""
        ...

    def add_layer(self, module: str, kind: str, next_modules: list[str]) -> None:
        """A parametrised layer (``kind`` "linear"/"conv") and the layers reading it."""
        ...

    def record_weight(self, module: str, weight: torch.Tensor) -> None:
        """The current weight of ``module`` (a live parameter: do not modify it)."""
        ...

    def record_grad(self, layer: str, sq: torch.Tensor, step: bool) -> None:
        """The squared gradient norm ``sq`` (0-d, on the device) of one parameter of
        ``layer`` on a sampled step; ``step`` is True once per layer and step (its weight)."""
        ...


@dataclass
class GraphRecord:
    """One Dynamo graph the monitor watches."""

    index: int  # its place among the sink's graphs (set by MonitorSink.add_graph)
    sites: DynamoSites
    observers: list[Observer]
    break_reason: str | None = None  # why Dynamo ended this graph, when a graph break did
    calls: int = 0
    sampled: int = 0
    pending: list[Any] = field(default_factory=list)  # gradient hooks not fired yet


def observed_graph(gm: fx.GraphModule, nodes: Sequence[str]) -> tuple[fx.GraphModule, int]:
    """A copy of ``gm`` that also returns a detached alias of each node in ``nodes``.

    Returns the new graph module and the number of original outputs. ``gm`` is unchanged.
    """
    graph = fx.Graph()
    val_map: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(gm.graph, val_map, return_output_node=True)
    assert isinstance(out, tuple)
    orig = out[0]  # the copied output value; the output node itself is not copied
    by_name = {n.name: n for n in gm.graph.nodes}
    extra: list[fx.Node] = []
    for name in nodes:
        src = val_map[by_name[name]]
        # insert right before the output so the alias does not extend anything's lifetime
        # inside the graph beyond the end of the forward
        d = graph.call_function(torch.ops.aten.detach.default, (src,))
        ev = src.meta.get("example_value")
        if isinstance(ev, torch.Tensor):
            d.meta["example_value"] = ev.detach()
        d.meta["graphsurg_observed"] = name
        extra.append(d)
    if isinstance(orig, (tuple, list)):
        n_out = len(orig)
        values: Any = (*orig, *extra)
    else:
        n_out = -1  # a single, non-tuple output
        values = (orig, *extra)
    graph.output(values)
    new = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    copy_dynamo_metadata(gm, new, val_map)
    new.graph.lint()
    new.recompile()
    return new, n_out


def copy_dynamo_metadata(src: fx.GraphModule, dst: fx.GraphModule,
                         val_map: dict[fx.Node, fx.Node]) -> None:
    """Carry what Dynamo attached to ``src`` over to its copy ``dst``.

    aot_autograd recognises a Dynamo graph by ``gm.meta["dynamo_compile_id"]``,
    ``gm._param_name_to_source`` and each placeholder's ``_dynamo_source``; a copy without
    them is handled as an export graph and miscounts its inputs.
    """
    for k, v in vars(src).items():
        if k not in vars(dst):
            setattr(dst, k, v)
    dst.meta.update(src.meta)
    for old, new in val_map.items():
        if old.op == "placeholder" and hasattr(old, "_dynamo_source"):
            new._dynamo_source = old._dynamo_source  # type: ignore[attr-defined]


def _call(fn: CompiledFn, args: Sequence[Any]) -> Any:
    # Dynamo calls a backend's callable positionally; aot_autograd's result does take
    # positional args even though it carries ``_boxed_call`` (copied from what it wraps)
    return fn(*args)


def site_key(site: Any) -> tuple[str, ...]:
    return (site.module, site.producer, site.op, site.node)


class MonitoredCall:
    """The callable the backend hands back to Dynamo for one graph."""

    def __init__(self, sink: MonitorSink, record: GraphRecord, plain: CompiledFn | None,
                 observed: CompiledFn, n_out: int, n_extra: int, param_layer: dict[int, str],
                 weight_index: dict[str, int]) -> None:
        self.sink = sink
        self.record = record
        self.plain = plain
        self.observed = observed
        self.n_out = n_out
        self.n_extra = n_extra
        self.param_layer = param_layer
        self.weight_index = weight_index
        self.weight_params = set(weight_index.values())

    def __call__(self, *args: Any) -> Any:
        rec = self.record
        k = rec.calls
        rec.calls = k + 1
        sink = self.sink
        if self.plain is not None and (not sink.enabled or k % sink.every):
            return _call(self.plain, args)
        return self._measure(args)

    def _measure(self, args: Sequence[Any]) -> Any:
        rec = self.record
        rec.sampled += 1
        out = _call(self.observed, args)
        acts: Sequence[Any]
        if not self.n_extra:
            real, acts = out, ()
        elif self.n_out < 0:
            real, acts = out[0], out[1:]
        else:
            real, acts = out[: self.n_out], out[self.n_out:]
        for obs, a in zip(rec.observers, acts, strict=True):
            obs(a)
        for module, i in self.weight_index.items():
            self.sink.record_weight(module, args[i])
        for h in rec.pending:
            h.remove()
        rec.pending.clear()
        if torch.is_grad_enabled():
            for i, layer in self.param_layer.items():
                p = args[i]
                if isinstance(p, torch.Tensor) and p.requires_grad:
                    rec.pending.append(self._arm(p, layer, i in self.weight_params))
        return real

    def _arm(self, p: torch.Tensor, layer: str, step: bool) -> Any:
        sink = self.sink
        box: list[Any] = []

        def hook(g: torch.Tensor) -> None:
            sink.record_grad(layer, grad_sq_norms([g.detach()])[0], step)
            box[0].remove()  # one-shot: the next sampled call arms it again
            return None

        h = p.register_hook(hook)
        box.append(h)
        return h


def monitor_graph(sink: MonitorSink, gm: fx.GraphModule, example_inputs: Sequence[Any],
                  inner: Callable[[fx.GraphModule, Sequence[Any]], CompiledFn]
                  ) -> tuple[CompiledFn, GraphRecord]:
    """Compile ``gm`` with ``inner`` twice (plain and observed), wrap both for ``sink`` and
    register the graph with it (:meth:`MonitorSink.add_graph`). ``gm`` is not modified."""
    sites = find_dynamo_sites(gm)
    observers = [sink.observer(site_key(s), s) for s in sites.acts]
    for ls in sites.layers:
        sink.add_layer(ls.module, ls.kind, ls.next_modules)
    reason = getattr(gm, "compile_subgraph_reason", None)
    break_reason = None
    if reason is not None and getattr(reason, "graph_break", False):
        where = ""
        stack = getattr(reason, "user_stack", None) or []
        if stack:
            fr = stack[-1]
            where = f" at {fr.filename}:{fr.lineno}"
        break_reason = f"{str(reason.reason).splitlines()[0]}{where}"
    record = GraphRecord(-1, sites, observers, break_reason)
    layer_modules = {ls.module for ls in sites.layers}
    param_layer: dict[int, str] = {}
    for i, path in sites.params.items():
        owner = path.rsplit(".", 1)[0] if "." in path else ""
        if owner in layer_modules:
            param_layer[i] = owner
    weight_index = sites.weights
    if not sites.acts:  # nothing to observe here: one compilation, hooks on sampled calls
        fn = inner(gm, example_inputs)
        call = MonitoredCall(sink, record, fn, fn, 0, 0, param_layer, weight_index)
    else:
        ogm, n_out = observed_graph(gm, [s.node for s in sites.acts])
        plain = inner(gm, example_inputs) if sink.every != 1 else None
        observed = inner(ogm, example_inputs)
        call = MonitoredCall(sink, record, plain, observed, n_out, len(sites.acts),
                             param_layer, weight_index)
    record.index = sink.add_graph(record)
    return call, record


__all__ = ["GraphRecord", "MonitorSink", "MonitoredCall", "monitor_graph", "observed_graph",
           "site_key"]
