"""graphsurg.onnx -- graphsurg as an ONNX optimizer pass.

``analyze`` diagnoses a model with onnxruntime (``gs.diagnose``'s rules over the ONNX
adapter); ``apply`` is ``operate`` over the ONNX adapter (:func:`graphsurg._operate.
operate_adapter`) without healing, plus a cleanup and save: the library's replacements with
an ONNX applier treat the diagnosed problems site by site, the result is verified on held-out
batches with onnxruntime, and a site that breaks a certificate is rolled back alone
(bisection). Deployment defaults are exact: without ``allow_inexact=True`` (or
``max_output_change=`` with an explicit pass list) only function-preserving replacements run.
``rules`` gives the local rewrites as an onnxscript ``RewriteRuleSet``. Olive surgeons live
in :mod:`graphsurg.olive`.

Example:
    >>> from graphsurg import onnx as gso
    >>> diagnosis = gso.analyze("model.onnx", "calib.npz")
    >>> path, result = gso.apply("model.onnx", "calib.npz", output="model.small.onnx")
    >>> print(result.summary())
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import onnx
import onnx_ir as ir
from onnxscript.rewriter import RewriteRuleSet

from graphsurg._certificates import Certificates
from graphsurg._compare import output_change
from graphsurg._config import DiagnoseConfig
from graphsurg._errors import BadInputError
from graphsurg._operate import SurgeryResult, operate_adapter
from graphsurg._plan import SurgeryFailed, SurgeryPlan
from graphsurg._problems import Diagnosis
from graphsurg.library import Library
from graphsurg.passes.onnx._common import (
    KNOWN_DOMAINS,
    Feed,
    ModelLike,
    parameter_count,
    to_proto,
)
from graphsurg.passes.onnx._common import OnnxInputError as OnnxInputError
from graphsurg.passes.onnx._common import load_model as load_model
from graphsurg.passes.onnx._common import save_model as save_model
from graphsurg.passes.onnx.adapter import DataLike, OnnxAdapter
from graphsurg.passes.onnx.cleanup import Cleanup
from graphsurg.passes.onnx.inputs import BatchAxes, check_batch_options

M = TypeVar("M", str, os.PathLike, onnx.ModelProto, ir.Model)

#: the graph-level tidy-up that runs last (not a replacement: it treats no problem)
CLEANUP = "cleanup"
#: pass names of graphsurg < 0.3, still accepted by ``passes=`` / ``-p``
LEGACY_PASS_NAMES = {"excise_dead_units": "excise_dead", "relu_to_leaky_relu": "activation_swap"}


def _library(library: Library | None) -> Library:
    if library is not None:
        return library
    from graphsurg.library import default_library

    return default_library()


_P = ParamSpec("_P")
_R = TypeVar("_R")


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off while a whole-graph pass runs. onnx-ir builds
    and drops many small objects with reference cycles (nodes and their values), and every
    generation-0 collection in a 10k-node model walks them again: 28% of ``apply`` on the
    chain benchmark, growing faster than the graph (bench_onnx). Arrays are freed by
    reference counting as before; the collector resumes (if it was on) when the pass ends."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _without_gc(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with _gc_paused():
            return fn(*args, **kwargs)
    return wrapper


def diagnose_onnx(adapter: OnnxAdapter, batches: Sequence[Feed], *,
                  config: DiagnoseConfig | None = None) -> Diagnosis:
    """The one diagnosis (``graphsurg._diagnose.diagnose_adapter``) over the ONNX adapter,
    its sites marked ``ir="onnx"``."""
    from graphsurg._diagnose import diagnose_adapter

    d = diagnose_adapter(adapter, batches, config=config)
    # graphsurg.detect builds sites without an IR: mark them (a no-op once it does)
    d.problems = [p if p.site.ir == adapter.ir else replace(p, site=replace(p.site, ir=adapter.ir))
                  for p in d.problems]
    return d


@_without_gc
def analyze(model: ModelLike, data: DataLike | None = None, *,
            config: DiagnoseConfig | None = None, batch_size: int = 64,
            batch_axes: BatchAxes | None = None, data_loader_script: str | None = None
            ) -> Diagnosis:
    """Diagnose an ONNX model on calibration data with onnxruntime: ``gs.diagnose``'s rules
    and thresholds over :class:`OnnxAdapter` (no gradient checks: ONNX has no gradients).

    Args:
        model: a path (external data is memory-mapped), an ``onnx.ModelProto`` or an
            ``onnx_ir.Model``. It is not modified.
        data: calibration data: an ``.npz`` (batched inputs split along their batch axis
            into batches of ``batch_size``, read lazily), a folder of ``.npz`` files (one feed
            dict each), a Polygraphy ``--save-inputs`` ``.json``, a feed dict, an iterable of
            feed dicts, or a callable returning them (see :mod:`graphsurg.passes.onnx.inputs`).
        config: thresholds (:class:`graphsurg.DiagnoseConfig`); ``max_batches`` caps the
            batches measured.
        batch_axes: ``{input name: axis or None}`` overriding the batch axes read from the
            model (None: fed whole to every batch).
        data_loader_script: ``"file.py:load_data"`` -- runs that script's function for the
            feed dicts (this executes the user's code; ``data`` is then not needed).

    Returns:
        A :class:`graphsurg.Diagnosis` with ``capture="onnxruntime"``; sites carry
        ``ir="onnx"``, canonical activation names (``"relu"``...) and the producer layer's
        node name as ``module``.

    Raises:
        OnnxInputError: the model, the data or an option is bad (one-line message).

    Example:
        >>> d = gso.analyze("model.onnx", "calib.npz", batch_axes={"state": 1})
        >>> print(d.summary())
    """
    cfg = config or DiagnoseConfig()
    check_batch_options(batch_size, cfg.max_batches)
    if data is None and data_loader_script is None:
        raise OnnxInputError("no calibration data: pass data= (or --data / --load-inputs) or "
                             "data_loader_script= (--data-loader-script)")
    adapter, _ = OnnxAdapter.open(model)
    batches = adapter.batches(data if data is not None else [], batch_size=batch_size,
                              batch_axes=batch_axes, max_batches=cfg.max_batches,
                              loader=data_loader_script)
    return diagnose_onnx(adapter, batches, config=cfg)


def get_available_passes(library: Library | None = None) -> list[str]:
    """The names ``apply(passes=...)`` / ``-p`` accept: the library's replacements with an
    ONNX applier (in the library's order), then ``cleanup``.

    Example:
        >>> get_available_passes()
        ['activation_swap', 'excise_dead', 'factor_low_rank', 'cleanup']
    """
    return [r.name for r in _library(library) if r.supports("onnx")] + [CLEANUP]


def describe_passes(library: Library | None = None) -> dict[str, str]:
    """Each pass name with what it does and whether it is exact."""
    out = {r.name: f"{r.describe()} ({r.guarantee})" for r in _library(library)
           if r.supports("onnx")}
    out[CLEANUP] = "remove unused nodes and initializers, sort, infer shapes (exact)"
    return out


def rules(diagnosis: Diagnosis, *, alpha: float | None = None) -> RewriteRuleSet:
    """The local rewrites for ``diagnosis`` as an onnxscript ``RewriteRuleSet``: the
    ReLU -> LeakyReLU rule restricted to the Relus diagnosed as dying (it matches nothing on a
    healthy model; it changes the function). Use it in your own pipeline::

        onnxscript.rewriter.rewrite(model, pattern_rewrite_rules=gso.rules(diagnosis))
    """
    from graphsurg.passes.onnx.relu_to_leaky_relu import rules as relu_rules

    return RewriteRuleSet(relu_rules(diagnosis) if alpha is None
                          else relu_rules(diagnosis, alpha=alpha))


def selection(passes: Sequence[str] | None, *, inexact: bool,
              library: Library | None = None) -> tuple[list[str], bool]:
    """``(replacement names, run cleanup)`` for ``passes``. Without ``inexact`` only exact
    replacements are selected by default, and naming an inexact one is an error."""
    lib = _library(library)
    available = get_available_passes(lib)
    if passes is None:
        names = [n for n in available[:-1] if inexact or lib.get(n).guarantee == "exact"]
        return names, True
    wanted = [LEGACY_PASS_NAMES.get(n, n) for n in passes]
    unknown = [n for n, w in zip(passes, wanted, strict=True) if w not in available]
    if unknown:
        raise OnnxInputError(f"unknown pass(es) {unknown}; available: {', '.join(available)}")
    lossy = [n for n in wanted if n != CLEANUP and lib.get(n).guarantee != "exact"]
    if lossy and not inexact:
        raise OnnxInputError(
            f"pass(es) {lossy} change the model's function; deployment runs are exact by "
            "default: opt in with allow_inexact=True / --allow-inexact (or max_output_change= "
            "/ --max-output-change with the pass list)")
    return [n for n in dict.fromkeys(wanted) if n != CLEANUP], True


def _size(model: ir.Model) -> tuple[int, int]:
    """Nodes of the main graph and floating-point parameters (initializers and Constant
    tensors, subgraphs included)."""
    return model.graph.num_nodes(), parameter_count(model)


def _out_path(model: Any, kind: str, output: str | os.PathLike[str] | None) -> Path | None:
    if kind != "path":
        return None
    src = Path(model)
    out = Path(output) if output is not None else src.with_name(src.stem + ".graphsurg.onnx")
    if out.resolve() == src.resolve():
        raise OnnxInputError(f"output '{out}' is the input file; graphsurg never modifies its "
                             "input — pass another -o/output path")
    return out


@_without_gc
def apply(
    model: M,
    diagnosis_or_data: Diagnosis | DataLike,
    passes: Sequence[str] | None = None,
    *,
    certificates: Certificates | None = None,
    data: DataLike | None = None,
    config: DiagnoseConfig | None = None,
    output: str | os.PathLike[str] | None = None,
    save_external_data: bool = False,
    external_data_size_threshold: int = 1024,
    batch_size: int = 64,
    batch_axes: Mapping[str, int | None] | None = None,
    data_loader_script: str | None = None,
    full_check: bool = True,
    allow_inexact: bool = False,
    max_output_change: float | None = None,
    library: Library | None = None,
    seed: int = 0,
) -> tuple[M, SurgeryResult]:
    """Treat the diagnosed problems of an ONNX model with the library's ONNX appliers, verify
    the result with onnxruntime and roll back, per site, whatever breaks the certificates.

    Args:
        model: a path, an ``onnx.ModelProto`` or an ``onnx_ir.Model``; the result is the same
            kind. The input (object or file) is never modified.
        diagnosis_or_data: a :class:`graphsurg.Diagnosis` (from :func:`analyze`), or
            calibration data (as in :func:`analyze`): the last quarter of its batches (one
            batch: its second half) is held out to verify, the rest is diagnosed.
        passes: replacement names (see :func:`get_available_passes`; the old pass names
            ``excise_dead_units`` / ``relu_to_leaky_relu`` still work). Default: every
            *exact* one. ``cleanup`` always runs last.
        certificates: exact edits keep the held-out output within ``exact_tolerance``,
            bounded ones within ``max_output_change``.
        data: verification batches when a Diagnosis is given (without them the edits are not
            verified, and the result says so).
        allow_inexact: let function-changing replacements run (default: exact edits only).
        max_output_change: the bound for bounded edits; with an explicit ``passes`` list it
            is also the opt-in to inexact ones.
        output: for path inputs, where to write (default ``<name>.graphsurg.onnx`` beside
            it); written atomically.
        save_external_data / external_data_size_threshold: write tensors larger than the
            threshold (bytes) to ``<output>.data`` (models that hold external data always do).
        batch_size / batch_axes: rows per batch when an ``.npz`` is split, and
            ``{input name: axis or None}`` overriding the batch axes read from the model
            (see :mod:`graphsurg.passes.onnx.inputs` for every calibration format).
        data_loader_script: ``"file.py:load_data"``: run that function for the calibration
            feed dicts (this executes the user's code; pass ``[]`` as the data).
        full_check: run ``onnx.checker.check_model(full_check=True)`` on the result.

    Returns:
        ``(new model, SurgeryResult)``; ``result.ok`` is False when a site was rolled back;
        ``result.size`` holds nodes and parameters before and after.

    Raises:
        OnnxInputError: bad model, data, pass name or output path (one-line message).
    """
    cert = certificates or Certificates()
    if max_output_change is not None:
        try:
            cert = replace(cert, max_output_change=max_output_change)
        except ValueError as e:
            raise OnnxInputError(str(e)) from None
    inexact = allow_inexact or (max_output_change is not None and passes is not None)
    names, cleanup = selection(passes, inexact=inexact, library=library)
    if isinstance(diagnosis_or_data, Diagnosis) and data is None and library is None \
            and cleanup and not save_external_data and _only_excision(diagnosis_or_data, names):
        plain = _apply_plain(model, diagnosis_or_data, names, cert, config, seed, full_check,
                             output)
        if plain is not None:
            return plain  # type: ignore[return-value]
    adapter, kind = OnnxAdapter.open(model)
    out_path = _out_path(model, kind, output)
    for d in (diagnosis_or_data, data):  # the calibration data is an input too
        if out_path is not None and isinstance(d, str | os.PathLike) \
                and Path(d).resolve() == out_path.resolve():
            raise OnnxInputError(f"output '{out_path}' is the calibration data; graphsurg never "
                                 "overwrites its inputs -- pass another -o/output path")
    if out_path is not None:
        _no_collision_with_external_data(adapter, model, out_path)
    nodes_before, params_before = _size(adapter.current)
    notes = _custom_ops(adapter.current)
    diagnosis: Diagnosis | None = None
    if isinstance(diagnosis_or_data, Diagnosis):
        diagnosis = diagnosis_or_data
        held = (adapter.batches(data, batch_size=batch_size, batch_axes=batch_axes)
                if data is not None else [])
        batches, held_out = held, held
    else:
        batches = adapter.batches(diagnosis_or_data, batch_size=batch_size,
                                  batch_axes=batch_axes, loader=data_loader_script)
        held_out = None
    result = _operate(adapter, batches, held_out, diagnosis, names, cert, config, seed, library)
    if diagnosis is not None and not held_out:
        result.verified_on = "not verified: a diagnosis was given without data"
    if cleanup:
        _cleanup(adapter, result, held_out if held_out is not None else batches[-1:], cert)
    result.model = adapter.current
    result.notes = notes + result.notes
    nodes_after, params_after = _size(adapter.current)
    result.size = {"nodes_before": nodes_before, "nodes_after": nodes_after,
                   "params_before": params_before, "params_after": params_after}
    return _finish(adapter, kind, model, out_path, result, full_check=full_check,
                   infer_shapes=cleanup, save_external_data=save_external_data,
                   external_data_size_threshold=external_data_size_threshold)


def _only_excision(diagnosis: Diagnosis, names: Sequence[str]) -> bool:
    """Whether ``excise_dead`` is the only selected replacement that treats a problem of
    ``diagnosis``."""
    lib = _library(None)
    kinds = {p.kind for p in diagnosis.problems}
    return "excise_dead" in names and not any(
        kinds & set(lib.get(n).treats) for n in names if n != "excise_dead")


def _apply_plain(model: Any, diagnosis: Diagnosis, names: list[str], cert: Certificates,
                 config: DiagnoseConfig | None, seed: int, full_check: bool,
                 output: str | os.PathLike[str] | None) -> tuple[Any, SurgeryResult] | None:
    """:func:`apply` of a diagnosis without data to a ``ModelProto`` or a model file (of at
    most 64 MiB, no external data) whose every excision site is plain
    (:mod:`graphsurg.passes.onnx.plain`): the same spine over
    :class:`~graphsurg.passes.onnx.plain_adapter.PlainAdapter`, edited on a private proto,
    never read into onnx-ir; None when the model or a site is not plain (then :func:`apply`
    takes the general path, which also names a bad file). A plain model has nothing for the
    cleanup to remove or sort: what remains of it is the shape inference, with the final
    check."""
    from graphsurg._files import atomic_outputs, check_no_collision
    from graphsurg.passes.onnx._common import (
        SMALL_PROTO_BYTES,
        _check_header,
        _check_small_proto,
        _small,
        infer_and_check_proto,
    )
    from graphsurg.passes.onnx.plain import (
        ProtoIndex,
        custom_ops,
        lift_constants,
        needs_shapes,
        parameters,
        plain_reason,
    )
    from graphsurg.passes.onnx.plain_adapter import PlainAdapter

    out_path = None
    if isinstance(model, onnx.ModelProto):
        where = "the ModelProto"
        _check_header(model, where)
        if not _small(model):  # (no copy of a large model only to find it is not plain)
            return None
        work = onnx.ModelProto()
        work.CopyFrom(model)
    elif isinstance(model, str | os.PathLike):
        path = Path(model)
        where = f"'{path}'"
        try:
            if not path.is_file() or path.stat().st_size > SMALL_PROTO_BYTES:
                return None
            work = onnx.load(str(path), load_external_data=False)
        except Exception:  # the general path reads it again and says what is wrong
            return None
        _check_header(work, where)
        out_path = _out_path(model, "path", output)
        assert out_path is not None
        try:
            check_no_collision([model], [("output", out_path)])
        except BadInputError as e:
            raise OnnxInputError(str(e)) from None
    else:
        return None
    if work.graph.sparse_initializer:
        return None
    if not full_check:  # no check of the result follows: the input's, as load_model does
        _check_small_proto(work, where)
    lift_constants(work)  # as OnnxAdapter.open lifts them (counted after, as there)
    index = ProtoIndex(work)
    if needs_shapes(work, index):  # as excise_site infers them (best effort, merged)
        try:
            work = onnx.shape_inference.infer_shapes(work, check_type=True, strict_mode=False,
                                                     data_prop=True)
        except Exception:  # the inference raises several types: not plain then
            return None
        index = ProtoIndex(work)
    if plain_reason(work, index, diagnosis.problems) is not None:
        return None
    adapter = PlainAdapter(work, index)
    nodes_before, params_before = len(work.graph.node), parameters(work)
    notes = custom_ops(work)
    result = _operate(adapter, [], [], diagnosis, names, cert, config, seed, None)
    result.verified_on = "not verified: a diagnosis was given without data"
    out = adapter.current
    result.notes = notes + result.notes
    result.size = {"nodes_before": nodes_before, "nodes_after": len(out.graph.node),
                   "params_before": params_before, "params_after": parameters(out)}
    try:
        out, more = infer_and_check_proto(out, "the result", full_check=full_check,
                                          check=onnx.checker.check_model)
    except OnnxInputError as e:
        # with full_check the input is checked (as load_model checks it) only when the
        # result fails: the plain edits keep a valid model valid, so a bad input fails here
        if isinstance(model, onnx.ModelProto):
            _check_small_proto(model, where)
        else:
            _check_small_proto(onnx.load(str(model), load_external_data=False), where)
        raise RuntimeError(f"graphsurg produced a model that fails onnx.checker: {e}") from e
    result.notes += more
    result.model = out
    if out_path is None:
        return out, result
    with atomic_outputs(out_path) as (tmp,):
        tmp.write_bytes(out.SerializeToString())
    result.output = str(out_path)
    return (out_path if isinstance(model, Path) else str(out_path)), result


def _external_files(m: ir.Model) -> list[Path]:
    """The external-data files the model's tensors live in (memory-mapped, read lazily);
    not the model file itself, whose large inline weights are read mapped too."""
    from graphsurg.passes.onnx._common import is_mapped_inline

    files: set[Path] = set()
    for g in (m.graph, *m.graph.subgraphs()):
        for v in g.initializers.values():
            t = v.const_value
            if isinstance(t, ir.ExternalTensor) and not is_mapped_inline(t):
                files.add(Path(t.path))
    return sorted(files)


def _no_collision_with_external_data(adapter: OnnxAdapter, model: Any, out_path: Path) -> None:
    """Refuse an output (the model or its ``.data`` file) that is one of the input's files:
    writing ``out.onnx`` beside an input whose tensors live in ``out.onnx.data`` would
    replace the data the input still reads."""
    from graphsurg._files import check_no_collision

    ext = _external_files(adapter.current)
    outputs: list[tuple[str, Any]] = [("output", out_path)]
    if ext:  # a model holding external data is written with external data
        outputs.append(("output's external data", out_path.with_name(out_path.name + ".data")))
    try:
        check_no_collision([model, *ext], outputs)
    except BadInputError as e:
        raise OnnxInputError(str(e)) from None


def _custom_ops(m: ir.Model) -> list[str]:
    custom = sorted({f"{n.domain}::{n.op_type} ('{n.name}')" for n in m.graph.all_nodes()
                     if n.domain not in KNOWN_DOMAINS})
    return ["custom-domain ops left untouched: " + ", ".join(custom)] if custom else []


def _operate(adapter: OnnxAdapter, batches: list[Any], held_out: list[Any] | None,
             diagnosis: Diagnosis | None, names: list[str], cert: Certificates,
             config: DiagnoseConfig | None, seed: int, library: Library | None
             ) -> SurgeryResult:
    """operate over the ONNX adapter, no healing; a model with nothing to treat comes back
    as it is, with the reasons."""
    if not names:
        diagnosis = diagnosis or Diagnosis(capture="onnxruntime")
    elif diagnosis is None:  # once: a model with nothing to treat is not diagnosed twice
        diagnosis = _diagnosis_of(adapter, batches, config)
    try:
        if not names:
            raise SurgeryFailed("no replacement selected")
        return operate_adapter(adapter, batches, library=library, certificates=cert,
                               config=config, held_out=held_out, heal_steps=0,
                               heal_mode="never", seed=seed, replacements=names,
                               diagnosis=diagnosis, rediagnose=False)
    except SurgeryFailed as e:
        d = diagnosis if diagnosis is not None else _diagnosis_of(adapter, batches, config)
        return SurgeryResult(model=adapter.current,
                             plan=SurgeryPlan(untreated=e.untreated, certificates=cert),
                             before=d, after=None, ir="onnx",
                             verified_on="nothing to verify: the model was not edited",
                             notes=[str(e)])
    except BadInputError as e:
        raise OnnxInputError(str(e)) from None


def _diagnosis_of(adapter: OnnxAdapter, batches: list[Any], config: DiagnoseConfig | None
                  ) -> Diagnosis:
    from graphsurg._data import split_held_out
    from graphsurg._operate import diagnose_on

    train, _, _ = split_held_out(batches, adapter.halve)
    return diagnose_on(adapter, train, config or DiagnoseConfig())


def _cleanup(adapter: OnnxAdapter, result: SurgeryResult, held: list[Any],
             cert: Certificates) -> None:
    """The tidy-up (unused nodes and initializers, order, shapes), verified like an exact
    edit: undone when the held-out output moves beyond ``exact_tolerance``. When it removed
    nothing and kept the node order (it only annotated shapes), there is nothing to verify
    (the held-out batches run once, to fail on bad data, when no edit was verified on them);
    otherwise the reference output is the untouched snapshot's."""
    # the untouched model, to verify against and roll back to (nothing to verify: no copy)
    before = adapter.snapshot(lazy=False) if held else None
    gen = adapter.generation
    order = list(adapter.current.graph)
    p = Cleanup(infer_shapes=False)  # inferred once, with the final check (_finish)
    p(adapter.model)
    result.notes += list(p.notes)
    changed = p.rewrites > 0 or len(order) != adapter.current.graph.num_nodes() or any(
        a is not b for a, b in zip(order, adapter.current.graph, strict=False))
    del order
    if not changed:
        adapter.unchanged_since(gen)  # the session kept from before runs it (no new one)
    if held and not changed and not result.applied:
        adapter.run(held)  # nothing ran the held-out batches yet: bad data still fails here
    elif held and changed:
        assert before is not None
        ref = OnnxAdapter(before, threads=adapter.threads).run(held)
        change = output_change(adapter.run(held), ref)
        if not change.within(cert.exact_tolerance):
            adapter.restore(before, consume=True)
            result.rolled_back.append({"index": -1, "replacement": CLEANUP, "site": "graph",
                                       "reason": f"output change {change.rel:.3g} > exact "
                                                 f"tolerance {cert.exact_tolerance}"})


def _finish(adapter: OnnxAdapter, kind: str, model: Any, out_path: Path | None,
            result: SurgeryResult, *, full_check: bool, infer_shapes: bool,
            save_external_data: bool, external_data_size_threshold: int
            ) -> tuple[Any, SurgeryResult]:
    """Shapes inferred (the cleanup's), ``onnx.checker.check_model(full_check=True)``, and
    the output written or handed back -- from one serialization of the weightless graph
    (:func:`graphsurg.passes.onnx._common.infer_and_check`)."""
    from graphsurg.passes.onnx._common import infer_and_check, with_weights

    m = adapter.model
    bare = None
    if full_check or infer_shapes:
        try:
            # the shapes go into the output; into the working model only when it is the
            # output (an onnx_ir.Model came in)
            proto, arrays, notes = infer_and_check(m, "the result", full_check=full_check,
                                                   infer=infer_shapes, merge=kind == "ir")
        except OnnxInputError as e:  # a graphsurg bug: the model is kept out
            raise RuntimeError(f"graphsurg produced a model that fails onnx.checker: {e}") \
                from e
        result.notes += notes
        bare = (proto, arrays)
    if kind == "path":
        assert out_path is not None
        adapter.save(out_path, save_external_data=save_external_data,
                     external_data_size_threshold=external_data_size_threshold, bare=bare)
        result.output = str(out_path)
        return (out_path if isinstance(model, Path) else str(out_path)), result
    if kind == "proto":
        return (with_weights(*bare) if bare is not None else to_proto(m)), result
    return m, result


__all__ = [
    "LEGACY_PASS_NAMES",
    "OnnxInputError",
    "analyze",
    "apply",
    "describe_passes",
    "diagnose_onnx",
    "get_available_passes",
    "load_model",
    "rules",
    "save_model",
    "selection",
]
