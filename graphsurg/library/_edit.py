"""Shared parameter edits for the neuron- and layer-scale replacements.

All functions work on Linear and Conv weights alike: output units on dim 0, input columns on
dim 1. Edits that change a width build a new module (same class, dtype and device) rather
than mutating shapes in place, so modules and their parameters stay consistent.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..passes.fx.coupling import Consumer, CouplingGroup
from ._base import Refused, Target

Layer = nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def get_layer(target: Target, path: str, *, grouped: bool = False) -> Layer:
    """The Linear/Conv module at ``path`` or :class:`Refused` (a grouped conv only with
    ``grouped=True``: as a consumer, whose columns are edited per group)."""
    try:
        m = target.model.get_submodule(path)
    except AttributeError:
        raise Refused(f"the model has no module {path!r} (the site is gone)") from None
    if not isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d):
        raise Refused(f"{path!r} is a {type(m).__name__}, not a Linear or Conv layer")
    if isinstance(m, _CONV) and m.groups != 1 and not grouped:
        raise Refused(f"{path!r} is a grouped conv (groups={m.groups}); not supported")
    return m


def coupled(target: Target, producer: str, units: Sequence[int] = (), *,
            changes_width: bool = False) -> CouplingGroup:
    """The producer's coupling group, proven at ``units`` (the units the edit touches), or
    :class:`Refused` with the analysis's reason; with ``changes_width`` also refused where
    the width cannot change with the consumers alone (a residual add, a gate, a grouped
    conv consumer)."""
    g = target.coupling(producer, units)
    if not g.ok:
        raise Refused(f"coupling of {producer!r} not understood: {g.reason()}")
    if changes_width and g.width_change_refusal():
        raise Refused(f"cannot change the width of {producer!r}: {g.width_change_refusal()}")
    return g


def zero_columns(layer: Layer, consumer: Consumer, units: Sequence[int]) -> list[int]:
    """Zero the consumer's weights reading ``units`` (per group for a grouped conv); returns
    the weight columns touched."""
    touched: list[int] = []
    with torch.no_grad():
        for u in units:
            rows, cols = consumer.weight_index(u, layer.weight.shape)
            layer.weight[rows, cols] = 0.0
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


def fold_constant(consumer_mod: Layer, consumer: Consumer, units: Sequence[int],
                  means: torch.Tensor) -> bool:
    """Add the constant contribution ``W[:, cols] @ mean`` of ``units`` to the consumer's bias.

    Returns False (and folds nothing) when the fold cannot be exact: a conv consumer with zero
    padding sees a constant channel as non-constant at the borders, and a consumer without a
    bias has nowhere to put it. Zero means need no fold.
    """
    if not bool((means != 0).any()):
        return True
    if consumer_mod.bias is None:
        return False
    if isinstance(consumer_mod, _CONV) and any(int(p) != 0 for p in _padding(consumer_mod)):
        return False
    w = consumer_mod.weight.detach()
    with torch.no_grad():
        add = torch.zeros(w.shape[0], dtype=torch.float64)
        for i, u in enumerate(units):
            rows, cols = consumer.weight_index(u, w.shape)
            wc = w[rows, cols].to(torch.float64)
            if wc.dim() > 2:
                wc = wc.flatten(2).sum(2)
            add[rows] += wc @ means[i]
        consumer_mod.bias.add_(add.to(consumer_mod.bias.dtype))
    return True


def _padding(conv: nn.Module) -> tuple[int, ...]:
    p: Any = conv.padding
    if isinstance(p, str):
        return (0,) if p == "valid" else (1,)
    return tuple(int(x) for x in p)


def draw_rows(layer: Layer, n: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` fresh incoming-weight rows drawn with the layer's default init (kaiming-uniform,
    a=sqrt(5), as in ``reset_parameters``)."""
    shape = (n, *layer.weight.shape[1:])
    w = torch.empty(shape, dtype=torch.float32)
    fan_in = math.prod(layer.weight.shape[1:])
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    # kaiming_uniform_(a=sqrt(5)) gives U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    w.uniform_(-bound, bound, generator=gen)
    return w.to(layer.weight.dtype)


def new_like(layer: Layer, out_units: int, in_units: int) -> Layer:
    """A module of the same class and settings with different widths (uninitialised)."""
    dev, dt = layer.weight.device, layer.weight.dtype
    bias = layer.bias is not None
    if isinstance(layer, nn.Linear):
        return nn.Linear(in_units, out_units, bias=bias, device=dev, dtype=dt)
    cls: Any = type(layer)
    conv: Layer = cls(in_units, out_units, layer.kernel_size, stride=layer.stride,
                       padding=layer.padding, dilation=layer.dilation, groups=1, bias=bias,
                       padding_mode=layer.padding_mode, device=dev, dtype=dt)
    return conv


def resized(layer: Layer, weight: torch.Tensor, bias: torch.Tensor | None) -> Layer:
    """A copy of ``layer`` holding ``weight`` and ``bias`` (widths taken from the weight)."""
    new = new_like(layer, int(weight.shape[0]), int(weight.shape[1]))
    with torch.no_grad():
        new.weight.copy_(weight)
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


def install_width_change(target: Target, applied: Any, group: CouplingGroup, path: str,
                         layer: Layer, index: torch.Tensor,
                         consumers: dict[str, nn.Module]) -> None:
    """Finish a width change of the producer at ``path``: its rows and every coupled
    BatchNorm's channels are taken at ``index``, then those and the already resized
    ``consumers`` are put into the model and recorded on ``applied``."""
    new_mods = dict(consumers)
    for bn_path in group.batchnorms():
        new_mods[bn_path] = resized_bn(target.model.get_submodule(bn_path), index)
    new_mods[path] = resized(layer, layer.weight.detach().index_select(0, index),
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
