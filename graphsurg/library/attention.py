"""Attention (block scale): a zero-gated self-attention block, exact at insertion.

``y = x + alpha * Attn(LN(x))`` with ``alpha`` a new scalar parameter initialised to 0, put
after a site whose token mixing collapsed (``MixingCollapse``: the representations of a
sequence's positions span too few directions), or anywhere a plan asks for it
(``prefer=["attention"]`` with a problem at the site). The output is unchanged at insertion
(``alpha = 0``); the block helps only once ``alpha`` opens, so operate heals before judging it.

Works on sequence values ``(N, T, d)`` (tokens on dim 1) and spatial values
``(N, C, *spatial)`` (the positions are the tokens, channels the features). On a
``torch.fx``-traceable model the block is inserted after the site's layer block (the layer
and its activation); otherwise the site's module is wrapped (``Sequential(module, block)``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._problems import Problem
from ..passes.fx.rewrite import RewriteError, block_bounds
from ._base import Applied, Refused, Replacement, Target


class GatedAttention(nn.Module):
    """``x + alpha * MHA(LN(x))`` over the positions of ``x`` (``alpha`` starts at 0).

    Args:
        dim: features per position (``d`` of ``(N, T, d)`` or ``C`` of ``(N, C, ...)``).
        heads: attention heads (``dim`` must be divisible by it).
        spatial: the input is ``(N, C, *spatial)`` rather than ``(N, T, d)``.
    """

    def __init__(self, dim: int, heads: int, *, spatial: bool = False) -> None:
        super().__init__()
        self.spatial = spatial
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.alpha = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.flatten(2).transpose(1, 2) if self.spatial else x
        h = self.norm(t)
        a = self.attn(h, h, h, need_weights=False)[0]
        if self.spatial:
            a = a.transpose(1, 2).reshape(x.shape)
        return x + self.alpha * a


def _heads(d: int, want: int) -> int:
    for h in (want, 4, 2, 1):
        if h >= 1 and d % h == 0:
            return h
    return 1


class Attention(Replacement):
    """Insert a zero-gated self-attention block after a site (exact at insertion)."""

    name = "attention"
    treats = ("MixingCollapse",)
    scales = ("block",)
    guarantee = "exact"
    judged_after_healing = True
    priority = 20

    def _value(self, target: Target, problem: Problem) -> tuple[str, torch.Tensor]:
        """``(mode, example output)`` of the site: ``fx`` (after the layer's block) or
        ``wrap`` (the module's output)."""
        path = problem.site.module
        try:
            target.model.get_submodule(path)
        except AttributeError:
            raise Refused(f"the model has no module {path!r}") from None
        gm, _ = target.graph_module()
        if gm is not None:
            try:
                _, end = block_bounds(gm, path)
                meta = end.meta.get("tensor_meta")
                if meta is not None:
                    return "fx", torch.empty(tuple(meta.shape))
            except RewriteError:
                pass
        out = target.capture(path, output=True, batches=1)
        return "wrap", out

    def check(self, problem: Problem, target: Target) -> str | None:
        why = super().check(problem, target)
        if why:
            return why
        try:
            _, v = self._value(target, problem)
        except Refused as e:
            return str(e)
        if v.dim() < 3:
            return (f"the value at {problem.site.module!r} has shape {list(v.shape)}: no "
                    "positions to attend over (need (N, T, d) or (N, C, *spatial))")
        return None

    def propose(self, problem: Problem, target: Target, *, exact: bool = False
                ) -> dict[str, Any]:
        mode, v = self._value(target, problem)
        spatial = v.dim() > 3 or bool(problem.evidence.get("spatial", False))
        dim = int(v.shape[1] if spatial else v.shape[-1])
        return {"mode": mode, "spatial": spatial, "dim": dim,
                "heads": _heads(dim, int(problem.evidence.get("heads", 4))), "exact": True}

    def apply_torch(self, target: Target, problem: Problem, params: dict[str, Any]) -> Applied:
        p = {**self.propose(problem, target), **params}
        path = problem.site.module
        block = GatedAttention(int(p["dim"]), int(p["heads"]), spatial=bool(p["spatial"]))
        gen = target.generator(f"attention:{path}")
        with torch.no_grad():
            for prm in block.attn.parameters():
                if prm.dim() > 1:
                    nn.init.xavier_uniform_(prm, generator=gen)
        ref: Any = next(iter(target.model.get_submodule(path).parameters()), None)
        if isinstance(ref, torch.Tensor):
            block = block.to(device=ref.device, dtype=ref.dtype)
        name = target.insert_after(path, block, p["mode"], "gs_attention")
        applied = Applied(exact=True, modules=[name],
                          new_parameters=[f"{name}.{n}" for n, _ in block.named_parameters()])
        applied.details.update({"inserted": name, "spatial": bool(p["spatial"]),
                                "dim": int(p["dim"]), "heads": int(p["heads"]),
                                "gate": "alpha=0 at insertion"})
        return applied
