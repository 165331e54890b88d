"""The ONNX model on the table: :class:`OnnxTarget`, what the library's ONNX appliers edit.

The ONNX twin of :class:`graphsurg.passes.fx.target.Target`: a private ``onnx_ir.Model``
(edited in place by ``Replacement.apply_onnx``), the calibration batches (feed dicts
``{input name: np.ndarray}``), a seed, and the units already excised per site address (so a
later edit at a coupled site does not count or remove them twice). Nothing here touches the
user's model or file: the adapter hands over a private copy.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir
import onnx_ir as ir


class OnnxTarget:
    """The ONNX model on the table.

    Attributes:
        ir: ``"onnx"`` (``Replacement.apply`` dispatches on it to ``apply_onnx``).
        model: the private ``onnx_ir.Model``, edited in place by the appliers.
        batches: calibration feed dicts ``{input name: np.ndarray}``.
        seed: the seed for any randomness an applier needs.
        excised: site address (``producer:value``) -> units already removed there, in the
            site's original numbering: by its own edit, or by another site's edit that reached
            it (a depthwise conv's groups, a residual branch, a layer sharing a weight);
            ``excise_site`` removes only the units left.
    """

    ir = "onnx"

    def __init__(self, model: onnx_ir.Model, batches: Sequence[dict[str, np.ndarray]], *,
                 seed: int = 0) -> None:
        if not isinstance(model, ir.Model):
            raise TypeError(f"OnnxTarget takes an onnx_ir.Model, got {type(model).__name__}; "
                            "load it with graphsurg.passes.onnx.adapter.OnnxAdapter.open")
        self.model = model
        self.batches = list(batches)
        self.seed = int(seed)
        self.excised: dict[str, set[int]] = {}

    def __repr__(self) -> str:
        return (f"OnnxTarget(graph={self.model.graph.name!r}, nodes={len(self.model.graph)}, "
                f"batches={len(self.batches)}, excised={ {k: len(v) for k, v in self.excised.items()} })")
