"""The torch IR adapter's verbs: observe is what diagnose judges, run, snapshot/restore,
halve, target, save; and a ReLU6 network lowered by torch.export (hardtanh(0, 6)) is judged
as relu6 (DeadNeurons), not as a saturating hardtanh."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import zoo
from graphsurg.passes.fx.adapter import TorchAdapter
from graphsurg.passes.fx.target import Target
from torch import nn

import graphsurg as gs
from graphsurg._config import DiagnoseConfig
from graphsurg._diagnose import diagnose_adapter, diagnosis_from
from graphsurg._ir import IRAdapter


def test_is_an_ir_adapter() -> None:
    a = TorchAdapter(zoo.dead_mlp().model)
    assert isinstance(a, IRAdapter)
    assert a.ir == "torch" and a.capabilities.gradients and a.capabilities.trainable


def test_observe_is_what_diagnose_reports() -> None:
    case = zoo.dead_cnn()
    cfg = DiagnoseConfig()
    a = TorchAdapter(case.model)
    m = a.observe(case.batches, cfg, loss_fn=case.loss_fn)
    assert m.ir == "torch" and m.capture == "export" and m.batches == len(case.batches)
    assert m.gradients and any(lm.grad_sq for lm in m.layers)
    d = gs.diagnose(case.model, case.batches, loss_fn=case.loss_fn)
    got = diagnosis_from(m, cfg)
    assert [(p.kind, p.site, p.units) for p in got.problems] == \
        [(p.kind, p.site, p.units) for p in d.problems]
    assert d.problems and all(p.site.ir == "torch" for p in d.problems)
    assert sorted(got.layers) == sorted(d.layers)
    # diagnose_adapter over the same adapter gives the same answer again: observe left the
    # working model as it was (BatchNorm statistics restored, no observer left behind)
    again = diagnose_adapter(a, case.batches, config=cfg, loss_fn=case.loss_fn)
    assert [(p.kind, p.site, p.units) for p in again.problems] == \
        [(p.kind, p.site, p.units) for p in d.problems]


def test_observe_leaves_the_working_model_unchanged() -> None:
    case = zoo.dead_cnn()  # BatchNorm in training mode: a forward moves its statistics
    case.model.train()
    a = TorchAdapter(case.model)
    before = {k: v.clone() for k, v in a.model.state_dict().items()}
    a.observe(case.batches, DiagnoseConfig(), loss_fn=case.loss_fn)
    after = a.model.state_dict()
    assert before.keys() == after.keys()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k
    assert all(p.grad is None for p in a.model.parameters())
    assert a.model.training


def test_run_is_eval_mode_and_matches_the_model() -> None:
    case = zoo.dead_cnn()
    case.model.train()
    a = TorchAdapter(case.model)
    outs = a.run(case.batches[:2])
    assert len(outs) == 2 and a.model.training  # mode restored
    case.model.eval()
    with torch.no_grad():
        ref = [case.model(b[0]) for b in case.batches[:2]]
    for o, r in zip(outs, ref, strict=True):
        # the same module in eval mode on the same input: bitwise equal is expected, the
        # tolerance only absorbs kernel selection differences
        torch.testing.assert_close(o, r, rtol=1e-6, atol=1e-6)


def test_snapshot_restore_round_trip() -> None:
    case = zoo.dead_mlp()
    a = TorchAdapter(case.model)
    x = case.batches[:1]
    before = a.run(x)
    snap = a.snapshot()
    t = a.target(x)
    assert isinstance(t, Target) and t.model is a.model
    t.replace_module("0", nn.Linear(16, 64))  # an edit through the target
    assert not torch.equal(a.run(x)[0], before[0])
    a.restore(snap)
    assert torch.equal(a.run(x)[0], before[0])
    assert t.model is a.model  # the target follows the restored model
    a.restore(snap)  # the snapshot stays usable
    assert torch.equal(a.run(x)[0], before[0])
    # the user's model was never touched
    assert torch.equal(case.model(x[0][0]).detach(), before[0])


def test_halve() -> None:
    a = TorchAdapter(nn.Linear(2, 2))
    x = torch.arange(10.0).reshape(5, 2)
    y = torch.arange(5)
    h = a.halve((x, y))
    assert h is not None
    (x1, y1), (x2, y2) = h
    assert torch.equal(torch.cat([x1, x2]), x) and torch.equal(torch.cat([y1, y2]), y)
    assert x1.shape[0] == 2 and y2.shape[0] == 3
    d = a.halve({"input": x, "scale": torch.tensor(2.0), "flag": True})
    assert d is not None and d[0]["scale"] == 2.0 and d[1]["flag"] is True
    assert torch.equal(d[1]["input"], x[2:])
    assert a.halve(x[:1]) is None  # one row cannot be split
    assert a.halve((x, torch.zeros(3))) is None  # rows disagree: no batch axis to split


def test_save_writes_an_exported_program(tmp_path: Path) -> None:
    case = zoo.dead_mlp()
    a = TorchAdapter(case.model)
    out = tmp_path / "m.pt2"
    assert a.save(out, example=case.batches[0]) == [out]
    ep = torch.export.load(str(out))
    x = case.batches[1][0]
    # the saved program is the working model in eval mode (same float32 math)
    torch.testing.assert_close(ep.module()(x), a.run([x])[0], rtol=1e-5, atol=1e-6)
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt2"]  # nothing left beside it
    with pytest.raises(gs.BadInputError, match="example"):
        TorchAdapter(case.model).save(tmp_path / "n.pt2")


class _MobileBlock(nn.Module):
    """MobileNet-style conv + BatchNorm + ReLU6, twice, then a classifier."""

    def __init__(self, clamp: bool = False) -> None:
        super().__init__()
        self.clamp = clamp  # ReLU6 written as torch.clamp(x, 0, 6) (exported as aten.clamp)
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.act1 = nn.ReLU6()
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.act2 = nn.ReLU6()
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn1(self.conv1(x))
        h = torch.clamp(h, 0.0, 6.0) if self.clamp else self.act1(h)
        h = self.act2(self.bn2(self.conv2(h)))
        return self.head(h.mean((2, 3)))


@pytest.mark.parametrize("clamp", [False, True], ids=["ReLU6", "clamp"])
def test_dead_relu6_channels_are_reported(clamp: bool) -> None:
    g = torch.Generator().manual_seed(0)
    model = _MobileBlock(clamp).eval()
    dead = (2, 5, 11)
    with torch.no_grad():
        for u in dead:  # BatchNorm shifts these channels far below zero: ReLU6 outputs 0
            model.bn1.bias[u] = -50.0
    batches = [torch.randn(8, 3, 8, 8, generator=g) for _ in range(2)]
    d = gs.diagnose(model, batches)
    assert d.capture == "export"
    (p,) = d.of_kind("DeadNeurons")
    assert p.site.op == "relu6" and p.site.module == "conv1" and p.site.ir == "torch"
    assert set(dead) <= set(p.evidence["dead"]) and len(p.evidence["dead"]) == len(dead)
    assert p.evidence["channel_dim"] == 1
    # the dead units are constant at 0: their values are what an excision folds
    for u, v in zip(p.evidence["constant"], p.evidence["constant_values"], strict=True):
        if u in dead:
            assert v == 0.0
    assert not d.of_kind("Saturation")  # relu6 is not a saturating hardtanh


def test_hardtanh_keeps_its_bounds_for_saturation() -> None:
    # hardtanh(-2, 2) driven far past its bounds: saturated against (-2, 2), not (-1, 1)
    model = nn.Sequential(nn.Linear(4, 8), nn.Hardtanh(-2.0, 2.0), nn.Linear(8, 2))
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.copy_(torch.tensor([5.0, -5.0, 1.5, 0.0, 0.5, -1.5, 9.0, 0.1]))
    d = gs.diagnose(model, [torch.randn(16, 4)])
    (p,) = d.of_kind("Saturation")
    assert p.units == (0, 1, 6) and p.site.op == "hardtanh"


def test_diagnose_shows_progress_through_the_console_bar(capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    """diagnose reports measured batches through graphsurg._console.progress (one bar for
    both IRs); with progress=False it is silent."""
    case = zoo.dead_mlp(0)
    gs.diagnose(case.model, case.batches, config=gs.DiagnoseConfig(progress=True))
    err = capsys.readouterr().err
    assert "measuring" in err and f"{len(case.batches)}" in err
    gs.diagnose(case.model, case.batches, config=gs.DiagnoseConfig(progress=False))
    assert capsys.readouterr().err == ""
