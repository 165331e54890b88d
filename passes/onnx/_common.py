"""Shared plumbing of the ONNX adapter: the error type, safe loading and atomic saving,
calibration data, and onnxruntime sessions.

Everything that reads user input validates it here, so bad input fails early with one line
naming the problem and the fix (:class:`OnnxInputError`).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
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
        end = int(info.get("offset", 0) or 0) + int(info.get("length", 0) or 0)
        if end > target.stat().st_size:
            raise OnnxInputError(
                f"{where}: external data file {loc!r} is shorter than initializer '{t.name}' "
                f"needs ({target.stat().st_size} < {end} bytes); the data file is truncated"
            )


def _check_proto(proto: onnx.ModelProto, where: str, path: Path | None = None) -> None:
    if proto.ir_version <= 0 or not proto.opset_import or not proto.HasField("graph"):
        raise OnnxInputError(
            f"{where} is not an ONNX model (no ir_version, opset or graph); pass a .onnx file"
        )
    try:
        # with a path the checker resolves external data next to the model
        onnx.checker.check_model(str(path) if path is not None else proto, full_check=False)
    except (onnx.checker.ValidationError, Exception) as e:  # the checker raises several types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OnnxInputError(f"{where} is not a valid ONNX model: {first}") from None


def load_model(model: ModelLike) -> tuple[ir.Model, str]:
    """Load ``model`` into a fresh ``ir.Model`` (never the caller's object) and return it with
    the kind it came as (``"path"``, ``"proto"`` or ``"ir"``).

    Files are read with onnx-ir: external data is memory-mapped (no 2 GB protobuf limit) after
    its paths were checked to stay inside the model's folder.

    Raises:
        OnnxInputError: the file is missing, not ONNX, truncated, or its external data is
            missing or outside the model's folder.
    """
    if isinstance(model, ir.Model):
        return model.clone(), "ir"
    if isinstance(model, onnx.ModelProto):
        _check_proto(model, "the ModelProto")
        return ir.serde.deserialize_model(model), "proto"
    if not isinstance(model, str | os.PathLike):
        raise OnnxInputError(
            f"expected a path, onnx.ModelProto or onnx_ir.Model, got {type(model).__name__}"
        )
    path = Path(model)
    where = f"'{path}'"
    if not path.is_file():
        raise OnnxInputError(f"{where} does not exist or is not a file; pass a .onnx model file")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf DecodeError and friends
        raise OnnxInputError(
            f"{where} is not an ONNX model or is truncated ({type(e).__name__}); "
            "re-export or re-download it"
        ) from None
    _check_external_data(proto, path.parent, where)
    _check_proto(proto, where, path)
    loaded = ir.serde.deserialize_model(proto)
    ir.external_data.set_base_dir(loaded.graph, path.parent)
    return loaded, "path"


def has_external_tensors(model: ir.Model) -> bool:
    return any(
        isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values()
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
) -> list[Path]:
    """Write ``model`` to ``path`` atomically with :func:`graphsurg._files.atomic_outputs`:
    ``path`` (and its data file) hold the old content or the new, never half of it.

    With ``save_external_data`` (or when the model already holds external tensors), tensors
    larger than ``external_data_size_threshold`` bytes go to ``<name>.data`` next to it; the
    model and its data file are written together. Returns every file written.
    """
    out = Path(path)
    external = save_external_data or has_external_tensors(model)
    if not external:
        with atomic_outputs(out) as (tmp,):
            ir.save(model, tmp)
        return [out]
    data = out.with_name(out.name + ".data")
    # tensors that live in the data file being replaced are read into memory first: after
    # the rename their old offsets would point into the new file
    for v in model.graph.initializers.values():
        t = v.const_value
        if isinstance(t, ir.ExternalTensor) and Path(t.path).resolve() == data.resolve():
            v.const_value = ir.tensor(t.numpy(), name=t.name)
    with atomic_outputs(out, data) as (tmp, _tmp_data):
        ir.save(model, tmp, external_data=data.name,
                size_threshold_bytes=external_data_size_threshold)
    return [out, data] if data.exists() else [out]


def save_proto(proto: onnx.ModelProto, path: str | os.PathLike[str]) -> Path:
    """Write a self-contained ``proto`` (< 2 GB) to ``path`` atomically."""
    return write_bytes(path, proto.SerializeToString())


def to_proto(model: ir.Model) -> onnx.ModelProto:
    return ir.serde.serialize_model(model)


# -- onnxruntime -----------------------------------------------------------------------------
def ort_session(model: ir.Model, *, threads: int | None = None) -> Any:
    """An onnxruntime CPU session on ``model`` (basic graph optimisations only, so observed
    intermediate values keep their names)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.log_severity_level = 3
    if threads is not None:
        so.intra_op_num_threads = threads
    try:
        if has_external_tensors(model):
            with tempfile.TemporaryDirectory() as d:
                p = Path(d) / "model.onnx"
                ir.save(model, p, external_data="model.onnx.data")
                return ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])
        data = to_proto(model).SerializeToString()
        return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
    except Exception as e:
        msg = " ".join(str(e).split())[:300]
        custom = sorted(
            {f"{n.domain}::{n.op_type}" for n in model.graph.all_nodes() if n.domain not in KNOWN_DOMAINS}
        )
        hint = f" (custom-domain ops {', '.join(custom)} are not runnable)" if custom else ""
        raise OnnxInputError(f"onnxruntime cannot run the model{hint}: {msg}") from None


# -- calibration data ------------------------------------------------------------------------
_NP_OF_ONNX = {
    ir.DataType.FLOAT: np.float32,
    ir.DataType.DOUBLE: np.float64,
    ir.DataType.FLOAT16: np.float16,
    ir.DataType.INT64: np.int64,
    ir.DataType.INT32: np.int32,
    ir.DataType.INT8: np.int8,
    ir.DataType.UINT8: np.uint8,
    ir.DataType.BOOL: np.bool_,
}


def load_batches(
    data: str | os.PathLike[str] | Mapping[str, Any] | Iterable[Mapping[str, Any]],
    *,
    batch_size: int = 64,
) -> list[Feed]:
    """Calibration data as a list of feed dicts.

    ``data`` is an ``.npz`` file (one array per model input; split along dimension 0 into
    batches of ``batch_size``), one feed dict, or an iterable of feed dicts.
    """
    if isinstance(data, str | os.PathLike):
        p = Path(data)
        if not p.is_file():
            raise OnnxInputError(f"calibration data '{p}' does not exist; pass an .npz file")
        try:
            with np.load(p, allow_pickle=False) as z:
                arrays = {k: np.asarray(z[k]) for k in z.files}
        except Exception as e:
            raise OnnxInputError(
                f"calibration data '{p}' is not a readable .npz file ({type(e).__name__}); "
                "write it with numpy.savez(path, input_name=array, ...)"
            ) from None
        if not arrays:
            raise OnnxInputError(f"calibration data '{p}' holds no arrays")
        n = {a.shape[0] if a.ndim else 1 for a in arrays.values()}
        if len(n) != 1 or 0 in n:
            raise OnnxInputError(
                f"calibration data '{p}': arrays differ in (or lack) a leading batch dimension: "
                + ", ".join(f"{k}{tuple(a.shape)}" for k, a in arrays.items())
            )
        total = n.pop()
        step = max(1, int(batch_size))
        return [{k: a[i : i + step] for k, a in arrays.items()} for i in range(0, total, step)]
    if isinstance(data, Mapping):
        return [{str(k): np.asarray(v) for k, v in data.items()}]
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


def validate_batches(model: ir.Model, batches: list[Feed]) -> list[Feed]:
    """Check names, ranks, fixed dimensions and dtypes of every batch against the model's
    inputs; cast dtypes where numpy can do so safely. Returns the (possibly cast) batches."""
    inits = set(model.graph.initializers)
    inputs = [v for v in model.graph.inputs if v.name not in inits]
    names = [v.name or "" for v in inputs]
    out: list[Feed] = []
    for i, b in enumerate(batches):
        if set(b) != set(names):
            missing = sorted(set(names) - set(b))
            extra = sorted(set(b) - set(names))
            raise OnnxInputError(
                f"calibration batch {i} does not match the model's inputs {names}: "
                f"missing {missing}, unexpected {extra}"
            )
        fixed: Feed = {}
        for v in inputs:
            assert v.name is not None
            a = b[v.name]
            if v.shape is not None:
                if a.ndim != len(v.shape):
                    raise OnnxInputError(
                        f"calibration input '{v.name}' has shape {tuple(a.shape)} but the model "
                        f"expects rank {len(v.shape)} ({_shape_str(v.shape)})"
                    )
                for d, (got, want) in enumerate(zip(a.shape, v.shape, strict=True)):
                    if isinstance(want, int) and got != want:
                        raise OnnxInputError(
                            f"calibration input '{v.name}' has shape {tuple(a.shape)} but the "
                            f"model expects {_shape_str(v.shape)} (dimension {d})"
                        )
            want_dt = _NP_OF_ONNX.get(v.dtype) if v.dtype is not None else None
            if want_dt is not None and a.dtype != want_dt:
                if not np.can_cast(a.dtype, want_dt, casting="same_kind"):
                    raise OnnxInputError(
                        f"calibration input '{v.name}' has dtype {a.dtype} but the model "
                        f"expects {np.dtype(want_dt)}"
                    )
                a = a.astype(want_dt)
            fixed[v.name] = a
        out.append(fixed)
    return out


def _shape_str(shape: ir.Shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def iter_nodes(model: ir.Model) -> Iterator[ir.Node]:
    return iter(model.graph)
