"""diagnose's contract: the input model is untouched, data forms, config, JSON, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
import zoo
from torch import nn
from torch.nn import functional as F

import graphsurg as gs


def _snapshot(model: nn.Module) -> dict[str, object]:
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grads": [p.grad for p in model.parameters()],
    }


def test_input_model_is_not_modified() -> None:
    case = zoo.dead_cnn()  # has BatchNorm: running stats must not move
    model = case.model
    model.train()
    model.conv1.weight.requires_grad_(False)
    before = _snapshot(model)
    gs.diagnose(model, case.batches, loss_fn=case.loss_fn)
    after = _snapshot(model)
    for k, v in before["state"].items():  # type: ignore[union-attr]
        assert torch.equal(v, after["state"][k]), k  # type: ignore[index]
    assert before["training"] == after["training"]
    assert before["requires_grad"] == after["requires_grad"]
    assert all(g is None for g in after["grads"])  # type: ignore[union-attr]
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks


def test_frozen_layers_get_no_gradient_verdict() -> None:
    case = zoo.deep_sigmoid()
    for p in case.model[0].parameters():
        p.requires_grad_(False)
    d = gs.diagnose(case.model, case.batches, loss_fn=case.loss_fn)
    assert d.layers["0"].grad_norm is None
    (p,) = d.of_kind("VanishingGradient")
    assert "0" not in p.span and p.span[0] == "2"


def test_data_forms_and_max_batches() -> None:
    case = zoo.dead_mlp()
    xs = [b[0] for b in case.batches]
    d1 = gs.diagnose(case.model, xs)  # plain tensors
    d2 = gs.diagnose(case.model, iter(case.batches))  # a one-shot iterator of tuples
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.cat(xs), torch.cat([b[1] for b in case.batches])),
        batch_size=128,
    )
    d3 = gs.diagnose(case.model, loader, config=gs.DiagnoseConfig(max_batches=3))
    assert d1.batches == d2.batches == 8 and d3.batches == 3
    for d in (d1, d2, d3):
        assert sorted(p.site.module for p in d.of_kind("DeadNeurons")) == ["0", "2"]

    class KW(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = copy.deepcopy(case.model)

        def forward(self, features: torch.Tensor) -> torch.Tensor:
            return self.inner(features)

    d4 = gs.diagnose(KW(), [{"features": x} for x in xs])
    assert sorted(p.site.module for p in d4.of_kind("DeadNeurons")) == ["inner.0", "inner.2"]


def test_last_batch_of_another_size() -> None:
    case = zoo.dead_mlp()
    data = [*case.batches, (case.batches[0][0][:7], case.batches[0][1][:7])]
    d = gs.diagnose(case.model, data, loss_fn=case.loss_fn)
    assert d.batches == 9 and d.capture == "export"
    assert d.layers["0:relu"].count == 8 * 128 + 7


def test_json_round_trip() -> None:
    case = zoo.dead_mlp()
    d = gs.diagnose(case.model, case.batches, loss_fn=case.loss_fn)
    d2 = gs.Diagnosis.from_json(d.to_json())
    assert d2.problems == d.problems
    assert [p.evidence for p in d2.problems] == [p.evidence for p in d.problems]
    assert d2.layers.keys() == d.layers.keys()
    assert d2.to_json() == d.to_json()
    assert "DeadNeurons" in d.summary() and "0:relu" in d.summary()
    with pytest.raises(ValueError, match="not a graphsurg diagnosis"):
        gs.Diagnosis.from_json('{"problems": []}')


class DataDependent(nn.Module):
    """Python control flow on tensor values: neither torch.export nor symbolic_trace
    captures it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 32)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(32, 2)
        with torch.no_grad():
            self.fc1.bias[:4] = -50.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc1(x))
        if float(h.sum()) > 0:
            h = h * 1.0
        return self.fc2(h)


def test_uncapturable_model_falls_back_to_hooks() -> None:
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(64, 8, generator=g), torch.randn(64, 2, generator=g)) for _ in range(3)]
    d = gs.diagnose(DataDependent(), data, loss_fn=lambda o, b: F.mse_loss(o, b[1]))
    assert d.capture == "hooks"
    assert any("export failed" in n for n in d.notes)
    (p,) = d.of_kind("DeadNeurons")
    assert p.site.module == "fc1" and p.evidence["dead"] == [0, 1, 2, 3]
    assert d.gradients_checked and d.layers["fc1"].grad_norm is not None


def test_bad_input_errors_are_one_line() -> None:
    case = zoo.dead_mlp()
    with pytest.raises(gs.BadInputError, match="no batches"):
        gs.diagnose(case.model, [])
    with pytest.raises(gs.BadInputError, match="rejected batch 0") as e:
        gs.diagnose(case.model, [torch.randn(4, 5)])
    assert "\n" not in str(e.value)
    with pytest.raises(gs.BadInputError, match="not iterable"):
        gs.diagnose(case.model, 42)  # type: ignore[arg-type]
    with pytest.raises(gs.BadInputError, match="single tensor"):
        gs.diagnose(case.model, torch.randn(4, 16))
    with pytest.raises(gs.BadInputError, match="must be a torch.nn.Module"):
        gs.diagnose(lambda x: x, [torch.randn(4, 16)])  # type: ignore[arg-type]
    with pytest.raises(gs.BadInputError, match="loss_fn failed"):
        gs.diagnose(case.model, case.batches, loss_fn=lambda o, b: o + "x")
    with pytest.raises(gs.BadInputError, match="scalar"):
        gs.diagnose(case.model, case.batches, loss_fn=lambda o, b: o)


def test_nan_inputs_are_a_problem_not_a_crash() -> None:
    case = zoo.healthy_mlp()
    x, y = case.batches[0]
    x = x.clone()
    x[0, 0] = float("nan")
    d = gs.diagnose(case.model, [(x, y)], loss_fn=case.loss_fn)
    kinds = [(p.kind, p.evidence.get("where")) for p in d.problems]
    assert ("NonFinite", "input") in kinds
    assert d.problems[0].site.module == "<input>"


class ReversedDeepSigmoid(nn.Module):
    """Layers registered in reverse of the order they run, and a data-dependent branch, so
    the hooks fallback must order layers by their calls, not by registration."""

    def __init__(self, depth: int = 16, width: int = 32) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([nn.Linear(width if i < depth - 1 else 16, width)
                                     for i in range(depth)])
        self.head = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in reversed(self.layers):
            x = torch.sigmoid(layer(x))
        if float(x.sum()) > -1:
            x = x * 1.0
        return self.head(x)


def test_hooks_fallback_orders_layers_by_forward_calls() -> None:
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(64, 16, generator=g), torch.randn(64, 4, generator=g))
            for _ in range(2)]
    d = gs.diagnose(ReversedDeepSigmoid(), data, loss_fn=lambda o, b: F.mse_loss(o, b[1]))
    assert d.capture == "hooks"
    (p,) = d.of_kind("VanishingGradient")
    assert p.span[0] == "layers.15"  # the first layer to run
    assert list(p.span) == [f"layers.{15 - i}" for i in range(len(p.span))]
