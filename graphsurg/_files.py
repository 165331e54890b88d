"""The one atomic writer, and the check that no output is an input.

Every file graphsurg writes goes through :func:`atomic_outputs`: the files are written under
their final names into a temporary folder beside the destination, then renamed into place
one by one (a reader sees the old file or the new one, never half of one; a failure leaves
no partial output). Files get the permissions a plain ``open(..., "w")`` would give them
(``0o666`` less the umask), not ``mkstemp``'s ``0o600``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from ._errors import BadInputError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_outputs(*paths: str | os.PathLike[str]) -> Iterator[list[Path]]:
    """Yield temporary paths (same folder as each destination, same file names) to write;
    on a clean exit each is renamed onto its destination, on an exception none is.

    Example::

        with atomic_outputs("model.onnx", "model.onnx.data") as (tmp_model, tmp_data):
            ir.save(model, tmp_model, external_data="model.onnx.data")
    """
    outs = [Path(p) for p in paths]
    tmpdirs: dict[Path, Path] = {}
    try:
        tmps: list[Path] = []
        for out in outs:
            parent = out.parent if str(out.parent) else Path(".")
            parent.mkdir(parents=True, exist_ok=True)
            if parent.resolve() not in tmpdirs:
                tmpdirs[parent.resolve()] = Path(
                    tempfile.mkdtemp(prefix=".graphsurg-", dir=parent))
            tmps.append(tmpdirs[parent.resolve()] / out.name)
        yield tmps
        mode = 0o666 & ~_umask()
        for tmp in tmps:
            if tmp.exists():
                os.chmod(tmp, mode)
        for tmp, out in zip(tmps, outs, strict=True):
            if tmp.exists():
                os.replace(tmp, out)
    finally:
        for d in tmpdirs.values():
            shutil.rmtree(d, ignore_errors=True)


def write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_outputs(path) as (tmp,):
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_bytes(path, text.encode("utf-8"))


def check_no_collision(inputs: Iterable[str | os.PathLike[str] | None],
                       outputs: Iterable[tuple[str, str | os.PathLike[str] | None]]) -> None:
    """Refuse (one line, :class:`BadInputError`) any output that is an input or another output.

    ``outputs`` are ``(what, path)`` pairs, e.g. ``("--report", "r.html")``; None is skipped.
    Paths are compared after resolving links, so ``./m.onnx`` and ``m.onnx`` collide.
    """
    seen: dict[Path, str] = {}
    for p in inputs:
        if p is not None:
            seen.setdefault(Path(p).resolve(), f"the input {p}")
    for what, p in outputs:
        if p is None:
            continue
        r = Path(p).resolve()
        if r in seen:
            raise BadInputError(
                f"{what} {p} is {seen[r]}: graphsurg never overwrites its inputs or writes two "
                "outputs to one file; choose another path")
        seen[r] = f"the {what} output"


__all__ = ["atomic_outputs", "check_no_collision", "write_bytes", "write_text"]
