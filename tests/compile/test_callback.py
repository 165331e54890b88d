"""gs.SurgeryCallback on a compiled training loop."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import graphsurg as gs
from graphsurg._zoo import dead_mlp
from graphsurg.library import ActivationSwap, Library, Widen


def _loop(model: nn.Module, case, steps: int, every: int | None,  # type: ignore[no-untyped-def]
          library: Library | None = None):
    mon = gs.Monitor(every=2)
    c = torch.compile(model, backend="graphsurg", options={"monitor": mon, "inner": "aot_eager"})
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    cb = gs.SurgeryCallback(model, opt, mon, every=every, library=library) if every else None
    losses = []
    for step in range(steps):
        b = case.batches[step % len(case.batches)]
        loss = case.loss_fn(c(b[0]), b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if cb is not None:
            cb.step(b)
    return c, cb, losses


def test_callback_revives_dead_units_and_beats_untreated() -> None:
    case = dead_mlp(0, n_batches=8, batch_size=64)
    treated_model = copy.deepcopy(case.model)
    c, cb, treated = _loop(treated_model, case, 48, every=8)
    assert cb is not None
    first = next(e for e in cb.history if e.applied)
    assert first.applied == ["reinit_dead at 0", "reinit_dead at 2"]
    assert first.optimizer_states_reset > 0
    x = case.batches[0][0]
    torch.testing.assert_close(c(x), treated_model(x), atol=1e-6, rtol=1e-5)  # no stale graph
    after = gs.diagnose(treated_model, case.batches, loss_fn=case.loss_fn)
    assert after.of_kind("DeadNeurons") == []
    torch._dynamo.reset()
    _, _, untreated = _loop(copy.deepcopy(case.model), case, 48, every=None)
    assert sum(treated[-8:]) < sum(untreated[-8:])


def test_activation_swap_in_place_recompiles_and_rolls_back() -> None:
    case = dead_mlp(0, n_batches=4, batch_size=64)
    model = copy.deepcopy(case.model)
    c, cb, _ = _loop(model, case, 4, every=4, library=Library([ActivationSwap()]))
    assert cb is not None
    ev = cb.history[-1]
    assert ev.applied == ["activation_swap at 0"]
    # the -50-bias units of layer 2 turn into large negative outputs under a leaky ReLU:
    # the output change breaks max_output_change=0.5 and that edit alone is undone
    assert len(ev.rolled_back) == 1
    assert ev.rolled_back[0].startswith("activation_swap at 2: rolled back: output change")
    assert isinstance(model[1], nn.LeakyReLU) and isinstance(model[3], nn.ReLU)
    x = case.batches[0][0]
    out = c(x)
    torch.testing.assert_close(out, model(x), atol=1e-6, rtol=1e-5)  # the new graph runs
    before = copy.deepcopy(model)
    before[1] = nn.ReLU()
    assert not torch.allclose(out, before(x))


def test_shape_changing_schemas_are_reported_not_applied() -> None:
    case = dead_mlp(0, n_batches=4, batch_size=64)
    model = copy.deepcopy(case.model)
    mon = gs.Monitor(every=1)
    c = torch.compile(model, backend="graphsurg", options={"monitor": mon, "inner": "eager"})
    for b in case.batches:
        case.loss_fn(c(b[0]), b).backward()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cb = gs.SurgeryCallback(model, opt, mon, every=1, library=Library([Widen()]))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ev = cb.operate(case.batches[0])
    assert ev.applied == [] and ev.reported
    assert all("apply it with gs.operate" in r or "untreated" in r or "no plan" in r
               for r in ev.reported)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_callback_bad_arguments() -> None:
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(gs.BadInputError, match="every must be an int"):
        gs.SurgeryCallback(model, opt, gs.Monitor(), every=0)
    with pytest.raises(gs.BadInputError, match="must be a graphsurg.Monitor"):
        gs.SurgeryCallback(model, opt, object(), every=1)  # type: ignore[arg-type]
    with pytest.raises(gs.BadInputError, match="not the torch.compile wrapper"):
        gs.SurgeryCallback(torch.compile(model), opt, gs.Monitor())  # type: ignore[arg-type]


def test_exact_ramp_swap_raises_slope_over_the_next_steps() -> None:
    case = dead_mlp(0, n_batches=4, batch_size=64)
    model = copy.deepcopy(case.model)
    mon = gs.Monitor(every=1)
    c = torch.compile(model, backend="graphsurg", options={"monitor": mon, "inner": "eager"})
    for b in case.batches:
        case.loss_fn(c(b[0]), b).backward()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    cb = gs.SurgeryCallback(model, opt, mon, every=4, library=Library([ActivationSwap()]),
                            certificates=gs.Certificates(require_exact=True))
    ev = cb.operate(case.batches[0])
    assert ev.applied == ["activation_swap at 0", "activation_swap at 2"]  # exact: slope 0
    ramp = model[1]
    assert float(ramp.negative_slope) == 0.0
    for b in case.batches[:2]:
        cb.step(b)
    assert 0.0 < float(ramp.negative_slope) < 0.01  # half-way up the ramp (2 of 4 steps)
    x = case.batches[0][0]
    torch.testing.assert_close(c(x), model(x), atol=1e-6, rtol=1e-5)  # the buffer is an input
