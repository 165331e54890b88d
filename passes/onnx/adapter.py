"""The ONNX IR adapter: :class:`OnnxAdapter` implements :class:`graphsurg._ir.IRAdapter` over
an ``onnx_ir.Model``, with onnxruntime as the engine.

=============  ===========================================================================
verb           how
=============  ===========================================================================
open           a path (external data memory-mapped, its paths checked), a ``ModelProto``
               or an ``ir.Model`` -> a private ``ir.Model`` (the user's is never touched);
               weights held in ``Constant`` nodes become initializers (and are saved so)
batches        calibration data in any form of :mod:`graphsurg.passes.onnx.inputs`,
               checked against the model's inputs, batch axes read from the model
observe        onnxruntime with the observed values as extra outputs, reduced batch by
               batch with ``graphsurg.kernels`` (:mod:`graphsurg.passes.onnx.observe`)
run            an onnxruntime session: the floating outputs of every batch; the session is
               kept for the next run while the model's generation is unchanged
snapshot       ``ir.Model.clone()``; ``restore`` installs a clone of the snapshot, takes
               the snapshot over (``consume=True``), or does nothing when the working model
               is the unedited copy that snapshot was taken from
target         :class:`graphsurg.passes.onnx.target.OnnxTarget` (what ``apply_onnx`` edits)
halve          a feed dict cut in two along each input's batch axis (unbatched inputs
               go whole to both halves)
save           the model (and its external data, kept beside it) written atomically; a model
               that came with external data is written with external data
capabilities   no gradients, not trainable: exact edits only, no healing
=============  ===========================================================================

``graphsurg.onnx.analyze`` is the one diagnosis over this adapter (it lives above the spine,
with the facade).
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir
import onnx_ir as ir

from graphsurg._config import DiagnoseConfig
from graphsurg._ir import Capabilities, LossFn
from graphsurg._measurements import Measurements

from ._common import (
    Feed,
    ModelLike,
    OrtSession,
    has_external_tensors,
    lift_constants,
    load_model,
    ort_session,
    save_model_files,
)
from ._common import validate_batches as validate_batches
from .inputs import BatchAxes, InputSpec, halve_feed, input_specs, load_feeds
from .inputs import DataLike as DataLike
from .observe import observe_model
from .target import OnnxTarget


class OnnxAdapter:
    """One ONNX model on the spine (see the module documentation).

    Args:
        model: the working model, a private copy (use :meth:`open` to load a user's model).
        threads: onnxruntime intra-op threads (None: onnxruntime's default).
    """

    ir = "onnx"
    capabilities = Capabilities(gradients=False, trainable=False)

    def __init__(self, model: onnx_ir.Model, *, threads: int | None = None) -> None:
        if not isinstance(model, ir.Model):
            raise TypeError(f"OnnxAdapter takes an onnx_ir.Model, got {type(model).__name__}; "
                            "use OnnxAdapter.open(path_or_proto_or_model)")
        self._model = model
        self.threads = threads
        #: the model's generation: bumped whenever the working model may have been edited
        #: (``model`` or a target's ``model`` handed out, a restore); the cached onnxruntime
        #: session and the "unedited since snapshot" shortcut are valid for one generation
        self._gen = 0
        #: (model, generation, session, output names to ask for or None): the last session,
        #: kept for runs of the same model generation (observe's included)
        self._session: tuple[onnx_ir.Model, int, OrtSession, list[str] | None] | None = None
        #: (snapshot, working model, generation) when the working model is an unedited copy
        #: of that snapshot
        self._pristine: tuple[weakref.ref[Any], onnx_ir.Model, int] | None = None
        self._specs: list[InputSpec] | None = None
        #: the model came with external data: it is saved with external data, even when
        #: every external tensor was edited (and so is held in memory) by then
        self.external_data = has_external_tensors(model)
        #: (the caller's model, the working model read from it) for :meth:`snapshot`
        self._source: tuple[ModelLike, onnx_ir.Model] | None = None

    @classmethod
    def open(cls, model_like: ModelLike, *, threads: int | None = None
             ) -> tuple[OnnxAdapter, str]:
        """Load a path / ``onnx.ModelProto`` / ``onnx_ir.Model`` into a private copy; return
        the adapter and the kind the model came as (``"path"``, ``"proto"``, ``"ir"``).

        Raises:
            OnnxInputError: the file is missing, not ONNX, truncated, or its external data is
                missing or outside the model's folder (one line).
        """
        model, kind = _read(model_like)
        adapter = cls(model, threads=threads)
        if kind in ("proto", "ir"):  # held by the caller: read again rather than copied
            adapter._source = (model_like, model)
        return adapter, kind

    @property
    def model(self) -> onnx_ir.Model:
        """The working ``onnx_ir.Model`` (edited in place by the library's ONNX appliers).
        Taking it counts as an edit (a new generation): take it again after a :meth:`run`
        before editing it further."""
        self._edited()
        return self._model

    @property
    def current(self) -> onnx_ir.Model:
        """The working model, to read only (not a new generation, unlike :attr:`model`)."""
        return self._model

    def _edited(self) -> None:
        self._gen += 1

    @property
    def generation(self) -> int:
        """The working model's generation (a new one on every hand-out, restore or edit)."""
        return self._gen

    def unchanged_since(self, generation: int) -> None:
        """The model was handed out since ``generation`` but not changed (the caller checked
        it): the session kept from that generation still runs it."""
        c = self._session
        if c is not None and c[0] is self._model and c[1] == generation:
            self._session = (c[0], self._gen, c[2], c[3])

    def batches(self, data: DataLike, *, batch_size: int = 64,
                batch_axes: BatchAxes | None = None, max_batches: int | None = None,
                loader: str | None = None) -> list[Mapping[str, np.ndarray]]:
        """Calibration data (an ``.npz``, a folder of ``.npz``, a Polygraphy inputs ``.json``,
        feed dicts, a callable, or the data-loader script ``loader``: see
        :mod:`graphsurg.passes.onnx.inputs`) as feed dicts checked against the model's inputs.
        ``batch_axes`` (``{"state": 1, "sr": None}``) overrides the batch axes read from the
        model; :meth:`halve` uses the same axes.

        Raises:
            OnnxInputError: unreadable or mismatched data, a bad option (one line).
        """
        self._specs = input_specs(self._model, batch_axes)
        return load_feeds(self._model, data, batch_size=batch_size, batch_axes=batch_axes,
                          max_batches=max_batches, loader=loader)

    def observe(self, batches: Iterable[Feed], config: DiagnoseConfig, *,
                loss_fn: LossFn | None = None) -> Measurements:
        """Stream ``batches`` through onnxruntime and return the measurements
        ``graphsurg.detect`` judges (no gradients: ``loss_fn`` is not used)."""
        self._session = None  # the old session (and its weights) go before the new one

        def keep(sess: OrtSession, outputs: list[str]) -> None:
            self._session = (self._model, self._gen, sess, outputs)

        m = observe_model(self._model, batches, config, threads=self.threads, on_session=keep)
        if loss_fn is not None:
            m.notes.append("gradients not checked: an ONNX model has no gradients here")
        return m

    def run(self, batches: Sequence[Feed]) -> list[np.ndarray]:
        """The floating outputs of every batch, in order (one array per output per batch)."""
        cached = self._session
        if cached is not None and cached[0] is self._model and cached[1] == self._gen:
            sess, names = cached[2], cached[3]
        else:
            self._session = None  # the old session (and its weights) go before the new one
            sess, names = ort_session(self._model, threads=self.threads), None
            self._session = (self._model, self._gen, sess, None)
        out: list[np.ndarray] = []
        sess.runs = 0  # errors name the batch by its place in ``batches``
        for feed in batches:
            out.extend(r for r in sess.run(names, feed)
                       if isinstance(r, np.ndarray) and np.issubdtype(r.dtype, np.floating))
        return out

    def snapshot(self, *, lazy: bool = True) -> onnx_ir.Model | _Reread:
        """A copy of the working model for :meth:`restore`. While the working model is the
        one read from a ``ModelProto`` / ``onnx_ir.Model`` the caller holds, unedited and
        never handed out, the snapshot is a note to read that source again (no copy: a
        restore that has anything to undo reads it then). ``lazy=False``: an
        ``onnx_ir.Model`` always."""
        src = self._source
        snap: onnx_ir.Model | _Reread
        if lazy and src is not None and src[1] is self._model and self._gen == 0:
            snap = _Reread(src[0])
        else:
            snap = self._model.clone()
        self._pristine = (weakref.ref(snap), self._model, self._gen)
        return snap

    def restore(self, snapshot: onnx_ir.Model | _Reread, *, consume: bool = False) -> None:
        """Make the working model a copy of ``snapshot`` (which stays usable), or
        ``snapshot`` itself with ``consume=True`` (the caller does not use it again: no copy).
        Without ``consume``, nothing is copied when the working model has not been handed
        out (:attr:`model`, :meth:`target`) since ``snapshot`` was taken of it or restored
        from it. Take :attr:`model` / :meth:`target` again afterwards."""
        p = self._pristine
        if isinstance(snapshot, _Reread):
            if p is not None and p[0]() is snapshot and p[1] is self._model \
                    and p[2] == self._gen:
                return  # the working model is still the source as read
            self._model = snapshot.read()
            self._edited()
            self._pristine = (weakref.ref(snapshot), self._model, self._gen)
            return
        if consume:
            self._model = snapshot
            self._pristine = None
        elif p is not None and p[0]() is snapshot and p[1] is self._model and p[2] == self._gen:
            return  # the working model is an unedited copy of the snapshot
        else:
            self._model = snapshot.clone()
        self._edited()
        if not consume:
            self._pristine = (weakref.ref(snapshot), self._model, self._gen)

    def jitter_weights(self, *, seed: int = 0) -> None:
        """Re-round every float16/32/64 initializer of the working model: multiply it by
        ``1 + u`` with ``u`` uniform within one ulp (machine epsilon) of its dtype and round
        back (seeded; new tensors, so snapshots sharing the old ones are untouched). The
        output change this makes is the model's own floating-point resolution (see
        ``_operate``'s exact check)."""
        self._edited()  # a new generation: the cached session holds the old weights
        rng = np.random.default_rng(seed)
        for v in self._model.graph.initializers.values():
            t = v.const_value
            if t is None:
                continue
            a = t.numpy()
            if a.dtype not in (np.float16, np.float32, np.float64) or a.size < 2:
                continue
            ulp = float(np.finfo(a.dtype).eps)
            u = rng.uniform(-1.0, 1.0, a.shape)
            v.const_value = ir.tensor((a * (1.0 + u * ulp)).astype(a.dtype), name=v.name)

    def target(self, batches: Sequence[Feed], *, seed: int = 0) -> OnnxTarget:
        """The working model to edit (every access to the target's ``model`` is a new
        generation, so a cached session never runs a model edited since)."""
        return _TrackedTarget(self, batches, seed=seed)

    def scratch_target(self, batches: Sequence[Feed], *, seed: int = 0) -> OnnxTarget:
        """A target on a private copy of the working model for checks that may edit it (the
        planner's): the copy is made when the target's ``model`` is first taken, so checks
        that read only the diagnosis cost no copy. Take it and use it before the working
        model is edited."""
        return _ScratchTarget(self._model, batches, seed=seed)

    def halve(self, batch: Mapping[str, np.ndarray]) -> tuple[Feed, Feed] | None:
        """Cut a feed dict in two along each input's batch axis (as :meth:`batches` read
        them; unbatched inputs go whole to both halves). None when the batched inputs do not
        share a size of at least 2 there."""
        specs = self._specs if self._specs is not None else input_specs(self._model)
        if set(batch) != {s.name for s in specs}:
            return None
        return halve_feed(specs, batch)

    def save(self, path: str | os.PathLike[str], *, save_external_data: bool = False,
             external_data_size_threshold: int = 1024,
             bare: tuple[Any, Mapping[str, np.ndarray]] | None = None,
             **options: Any) -> list[Path]:
        """Write the working model to ``path`` atomically (with ``<name>.data`` beside it when
        it holds external tensors or ``save_external_data``); return the files written.
        ``bare=(proto, arrays)`` from :func:`~._common.infer_and_check` of the current model
        saves serializing its graph again (taken over)."""
        if options:
            raise TypeError(f"OnnxAdapter.save got unknown options {sorted(options)}")
        return save_model_files(self._model, path,
                                save_external_data=save_external_data or self.external_data,
                                external_data_size_threshold=external_data_size_threshold,
                                bare=bare)


class _Reread:
    """A snapshot of a model as it was read from a ``ModelProto`` / ``onnx_ir.Model`` the
    caller holds (:meth:`OnnxAdapter.snapshot`): restoring it reads that source again."""

    def __init__(self, source: ModelLike) -> None:
        self.source = source

    def read(self) -> onnx_ir.Model:
        return _read(self.source)[0]


def _read(model_like: ModelLike) -> tuple[onnx_ir.Model, str]:
    """A private ``onnx_ir.Model`` of ``model_like`` and its kind, Constant-node weights
    lifted to initializers: what :meth:`OnnxAdapter.open` and a :class:`_Reread` install."""
    model, kind = load_model(model_like)
    lift_constants(model)
    return model, kind


class _TrackedTarget(OnnxTarget):
    """An :class:`OnnxTarget` on an adapter's working model whose ``model`` marks the adapter
    edited (a new generation) whenever an applier takes it."""

    def __init__(self, adapter: OnnxAdapter, batches: Sequence[Feed], *, seed: int = 0
                 ) -> None:
        self._adapter = adapter
        super().__init__(adapter._model, batches, seed=seed)

    @property  # type: ignore[override]
    def model(self) -> onnx_ir.Model:
        self._adapter._edited()
        return self._tracked_model

    @model.setter
    def model(self, m: onnx_ir.Model) -> None:
        self._adapter._edited()
        self._tracked_model = m



class _ScratchTarget(OnnxTarget):
    """An :class:`OnnxTarget` on a copy of a model, made on the first access to ``model``."""

    def __init__(self, model: onnx_ir.Model, batches: Sequence[Feed], *, seed: int = 0
                 ) -> None:
        self._copy: onnx_ir.Model | None = None
        super().__init__(model, batches, seed=seed)

    @property  # type: ignore[override]
    def model(self) -> onnx_ir.Model:
        if self._copy is None:
            self._copy = self._source.clone()
        return self._copy

    @model.setter
    def model(self, m: onnx_ir.Model) -> None:
        self._source, self._copy = m, None


__all__ = ["OnnxAdapter"]
