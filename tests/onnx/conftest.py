"""Fixtures of the ONNX adapter tests: models exported once per session (both exporters)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from _onnx_helpers import EXPORTERS  # noqa: F401  (re-exported for fixtures)
from _onnx_models import (
    CNN,
    MLP,
    SHAPES,
    ConcatBN,
    DyingMLP,
    PaddedTanhCNN,
    ResidualMLP,
    export,
)


@pytest.fixture(scope="session")
def onnx_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx_models")


_BUILDERS: dict[str, Callable[[], torch.nn.Module]] = {
    "mlp": MLP,
    "healthy_mlp": lambda: MLP(dead=False),
    "residual": ResidualMLP,
    "concat_bn": ConcatBN,
    "cnn": CNN,
    "padded_tanh": PaddedTanhCNN,
    "dying": DyingMLP,
}


@pytest.fixture(scope="session")
def exported(onnx_dir: Path) -> Callable[[str, bool], Path]:
    """``exported(name, dynamo)`` -> path of the exported model (cached per session)."""
    cache: dict[tuple[str, bool], Path] = {}

    def get(name: str, dynamo: bool = False) -> Path:
        key = (name, dynamo)
        if key not in cache:
            build, shape = _BUILDERS[name], SHAPES[name]
            path = onnx_dir / f"{name}_{'dynamo' if dynamo else 'legacy'}.onnx"
            cache[key] = export(build(), torch.randn(*shape), path, dynamo=dynamo)
        return cache[key]

    return get


