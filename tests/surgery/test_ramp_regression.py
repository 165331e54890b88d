"""Regression: the exact ramp swap (applied when the leaky swap breaks the output-change
bound) must be healed -- its slope only rises while training -- and its site must stay
visible to diagnosis, so the no-dead-units certificate is not passed vacuously."""

from __future__ import annotations

import torch
import zoo

import graphsurg as gs
from graphsurg.library.activation_swap import RampLeakyReLU


def test_ramp_fallback_is_healed_and_diagnosed() -> None:
    case = zoo.dead_mlp()
    res = gs.operate(case.model, case.batches, loss_fn=case.loss_fn, prefer=["activation_swap"],
                     heal_steps=20, certificates=gs.Certificates(max_output_change=1e-6,
                                                                 max_loss_increase=10.0))
    ramps = [m for m in res.model.modules() if isinstance(m, RampLeakyReLU)]
    assert ramps, res.summary()
    assert res.healing.get("steps") == 20, "the ramp must be healed for its slope to rise"
    assert all(float(m.negative_slope) > 0 for m in ramps)
    # diagnosis still sees the swapped sites (prelu is an activation op)
    d = gs.diagnose(res.model, case.batches)
    assert {r.activation for r in d.layers.values() if r.kind == "activation"} >= {"prelu"}


def test_ramp_at_zero_slope_is_exactly_relu() -> None:
    x = torch.randn(64, 32)
    assert torch.equal(RampLeakyReLU(0.0)(x), torch.relu(x))
    assert torch.allclose(RampLeakyReLU(0.1)(x), torch.nn.functional.leaky_relu(x, 0.1))


def test_summary_counts_resolved_by_module() -> None:
    """A rewrite renumbers later graph nodes (relu_2 -> relu_1): a problem still at the same
    module is not 'resolved' because its node name changed."""
    import dataclasses

    case = zoo.dead_mlp()
    res = gs.operate(case.model, case.batches, loss_fn=case.loss_fn, heal_steps=5,
                     certificates=gs.Certificates(max_loss_increase=10.0))
    assert res.after is not None
    # pretend every problem is still there after surgery, under renamed nodes
    res.after.problems = [
        dataclasses.replace(p, site=dataclasses.replace(p.site, node=p.site.node + "_renamed"))
        for p in res.before.problems
    ]
    n = len(res.before.problems)
    assert f"problems: {n} before, {n} after (0 resolved)" in res.summary()
