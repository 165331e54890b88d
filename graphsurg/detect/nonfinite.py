"""NonFinite: NaN/Inf in the inputs, activations, outputs or gradients, at the first site it
appears.

Inputs, then the first observed site with a non-finite value, then -- when no observed site
had one -- the model's final outputs (``Measurements.output_nonfinite``: the ONNX adapter
counts them; a non-finite value born after the last observed site shows only there), then
gradients (backward starts at the output, so the last layer with a non-finite gradient).
"""

from __future__ import annotations

from graphsurg._config import DiagnoseConfig
from graphsurg._problems import Problem, Site

from . import Measurements


def detect_nonfinite(m: Measurements, config: DiagnoseConfig) -> list[Problem]:
    out: list[Problem] = []
    if m.input_nonfinite:
        out.append(Problem("NonFinite", Site("<input>", "", "input", ir=m.ir), 1.0,
                           evidence={"where": "input", "count": m.input_nonfinite}))
    for s in sorted(m.sites, key=lambda s: s.order):
        n = int(s.stats.n_nonfinite.sum())
        if n:
            units = tuple(int(u) for u in s.stats.n_nonfinite.nonzero().flatten().tolist())
            out.append(Problem("NonFinite", Site(s.module, s.node, s.op, ir=m.ir), 1.0, units=units,
                               evidence={"where": "activation", "count": n,
                                         "first_site": s.node}))
            break
    if len(out) > (1 if m.input_nonfinite else 0):
        return out  # non-finite outputs and gradients follow from non-finite activations
    if m.output_nonfinite and not m.input_nonfinite:
        out.append(Problem("NonFinite", Site("<output>", "", "output", ir=m.ir), 1.0,
                           evidence={"where": "output", "count": m.output_nonfinite}))
        return out
    for lm in sorted(m.layers, key=lambda lm: -lm.order):  # backward starts at the output
        if lm.grad_nonfinite:
            out.append(Problem("NonFinite", Site(lm.module, "", lm.kind, ir=m.ir), 1.0,
                               evidence={"where": "gradient", "count": 1}))
            break
    return out
