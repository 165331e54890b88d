"""ReinitDead (neuron scale): ReDo's reset of dormant units, exact at surgery.

For each treated unit ``u`` of a producer layer:

* its incoming weights are re-drawn with the layer's initialiser (``init="layer"``, the
  default: nn.Linear's / nn.Conv's kaiming-uniform(a=sqrt 5), as ReDo does) or, with
  ``ReinitDead(init="median_live")``, re-drawn and rescaled to the median norm of the live
  units' rows; its bias is zeroed. The plain initialiser is the default because the
  efficacy benchmark measured the rescale costing held-out loss (benchmarks/efficacy);
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

import torch

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
    inits = ("layer", "median_live")

    def __init__(self, *, init: str = "layer") -> None:
        """``init``: how a reset unit's incoming weights are drawn -- ``"layer"`` (the layer's
        plain initialiser, ReDo's choice) or ``"median_live"`` (that draw rescaled to the
        median norm of the layer's live rows)."""
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
        # 3) reset per-channel BatchNorm between the layer and the activation
        bns = group.batchnorms()
        if bns:
            out = target.capture(path, output=True).to(torch.float64)
            ch = out.movedim(1, 0).reshape(out.shape[1], -1)[idx]
            for bn_path in bns:
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
