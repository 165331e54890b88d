"""graphsurg.passes.onnx -- the ONNX IR adapter: calibration with onnxruntime, onnx-ir passes
and onnxscript rules. The public face is :mod:`graphsurg.onnx` (``analyze``, ``apply``); this
package holds one pass per module (``excise_dead_units``, ``relu_to_leaky_relu``,
``low_rank``, ``cleanup``, on the base in ``_pass``), the adapter (``adapter``:
:class:`OnnxAdapter`) and its observation with onnxruntime (``observe``) and the model on the
table (``target``). The Olive surgeons are an integration above the spine:
:mod:`graphsurg.olive`.

Importing it loads nothing heavy; the modules are imported where they are used.
"""
