"""The one diagnosis: observe a model through its IR adapter, judge the measurements.

``gs.diagnose`` (torch), ``graphsurg.onnx.analyze`` (ONNX) and ``Monitor.diagnose``
(torch.compile) are this module over different adapters:

* :func:`diagnose_adapter` -- ``adapter.observe(batches)`` then :func:`diagnosis_from`;
* :func:`diagnosis_from` -- ``graphsurg.detect.detect_all`` plus the per-site
  :class:`LayerReport` evidence, for any :class:`Measurements` (the monitor builds its own).

Nothing here knows torch.fx or ONNX.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sized
from typing import Any

import torch
from torch import nn

from ._config import DiagnoseConfig
from ._console import Progress, progress
from ._data import InputFn, iter_batches
from ._ir import IRAdapter
from ._measurements import Measurements
from ._problems import Diagnosis, LayerReport, Site
from .detect import detect_all, detect_notes
from .detect.dead import unit_flags


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
    from graphsurg.passes.fx.adapter import TorchAdapter

    adapter = TorchAdapter(model, input_fn=input_fn)
    return diagnose_adapter(adapter, data, config=config, loss_fn=loss_fn, val_batches=val_data)


def diagnose_adapter(
    adapter: IRAdapter,
    batches: Iterable[Any],
    *,
    config: DiagnoseConfig | None = None,
    loss_fn: Callable[[Any, Any], Any] | None = None,
    val_batches: Iterable[Any] | None = None,
) -> Diagnosis:
    """The diagnosis of ``adapter``'s working model on ``batches`` (any IR).

    ``loss_fn`` is used where the adapter can measure gradients; ``val_batches`` (with
    ``loss_fn``, on an adapter that can compute losses: ``capabilities.trainable``, with a
    ``mean_loss(batches, loss_fn)`` method) measures the train and held-out losses for the
    Overfitting detector. Either one the adapter cannot use is ignored and a note says so.
    The working model is left as it was.

    Raises:
        BadInputError: empty data or ``val_batches``, a batch the model rejects, a failing
            ``loss_fn``.
    """
    config = config or DiagnoseConfig()
    caps = adapter.capabilities
    notes: list[str] = []
    if loss_fn is not None and not caps.gradients:
        notes.append(f"loss_fn ignored: the {adapter.ir} adapter cannot measure gradients")
        loss_fn = None
    if val_batches is not None and loss_fn is not None and not caps.trainable:
        notes.append(f"val_data ignored: the {adapter.ir} adapter cannot compute a loss")
        val_batches = None
    if val_batches is not None and loss_fn is not None:
        # the train loss is measured on the observed batches: keep them (data may be a
        # one-shot iterator)
        batches = list(iter_batches(batches, config.max_batches))
    # both adapters stream any iterable (one pass, nothing kept)
    total = len(batches) if isinstance(batches, Sized) else None
    if config.max_batches is not None:
        total = min(total, config.max_batches) if total is not None else config.max_batches
    with progress(total, "measuring batches", enabled=config.progress) as bar:
        m = adapter.observe(_advancing(iter_batches(batches, config.max_batches), bar),
                            config, loss_fn=loss_fn)
    m.notes.extend(notes)
    if val_batches is not None and loss_fn is not None:
        val = list(iter_batches(val_batches, config.max_batches))
        mean_loss = adapter.mean_loss  # type: ignore[attr-defined]
        m.losses = {"train": mean_loss(batches, loss_fn), "val": mean_loss(val, loss_fn)}
    if not m.gradients:
        m.notes.append("gradients not checked: pass loss_fn= to measure gradient norms"
                       if caps.gradients else
                       f"gradients not checked: the {adapter.ir} adapter has no gradients")
    return diagnosis_from(m, config)


def _advancing(batches: Iterable[Any], bar: Progress) -> Iterator[Any]:
    """``batches``, advancing ``bar`` once each batch has been measured (when the next one is
    asked for)."""
    for b in batches:
        yield b
        bar.advance()


def diagnosis_from(m: Measurements, config: DiagnoseConfig | None = None) -> Diagnosis:
    """Judge ``m`` with every detector (``graphsurg.detect.detect_all``) and attach the
    per-site evidence (a :class:`LayerReport` per activation site and per layer). The
    capture method, gradients flag, batch count and notes come from ``m``, followed by what
    the detectors could not judge (``graphsurg.detect.detect_notes``)."""
    config = config or DiagnoseConfig()
    return Diagnosis(problems=detect_all(m, config), layers=site_reports(m, config),
                     capture=m.capture, gradients_checked=m.gradients, batches=m.batches,
                     notes=list(m.notes) + detect_notes(m, config))


def site_reports(m: Measurements, config: DiagnoseConfig) -> dict[str, LayerReport]:
    """Per-site evidence of ``m``, keyed by site address."""
    out: dict[str, LayerReport] = {}
    for s in m.sites:
        site = Site(s.module, s.node, s.op, ir=m.ir)
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
        site = Site(lm.module, "", lm.kind, ir=m.ir)
        gn = lm.grad_sq ** 0.5 if lm.grad_sq is not None and lm.grad_sq == lm.grad_sq else None
        out[site.address] = LayerReport(site=site, kind="parameters", width=lm.d_out,
                                        grad_norm=gn)
    return out


def _measurements(observers: list[Any], layer_modules: list[tuple[str, str, torch.Tensor,
                                                                  list[str]]],
                  grad_sq: dict[str, float], grad_nonfinite: set[str], n_batches: int,
                  gradients: bool, input_nonfinite: int) -> Measurements:
    """Deprecated spelling kept for ``graphsurg._monitor`` until it calls
    ``passes.fx.instrument.measurements_from`` and :func:`diagnosis_from` itself."""
    from graphsurg.passes.fx.instrument import measurements_from

    return measurements_from(observers, layer_modules, grad_sq=grad_sq,
                             grad_nonfinite=grad_nonfinite, n_batches=n_batches,
                             gradients=gradients, input_nonfinite=input_nonfinite)


_reports = site_reports  # the monitor's old spelling (see _measurements)


__all__ = ["diagnose", "diagnose_adapter", "diagnosis_from", "site_reports"]
