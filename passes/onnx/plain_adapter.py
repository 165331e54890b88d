"""The ONNX adapter on the protobuf: :class:`PlainAdapter` implements
:class:`graphsurg._ir.IRAdapter` over an ``onnx.ModelProto`` for models whose every site is
plain (:mod:`graphsurg.passes.onnx.plain`), so the spine plans, applies, verifies and rolls
back as it does over :class:`~graphsurg.passes.onnx.adapter.OnnxAdapter`, without reading
the model into onnx-ir and writing it back.

=============  ===========================================================================
verb           how
=============  ===========================================================================
snapshot       a copy of the proto (protobuf's C++ ``CopyFrom``); ``restore`` installs a
               copy, or the snapshot itself with ``consume=True``
target         :class:`PlainTarget`: the proto, its :class:`~.plain.ProtoIndex` (valid for
               every copy: the plain excision changes tensors and dims only) and the
               ``excised`` bookkeeping; ``ExciseDead.apply_onnx`` edits it with
               :func:`~.plain.excise`
run, observe,  through an :class:`OnnxAdapter` on the proto read into onnx-ir (what
halve, save    onnxruntime and the calibration formats need; ``graphsurg.onnx.apply``
               takes this adapter only when a diagnosis is given without data, where none
               of them runs)
capabilities   no gradients, not trainable: exact edits only, no healing
=============  ===========================================================================
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from graphsurg._config import DiagnoseConfig
from graphsurg._ir import Capabilities, LossFn
from graphsurg._measurements import Measurements

from ._common import Feed
from .adapter import OnnxAdapter
from .plain import ProtoIndex


class PlainTarget:
    """The proto on the table (the plain twin of
    :class:`~graphsurg.passes.onnx.target.OnnxTarget`): ``model`` (edited in place),
    ``index``, ``batches``, ``seed`` and ``excised`` (site address -> units removed there,
    original numbering)."""

    ir = "onnx"

    def __init__(self, model: onnx.ModelProto, index: ProtoIndex,
                 batches: Sequence[Mapping[str, np.ndarray]], *, seed: int = 0) -> None:
        from .plain import _Tensors

        self.model = model
        self.index = index
        self.batches = list(batches)
        self.seed = int(seed)
        self.excised: dict[str, set[int]] = {}
        #: the initializers read so far as arrays (written back on every edit)
        self.tensors = _Tensors(model, index)


def _copy(m: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(m)
    return out


class PlainAdapter:
    """One plain ONNX model on the spine, as a ``ModelProto`` (see the module documentation).

    Args:
        model: the working proto, a private copy (edited in place).
        index: its :class:`~.plain.ProtoIndex`.
        threads: onnxruntime intra-op threads (None: onnxruntime's default).
    """

    ir = "onnx"
    capabilities = Capabilities(gradients=False, trainable=False)

    def __init__(self, model: onnx.ModelProto, index: ProtoIndex, *,
                 threads: int | None = None) -> None:
        self._model = model
        self.index = index
        self.threads = threads

    @property
    def model(self) -> onnx.ModelProto:
        return self._model

    @property
    def current(self) -> onnx.ModelProto:
        return self._model

    def _ir(self) -> OnnxAdapter:
        return OnnxAdapter(ir.serde.deserialize_model(self._model), threads=self.threads)

    def observe(self, batches: Iterable[Feed], config: DiagnoseConfig, *,
                loss_fn: LossFn | None = None) -> Measurements:
        return self._ir().observe(batches, config, loss_fn=loss_fn)

    def run(self, batches: Sequence[Feed]) -> list[np.ndarray]:
        return self._ir().run(batches)

    def snapshot(self) -> onnx.ModelProto:
        return _copy(self._model)

    def restore(self, snapshot: onnx.ModelProto, *, consume: bool = False) -> None:
        self._model = snapshot if consume else _copy(snapshot)

    def target(self, batches: Sequence[Feed], *, seed: int = 0) -> PlainTarget:
        return PlainTarget(self._model, self.index, batches, seed=seed)

    def halve(self, batch: Mapping[str, np.ndarray]) -> tuple[Feed, Feed] | None:
        return self._ir().halve(batch)

    def save(self, path: str | os.PathLike[str], **options: Any) -> list[Path]:
        return self._ir().save(path, **options)


__all__ = ["PlainAdapter", "PlainTarget"]
