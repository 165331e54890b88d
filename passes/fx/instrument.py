"""Instrument a captured graph with observer nodes that stream activations into NeuronStats.

Each observer is a ``call_module`` node inserted right after its site; it reduces the value
with :func:`graphsurg.kernels.neuron_stats` (Triton on GPU, the tuned torch path on CPU) and
keeps no activations, except a bounded row sample per site for the effective rank. The
observers have no users: the graph's outputs are unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.fx as fx
from graphsurg.kernels import NeuronStats, neuron_stats
from torch import nn

from .capture import ActSite

# flat-region thresholds, applied to |y| (tanh, hardtanh) or |y - 1/2| (sigmoid-like)
_CENTERED = {"sigmoid": 0.5, "hardsigmoid": 0.5}


class Observer(nn.Module):
    """Streams one site's values into :class:`NeuronStats` (no grad, no stored activations)."""

    def __init__(self, site: ActSite, *, saturation_margin: float, sample_rows: int) -> None:
        super().__init__()
        self.site = site
        self.enabled = True
        self.stats: NeuronStats | None = None
        self.sat_stats: NeuronStats | None = None  # for sigmoid-like: stats of y - 1/2
        self.sample_rows = sample_rows
        self._sample: list[torch.Tensor] = []
        self._sampled = 0
        self.margin = saturation_margin
        self.error: str | None = None

    def sat_threshold(self) -> float | None:
        if self.site.family != "saturating":
            return None
        half = 0.5 if self.site.op in _CENTERED else 1.0
        return half - self.margin

    @torch.no_grad()
    def forward(self, x: object) -> None:
        if not self.enabled or not isinstance(x, torch.Tensor) or not x.is_floating_point():
            return None
        if x.dim() == 0:
            return None
        x = x.detach()
        cd = self.site.channel_dim if x.dim() > 1 else -1
        thr = self.sat_threshold()
        centered = self.site.op in _CENTERED
        try:
            s = neuron_stats(x, cd, sat_threshold=None if centered else thr)
            self.stats = s if self.stats is None else self.stats.merge(s)
            if centered and thr is not None:
                ss = neuron_stats(x - 0.5, cd, sat_threshold=thr)
                self.sat_stats = ss if self.sat_stats is None else self.sat_stats.merge(ss)
        except ValueError as e:  # e.g. a width change between batches: report, don't crash
            self.error = str(e)
            self.enabled = False
            return None
        if self._sampled < self.sample_rows:
            rows = x.movedim(cd, -1).reshape(-1, x.shape[cd])
            take = rows[: self.sample_rows - self._sampled].float().cpu()
            self._sample.append(take)
            self._sampled += take.shape[0]
        return None

    def sample(self) -> torch.Tensor | None:
        return torch.cat(self._sample) if self._sample else None

    def saturated_fraction(self) -> torch.Tensor | None:
        src = self.sat_stats if self.site.op in _CENTERED else self.stats
        if src is None or src.sat_threshold is None:
            return None
        return src.saturated_fraction


def instrument(gm: fx.GraphModule, sites: Iterable[ActSite], *, saturation_margin: float,
               sample_rows: int) -> list[Observer]:
    """Insert an observer after every site (in place on ``gm``, a private copy)."""
    by_name = {n.name: n for n in gm.graph.nodes}
    observers: list[Observer] = []
    for i, site in enumerate(sites):
        node = by_name[site.node]
        obs = Observer(site, saturation_margin=saturation_margin, sample_rows=sample_rows)
        name = f"_graphsurg_observer_{i}"
        gm.add_submodule(name, obs)
        with gm.graph.inserting_after(node):
            new = gm.graph.call_module(name, (node,))
        new.meta["graphsurg_observer"] = site.node
        observers.append(obs)
    gm.graph.lint()
    gm.recompile()
    return observers


def hook_observers(model: nn.Module, *, saturation_margin: float, sample_rows: int
                   ) -> tuple[list[Observer], list[torch.utils.hooks.RemovableHandle], list[str]]:
    """Fallback when no graph could be captured: forward hooks on activation and layer modules.

    The producer of an activation module is the last Linear/Conv that ran before it. Returns
    the observers (in first-call order), the hook handles (remove them when done) and the
    layer modules in first-call order.
    """
    from .capture import ACT_FAMILY, activation_name_of_module, layer_kind_of_module

    observers: dict[str, Observer] = {}
    order: list[Observer] = []
    layer_order: list[str] = []
    last_layer: list[tuple[str, str]] = [("", "")]
    handles = []

    def make_hook(path: str, act: str | None, kind: str | None):  # type: ignore[no-untyped-def]
        def hook(mod: nn.Module, inp: object, out: object) -> None:
            if kind is not None:
                last_layer[0] = (path, kind)
                if path not in layer_order:
                    layer_order.append(path)
                return
            assert act is not None
            if path not in observers:
                prod, pkind = last_layer[0]
                site = ActSite(path, act, ACT_FAMILY.get(act, "smooth"), prod,
                               1 if pkind.startswith("conv") else -1, len(observers), path)
                observers[path] = Observer(site, saturation_margin=saturation_margin,
                                           sample_rows=sample_rows)
                order.append(observers[path])
            observers[path](out)

        return hook

    for path, m in model.named_modules():
        kind = layer_kind_of_module(m)
        act = None if kind else activation_name_of_module(m)
        if kind or act:
            handles.append(m.register_forward_hook(make_hook(path, act, kind)))
    return order, handles, layer_order
