"""ExciseDead (neuron scale): remove units that are constant on the data.

A unit whose activation is the same constant ``c`` on every input contributes ``W[:, u] * c``
to each consumer: a bias. ExciseDead removes the unit's row from the producer (and its
channel from any BatchNorm in between), removes its columns from every consumer found by the
channel-coupling analysis, and folds ``W[:, u] * c`` into the consumer's bias. The model gets
smaller and faster; the function is unchanged on the data (exact). Units that only look
dormant (small but varying) are left alone: removing them would change the function.

A gated unit (``act(gate(x)) * up(x)``, the evidence names the up projection ``partner``)
is removed from the gate, its partners and the consumers together; Hugging Face's ``Conv1D``
(GPT-2) is a layer like a Linear (its units are weight columns).

Appliers: ``apply_torch`` (torch.fx channel coupling) and ``apply_onnx``
(:func:`graphsurg.passes.onnx.excise_dead_units.excise_site`, or on the protobuf
:func:`graphsurg.passes.onnx.plain.excise` for a plain model: producer rows, consumer columns
with constant folding, coupling through Concat/BatchNormalization/pooling/Flatten, depthwise
convs, runtime-computed pads, ReduceMean squeezes, squeeze-and-excitation gates and weights
shared between layers; it reads the evidence keys ``constant`` / ``constant_values`` /
``channel_dim`` / ``width``). A site whose units another site's edit already removed is a
no-op (``Applied.units`` empty).
"""

from __future__ import annotations

from typing import Any

import torch

from .._problems import Problem
from ._base import Applied, Refused, Replacement, Target
from ._edit import (
    _padding,
    column_stats,
    consumer_index,
    fold_constant,
    gated,
    get_layer,
    in_features,
    install_width_change,
    is_constant,
    partners_of,
    resized,
    weight_rows,
    width_of,
)


class ExciseDead(Replacement):
    """Remove units that are constant on the data, folding them into the next bias (exact)."""

    name = "excise_dead"
    treats = ("DeadNeurons",)
    scales = ("neuron",)
    guarantee = "exact"
    priority = 30
    removes_units = True
    renumbers_units = True
    preserves_width = False

    def _dead_units(self, problem: Problem, target: Target) -> list[int]:
        layer = get_layer(target, problem.site.module)
        width = width_of(layer)
        units = sorted({int(u) for u in problem.units if 0 <= int(u) < width})
        if not units:
            return []
        group, _ = gated(target, problem.site.module, partners_of(problem), units,
                         changes_width=True)
        keep = torch.ones(len(units), dtype=torch.bool)
        for c in group.consumers:
            mean, var = column_stats(target, c, units)
            keep &= is_constant(mean, var)
            cm = get_layer(target, c.module)
            if cm.bias is None or (c.kind == "conv" and any(_padding(cm))):
                keep &= (mean == 0).all(1)  # only zero constants fold without a bias/padding
        dead = [u for u, k in zip(units, keep.tolist(), strict=True) if k]
        if len(dead) >= width:
            dead = dead[1:]  # never excise a whole layer
        return dead

    def check(self, problem: Problem, target: Any) -> str | None:
        why = super().check(problem, target)
        if why:
            return why
        if target.ir == "onnx":
            if not problem.evidence.get("constant"):
                return (f"none of the flagged units at {problem.site.address} is constant on "
                        "the data; excising them would change the function")
            return None
        try:
            dead = self._dead_units(problem, target)
        except Refused as e:
            return str(e)
        if not dead:
            return (f"none of the flagged units of {problem.site.module!r} is constant on the "
                    "data (or foldable); excising them would change the function")
        return None

    def propose(self, problem: Problem, target: Any, *, exact: bool = False
                ) -> dict[str, Any]:
        if target.ir == "onnx":
            return {"units": sorted(int(u) for u in problem.evidence.get("constant", [])),
                    "exact": True}
        return {"units": self._dead_units(problem, target), "exact": True}

    def apply_onnx(self, target: Any, problem: Problem, params: dict[str, Any]) -> Applied:
        """Excise the site's constant units from ``target.model`` (an ``onnx_ir.Model``);
        records them in ``target.excised``."""
        from ..passes.onnx.excise_dead_units import excise_site
        from ..passes.onnx.plain_adapter import PlainTarget

        if isinstance(target, PlainTarget):  # a plain model, edited on its protobuf
            from ..passes.onnx.plain import excise

            done = excise(target.model, target.index, target.tensors, problem, target.excised)
        else:
            done = excise_site(target.model, problem, target.excised, batches=target.batches)
        return Applied(exact=True, modules=[done.producer], units=done.units,
                       details={"width_before": done.width_before,
                                "width_after": done.width_after, "consumers": done.sinks})

    def apply_torch(self, target: Target, problem: Problem, params: dict[str, Any]) -> Applied:
        path = problem.site.module
        layer = get_layer(target, path)
        units = sorted(int(u) for u in params.get("units") or self._dead_units(problem, target))
        if not units:
            raise Refused(f"no constant units to excise at {path!r}")
        partners = partners_of(problem)
        group, pgroups = gated(target, path, partners, units, changes_width=True)
        width = width_of(layer)
        keep = [u for u in range(width) if u not in set(units)]
        kidx = torch.tensor(keep, dtype=torch.long)
        applied = Applied(exact=True, modules=[path], units=units)
        new_mods: dict[str, torch.nn.Module] = {}
        for c in group.consumers:
            cm = get_layer(target, c.module)
            means, _ = column_stats(target, c, units)
            if not fold_constant(cm, c, units, means):
                raise Refused(f"cannot fold the constant units into {c.module!r}")
            cidx = consumer_index(c, in_features(cm), width, keep)
            w = weight_rows(cm).detach().index_select(1, cidx)
            new_mods[c.module] = resized(cm, w, None if cm.bias is None else cm.bias.detach())
        for p, pg in pgroups.items():  # a gated unit's partners lose the same rows
            pl = get_layer(target, p)
            new_mods[p] = resized(pl, weight_rows(pl).detach().index_select(0, kidx),
                                  None if pl.bias is None else pl.bias.detach()[kidx])
            if pg.batchnorms():
                raise Refused(f"partner {p!r} of {path!r} is followed by a BatchNorm "
                              f"({pg.batchnorms()}); not supported")
        install_width_change(target, applied, group, path, layer, kidx, new_mods)
        applied.details.update({"width_before": width, "width_after": len(keep),
                                "consumers": [c.module for c in group.consumers],
                                "coupling": group.source})
        if partners:
            applied.details["partners"] = partners
        return applied
