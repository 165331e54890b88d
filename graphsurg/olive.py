"""Microsoft Olive integration: one ``GraphSurgeries`` surgeon per graphsurg ONNX pass.

An integration above the spine (it runs the :func:`graphsurg.onnx.apply` facade), so it lives
beside the facade, not under ``graphsurg.passes``. Importing this module (``import
graphsurg.olive``; it needs ``olive-ai``) registers the surgeons with Olive (by lower-case class name); then an
Olive workflow can name them::

    {"type": "GraphSurgeries",
     "surgeries": [{"surgeon": "GraphsurgExciseDeadUnits", "data": "calib.npz"}]}

Each surgeon takes the calibration data (an ``.npz`` path, a feed dict or a list of them),
optional certificates (a dict of :class:`graphsurg.Certificates` fields) and ``allow_inexact``
(needed by the function-changing ``GraphsurgReluToLeakyRelu``) as constructor arguments, runs :func:`graphsurg.onnx.apply` with its one pass (plus ``cleanup``) on the
``ir.Model`` Olive hands it, verifies with onnxruntime, and returns the new model; a pass that
breaks the certificates is rolled back, so the surgeon then returns the model unchanged. The
last ``SurgeryResult`` is kept on ``surgeon.report``.
"""

from __future__ import annotations

from typing import Any

import onnx_ir as ir
from olive.passes.onnx.graph_surgeries import Surgeon

from graphsurg._certificates import Certificates
from graphsurg.onnx import apply


class _GraphsurgSurgeon(Surgeon):
    pass_name = ""

    def __init__(
        self,
        data: Any,
        certificates: dict[str, Any] | None = None,
        batch_size: int = 64,
        allow_inexact: bool = False,
    ) -> None:
        super().__init__()
        self.data = data
        self.certificates = Certificates.from_dict(certificates or {})
        self.batch_size = batch_size
        self.allow_inexact = allow_inexact
        self.report: Any = None  # graphsurg.SurgeryResult

    def call_ir(self, model: ir.Model) -> ir.Model:
        out, self.report = apply(
            model,
            self.data,
            [self.pass_name],
            certificates=self.certificates,
            batch_size=self.batch_size,
            allow_inexact=self.allow_inexact,
        )
        return out


class GraphsurgExciseDeadUnits(_GraphsurgSurgeon):
    """Olive surgeon for graphsurg's ``excise_dead_units`` pass."""

    pass_name = "excise_dead_units"


class GraphsurgFactorLowRank(_GraphsurgSurgeon):
    """Olive surgeon for graphsurg's ``factor_low_rank`` pass."""

    pass_name = "factor_low_rank"


class GraphsurgReluToLeakyRelu(_GraphsurgSurgeon):
    """Olive surgeon for graphsurg's ``relu_to_leaky_relu`` pass."""

    pass_name = "relu_to_leaky_relu"


class GraphsurgCleanup(_GraphsurgSurgeon):
    """Olive surgeon for graphsurg's ``cleanup`` pass."""

    pass_name = "cleanup"


# the private base registered itself too: keep only the usable surgeons in Olive's registry
Surgeon.registry.pop("_graphsurgsurgeon", None)

SURGEONS: dict[str, type[_GraphsurgSurgeon]] = {
    c.pass_name: c
    for c in (GraphsurgExciseDeadUnits, GraphsurgFactorLowRank, GraphsurgReluToLeakyRelu, GraphsurgCleanup)
}
