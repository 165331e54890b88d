"""Loading models, data and loss functions named on the command line.

A MODEL is a ``torch.export`` archive (``.pt2``, from ``torch.export.save``) or a
``package.module:factory`` spec (a callable returning an ``nn.Module``). DATA is an ``.npz``
or ``.pt`` file, or a ``package.module:callable`` spec returning an iterable of batches. A
LOSS is ``mse``, ``cross_entropy`` or a ``package.module:fn`` spec called as
``fn(output, batch)``.

Nothing read from a *file* can execute code: ``.npz`` files load with
``allow_pickle=False``, ``.pt`` files with ``torch.load(weights_only=True)``, and ``.pt2``
archives through :func:`graphsurg._pt2.load_exported` (``torch.export.load`` would unpickle
parts of the archive). A
``package.module:callable`` spec imports and runs the user's own code, by design.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ._errors import BadInputError, first_line

Batch = Any
LossFn = Callable[[Any, Batch], torch.Tensor]

DATA_HELP = (
    "DATA: an .npz file (arrays with the same first dimension; 'x' or the first array is the "
    "input, 'y' or the next array the target, cut into --batch-size rows), a .pt file loaded "
    "with torch.load(weights_only=True) (a tensor, a dict of tensors like .npz, or a list of "
    "batches), or package.module:callable returning an iterable of batches."
)


def is_spec(text: str) -> bool:
    """True when ``text`` looks like ``package.module:attr`` rather than a file path."""
    if os.path.exists(text) or ":" not in text:
        return False
    mod, _, attr = text.rpartition(":")
    return bool(mod) and bool(attr) and "/" not in mod and "\\" not in mod and attr.isidentifier()


def import_spec(spec: str, what: str) -> Any:
    """Import ``package.module:attr`` (the current directory is importable, as with
    ``python -m``). Runs the module's code: the user's own, by design."""
    mod_name, _, attr = spec.rpartition(":")
    if not mod_name or not attr:
        raise BadInputError(f"{what} spec {spec!r} is not package.module:name")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        raise BadInputError(
            f"{what} spec {spec!r}: cannot import module {mod_name!r} ({first_line(e)}); check "
            "the name and that it is on PYTHONPATH"
        ) from e
    except Exception as e:
        raise BadInputError(
            f"{what} spec {spec!r}: importing {mod_name!r} failed ({type(e).__name__}: "
            f"{first_line(e)})"
        ) from e
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise BadInputError(f"{what} spec {spec!r}: module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def load_model(spec: str) -> nn.Module:
    """A ``.pt2`` archive (``torch.export.load(...).module()``) or a ``package.module:factory``."""
    if is_spec(spec):
        factory = import_spec(spec, "model")
        if isinstance(factory, nn.Module):
            return factory
        if not callable(factory):
            raise BadInputError(f"model spec {spec!r} names a {type(factory).__name__}, not a callable")
        try:
            model = factory()
        except Exception as e:
            raise BadInputError(
                f"model factory {spec!r} failed ({type(e).__name__}: {first_line(e)})"
            ) from e
        if not isinstance(model, nn.Module):
            raise BadInputError(
                f"model factory {spec!r} returned {type(model).__name__}; it must return a "
                "torch.nn.Module"
            )
        return model
    path = Path(spec)
    if not path.exists():
        raise BadInputError(
            f"model {spec!r}: no such file; pass a .pt2 archive (torch.export.save) or "
            "package.module:factory"
        )
    if path.suffix != ".pt2":
        raise BadInputError(
            f"model {spec!r}: unsupported file type {path.suffix or '(none)'!r}; pass a .pt2 "
            "archive from torch.export.save or package.module:factory"
        )
    from ._pt2 import load_exported

    ep = load_exported(path, spec)  # never unpickles: torch.export.load would (see _pt2)
    # restore the Linear/Conv layers the archive flattened into aten calls, so surgery can
    # edit them (the function is unchanged)
    from .passes.fx.lift_modules import lift_modules

    module, _ = lift_modules(ep.module())
    return module


def _split_rows(arrays: list[torch.Tensor], batch_size: int, source: str) -> list[Batch]:
    n = arrays[0].shape[0] if arrays[0].dim() else 0
    if n == 0:
        raise BadInputError(f"data {source!r}: the input array has no rows")
    for a in arrays[1:]:
        if a.dim() == 0 or a.shape[0] != n:
            raise BadInputError(
                f"data {source!r}: arrays have different first dimensions "
                f"({n} vs {tuple(a.shape)}); every array needs one row per example"
            )
    if batch_size < 1:
        raise BadInputError(f"--batch-size must be >= 1, got {batch_size}")
    out: list[Batch] = []
    for i in range(0, n, batch_size):
        rows = [a[i : i + batch_size] for a in arrays]
        out.append(rows[0] if len(rows) == 1 else tuple(rows))
    return out


def _ordered(named: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    keys = list(named)
    first = [k for k in ("x", "input", "inputs") if k in named][:1]
    second = [k for k in ("y", "target", "targets", "label", "labels") if k in named][:1]
    rest = [k for k in keys if k not in first and k not in second]
    order = first + second + rest if first else keys
    return [named[k] for k in order]


def _as_tensor(a: Any, source: str, key: str) -> torch.Tensor:
    import numpy as np

    if isinstance(a, torch.Tensor):
        return a
    arr = np.asarray(a)
    if arr.dtype.kind not in "biuf":
        raise BadInputError(f"data {source!r}: array {key!r} has dtype {arr.dtype}; use numbers")
    t = torch.from_numpy(np.ascontiguousarray(arr))
    if t.is_floating_point() and t.dtype != torch.float32:
        t = t.float()
    return t


def load_data(spec: str, *, batch_size: int = 64, max_batches: int | None = None) -> list[Batch]:
    """Batches from an ``.npz``/``.pt`` file or a ``package.module:callable`` spec."""
    if is_spec(spec):
        fn = import_spec(spec, "data")
        try:
            data = fn() if callable(fn) else fn
        except Exception as e:
            raise BadInputError(f"data callable {spec!r} failed ({type(e).__name__}: {first_line(e)})") from e
        return _take(data, max_batches, spec)
    path = Path(spec)
    if not path.exists():
        raise BadInputError(f"data {spec!r}: no such file; " + DATA_HELP)
    if path.suffix == ".npz":
        import numpy as np

        try:
            with np.load(path, allow_pickle=False) as z:
                named = {k: _as_tensor(z[k], spec, k) for k in z.files}
        except BadInputError:
            raise
        except Exception as e:
            raise BadInputError(
                f"data {spec!r} is not a readable .npz without pickled objects "
                f"({type(e).__name__}: {first_line(e)})"
            ) from e
        if not named:
            raise BadInputError(f"data {spec!r}: the .npz holds no arrays")
        return _take(_split_rows(_ordered(named), batch_size, spec), max_batches, spec)
    if path.suffix in (".pt", ".pth"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            if "weights_only" in str(e) or "Unpickl" in type(e).__name__:
                raise BadInputError(
                    f"data {spec!r} holds pickled Python objects, which graphsurg refuses to "
                    "load (torch.load weights_only=True); save plain tensors, dicts or lists"
                ) from e
            raise BadInputError(
                f"data {spec!r} is not a readable torch file ({type(e).__name__}: {first_line(e)})"
            ) from e
        if isinstance(obj, torch.Tensor):
            return _take(_split_rows([obj], batch_size, spec), max_batches, spec)
        if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return _take(_split_rows(_ordered(dict(obj)), batch_size, spec), max_batches, spec)
        if isinstance(obj, list | tuple):
            return _take(obj, max_batches, spec)
        raise BadInputError(
            f"data {spec!r} holds a {type(obj).__name__}; save a tensor, a dict of tensors or a "
            "list of batches"
        )
    raise BadInputError(f"data {spec!r}: unsupported file type {path.suffix or '(none)'!r}; " + DATA_HELP)


def _take(data: Any, max_batches: int | None, source: str) -> list[Batch]:
    if isinstance(data, torch.Tensor) or not isinstance(data, Iterable):
        raise BadInputError(
            f"data {source!r} gave a {type(data).__name__}; it must be an iterable of batches"
        )
    out: list[Batch] = []
    for b in data:
        if max_batches is not None and len(out) >= max_batches:
            break
        out.append(b)
    if not out:
        raise BadInputError(f"data {source!r} holds no batches")
    return out


def _target(batch: Batch, name: str) -> torch.Tensor:
    if isinstance(batch, tuple | list) and len(batch) >= 2 and isinstance(batch[1], torch.Tensor):
        return batch[1]
    if isinstance(batch, Mapping):
        for k in ("y", "target", "targets", "labels", "label"):
            if isinstance(batch.get(k), torch.Tensor):
                return batch[k]
    raise BadInputError(f"--loss {name} needs (inputs, targets) batches; this batch has no target")


def _mse(out: Any, batch: Batch) -> torch.Tensor:
    y = _target(batch, "mse")
    return F.mse_loss(out, y.to(out.dtype).reshape(out.shape))


def _cross_entropy(out: Any, batch: Batch) -> torch.Tensor:
    return F.cross_entropy(out, _target(batch, "cross_entropy").long())


BUILTIN_LOSSES: dict[str, LossFn] = {"mse": _mse, "cross_entropy": _cross_entropy, "ce": _cross_entropy}


def load_loss(spec: str | None) -> LossFn | None:
    """``None``, a built-in name (``mse``, ``cross_entropy``) or ``package.module:fn``."""
    if spec is None:
        return None
    if spec in BUILTIN_LOSSES:
        return BUILTIN_LOSSES[spec]
    if not is_spec(spec):
        raise BadInputError(
            f"--loss {spec!r}: pass mse, cross_entropy or package.module:fn (called as "
            "fn(output, batch))"
        )
    fn = import_spec(spec, "loss")
    if not callable(fn):
        raise BadInputError(f"--loss {spec!r} names a {type(fn).__name__}, not a callable")
    return fn  # type: ignore[no-any-return]


__all__ = ["DATA_HELP", "BUILTIN_LOSSES", "import_spec", "is_spec", "load_data", "load_loss",
           "load_model"]
