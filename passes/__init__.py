"""graphsurg.passes -- the IR adapters: torch.fx (``graphsurg.passes.fx``) and ONNX
(``graphsurg.passes.onnx``). They build on ``graphsurg.kernels`` and the data model only; the
spine (diagnose, plan, operate, verify) sits above them (DESIGN.md, "The spine and its
adapters")."""
