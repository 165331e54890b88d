"""ReinitDead (neuron scale): ReDo's reset of dormant units, exact at surgery.

For each treated unit ``u`` of a producer layer:

* its incoming weights are re-drawn with the layer's initialiser (nn.Linear's / nn.Conv's
  kaiming-uniform(a=sqrt 5), as ReDo does) and its bias is zeroed. With the default
  ``init="calibrated"`` each drawn unit is then checked on the calibration data: a trained
  layer's live rows grow far beyond the initialiser's scale (CREPE's conv5: row norms ~13
  against the draw's ~0.6), so a fresh unit's mean ``|act(z)|`` is ~1% of the layer's and
  the unit is dormant by ReDo's own score (``<= tau`` of the layer mean) the moment it is
  reset, on held-out data too. A unit whose score on the calibration data (the detector's:
  over every unit of the layer, the redrawn ones included) is below ``REVIVE * tau``
  (``tau`` from the problem's evidence) gets its bias set to minus its
  median pre-activation when it fires on under a quarter of the inputs (data-dependent
  init: it then fires on about half), and its row and bias scaled up so its score is
  ``REVIVE * tau`` -- the smallest change that clears the threshold with margin; units
  that already pass keep ReDo's draw untouched. ``init="layer"`` is ReDo's draw without
  the check; ``init="median_live"`` rescales every drawn row to the median norm of the
  live rows (the efficacy benchmark measured that rescale costing held-out loss:
  benchmarks/efficacy). The check applies to a ReLU-family activation right after the
  layer (no BatchNorm between: that one is reset to standardise the unit, below; no gate);
* a BatchNorm between the layer and the activation gets channel ``u`` reset: weight 1,
  bias 0, running statistics set to the new unit's statistics on the calibration data (so the
  unit fires about half the time in eval mode as well as in training);
* every consumer's input columns for ``u`` (from the channel-coupling analysis) are zeroed,
  after folding the unit's mean contribution into the consumer's bias (its mean on the
  calibration data, or ``params["unit_means"]`` when the caller knows better, e.g. a
  monitor's running mean while the calibration batch is one example).

A gated unit (``act(gate(x)) * up(x)``, the evidence names the up projection ``partner``)
is reset in the gate *and* its partners (both rows re-drawn, their biases zeroed); its
consumer columns are zeroed as above, so the reset unit starts contributing 0 whatever the
new rows compute. Hugging Face's ``Conv1D`` (GPT-2) is a layer like a Linear (its units are
weight columns).

When the treated units are constant on the data (dead, not only dormant) the fold is exact
and so is the edit. Dormant-but-varying units and saturated units are treated the same way
and the (small) output change is measured. Units whose rows hold NaN/Inf (a ``NonFinite``
problem) are reset the same way. Pair it with :func:`graphsurg.reset_optimizer_state`: ReDo's
authors found that stale Adam moments kill reset units again.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from .._activations import REFERENCES, family
from .._problems import Problem
from ..passes.fx.coupling import CouplingGroup
from ._base import Applied, Refused, Replacement, Target
from ._edit import (
    column_dim,
    column_stats,
    draw_rows,
    fold_constant,
    gated,
    get_layer,
    is_constant,
    partners_of,
    unit_dim,
    weight_rows,
    width_of,
    zero_columns,
)


class ReinitDead(Replacement):
    """Re-initialise dormant units' incoming weights, zero their outgoing weights (ReDo)."""

    name = "reinit_dead"
    treats = ("DeadNeurons", "Saturation", "NonFinite")
    scales = ("neuron",)
    guarantee = "exact"
    priority = 10
    reinitialises_units = True
    live_edit = "parameters"
    inits = ("calibrated", "layer", "median_live")
    #: a calibrated unit's target score, in units of the detector's ``tau``: 3x margin over
    #: the dormancy threshold for the held-out data's spread
    REVIVE = 3.0
    #: a drawn unit is adjusted when its score is at most ``CHECK * tau`` (flagged, or within
    #: a factor 2 of it); ReDo's draws above that are kept as drawn
    CHECK = 2.0

    def __init__(self, *, init: str = "calibrated") -> None:
        """``init``: how a reset unit's incoming weights are drawn -- ``"calibrated"`` (the
        layer's plain initialiser, then units that would be dormant on the calibration data
        re-centred and scaled just past the threshold), ``"layer"`` (the plain initialiser
        alone, ReDo's choice) or ``"median_live"`` (that draw rescaled to the median norm of
        the layer's live rows)."""
        if init not in self.inits:
            raise ValueError(f"ReinitDead(init={init!r}): unknown initialisation; use one of "
                             f"{list(self.inits)}")
        self.init = init

    def check(self, problem: Problem, target: Target) -> str | None:
        why = super().check(problem, target)
        if why:
            return why
        try:
            get_layer(target, problem.site.module)
            units = self._units(problem, target)
            self._group(problem, target, units)
        except Refused as e:
            return str(e)
        if not units:
            return f"no units to reset at {problem.site.module!r}"
        return None

    @staticmethod
    def _group(problem: Problem, target: Target, units: list[int]) -> CouplingGroup:
        """The coupling group proven at ``units``; where a consumer reads the units together
        with another tensor (a residual add, a gate) zeroing its columns cuts that tensor too,
        so the edit is allowed only where those columns are constant on the data (the fold
        then restores them exactly)."""
        path = problem.site.module
        group, _ = gated(target, path, partners_of(problem), units)
        if group.mixed:
            for c in group.consumers:
                mean, var = column_stats(target, c, units)
                if not bool(is_constant(mean, var).all()):
                    raise Refused(f"cannot reset units of {path!r}: {'; '.join(group.mixed)}; "
                                  f"zeroing {c.module!r}'s columns would cut the other tensor")
        return group

    def _units(self, problem: Problem, target: Target) -> list[int]:
        layer = get_layer(target, problem.site.module)
        if problem.kind == "NonFinite":
            bad = ~torch.isfinite(weight_rows(layer).detach()).flatten(1).all(1)
            if layer.bias is not None:
                bad |= ~torch.isfinite(layer.bias.detach())
            units = [int(i) for i in bad.nonzero().flatten()]
            if not units:
                raise Refused(f"{problem.site.module!r} has no non-finite weights: the "
                              "non-finite values come from its input")
            return units
        width = width_of(layer)
        units = sorted({int(u) for u in problem.units})
        if any(u < 0 or u >= width for u in units):
            raise Refused(f"units {units} do not fit {problem.site.module!r} (width {width})")
        if len(units) >= width:
            raise Refused(f"every unit of {problem.site.module!r} is flagged; resetting the "
                          "whole layer is not a neuron-scale edit")
        return units

    def propose(self, problem: Problem, target: Target, *, exact: bool = False
                ) -> dict[str, Any]:
        units = self._units(problem, target)
        group = self._group(problem, target, units)
        constant = problem.kind != "NonFinite"
        if constant:
            for c in group.consumers:
                mean, var = column_stats(target, c, units)
                constant = constant and bool(is_constant(mean, var).all())
        return {"units": units, "exact": bool(constant), "init": self.init}

    def apply_torch(self, target: Target, problem: Problem, params: dict[str, Any]) -> Applied:
        path = problem.site.module
        get_layer(target, path)
        units = [int(u) for u in params.get("units") or self._units(problem, target)]
        group = self._group(problem, target, units)
        idx = torch.tensor(units, dtype=torch.long)
        applied = Applied(exact=self.is_exact(params), modules=[path], units=units)
        # 1) fold the units' mean contribution into each consumer's bias, zero their columns
        folded = True
        for c in group.consumers:
            cm = get_layer(target, c.module, grouped=True)
            if problem.kind == "NonFinite":
                means = torch.zeros(len(units), c.stride, dtype=torch.float64)
            elif params.get("unit_means") is not None:  # e.g. a monitor's running means
                means = torch.tensor([float(v) for v in params["unit_means"]],
                                     dtype=torch.float64).reshape(-1, 1).expand(
                                         len(units), c.stride)
            else:
                means, _ = column_stats(target, c, units)
            folded = fold_constant(cm, c, units, means) and folded
            cols = zero_columns(cm, c, units)
            applied.touch(f"{c.module}.weight", column_dim(cm), cols)
            if cm.bias is not None:
                applied.touch(f"{c.module}.bias", 0, range(cm.bias.shape[0]))
            applied.modules.append(c.module)
        if not folded:
            applied.exact = False
            applied.details["fold"] = "partial: a consumer has padding or no bias"
        # 2) redraw incoming rows (the gate's and its partners') with the layer's initialiser
        #    (or scaled to the live rows' median norm); zero the bias
        partners = partners_of(problem)
        for p in [path, *partners]:
            self._redraw(target, p, idx, params, applied)
        applied.modules += [p for p in partners if p not in applied.modules]
        bns = group.batchnorms()
        if (params.get("init", "layer") == "calibrated" and not partners
                and problem.kind == "DeadNeurons" and not self._norm_first(target, path, bns)):
            self._calibrate(target, problem, idx, applied)
        # 3) reset per-channel BatchNorm on the path to the consumers (between the layer and
        #    the activation, or after the activation as in CREPE): running statistics from
        #    the norm's own input
        if bns:
            for bn_path in bns:
                inp = target.capture(bn_path).to(torch.float64)
                ch = inp.movedim(1, 0).reshape(inp.shape[1], -1)[idx]
                bn: Any = target.model.get_submodule(bn_path)
                with torch.no_grad():
                    if getattr(bn, "affine", False):
                        bn.weight[idx] = 1.0
                        bn.bias[idx] = 0.0
                        applied.touch(f"{bn_path}.weight", 0, units)
                        applied.touch(f"{bn_path}.bias", 0, units)
                    if getattr(bn, "running_mean", None) is not None:
                        bn.running_mean[idx] = ch.mean(1).to(bn.running_mean.dtype)
                        bn.running_var[idx] = ch.var(1).clamp_min(bn.eps).to(
                            bn.running_var.dtype)
                applied.modules.append(bn_path)
        applied.details.update({"units": len(units), "consumers": [c.module for c in
                                                                   group.consumers],
                                "batchnorms": bns, "coupling": group.source})
        if partners:
            applied.details["partners"] = partners
        target.invalidate()
        return applied

    @staticmethod
    def _redraw(target: Target, path: str, idx: torch.Tensor, params: dict[str, Any],
                applied: Applied) -> None:
        """Redraw the incoming rows ``idx`` of layer ``path`` with the layer's initialiser
        (``params["init"] == "median_live"``: scaled to the median norm of its live rows) and
        zero their bias entries."""
        layer = get_layer(target, path)
        w = weight_rows(layer).detach()
        live = torch.ones(w.shape[0], dtype=torch.bool)
        live[idx] = False
        live &= torch.isfinite(w.flatten(1)).all(1)
        rows = draw_rows(layer, len(idx), target.generator(f"reinit:{path}"))
        init = params.get("init", params.get("rescale", "layer"))
        if init == "median_live" and bool(live.any()):
            ref = w[live].flatten(1).norm(dim=1).median()
            rows = rows * (ref / rows.flatten(1).norm(dim=1).clamp_min(1e-12)).reshape(
                -1, *([1] * (rows.dim() - 1)))
        units = [int(u) for u in idx]
        with torch.no_grad():
            weight_rows(layer)[idx] = rows
            if layer.bias is not None:
                layer.bias[idx] = 0.0
        applied.touch(f"{path}.weight", unit_dim(layer), units)
        if layer.bias is not None:
            applied.touch(f"{path}.bias", 0, units)

    @staticmethod
    def _norm_first(target: Target, path: str, bns: list[str]) -> bool:
        """Whether one of ``bns`` reads the layer's output itself (it sits between the layer
        and the activation: its reset standardises the unit, so the layer's row and bias
        do not set the unit's firing)."""
        if not bns:
            return False
        out = target.capture(path, output=True)
        return any(torch.equal(target.capture(b), out) for b in bns)

    def _calibrate(self, target: Target, problem: Problem, idx: torch.Tensor,
                   applied: Applied) -> None:
        """Check the redrawn units ``idx`` of the site's layer on the calibration data with
        the detector's own score, ``mean|act(z_u)| / mean_j mean|act(z_j)|`` over every unit
        of the layer (the redrawn ones included: where most of a layer is reset, as in a
        dying-ReLU run, the fresh draws set the layer's scale and pass as drawn). A unit
        scoring below ``REVIVE * tau`` is re-centred (bias ``-median(z_u)`` when it fires on
        under a quarter of the inputs) and its row and bias scaled up until it scores
        ``REVIVE * tau`` (never down: a re-centred unit already past it keeps its scale).
        Deterministic: no draw, only the calibration batches."""
        op = problem.site.op
        if family(op) != "relu" or op not in REFERENCES:
            return
        act = REFERENCES[op]
        path = problem.site.module
        layer = get_layer(target, path)
        out = target.capture(path, output=True).to(torch.float64)
        dim = 1 if isinstance(layer, nn.modules.conv._ConvNd) else out.dim() - 1
        z = out.movedim(dim, 0).reshape(out.shape[dim], -1).numpy()
        mag = np.abs(act(z)).mean(1)
        if not bool(np.isfinite(mag).all()):
            return
        tau = float(problem.evidence.get("tau", 0.1))
        has_bias = layer.bias is not None
        shifts: dict[int, float] = {}
        scales: dict[int, float] = {}
        for _ in range(6):  # raising units raises the layer mean: a few passes settle it
            ref = float(mag.mean())
            want = self.REVIVE * tau * ref
            if not ref > 0:
                return
            low = [int(u) for u in idx if mag[int(u)] < want * (1.0 - 1e-3)
                   and (int(u) in scales or mag[int(u)] <= self.CHECK * tau * ref)]
            if not low:
                break
            for u in low:
                if u not in shifts:
                    rare = float((z[u] > 0).mean()) < 0.25
                    shifts[u] = -float(np.median(z[u])) if has_bias and rare else 0.0
                y = z[u] + shifts[u]
                sc = scales.get(u, 1.0)
                for _ in range(8):  # fixed point; one step for the ReLU (homogeneous)
                    m = float(np.abs(act(sc * y)).mean())
                    if not (m > 0 and np.isfinite(m)):
                        break
                    sc *= want / m
                    if abs(m / want - 1.0) < 1e-4:
                        break
                sc = max(sc, 1.0)  # re-centred units past the threshold keep their scale
                if not np.isfinite(sc):
                    sc = 1.0
                scales[u] = sc
                mag[u] = float(np.abs(act(sc * y)).mean())
        done = {u: sc for u, sc in scales.items() if sc != 1.0 or shifts.get(u, 0.0) != 0.0}
        with torch.no_grad():
            for u, sc in done.items():
                weight_rows(layer)[u] *= sc
                if has_bias:
                    layer.bias[u] = sc * shifts.get(u, 0.0)
        if done:
            applied.details["calibrated"] = {u: round(v, 4) for u, v in done.items()}
