"""Batches: how graphsurg feeds a user's data to a user's model.

A batch may be a tensor (the model's input), a tuple/list whose first element is the input
(``(x, y)``), or a dict of keyword arguments (Hugging Face style). ``input_fn(batch) ->
(args, kwargs)`` overrides the rule.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch

from ._errors import BadInputError, first_line

Batch = Any
InputFn = Callable[[Batch], tuple[tuple[Any, ...], dict[str, Any]]]


def default_input_fn(batch: Batch) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Tensor -> ``model(batch)``; tuple/list -> ``model(batch[0])``; dict -> ``model(**batch)``."""
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    if isinstance(batch, Mapping):
        return (), dict(batch)
    if isinstance(batch, tuple | list):
        if not batch:
            raise BadInputError("a batch is an empty tuple/list: yield (inputs, targets) or a tensor")
        return (batch[0],), {}
    raise BadInputError(
        f"cannot feed a batch of type {type(batch).__name__} to the model: yield tensors, "
        "(inputs, targets) tuples or dicts of keyword arguments, or pass input_fn="
    )


def iter_batches(data: Iterable[Batch], max_batches: int | None) -> Iterator[Batch]:
    """Iterate over at most ``max_batches`` batches of ``data``; raise if there are none."""
    if isinstance(data, torch.Tensor):
        raise BadInputError(
            "data is a single tensor: pass an iterable of batches, e.g. [x] or a DataLoader"
        )
    try:
        it = iter(data)
    except TypeError:
        raise BadInputError(
            f"data of type {type(data).__name__} is not iterable: pass a list of batches or a "
            "DataLoader"
        ) from None
    if max_batches is not None:
        it = itertools.islice(it, max_batches)
    seen = False
    for b in it:
        seen = True
        yield b
    if not seen:
        raise BadInputError("data yielded no batches: pass an iterable with at least one batch")


def split_held_out(batches: list[Batch],
                   halve: Callable[[Batch], tuple[Batch, Batch] | None] | None = None
                   ) -> tuple[list[Batch], list[Batch], str]:
    """The one held-out split: ``(train, held_out, how)``.

    Two or more batches: the last quarter (at least one) is held out. One batch: ``halve``
    (an adapter's way to cut a batch in two along its batch axis) splits it when it can;
    otherwise the batch serves both (and ``how`` says so).
    """
    if len(batches) >= 2:
        k = max(1, len(batches) // 4)
        return batches[:-k], batches[-k:], f"verified on {k} held-out batch(es)"
    halves = halve(batches[0]) if halve is not None and batches else None
    if halves is not None:
        return [halves[0]], [halves[1]], "verified on the held-out half of the only batch"
    return batches, batches, "verified on the calibration batch itself (only one batch given)"


def batch_tensors(batch: Batch) -> list[torch.Tensor]:
    """Every floating-point tensor in a batch (for non-finite checks)."""
    leaves, _ = torch.utils._pytree.tree_flatten(batch)
    return [t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()]


def run_model(model: Callable[..., Any], batch: Batch, input_fn: InputFn | None, index: int) -> Any:
    """Call the model on a batch, turning a rejection into a one-line BadInputError."""
    args, kwargs = (input_fn or default_input_fn)(batch)
    try:
        return model(*args, **kwargs)
    except BadInputError:
        raise
    except Exception as e:
        raise BadInputError(
            f"the model rejected batch {index} ({type(e).__name__}: {first_line(e)}); check that "
            "data yields what model.forward takes, or pass input_fn="
        ) from e


def compute_loss(loss_fn: Callable[[Any, Batch], torch.Tensor], out: Any, batch: Batch,
                 index: int) -> torch.Tensor:
    try:
        loss = loss_fn(out, batch)
    except Exception as e:
        raise BadInputError(
            f"loss_fn failed on batch {index} ({type(e).__name__}: {first_line(e)}); loss_fn "
            "is called as loss_fn(output, batch)"
        ) from e
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise BadInputError(
            f"loss_fn returned {type(loss).__name__} on batch {index}: it must return a scalar "
            "tensor"
        )
    return loss.reshape(())
