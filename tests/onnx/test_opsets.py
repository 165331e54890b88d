"""Opsets 11 through the newest the exporters write (issue 15, "Producers and opsets").

The same CNN with dead channels planted in both convolutions (conv -> relu -> conv -> relu
-> flatten -> linear, plus a GELU MLP head whose GELU is Erf-form below opset 20 and one
``Gelu`` op from 20) is exported by the legacy exporter at opsets 11, 13, 15, 17 and 20
(its newest) and by the dynamo exporter at 18 and its default; ``graphsurg.onnx.apply``
excises the dead units at every opset and keeps onnxruntime's outputs within the exact
tolerance (1e-5 relative, graphsurg's default certificate) on held-out inputs, and the
written model keeps its opset.
"""

from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from graphsurg import onnx as gso
from tests.onnx._onnx_models import plant_dead

DEAD_C1, DEAD_C2, DEAD_FC = [0, 3], [2, 5], [1, 4, 9]


class GeluCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=0)
        self.fc1 = nn.Linear(8 * 4 * 4, 16)
        self.fc2 = nn.Linear(16, 5)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        plant_dead(self.c1, DEAD_C1)
        plant_dead(self.c2, DEAD_C2)
        plant_dead(self.fc1, DEAD_FC)  # GELU(-1e3) == 0 exactly in float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.c1(x))
        h = torch.relu(self.c2(h))
        return self.fc2(nn.functional.gelu(self.fc1(torch.flatten(h, 1))))


def _export(dynamo: bool, opset: int | None) -> onnx.ModelProto:
    buf = io.BytesIO()
    kw: dict = {"input_names": ["x"], "dynamo": dynamo}
    if opset is not None:
        kw["opset_version"] = opset
    if dynamo:
        kw["dynamic_shapes"] = {"x": {0: torch.export.Dim("batch", min=1, max=1024)}}
    else:
        kw["dynamic_axes"] = {"x": {0: "batch"}}
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(GeluCNN().eval(), (torch.randn(2, 3, 6, 6),), buf, **kw)
    return onnx.load_from_string(buf.getvalue())


def _opset(m: onnx.ModelProto) -> int:
    return next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))


def _run(m: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {"x": x})[0]


@pytest.mark.parametrize("dynamo,opset", [
    (False, 11), (False, 13), (False, 15), (False, 17), (False, 20), (True, 18), (True, None),
], ids=["legacy-11", "legacy-13", "legacy-15", "legacy-17", "legacy-20", "dynamo-18",
        "dynamo-default"])  # fmt: skip
def test_excise_at_every_opset(dynamo: bool, opset: int | None) -> None:
    proto = _export(dynamo, opset)
    before = _opset(proto)
    if opset is not None:
        assert before == opset
    rng = np.random.default_rng(0)
    calib = [{"x": rng.uniform(-1, 1, (16, 3, 6, 6)).astype(np.float32)} for _ in range(3)]
    held = rng.uniform(-1, 1, (32, 3, 6, 6)).astype(np.float32)
    out, res = gso.apply(proto, calib)
    kept = res.kept_at("excise_dead")
    removed = sorted(v.details["width_before"] - v.details["width_after"] for v in kept)
    # both convolutions and the GELU layer lose exactly their planted units
    assert removed == sorted([len(DEAD_C1), len(DEAD_C2), len(DEAD_FC)]), (
        removed, [r for _, r in res.plan.untreated], res.rolled_back)
    assert res.size["params_after"] < res.size["params_before"]
    assert _opset(out) == before
    onnx.checker.check_model(out)
    ref, new = _run(proto, held).astype(np.float64), _run(out, held).astype(np.float64)
    rel = np.linalg.norm(new - ref) / np.linalg.norm(ref)
    assert rel <= 1e-5, rel
