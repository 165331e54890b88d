"""ResidualBypass (block scale): skip paths over a span with vanishing gradient.

For each layer ``i`` of the span, with ``g_i`` the layer and its channel-local chain
(activation, dropout, BatchNorm) and ``P`` the identity when shapes match (else a learned
projection, orthogonally initialised):

* ``variant="residual"`` (bounded): ``x_{i+1} = g_i(x_i) - c_i + P(x_i)``. It changes the
  function and relies on healing; the gradient reaches the first layers through the identity
  paths at once.
* ``variant="gated"`` (exact): ``x_{i+1} = g_i(x_i) + alpha_i * (P(x_i) - c_i)`` with each
  ``alpha_i`` a new scalar parameter initialised to 0, which opens as it trains.

``c_i`` is the centre of the block's bounded activation (``graphsurg._activations``: sigmoid's
0.5, tanh's 0; 0 for unbounded ones and when a BatchNorm follows the activation). Without it
the residual stream of a positive activation grows by about ``c`` per layer: on the zoo's
24-layer sigmoid MLP the plain residual conversion treated the vanishing gradient and drove
13-14 later sigmoid layers into saturation; centred, the stream stays bounded and no new
problem appears (issue 13).

The trade-off, measured on the zoo's 24-layer plain sigmoid MLP: an edit that preserves the
function exactly cannot change the existing parameters' gradients at the moment of surgery.
With ``alpha = 0`` the gates had not opened after 100 Adam steps (first-layer gradient about
1.3x the untreated copy's), while the residual conversion healed for 100 steps gave a
first-layer gradient ~1e19x larger and a lower loss. The planner therefore picks
``residual`` unless the certificates demand exactness (or its output change breaks them, in
which case ``gated`` is the fallback). On a model ``symbolic_trace`` cannot capture, the
blocks are read from the ``torch.export`` graph and the skips are forward hooks on the
user's modules (:meth:`Target.attach_skip`): no existing parameter is renamed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._problems import Problem
from ..passes.fx.capture import activation_of_module, activation_of_node
from ..passes.fx.rewrite import RewriteError, block_bounds, insert_bypass, module_node
from ._base import Applied, Refused, Replacement, Target


class Bypass(nn.Module):
    """The skip branch ``alpha * (P(x) - centre)`` (gated) or ``P(x) - centre`` (residual);
    ``centre`` is the block activation's centre (subtracting it keeps the stream bounded)."""

    def __init__(self, proj: nn.Module, gated: bool, centre: float = 0.0) -> None:
        super().__init__()
        self.proj = proj
        self.gated = gated
        self.centre = float(centre)
        self.alpha = nn.Parameter(torch.zeros(())) if gated else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(x)
        if self.centre:
            y = y - self.centre
        return y * self.alpha if self.alpha is not None else y


def activation_centre(gm: Any, layer: str, end: Any) -> float:
    """The centre ``(low + high) / 2`` of the last bounded activation in the block of ``layer``
    (up to ``end``, see :func:`block_bounds`); 0 when there is none or a BatchNorm follows it
    (the norm re-centres the output)."""
    node, centre = module_node(gm, layer), 0.0
    while node is not end and len(node.users) == 1:
        node = next(iter(node.users))
        act = activation_of_node(gm, node)
        if act is not None:
            centre = (act.low + act.high) / 2.0 if act.bounded else 0.0  # type: ignore[operator]
        elif node.op == "call_module" and "BatchNorm" in type(gm.get_submodule(
                str(node.target))).__name__:
            centre = 0.0
    return centre


def _projection(layer: nn.Module, in_shape: tuple[int, ...], out_shape: tuple[int, ...],
                gen: torch.Generator) -> nn.Module:
    if in_shape == out_shape:
        return nn.Identity()
    if len(in_shape) == len(out_shape) and in_shape[:-1] == out_shape[:-1]:
        p: nn.Module = nn.Linear(in_shape[-1], out_shape[-1], bias=False)
    elif len(in_shape) >= 3 and len(in_shape) == len(out_shape) and \
            in_shape[0] == out_shape[0] and in_shape[2:] == out_shape[2:]:
        conv = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}[len(in_shape)]
        p = conv(in_shape[1], out_shape[1], 1, bias=False)
    else:
        raise Refused(f"no projection from {list(in_shape)} to {list(out_shape)}")
    w: Any = p.weight
    with torch.no_grad():
        flat = torch.empty(w.shape[0], w[0].numel())
        nn.init.orthogonal_(flat, generator=gen)
        w.copy_(flat.reshape(w.shape).to(w.dtype))
    ref: Any = getattr(layer, "weight", None)
    return p.to(ref.device) if isinstance(ref, torch.Tensor) else p


class ResidualBypass(Replacement):
    """Skip paths over a span of layers: residual conversion, or an exact zero-gated form."""

    name = "residual_bypass"
    treats = ("VanishingGradient",)
    scales = ("block",)
    guarantee = "bounded"
    judged_after_healing = True
    priority = 10

    def check(self, problem: Problem, target: Target) -> str | None:
        why = super().check(problem, target)
        if why:
            return why
        gm, _ = target.graph_module()
        for layer in self._span(problem):
            try:
                block_bounds(gm, layer) if gm is not None else target.module_block(layer)
            except (RewriteError, Refused) as e:
                return str(e)
        return None

    @staticmethod
    def _span(problem: Problem) -> tuple[str, ...]:
        return problem.span or (problem.site.module,)

    def structural_params(self, problem: Problem, exact: bool) -> dict[str, Any]:
        return {"variant": "gated" if exact else "residual"}

    def propose(self, problem: Problem, target: Target, *, exact: bool = False
                ) -> dict[str, Any]:
        variant = "gated" if exact else "residual"
        span = self._extend(problem, target)
        return {"variant": variant, "span": span, "exact": variant == "gated",
                "diagnosed_span": list(self._span(problem))}

    def _extend(self, problem: Problem, target: Target) -> list[str]:
        """The diagnosed span, extended downstream over the layers whose gradient is still
        attenuated (norm < 1e-2 x the largest layer's): the gradient of the first layer goes
        through all of them, so bypassing only the flagged ones leaves it vanishing. The last
        parametrised layer (the head) is never bypassed."""
        span = list(self._span(problem))
        ev = problem.evidence
        norms = ev.get("all_grad_norms") or ev.get("grad_norms") or {}
        if not norms or span[-1] not in norms:
            return span
        order = list(norms)
        top = max(float(v) for v in norms.values())
        gm, _ = target.graph_module()
        for layer in order[order.index(span[-1]) + 1: len(order) - 1]:
            if float(norms[layer]) >= 1e-2 * top:
                break
            try:
                block_bounds(gm, layer) if gm is not None else target.module_block(layer)
            except (RewriteError, Refused):
                break
            span.append(layer)
        return span

    def is_exact(self, params: dict[str, Any]) -> bool:
        return params.get("variant") == "gated"

    def exact_fallback(self, params: dict[str, Any]) -> dict[str, Any] | None:
        if params.get("variant") == "gated":
            return None
        return {**params, "variant": "gated", "exact": True}

    def apply_torch(self, target: Target, problem: Problem, params: dict[str, Any]) -> Applied:
        gm, _ = target.graph_module()
        gated = params.get("variant", "residual") == "gated"
        span = [str(s) for s in params.get("span") or self._span(problem)]
        applied = Applied(exact=gated, modules=list(span))
        gen = target.generator(f"bypass:{span[0]}")
        if gm is None:
            return _apply_on_modules(target, span, gated, applied, gen)
        names: list[str] = []
        centres: list[float] = []
        for layer in span:
            try:
                x, end = block_bounds(gm, layer)
            except RewriteError as e:
                raise Refused(str(e)) from None
            in_shape = tuple(x.meta["tensor_meta"].shape)
            out_shape = tuple(end.meta["tensor_meta"].shape)
            proj = _projection(gm.get_submodule(layer), in_shape, out_shape, gen)
            centre = activation_centre(gm, layer, end)
            centres.append(centre)
            mod = Bypass(proj, gated, centre)
            name = insert_bypass(gm, x, end, mod, f"gs_bypass_{layer}")
            names.append(name)
            applied.new_parameters += [f"{name}.{n}" for n, _ in mod.named_parameters()]
            if any(True for _ in mod.parameters()):
                applied.modules.append(name)
        target.set_model(gm)
        applied.details.update({"variant": "gated" if gated else "residual", "span": span,
                                "bypasses": names, "centres": centres})
        return applied


def _apply_on_modules(target: Target, span: list[str], gated: bool, applied: Applied,
                      gen: torch.Generator) -> Applied:
    """The bypasses as forward hooks on the module tree, blocks read from the exported
    graph (all blocks first: each edit invalidates the graph)."""
    blocks = [(layer, *target.module_block(layer)) for layer in span]
    shapes = [target.io_shapes(layer, end) for layer, end, _ in blocks]
    names, centres = [], []
    for (layer, end, modules), (in_shape, out_shape) in zip(blocks, shapes, strict=True):
        proj = _projection(target.model.get_submodule(layer), in_shape, out_shape, gen)
        centre = 0.0
        for path in modules[1:]:  # the last bounded activation; a BatchNorm re-centres
            act = activation_of_module(target.model.get_submodule(path))
            if act is not None:
                centre = (act.low + act.high) / 2.0 if act.bounded else 0.0  # type: ignore[operator]
            elif "BatchNorm" in type(target.model.get_submodule(path)).__name__:
                centre = 0.0
        centres.append(centre)
        mod = Bypass(proj, gated, centre)
        name = target.attach_skip(layer, end, mod, "gs_bypass")
        names.append(name)
        applied.new_parameters += [f"{name}.{n}" for n, _ in mod.named_parameters()]
        if any(True for _ in mod.parameters()):
            applied.modules.append(name)
    applied.details.update({"variant": "gated" if gated else "residual", "span": span,
                            "bypasses": names, "centres": centres, "blocks": {
                                layer: end for layer, end, _ in blocks}})
    return applied
