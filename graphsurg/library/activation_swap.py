"""ActivationSwap (layer scale): ReLU -> LeakyReLU / PReLU for a dying-ReLU layer.

Variants:

* ``"leaky"`` (bounded): ``LeakyReLU(negative_slope)``; dead units pass a small gradient
  again. The output changes by the negative parts; operate measures and certifies it.
* ``"prelu"`` (bounded): ``PReLU`` with one learned slope initialised to ``negative_slope``.
* ``"ramp"`` (exact): :class:`RampLeakyReLU` with its slope at 0 -- the same function as the
  ReLU at surgery -- raised linearly to ``negative_slope`` over the healing steps by the
  schedule :func:`ramp_schedule` (operate calls it; call it yourself when you train).

Only one activation is swapped: the one at the site (a module used at several places, or a
functional ``F.relu`` in an untraceable model, is refused).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .._problems import Problem
from ..passes.fx.rewrite import RewriteError, replace_node_with_module
from ._base import Applied, Refused, Replacement, Target

_RELUS = ("relu", "relu6")
#: the default negative slope of the leaky variants (torch.nn.LeakyReLU's default)
NEGATIVE_SLOPE = 0.01


class RampLeakyReLU(nn.Module):
    """A leaky ReLU whose negative slope is a buffer (set by :func:`ramp_schedule`)."""

    negative_slope: torch.Tensor

    def __init__(self, negative_slope: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("negative_slope", torch.tensor(float(negative_slope)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # prelu with a one-element weight is exactly a leaky ReLU of that slope, and captures
        # as an activation op (aten.prelu), so diagnosis still sees the site
        return F.prelu(x, self.negative_slope.to(x.dtype).reshape(1))

    def extra_repr(self) -> str:
        return f"negative_slope={float(self.negative_slope):.4g}"


def ramp_schedule(module: RampLeakyReLU, final_slope: float, steps: int
                  ) -> Callable[[int, int], None]:
    """``on_step(step, total)`` raising ``module``'s slope linearly from 0 to ``final_slope``
    over ``steps`` steps (or over ``total`` when ``steps`` is 0)."""

    def on_step(step: int, total: int) -> None:
        n = steps or total
        frac = min(1.0, (step + 1) / max(1, n))
        module.negative_slope.fill_(final_slope * frac)

    return on_step


class ActivationSwap(Replacement):
    """Swap the ReLU at a dying-ReLU site for a LeakyReLU/PReLU (or an exact ramped one)."""

    name = "activation_swap"
    treats = ("DeadNeurons",)
    scales = ("layer",)
    guarantee = "bounded"
    priority = 20
    reinit_companion = True
    live_edit = "module"
    graph_level = True
    fallback_needs_healing = True

    def _activation(self, problem: Problem, target: Target) -> tuple[str, str, str]:
        """``(op, module_path, node_name)`` of the activation at the site."""
        group = target.coupling(problem.site.module)
        act = group.activation()
        if act is None:
            raise Refused(f"no activation found after {problem.site.module!r}")
        if act.op not in _RELUS:
            raise Refused(f"the activation after {problem.site.module!r} is {act.op}, not a ReLU")
        if act.module:
            gm, _ = target.graph_module()
            if gm is not None:
                n = sum(1 for x in gm.graph.nodes if x.op == "call_module" and
                        x.target == act.module)
                if n != 1:
                    raise Refused(f"activation module {act.module!r} is used {n} times; "
                                  "swapping it would change other sites")
        elif group.source != "fx":
            raise Refused("a functional activation can only be swapped in a torch.fx graph")
        return act.op, act.module, act.node

    def check(self, problem: Problem, target: Any) -> str | None:
        why = super().check(problem, target)
        if why:
            return why
        if target.ir == "onnx":
            return None if problem.site.op == "relu" else (
                f"the activation at {problem.site.address} is {problem.site.op or 'unknown'}, "
                "not a relu")
        try:
            self._activation(problem, target)
        except Refused as e:
            return str(e)
        return None

    def propose(self, problem: Problem, target: Target, *, exact: bool = False
                ) -> dict[str, Any]:
        variant = "ramp" if exact else "leaky"
        return {"variant": variant, "negative_slope": NEGATIVE_SLOPE, "exact": variant == "ramp"}

    def graph_rewrite(self, params: dict[str, Any]) -> dict[str, Any] | None:
        if params.get("variant", "leaky") != "leaky":
            return None  # prelu adds a parameter; ramp needs a schedule over training steps
        return {"activation": "leaky_relu",
                "negative_slope": float(params.get("negative_slope", NEGATIVE_SLOPE))}

    def live_editable(self, params: dict[str, Any]) -> bool:
        return params.get("variant") != "prelu"  # a PReLU adds a parameter the optimiser lacks

    def apply_onnx(self, target: Any, problem: Problem, params: dict[str, Any]) -> Applied:
        """Relu -> LeakyRelu at the site's value (the onnxscript ``relu_to_leaky_relu`` rule
        restricted to it). Bounded: the output changes by ``slope x`` the negative parts."""
        from ..passes.onnx.relu_to_leaky_relu import swap_site

        variant = params.get("variant", "leaky")
        if variant != "leaky":
            raise Refused(f"activation_swap variant {variant!r} is not available on ONNX (the "
                          "ramp needs healing steps and a PReLU a trainable slope); use "
                          "variant='leaky'")
        if problem.site.op != "relu":
            raise Refused(f"the activation at {problem.site.address} is "
                          f"{problem.site.op or 'unknown'}, not a relu")
        slope = float(params.get("negative_slope", NEGATIVE_SLOPE))
        node = swap_site(target.model, problem.site.node, slope)
        left = set(problem.units) - target.excised.get(problem.site.address, set())
        return Applied(exact=False, modules=[problem.site.module], units=sorted(left),
                       details={"variant": variant, "negative_slope": slope, "node": node})

    def is_exact(self, params: dict[str, Any]) -> bool:
        return params.get("variant") == "ramp"

    def exact_fallback(self, params: dict[str, Any]) -> dict[str, Any] | None:
        if params.get("variant") == "ramp":
            return None
        return {**params, "variant": "ramp", "exact": True}

    def apply_torch(self, target: Target, problem: Problem, params: dict[str, Any]) -> Applied:
        _, mod_path, node_name = self._activation(problem, target)
        slope = float(params.get("negative_slope", NEGATIVE_SLOPE))
        variant = params.get("variant", "leaky")
        new: nn.Module
        if variant == "leaky":
            new = nn.LeakyReLU(slope)
        elif variant == "prelu":
            new = nn.PReLU(1, init=slope)
        elif variant == "ramp":
            new = RampLeakyReLU(0.0)
        else:
            raise Refused(f"unknown activation_swap variant {variant!r}")
        applied = Applied(exact=variant == "ramp", modules=[problem.site.module])
        if mod_path:
            target.replace_module(mod_path, new)
            where = mod_path
        else:
            gm, reason = target.graph_module()
            if gm is None:
                raise Refused(f"cannot rewrite {node_name!r}: {reason}")
            node = next((n for n in gm.graph.nodes if n.name == node_name), None)
            if node is None:
                raise Refused(f"node {node_name!r} is not in the graph")
            try:
                where = replace_node_with_module(gm, node, new,
                                                 f"gs_act_{problem.site.module}")
            except RewriteError as e:
                raise Refused(str(e)) from None
            target.set_model(gm)
        applied.new_parameters += [f"{where}.{n}" for n, _ in new.named_parameters()]
        if isinstance(new, RampLeakyReLU):
            applied.on_step = ramp_schedule(new, slope, int(params.get("ramp_steps", 0)))
        applied.details.update({"variant": variant, "negative_slope": slope, "module": where})
        return applied
