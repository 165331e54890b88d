"""VanishingGradient / ExplodingGradient: per-layer gradient norms against the median layer.

A layer's gradient norm is the root mean square over batches of the norm of all its
parameters' gradients. It vanishes below ``vanishing_ratio`` x the median layer's norm (or
below ``vanishing_abs``) and explodes above ``exploding_ratio`` x the median. When both
happen, the side that holds the output layer is where gradients enter and is not reported.
Consecutive affected layers (in forward order) form one problem whose ``span`` a residual
bypass covers.

Design is not disease: only layers *without a parallel path around them* are judged
(``LayerMeasure.bypassed`` is not True). A layer in a residual branch, behind a gate or a
squeeze-excite multiply, has its gradient scaled by whatever the design put there --
LayerScale's ``gamma`` initialised at 1e-6, a zero-initialised last layer or gate (ReZero,
Fixup) -- while the bypass carries the gradient on to earlier layers undiminished: a small
(or, against a median of such layers, a large) gradient there is the designed scale, not a
signal that cannot reach the layers before it. Such layers are left out of the median too, so
they do not make the plain layers look exploding; they break spans. A vanishing gradient is
thus a chain of consecutive plain layers, which is what a residual bypass treats. Without a
graph (``bypassed`` None) every layer is judged.
"""

from __future__ import annotations

import math
import statistics

from graphsurg._config import DiagnoseConfig
from graphsurg._problems import Problem, Site

from . import LayerMeasure, Measurements


def layer_grad_norms(m: Measurements) -> dict[str, float]:
    return {
        lm.module: math.sqrt(lm.grad_sq)
        for lm in sorted(m.layers, key=lambda lm: lm.order)
        if lm.grad_sq is not None and math.isfinite(lm.grad_sq)
    }


def detect_gradients(m: Measurements, config: DiagnoseConfig) -> list[Problem]:
    if not m.gradients:
        return []
    norms = layer_grad_norms(m)
    layers = [lm for lm in sorted(m.layers, key=lambda lm: lm.order) if lm.module in norms]
    judged = [lm for lm in layers if not lm.bypassed]
    if len(judged) < 2:
        return []
    median = statistics.median(norms[lm.module] for lm in judged)
    out: list[Problem] = []

    def ratio(lm: LayerMeasure) -> float:
        return norms[lm.module] / median if median > 0 else 0.0

    for kind, test in (
        ("VanishingGradient",
         lambda lm: norms[lm.module] < config.vanishing_abs or ratio(lm) < config.vanishing_ratio),
        ("ExplodingGradient", lambda lm: median > 0 and ratio(lm) > config.exploding_ratio),
    ):
        run: list[LayerMeasure] = []
        for lm in [*layers, None]:
            if lm is not None and not lm.bypassed and test(lm):
                run.append(lm)
                continue
            if run:
                ratios = [ratio(x) for x in run]
                out.append(
                    Problem(
                        kind=kind,
                        site=Site(run[0].module, "", run[0].kind, ir=m.ir),
                        severity=min(1.0, len(run) / len(judged)),
                        span=tuple(x.module for x in run),
                        evidence={
                            "grad_norms": {x.module: norms[x.module] for x in run},
                            "all_grad_norms": norms,
                            "median": median,
                            "judged_layers": len(judged),
                            "min_ratio": min(ratios),
                            "max_ratio": max(ratios),
                            "threshold": config.vanishing_ratio
                            if kind == "VanishingGradient" else config.exploding_ratio,
                        },
                    )
                )
            run = []
    return _drop_entry_side(out, judged)


def _drop_entry_side(found: list[Problem], layers: list[LayerMeasure]) -> list[Problem]:
    """Gradients enter at the output layer. When norms both vanish and explode against the
    median, the side holding the output layer is where they enter, not a second problem:
    report only the other side (a deep plain sigmoid net is *vanishing*, not exploding at
    its head)."""
    kinds = {p.kind for p in found}
    if kinds != {"VanishingGradient", "ExplodingGradient"}:
        return found
    last = layers[-1].module
    entry = next((p.kind for p in found if last in p.span), None)
    return [p for p in found if p.kind != entry] if entry else found
