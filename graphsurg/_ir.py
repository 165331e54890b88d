"""The IR adapter interface: the verbs every stage of the spine needs, for any graph IR.

``diagnose``, ``operate``, the verifier and the rollback are written once against this
Protocol; ``graphsurg.passes.fx`` (torch) and ``graphsurg.passes.onnx`` (ONNX) implement it.
An adapter owns one *working* model (always a private copy of the user's: the user's model,
file and parameters are never touched) and edits it in place through the library's appliers
for its IR; ``snapshot``/``restore`` make every edit reversible.

=============  ==========================================  ==================================
verb           torch.fx adapter                            ONNX adapter
=============  ==========================================  ==================================
observe        observer nodes + grad hooks -> kernels      onnxruntime, activations as outputs
run            the module, eval mode                        an onnxruntime session
snapshot       a deep copy of the module                    ``ir.Model.clone()``
target         ``library.Target`` (torch)                   ``passes.onnx.OnnxTarget``
save           nn.Module / ``.pt2``                         ModelProto on disk, atomically
capabilities   gradients, trainable                         neither (exact edits, no healing)
=============  ==========================================  ==================================
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ._config import DiagnoseConfig
from ._measurements import Measurements

Batch = Any
LossFn = Callable[[Any, Batch], Any]


@dataclass(frozen=True)
class Capabilities:
    """What an adapter can do beyond the common verbs.

    Attributes:
        gradients: ``observe`` can measure parameter gradients (with a loss function).
        trainable: the working model can be fine-tuned (healing, loss certificates).
    """

    gradients: bool = False
    trainable: bool = False


@runtime_checkable
class IRAdapter(Protocol):
    """One graph IR, as the spine sees it. See the module documentation."""

    #: ``"torch"`` or ``"onnx"``: the key of the library's appliers and of ``Site.ir``.
    ir: str
    capabilities: Capabilities

    @property
    def model(self) -> Any:
        """The working model (``nn.Module`` / ``onnx_ir.Model``), edited in place."""
        ...

    def observe(self, batches: Iterable[Batch], config: DiagnoseConfig, *,
                loss_fn: LossFn | None = None) -> Measurements:
        """Stream ``batches`` (any iterable, read once) through the working model (left
        unchanged) and return what ``graphsurg.detect`` judges."""
        ...

    def run(self, batches: Sequence[Batch]) -> list[Any]:
        """The working model's floating outputs on ``batches`` (one array per output per
        batch, in order), for :func:`graphsurg._compare.output_change`."""
        ...

    def snapshot(self) -> Any:
        """An opaque copy of the working model for :meth:`restore`."""
        ...

    def restore(self, snapshot: Any) -> None:
        """Make the working model what it was at ``snapshot`` (the snapshot stays usable)."""
        ...

    def target(self, batches: Sequence[Batch], *, seed: int = 0) -> Any:
        """The object the library's applier for this IR edits (it wraps the working model
        and calibration ``batches``)."""
        ...

    def halve(self, batch: Batch) -> tuple[Batch, Batch] | None:
        """Split one batch in two along its batch axis (for the held-out split), or None."""
        ...

    def save(self, path: str | os.PathLike[str], **options: Any) -> list[Path]:
        """Write the working model to ``path`` atomically; return every file written."""
        ...


__all__ = ["Capabilities", "IRAdapter"]
