"""Helpers of the ONNX adapter tests: calibration feeds and the checks every rewrite test makes
(onnxruntime equality, op types, size, full_check)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from _onnx_models import SHAPES

# both torch exporters: legacy (TorchScript) and dynamo
EXPORTERS = [pytest.param(False, id="legacy"), pytest.param(True, id="dynamo")]


def input_shape(name: str, rows: int = 64) -> tuple[int, ...]:
    return (rows, *SHAPES[name][1:])


def feeds(name: str, n: int = 8, rows: int = 64, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    shape = input_shape(name, rows)
    return [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(n)]


def run_ort(model: onnx.ModelProto | Path | str, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    sess = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    return sess.run(None, feed)


def assert_same_outputs(a: object, b: object, feed: dict[str, np.ndarray], rtol: float) -> None:
    """Outputs agree within ``rtol`` relative to the largest reference magnitude."""
    ra, rb = run_ort(a, feed), run_ort(b, feed)  # type: ignore[arg-type]
    for x, y in zip(ra, rb, strict=True):
        assert x.shape == y.shape
        scale = max(float(np.abs(x).max()), 1e-12)
        assert float(np.abs(x.astype(np.float64) - y).max()) <= rtol * scale


def op_types(model: onnx.ModelProto | Path | str) -> list[str]:
    p = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    return [n.op_type for n in p.graph.node]


def n_params(model: onnx.ModelProto | Path | str) -> int:
    p = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    return sum(int(np.prod(t.dims)) for t in p.graph.initializer)


def full_check(model: onnx.ModelProto | Path | str) -> None:
    onnx.checker.check_model(
        model if isinstance(model, onnx.ModelProto) else str(model), full_check=True
    )


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
