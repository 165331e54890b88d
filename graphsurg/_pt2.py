"""Reading a ``torch.export`` archive (``.pt2``) without running anything from it.

``torch.export.load`` (torch 2.13) is not safe on an untrusted file: it unpickles
(``torch.load(weights_only=False)``) the sample inputs when the restricted loader refuses
them, every weight or constant whose config says ``use_pickle``, legacy ``.pt`` weight
files and "opaque" constants (``pickle.loads``); it loads AOTInductor shared libraries
(``data/aotinductor/``); and the graph's ``call_function`` targets are resolved by name from
the ``torch``, ``math`` and ``operator`` modules, so a node can name any function reachable
there (``torch.os.system``), called when the model runs.

:func:`load_exported` reads the same parts itself: tensors from their raw records (no
pickle), anything pickled only through ``torch.load(weights_only=True)`` (the restricted
unpickler: tensors and plain containers) and refused otherwise, naming the entry; archives
with AOTInductor, TorchBind or opaque objects are refused; and after deserialising, every
``call_function`` target must be a torch operator (``torch.ops``), a higher-order operator or
one of the symbolic-shape helpers ``torch.export`` itself writes. Nothing in the archive is
executed.
"""

from __future__ import annotations

import io
import math
import operator
import os
import zipfile
from pathlib import Path
from typing import Any

import torch

from ._errors import BadInputError, first_line

# the functions (besides torch.ops operators) an exported graph may call: what torch.export
# writes for symbolic shapes and getitem
_PLAIN_TARGETS: frozenset[Any] = frozenset({
    operator.getitem, operator.add, operator.sub, operator.mul, operator.floordiv,
    operator.truediv, operator.mod, operator.pow, operator.neg, operator.pos, operator.eq,
    operator.ne, operator.lt, operator.le, operator.gt, operator.ge, operator.and_,
    operator.or_, operator.not_, math.trunc, math.ceil, math.floor, math.sqrt,
    torch.sym_not, torch.sym_float, torch.sym_int, torch.sym_max, torch.sym_min,
    torch.sym_sqrt, torch.sym_ite, getattr(torch, "_sym_sqrt", torch.sym_sqrt),
})


def _refuse(spec: str, why: str) -> BadInputError:
    return BadInputError(f"model {spec!r}: {why}; graphsurg never runs code from a file -- "
                         "re-export it with torch.export.save from plain tensors")


def _safe_torch_load(data: bytes, spec: str, entry: str) -> Any:
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise _refuse(spec, f"archive entry {entry!r} is a pickle that torch.load(weights_only="
                            f"True) refuses ({type(e).__name__})") from e


def _tensors(reader: Any, spec: str, config_file: str, folder: str,
             kind: str) -> dict[str, Any]:
    """Weights or constants: raw records through torch's own reader, pickles restricted."""
    from torch._export.serde.serialize import (
        deserialize_size,
        deserialize_storage_offset,
        deserialize_stride,
    )
    from torch.export.pt2_archive import _package as pkg

    if config_file not in reader.get_file_names():
        raise _refuse(spec, f"the archive has no {config_file!r}")
    config = pkg._load_payload_config(reader, config_file)
    for fqn, meta in config.config.items():
        name = meta.path_name
        if kind == "constant" and not name.startswith(pkg.TENSOR_CONSTANT_FILENAME_PREFIX):
            raise _refuse(spec, f"constant {fqn!r} (archive entry {folder}{name!r}) is a "
                                "TorchBind or opaque Python object, which loads by unpickling")
    file_map = pkg._build_file_map(reader, config, folder)  # raw bytes, skips pickled entries
    out: dict[str, Any] = {}
    for fqn, meta in config.config.items():
        entry = os.path.join(folder, meta.path_name)
        if meta.use_pickle:
            obj = _safe_torch_load(reader.read_bytes(entry), spec, entry)
            if not isinstance(obj, torch.Tensor):
                raise _refuse(spec, f"archive entry {entry!r} holds a {type(obj).__name__}, "
                                    "not a tensor")
            out[fqn] = obj
            continue
        tm = meta.tensor_meta
        if tm is None:
            raise _refuse(spec, f"{kind} {fqn!r} has no tensor metadata")
        t = torch.as_strided(file_map[meta.path_name], size=deserialize_size(tm.sizes),
                             stride=deserialize_stride(tm.strides),
                             storage_offset=deserialize_storage_offset(tm.storage_offset))
        out[fqn] = (torch.nn.Parameter(t, requires_grad=tm.requires_grad)
                    if getattr(meta, "is_param", False) else t)
    return out


def check_graph_targets(ep: torch.export.ExportedProgram, spec: str) -> None:
    """Refuse a graph whose ``call_function`` nodes call anything but torch operators."""
    for gm in ep.graph_module.modules():
        if not isinstance(gm, torch.fx.GraphModule):
            continue
        for node in gm.graph.nodes:
            if node.op != "call_function":
                continue
            t = node.target
            if isinstance(t, torch._ops.OpOverload | torch._ops.OpOverloadPacket |
                          torch._ops.HigherOrderOperator):
                continue
            if t in _PLAIN_TARGETS:
                continue
            name = t if isinstance(t, str) else getattr(t, "__qualname__", repr(t))
            raise _refuse(spec, f"node {node.name!r} calls {name!r}, which is not a torch "
                                "operator")


def load_exported(path: str | os.PathLike[str], spec: str | None = None) -> Any:
    """The ``ExportedProgram`` in the ``.pt2`` archive at ``path``, read without unpickling
    anything but plain tensors (see the module docstring). Raises :class:`BadInputError`
    (one line, naming the entry) for an archive that is unreadable or asks to run code."""
    from torch._export.serde import schema
    from torch._export.serde.serialize import ExportedProgramDeserializer, _bytes_to_dataclass
    from torch.export.pt2_archive import _package as pkg

    spec = spec or str(path)
    if not zipfile.is_zipfile(path):
        raise BadInputError(f"model {spec!r} is not a readable torch.export archive (not a zip file); "
                            "save it with torch.export.save")
    try:
        reader_cm = pkg.PT2ArchiveReader(str(Path(path)))
    except Exception as e:
        raise BadInputError(f"model {spec!r} is not a readable torch.export archive "
                            f"({type(e).__name__}: {first_line(e, 120)})") from e
    with reader_cm as reader:
        names = set(reader.get_file_names())
        for n in sorted(names):
            if n.startswith(pkg.AOTINDUCTOR_DIR) or n.startswith(pkg.EXECUTORCH_DIR):
                raise _refuse(spec, f"archive entry {n!r} is compiled code (AOTInductor / "
                                    "ExecuTorch), which graphsurg does not load")
        version_path = pkg.ARCHIVE_VERSION_PATH
        if version_path not in names:
            raise BadInputError(f"model {spec!r} is not a readable torch.export archive ({version_path!r}"
                                " missing); save it with torch.export.save")
        version = reader.read_string(version_path)
        if version != pkg.ARCHIVE_VERSION_VALUE:
            raise BadInputError(f"model {spec!r}: archive version {version!r} is not "
                                f"{pkg.ARCHIVE_VERSION_VALUE!r}; re-export it with this torch")
        model_file = pkg.MODELS_FILENAME_FORMAT.format("model")
        if model_file not in names:
            raise BadInputError(f"model {spec!r}: the archive has no {model_file!r}; save it "
                                "with torch.export.save")
        for legacy in (f"{pkg.WEIGHTS_DIR}model.pt", f"{pkg.CONSTANTS_DIR}model.pt"):
            if legacy in names:
                raise _refuse(spec, f"archive entry {legacy!r} is a legacy pickled file")
        try:
            serialized = _bytes_to_dataclass(schema.ExportedProgram, reader.read_bytes(model_file))
            state_dict = _tensors(reader, spec, pkg.WEIGHTS_CONFIG_FILENAME_FORMAT.format("model"),
                                  pkg.WEIGHTS_DIR, "weight")
            constants = _tensors(reader, spec,
                                 pkg.CONSTANTS_CONFIG_FILENAME_FORMAT.format("model"),
                                 pkg.CONSTANTS_DIR, "constant")
            samples_file = pkg.SAMPLE_INPUTS_FILENAME_FORMAT.format("model")
            samples: Any = b""
            if samples_file in names and reader.read_bytes(samples_file):
                samples = _safe_torch_load(reader.read_bytes(samples_file), spec, samples_file)
                if not isinstance(samples, tuple):
                    raise _refuse(spec, f"archive entry {samples_file!r} holds a "
                                        f"{type(samples).__name__}, not a tuple of inputs")
            ep = ExportedProgramDeserializer(None).deserialize(serialized, state_dict,
                                                               constants, samples)
        except BadInputError:
            raise
        except Exception as e:
            raise BadInputError(f"model {spec!r} is not a readable torch.export archive "
                                f"({type(e).__name__}: {first_line(e, 160)})") from e
    check_graph_targets(ep, spec)
    return ep


__all__ = ["check_graph_targets", "load_exported"]
