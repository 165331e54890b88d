"""Shared plumbing of the ONNX adapter: the error type, safe loading and atomic saving,
calibration data, and onnxruntime sessions.

Everything that reads user input validates it here, so bad input fails early with one line
naming the problem and the fix (:class:`OnnxInputError`).
"""

from __future__ import annotations

import contextlib
import math
import os
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from graphsurg._files import atomic_outputs, write_bytes

#: Domains whose operators onnxruntime implements; nodes in any other domain are left
#: untouched and reported.
KNOWN_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})

Feed = dict[str, np.ndarray]


class OnnxInputError(ValueError):
    """Bad input to the ONNX adapter: a malformed or unsafe model file, or calibration data
    that does not fit the model. The message is one line naming the problem and the fix."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


ModelLike = str | os.PathLike[str] | onnx.ModelProto | ir.Model


# -- loading --------------------------------------------------------------------------------
def _check_external_data(proto: onnx.ModelProto, folder: Path, where: str) -> None:
    """Refuse external-data references that are absolute, escape ``folder`` or are missing.

    Nothing is read: only paths and sizes are checked."""
    root = folder.resolve()
    tensors: list[onnx.TensorProto] = list(proto.graph.initializer)
    for node in proto.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                tensors.append(attr.t)
    for t in tensors:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        if not loc or os.path.isabs(loc) or Path(loc).is_absolute():
            raise OnnxInputError(
                f"{where}: initializer '{t.name}' has external data at absolute path {loc!r}; "
                "external data must be a relative path inside the model's folder (refused, not read)"
            )
        target = (root / loc).resolve()
        if not target.is_relative_to(root):
            raise OnnxInputError(
                f"{where}: initializer '{t.name}' points its external data outside the model's "
                f"folder ({loc!r}); refused, not read — move the data file next to the model"
            )
        if not target.is_file():
            raise OnnxInputError(
                f"{where}: external data file {loc!r} for initializer '{t.name}' is missing; "
                "copy it next to the model"
            )
        offset = _external_int(info, "offset", t.name, where)
        length = _external_int(info, "length", t.name, where)
        end = offset + length
        if end > target.stat().st_size:
            raise OnnxInputError(
                f"{where}: external data file {loc!r} is shorter than initializer '{t.name}' "
                f"needs ({target.stat().st_size} < {end} bytes); the data file is truncated"
            )


def _external_int(info: dict[str, str], key: str, tensor: str, where: str) -> int:
    """An external-data ``offset``/``length``: a non-negative decimal integer (0 if absent)."""
    raw = info.get(key, "")
    if raw == "":
        return 0
    if not raw.strip().isdigit():
        raise OnnxInputError(
            f"{where}: initializer '{tensor}' has external-data {key} {raw!r}, not a "
            "non-negative integer; the model file is corrupt (re-export it)")
    return int(raw)


def _graphs(g: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``g`` and every subgraph in it (If / Loop / Scan bodies)."""
    yield g
    for node in g.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _graphs(sub)


def _dense(sp: onnx.SparseTensorProto, where: str) -> onnx.TensorProto:
    """A sparse tensor as the dense tensor it stands for (same name)."""
    from onnx import numpy_helper

    from .inputs import _check_size

    dims = tuple(int(d) for d in sp.dims)
    values = numpy_helper.to_array(sp.values)
    name = sp.values.name
    _check_size(int(np.prod(dims, dtype=np.int64)) * values.dtype.itemsize,
                f"{where}: sparse tensor '{name}' {dims} made dense")
    dense = np.zeros(dims, values.dtype)
    idx = numpy_helper.to_array(sp.indices).astype(np.int64)
    try:
        if idx.ndim == 1:
            dense.reshape(-1)[idx] = values.reshape(-1)
        else:
            dense[tuple(idx.T)] = values.reshape(-1)
    except (IndexError, ValueError):
        raise OnnxInputError(f"{where}: sparse tensor '{name}' has indices outside its shape "
                             f"{dims}; the model is corrupt") from None
    return numpy_helper.from_array(dense, name)


def _densify_sparse(proto: onnx.ModelProto, where: str) -> onnx.ModelProto:
    """``proto`` with sparse initializers and ``Constant(sparse_value=...)`` made dense (a copy
    when there are any: onnx-ir reads neither)."""
    def has_sparse(g: onnx.GraphProto) -> bool:
        return bool(g.sparse_initializer) or any(
            a.name == "sparse_value" for n in g.node if n.op_type == "Constant"
            for a in n.attribute)

    if not any(has_sparse(g) for g in _graphs(proto.graph)):
        return proto
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    for g in _graphs(out.graph):
        for sp in g.sparse_initializer:
            g.initializer.append(_dense(sp, where))
        del g.sparse_initializer[:]
        for n in g.node:
            if n.op_type != "Constant":
                continue
            for a in n.attribute:
                if a.name == "sparse_value":
                    t = _dense(a.sparse_tensor, where)
                    a.Clear()
                    a.name = "value"
                    a.type = onnx.AttributeProto.TENSOR
                    a.t.CopyFrom(t)
    return out


def _check_header(proto: onnx.ModelProto, where: str) -> None:
    if proto.ir_version <= 0 or not proto.opset_import or not proto.HasField("graph"):
        raise OnnxInputError(
            f"{where} is not an ONNX model (no ir_version, opset or graph); pass a .onnx file"
        )


def _deserialize(proto: onnx.ModelProto, where: str) -> ir.Model:
    try:
        return ir.serde.deserialize_model(proto)
    except Exception as e:  # onnx-ir refuses a malformed graph before the checker sees it
        raise OnnxInputError(f"{where} is not a valid ONNX model: {_first_line(e)}") from None


def check_weightless(model: ir.Model, where: str, *, full_check: bool = False) -> None:
    """``onnx.checker.check_model`` on ``model`` without its weights: the graph is written
    with every large weight (and every external-data tensor) as an external-data
    placeholder beside an empty placeholder file, so no weight is serialized, copied or read
    again (the checker would otherwise re-read and parse the whole file). Names, types and
    shapes -- what the checker and shape inference read -- are all there; the weights'
    byte sizes were checked when they were read (:func:`_tensors_in_arrays`) or their
    external-data ranges (:func:`_check_external_data`).

    Raises:
        OnnxInputError: the checker refuses the model (its first line).
    """
    try:
        with weights_apart(model):
            bare = ir.serde.serialize_model(model)
        _check_bare_file(bare, full_check)
    except Exception as e:  # the checker raises several types
        raise OnnxInputError(f"{where} is not a valid ONNX model: {_first_line(e)}") from None


def _check_bare_file(bare: onnx.ModelProto, full_check: bool) -> None:
    """``onnx.checker.check_model`` on a weightless proto (its large weights are
    :data:`IN_MEMORY` placeholders), through a file beside an empty placeholder file: the
    checker insists that external data exists as a regular file."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / IN_MEMORY).touch()
        p = Path(d) / "model.onnx"
        p.write_bytes(bare.SerializeToString())
        onnx.checker.check_model(str(p), full_check=full_check)


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def infer_and_check(model: ir.Model, where: str, *, full_check: bool = True,
                    infer: bool = True, merge: bool = True
                    ) -> tuple[onnx.ModelProto, dict[str, np.ndarray], list[str]]:
    """One serialization of ``model``'s graph (weights apart, :func:`weights_apart`) for both
    onnx shape inference and the checker, where the cleanup pass and
    ``check_model(full_check=True)`` each serialized it and inferred shapes once more.

    With ``full_check``: strict shape inference with type checks (what
    ``check_model(full_check=True)`` runs) and the structural checker on its result; a failure
    raises. Without it, inference is best effort (a failure is a note and the shapes stay as
    they are). With ``merge``, the inferred types and shapes are also set on ``model``'s
    values by name (:func:`merge_inferred`, as onnx-ir's ``ShapeInferencePass`` merges them;
    not needed when only the returned proto is written or handed back).

    Returns:
        ``(weightless proto, its weights by name, notes)``; the proto (shapes inferred) is
        the output's graph: :func:`with_weights` puts the weights back.

    Raises:
        OnnxInputError: ``full_check`` and the checker or strict inference refuses the model.
    """
    with weights_apart(model) as arrays, initializers_as_inputs(model):
        bare = ir.serde.serialize_model(model)
    out, notes = infer_and_check_proto(bare, where, full_check=full_check, infer=infer)
    if infer and merge and out is not bare:
        merge_inferred(model, out)
    return out, arrays, notes


def infer_and_check_proto(proto: onnx.ModelProto, where: str, *, full_check: bool = True,
                          infer: bool = True, check: Callable[[onnx.ModelProto], None] | None
                          = None) -> tuple[onnx.ModelProto, list[str]]:
    """:func:`infer_and_check` on a ``ModelProto``: ``(proto with shapes inferred, notes)``.
    ``check`` runs the structural checker (default: on a file beside the :data:`IN_MEMORY`
    placeholder, for a weightless proto).

    Raises:
        OnnxInputError: ``full_check`` and the checker or strict inference refuses the model.
    """
    notes: list[str] = []
    out = proto
    if infer or full_check:
        try:
            out = onnx.shape_inference.infer_shapes(proto, check_type=True,
                                                    strict_mode=full_check,
                                                    data_prop=not full_check)
        except Exception as e:  # the inference raises several types
            if full_check:
                raise OnnxInputError(f"{where} is not a valid ONNX model: {_first_line(e)}") \
                    from None
            notes.append(f"shape inference skipped: {type(e).__name__}")
    if full_check:
        try:
            if check is None:
                _check_bare_file(out, full_check=False)
            else:
                check(out)
        except Exception as e:  # the checker raises several types
            raise OnnxInputError(f"{where} is not a valid ONNX model: {_first_line(e)}") from None
    return out, notes


def merge_inferred(model: ir.Model, inferred: onnx.ModelProto) -> None:
    """Set the types and shapes that onnx inferred (``inferred``'s value infos and outputs,
    subgraphs included) on ``model``'s values of the same name that have none (onnx-ir's
    ``ShapeInferencePass`` merge without deserializing the whole model again; a value whose
    type and shape are known keeps them: the edits keep their values' shapes, and strict
    inference fails on a disagreement)."""
    infos: dict[str, onnx.TypeProto] = {}
    stack = [inferred.graph]
    while stack:
        g = stack.pop()
        for vi in (*g.value_info, *g.output, *g.input):
            if vi.HasField("type"):
                infos.setdefault(vi.name, vi.type)
        for n in g.node:
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    stack.append(a.g)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    stack.extend(a.graphs)
    for graph in model.graphs():
        for v in (*graph.inputs, *(o for n in graph for o in n.outputs)):
            if v.shape is not None and v.type is not None:
                continue  # known (an edit keeps its values' shapes; strict inference agreed)
            t = infos.get(v.name) if v.name else None
            if t is None:
                continue
            shape = ir.serde.deserialize_type_proto_for_shape(t)
            if shape is not None:
                v.shape = shape
            typ = ir.serde.deserialize_type_proto_for_type(t)
            if typ is not None and v.type is None:
                v.type = typ


def with_weights(bare: onnx.ModelProto, arrays: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """``bare`` (from :func:`infer_and_check`) with its :data:`IN_MEMORY` placeholders filled
    from ``arrays``, in place: the self-contained model ``ir.serde.serialize_model`` writes."""
    for t in bare.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        loc = next((e.value for e in t.external_data if e.key == "location"), None)
        if loc != IN_MEMORY or t.name not in arrays:
            continue
        arr = arrays[t.name]
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        del t.external_data[:]
        t.ClearField("data_location")
        t.raw_data = np.ascontiguousarray(arr).tobytes()
    return bare


def load_model(model: ModelLike) -> tuple[ir.Model, str]:
    """Load ``model`` into a fresh ``ir.Model`` (never the caller's object) and return it with
    the kind it came as (``"path"``, ``"proto"`` or ``"ir"``).

    Files are read with onnx-ir: external data is memory-mapped (no 2 GB protobuf limit) after
    its paths were checked to stay inside the model's folder. A file over
    :data:`SMALL_PROTO_BYTES` is read without its inline weights, which are memory-mapped
    from the file itself (``ir.ExternalTensor`` at their offsets; ``ir.save`` and
    :func:`save_model_files` write them out, self-contained by default).

    Raises:
        OnnxInputError: the file is missing, not ONNX, truncated, or its external data is
            missing or outside the model's folder.
    """
    if isinstance(model, ir.Model):
        return _initializers_apart(_tensors_in_arrays(model.clone(), "the onnx_ir.Model")), "ir"
    if isinstance(model, onnx.ModelProto):
        where = "the ModelProto"
        _check_header(model, where)
        dense = _densify_sparse(model, where)
        loaded = _tensors_in_arrays(_deserialize(dense, where), where)
        if not _check_small_proto(dense, where):
            check_weightless(loaded, where)
        return _initializers_apart(loaded), "proto"
    if not isinstance(model, str | os.PathLike):
        raise OnnxInputError(
            f"expected a path, onnx.ModelProto or onnx_ir.Model, got {type(model).__name__}"
        )
    path = Path(model)
    where = f"'{path}'"
    if not path.is_file():
        raise OnnxInputError(f"{where} does not exist or is not a file; pass a .onnx model file")
    inline: set[str] = set()
    try:
        got = _read_weights_mapped(path) if path.stat().st_size > SMALL_PROTO_BYTES else None
        if got is not None:
            proto, inline = got
        else:
            proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf DecodeError and friends
        raise OnnxInputError(
            f"{where} is not an ONNX model or is truncated ({type(e).__name__}); "
            "re-export or re-download it"
        ) from None
    _check_external_data(proto, path.parent, where)
    _check_header(proto, where)
    proto = _densify_sparse(proto, where)
    loaded = _deserialize(proto, where)
    checked = _check_small_proto(proto, where)
    del proto  # the tensors are read out of it once (below), then it is freed
    ir.external_data.set_base_dir(loaded.graph, path.parent)
    loaded = _tensors_in_arrays(loaded, where)
    for name in inline:
        v = loaded.graph.initializers.get(name)
        if v is not None and isinstance(v.const_value, ir.ExternalTensor):
            _MAPPED_INLINE.add(v.const_value)
    if not checked:
        check_weightless(loaded, where)
    return _initializers_apart(loaded), "path"


#: tensors stored inline in a large model's own file and read memory-mapped from it
#: (:func:`_read_weights_mapped`): external tensors to onnx-ir, not external data to the user
_MAPPED_INLINE: weakref.WeakSet[ir.ExternalTensor] = weakref.WeakSet()
#: an inline tensor at least this large is memory-mapped from the model file
_MAP_MIN_BYTES = 1024


def _varint_at(buf: Any, i: int) -> tuple[int, int]:
    """The varint at ``buf[i]`` and the index after it."""
    shift = result = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, i
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _wire_fields(buf: Any, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """The protobuf fields of ``buf[start:end]``: ``(number, wire type, value start, value
    end, field start)``."""
    i = start
    while i < end:
        fs = i
        key, i = _varint_at(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, j = _varint_at(buf, i)
        elif wire == 1:
            j = i + 8
        elif wire == 2:
            n, i = _varint_at(buf, i)
            j = i + n
        elif wire == 5:
            j = i + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if j > end:
            raise ValueError("truncated field")
        yield number, wire, i, j, fs
        i = j


def _entry(key: str, value: str) -> bytes:
    """A ``StringStringEntryProto`` as ``TensorProto.external_data`` (field 13) holds it."""
    k, v = key.encode(), value.encode()
    body = _field(1, len(k)) + k + _field(2, len(v)) + v
    return _field(_TENSOR_EXTERNAL_DATA, len(body)) + body


def _read_weights_mapped(path: Path) -> tuple[onnx.ModelProto, set[str]] | None:
    """Parse the model file at ``path`` without its large inline weights: each initializer's
    ``raw_data`` of at least :data:`_MAP_MIN_BYTES` becomes an external-data reference to
    the same file at that field's offset (onnx-ir memory-maps it on use), so neither
    protobuf nor graphsurg holds a copy of the weights -- the page cache does, shared with
    onnxruntime. Returns the proto and the names of the tensors so read; None when the file
    is not laid out as expected (the caller parses it whole)."""
    import mmap

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        graphs = [(vs, ve, fs) for n, w, vs, ve, fs in _wire_fields(buf, 0, len(buf))
                  if n == _MODEL_GRAPH and w == 2]
        if len(graphs) != 1:
            return None
        gs, ge, gfs = graphs[0]
        parts: list[bytes] = []
        names: set[str] = set()
        loc = _entry("location", path.name)
        for n, w, vs, ve, fs in _wire_fields(buf, gs, ge):
            if n == _GRAPH_INITIALIZER and w == 2:
                tensor = _tensor_mapped(buf, vs, ve, loc)
                if tensor is not None:
                    body, name = tensor
                    parts.append(_field(_GRAPH_INITIALIZER, len(body)) + body)
                    names.add(name)
                    continue
            parts.append(buf[fs:ve])
        graph = b"".join(parts)
        model = buf[:gfs] + _field(_MODEL_GRAPH, len(graph)) + graph + buf[ge:]
    return onnx.ModelProto.FromString(model), names


def _tensor_mapped(buf: Any, start: int, end: int, loc: bytes) -> tuple[bytes, str] | None:
    """The ``TensorProto`` at ``buf[start:end]`` with its ``raw_data`` replaced by an
    external-data reference to its place in the file, and its name; None to keep it as it
    is (small, already external, or no raw data)."""
    raw: tuple[int, int] | None = None
    name = ""
    keep: list[bytes] = []
    for n, w, vs, ve, fs in _wire_fields(buf, start, end):
        if n == _TENSOR_RAW_DATA and w == 2:
            raw = (vs, ve)
            continue
        if n in (_TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION):
            return None
        if n == _TENSOR_NAME and w == 2:
            name = bytes(buf[vs:ve]).decode("utf-8", "replace")
        keep.append(buf[fs:ve])
    if raw is None or raw[1] - raw[0] < _MAP_MIN_BYTES or not name:
        return None
    keep += [loc, _entry("offset", str(raw[0])), _entry("length", str(raw[1] - raw[0])),
             bytes([_TENSOR_DATA_LOCATION << 3, onnx.TensorProto.EXTERNAL])]
    return b"".join(keep), name


#: a model up to this size is checked as the proto it was read as (one C++ copy of it);
#: a larger one without its weights (:func:`check_weightless`)
SMALL_PROTO_BYTES = 64 * 2**20


def _small(proto: onnx.ModelProto) -> bool:
    """Whether ``proto`` holds no external data and at most :data:`SMALL_PROTO_BYTES`."""
    inits = proto.graph.initializer
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in inits):
        return False
    # the weights' size from their dims (8 bytes an element at most), Constant-node weights
    # (Paddle2ONNX, tf2onnx) included: ByteSize() itself takes seconds on a 400 MB proto
    consts = [a.t for n in proto.graph.node if n.op_type == "Constant"
              for a in n.attribute if a.type == onnx.AttributeProto.TENSOR]
    return 8 * sum(math.prod(t.dims) for t in (*inits, *consts)) <= SMALL_PROTO_BYTES


def _check_small_proto(proto: onnx.ModelProto, where: str) -> bool:
    """``onnx.checker.check_model`` on ``proto`` itself when it holds no external data and is
    at most :data:`SMALL_PROTO_BYTES` (the checker copies it once in C++), where serializing
    the deserialized graph again costs more than the check (a 10k-node graph: ~1 s of
    Python). False when not checked here (too large, or external data).

    Raises:
        OnnxInputError: the checker refuses the model (its first line).
    """
    if not _small(proto):
        return False
    try:
        onnx.checker.check_model(proto)
    except Exception as e:  # the checker raises several types
        raise OnnxInputError(f"{where} is not a valid ONNX model: {_first_line(e)}") from None
    return True


#: element types whose tensors are held as numpy arrays and handed to onnxruntime as
#: buffers (others -- strings, 4-bit, float8, bfloat16 -- stay as they were read)
_BUFFER_DTYPES = frozenset({
    ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.INT8,
    ir.DataType.INT16, ir.DataType.INT32, ir.DataType.INT64, ir.DataType.UINT8,
    ir.DataType.UINT16, ir.DataType.UINT32, ir.DataType.UINT64, ir.DataType.BOOL,
})


#: element types held as numpy arrays once read (bfloat16 as ml_dtypes' type: read once,
#: though serialized, not handed over, for onnxruntime)
_HELD_DTYPES = _BUFFER_DTYPES | {ir.DataType.BFLOAT16}


def _tensors_in_arrays(model: ir.Model, where: str) -> ir.Model:
    """Hold every initializer of the main graph that lives in the parsed protobuf as a numpy
    array (one copy, read once) so the protobuf can be freed: onnx-ir's proto-backed tensors
    copy their bytes on every ``numpy()``, and each onnxruntime session would hold another
    copy. External-data tensors stay memory-mapped."""
    for v in model.graph.initializers.values():
        t = v.const_value
        if isinstance(t, ir.TensorProtoTensor) and t.dtype in _HELD_DTYPES:
            try:
                arr = t.numpy()
            except (ValueError, TypeError) as e:  # raw bytes that do not fill its shape
                raise OnnxInputError(
                    f"{where}: initializer '{t.name}' has data that does not match its shape "
                    f"{tuple(t.shape.numpy())} ({type(e).__name__}); the model is corrupt "
                    "(re-export it)") from None
            v.const_value = ir.Tensor(arr, dtype=t.dtype, name=t.name)
    return model


def _initializers_apart(model: ir.Model) -> ir.Model:
    """An IR < 4 model lists its initializers among the graph inputs; the working copy keeps
    them apart (they are weights, not inputs to feed) and :func:`initializers_as_inputs`
    lists them again when it is written."""
    if model.ir_version < _IR_INITIALIZERS_FREE:
        for v in [v for v in model.graph.inputs if v.is_initializer()]:
            model.graph.inputs.remove(v)
    return model


def is_mapped_inline(t: Any) -> bool:
    """``t`` is a weight stored inline in the model's own file and read memory-mapped from
    it (:func:`_read_weights_mapped`): an ``ir.ExternalTensor`` to onnx-ir, not the user's
    external data."""
    return t is not None and t in _MAPPED_INLINE


def has_external_tensors(model: ir.Model) -> bool:
    """The model holds external data (tensors read memory-mapped from its own file are
    not)."""
    return any(
        isinstance(v.const_value, ir.ExternalTensor) and not is_mapped_inline(v.const_value)
        for v in model.graph.initializers.values()
    )


def save_model(
    model: ir.Model,
    path: str | os.PathLike[str],
    *,
    save_external_data: bool = False,
    external_data_size_threshold: int = 1024,
) -> Path:
    """Write ``model`` to ``path`` atomically (see :func:`save_model_files`); return ``path``."""
    return save_model_files(model, path, save_external_data=save_external_data,
                            external_data_size_threshold=external_data_size_threshold)[0]


def save_model_files(
    model: ir.Model,
    path: str | os.PathLike[str],
    *,
    save_external_data: bool = False,
    external_data_size_threshold: int = 1024,
    bare: tuple[onnx.ModelProto, Mapping[str, np.ndarray]] | None = None,
) -> list[Path]:
    """Write ``model`` to ``path`` atomically with :func:`graphsurg._files.atomic_outputs`:
    ``path`` (and its data file) hold the old content or the new, never half of it.

    With ``save_external_data`` (or when the model already holds external tensors), tensors
    larger than ``external_data_size_threshold`` bytes go to ``<name>.data`` next to it; the
    model and its data file are written together. Returns every file written. ``bare``: see
    :func:`write_self_contained` (used for a self-contained file only).
    """
    out = Path(path)
    external = save_external_data or has_external_tensors(model)
    if not external:
        with atomic_outputs(out) as (tmp,):
            write_self_contained(model, tmp, bare=bare)
        return [out]
    data = out.with_name(out.name + ".data")
    # tensors that live in the data file being replaced are read into memory first: after
    # the rename their old offsets would point into the new file
    for v in model.graph.initializers.values():
        t = v.const_value
        if isinstance(t, ir.ExternalTensor) and Path(t.path).resolve() == data.resolve():
            v.const_value = ir.tensor(t.numpy(), name=t.name)
        elif t is not None and is_mapped_inline(t):
            # written from the mapped array itself: onnx-ir would copy an external tensor
            # of another file into memory and close its map under the arrays that use it
            v.const_value = ir.Tensor(t.numpy(), dtype=t.dtype, name=t.name)
    with atomic_outputs(out, data) as (tmp, _tmp_data), initializers_as_inputs(model):
        ir.save(model, tmp, external_data=data.name,
                size_threshold_bytes=external_data_size_threshold)
    return [out, data] if data.exists() else [out]


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field(number: int, length: int) -> bytes:
    """The key and length of a length-delimited protobuf field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(length)


#: field numbers of onnx.proto used by :func:`write_self_contained` and
#: :func:`_read_weights_mapped`
_MODEL_GRAPH, _GRAPH_INITIALIZER, _TENSOR_RAW_DATA = 7, 5, 9
_TENSOR_NAME, _TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION = 8, 13, 14
#: the protobuf limit of one message (a larger model must be saved with external data)
_PROTO_LIMIT = 2**31 - 1


def write_self_contained(model: ir.Model, path: str | os.PathLike[str], *,
                         bare: tuple[onnx.ModelProto, Mapping[str, np.ndarray]] | None = None
                         ) -> None:
    """Write ``model`` as one self-contained ``.onnx`` file (what ``ir.save(model, path)``
    writes) without building it in memory: the graph is serialized with its large weights as
    placeholders (:func:`weights_apart`), and the file is streamed as the protobuf encoding of
    that model with every initializer appended to the graph field, each weight's bytes
    written straight from its array (memory-mapped ones included). Peak memory is the
    weightless graph, not two more copies of the weights (the ``ModelProto`` and its
    serialized bytes).

    ``bare``: the model's weightless proto and its weights, as :func:`infer_and_check`
    returned them (taken over: the proto is emptied), instead of serializing the graph again.

    Raises:
        OnnxInputError: the model is 2 GB or more (save it with external data).
    """
    with contextlib.ExitStack() as stack:
        if bare is None:
            arrays: Mapping[str, np.ndarray] = stack.enter_context(weights_apart(model))
            stack.enter_context(initializers_as_inputs(model))
            proto = ir.serde.serialize_model(model)
        else:
            proto, arrays = bare
        inits = list(proto.graph.initializer)
        del proto.graph.initializer[:]
        records: list[tuple[bytes, np.ndarray | None]] = []
        for t in inits:
            arr = arrays.get(t.name) if t.data_location == onnx.TensorProto.EXTERNAL else None
            if arr is None:
                records.append((t.SerializeToString(), None))
                continue
            del t.external_data[:]
            t.ClearField("data_location")
            if arr.dtype.byteorder == ">":
                arr = arr.astype(arr.dtype.newbyteorder("<"))
            records.append((t.SerializeToString() + _field(_TENSOR_RAW_DATA, arr.nbytes), arr))
        graph = proto.graph.SerializeToString()
        proto.ClearField("graph")
        head = proto.SerializeToString()
        del proto, inits
    sizes = [len(meta) + (arr.nbytes if arr is not None else 0) for meta, arr in records]
    graph_len = len(graph) + sum(len(_field(_GRAPH_INITIALIZER, n)) + n for n in sizes)
    if len(head) + graph_len + 16 > _PROTO_LIMIT:
        raise OnnxInputError(
            f"the model is {(len(head) + graph_len) / 2**30:.1f} GiB, over protobuf's 2 GiB limit "
            "for one file; save it with external data (save_external_data=True / "
            "--save-external-data)")
    with open(path, "wb") as f:
        f.write(head)
        f.write(_field(_MODEL_GRAPH, graph_len))
        f.write(graph)
        for (meta, arr), n in zip(records, sizes, strict=True):
            f.write(_field(_GRAPH_INITIALIZER, n))
            f.write(meta)
            if arr is not None:
                f.write(np.ascontiguousarray(arr).view(np.uint8).data)


def save_proto(proto: onnx.ModelProto, path: str | os.PathLike[str]) -> Path:
    """Write a self-contained ``proto`` (< 2 GB) to ``path`` atomically."""
    return write_bytes(path, proto.SerializeToString())


def to_proto(model: ir.Model) -> onnx.ModelProto:
    with initializers_as_inputs(model):
        return ir.serde.serialize_model(model)


#: the first IR version whose initializers need not be graph inputs
_IR_INITIALIZERS_FREE = 4


@contextlib.contextmanager
def initializers_as_inputs(model: ir.Model) -> Iterator[None]:
    """While serializing an IR < 4 model (opset <= 8 era), make every initializer of the main
    graph a graph input too, as that IR requires (new ones from an edit included). The working
    model keeps them apart -- :func:`load_model` takes them out of the inputs -- so edits can
    change and drop them. A no-op for IR >= 4."""
    if model.ir_version >= _IR_INITIALIZERS_FREE:
        yield
        return
    present = {v.name for v in model.graph.inputs}
    added = [v for name, v in model.graph.initializers.items() if name not in present]
    model.graph.inputs.extend(added)
    try:
        yield
    finally:
        for v in added:
            model.graph.inputs.remove(v)


_CONSTANT_ATTRS = ("value", "value_float", "value_floats", "value_int", "value_ints")


def constant_tensor(node: ir.Node) -> ir.TensorProtocol | None:
    """The tensor a ``Constant`` node produces (``value``, ``value_float(s)``,
    ``value_int(s)``; sparse values were made dense on load), or None for strings / other
    nodes."""
    if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
        return None
    for key in _CONSTANT_ATTRS:
        a = node.attributes.get(key)
        if a is None:
            continue
        if key == "value":
            return a.as_tensor()
        if key == "value_float":
            return ir.tensor(np.array(a.as_float(), dtype=np.float32))
        if key == "value_floats":
            return ir.tensor(np.array(list(a.as_floats()), dtype=np.float32))
        if key == "value_int":
            return ir.tensor(np.array(a.as_int(), dtype=np.int64))
        return ir.tensor(np.array(list(a.as_ints()), dtype=np.int64))
    return None


def lift_constants(model: ir.Model) -> int:
    """Turn every ``Constant`` node that holds a tensor (Paddle2ONNX / tf2onnx / older
    exporters keep weights this way) into an initializer of its graph, with the same value
    name: weights become visible to counting, the rank detector and the appliers, and are
    written back as initializers. Constants that are graph outputs, and every Constant of an
    IR < 4 model (whose initializers must be graph inputs), are left as they are. Returns the
    number lifted."""
    if model.ir_version < _IR_INITIALIZERS_FREE:
        return 0
    lifted = 0
    for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
        t = constant_tensor(node)
        graph = node.graph
        out = node.outputs[0] if node.outputs else None
        if t is None or graph is None or out is None or not out.name:
            continue
        if out.is_graph_output() or out.name in graph.initializers:
            continue
        name = out.name
        if t.name != name:
            t = ir.Tensor(t.numpy(), name=name) if not isinstance(t, ir.ExternalTensor) else t
        init = ir.Value(name=None, shape=ir.Shape(tuple(t.shape.numpy())), type=ir.TensorType(t.dtype),
                        const_value=t)
        out.replace_all_uses_with(init)
        graph.remove(node, safe=True)
        out.name = None
        init.name = name
        graph.register_initializer(init)
        lifted += 1
    return lifted


def parameter_count(model: ir.Model) -> int:
    """Elements of every floating-point initializer and Constant-node tensor, subgraphs
    included (shape constants and other integer tensors are not parameters)."""
    total = 0
    graphs = list(model.graphs())  # the main graph and every subgraph
    for g in graphs:
        for v in g.initializers.values():
            t = v.const_value
            if t is not None and t.dtype.is_floating_point():
                total += math.prod(t.shape.numpy())
    for g in graphs:
        for n in g:
            if n.op_type != "Constant":
                continue
            t = constant_tensor(n)
            if t is not None and t.dtype.is_floating_point():
                total += math.prod(t.shape.numpy())
    return total




# -- onnxruntime -----------------------------------------------------------------------------
def _ort_errors() -> tuple[type[BaseException], ...]:
    """The exception types onnxruntime raises for a model or a feed it cannot run."""
    from onnxruntime.capi import onnxruntime_pybind11_state as st

    names = ("Fail", "InvalidArgument", "RuntimeException", "InvalidGraph", "NotImplemented",
             "EngineError", "EPFail", "NoModel", "NotFound", "ModelLoadCanceled")
    return tuple(getattr(st, n) for n in names if isinstance(getattr(st, n, None), type))


class OrtSession:
    """An onnxruntime session whose ``run`` takes any feed mapping and turns onnxruntime's
    failures on the calibration data (a Reshape that fails at run time, an index out of
    range) into one-line :class:`OnnxInputError`. Other attributes are the session's."""

    def __init__(self, sess: Any, weights: Mapping[str, np.ndarray] | None = None) -> None:
        self._sess = sess
        self._errors = _ort_errors()
        self.runs = 0
        #: weights the session's graph takes as inputs, fed on every run (:func:`ort_session`)
        self.weights: Mapping[str, np.ndarray] = weights or {}

    def get_inputs(self) -> list[Any]:
        """The model's inputs (not the weights fed by :meth:`run`)."""
        return [i for i in self._sess.get_inputs() if i.name not in self.weights]

    def run(self, output_names: Any, feed: Mapping[str, Any], *args: Any) -> list[Any]:
        plain = feed if isinstance(feed, dict) else {k: feed[k] for k in feed}
        try:
            out = self._sess.run(output_names, {**plain, **self.weights}, *args)
        except self._errors as e:
            msg = " ".join(str(e).split())[:300]
            shapes = ", ".join(f"{k}{tuple(np.shape(v))}" for k, v in plain.items())
            raise OnnxInputError(
                f"onnxruntime failed on calibration batch {self.runs} ({shapes}): {msg}; "
                "check that the data is what the model takes") from None
        self.runs += 1
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sess, name)


#: initializers of at least this many bytes are handed to onnxruntime as buffers
#: (:func:`weights_apart`) instead of being serialized into the model it parses
BUFFER_MIN_BYTES = 1024
#: the external-data location of a weight handed over as a buffer (never a file)
IN_MEMORY = "graphsurg-in-memory"


@contextlib.contextmanager
def weights_apart(model: ir.Model, min_bytes: int = BUFFER_MIN_BYTES
                  ) -> Iterator[dict[str, np.ndarray]]:
    """While the block runs, the main graph's initializers of at least ``min_bytes`` (of the
    element types of :data:`_BUFFER_DTYPES`), and every external-data tensor, are
    external-data placeholders (name, type and
    shape, no data, location :data:`IN_MEMORY`), so serializing ``model`` copies no weight;
    yields their arrays by name (numpy arrays, memory-mapped for external data: no copy;
    an external tensor of another type is read into the model while the block runs).
    The tensors are put back afterwards."""
    swapped: list[tuple[ir.Value, ir.TensorProtocol]] = []
    arrays: dict[str, np.ndarray] = {}
    try:
        for name, v in model.graph.initializers.items():
            t = v.const_value
            external = isinstance(t, ir.ExternalTensor)
            if t is None or (t.dtype not in _BUFFER_DTYPES or t.nbytes < min_bytes) \
                    and not external:
                continue
            if t.dtype not in _BUFFER_DTYPES:  # external, of a type numpy cannot hand over
                v.const_value = ir.Tensor(t.numpy(), dtype=t.dtype, name=name)
                swapped.append((v, t))
                continue
            arrays[name] = np.ascontiguousarray(t.numpy())
            v.const_value = ir.ExternalTensor(IN_MEMORY, 0, t.nbytes, t.dtype,
                                              shape=ir.Shape(tuple(t.shape.numpy())), name=name)
            swapped.append((v, t))
        yield arrays
    finally:
        for v, t in swapped:
            v.const_value = t


def ort_session(model: ir.Model, *, threads: int | None = None) -> OrtSession:
    """An onnxruntime CPU session on ``model`` (basic graph optimisations only, so observed
    intermediate values keep their names), wrapped in :class:`OrtSession`.

    The weights are not serialized, and not copied: the large ones (:func:`weights_apart`)
    are inputs of the graph onnxruntime parses, and :meth:`OrtSession.run` feeds the model's
    own arrays (memory-mapped where the model was read so) on every run. onnxruntime copies
    every initializer it is handed (``add_external_initializers``: +430 MiB on BERT-base, a
    second copy of the weights); an input it only reads. The price: no constant folding or
    prepacking of those weights (runs ~7% slower on BERT-base)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.log_severity_level = 3
    if threads is not None:
        so.intra_op_num_threads = threads
    try:
        with weights_apart(model) as arrays, initializers_as_inputs(model):
            proto = ir.serde.serialize_model(model)
        if arrays:
            g = proto.graph
            declared = {i.name for i in g.input}
            fed = [t for t in g.initializer if t.name in arrays]
            kept = [t for t in g.initializer if t.name not in arrays]
            del g.initializer[:]
            g.initializer.extend(kept)
            g.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                           for t in fed if t.name not in declared)
        data = proto.SerializeToString()
        del proto
        sess = OrtSession(ort.InferenceSession(data, so, providers=["CPUExecutionProvider"]),
                          weights=arrays)
        return sess
    except Exception as e:
        msg = " ".join(str(e).split())[:300]
        custom = sorted(
            {f"{n.domain}::{n.op_type}" for n in model.graph.all_nodes() if n.domain not in KNOWN_DOMAINS}
        )
        hint = f" (custom-domain ops {', '.join(custom)} are not runnable)" if custom else ""
        raise OnnxInputError(f"onnxruntime cannot run the model{hint}: {msg}") from None


# -- calibration data ------------------------------------------------------------------------
def load_batches(
    data: str | os.PathLike[str] | Mapping[str, Any] | Iterable[Mapping[str, Any]],
    *,
    batch_size: int = 64,
) -> list[Feed]:
    """Calibration data as a list of plain feed dicts, without a model: an ``.npz`` (every
    array split along dimension 0 into batches of ``batch_size``), one feed dict or an
    iterable of them. With a model, use :func:`graphsurg.passes.onnx.inputs.load_feeds`
    (every format, batch axes read from the model, lazy reading)."""
    from .inputs import check_batch_options

    check_batch_options(batch_size)
    if isinstance(data, str | os.PathLike):
        from .inputs import NpzArrays

        p = Path(data)
        if not p.is_file():
            raise OnnxInputError(f"calibration data '{p}' does not exist; pass an .npz file")
        z = NpzArrays(p)
        arrays = {k: z.read(k) for k in z.members}
        n = {a.shape[0] if a.ndim else 0 for a in arrays.values()}
        if len(n) != 1 or 0 in n:
            raise OnnxInputError(
                f"calibration data '{p}': arrays differ in (or lack) a leading batch dimension: "
                + ", ".join(f"{k}{tuple(a.shape)}" for k, a in arrays.items()))
        total = n.pop()
        return [{k: a[i : i + batch_size] for k, a in arrays.items()}
                for i in range(0, total, batch_size)]
    if isinstance(data, Mapping):
        return [{str(k): np.asarray(_to_numpy(v)) for k, v in data.items()}]
    try:
        batches = [{str(k): np.asarray(_to_numpy(v)) for k, v in b.items()} for b in data]
    except (TypeError, AttributeError):
        raise OnnxInputError(
            f"calibration data must be an .npz path, a feed dict or an iterable of feed dicts, "
            f"got {type(data).__name__}"
        ) from None
    if not batches:
        raise OnnxInputError("calibration data is empty; pass at least one batch")
    return batches


def _to_numpy(v: Any) -> Any:
    if hasattr(v, "detach") and hasattr(v, "cpu"):
        return v.detach().cpu().numpy()
    return v


def validate_batches(model: ir.Model, batches: Iterable[Mapping[str, Any]]) -> list[Feed]:
    """Check names, ranks, fixed dimensions and dtypes of every batch against the model's
    inputs (-1, 0, symbolic and missing dimensions take any size); cast dtypes where numpy
    can within their kind. Returns the (possibly cast) batches."""
    from .inputs import check_feed, input_specs

    specs = input_specs(model)
    return [check_feed(specs, b, f"calibration batch {i}") for i, b in enumerate(batches)]


def iter_nodes(model: ir.Model) -> Iterator[ir.Node]:
    return iter(model.graph)
