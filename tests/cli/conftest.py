"""Helpers for the CLI tests: run ``python -m graphsurg`` in a subprocess, with this folder on
PYTHONPATH so ``_cli_models:...`` specs import."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

HERE = Path(__file__).parent


@pytest.fixture
def gs_run(tmp_path: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
        env["OMP_NUM_THREADS"] = "1"
        return subprocess.run([sys.executable, "-m", "graphsurg", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=timeout)

    return run


@pytest.fixture(scope="session")
def dead_mlp_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(model.pt2, data.npz, data.pt) for the zoo's dead-unit MLP."""
    import numpy as np
    import torch

    from graphsurg._zoo import dead_mlp

    d = tmp_path_factory.mktemp("files")
    case = dead_mlp(0)
    ep = torch.export.export(case.model, (case.batches[0][0],),
                             dynamic_shapes=({0: torch.export.Dim.AUTO},))
    torch.export.save(ep, d / "model.pt2")
    x = torch.cat([b[0] for b in case.batches[:4]])
    y = torch.cat([b[1] for b in case.batches[:4]])
    np.savez(d / "data.npz", x=x.numpy(), y=y.numpy())
    torch.save({"x": x, "y": y}, d / "data.pt")
    return d / "model.pt2", d / "data.npz", d / "data.pt"
