"""Calibration inputs for ONNX models, in the forms users already have them.

``data`` (``gso.analyze`` / ``gso.apply`` / :meth:`OnnxAdapter.batches`, ``--data`` /
``--load-inputs`` / ``--data-loader-script`` on the command line) may be:

==============================  =============================================================
form                            how it is fed
==============================  =============================================================
``calib.npz``                   one array per model input; batched inputs are split along
                                their batch axis into batches of ``batch_size``; unbatched
                                inputs (scalars, fixed-shape state) are fed whole to every
                                batch. Read lazily, one batch at a time.
a folder of ``.npz`` files      one feed dict per file (sorted by name), any shapes: state
                                tensors, scalars, sequence lengths -- fed as they are
``inputs.json``                 Polygraphy's ``polygraphy run --save-inputs`` format: a JSON
                                list of feed dicts whose arrays are ``{"array": base64 of
                                np.save, "polygraphy_class": "ndarray"}``; decoded with
                                ``np.load(allow_pickle=False)`` (nothing is unpickled)
``loader.py:load_data``         a data-loader script: ``load_data()`` returns or yields feed
                                dicts. **This runs the user's code** -- the one input that
                                does; every other form is only read
a feed dict / a list of them    (Python API) fed as they are; torch tensors are converted
a callable                      (Python API) called with no arguments, like a loader script
==============================  =============================================================

**Batch axes.** Which inputs are batched, and on which axis, is read from the model: the
axis of a dimension named by a symbol that several inputs share (``batch``), else the first
dynamic dimension (a symbolic name, an unnamed dimension, ``-1`` or ``0``); a rank-0 input is
unbatched; a fully static input is batched on axis 0 with its fixed size. ``batch_axes``
(``--batch-axis name:1``, ``name:none``) overrides it per input.

**Shapes.** ``-1``, ``0``, symbolic names and missing dimensions accept any size; an unknown
rank accepts any rank; only positive fixed dimensions are checked.

**Limits.** No array may decompress to more than :func:`max_array_bytes` (default
:data:`DEFAULT_MAX_ARRAY_GIB` GiB, environment variable :data:`MAX_ARRAY_GIB_ENV`): the size is
read from the array's header before anything is decompressed, and an ``.npz`` is read one
batch at a time, so a small file that decompresses to gigabytes is refused, naming the array,
instead of filling memory.
"""

from __future__ import annotations

import base64
import binascii
import importlib.util
import io
import json
import os
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from ._common import Feed, OnnxInputError

DataLike = (str | os.PathLike[str] | Mapping[str, Any] | Iterable[Mapping[str, Any]]
            | Callable[[], Iterable[Mapping[str, Any]]])
BatchAxes = Mapping[str, int | None]

#: the environment variable that sets the per-array cap, in GiB
MAX_ARRAY_GIB_ENV = "GRAPHSURG_MAX_ARRAY_GIB"
#: the default per-array cap on decompressed calibration data, in GiB
DEFAULT_MAX_ARRAY_GIB = 4.0

_NP_OF_ONNX = {
    ir.DataType.FLOAT: np.float32,
    ir.DataType.DOUBLE: np.float64,
    ir.DataType.FLOAT16: np.float16,
    ir.DataType.INT64: np.int64,
    ir.DataType.INT32: np.int32,
    ir.DataType.INT16: np.int16,
    ir.DataType.INT8: np.int8,
    ir.DataType.UINT8: np.uint8,
    ir.DataType.UINT16: np.uint16,
    ir.DataType.UINT32: np.uint32,
    ir.DataType.UINT64: np.uint64,
    ir.DataType.BOOL: np.bool_,
}


def max_array_bytes() -> int:
    """The cap on one calibration array's decompressed size, in bytes."""
    raw = os.environ.get(MAX_ARRAY_GIB_ENV)
    if raw is None or not raw.strip():
        return int(DEFAULT_MAX_ARRAY_GIB * 2**30)
    try:
        gib = float(raw)
    except ValueError:
        gib = -1.0
    if not gib > 0:
        raise OnnxInputError(f"{MAX_ARRAY_GIB_ENV}={raw!r} is not a positive number of GiB")
    return int(gib * 2**30)


def _check_size(nbytes: int, what: str) -> None:
    cap = max_array_bytes()
    if nbytes > cap:
        raise OnnxInputError(
            f"{what} decompresses to {nbytes / 2**30:.3g} GiB, over the "
            f"{cap / 2**30:.3g} GiB limit per calibration array (refused, not read); pass fewer "
            f"rows, or raise the limit with {MAX_ARRAY_GIB_ENV}=<GiB>")


# -- what the model takes ----------------------------------------------------------------------
Dim = int | str | None  # a positive int is fixed; <= 0, a symbol or None is dynamic


def _dynamic(d: Dim) -> bool:
    return not isinstance(d, int) or d <= 0


@dataclass(frozen=True)
class InputSpec:
    """One model input: its dims (None: unknown rank), numpy dtype and batch axis (None:
    unbatched, fed whole to every batch)."""

    name: str
    dims: tuple[Dim, ...] | None
    dtype: Any
    axis: int | None

    def shape_str(self) -> str:
        if self.dims is None:
            return "(unknown rank)"
        return "(" + ", ".join("?" if d is None else str(d) for d in self.dims) + ")"

    def fixed_batch(self) -> int | None:
        """The input's fixed batch size (a static model), or None."""
        if self.axis is None or self.dims is None or self.axis >= len(self.dims):
            return None
        d = self.dims[self.axis]
        return d if isinstance(d, int) and d > 0 else None


def _dims(v: ir.Value) -> tuple[Dim, ...] | None:
    if v.shape is None:
        return None
    out: list[Dim] = []
    for d in v.shape:
        if isinstance(d, int):
            out.append(d)
        else:
            val = getattr(d, "value", None)
            out.append(val if isinstance(val, str) and val not in ("", "?") else None)
    return tuple(out)


def parse_batch_axes(items: Sequence[str] | None) -> dict[str, int | None]:
    """``["state:1", "sr:none"]`` (``--batch-axis``) -> ``{"state": 1, "sr": None}``."""
    out: dict[str, int | None] = {}
    for item in items or []:
        name, sep, ax = item.rpartition(":")
        if not sep or not name:
            raise OnnxInputError(f"--batch-axis {item!r}: write NAME:AXIS (e.g. state:1) or "
                                 "NAME:none for an input fed whole to every batch")
        if ax.strip().lower() == "none":
            out[name] = None
            continue
        try:
            out[name] = int(ax)
        except ValueError:
            raise OnnxInputError(f"--batch-axis {item!r}: the axis must be an integer or "
                                 "'none'") from None
    return out


def input_specs(model: ir.Model, batch_axes: BatchAxes | None = None) -> list[InputSpec]:
    """The model's fed inputs (graph inputs without an initializer) with their batch axes:
    given in ``batch_axes``, else read from the model (see the module documentation)."""
    inits = set(model.graph.initializers)
    values = [v for v in model.graph.inputs if v.name not in inits]
    names = [v.name or "" for v in values]
    given = dict(batch_axes or {})
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise OnnxInputError(f"batch axis given for {unknown}, which the model does not take; "
                             f"its inputs are {names}")
    dims = {v.name or "": _dims(v) for v in values}
    symbols: dict[str, int] = {}
    for ds in dims.values():
        for s in {d for d in ds or () if isinstance(d, str)}:
            symbols[s] = symbols.get(s, 0) + 1
    shared = [s for s, c in sorted(symbols.items(), key=lambda kv: -kv[1]) if c >= 2]
    batch_symbol = shared[0] if shared else None
    specs: list[InputSpec] = []
    for v in values:
        name = v.name or ""
        ds = dims[name]
        dt = _NP_OF_ONNX.get(v.dtype) if v.dtype is not None else None
        if name in given:
            axis = given[name]
            if axis is not None and ds is not None:
                if not -len(ds) <= axis < len(ds):
                    raise OnnxInputError(f"batch axis {axis} of input '{name}' is out of range "
                                         f"for its rank {len(ds)} {_fmt(ds)}")
                axis %= len(ds)
        elif ds is None:
            axis = 0  # unknown rank: batched on axis 0 when the array has one
        elif not ds:
            axis = None
        elif batch_symbol is not None and batch_symbol in ds:
            axis = ds.index(batch_symbol)
        else:
            axis = next((i for i, d in enumerate(ds) if _dynamic(d)), 0)
        specs.append(InputSpec(name, ds, dt, axis))
    return specs


def _fmt(ds: tuple[Dim, ...]) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in ds) + ")"


# -- checking one feed against the model -------------------------------------------------------
def check_shape(spec: InputSpec, shape: tuple[int, ...], where: str) -> None:
    """Refuse a shape the model cannot take: wrong rank, or a positive fixed dimension that
    differs. Dynamic dimensions (-1, 0, symbols, missing) take any size."""
    if spec.dims is None:
        return
    if len(shape) != len(spec.dims):
        zero_d = (" is 0-d (a scalar)" if not shape else f" has shape {shape}")
        raise OnnxInputError(
            f"{where}: input '{spec.name}'{zero_d} but the model expects rank {len(spec.dims)} "
            f"{spec.shape_str()}; give it {'its batch dimension' if not shape else 'that rank'}")
    for d, (got, want) in enumerate(zip(shape, spec.dims, strict=True)):
        if not _dynamic(want) and got != want:
            raise OnnxInputError(
                f"{where}: input '{spec.name}' has shape {shape} but the model expects "
                f"{spec.shape_str()} (dimension {d}: {want})")


def _cast(spec: InputSpec, a: np.ndarray, where: str) -> np.ndarray:
    if a.dtype.hasobject:
        raise OnnxInputError(f"{where}: input '{spec.name}' is an object array; pass numeric "
                             "arrays")
    if spec.dtype is None or a.dtype == spec.dtype:
        return a
    if not np.can_cast(a.dtype, spec.dtype, casting="same_kind"):
        raise OnnxInputError(f"{where}: input '{spec.name}' has dtype {a.dtype} but the model "
                             f"expects {np.dtype(spec.dtype)}")
    return a.astype(spec.dtype)


def check_feed(specs: Sequence[InputSpec], feed: Mapping[str, Any], where: str) -> Feed:
    """One feed dict checked against the model's inputs (names, rank, fixed dims, dtype;
    dtypes cast where numpy can do so within their kind)."""
    names = [s.name for s in specs]
    if set(feed) != set(names):
        missing = sorted(set(names) - set(feed))
        extra = sorted(set(feed) - set(names))
        raise OnnxInputError(f"{where} does not match the model's inputs {names}: missing "
                             f"{missing}, unexpected {extra}")
    out: Feed = {}
    for s in specs:
        a = _to_array(feed[s.name], f"{where}: input '{s.name}'")
        check_shape(s, tuple(a.shape), where)
        out[s.name] = _cast(s, a, where)
    check_finite(out, where)
    return out


def check_finite(feed: Mapping[str, np.ndarray], where: str) -> None:
    """Refuse a batch whose every floating-point input is entirely NaN/inf: nothing in it can
    be measured or verified. (Some non-finite values are measured and reported.)"""
    floats = [a for a in feed.values() if np.issubdtype(a.dtype, np.floating) and a.size]
    if floats and not any(np.isfinite(a).any() for a in floats):
        raise OnnxInputError(f"{where}: every floating-point input is entirely NaN/inf; "
                             "nothing can be measured or verified on it -- check the data")


def _to_array(v: Any, what: str) -> np.ndarray:
    if hasattr(v, "detach") and hasattr(v, "cpu"):
        v = v.detach().cpu().numpy()
    try:
        a = np.asarray(v)
    except (TypeError, ValueError) as e:
        raise OnnxInputError(f"{what} is not an array ({type(v).__name__}: {e})") from None
    if a.dtype.hasobject:
        raise OnnxInputError(f"{what} is not a numeric array (dtype object)")
    return a


# -- .npz read lazily --------------------------------------------------------------------------
@dataclass(frozen=True)
class _Member:
    key: str
    member: str
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool


class NpzArrays:
    """The arrays of one ``.npz``, described from their headers (nothing decompressed) and
    read on demand -- rows of a C-ordered array along axis 0 are read without the rest."""

    def __init__(self, path: Path) -> None:
        self.path = path
        where = f"calibration data '{path}'"
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
                self.members: dict[str, _Member] = {}
                for m in names:
                    if not m.endswith(".npy"):
                        continue
                    with zf.open(m) as f:
                        version = np.lib.format.read_magic(f)
                        if version == (1, 0):
                            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                        else:
                            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
                    self.members[m[:-4]] = _Member(m[:-4], m, tuple(shape), np.dtype(dtype),
                                                   bool(fortran))
        except (OSError, zipfile.BadZipFile, ValueError, EOFError) as e:
            raise OnnxInputError(f"{where} is not a readable .npz file ({type(e).__name__}); "
                                 "write it with numpy.savez(path, input_name=array, ...)") from None
        if not self.members:
            raise OnnxInputError(f"{where} holds no arrays")
        for k, mem in self.members.items():
            if mem.dtype.hasobject:
                raise OnnxInputError(f"{where}: array '{k}' holds Python objects (pickled); "
                                     "refused, not read -- save numeric arrays")
            _check_size(int(np.prod(mem.shape, dtype=np.int64)) * mem.dtype.itemsize,
                        f"{where}: array '{k}' {mem.shape} {mem.dtype}")

    def read(self, key: str, rows: slice | None = None) -> np.ndarray:
        """Array ``key`` (or its rows ``rows`` along axis 0), as a fresh array."""
        m = self.members[key]
        with zipfile.ZipFile(self.path) as zf, zf.open(m.member) as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                np.lib.format.read_array_header_1_0(f)
            else:
                np.lib.format.read_array_header_2_0(f)
            if rows is None or m.fortran or not m.shape:
                count = int(np.prod(m.shape, dtype=np.int64))
                a = np.frombuffer(_read_exact(f, count * m.dtype.itemsize, m), dtype=m.dtype)
                a = a.reshape(m.shape, order="F" if m.fortran else "C")
                return a if rows is None or not m.shape else a[rows].copy()
            start, stop, _ = rows.indices(m.shape[0])
            row = int(np.prod(m.shape[1:], dtype=np.int64)) * m.dtype.itemsize
            _skip(f, start * row)
            n = max(0, stop - start)
            a = np.frombuffer(_read_exact(f, n * row, m), dtype=m.dtype)
            return a.reshape((n, *m.shape[1:]))


_SKIP_CHUNK = 1 << 18


def _skip(f: Any, nbytes: int) -> None:
    """Read past ``nbytes`` of a zip member in 256 KiB steps (``ZipExtFile.seek`` reads up to
    16 MiB at once)."""
    while nbytes > 0:
        k = len(f.read(min(nbytes, _SKIP_CHUNK)))
        if not k:
            return
        nbytes -= k


def _read_exact(f: Any, nbytes: int, m: _Member) -> bytearray:
    buf = bytearray(nbytes)
    view = memoryview(buf)
    got = 0
    while got < nbytes:
        k = f.readinto(view[got:])
        if not k:
            raise OnnxInputError(f"calibration array '{m.key}' is truncated ({got} of {nbytes} "
                                 "bytes); rewrite the .npz")
        got += k
    return buf


class LazyFeed(Mapping[str, np.ndarray]):
    """A feed dict whose arrays are read from its source when used (the source keeps the
    last batch read, so a batch is decompressed once per use, and at most one is held)."""

    def __init__(self, source: _Source, index: int) -> None:
        self._source, self._index = source, index

    def _arrays(self) -> Feed:
        return self._source.load(self._index)

    def __getitem__(self, key: str) -> np.ndarray:
        return self._arrays()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._source.names)

    def __len__(self) -> int:
        return len(self._source.names)

    def __repr__(self) -> str:
        return f"LazyFeed({self._source.describe(self._index)})"


class _Source(ABC):
    """Where lazy feeds come from: ``load(i)`` returns batch ``i``, checked and cast."""

    names: list[str]

    def __init__(self, specs: Sequence[InputSpec]) -> None:
        self.specs = list(specs)
        self.names = [s.name for s in specs]
        self._cached: tuple[int, Feed] | None = None

    def load(self, i: int) -> Feed:
        if self._cached is not None and self._cached[0] == i:
            return self._cached[1]
        self._cached = None
        feed = self._read(i)
        check_finite(feed, f"calibration {self.describe(i)}")
        self._cached = (i, feed)
        return feed

    @abstractmethod
    def _read(self, i: int) -> Feed:
        """Batch ``i`` as read from the source (each source reads its own way)."""

    def describe(self, i: int) -> str:
        return f"batch {i}"


class _NpzSplit(_Source):
    """One ``.npz`` split along each input's batch axis."""

    def __init__(self, arrays: NpzArrays, specs: Sequence[InputSpec], bounds: list[slice],
                 axes: dict[str, int | None]) -> None:
        super().__init__(specs)
        self.arrays, self.bounds, self.axes = arrays, bounds, axes
        self._whole: dict[str, np.ndarray] = {}

    def _read(self, i: int) -> Feed:
        out: Feed = {}
        for s in self.specs:
            ax = self.axes[s.name]
            if ax is None:
                if s.name not in self._whole:
                    self._whole[s.name] = _cast(s, self.arrays.read(s.name), "calibration data")
                out[s.name] = self._whole[s.name]
            elif ax == 0:
                out[s.name] = _cast(s, self.arrays.read(s.name, self.bounds[i]), "calibration data")
            else:
                whole = self.arrays.read(s.name)
                idx = [slice(None)] * whole.ndim
                idx[ax] = self.bounds[i]
                out[s.name] = _cast(s, np.ascontiguousarray(whole[tuple(idx)]), "calibration data")
        return out

    def describe(self, i: int) -> str:
        b = self.bounds[i]
        return f"'{self.arrays.path}' rows {b.start}:{b.stop}"


class _NpzFiles(_Source):
    """A folder of ``.npz`` files, one feed dict each."""

    def __init__(self, files: list[NpzArrays], specs: Sequence[InputSpec]) -> None:
        super().__init__(specs)
        self.files = files

    def _read(self, i: int) -> Feed:
        f = self.files[i]
        return {s.name: _cast(s, f.read(s.name), f"calibration data '{f.path}'")
                for s in self.specs}

    def describe(self, i: int) -> str:
        return f"'{self.files[i].path}'"


def _split_npz(path: Path, specs: Sequence[InputSpec], batch_size: int
               ) -> list[Mapping[str, np.ndarray]]:
    arrays = NpzArrays(path)
    where = f"calibration data '{path}'"
    names = [s.name for s in specs]
    if set(arrays.members) != set(names):
        missing = sorted(set(names) - set(arrays.members))
        extra = sorted(set(arrays.members) - set(names))
        raise OnnxInputError(f"{where} does not match the model's inputs {names}: missing "
                             f"{missing}, unexpected {extra}")
    axes: dict[str, int | None] = {}
    rows: dict[str, int] = {}
    for s in specs:
        shape = arrays.members[s.name].shape
        ax = s.axis
        if ax is not None and s.dims is not None and len(shape) < len(s.dims):
            ax = None  # checked below: fed whole, the rank check names it
        if ax is not None and not shape:
            raise OnnxInputError(
                f"{where}: array '{s.name}' is 0-d (a scalar) but the model takes it batched "
                f"{s.shape_str()}; give it a batch dimension, or pass --batch-axis "
                f"{s.name}:none to feed it whole")
        if ax is not None and ax >= len(shape):
            raise OnnxInputError(f"{where}: array '{s.name}' {shape} has no axis {ax} to "
                                 "batch on; fix --batch-axis or the array")
        axes[s.name] = ax
        if ax is not None:
            rows[s.name] = shape[ax]
    if len(set(rows.values())) > 1:
        raise OnnxInputError(
            f"{where}: batched arrays differ in their number of samples ("
            + ", ".join(f"'{k}' {n} on axis {axes[k]}" for k, n in rows.items())
            + "); give every batched input the same count, or name each one's axis with "
            "--batch-axis NAME:AXIS (NAME:none for inputs fed whole)")
    total = next(iter(rows.values())) if rows else 1
    if total == 0:
        raise OnnxInputError(f"{where} holds 0 samples; pass at least one")
    fixed = {s.fixed_batch() for s in specs if axes[s.name] is not None} - {None}
    fixed_step = fixed.pop() if len(fixed) == 1 else None
    step = int(fixed_step) if fixed_step is not None else batch_size
    bounds = [slice(i, min(i + step, total)) for i in range(0, total, step)] if rows else [
        slice(0, 1)]
    for s in specs:
        shape = arrays.members[s.name].shape
        ax = axes[s.name]
        for b in {b.stop - b.start for b in bounds}:
            got = shape if ax is None else (*shape[:ax], b, *shape[ax + 1:])
            check_shape(s, tuple(got), where)
        _cast(s, np.empty(0, arrays.members[s.name].dtype), where)
    source = _NpzSplit(arrays, specs, bounds, axes)
    return [LazyFeed(source, i) for i in range(len(bounds))]


def _npz_folder(folder: Path, specs: Sequence[InputSpec]) -> list[Mapping[str, np.ndarray]]:
    files = sorted(p for p in folder.iterdir() if p.suffix == ".npz" and p.is_file())
    if not files:
        raise OnnxInputError(f"calibration folder '{folder}' holds no .npz files; write one "
                             "feed dict per file with numpy.savez(path, input_name=array, ...)")
    loaded = [NpzArrays(p) for p in files]
    for a in loaded:
        _check_members(specs, a)
    source = _NpzFiles(loaded, specs)
    return [LazyFeed(source, i) for i in range(len(loaded))]


def _check_members(specs: Sequence[InputSpec], a: NpzArrays) -> None:
    """A per-batch ``.npz`` checked from its headers (names, shapes, dtypes), unread."""
    where = f"calibration data '{a.path}'"
    names = [s.name for s in specs]
    if set(a.members) != set(names):
        missing = sorted(set(names) - set(a.members))
        extra = sorted(set(a.members) - set(names))
        raise OnnxInputError(f"{where} does not match the model's inputs {names}: missing "
                             f"{missing}, unexpected {extra}")
    for s in specs:
        m = a.members[s.name]
        check_shape(s, m.shape, where)
        _cast(s, np.empty(0, m.dtype), where)


# -- Polygraphy JSON ---------------------------------------------------------------------------
def _decode_polygraphy(obj: Any, where: str) -> np.ndarray:
    if isinstance(obj, dict) and isinstance(obj.get("array"), str):
        try:
            raw = base64.b64decode(obj["array"].encode(), validate=True)
        except (binascii.Error, ValueError):
            raise OnnxInputError(f"{where} is not valid base64; re-save it with polygraphy "
                                 "run --save-inputs") from None
        buf = io.BytesIO(raw)
        try:
            version = np.lib.format.read_magic(buf)
            header = (np.lib.format.read_array_header_1_0(buf) if version == (1, 0)
                      else np.lib.format.read_array_header_2_0(buf))
            shape, _, dtype = header
            if np.dtype(dtype).hasobject:
                raise OnnxInputError(f"{where} holds Python objects (pickled); refused, not read")
            _check_size(int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize, where)
            buf.seek(0)
            return np.load(buf, allow_pickle=False)
        except OnnxInputError:
            raise
        except (ValueError, EOFError, OSError) as e:
            raise OnnxInputError(f"{where} is not a saved numpy array ({type(e).__name__}: "
                                 f"{e})") from None
    if isinstance(obj, dict) and ("values" in obj or "polygraphy_serialized_json_type" in obj):
        raise OnnxInputError(f"{where} uses Polygraphy's legacy pickled encoding; refused, not "
                             "unpickled -- re-save the inputs with a current polygraphy")
    if isinstance(obj, list | int | float | bool):
        return np.asarray(obj)
    raise OnnxInputError(f"{where} is not an encoded array; expected {{\"array\": <base64>, "
                         "\"polygraphy_class\": \"ndarray\"}")


def load_polygraphy_json(path: Path) -> list[dict[str, np.ndarray]]:
    """The feed dicts of a ``polygraphy run --save-inputs`` file (see the module doc)."""
    where = f"calibration inputs '{path}'"
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise OnnxInputError(f"{where} is not readable JSON ({type(e).__name__}); pass a file "
                             "written by polygraphy run --save-inputs") from None
    if isinstance(doc, dict) and isinstance(doc.get("lst"), list):
        doc = doc["lst"]  # polygraphy's InputData wrapper
    if not isinstance(doc, list) or not all(isinstance(b, dict) for b in doc):
        raise OnnxInputError(f"{where} is not a JSON list of feed dicts (polygraphy run "
                             "--save-inputs writes one)")
    return [{str(k): _decode_polygraphy(v, f"{where} batch {i} input '{k}'")
             for k, v in b.items()} for i, b in enumerate(doc)]


# -- data-loader scripts -------------------------------------------------------------------------
def run_loader_script(spec: str, *, max_batches: int | None = None) -> list[Mapping[str, Any]]:
    """Run ``file.py[:function]`` (default function ``load_data``) and collect the feed dicts
    it returns or yields. This executes the user's code, as the user asked."""
    file, sep, func = spec.rpartition(":")
    if not sep or not file or os.sep in func or func.endswith(".py"):
        file, func = spec, "load_data"
    path = Path(file)
    if not path.is_file():
        raise OnnxInputError(f"data-loader script '{path}' does not exist; pass "
                             "--data-loader-script file.py:load_data")
    mod_spec = importlib.util.spec_from_file_location(f"_graphsurg_loader_{abs(hash(path))}",
                                                      path)
    if mod_spec is None or mod_spec.loader is None:
        raise OnnxInputError(f"data-loader script '{path}' cannot be loaded as Python")
    module = importlib.util.module_from_spec(mod_spec)
    try:
        mod_spec.loader.exec_module(module)
    except Exception as e:  # the user's script failed: bad input, reported in one line
        raise OnnxInputError(f"data-loader script '{path}' raised {type(e).__name__}: "
                             f"{_first_line(e)}") from None
    fn = getattr(module, func, None)
    if not callable(fn):
        raise OnnxInputError(f"data-loader script '{path}' defines no function {func!r}; "
                             "define it, or name it as file.py:function")
    return _call_loader(fn, f"data loader '{spec}'", max_batches)


def _call_loader(fn: Callable[[], Any], what: str, max_batches: int | None
                 ) -> list[Mapping[str, Any]]:
    out: list[Mapping[str, Any]] = []
    try:
        it = iter(fn())
        for b in it:
            if max_batches is not None and len(out) >= max_batches:
                break
            if not isinstance(b, Mapping):
                raise OnnxInputError(f"{what} yielded a {type(b).__name__}; it must yield "
                                     "feed dicts {input name: array}")
            out.append(b)
    except OnnxInputError:
        raise
    except Exception as e:  # the user's loader failed
        raise OnnxInputError(f"{what} raised {type(e).__name__}: {_first_line(e)}") from None
    return out


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


# -- the one entry point -----------------------------------------------------------------------
def check_batch_options(batch_size: int, max_batches: int | None = None) -> None:
    """Refuse a batch size or batch count below 1 (``--batch-size -5``, ``--max-batches 0``)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer) \
            or batch_size < 1:
        raise OnnxInputError(f"batch size {batch_size!r} must be a positive integer")
    if max_batches is not None and (isinstance(max_batches, bool) or
                                    not isinstance(max_batches, int | np.integer)
                                    or max_batches < 1):
        raise OnnxInputError(f"max batches {max_batches!r} must be a positive integer (or "
                             "None for all)")


def load_feeds(model: ir.Model, data: DataLike, *, batch_size: int = 64,
               batch_axes: BatchAxes | None = None, max_batches: int | None = None,
               loader: str | None = None) -> list[Mapping[str, np.ndarray]]:
    """Calibration data in any of the forms of the module documentation, as feed dicts
    checked against ``model``'s inputs (``.npz`` feeds are read lazily, batch by batch).

    ``loader`` names a data-loader script (``file.py:func``); then ``data`` is ignored.

    Raises:
        OnnxInputError: unreadable or mismatched data, a bad option (one line).
    """
    check_batch_options(batch_size, max_batches)
    specs = input_specs(model, batch_axes)
    raw: list[Mapping[str, Any]]
    if loader is not None:
        raw = run_loader_script(loader, max_batches=max_batches)
    elif isinstance(data, str | os.PathLike):
        p = Path(os.fspath(data))
        if p.is_dir():
            return _npz_folder(p, specs)
        if not p.is_file():
            raise OnnxInputError(f"calibration data '{p}' does not exist; pass an .npz file, a "
                                 "folder of .npz files or a polygraphy inputs .json")
        if p.suffix.lower() == ".json":
            raw = list(load_polygraphy_json(p))
        elif p.suffix.lower() == ".py" or ".py:" in str(data):
            raise OnnxInputError(f"'{p}' is a Python script: pass it as a data loader "
                                 "(--data-loader-script file.py:load_data), which runs it")
        else:
            return _split_npz(p, specs, int(batch_size))
    elif isinstance(data, Mapping):
        raw = [data]
    elif callable(data):
        raw = _call_loader(data, "the data loader", max_batches)
    elif isinstance(data, Iterable) and not isinstance(data, bytes | np.ndarray):
        items = list(data)
        if items and all(isinstance(x, str | os.PathLike) for x in items):
            files = [NpzArrays(Path(str(x))) for x in items]
            for a in files:
                _check_members(specs, a)
            source = _NpzFiles(files, specs)
            lazy: list[Mapping[str, np.ndarray]] = [LazyFeed(source, i)
                                                    for i in range(len(files))]
            return lazy
        if not all(isinstance(x, Mapping) for x in items):
            bad = next(type(x).__name__ for x in items if not isinstance(x, Mapping))
            raise OnnxInputError(f"calibration data holds a {bad}; pass feed dicts "
                                 "{input name: array}")
        raw = items
    else:
        raise OnnxInputError(f"calibration data must be an .npz path, a folder of .npz files, a "
                             "polygraphy .json, a feed dict, an iterable of feed dicts or a "
                             f"callable, got {type(data).__name__}")
    if not raw:
        raise OnnxInputError("calibration data is empty; pass at least one batch")
    feeds: list[Mapping[str, np.ndarray]] = [
        check_feed(specs, b, f"calibration batch {i}") for i, b in enumerate(raw)]
    for i, f in enumerate(feeds):
        for k, arr in f.items():
            _check_size(arr.nbytes, f"calibration batch {i} input '{k}'")
    return feeds


def halve_feed(specs: Sequence[InputSpec], feed: Mapping[str, np.ndarray]
               ) -> tuple[Feed, Feed] | None:
    """Cut a feed in two along each batched input's axis (unbatched inputs go whole to both
    halves); None when the batched inputs do not share a size of at least 2 there."""
    sizes: set[int] = set()
    axes: dict[str, int | None] = {}
    for s in specs:
        a = feed[s.name]
        ax = s.axis if s.axis is not None and s.axis < a.ndim else None
        axes[s.name] = ax
        if ax is not None:
            sizes.add(a.shape[ax])
    if len(sizes) != 1:
        return None
    n = sizes.pop()
    if n < 2:
        return None
    h = n // 2
    first: Feed = {}
    second: Feed = {}
    for s in specs:
        a = feed[s.name]
        ax = axes[s.name]
        if ax is None:
            first[s.name] = second[s.name] = a
            continue
        first[s.name] = np.take(a, np.arange(h), axis=ax)
        second[s.name] = np.take(a, np.arange(h, n), axis=ax)
    return first, second


def plain(feed: Mapping[str, np.ndarray]) -> Feed:
    """A feed as a plain dict (what onnxruntime takes)."""
    return feed if isinstance(feed, dict) else {k: feed[k] for k in feed}


__all__ = ["DEFAULT_MAX_ARRAY_GIB", "MAX_ARRAY_GIB_ENV", "BatchAxes", "DataLike", "InputSpec",
           "LazyFeed", "check_batch_options", "check_feed", "halve_feed", "input_specs",
           "load_feeds", "load_polygraphy_json", "max_array_bytes", "parse_batch_axes",
           "plain", "run_loader_script"]
