"""graphsurg.onnx -- graphsurg as an ONNX optimizer pass.

``analyze`` calibrates a model with onnxruntime and returns a :class:`graphsurg.Diagnosis`;
``apply`` runs the passes listed by ``get_available_passes`` (excise dead units losslessly,
factor low-rank weights, swap dying ReLUs, clean up), verifies each on held-out batches with
onnxruntime and rolls back any that breaks the certificates; ``rules`` gives the local
rewrites as an onnxscript ``RewriteRuleSet``. Olive surgeons live in ``graphsurg.passes.onnx.olive``.

Example:
    >>> from graphsurg import onnx as gso
    >>> diagnosis = gso.analyze("model.onnx", "calib.npz")
    >>> path, report = gso.apply("model.onnx", "calib.npz", output="model.small.onnx")
    >>> print(report.summary())
"""

from graphsurg.passes.onnx._apply import ApplyReport as ApplyReport
from graphsurg.passes.onnx._apply import PassRecord as PassRecord
from graphsurg.passes.onnx._apply import analyze as analyze
from graphsurg.passes.onnx._apply import apply as apply
from graphsurg.passes.onnx._apply import rules as rules
from graphsurg.passes.onnx._base import Refusal as Refusal
from graphsurg.passes.onnx._common import OnnxInputError as OnnxInputError
from graphsurg.passes.onnx._common import load_model as load_model
from graphsurg.passes.onnx._common import save_model as save_model
from graphsurg.passes.onnx._registry import PASSES as PASSES
from graphsurg.passes.onnx._registry import get_available_passes as get_available_passes

__all__ = [
    "PASSES",
    "ApplyReport",
    "OnnxInputError",
    "PassRecord",
    "Refusal",
    "analyze",
    "apply",
    "get_available_passes",
    "load_model",
    "rules",
    "save_model",
]
