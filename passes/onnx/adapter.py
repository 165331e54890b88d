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
run            an onnxruntime session: the floating outputs of every batch
snapshot       ``ir.Model.clone()``; ``restore`` installs a clone of the snapshot
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
        self._specs: list[InputSpec] | None = None
        #: the model came with external data: it is saved with external data, even when
        #: every external tensor was edited (and so is held in memory) by then
        self.external_data = has_external_tensors(model)

    @classmethod
    def open(cls, model_like: ModelLike, *, threads: int | None = None
             ) -> tuple[OnnxAdapter, str]:
        """Load a path / ``onnx.ModelProto`` / ``onnx_ir.Model`` into a private copy; return
        the adapter and the kind the model came as (``"path"``, ``"proto"``, ``"ir"``).

        Raises:
            OnnxInputError: the file is missing, not ONNX, truncated, or its external data is
                missing or outside the model's folder (one line).
        """
        model, kind = load_model(model_like)
        lift_constants(model)
        return cls(model, threads=threads), kind

    @property
    def model(self) -> onnx_ir.Model:
        """The working ``onnx_ir.Model`` (edited in place by the library's ONNX appliers)."""
        return self._model

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
        m = observe_model(self._model, batches, config, threads=self.threads)
        if loss_fn is not None:
            m.notes.append("gradients not checked: an ONNX model has no gradients here")
        return m

    def run(self, batches: Sequence[Feed]) -> list[np.ndarray]:
        """The floating outputs of every batch, in order (one array per output per batch)."""
        sess = ort_session(self._model, threads=self.threads)
        out: list[np.ndarray] = []
        for feed in batches:
            out.extend(r for r in sess.run(None, feed)
                       if isinstance(r, np.ndarray) and np.issubdtype(r.dtype, np.floating))
        return out

    def snapshot(self) -> onnx_ir.Model:
        return self._model.clone()

    def restore(self, snapshot: onnx_ir.Model) -> None:
        """Make the working model a copy of ``snapshot`` (which stays usable). The working
        model becomes a new object: take :attr:`model` / :meth:`target` again afterwards."""
        self._model = snapshot.clone()

    def target(self, batches: Sequence[Feed], *, seed: int = 0) -> OnnxTarget:
        return OnnxTarget(self._model, batches, seed=seed)

    def halve(self, batch: Mapping[str, np.ndarray]) -> tuple[Feed, Feed] | None:
        """Cut a feed dict in two along each input's batch axis (as :meth:`batches` read
        them; unbatched inputs go whole to both halves). None when the batched inputs do not
        share a size of at least 2 there."""
        specs = self._specs if self._specs is not None else input_specs(self._model)
        if set(batch) != {s.name for s in specs}:
            return None
        return halve_feed(specs, batch)

    def save(self, path: str | os.PathLike[str], *, save_external_data: bool = False,
             external_data_size_threshold: int = 1024, **options: Any) -> list[Path]:
        """Write the working model to ``path`` atomically (with ``<name>.data`` beside it when
        it holds external tensors or ``save_external_data``); return the files written."""
        if options:
            raise TypeError(f"OnnxAdapter.save got unknown options {sorted(options)}")
        return save_model_files(self._model, path,
                                save_external_data=save_external_data or self.external_data,
                                external_data_size_threshold=external_data_size_threshold)


__all__ = ["OnnxAdapter"]
