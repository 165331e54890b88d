"""graphsurg.passes.onnx -- the ONNX IR adapter: calibration with onnxruntime, onnx-ir passes
and onnxscript rules. The public face is :mod:`graphsurg.onnx`; this package holds one pass
per module (``excise_dead_units``, ``relu_to_leaky_relu``, ``factor_low_rank``, ``cleanup``),
the adapter (``adapter``: :class:`OnnxAdapter`, ``analyze``) and its observation with
onnxruntime (``observe``), the model on the table (``target``) and the Olive surgeons
(``olive``).

Importing it loads nothing heavy; the modules are imported where they are used.
"""
