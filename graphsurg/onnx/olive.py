"""graphsurg.onnx.olive -- Microsoft Olive ``GraphSurgeries`` surgeons, one per graphsurg pass.

Importing this module registers them with Olive (needs ``olive-ai``); see
:mod:`graphsurg.passes.onnx.olive` for the details.
"""

from graphsurg.passes.onnx.olive import SURGEONS as SURGEONS
from graphsurg.passes.onnx.olive import GraphsurgCleanup as GraphsurgCleanup
from graphsurg.passes.onnx.olive import GraphsurgExciseDeadUnits as GraphsurgExciseDeadUnits
from graphsurg.passes.onnx.olive import GraphsurgFactorLowRank as GraphsurgFactorLowRank
from graphsurg.passes.onnx.olive import GraphsurgReluToLeakyRelu as GraphsurgReluToLeakyRelu

__all__ = [
    "SURGEONS",
    "GraphsurgCleanup",
    "GraphsurgExciseDeadUnits",
    "GraphsurgFactorLowRank",
    "GraphsurgReluToLeakyRelu",
]
