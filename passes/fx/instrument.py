"""Instrument a captured graph with observer nodes that stream activations into NeuronStats.

Each observer is a ``call_module`` node inserted right after its site; it reduces the value
with :func:`graphsurg.kernels.neuron_stats` (Triton on GPU, the tuned torch path on CPU) and
keeps no activations, except a bounded row sample per site for the effective rank. The
observers have no users: the graph's outputs are unchanged.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence

import torch
import torch.fx as fx
from graphsurg.kernels import NeuronStats, neuron_stats
from torch import nn

from graphsurg._activations import ACTIVATIONS, Activation
from graphsurg._measurements import LayerMeasure, Measurements, SiteMeasure

from .capture import ActSite


class Observer(nn.Module):
    """Streams one site's values into :class:`NeuronStats` (no grad, no stored activations)."""

    def __init__(self, site: ActSite, *, saturation_margin: float, sample_rows: int) -> None:
        super().__init__()
        self.site = site
        self.enabled = True
        self.stats: NeuronStats | None = None
        self.sat_stats: NeuronStats | None = None  # off-centre ranges: stats of y - centre
        self.sample_rows = sample_rows
        self._sample: list[torch.Tensor] = []
        self._sampled = 0
        self.margin = saturation_margin
        self.error: str | None = None
        act = site.activation or ACTIVATIONS.get(site.op)
        # (centre, threshold) of the flat region, from the activation's bounds: a value
        # saturates when |y - centre| >= threshold (graphsurg._activations.Activation)
        self.saturation = (act.saturation(saturation_margin)
                           if act is not None and site.family == "saturating" else None)

    def sat_threshold(self) -> float | None:
        return self.saturation[1] if self.saturation is not None else None

    @property
    def _centre(self) -> float:
        return self.saturation[0] if self.saturation is not None else 0.0

    @torch.no_grad()
    def forward(self, x: object) -> None:
        if not self.enabled or not isinstance(x, torch.Tensor) or not x.is_floating_point():
            return None
        if x.dim() == 0:
            return None
        x = x.detach()
        cd = self.site.channel_dim if x.dim() > 1 else -1
        thr = self.sat_threshold()
        centre = self._centre
        try:
            s = neuron_stats(x, cd, sat_threshold=thr if centre == 0.0 else None)
            self.stats = s if self.stats is None else self.stats.merge(s)
            if centre != 0.0 and thr is not None:
                ss = neuron_stats(x - centre, cd, sat_threshold=thr)
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

    def reset(self) -> None:
        """Forget the statistics, the row sample and a stopping error (measure again)."""
        self.stats = None
        self.sat_stats = None
        self._sample = []
        self._sampled = 0
        self.error = None
        self.enabled = True

    def set_sample(self, rows: torch.Tensor | None) -> None:
        """Replace the row sample with ``rows`` (``(n, C)``; at most ``sample_rows`` kept)."""
        if rows is None or rows.numel() == 0:
            self._sample, self._sampled = [], 0
            return
        rows = rows[: self.sample_rows]
        self._sample, self._sampled = [rows], int(rows.shape[0])

    def saturated_fraction(self) -> torch.Tensor | None:
        src = self.sat_stats if self._centre != 0.0 else self.stats
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
    from .capture import activation_of_module, layer_kind_of_module

    observers: dict[str, Observer] = {}
    order: list[Observer] = []
    layer_order: list[str] = []
    last_layer: list[tuple[str, str]] = [("", "")]
    handles = []

    def make_hook(path: str, act: Activation | None, kind: str | None):  # type: ignore[no-untyped-def]
        def hook(mod: nn.Module, inp: object, out: object) -> None:
            if kind is not None:
                last_layer[0] = (path, kind)
                if path not in layer_order:
                    layer_order.append(path)
                return
            assert act is not None
            if path not in observers:
                prod, pkind = last_layer[0]
                site = ActSite(path, act.name, act.family, prod,
                               1 if pkind.startswith("conv") else -1, len(observers), path, act)
                observers[path] = Observer(site, saturation_margin=saturation_margin,
                                           sample_rows=sample_rows)
                order.append(observers[path])
            observers[path](out)

        return hook

    for path, m in model.named_modules():
        kind = layer_kind_of_module(m)
        act = None if kind else activation_of_module(m)
        if kind or act:
            handles.append(m.register_forward_hook(make_hook(path, act, kind)))
    return order, handles, layer_order


#: a parametrised layer as the torch adapter found it: (module path, kind, weight, next layers)
LayerEntry = tuple[str, str, torch.Tensor, list[str]]


def measurements_from(observers: Sequence[Observer], layers: Sequence[LayerEntry], *,
                      grad_sq: Mapping[str, float], grad_nonfinite: Collection[str],
                      n_batches: int, gradients: bool, input_nonfinite: int = 0,
                      capture: str = "", notes: Sequence[str] = ()) -> Measurements:
    """The :class:`Measurements` (``ir="torch"``) of filled observers and layers.

    ``grad_sq[path]`` is the layer's squared gradient norm summed over ``n_batches`` (the
    layer's ``grad_sq`` is its mean); sites whose observer saw no value are left out, and an
    observer that stopped on an error adds a note naming its node. Used by the torch adapter's
    ``observe`` and by the compiled-graph monitor.
    """
    sites = []
    for k, o in enumerate(observers):
        if o.stats is None:
            continue
        sites.append(SiteMeasure(
            module=o.site.producer or o.site.module, node=o.site.node, op=o.site.op,
            family=o.site.family, order=k, stats=o.stats,
            saturated_fraction=o.saturated_fraction(), sample=o.sample(),
            channel_dim=o.site.channel_dim, partner=o.site.partner, role=o.site.role))
    out_layers = []
    for k, (path, kind, w, nxt) in enumerate(layers):
        g = grad_sq.get(path)
        out_layers.append(LayerMeasure(
            module=path, kind=kind, order=k, d_in=int(w.shape[1]) if w.dim() > 1 else 1,
            d_out=int(w.shape[0]), weight=w.detach(),
            grad_sq=(g / n_batches) if (g is not None and n_batches) else None,
            grad_nonfinite=path in grad_nonfinite, next_modules=list(nxt)))
    all_notes = list(notes) + [f"site {o.site.node}: {o.error}" for o in observers if o.error]
    if gradients and not out_layers:
        all_notes.append("gradients measured on no layer: no parametrised layer (linear, conv, "
                         "addmm/matmul/einsum with a parameter) was recognised in the graph")
    return Measurements(sites=sites, layers=out_layers, gradients=gradients,
                        input_nonfinite=input_nonfinite, ir="torch", batches=n_batches,
                        capture=capture, notes=all_notes)
