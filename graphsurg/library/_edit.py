"""Shared parameter edits for the neuron- and layer-scale replacements.

All functions work on Linear, Conv and Hugging Face ``Conv1D`` weights alike, through
:func:`~graphsurg.passes.fx.coupling.weight_rows`: output units on dim 0 of the rows, input
columns on dim 1 (a ``Conv1D`` stores the transpose, ``(in, out)``: its units are weight
*columns* and bias entries, its input columns weight *rows*; ``touched`` records the dims of
the stored weight). Edits that change a width build a new module (same class, dtype and
device) rather than mutating shapes in place, so modules and their parameters stay
consistent.

A gated unit (``act(gate(x)) * up(x)``, the DeadNeurons evidence names the up projection
``partner``) is one unit of two producers: :func:`gated` proves that the gate and its
partners feed the same consumer columns, so an edit can treat the unit in all of them.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .._problems import Problem
from ..passes.fx.coupling import (
    Consumer,
    CouplingGroup,
    is_conv1d,
    is_layer,
    weight_rows,
)
from ..passes.fx.coupling import (
    column_dim as column_dim,
)
from ..passes.fx.coupling import (
    unit_dim as unit_dim,
)
from ._base import Refused, Target

#: nn.Linear, nn.Conv1d/2d/3d or Hugging Face's Conv1D (recognised by
#: :func:`~graphsurg.passes.fx.coupling.is_conv1d`; transformers is not imported)
Layer = Any  # duck-typed: nn.Linear, nn.Conv*, HF Conv1D -- what matters is .weight and .bias
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def get_layer(target: Target, path: str, *, grouped: bool = False) -> Layer:
    """The Linear/Conv/``Conv1D`` module at ``path`` or :class:`Refused` (a grouped conv only
    with ``grouped=True``: as a consumer, whose columns are edited per group)."""
    try:
        m = target.model.get_submodule(path)
    except AttributeError:
        raise Refused(f"the model has no module {path!r} (the site is gone)") from None
    if not is_layer(m):
        raise Refused(f"{path!r} is a {type(m).__name__}, not a Linear, Conv or Conv1D layer")
    if isinstance(m, _CONV) and m.groups != 1 and not grouped:
        raise Refused(f"{path!r} is a grouped conv (groups={m.groups}); not supported")
    return m


def width_of(layer: Layer) -> int:
    """The layer's number of output units."""
    return int(weight_rows(layer).shape[0])


def in_features(layer: Layer) -> int:
    """The layer's number of input columns (per group for a grouped conv)."""
    return int(weight_rows(layer).shape[1])


def coupled(target: Target, producer: str, units: Sequence[int] = (), *,
            changes_width: bool = False, partners: Sequence[str] = ()) -> CouplingGroup:
    """The producer's coupling group, proven at ``units`` (the units the edit touches), or
    :class:`Refused` with the analysis's reason; with ``changes_width`` also refused where
    the width cannot change with the consumers alone (a residual add, a gate, a grouped
    conv consumer). ``partners``: a gated unit's other projections (their product with the
    producer is not mixing)."""
    g = target.coupling(producer, units, partners)
    if not g.ok:
        raise Refused(f"coupling of {producer!r} not understood: {g.reason()}")
    if g.calls > 1 and units:
        split = units_live_on_some_call(target, g, units)
        if split:
            raise Refused(
                f"units {split} of {producer!r} (called {g.calls} times per forward: shared "
                "weights) are constant on some calls and vary on others: an edit of the shared "
                "weights would change the calls where they are live")
    if changes_width and g.width_change_refusal():
        raise Refused(f"cannot change the width of {producer!r}: {g.width_change_refusal()}")
    return g


@torch.no_grad()
def units_live_on_some_call(target: Target, group: CouplingGroup, units: Sequence[int],
                            batches: int = 2) -> list[int]:
    """Of ``units`` of a producer called several times per forward, those whose consumer
    columns are constant on the data on some calls but not on others (dead on one call of a
    shared layer, live on another), from each consumer's inputs call by call on up to
    ``batches`` calibration batches."""
    split: set[int] = set()
    for c in group.consumers:
        per_call: dict[int, list[torch.Tensor]] = {}
        seen = [0]

        def pre(m: nn.Module, args: tuple[Any, ...], per_call: dict[int, list[torch.Tensor]]
                = per_call, seen: list[int] = seen) -> None:
            per_call.setdefault(seen[0], []).append(args[0].detach())
            seen[0] += 1

        mod = target.model.get_submodule(c.module)
        h = mod.register_forward_pre_hook(pre)
        was = target.model.training
        target.model.eval()
        try:
            for b in target.batches[:batches]:
                seen[0] = 0
                target.run(batch=b)
        finally:
            h.remove()
            target.model.train(was)
        const = []
        for xs in per_call.values():
            x = torch.cat(xs, 0).to(torch.float64)
            d = 1 if c.kind == "conv" else x.dim() - 1
            cols = x.movedim(d, 0).reshape(x.shape[d], -1)
            idx = torch.tensor([k for u in units for k in c.columns(u)], dtype=torch.long)
            sel = cols[idx]
            mean = sel.mean(1).reshape(len(units), c.stride)
            var = sel.var(1, unbiased=False).reshape(len(units), c.stride)
            const.append(is_constant(mean, var))
        if len(const) > 1:
            stack = torch.stack(const)
            split |= {int(units[i]) for i in (stack.any(0) & ~stack.all(0)).nonzero().flatten()}
    return sorted(split)


def partners_of(problem: Problem) -> list[str]:
    """A gated unit's up projection(s) from the problem's evidence (``partner``; torch
    sites name modules), else ``[]``."""
    p = problem.evidence.get("partner") if problem.site.ir == "torch" else None
    if not p:
        return []
    return [str(x) for x in p] if isinstance(p, list | tuple) else [str(p)]


def gated(target: Target, producer: str, partners: Sequence[str], units: Sequence[int], *,
          changes_width: bool = False) -> tuple[CouplingGroup, dict[str, CouplingGroup]]:
    """The coupling of a gated unit: the gate ``producer``'s group and each partner's, proven
    at ``units``, each with the others held as partners. Refused unless every partner is a
    layer of the producer's width whose units feed exactly the producer's consumer columns
    (same layers, same index map): then the gated unit ``u`` is unit ``u`` of each."""
    width = width_of(get_layer(target, producer))
    for p in partners:
        if width_of(get_layer(target, p)) != width:
            raise Refused(f"partner {p!r} of {producer!r} has "
                          f"{width_of(get_layer(target, p))} units, the gate {width}")
    group = coupled(target, producer, units, changes_width=changes_width, partners=partners)
    others: dict[str, CouplingGroup] = {}
    mine = sorted((c.module, c.start, c.stride, c.groups) for c in group.consumers)
    for p in partners:
        pg = coupled(target, p, units, changes_width=changes_width,
                     partners=[producer, *[q for q in partners if q != p]])
        theirs = sorted((c.module, c.start, c.stride, c.groups) for c in pg.consumers)
        if theirs != mine:
            raise Refused(f"partner {p!r} of {producer!r} feeds {[t[0] for t in theirs]}, the "
                          f"gate {[m[0] for m in mine]}: not one gated unit")
        others[p] = pg
    return group, others


def zero_columns(layer: Layer, consumer: Consumer, units: Sequence[int]) -> list[int]:
    """Zero the consumer's weights reading ``units`` (per group for a grouped conv); returns
    the weight columns touched (indices on :func:`column_dim` of the stored weight)."""
    touched: list[int] = []
    w = weight_rows(layer)
    with torch.no_grad():
        for u in units:
            rows, cols = consumer.weight_index(u, w.shape)
            w[rows, cols] = 0.0
            touched += cols
    return sorted(set(touched))


def column_stats(target: Target, consumer: Consumer, units: Sequence[int]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance, over the calibration data, of the consumer's input columns fed by
    ``units``: two tensors of shape ``(len(units), stride)`` in float64."""
    x = target.capture(consumer.module).to(torch.float64)
    d = 1 if consumer.kind == "conv" else x.dim() - 1
    cols = x.movedim(d, 0).reshape(x.shape[d], -1)
    idx = torch.tensor([c for u in units for c in consumer.columns(u)], dtype=torch.long)
    sel = cols[idx]
    return (sel.mean(1).reshape(len(units), consumer.stride),
            sel.var(1, unbiased=False).reshape(len(units), consumer.stride))


def is_constant(mean: torch.Tensor, var: torch.Tensor, tol: float = 1e-10) -> torch.Tensor:
    """Per unit: every column constant on the data (variance relative to magnitude)."""
    return (var <= tol * (1.0 + mean.square())).all(1)


#: a constant unit's contribution to a consumer, ``|mean| @ |W[:, cols]|`` per output, at or
#: below which leaving it out (or folding it where padding makes the fold inexact at the
#: borders) is exact to float32: 1e-10 is under the rounding (eps 1.2e-7 relative) of any
#: output above 1e-3. A SiLU- or GELU-dead unit (pre-activation -50) is -1e-20, not 0.
NEGLIGIBLE = 1e-10


def fold_constant(consumer_mod: Layer, consumer: Consumer, units: Sequence[int],
                  means: torch.Tensor) -> bool:
    """Add the constant contribution ``W[:, cols] @ mean`` of ``units`` to the consumer's bias.

    Returns False (and folds nothing) when the fold cannot be exact: a conv consumer with zero
    padding (its own, or a pad module between the units and it: ``consumer.padded``) sees a
    constant channel as non-constant at the borders, and a consumer without a bias has
    nowhere to put it. Zero means need no fold; neither do means whose whole contribution is
    at most :data:`NEGLIGIBLE` per output (folded where a bias can take it exactly, else
    left out), so a SiLU-dead unit (constant ~-1e-20) is exact like a ReLU-dead one.
    """
    if not bool((means != 0).any()):
        return True
    w = weight_rows(consumer_mod).detach()
    add = torch.zeros(w.shape[0], dtype=torch.float64)
    bound = torch.zeros(w.shape[0], dtype=torch.float64)
    for i, u in enumerate(units):
        rows, cols = consumer.weight_index(u, w.shape)
        wc = w[rows, cols].to(torch.float64)
        if wc.dim() > 2:
            bound[rows] += wc.abs().flatten(2).sum(2) @ means[i].abs()
            wc = wc.flatten(2).sum(2)
        else:
            bound[rows] += wc.abs() @ means[i].abs()
        add[rows] += wc @ means[i]
    negligible = float(bound.max()) <= NEGLIGIBLE
    padded = consumer.padded or (isinstance(consumer_mod, _CONV)
                                 and any(int(p) != 0 for p in _padding(consumer_mod)))
    if consumer_mod.bias is None or padded:
        return negligible
    with torch.no_grad():
        consumer_mod.bias.add_(add.to(consumer_mod.bias.dtype))
    return True


def _padding(conv: nn.Module) -> tuple[int, ...]:
    p: Any = conv.padding
    if isinstance(p, str):
        return (0,) if p == "valid" else (1,)
    return tuple(int(x) for x in p)


def draw_rows(layer: Layer, n: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` fresh incoming-weight rows (shape ``(n, *weight_rows(layer).shape[1:])``) drawn
    with nn.Linear's default init (kaiming-uniform, a=sqrt(5), as in ``reset_parameters``)."""
    rows = weight_rows(layer)
    shape = (n, *rows.shape[1:])
    w = torch.empty(shape, dtype=torch.float32)
    fan_in = math.prod(rows.shape[1:])
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    # kaiming_uniform_(a=sqrt(5)) gives U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    w.uniform_(-bound, bound, generator=gen)
    return w.to(rows.dtype)


def new_like(layer: Layer, out_units: int, in_units: int) -> Layer:
    """A module of the same class and settings with different widths (uninitialised)."""
    dev, dt = layer.weight.device, layer.weight.dtype
    bias = layer.bias is not None
    if is_conv1d(layer):
        # a copy without the parameters (its class's constructor is transformers' business)
        saved = layer._parameters
        layer._parameters = {}
        try:
            new: Any = copy.deepcopy(layer)
        finally:
            layer._parameters = saved
        new.weight = nn.Parameter(torch.empty(in_units, out_units, device=dev, dtype=dt))
        new.bias = (nn.Parameter(torch.empty(out_units, device=dev, dtype=dt)) if bias
                    else None)
        new.nf = out_units
        if hasattr(new, "nx"):
            new.nx = in_units
        return new
    if isinstance(layer, nn.Linear):
        return nn.Linear(in_units, out_units, bias=bias, device=dev, dtype=dt)
    cls: Any = type(layer)
    conv: Layer = cls(in_units, out_units, layer.kernel_size, stride=layer.stride,
                       padding=layer.padding, dilation=layer.dilation, groups=1, bias=bias,
                       padding_mode=layer.padding_mode, device=dev, dtype=dt)
    return conv


def resized(layer: Layer, weight: torch.Tensor, bias: torch.Tensor | None) -> Layer:
    """A copy of ``layer`` holding ``weight`` (as rows, see :func:`weight_rows`) and ``bias``
    (widths taken from the weight)."""
    new = new_like(layer, int(weight.shape[0]), int(weight.shape[1]))
    with torch.no_grad():
        weight_rows(new).copy_(weight)
        if new.bias is not None and bias is not None:
            new.bias.copy_(bias)
    new.weight.requires_grad_(layer.weight.requires_grad)
    if new.bias is not None and layer.bias is not None:
        new.bias.requires_grad_(layer.bias.requires_grad)
    return new


def resized_bn(bn: nn.Module, index: torch.Tensor) -> nn.Module:
    """A BatchNorm whose channel ``k`` is channel ``index[k]`` of ``bn`` (copy, no sharing)."""
    assert isinstance(bn, nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d)
    new = type(bn)(int(index.numel()), eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                   track_running_stats=bn.track_running_stats,
                   device=_device(bn), dtype=_dtype(bn))
    with torch.no_grad():
        if bn.affine:
            new.weight.copy_(bn.weight[index])
            new.bias.copy_(bn.bias[index])
        if bn.track_running_stats and bn.running_mean is not None:
            assert bn.running_var is not None and new.running_mean is not None
            assert new.running_var is not None
            new.running_mean.copy_(bn.running_mean[index])
            new.running_var.copy_(bn.running_var[index])
            if bn.num_batches_tracked is not None and new.num_batches_tracked is not None:
                new.num_batches_tracked.copy_(bn.num_batches_tracked)
    new.train(bn.training)
    return new


def resized_per_unit(m: nn.Module, index: torch.Tensor) -> nn.Module:
    """A BatchNorm or per-channel PReLU whose unit ``k`` is unit ``index[k]`` of ``m``."""
    if isinstance(m, nn.PReLU):
        new = nn.PReLU(int(index.numel()), device=_device(m), dtype=_dtype(m))
        with torch.no_grad():
            new.weight.copy_(m.weight[index])
        new.weight.requires_grad_(m.weight.requires_grad)
        new.train(m.training)
        return new
    return resized_bn(m, index)


def install_width_change(target: Target, applied: Any, group: CouplingGroup, path: str,
                         layer: Layer, index: torch.Tensor,
                         consumers: dict[str, nn.Module]) -> None:
    """Finish a width change of the producer at ``path``: its rows and every coupled
    per-unit module's (BatchNorm, per-channel PReLU) are taken at ``index``, then those and
    the already resized ``consumers`` are put into the model and recorded on ``applied``."""
    new_mods = dict(consumers)
    for mod_path in group.per_unit_modules():
        new_mods[mod_path] = resized_per_unit(target.model.get_submodule(mod_path), index)
    new_mods[path] = resized(layer, weight_rows(layer).detach().index_select(0, index),
                             None if layer.bias is None else layer.bias.detach()[index])
    for p, m in new_mods.items():
        target.replace_module(p, m)
        if p not in applied.modules:
            applied.modules.append(p)
        applied.new_parameters += [f"{p}.{n}" for n, _ in m.named_parameters()]


def _device(m: nn.Module) -> torch.device:
    for t in list(m.parameters()) + list(m.buffers()):
        return t.device
    return torch.device("cpu")


def _dtype(m: nn.Module) -> torch.dtype:
    for t in m.parameters():
        return t.dtype
    return torch.float32


def consumer_index(consumer: Consumer, in_features: int, width: int,
                   unit_map: Sequence[int]) -> torch.Tensor:
    """Column index of a consumer after the producer's units become ``unit_map`` (new unit k
    is old unit ``unit_map[k]``): the producer's block of columns is rebuilt, the rest kept."""
    s, start = consumer.stride, consumer.start
    before = list(range(start))
    block = [start + u * s + j for u in unit_map for j in range(s)]
    after = list(range(start + width * s, in_features))
    return torch.tensor(before + block + after, dtype=torch.long)
