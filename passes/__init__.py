"""graphsurg.passes -- IR adapters: torch.fx (``graphsurg.passes.fx``) and ONNX
(``graphsurg.passes.onnx``)."""
