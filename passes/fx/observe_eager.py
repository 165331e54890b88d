"""Eager monitoring for models torch.compile cannot capture (DDP, FSDP2 on CPU/gloo).

``torch.compile(DDP(model))`` on CPU/gloo and ``torch.compile`` of an FSDP2
(``fully_shard``) model break inside the wrapper's forward and compile no graph, so the
graphsurg backend never sees one. :class:`CompiledOrEager` (what ``Monitor.compile``
returns) finds that out on the first call, warns once, and from then on runs the model
eagerly through :class:`EagerWatch`:

* on a sampled call, forward hooks on the activation and layer modules (installed for that
  call only: skipped calls run the bare model) collect each activation; after the forward,
  every site is reduced in one batched call (:func:`graphsurg.kernels.partial_sums_many`) and
  merged into the same packed statistics a compiled graph keeps (:class:`GraphRecord`);
* the gradients are read once backward has finished *and* the wrapper has reduced them (an
  autograd-engine final callback queued after the wrapper's own: DDP's averaged gradients,
  FSDP2's reduce-scattered shards), all in one multi-tensor call. A sharded gradient's
  squared norm is its shard's; ``Monitor.diagnose`` sums shards across ranks, which is exact.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from graphsurg.kernels import multi_grad_sq_norms, partial_sums_many
from torch import nn

from .capture import ActSite, activation_of_module, layer_kind_of_module
from .dynamo_sites import DynamoSites
from .observe_compiled import GraphRecord, MonitorSink, site_key, site_segments


class NoGraphWarning(UserWarning):
    """torch.compile captured no graph of the model: graphsurg monitors it eagerly."""


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a DDP wrapper (FSDP2 shards the module in place)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


class EagerWatch:
    """Runs ``model`` eagerly, measuring every ``sink.every``-th call with module hooks."""

    def __init__(self, sink: MonitorSink, model: nn.Module) -> None:
        self.sink = sink
        self.model = model
        inner = unwrap(model)
        self.acts: dict[str, Any] = {}
        self.layers: dict[str, tuple[str, nn.Module]] = {}
        for path, m in inner.named_modules():
            kind = layer_kind_of_module(m)
            if kind:
                self.layers[path] = (kind, m)
            else:
                act = activation_of_module(m)
                if act is not None:
                    self.acts[path] = (act, m)
        self.record = GraphRecord(-1, DynamoSites([], []), [])
        self.record.index = sink.add_graph(self.record)
        self.sites: list[str] = []  # activation module paths, in first-call order
        self.params: list[tuple[str, torch.Tensor, bool]] = []  # (layer, param, is weight)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        rec = self.record
        k = rec.calls
        rec.calls = k + 1
        sink = self.sink
        if not sink.enabled or k % sink.every:
            return self.model(*args, **kwargs)
        return self._measure(args, kwargs)

    def _measure(self, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
        rec = self.record
        rec.sampled += 1
        seen: dict[str, tuple[torch.Tensor, str]] = {}
        order: list[str] = []
        last = [""]

        calls: list[str] = []  # module calls in order, to find layer outputs no activation reads
        layer_out: dict[str, torch.Tensor] = {}

        def layer_hook(path: str) -> Callable[..., None]:
            def hook(mod: nn.Module, inp: object, out: object) -> None:
                last[0] = path
                calls.append(path)
                if path not in order:
                    order.append(path)
                if isinstance(out, torch.Tensor) and path not in layer_out:
                    layer_out[path] = out.detach()
            return hook

        def act_hook(path: str) -> Callable[..., None]:
            def hook(mod: nn.Module, inp: object, out: object) -> None:
                calls.append(path)
                if isinstance(out, torch.Tensor) and path not in seen:
                    seen[path] = (out.detach(), last[0])
            return hook

        handles = [m.register_forward_hook(layer_hook(p)) for p, (_, m) in self.layers.items()]
        handles += [m.register_forward_hook(act_hook(p)) for p, (_, m) in self.acts.items()]
        try:
            out = self.model(*args, **kwargs)
        finally:
            for h in handles:
                h.remove()
        # a layer whose output no activation module reads next is observed itself (the
        # compiled graphs' rule), under the address "<layer>:<layer>"
        for j, path in enumerate(calls):
            if path in self.layers and (j + 1 == len(calls) or calls[j + 1] not in self.acts) \
                    and path in layer_out and path not in seen:
                seen[path] = (layer_out[path], path)
        if not rec.observers and seen:
            self._setup(seen, order)
        xs = [seen.get(p, (None, ""))[0] for p in self.sites]
        if rec.segments and all(x is not None for x in xs):
            present = [x for x in xs if x is not None]  # all of them (checked above)
            seg_x = [present[s.observer] - s.centre if s.sat else present[s.observer]
                     for s in rec.segments]
            rec.accumulate(partial_sums_many(seg_x, [s.channel_dim for s in rec.segments],
                                             [s.sat_threshold for s in rec.segments]))
            if rec.rows_needed:
                rec.take_rows(xs)
        rec.weights = {p: w for p, (_, m) in self.layers.items()
                       if isinstance(w := getattr(m, "weight", None), torch.Tensor)}
        if torch.is_grad_enabled() and self.params:
            self._arm(out)
        return out

    def _setup(self, seen: dict[str, tuple[torch.Tensor, str]], order: list[str]) -> None:
        rec = self.record
        self.sites = list(seen)
        for i, path in enumerate(self.sites):
            x, prod = seen[path]
            conv = self.layers.get(prod, ("", None))[0].startswith("conv")
            if path in self.layers:  # a bare layer output
                kind = self.layers[path][0]
                site = ActSite(path, kind, "linear", path, 1 if conv else -1, i, path)
            else:
                act = self.acts[path][0]
                site = ActSite(path, act.name, act.family, prod, 1 if conv else -1, i, path,
                               act)
            rec.observers.append(self.sink.observer(site_key(site), site))
        rec.segments, _ = site_segments(rec.observers, [seen[p][0] for p in self.sites])
        for j, path in enumerate(order):
            nxt = order[j + 1: j + 2]
            self.sink.add_layer(path, self.layers[path][0], nxt)
        rec.layers = list(order)
        for path in order:
            m = self.layers[path][1]
            for name, p in m.named_parameters(recurse=False):
                if p.requires_grad:
                    self.params.append((path, p, name == "weight"))
        pos = {p: i for i, p in enumerate(rec.layers)}
        self.param_pos = torch.tensor([pos[lay] for lay, _, _ in self.params], dtype=torch.int64)
        steps = torch.zeros(len(rec.layers), dtype=torch.int64)
        for lay, _, w in self.params:
            if w:
                steps[pos[lay]] = 1
        self.step_mask = steps
        sampled = rec.sampled
        rec.reset()  # sizes the row samples for the observers just added
        rec.sampled = sampled

    def _arm(self, out: Any) -> None:
        t = next((o for o in (out if isinstance(out, (tuple, list)) else (out,))
                  if isinstance(o, torch.Tensor) and o.requires_grad), None)
        if t is None:
            return
        engine = torch.autograd.Variable._execution_engine  # type: ignore[attr-defined]

        def read() -> None:  # after every callback queued during backward (DDP, FSDP2)
            self._read_grads()

        def first(_: torch.Tensor) -> None:
            engine.queue_callback(lambda: engine.queue_callback(read))

        t.register_hook(first)

    def _read_grads(self) -> None:
        from torch.distributed.tensor import DTensor, Shard

        grads: list[torch.Tensor] = []
        keep: list[int] = []
        sharded = [False] * len(self.record.layers)
        pos = self.param_pos.tolist()
        for j, (_, p, _) in enumerate(self.params):
            g = p.grad
            if g is None:
                continue
            if isinstance(g, DTensor):
                if any(isinstance(pl, Shard) for pl in g.placements):
                    sharded[pos[j]] = True
                g = g.to_local()
            grads.append(g)
            keep.append(j)
        if not grads:
            return
        sq = multi_grad_sq_norms(grads)
        sel = torch.tensor(keep, dtype=torch.int64)
        index = self.param_pos.index_select(0, sel).to(sq.device)
        self.record.grad_sharded = sharded
        self.record.add_grads(sq, index, self.step_mask.to(sq.device))


class CompiledOrEager:
    """What ``Monitor.compile`` returns: the compiled model, or -- where torch compiled no
    graph of it on the first call -- the model run eagerly under :class:`EagerWatch`."""

    def __init__(self, sink: Any, model: nn.Module, compiled: Callable[..., Any]) -> None:
        self.sink = sink
        self.model = model
        self.compiled = compiled
        self.eager: EagerWatch | None = None
        self._checked = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.eager is not None:
            return self.eager(*args, **kwargs)
        if self._checked:
            return self.compiled(*args, **kwargs)
        before = len(self.sink.graphs)
        out = self.compiled(*args, **kwargs)
        self._checked = True
        if len(self.sink.graphs) == before:
            msg = (f"torch.compile captured no graph of {type(self.model).__name__} (Dynamo "
                   f"breaks inside its forward): graphsurg monitors it eagerly with module "
                   f"hooks from the second call on")
            notes = getattr(self.sink, "notes", None)
            if isinstance(notes, list) and msg not in notes:
                notes.append(msg)
                warnings.warn(msg, NoGraphWarning, stacklevel=2)
            self.eager = EagerWatch(self.sink, self.model)
        return out


__all__ = ["CompiledOrEager", "EagerWatch", "NoGraphWarning", "unwrap"]
