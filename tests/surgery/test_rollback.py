"""Per-site rollback, on both IRs: ten dead-unit sites, one of whose units fires only on the
held-out batches -> nine excisions kept, that one rolled back (found by bisection), with its
reason; the kept excisions leave the held-out output within the exact tolerance."""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import graphsurg as gs
from graphsurg import onnx as gso
from graphsurg._verify import culprits

BRANCHES, WIDTH, DEAD = 10, 8, (1, 3, 5)
SLEEPER = 6  # the branch whose unit 0 fires only when x[:, 0] > 20 (held-out batches only)
EXACT = 1e-5  # float32 round-off of an exact edit (Certificates.exact_tolerance)


class TenSites(nn.Module):
    """Ten ReLU branches over the same input, summed: ten dead-unit sites."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.inp = nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in range(BRANCHES))
        self.out = nn.ModuleList(nn.Linear(WIDTH, 4) for _ in range(BRANCHES))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            for i, lin in enumerate(self.inp):
                lin.weight[list(DEAD)] = 0.0
                lin.bias[list(DEAD)] = -1e3  # never fires
                if i == SLEEPER:
                    lin.weight[DEAD[0]] = 0.0
                    lin.weight[DEAD[0], 0] = 100.0  # fires when x[:, 0] > 10
                    lin.bias[DEAD[0]] = -1e3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.out[0](torch.relu(self.inp[0](x)))
        for a, b in zip(self.inp[1:], self.out[1:], strict=True):
            y = y + b(torch.relu(a(x)))
        return y


def _batches() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(32, WIDTH, generator=g) for _ in range(3)]
    held = torch.randn(32, WIDTH, generator=g)
    held[::4, 0] = 40.0  # wakes the sleeper's unit
    return calib, [held]


def _site_of(site: str) -> int | None:
    """The branch index of a site address (torch ``inp.6:...``, ONNX ``/inp.6/Gemm:...``)."""
    for i in range(BRANCHES):
        if f"inp.{i}/" in site or site.startswith(f"inp.{i}:"):
            return i
    return None


def _check(res: gs.SurgeryResult) -> None:
    kept = {_site_of(res.verification[i].site) for i in res.kept}
    rolled = {_site_of(r["site"]): r["reason"] for r in res.rolled_back}
    assert kept == set(range(BRANCHES)) - {SLEEPER}, res.summary()
    assert list(rolled) == [SLEEPER], res.summary()
    assert "held-out" in rolled[SLEEPER] and "bisection" in rolled[SLEEPER]
    assert all(res.verification[i].replacement == "excise_dead" for i in res.kept)
    assert "rolled back: #" in res.summary()


def test_torch_per_site_rollback() -> None:
    model = TenSites().eval()
    calib, held = _batches()
    res = gs.operate(model, calib, held_out=held, prefer=("excise_dead",))
    _check(res)
    # nine layers are narrower by the three dead units; the sleeper's layer keeps its width
    widths = [lin.out_features for lin in res.model.inp]
    assert widths == [WIDTH - len(DEAD) if i != SLEEPER else WIDTH for i in range(BRANCHES)]
    with torch.no_grad():  # the result is exact on the held-out batch: float64 reference
        ref = model.double()(held[0].double())
        got = res.model.double()(held[0].double())
    assert float((got - ref).norm() / ref.norm()) <= EXACT


def _export(model: nn.Module, path: Path) -> Path:
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(2, WIDTH),), str(path), input_names=["x"],
                          dynamic_axes={"x": {0: "batch"}}, dynamo=False)
    return path


def test_onnx_per_site_rollback(tmp_path: Path) -> None:
    model = TenSites().eval()
    calib, held = _batches()
    path = _export(model, tmp_path / "ten.onnx")
    feeds = [{"x": b.numpy()} for b in calib + held]  # the last quarter (one batch) is held out
    out, res = gso.apply(str(path), feeds, output=tmp_path / "out.onnx")
    _check(res)
    assert not res.ok and res.size["params_after"] == (
        res.size["params_before"] - (BRANCHES - 1) * len(DEAD) * (WIDTH + 1 + 4))
    import onnxruntime as ort

    a = ort.InferenceSession(str(path)).run(None, feeds[-1])[0].astype(np.float64)
    b = ort.InferenceSession(out).run(None, feeds[-1])[0].astype(np.float64)
    assert np.linalg.norm(b - a) / np.linalg.norm(a) <= EXACT
    onnx.checker.check_model(out, full_check=True)


@pytest.mark.parametrize(("bad", "n"), [({6}, 10), ({0, 9}, 10), (set(), 7), ({0}, 1)])
def test_culprits_bisects(bad: set[int], n: int) -> None:
    calls: list[list[int]] = []

    def fails(group: list[int]) -> bool:
        calls.append(group)
        return bool(bad & set(group))

    assert culprits(list(range(n)), fails) == sorted(bad)
    if len(bad) == 1 and n == 10:
        assert len(calls) <= 2 * 4 + 1  # about 2 log2 n, far fewer than one build per edit


def test_culprits_finds_an_edit_that_fails_only_with_others() -> None:
    # 3 breaks the bound only together with 1 (say, two small changes adding up): 1 is kept
    def fails(group: list[int]) -> bool:
        return {1, 3} <= set(group)

    assert culprits([0, 1, 2, 3], fails) == [3]
