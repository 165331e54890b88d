"""The torch IR adapter: :class:`TorchAdapter`, the spine's verbs for an ``nn.Module``.

``observe`` captures the working model as a torch.fx graph (``torch.export``, then
``torch.fx.symbolic_trace``, then module hooks when neither can), inserts observer nodes
after every activation site (:mod:`.instrument`), streams the batches through it and, with a
loss function, measures every layer's gradient norm; it returns the
:class:`graphsurg._measurements.Measurements` that ``graphsurg.detect`` judges.

The adapter deep-copies the user's model once, in the constructor; every verb works on that
private copy (the *working model*), which the library's torch appliers edit through
:meth:`TorchAdapter.target`. The user's model, parameters, buffers and training mode are never
touched.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from graphsurg.kernels import grad_sq_norms
from torch import nn

from graphsurg._config import DiagnoseConfig
from graphsurg._data import (
    InputFn,
    batch_tensors,
    compute_loss,
    default_input_fn,
    iter_batches,
    run_model,
)
from graphsurg._errors import BadInputError, first_line
from graphsurg._files import atomic_outputs
from graphsurg._ir import Capabilities
from graphsurg._measurements import Measurements

from .capture import capture, find_sites, layer_kind_of_module, layer_weight
from .instrument import LayerEntry, Observer, hook_observers, instrument, measurements_from
from .structure import bypassed_layers, layer_nodes_of
from .target import Target

Batch = Any
LossFn = Callable[[Any, Batch], torch.Tensor]


class TorchAdapter:
    """The spine's verbs for a torch ``nn.Module`` (see :class:`graphsurg._ir.IRAdapter`).

    Args:
        model: any ``nn.Module`` that runs in eager mode; it is deep-copied once here and
            never modified.
        input_fn: ``input_fn(batch) -> (args, kwargs)`` to feed a batch (default: a tensor is
            the input, a tuple's first element is, a dict is keyword arguments).

    Example:
        >>> a = TorchAdapter(model)
        >>> m = a.observe([(x, y)], DiagnoseConfig(), loss_fn=loss)
        >>> outs = a.run([(x, y)])
    """

    ir = "torch"
    capabilities = Capabilities(gradients=True, trainable=True)

    def __init__(self, model: nn.Module, *, input_fn: InputFn | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise BadInputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self._model = copy.deepcopy(model)
        for p in self._model.parameters():
            p.grad = None  # deepcopy copies the user's .grad
        self.input_fn = input_fn
        self._target: Target | None = None

    # -- the working model -----------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        """The working model. A graph rewrite through :meth:`target` may have swapped it for a
        GraphModule (``Target.set_model``): the adapter follows its latest target."""
        if self._target is not None and self._target.model is not self._model:
            self._model = self._target.model
        return self._model

    def snapshot(self) -> nn.Module:
        """A deep copy of the working model."""
        return copy.deepcopy(self.model)

    def restore(self, snapshot: nn.Module) -> None:
        """Make the working model a deep copy of ``snapshot`` (which stays usable); the latest
        target follows it."""
        self._model = copy.deepcopy(snapshot)
        if self._target is not None:
            self._target.set_model(self._model)

    def jitter_weights(self, *, seed: int = 0) -> None:
        """Re-round every floating parameter of the working model: multiply it by ``1 + u``
        with ``u`` uniform within one ulp (machine epsilon) of its dtype, rounded back
        (seeded). The output change this
        makes is the model's own floating-point resolution (see ``_operate``'s exact check)."""
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.model.parameters():
                if p.is_floating_point():
                    ulp = torch.finfo(p.dtype).eps
                    u = (torch.rand(p.shape, generator=g, dtype=torch.float64) * 2 - 1)
                    p.copy_((p.double() * (1 + u * ulp)).to(p.dtype))

    def target(self, batches: Sequence[Batch], *, seed: int = 0) -> Target:
        """A :class:`graphsurg.passes.fx.target.Target` over the working model (edited in
        place by the library's torch appliers) and calibration ``batches``."""
        self._target = Target(self.model, list(batches), input_fn=self.input_fn, seed=seed)
        return self._target

    # -- running -----------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, batches: Iterable[Batch]) -> list[torch.Tensor]:
        """The working model's floating outputs on ``batches`` in eval mode (mode restored):
        every floating tensor of each batch's output, detached, in order."""
        model = self.model
        was = model.training
        model.eval()
        try:
            got: list[torch.Tensor] = []
            for i, b in enumerate(batches):
                got += float_leaves(run_model(model, b, self.input_fn, i))
        finally:
            model.train(was)
        return got

    def mean_loss(self, batches: Sequence[Batch], loss_fn: LossFn) -> float:
        """Mean of ``loss_fn(output, batch)`` over ``batches`` in eval mode (mode restored)."""
        model = self.model
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                vals = [float(compute_loss(loss_fn, run_model(model, b, self.input_fn, i), b, i))
                        for i, b in enumerate(batches)]
        finally:
            model.train(was)
        return sum(vals) / len(vals)

    def halve(self, batch: Batch) -> tuple[Batch, Batch] | None:
        """Split a batch (a tensor, or tuples / lists / dicts of them) in two along dim 0.

        Every tensor with a batch axis must have the same number of rows (at least 2); 0-d
        tensors and non-tensor leaves go to both halves. None when the batch cannot be split.
        """
        leaves, spec = torch.utils._pytree.tree_flatten(batch)
        rows = {int(t.shape[0]) for t in leaves if isinstance(t, torch.Tensor) and t.dim() > 0}
        if len(rows) != 1 or (n := rows.pop()) < 2:
            return None
        k = n // 2

        def part(sl: slice) -> Batch:
            return torch.utils._pytree.tree_unflatten(
                [t[sl] if isinstance(t, torch.Tensor) and t.dim() > 0 else t for t in leaves],
                spec)

        return part(slice(0, k)), part(slice(k, n))

    # -- observing -----------------------------------------------------------------------------
    def observe(self, batches: Iterable[Batch], config: DiagnoseConfig, *,
                loss_fn: LossFn | None = None) -> Measurements:
        """Measure every activation site and layer of the working model on ``batches`` (at
        most ``config.max_batches``), in the model's own training mode.

        With ``loss_fn`` each batch's loss is back-propagated and every layer's squared
        gradient norm recorded. The working model is left as it was: buffers a training-mode
        forward updates (BatchNorm running statistics) are restored, gradients cleared, no
        hook or observer stays behind.

        Raises:
            BadInputError: empty data, a batch the model rejects, a failing ``loss_fn``.
        """
        model = self.model
        buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        try:
            return _Observation(model, self.input_fn, config, loss_fn).run(batches)
        finally:
            with torch.no_grad():
                for n, b in model.named_buffers():
                    if n in buffers and b.shape == buffers[n].shape:
                        b.copy_(buffers[n])
            for p in model.parameters():
                p.grad = None

    # -- saving --------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str], *, example: Batch | None = None,
             **options: Any) -> list[Path]:
        """Write the working model to ``path`` as a ``.pt2`` ``torch.export`` archive.

        What is written: one file, the ``ExportedProgram`` of the working model in eval mode
        (its graph, parameters and buffers; loadable with ``torch.export.load`` without
        unpickling code), traced on ``example`` (default: the first batch last observed, run
        or targeted), the batch dimension dynamic where export allows it. The file appears
        atomically (:mod:`graphsurg._files`). Returns ``[path]``.

        Raises:
            BadInputError: no example batch, unknown options, or the model cannot be exported.
        """
        from torch.export import export
        from torch.export import save as export_save

        if options:
            raise BadInputError(f"TorchAdapter.save: unknown option(s) {sorted(options)}: it "
                                "takes path and example= only")
        if example is None and self._target is not None and self._target.batches:
            example = self._target.batches[0]
        if example is None:
            raise BadInputError("TorchAdapter.save needs an example batch to export the model: "
                                "pass example=")
        args, kwargs = (self.input_fn or default_input_fn)(example)
        model = self.model
        was = model.training
        model.eval()
        try:
            ep = export(model, tuple(args), kwargs, strict=False)
        except Exception as e:
            raise BadInputError(
                f"the model could not be exported to .pt2 ({type(e).__name__}: "
                f"{first_line(e, 160)}); save adapter.model's state_dict instead") from e
        finally:
            model.train(was)
        with atomic_outputs(path) as (tmp,):
            export_save(ep, str(tmp))
        return [Path(path)]


def float_leaves(out: Any) -> list[torch.Tensor]:
    """Floating-point tensors of a model output (tensors, tuples, dicts, ModelOutput), detached."""
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    leaves, _ = torch.utils._pytree.tree_flatten(out)
    return [t.detach() for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _without_cache(model: nn.Module, input_fn: InputFn | None) -> InputFn | None:
    """``input_fn`` that also passes ``use_cache=False`` when ``model.forward`` takes it and
    the batch does not set it: Hugging Face decoders otherwise return a ``DynamicCache``
    that torch.export cannot capture, and observation falls back to module hooks."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return input_fn
    if "use_cache" not in params:
        return input_fn
    base = input_fn or default_input_fn

    def fn(batch: Batch) -> tuple[tuple[Any, ...], dict[str, Any]]:
        args, kwargs = base(batch)
        if "use_cache" not in kwargs:
            kwargs = {**kwargs, "use_cache": False}
        return args, kwargs

    return fn


class _Observation:
    """One streaming pass of ``observe``: capture on the first batch, then measure each."""

    def __init__(self, model: nn.Module, input_fn: InputFn | None, config: DiagnoseConfig,
                 loss_fn: LossFn | None) -> None:
        self.model = model
        self.input_fn = _without_cache(model, input_fn)
        self.config = config
        self.loss_fn = loss_fn
        self.notes = [f"measured in {'training' if model.training else 'eval'} mode "
                      "(the model's own)"]
        if self.input_fn is not input_fn:
            self.notes.append("observed with use_cache=False (a key/value cache is not "
                              "part of the network's function and blocks torch.export)")
        self.method = ""
        self.observers: list[Observer] = []
        self.handles: list[Any] = []
        self.call_order: list[str] = []
        self.layers: list[LayerEntry] = []
        self.runner: Callable[..., Any] = model
        self.params: list[tuple[str, nn.Parameter]] = []
        self.param_layer: dict[str, str] = {}
        self.grad_sq: dict[str, float] = {}
        self.grad_nonfinite: set[str] = set()
        self.bypassed: dict[str, bool] = {}  # layers with a parallel path (passes.fx.structure)

    def run(self, batches: Iterable[Batch]) -> Measurements:
        n = 0
        input_nonfinite = 0
        try:
            for i, batch in enumerate(iter_batches(batches, self.config.max_batches)):
                input_nonfinite += sum(int((~torch.isfinite(t)).sum())
                                       for t in batch_tensors(batch))
                if i == 0:
                    self._capture(batch)
                self._step(batch, i)
                n += 1
        finally:
            for h in self.handles:
                h.remove()
        if self.handles:  # hooks: layers in forward (first-call) order, as a graph gives them
            rank = {path: k for k, path in enumerate(self.call_order)}
            self.layers.sort(key=lambda lm: rank.get(lm[0], len(rank)))
        m = measurements_from(
            self.observers, self.layers, grad_sq=self.grad_sq,
            grad_nonfinite=self.grad_nonfinite, n_batches=n, gradients=self.loss_fn is not None,
            input_nonfinite=input_nonfinite, capture=self.method, notes=self.notes)
        for lm in m.layers:
            lm.bypassed = self.bypassed.get(lm.module)
        return m

    def _capture(self, batch: Batch) -> None:
        cfg = self.config
        args, kwargs = (self.input_fn or default_input_fn)(batch)
        # a batch the model rejects fails capture; the fallback's first run then raises
        # BadInputError naming it
        cap = capture(self.model, args, kwargs)
        self.method = cap.method
        self.notes.extend(cap.notes)
        if cap.gm is not None:
            layer_sites, sites = find_sites(cap.gm)
            self.bypassed = bypassed_layers(cap.gm, layer_nodes_of(layer_sites))
            self.observers = instrument(cap.gm, sites, saturation_margin=cfg.saturation_margin,
                                        sample_rows=cfg.rank_sample)
            self.runner = cap.gm
            by_name = {nd.name: nd for nd in cap.gm.graph.nodes}
            for ls in layer_sites:
                w = layer_weight(cap.gm, by_name[ls.node])
                if w is not None:
                    self.layers.append((ls.module, ls.kind, w, ls.next_modules))
            owner: nn.Module = cap.gm
        else:
            self.observers, self.handles, self.call_order = hook_observers(
                self.model, saturation_margin=cfg.saturation_margin,
                sample_rows=cfg.rank_sample)
            owner = self.model
            # first-call (forward) order is known only after a batch: sorted in run()
            for path, m in self.model.named_modules():
                kind = layer_kind_of_module(m)
                if kind and isinstance(getattr(m, "weight", None), torch.Tensor):
                    self.layers.append((path, kind, m.weight, []))
        self.params = [(n, p) for n, p in owner.named_parameters() if p.requires_grad]
        for _, p in self.params:
            p.grad = None
        paths = {lm[0] for lm in self.layers}
        for n, _ in self.params:
            layer = n.rsplit(".", 1)[0] if "." in n else ""
            if layer in paths:
                self.param_layer[n] = layer

    def _step(self, batch: Batch, i: int) -> None:
        if self.loss_fn is None:
            with torch.no_grad():
                run_model(self.runner, batch, self.input_fn, i)
            return
        with torch.enable_grad():  # grads are None here: cleared after capture and each step
            out = run_model(self.runner, batch, self.input_fn, i)
            loss = compute_loss(self.loss_fn, out, batch, i)
            if loss.requires_grad:
                loss.backward()
        named = [(n, p.grad) for n, p in self.params
                 if p.grad is not None and n in self.param_layer]
        for _, p in self.params:
            p.grad = None
        if not named:
            return
        sq = grad_sq_norms([g for _, g in named]).tolist()
        per_layer: dict[str, float] = {}
        for (n, _), v in zip(named, sq, strict=True):
            per_layer[self.param_layer[n]] = per_layer.get(self.param_layer[n], 0.0) + v
        for layer, v in per_layer.items():
            if v != v or v == float("inf"):
                self.grad_nonfinite.add(layer)
            self.grad_sq[layer] = self.grad_sq.get(layer, 0.0) + v


__all__ = ["TorchAdapter", "float_leaves"]
