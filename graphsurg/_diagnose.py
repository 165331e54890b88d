"""``gs.diagnose``: capture, instrument, stream the data through, detect."""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ._config import DiagnoseConfig
from ._data import InputFn, batch_tensors, compute_loss, default_input_fn, iter_batches, run_model
from ._errors import BadInputError
from ._problems import Diagnosis, LayerReport, Site
from .detect import LayerMeasure, Measurements, SiteMeasure, detect_all
from .detect.dead import unit_flags
from .kernels import grad_sq_norms


def diagnose(
    model: nn.Module,
    data: Iterable[Any],
    *,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    config: DiagnoseConfig | None = None,
    input_fn: InputFn | None = None,
    val_data: Iterable[Any] | None = None,
) -> Diagnosis:
    """Measure every neuron and layer of ``model`` on ``data`` and name each problem found.

    Args:
        model: any ``nn.Module`` that runs in eager mode. It is not modified: parameters,
            buffers (BatchNorm running statistics included), training mode and
            ``requires_grad`` flags are as before, and no hooks are left behind -- graphsurg
            works on a private copy.
        data: an iterable of batches (tensors, ``(inputs, targets)`` tuples, dicts of keyword
            arguments; a DataLoader works). At most ``config.max_batches`` are used.
        loss_fn: ``loss_fn(output, batch) -> scalar``; with it, parameter gradients are
            measured after backward and the gradient detectors run; without it they are
            skipped and the diagnosis says so.
        config: thresholds (:class:`DiagnoseConfig`).
        input_fn: ``input_fn(batch) -> (args, kwargs)`` to override how a batch is fed.
        val_data: held-out batches (needs ``loss_fn``): the train and held-out losses are
            measured in eval mode and an ``Overfitting`` problem is raised when they differ
            by more than ``config.overfit_gap`` (see ``graphsurg.detect.overfitting``).

    Returns:
        A :class:`Diagnosis` whose problems are in forward order.

    Raises:
        BadInputError: empty data, a batch the model rejects, a failing ``loss_fn``.

    Example:
        >>> d = gs.diagnose(model, [(x, y)], loss_fn=lambda out, b: F.mse_loss(out, b[1]))
        >>> print(d.summary())
    """
    from graphsurg.passes.fx.capture import capture, find_sites, layer_kind_of_module
    from graphsurg.passes.fx.instrument import Observer, hook_observers, instrument

    if not isinstance(model, nn.Module):
        raise BadInputError(
            f"model must be a torch.nn.Module, got {type(model).__name__}"
        )
    config = config or DiagnoseConfig()
    notes: list[str] = []
    work = copy.deepcopy(model)
    mode = "training" if work.training else "eval"
    notes.append(f"measured in {mode} mode (the model's own)")

    observers: list[Observer] = []
    handles: list[Any] = []
    layer_modules: list[tuple[str, str, torch.Tensor, list[str]]] = []  # (path, kind, weight, next)
    runner: Callable[..., Any] = work
    method = ""
    n_batches = 0
    input_nonfinite = 0
    grad_sq: dict[str, float] = {}
    grad_nonfinite: set[str] = set()
    param_layer: dict[str, str] = {}
    params: list[tuple[str, torch.nn.Parameter]] = []

    progress = _Progress(config)
    seen: list[Any] = []
    try:
        for i, batch in enumerate(iter_batches(data, config.max_batches)):
            for t in batch_tensors(batch):
                bad = int((~torch.isfinite(t)).sum())
                input_nonfinite += bad
            if i == 0:
                args, kwargs = (input_fn or default_input_fn)(batch)
                # a batch the model rejects fails capture, then the first run of the
                # fallback raises BadInputError naming it
                cap = capture(work, args, kwargs)
                method = cap.method
                notes.extend(cap.notes)
                if cap.gm is not None:
                    layers, sites = find_sites(cap.gm)
                    observers = instrument(cap.gm, sites,
                                           saturation_margin=config.saturation_margin,
                                           sample_rows=config.rank_sample)
                    runner = cap.gm
                    by_name = {n.name: n for n in cap.gm.graph.nodes}
                    for ls in layers:
                        w = _layer_weight(cap.gm, by_name[ls.node])
                        if w is not None:
                            layer_modules.append((ls.module, ls.kind, w, ls.next_modules))
                    params = [(n, p) for n, p in cap.gm.named_parameters() if p.requires_grad]
                else:
                    observers, handles, call_order = hook_observers(
                        work, saturation_margin=config.saturation_margin,
                        sample_rows=config.rank_sample)
                    runner = work
                    params = [(n, p) for n, p in work.named_parameters() if p.requires_grad]
                    # first-call (forward) order is known only after a batch: sorted below
                    for path, m in work.named_modules():
                        kind = layer_kind_of_module(m)
                        if kind and isinstance(getattr(m, "weight", None), torch.Tensor):
                            layer_modules.append((path, kind, m.weight, []))
                for _, p in params:
                    p.grad = None  # deepcopy copies the user's .grad
                paths = {lm[0] for lm in layer_modules}
                for n, _ in params:
                    owner = n.rsplit(".", 1)[0] if "." in n else ""
                    if owner in paths:
                        param_layer[n] = owner
            if val_data is not None:
                seen.append(batch)  # data may be a one-shot iterator
            _step(runner, batch, input_fn, i, loss_fn, params, param_layer, grad_sq,
                  grad_nonfinite)
            n_batches += 1
            progress.tick(n_batches)
    finally:
        progress.close()
        for h in handles:
            h.remove()

    if handles:  # hooks: layers in forward (first-call) order, as the graph gives them
        rank = {path: k for k, path in enumerate(call_order)}
        layer_modules.sort(key=lambda lm: rank.get(lm[0], len(rank)))
    measures = _measurements(observers, layer_modules, grad_sq, grad_nonfinite, n_batches,
                             loss_fn is not None, input_nonfinite)
    for o in observers:
        if o.error:
            notes.append(f"site {o.site.node}: {o.error}")
    if val_data is not None and loss_fn is not None:  # issue 9: over-fitting (additive)
        from ._heal import mean_loss

        val = list(iter_batches(val_data, config.max_batches))
        if not val:
            raise BadInputError("val_data is empty: pass at least one held-out batch")
        measures.losses = {"train": mean_loss(work, seen, loss_fn, input_fn=input_fn),
                           "val": mean_loss(work, val, loss_fn, input_fn=input_fn)}
    problems = detect_all(measures, config)
    if loss_fn is None:
        notes.append("gradients not checked: pass loss_fn= to measure gradient norms")
    reports = _reports(measures, config)
    return Diagnosis(problems=problems, layers=reports, capture=method,
                     gradients_checked=loss_fn is not None, batches=n_batches, notes=notes)


def _layer_weight(gm: torch.fx.GraphModule, node: torch.fx.Node) -> torch.Tensor | None:
    if node.op == "call_module":
        w = getattr(gm.get_submodule(str(node.target)), "weight", None)
        return w if isinstance(w, torch.Tensor) else None
    if len(node.args) > 1 and isinstance(node.args[1], torch.fx.Node):
        a = node.args[1]
        if a.op == "get_attr":
            try:
                return gm.get_parameter(str(a.target))
            except AttributeError:
                try:
                    return gm.get_buffer(str(a.target))
                except AttributeError:
                    return None
    return None


def _step(runner: Callable[..., Any], batch: Any, input_fn: InputFn | None, i: int,
          loss_fn: Callable[[Any, Any], torch.Tensor] | None,
          params: list[tuple[str, torch.nn.Parameter]], param_layer: dict[str, str],
          grad_sq: dict[str, float], grad_nonfinite: set[str]) -> None:
    if loss_fn is None:
        with torch.no_grad():
            run_model(runner, batch, input_fn, i)
        return
    with torch.enable_grad():  # grads are None here: cleared after capture and after each step
        out = run_model(runner, batch, input_fn, i)
        loss = compute_loss(loss_fn, out, batch, i)
        if loss.requires_grad:
            loss.backward()
    named = [(n, p.grad) for n, p in params if p.grad is not None and n in param_layer]
    if not named:
        return
    sq = grad_sq_norms([g for _, g in named]).tolist()
    per_layer: dict[str, float] = {}
    for (n, _), v in zip(named, sq, strict=True):
        per_layer[param_layer[n]] = per_layer.get(param_layer[n], 0.0) + v
    for layer, v in per_layer.items():
        if v != v or v == float("inf"):
            grad_nonfinite.add(layer)
        grad_sq[layer] = grad_sq.get(layer, 0.0) + v
    for _, p in params:
        p.grad = None


def _measurements(observers: list[Any], layer_modules: list[tuple[str, str, torch.Tensor, list[str]]],
                  grad_sq: dict[str, float], grad_nonfinite: set[str], n_batches: int,
                  gradients: bool, input_nonfinite: int) -> Measurements:
    sites = []
    for k, o in enumerate(observers):
        if o.stats is None:
            continue
        sites.append(SiteMeasure(
            module=o.site.producer or o.site.module, node=o.site.node, op=o.site.op,
            family=o.site.family, order=k, stats=o.stats,
            saturated_fraction=o.saturated_fraction(), sample=o.sample()))
    layers = []
    for k, (path, kind, w, nxt) in enumerate(layer_modules):
        d_out = int(w.shape[0])
        d_in = int(w.shape[1]) if w.dim() > 1 else 1
        g = grad_sq.get(path)
        layers.append(LayerMeasure(
            module=path, kind=kind, order=k, d_in=d_in, d_out=d_out, weight=w.detach(),
            grad_sq=(g / n_batches) if (g is not None and n_batches) else None,
            grad_nonfinite=path in grad_nonfinite, next_modules=nxt))
    return Measurements(sites=sites, layers=layers, gradients=gradients,
                        input_nonfinite=input_nonfinite)


def _reports(m: Measurements, config: DiagnoseConfig) -> dict[str, LayerReport]:
    out: dict[str, LayerReport] = {}
    for s in m.sites:
        site = Site(s.module, s.node, s.op)
        dormant, _dead, _c, score = unit_flags(s, config)
        st = s.stats
        out[site.address] = LayerReport(
            site=site, kind="activation", activation=s.op, width=st.channels,
            count=int(st.count.max()), mean=st.mean.tolist(), var=st.var.tolist(),
            dormancy=score.tolist(), firing_rate=st.firing_rate.tolist(),
            saturated_fraction=(s.saturated_fraction.tolist()
                                if s.saturated_fraction is not None else []),
            dead_fraction=float(dormant.float().mean()),
        )
    for lm in m.layers:
        site = Site(lm.module, "", lm.kind)
        gn = lm.grad_sq ** 0.5 if lm.grad_sq is not None and lm.grad_sq == lm.grad_sq else None
        out[site.address] = LayerReport(site=site, kind="parameters", width=lm.d_out,
                                        grad_norm=gn)
    return out


class _Progress:
    """A minimal progress line on stderr, only when it is a TTY (or config.progress)."""

    def __init__(self, config: DiagnoseConfig) -> None:
        self.on = config.progress if config.progress is not None else sys.stderr.isatty()
        self.total = config.max_batches
        self.shown = False

    def tick(self, n: int) -> None:
        if not self.on:
            return
        total = f"/{self.total}" if self.total else ""
        sys.stderr.write(f"\rgraphsurg: measuring batch {n}{total}")
        sys.stderr.flush()
        self.shown = True

    def close(self) -> None:
        if self.shown:
            sys.stderr.write("\n")
            sys.stderr.flush()


__all__ = ["diagnose"]
