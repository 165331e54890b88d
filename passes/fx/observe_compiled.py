"""Monitor one Dynamo graph: statistics of every site in one batch, gradient norms in one call.

The backend compiles two variants of each Dynamo graph with the inner backend:

* the *plain* graph, unchanged -- what every skipped call runs, so a skipped call costs a
  counter increment and nothing else;
* the *observed* graph. With ``inner="inductor"`` (or CUDA inputs) it computes every site's
  raw sums *inside the graph* (plain torch ops after the producer, so inductor fuses them
  with it) and returns them for all sites as ONE extra ``(9, sum of widths)`` output built
  by one ``cat`` of every site's rows (:func:`graphsurg.kernels._multi_stats.
  packed_partial_sums`: inductor's wrapper allocates that one buffer and the reductions
  write into its slices; float32 where every value is exact in float32); with other inner
  backends on CPU it returns a detached alias of each site (no copy) and the wrapper reduces
  all of them in one batched call of the C kernel
  (:func:`graphsurg.kernels.partial_sums_many`).

Either way a sampled call keeps the sums (on CPU the output tensor itself, no tensor op);
the graph merges K calls' sums at once and before any read
(:func:`graphsurg.kernels._multi_stats.merge_sums_many`, then one exact Chan merge,
:func:`graphsurg.kernels.merge_packed`). It arms one hook on the compiled function's
backward node: when backward has produced the gradients of every parameter of the graph,
the hook reduces them all in one call (:func:`graphsurg.kernels.multi_grad_sq_norms`: one
C loop on CPU) and adds them with one ``+=``; they reach their layers (one ``index_add``)
when read. (Where the inner backend leaves no such node -- ``inner="eager"`` -- one-shot
gradient hooks per parameter do the same.) Per-site :class:`NeuronStats` are built only when
someone reads them (:meth:`GraphRecord.site_stats`).

Statistics stay on the device; nothing is synchronised with the host on a sampled step
except the bounded row sample each site keeps for the effective rank.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
import torch.fx as fx
from graphsurg.kernels import (
    NeuronStats,
    merge_packed,
    multi_grad_sq_norms,
    packed_to_stats,
    partial_sums_many,
)
from graphsurg.kernels._multi_stats import merge_sums_many, packed_partial_sums

from .dynamo_sites import DynamoSites, find_dynamo_sites
from .instrument import Observer

CompiledFn = Callable[..., Any]

#: sampled calls whose sums a graph keeps before merging them (at most, and at most
#: ``_MERGE_BYTES`` of them): the exact merge then runs once per K calls
_MERGE_CALLS = 64
_MERGE_BYTES = 4 << 20


@runtime_checkable
class MonitorSink(Protocol):
    """Where the graphs compiled by the graphsurg backend report what they measure.

    ``graphsurg.Monitor`` implements it; the backend accepts any object that does
    (``options={"monitor": sink}``). :func:`monitor_graph` calls, per compiled graph,
    :meth:`add_graph` once, :meth:`observer` per activation site and :meth:`add_layer` per
    parametrised layer. What the graph measures accumulates in its :class:`GraphRecord`
    (on the device, batched across sites); read it with :meth:`GraphRecord.site_stats`,
    :meth:`GraphRecord.grad_totals` and :attr:`GraphRecord.weights`.

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
        graph: return the same observer for the same key, so the records' statistics of one
        site can be merged into it when read."""
        ...

    def add_layer(self, module: str, kind: str, next_modules: list[str]) -> None:
        """A parametrised layer (``kind`` "linear"/"conv") and the layers reading it."""
        ...


@dataclass
class Segment:
    """The columns of one site (or of its centred copy, for saturation) in packed statistics."""

    observer: int  # index into GraphRecord.observers
    sat: bool  # True: statistics of (x - centre), read only for the saturated fraction
    offset: int
    width: int
    channel_dim: int
    sat_threshold: float | None
    centre: float
    dtype: torch.dtype  # accumulation dtype of the site's statistics


@dataclass
class GraphRecord:
    """One graph the monitor watches and what it accumulated (on the device).

    ``stats`` is the packed ``(8, C_total)`` float64 statistics of every site
    (:data:`graphsurg.kernels.PACKED_ROWS`, columns per :class:`Segment`); ``grad_sq`` /
    ``grad_steps`` hold, per entry of ``layers``, the summed squared gradient norm and the
    number of measured steps.
    """

    index: int  # its place among the sink's graphs (set by MonitorSink.add_graph)
    sites: DynamoSites
    observers: list[Observer]
    break_reason: str | None = None  # why Dynamo ended this graph, when a graph break did
    calls: int = 0
    sampled: int = 0
    pending: list[Any] = field(default_factory=list)  # gradient hooks not fired yet
    segments: list[Segment] = field(default_factory=list)
    stats: torch.Tensor | None = None
    rows: list[list[torch.Tensor]] = field(default_factory=list)
    rows_taken: list[int] = field(default_factory=list)
    rows_needed: bool = True
    layers: list[str] = field(default_factory=list)
    grad_sq: torch.Tensor | None = None
    grad_steps: torch.Tensor | None = None
    grad_sharded: list[bool] = field(default_factory=list)
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    # sums of the sampled calls not merged into ``stats`` yet: ``(K, 9, C_total)``, the
    # first ``n_sums`` rows filled (merged K at a time, and before any read)
    sums: torch.Tensor | None = None
    n_sums: int = 0
    kept: list[torch.Tensor] = field(default_factory=list)  # the same, on CPU: the tensors
    work: torch.Tensor | None = None  # float64 workspace the kept sums are merged in
    work32: torch.Tensor | None = None  # and where float32 sums are stacked first
    # squared norms of every gradient summed over the calls that had all of them, and how
    # many calls that was (added to their layers, ``param_layer``/``param_steps``, on read)
    param_sq: torch.Tensor | None = None
    param_calls: int = 0
    param_layer: torch.Tensor | None = None
    param_steps: torch.Tensor | None = None

    def accumulate(self, sums: torch.Tensor) -> None:
        """Keep the ``(9, C_total)`` raw sums of one call (float64, or float32 where every
        value is exact in float32: the graph's own sums); they are merged into :attr:`stats`
        ``K`` calls at a time (:meth:`flush`), so a sampled call pays no exact merge. On CPU
        the call's own sums tensor is kept (a fresh output every call: no tensor op); on a
        GPU it is copied into a buffer (a CUDA-graph replay may overwrite its outputs)."""
        if not sums.is_cuda:
            kept = self.kept
            if kept and kept[0].shape != sums.shape:
                self.flush()
            kept.append(sums)
            if len(kept) >= self.keep_calls(sums):
                self.flush()
            return
        buf = self.sums
        if buf is None or buf.shape[1:] != sums.shape or buf.device != sums.device:
            self.flush()
            buf = self.sums = torch.empty((self.keep_calls(sums), *sums.shape),
                                          dtype=torch.float64, device=sums.device)
        buf[self.n_sums].copy_(sums)
        self.n_sums += 1
        if self.n_sums == buf.shape[0]:
            self.flush()

    @staticmethod
    def keep_calls(sums: torch.Tensor) -> int:
        """K: how many calls' sums are kept before they are merged."""
        return max(1, min(_MERGE_CALLS, _MERGE_BYTES // max(1, 8 * sums.numel())))

    def flush(self) -> None:
        """Merge the kept sums into :attr:`stats` and the kept gradient norms into
        :attr:`grad_sq` (exact; called before every read)."""
        if self.kept:
            kept, self.kept = self.kept, []
            # stacked into a float64 workspace kept from flush to flush (no allocation of
            # the data's size, hence no page faults), merged in place
            # (float32 sums are stacked in float32 first: a stack into another dtype
            # converts tensor by tensor)
            n, dt = len(kept), kept[0].dtype
            work = self.work
            if work is None or work.shape[0] < n or work.shape[1:] != kept[0].shape:
                k = max(n, self.keep_calls(kept[0]))
                work = self.work = torch.empty((k, *kept[0].shape), dtype=torch.float64)
                self.work32 = None
            if dt == torch.float32 and all(t.dtype == dt for t in kept):
                w32 = self.work32
                if w32 is None or w32.shape != work.shape:
                    w32 = self.work32 = torch.empty(work.shape, dtype=torch.float32)
                sums = work[:n].copy_(torch.stack(kept, out=w32[:n]))
            else:
                sums = torch.stack(kept, out=work[:n])
            self.stats = merge_packed(self.stats, merge_sums_many(sums, scratch=True))
        if self.n_sums and self.sums is not None:
            self.stats = merge_packed(self.stats, merge_sums_many(self.sums[: self.n_sums]))
            self.n_sums = 0
        if self.param_calls and self.param_sq is not None:
            assert self.param_layer is not None and self.param_steps is not None
            sq, dev = self.param_sq, self.param_sq.device
            self.param_sq, self.param_calls, calls = None, 0, self.param_calls
            self.add_grads(sq, self.param_layer.to(dev), self.param_steps.to(dev) * calls)

    def add_all_grads(self, sq: torch.Tensor) -> None:
        """Add the squared norms of every gradient of one call (``param_layer`` order)."""
        if self.param_sq is not None and self.param_sq.device != sq.device:
            self.flush()  # (a merge with the kept sums only when the device changes)
        if self.param_sq is None:
            self.param_sq = torch.zeros_like(sq, dtype=torch.float64)
        self.param_sq += sq
        self.param_calls += 1

    def add_grads(self, sq: torch.Tensor, layer_index: torch.Tensor,
                  step_mask: torch.Tensor) -> None:
        """Add squared norms ``sq`` (one per gradient) to their layers ``layer_index``."""
        n = len(self.layers)
        if self.grad_sq is None or self.grad_sq.device != sq.device:
            self.grad_sq = torch.zeros(n, dtype=torch.float64, device=sq.device)
            self.grad_steps = torch.zeros(n, dtype=torch.int64, device=sq.device)
        assert self.grad_steps is not None
        self.grad_sq.index_add_(0, layer_index, sq)
        self.grad_steps += step_mask

    def take_rows(self, acts: Sequence[Any]) -> None:
        """Keep up to ``sample_rows`` rows of each site (for the effective rank)."""
        more = False
        for i, (o, x) in enumerate(zip(self.observers, acts, strict=True)):
            left = o.sample_rows - self.rows_taken[i]
            if left <= 0 or not isinstance(x, torch.Tensor) or x.dim() < 1:
                continue
            cd = o.site.channel_dim if x.dim() > 1 else -1
            r = x.detach().movedim(cd, -1).reshape(-1, x.shape[cd])[:left].float().cpu()
            self.rows[i].append(r)
            self.rows_taken[i] += int(r.shape[0])
            more = more or self.rows_taken[i] < o.sample_rows
        self.rows_needed = more

    def site_stats(self) -> list[tuple[Observer, NeuronStats | None, NeuronStats | None,
                                       torch.Tensor | None]]:
        """Per observer: its statistics, the statistics of ``x - centre`` (saturating sites
        off zero), and its row sample -- built from the packed statistics (read time)."""
        self.flush()
        out: dict[int, list[Any]] = {i: [o, None, None, None]
                                     for i, o in enumerate(self.observers)}
        if self.stats is not None:
            for seg in self.segments:
                cols = self.stats[:, seg.offset: seg.offset + seg.width]
                s = packed_to_stats(cols, seg.dtype, seg.sat_threshold)
                out[seg.observer][2 if seg.sat else 1] = s
        for i, rows in enumerate(self.rows):
            if rows:
                out[i][3] = torch.cat(rows)
        return [tuple(v) for v in out.values()]  # type: ignore[misc]

    def grad_totals(self) -> dict[str, tuple[torch.Tensor, int, bool]]:
        """Per layer: summed squared gradient norm (0-d float64), measured steps, and
        whether its gradients were shards of a sharded parameter (sum across ranks)."""
        self.flush()
        if self.grad_sq is None or self.grad_steps is None:
            return {}
        steps = self.grad_steps.tolist()
        sharded = self.grad_sharded or [False] * len(self.layers)
        return {layer: (self.grad_sq[i], int(steps[i]), sharded[i])
                for i, layer in enumerate(self.layers) if steps[i]}

    def reset(self) -> None:
        self.sampled = 0
        self.stats = None
        self.n_sums = 0
        self.kept = []
        self.param_sq = None
        self.param_calls = 0
        self.rows = [[] for _ in self.observers]
        self.rows_taken = [0] * len(self.observers)
        self.rows_needed = any(o.sample_rows > 0 for o in self.observers)
        self.grad_sq = None
        self.grad_steps = None


def site_segments(observers: Sequence[Observer], examples: Sequence[Any]
                  ) -> tuple[list[Segment], list[int]]:
    """The packed columns of each observed site, and the indices of the sites measured
    (floating-point values with at least one dimension and a known width)."""
    from graphsurg.kernels._stats import acc_dtype

    segs: list[Segment] = []
    used: list[int] = []
    off = 0
    for i, (o, ev) in enumerate(zip(observers, examples, strict=True)):
        if not isinstance(ev, torch.Tensor) or not ev.is_floating_point() or ev.dim() == 0:
            continue
        cd = (o.site.channel_dim if ev.dim() > 1 else -1) % ev.dim()
        width = ev.shape[cd]
        if not isinstance(width, int) or width <= 0:
            continue
        centre, thr = o.saturation if o.saturation is not None else (0.0, None)
        dt = acc_dtype(ev.dtype)
        segs.append(Segment(i, False, off, width, cd, thr if centre == 0.0 else None, 0.0, dt))
        off += width
        if centre != 0.0 and thr is not None:
            segs.append(Segment(i, True, off, width, cd, thr, centre, dt))
            off += width
        used.append(i)
    return segs, used


def _packed_site_sums(xs: Sequence[torch.Tensor], centres: Sequence[float],
                      channel_dims: Sequence[int], sat_thresholds: Sequence[float | None]
                      ) -> torch.Tensor:
    """The ``(9, C_total)`` sums of every segment, laid out by one ``cat`` of every
    segment's rows (:func:`graphsurg.kernels._multi_stats.packed_partial_sums`: inductor
    writes each row into its slice of the one output buffer)."""
    ys = [x.detach() - c if c != 0.0 else x.detach()
          for x, c in zip(xs, centres, strict=True)]
    return packed_partial_sums(ys, channel_dims, sat_thresholds)


def _first_rows(x: torch.Tensor, channel_dim: int, n: int) -> torch.Tensor:
    """A copy of the first ``n`` rows of ``x`` as ``(rows, C)`` (traceable)."""
    x = x.detach()
    if x.dim() < 1 or not x.is_floating_point():
        return x.new_zeros((0, 1), dtype=torch.float32)
    cd = channel_dim % x.dim() if x.dim() > 1 else 0
    return x.movedim(cd, -1).reshape(-1, x.shape[cd])[:n].clone()


def _no_rows(x: torch.Tensor) -> torch.Tensor:
    """An empty placeholder for the rows of a site the graph returns anyway (traceable)."""
    return x.new_zeros((0, 1), dtype=torch.float32)


def _output_position(orig: Any, node: fx.Node) -> int | None:
    """Where ``node`` is among the graph's original outputs (-1: it is the single output)."""
    if isinstance(orig, (tuple, list)):
        for j, o in enumerate(orig):
            if o is node:
                return j
        return None
    return -1 if orig is node else None


def observed_graph(gm: fx.GraphModule, nodes: Sequence[str],
                   segments: Sequence[Segment] | None = None,
                   sample_rows: int | None = None,
                   row_outputs: dict[int, int] | None = None) -> tuple[fx.GraphModule, int]:
    """A copy of ``gm`` that also returns a detached alias of each node in ``nodes``.

    With ``segments``, it first returns one more output: the ``(9, C_total)`` raw sums of
    every segment (:func:`graphsurg.kernels.partial_sums`, computed in the graph), then the
    aliases -- or, with ``sample_rows`` too, a copy of each site's first ``sample_rows`` rows
    instead of an alias. Returns the new graph module and the number of original outputs (-1: a single
    non-tuple output). ``gm`` is unchanged.

    ``row_outputs`` (with ``sample_rows``): filled with the sites that are themselves outputs
    of the graph (site index -> output position, -1: the single output); their extra output
    is an empty ``(0, C)`` tensor and the rows are read from the output (no copy per call).
    """
    graph = fx.Graph()
    val_map: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(gm.graph, val_map, return_output_node=True)
    assert isinstance(out, tuple)
    orig = out[0]  # the copied output value; the output node itself is not copied
    by_name = {n.name: n for n in gm.graph.nodes}
    extra: list[fx.Node] = []
    if segments:
        extra.append(graph.call_function(_packed_site_sums, (
            [val_map[by_name[nodes[s.observer]]] for s in segments],
            [s.centre if s.sat else 0.0 for s in segments],
            [s.channel_dim for s in segments], [s.sat_threshold for s in segments])))
    for k, name in enumerate(nodes):
        src = val_map[by_name[name]]
        if segments and sample_rows is not None:
            # no alias of an intermediate (aot_autograd regenerates those on every call):
            # a copy of the first rows, for the row sample -- or, for a site the graph
            # returns anyway, nothing (the caller reads the output)
            cd = next((s.channel_dim for s in segments if s.observer == k), -1)
            pos = _output_position(orig, src) if row_outputs is not None else None
            if pos is not None:
                assert row_outputs is not None
                row_outputs[k] = pos
                extra.append(graph.call_function(_no_rows, (src,)))
                continue
            extra.append(graph.call_function(_first_rows, (src, cd, sample_rows)))
            continue
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


def _backward_node(out: Any, n_args: int, checked: bool = False) -> Any:
    """The autograd node of the compiled function that produced ``out``, when it takes the
    graph's inputs one for one (aot_autograd's ``CompiledFunctionBackward``), else None.
    ``checked``: a node of this compiled function passed that test before (its inputs do
    not change from call to call), only its type is checked."""
    for t in out if isinstance(out, (tuple, list)) else (out,):
        if isinstance(t, torch.Tensor) and t.grad_fn is not None:
            node = t.grad_fn
            if type(node).__name__ == "CompiledFunctionBackward" and \
                    (checked or len(node.next_functions) == n_args):
                return node
            return None
    return None


class MonitoredCall:
    """The callable the backend hands back to Dynamo for one graph."""

    def __init__(self, sink: MonitorSink, record: GraphRecord, plain: CompiledFn | None,
                 observed: CompiledFn, n_out: int, n_extra: int, param_layer: dict[int, str],
                 weight_index: dict[str, int], *, in_graph: bool = False) -> None:
        self.sink = sink
        self.record = record
        self.plain = plain
        self.observed = observed
        self.n_out = n_out
        self.n_extra = n_extra
        self.in_graph = in_graph
        self.weight_index = weight_index
        record.layers = sorted(set(param_layer.values()), key=list(param_layer.values()).index)
        pos = {layer: i for i, layer in enumerate(record.layers)}
        weight_params = set(weight_index.values())
        self.param_idx = list(param_layer)
        self.param_pos = torch.tensor([pos[param_layer[i]] for i in self.param_idx],
                                      dtype=torch.int64)
        steps = torch.zeros(len(record.layers), dtype=torch.int64)
        for i in self.param_idx:
            if i in weight_params:
                steps[pos[param_layer[i]]] = 1
        self.step_mask = steps
        record.param_layer, record.param_steps = self.param_pos, steps
        self._dev: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._node_checked = False  # a backward node of this function matched the inputs
        #: sites that are also outputs of the graph: their rows are read from the output
        #: (site index -> output position, -1: the single output), not copied by the graph
        self.row_outputs: dict[int, int] = {}
        record.reset()

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
        extra: Sequence[Any]
        if not self.n_extra:
            real, extra = out, ()
        elif self.n_out < 0:
            real, extra = out[0], out[1:]
        else:
            real, extra = out[: self.n_out], out[self.n_out:]
        if rec.segments:
            if self.in_graph:
                rec.accumulate(extra[0])
                acts = extra[1:]
            else:
                acts = extra
                xs = [acts[s.observer].detach() - s.centre if s.sat else acts[s.observer]
                      for s in rec.segments]
                rec.accumulate(partial_sums_many(
                    xs, [s.channel_dim for s in rec.segments],
                    [s.sat_threshold for s in rec.segments]))
            if rec.rows_needed:
                if self.row_outputs:
                    acts = list(acts)
                    for k, j in self.row_outputs.items():
                        acts[k] = (real if j < 0 else real[j]).detach().clone()
                rec.take_rows(acts)
        rec.weights = {m: args[i] for m, i in self.weight_index.items()}
        if rec.pending:
            for h in rec.pending:
                h.remove()
            rec.pending.clear()
        if self.param_idx and torch.is_grad_enabled():
            self._arm(real, args)
        return real

    def _layer_tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        t = self._dev.get(device)
        if t is None:
            t = self._dev[device] = (self.param_pos.to(device), self.step_mask.to(device))
        return t

    def _reduce(self, grads: Sequence[Any]) -> None:
        """Squared norms of this step's parameter gradients (``grads[j]`` of parameter
        ``param_idx[j]``, None where none arrived), in one multi-tensor call."""
        if all(g is not None for g in grads):  # every gradient: one call and one add
            self.record.add_all_grads(multi_grad_sq_norms(grads))
            return
        have = [j for j, g in enumerate(grads) if g is not None]
        if not have:
            return
        sq = multi_grad_sq_norms([grads[j] for j in have])
        pos, steps = self._layer_tensors(sq.device)
        sel = torch.tensor(have, dtype=torch.int64, device=sq.device)
        pos = pos.index_select(0, sel)
        steps = torch.zeros_like(steps)
        steps[pos] = self.step_mask.to(sq.device).index_select(0, pos)
        self.record.add_grads(sq, pos, steps)

    def _post(self, grad_inputs: Sequence[Any], grad_outputs: Sequence[Any]) -> None:
        """The one-shot hook on the compiled backward node (armed by :meth:`_arm`)."""
        rec = self.record
        if rec.pending:
            rec.pending.pop().remove()  # one-shot: the next sampled call arms it again
        self._reduce([grad_inputs[i] for i in self.param_idx])

    def _arm(self, out: Any, args: Sequence[Any]) -> None:
        rec = self.record
        idx = self.param_idx
        for i in idx:
            a = args[i]
            if isinstance(a, torch.Tensor) and a.requires_grad:
                break
        else:
            return
        node = _backward_node(out, len(args), self._node_checked)
        if node is not None:
            self._node_checked = True
            rec.pending.append(node.register_hook(self._post))
            return
        # no compiled backward node (inner="eager"): one-shot hooks, reduced when all fired
        got: list[Any] = [None] * len(idx)
        live = [j for j, i in enumerate(idx)
                if isinstance(args[i], torch.Tensor) and args[i].requires_grad]
        left = [len(live)]
        for j in live:
            p = args[idx[j]]
            box2: list[Any] = []

            def hook(g: torch.Tensor, j: int = j, box2: list[Any] = box2) -> None:
                box2[0].remove()
                got[j] = g.detach()
                left[0] -= 1
                if left[0] == 0:
                    self._reduce(got)

            h = p.register_hook(hook)
            box2.append(h)
            rec.pending.append(h)


def _in_graph(inner: Any, example_inputs: Sequence[Any]) -> bool:
    """Statistics inside the graph where a fusing compiler lowers it (inductor) or the data
    is on a GPU; on CPU with other inner backends the batched C kernel reads the aliases."""
    if inner is None or inner == "inductor" or getattr(inner, "__name__", "") == "inductor":
        return True
    return any(isinstance(t, torch.Tensor) and t.is_cuda for t in example_inputs)


def monitor_graph(sink: MonitorSink, gm: fx.GraphModule, example_inputs: Sequence[Any],
                  inner: Callable[[fx.GraphModule, Sequence[Any]], CompiledFn], *,
                  in_graph: bool | None = None) -> tuple[CompiledFn, GraphRecord]:
    """Compile ``gm`` with ``inner`` twice (plain and observed), wrap both for ``sink`` and
    register the graph with it (:meth:`MonitorSink.add_graph`). ``gm`` is not modified.

    ``in_graph``: compute the statistics inside the observed graph (default: with inductor
    or CUDA inputs, see :func:`_in_graph`)."""
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
    by_name = {n.name: n for n in gm.graph.nodes}
    examples = [by_name[s.node].meta.get("example_value") for s in sites.acts]
    segments, _ = site_segments(observers, examples)
    record = GraphRecord(-1, sites, observers, break_reason, segments=segments)
    layer_modules = {ls.module for ls in sites.layers}
    param_layer: dict[int, str] = {}
    for i, path in sites.params.items():
        owner = path.rsplit(".", 1)[0] if "." in path else ""
        if owner in layer_modules:
            param_layer[i] = owner
    weight_index = sites.weights
    graph_stats = _in_graph(inner, example_inputs) if in_graph is None else in_graph
    if not sites.acts:  # nothing to observe here: one compilation, gradients on sampled calls
        fn = inner(gm, example_inputs)
        call = MonitoredCall(sink, record, fn, fn, 0, 0, param_layer, weight_index)
    else:
        nodes = [s.node for s in sites.acts]
        use_graph = graph_stats and bool(segments)
        rows = max((o.sample_rows for o in observers), default=0)
        row_outputs: dict[int, int] = {}
        ogm, n_out = observed_graph(gm, nodes, segments if use_graph else None,
                                    rows if use_graph else None, row_outputs)
        plain = inner(gm, example_inputs) if sink.every != 1 else None
        observed = inner(ogm, example_inputs)
        call = MonitoredCall(sink, record, plain, observed, n_out,
                             len(nodes) + (1 if use_graph else 0), param_layer, weight_index,
                             in_graph=use_graph)
        call.row_outputs = row_outputs
    record.index = sink.add_graph(record)
    return call, record


__all__ = ["GraphRecord", "MonitorSink", "MonitoredCall", "Segment", "monitor_graph",
           "observed_graph", "site_key", "site_segments"]
