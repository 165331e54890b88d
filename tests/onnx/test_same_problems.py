"""One rule set for both IRs: every zoo network and its ONNX export, diagnosed on the same
batches, have the same problems -- kind, activation, units, and the site mapped between IRs.

Export: ``torch.onnx.export(..., dynamo=False)`` (the TorchScript exporter: offline, fast, and
it names every node after the module that emitted it, ``/<module path with />/<OpType>[_k]``).
The dynamo exporter needs ``dynamic_shapes`` keyed by the forward's own argument names and
takes seconds per model; the adapter handles its graphs too (``test_onnx_analyze``).

Mapping an ONNX site to a torch module path (:func:`torch_path`): a layer node whose weight
is an initializer named ``<path>.weight`` is ``<path>`` (so an ``nn.MultiheadAttention``'s
out-projection Gemm is ``attn.out_proj``); any other node is the scope in its name
(``/fc1/MatMul`` -> ``fc1``, ``/0/Gemm`` -> ``0``, ``/Relu`` -> ``""``, torch's owner of a
top-level function call).

No ``loss_fn``: gradient problems are torch-only (an ONNX model has no gradients here).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
import torch
from graphsurg.passes.onnx.adapter import OnnxAdapter
from graphsurg.passes.onnx.observe import layer_weight, node_label

import graphsurg as gs
from graphsurg import _zoo
from graphsurg.onnx import analyze


def export_legacy(model: torch.nn.Module, example: torch.Tensor, path: Path) -> Path:
    model.eval()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), dynamo=False, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "batch"}})
    return path


def torch_path(model: ir.Model, onnx_module: str) -> str:
    """The torch module path of an ONNX site's ``module`` (see the module documentation)."""
    for i, n in enumerate(model.graph):
        if node_label(n, i) != onnx_module:
            continue
        lw = layer_weight(n)
        if lw is not None and (lw[0].name or "").endswith(".weight"):
            return (lw[0].name or "").removesuffix(".weight")
        break
    return ".".join(onnx_module.split("/")[1:-1])


def _key(kind: str, module: str, op: str, units: tuple[int, ...]) -> tuple[object, ...]:
    return (kind, module, op, units)


@pytest.mark.parametrize("name", sorted(_zoo.ZOO))
def test_torch_and_onnx_find_the_same_problems(name: str, tmp_path: Path) -> None:
    case = _zoo.build(name)
    path = export_legacy(case.model, case.example_input(), tmp_path / f"{name}.onnx")
    feeds = [{"x": b[0].numpy()} for b in case.batches]

    d_torch = gs.diagnose(case.model, case.batches)
    d_onnx = analyze(path, feeds)
    model, _ = OnnxAdapter.open(path)

    assert all(p.site.ir == "onnx" for p in d_onnx.problems)
    got = [_key(p.kind, torch_path(model.model, p.site.module), p.site.op, p.units)
           for p in d_onnx.problems]
    want = [_key(p.kind, p.site.module, p.site.op, p.units) for p in d_torch.problems]
    assert got == want
    # not vacuous: every planted problem a diagnosis without gradients can see is found
    visible = [t for t in case.truth if t.kind not in ("VanishingGradient", "ExplodingGradient")]
    for t in visible:
        assert any(k == t.kind and m == t.module and set(t.units) <= set(u)
                   for k, m, _, u in got), (name, t)


def test_the_mapping_covers_attention_projections(tmp_path: Path) -> None:
    case = _zoo.build("transformer_block")
    path = export_legacy(case.model, case.example_input(), tmp_path / "t.onnx")
    adapter, _ = OnnxAdapter.open(path)
    m = adapter.observe([{"x": case.batches[0][0].numpy()}], gs.DiagnoseConfig())
    paths = {torch_path(adapter.model, lm.module) for lm in m.layers}
    assert paths == {"embed", "attn", "attn.out_proj", "fc1", "fc2", "head"}
    # weights oriented like torch's: fc1's MatMul holds fc1.weight transposed
    fc1 = next(lm for lm in m.layers if torch_path(adapter.model, lm.module) == "fc1")
    assert lm_weight_equal(fc1.weight, case.model.fc1.weight)


def lm_weight_equal(a: torch.Tensor | None, b: torch.Tensor) -> bool:
    assert a is not None
    return a.shape == b.shape and np.array_equal(a.numpy(), b.detach().numpy())
