"""Widen (layer scale): Net2WiderNet for a bottleneck layer, exact at surgery.

Two ways to make the new units, both exact at surgery (``Widen(symmetry=...)``):

* ``"pairs"`` (the default): the new units come in pairs; both units of a pair get the same
  freshly drawn incoming row (the layer's initialiser times ``row_scale``, bias 0) and
  opposite outgoing columns ``+a`` / ``-a`` (``a`` drawn with the consumer's initialiser
  times ``column_scale``), so the pair's contributions cancel exactly and the output is
  unchanged. The pair's incoming rows receive opposite
  gradients and part at once; their outgoing columns receive equal gradients and stop
  cancelling: new units start as diverse as a freshly initialised layer's. An odd one out
  gets a fresh row and a zero outgoing column. Existing units are untouched.

  ``row_scale`` (default 0.25) and ``column_scale`` (default 2.0) scale the fresh rows and
  the columns ``a``: the new units start in their activation's near-linear range and, with
  the larger ``a``, a pair's parting moves the output sooner. Neither changes exactness (a
  pair cancels whatever its row and column). Measured on benchmarks/efficacy experiment 3
  (MLP 32-64-4-64-16 widened 4 -> 32 after 400 steps, then 800 steps; held-out MSE, 5 seeds,
  paired against the scales 1.0 / 1.0): (0.25, 2.0) 0.0315 +- 0.0020 vs 0.0320 +- 0.0023,
  lower on 5 of 5 seeds (seeds 0-4; 5 of 5 on seeds 5-9 too, -0.00046 +- 0.00011); row scale
  0.25 alone -0.0004 (5 of 5), 0.1 / 0.03 / 0.01 -0.0005 / -0.0004 / -0.0004 (4 of 5), 2.0
  +0.0009 (0 of 5); column scale 2.0 alone -0.0001 (4 of 5), 0.5 +0.0002, 4.0 0.0000. Tried
  there and not adopted: fresh rows orthogonal to the old units' rows (+0.00002) and
  GradMax-style columns (the top singular vectors of E[dL/du x^T], +0.0001; rows too,
  +0.0002). The wide network trained from scratch for the same total steps is still ahead
  (0.0307): see benchmarks/efficacy/FINDINGS.md.
* ``"copies"``: Net2Net proper, described next.

In ``"copies"`` mode new units are copies of existing ones (round-robin over the sources): the producer's rows
(and bias) are copied, a BatchNorm between producer and consumers gets the source channel's
affine parameters *and running statistics* copied (a popular public Net2Net port re-creates
the BatchNorm instead and changes the outputs by tens of percent), and every consumer's
columns for a source and its copies are divided by the number of copies. Symmetry is broken
by noise added in function-preserving pairs on the outgoing columns: copy ``+eps``, source
``-eps`` -- the copies compute the same activation as their source, so the sum is unchanged.

Widening adds units; it does not make a rank-collapsed weight full rank at surgery (the new
rows are copies) -- training after surgery uses the new capacity. It does not cure dormancy.
Hugging Face's ``Conv1D`` (GPT-2) is a layer like a Linear (its units are weight columns).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .._problems import Problem
from ._base import Applied, Refused, Replacement, Target
from ._edit import (
    consumer_index,
    coupled,
    draw_rows,
    get_layer,
    in_features,
    install_width_change,
    resized,
    weight_rows,
    width_of,
)


class Widen(Replacement):
    """Net2WiderNet: add units split from existing ones, function-preserving (exact)."""

    name = "widen"
    treats = ("Bottleneck",)
    scales = ("layer",)
    guarantee = "exact"
    judged_after_healing = True  # the new units are copies until trained
    priority = 20  # after factor_low_rank for a rank-collapsed weight (that one is exact)
    renumbers_units = True
    preserves_width = False
    symmetries = ("pairs", "copies")

    def __init__(self, *, symmetry: str = "pairs", row_scale: float = 0.25,
                 column_scale: float = 2.0) -> None:
        """``symmetry``: ``"pairs"`` (fresh units in output-cancelling pairs) or ``"copies"``
        (Net2Net copies with function-preserving noise); ``row_scale`` / ``column_scale``:
        the pairs' fresh incoming rows / outgoing columns as a multiple of the layer's /
        the consumer's initialiser (``"pairs"`` only); see the module docstring."""
        if symmetry not in self.symmetries:
            raise ValueError(f"Widen(symmetry={symmetry!r}): unknown mode; use one of "
                             f"{list(self.symmetries)}")
        for n, v in (("row_scale", row_scale), ("column_scale", column_scale)):
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"Widen({n}={v!r}): must be a positive finite number")
        self.symmetry = symmetry
        self.row_scale = float(row_scale)
        self.column_scale = float(column_scale)

    def check(self, problem: Problem, target: Target) -> str | None:
        why = super().check(problem, target)
        if why:
            return why
        try:
            get_layer(target, problem.site.module)
            coupled(target, problem.site.module, changes_width=True)
        except Refused as e:
            return str(e)
        return None

    def propose(self, problem: Problem, target: Target, *, exact: bool = False
                ) -> dict[str, Any]:
        layer = get_layer(target, problem.site.module)
        group = coupled(target, problem.site.module, changes_width=True)
        width = width_of(layer)
        neighbours = [in_features(layer)] + [
            width_of(get_layer(target, c.module)) for c in group.consumers]
        new_width = max(2 * width, min(neighbours) // 2)
        return {"new_width": int(new_width), "noise": 1e-2, "exact": True,
                "symmetry": self.symmetry, "row_scale": self.row_scale,
                "column_scale": self.column_scale}

    def apply_torch(self, target: Target, problem: Problem, params: dict[str, Any]) -> Applied:
        path = problem.site.module
        layer = get_layer(target, path)
        group = coupled(target, path, changes_width=True)
        width = width_of(layer)
        new_width = int(params["new_width"])
        if new_width <= width:
            raise Refused(f"new_width={new_width} does not widen {path!r} (width {width})")
        pairs = params.get("symmetry", "copies") == "pairs"
        init_scales = {"row_scale": float(params.get("row_scale", self.row_scale)),
                       "column_scale": float(params.get("column_scale", self.column_scale))}
        n_new = new_width - width
        if pairs:  # both units of a pair name the same source (BatchNorm/PReLU channel)
            src = list(range(width)) + [(k // 2) % width for k in range(n_new)]
        else:
            src = list(range(width)) + [k % width for k in range(n_new)]
        sidx = torch.tensor(src, dtype=torch.long)
        counts = torch.bincount(sidx, minlength=width).to(weight_rows(layer).dtype)
        if pairs:
            counts = torch.ones_like(counts)  # existing units keep their outgoing weights
        gen = target.generator(f"widen:{path}")
        applied = Applied(exact=True, modules=[path])
        new_mods: dict[str, torch.nn.Module] = {}
        for c in group.consumers:
            cm = get_layer(target, c.module)
            cidx = consumer_index(c, in_features(cm), width, src)
            w = weight_rows(cm).detach().index_select(1, cidx).clone()
            s = c.stride
            block = slice(c.start, c.start + new_width * s)
            if pairs:
                _pair_columns(w, c.start, s, width, new_width, gen, init_scales["column_scale"])
                new_mods[c.module] = resized(cm, w, None if cm.bias is None
                                             else cm.bias.detach())
                continue
            scale = counts[sidx].repeat_interleave(s)
            shape = [1, -1] + [1] * (w.dim() - 2)
            w[:, block] = w[:, block] / scale.reshape(shape)
            # symmetry breaking: +eps on each copy, -eps on its source (sum unchanged)
            std = float(w[:, block].std()) if w[:, block].numel() > 1 else 1.0
            eps_scale = float(params.get("noise", 1e-2)) * std
            for k in range(width, new_width):
                j = src[k]
                eps = torch.randn(w[:, c.start + k * s: c.start + (k + 1) * s].shape,
                                  generator=gen, dtype=torch.float32).to(w.dtype) * eps_scale
                w[:, c.start + k * s: c.start + (k + 1) * s] += eps
                w[:, c.start + j * s: c.start + (j + 1) * s] -= eps
            new_mods[c.module] = resized(cm, w, None if cm.bias is None else cm.bias.detach())
        install_width_change(target, applied, group, path, layer, sidx, new_mods)
        if pairs:
            _fresh_rows(get_layer(target, path), width, new_width, gen, init_scales["row_scale"])
        applied.details.update({"width_before": width, "width_after": new_width,
                                "symmetry": "pairs" if pairs else "copies",
                                **(init_scales if pairs else {}),
                                "consumers": [c.module for c in group.consumers],
                                "batchnorms": group.batchnorms(), "coupling": group.source})
        return applied


def _pair_columns(w: torch.Tensor, start: int, stride: int, width: int, new_width: int,
                  gen: torch.Generator, scale: float = 1.0) -> None:
    """Write the new units' outgoing columns of one consumer weight ``w`` (already indexed to
    ``new_width`` units) in place: ``+a`` / ``-a`` per pair, 0 for an odd one out; ``a`` is
    drawn with nn.Linear's initialiser for the consumer's new fan-in, times ``scale``."""
    bound = scale / math.sqrt(max(1, w[0].numel()))
    for k in range(width, new_width, 2):
        cols = slice(start + k * stride, start + (k + 1) * stride)
        if k + 1 >= new_width:
            w[:, cols] = 0.0
            break
        a = (torch.rand(w[:, cols].shape, generator=gen, dtype=torch.float32) * 2 - 1) * bound
        w[:, cols] = a.to(w.dtype)
        w[:, start + (k + 1) * stride: start + (k + 2) * stride] = -a.to(w.dtype)


def _fresh_rows(layer: Any, width: int, new_width: int, gen: torch.Generator,
                scale: float = 1.0) -> None:
    """Give each pair of new units (and an odd one out) one fresh incoming row drawn with the
    layer's initialiser times ``scale``, bias 0: both units of a pair compute the same
    activation."""
    n = new_width - width
    rows = draw_rows(layer, (n + 1) // 2, gen) * scale
    with torch.no_grad():
        for i, k in enumerate(range(width, new_width)):
            weight_rows(layer)[k] = rows[i // 2]
            if layer.bias is not None:
                layer.bias[k] = 0.0
