"""The ONNX adapter's entry points: ``analyze``, ``apply`` (passes + onnxruntime verification
+ per-pass rollback) and ``rules``."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import onnx
import onnx_ir as ir
from onnxscript.rewriter import RewriteRuleSet

from graphsurg._certificates import Certificates
from graphsurg._config import DiagnoseConfig
from graphsurg._problems import Diagnosis

from ._base import PassState
from ._common import (
    KNOWN_DOMAINS,
    Feed,
    ModelLike,
    OnnxInputError,
    has_external_tensors,
    load_batches,
    load_model,
    ort_session,
    save_model,
    save_proto,
    split_holdout,
    to_proto,
    validate_batches,
)
from ._registry import PASSES, get_available_passes
from .calibration import analyze_model
from .relu_to_leaky_relu import rules as _relu_rules

DataLike = str | os.PathLike[str] | Mapping[str, Any] | Iterable[Mapping[str, Any]]
M = TypeVar("M", str, os.PathLike, onnx.ModelProto, ir.Model)


def analyze(
    model: ModelLike,
    data: DataLike,
    *,
    config: DiagnoseConfig | None = None,
    batch_size: int = 64,
) -> Diagnosis:
    """Diagnose an ONNX model on calibration data with onnxruntime.

    Args:
        model: a path (external data is memory-mapped), an ``onnx.ModelProto`` or an
            ``onnx_ir.Model``. It is not modified.
        data: an ``.npz`` file (one array per model input, split along dimension 0 into
            batches of ``batch_size``), one feed dict, or an iterable of feed dicts
            ``{input name: array}``.
        config: thresholds (:class:`graphsurg.DiagnoseConfig`).

    Returns:
        A :class:`graphsurg.Diagnosis` with ``capture="onnxruntime"``; activations are reduced
        batch by batch and never kept.

    Raises:
        OnnxInputError: the model or the data is bad (one-line message).

    Example:
        >>> d = gso.analyze("model.onnx", "calib.npz")
        >>> print(d.summary())
    """
    m, _ = load_model(model)
    batches = validate_batches(m, load_batches(data, batch_size=batch_size))
    return analyze_model(m, batches, config=config)


def rules(diagnosis: Diagnosis, *, alpha: float = 0.01) -> RewriteRuleSet:
    """The local rewrites for ``diagnosis`` as an onnxscript ``RewriteRuleSet``.

    Today that is the ``relu_to_leaky_relu`` rule restricted to the Relus diagnosed as dying
    (it matches nothing on a healthy model). Use it in your own pipeline::

        onnxscript.rewriter.rewrite(model, pattern_rewrite_rules=gso.rules(diagnosis))
    """
    return RewriteRuleSet(_relu_rules(diagnosis, alpha=alpha))


@dataclass
class PassRecord:
    """What one pass did and how it was verified."""

    name: str
    exact: bool
    rewrites: int = 0
    modified: bool = False
    kept: bool = True
    bound: float | None = None
    max_abs: float | None = None
    max_rel: float | None = None
    output_change: float | None = None
    reason: str = ""
    refusals: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class ApplyReport:
    """The outcome of :func:`apply`.

    Attributes:
        passes: one record per pass, in order; ``kept=False`` means rolled back.
        verification: how the result was verified (which batches), or why it was not.
        nodes_before/after, params_before/after: model size.
        notes: unknown ops and custom domains left untouched, and similar.
        output: where the model was written (path inputs).
    """

    passes: list[PassRecord] = field(default_factory=list)
    verification: str = ""
    verified: bool = False
    nodes_before: int = 0
    nodes_after: int = 0
    params_before: int = 0
    params_after: int = 0
    notes: list[str] = field(default_factory=list)
    output: str | None = None
    certificates: dict[str, Any] = field(default_factory=dict)

    @property
    def rolled_back(self) -> list[str]:
        return [p.name for p in self.passes if not p.kept]

    @property
    def ok(self) -> bool:
        """True when every pass met the certificates (none was rolled back)."""
        return not self.rolled_back

    def rewrites(self, name: str) -> int:
        return sum(p.rewrites for p in self.passes if p.name == name and p.kept)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["format"] = "graphsurg.onnx_report/1"
        d["ok"] = self.ok
        return d

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent, default=str)

    def summary(self) -> str:
        lines = [
            f"graphsurg onnx apply: {'certificates met' if self.ok else 'certificates NOT met'}; "
            f"nodes {self.nodes_before} -> {self.nodes_after}, "
            f"parameters {self.params_before} -> {self.params_after}; {self.verification}"
        ]
        for p in self.passes:
            state = "kept" if p.kept else f"ROLLED BACK ({p.reason})"
            meas = (
                f", output change {p.output_change:.3g} (max abs {p.max_abs:.3g}) <= bound "
                f"{p.bound:.3g}" if p.output_change is not None and p.bound is not None and p.kept
                else ""
            )
            lines.append(f"  {p.name}: {p.rewrites} rewrite(s), {state}{meas}")
            lines.extend(f"    {n}" for n in p.notes)
            lines.extend(f"    refused {r}" for r in p.refusals)
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def _params(model: ir.Model) -> int:
    total = 0
    for v in model.graph.initializers.values():
        if v.const_value is not None:
            total += int(np.prod(v.const_value.shape.numpy())) if v.const_value.shape else 1
    return total


def _run(sess: Any, batches: Sequence[Feed]) -> list[list[np.ndarray]]:
    return [sess.run(None, b) for b in batches]


def _compare(ref: list[list[np.ndarray]], got: list[list[np.ndarray]]) -> tuple[float, float, float]:
    """(max abs diff, max abs diff / max |ref|, ||got - ref|| / ||ref||) over all outputs."""
    num = den = 0.0
    max_abs = ref_max = 0.0
    for rb, gb in zip(ref, got, strict=True):
        for r, g in zip(rb, gb, strict=True):
            if r.shape != g.shape:
                return float("inf"), float("inf"), float("inf")
            if not np.issubdtype(r.dtype, np.floating):
                if not np.array_equal(r, g):
                    return float("inf"), float("inf"), float("inf")
                continue
            r64, g64 = r.astype(np.float64), g.astype(np.float64)
            d = g64 - r64
            if not np.all(np.isfinite(d[np.isfinite(r64)])):
                return float("inf"), float("inf"), float("inf")
            fin = np.isfinite(r64)
            d = np.where(fin, d, 0.0)
            num += float((d * d).sum())
            den += float((np.where(fin, r64, 0.0) ** 2).sum())
            if d.size:
                max_abs = max(max_abs, float(np.abs(d).max()))
                ref_max = max(ref_max, float(np.abs(np.where(fin, r64, 0.0)).max()))
    rel = max_abs / ref_max if ref_max > 0 else (0.0 if max_abs == 0 else float("inf"))
    change = (num**0.5) / (den**0.5) if den > 0 else (0.0 if num == 0 else float("inf"))
    return max_abs, rel, change


def check_full(model: ir.Model) -> None:
    """``onnx.checker.check_model(full_check=True)`` on ``model`` (through a temporary file
    when it holds external data)."""
    if has_external_tensors(model):
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / "model.onnx"
            ir.save(model, p, external_data="model.onnx.data")
            onnx.checker.check_model(str(p), full_check=True)
        return
    onnx.checker.check_model(to_proto(model), full_check=True)


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
    full_check: bool = True,
) -> tuple[M, ApplyReport]:
    """Run graphsurg's ONNX passes on ``model``, verify each with onnxruntime and roll back
    any pass that breaks the certificates.

    Args:
        model: a path, an ``onnx.ModelProto`` or an ``onnx_ir.Model``; the result is the same
            kind. The input (object or file) is never modified.
        diagnosis_or_data: a :class:`graphsurg.Diagnosis` (from :func:`analyze`), or calibration
            data (as in :func:`analyze`): the last quarter of its batches is held out to
            verify, the rest is analysed.
        passes: pass names (see :func:`get_available_passes`); default all. ``cleanup`` always
            runs last.
        certificates: exact passes must keep the relative output change ``||f' - f|| / ||f||``
            within ``exact_tolerance``, the others within ``max_output_change``.
        data: verification batches when a Diagnosis is given (without them the passes are not
            verified, and the report says so).
        output: for path inputs, where to write (default ``<name>.graphsurg.onnx`` beside it);
            written atomically.
        save_external_data / external_data_size_threshold: write tensors larger than the
            threshold (bytes) to ``<output>.data`` (models that hold external data always do).
        full_check: run ``onnx.checker.check_model(full_check=True)`` on the result.

    Returns:
        ``(new model, ApplyReport)``; ``report.ok`` is False when a pass was rolled back.

    Raises:
        OnnxInputError: bad model, data, pass name or output path (one-line message).
    """
    cert = certificates or Certificates()
    m, kind = load_model(model)
    report = ApplyReport(certificates=cert.to_dict())
    report.nodes_before, report.params_before = m.graph.num_nodes(), _params(m)
    custom = sorted(
        {f"{n.domain}::{n.op_type} ('{n.name}')" for n in m.graph.all_nodes() if n.domain not in KNOWN_DOMAINS}
    )
    if custom:
        report.notes.append("custom-domain ops left untouched: " + ", ".join(custom))

    names = list(passes) if passes is not None else get_available_passes()
    unknown = [n for n in names if n not in PASSES]
    if unknown:
        raise OnnxInputError(
            f"unknown pass(es) {unknown}; available: {', '.join(get_available_passes())}"
        )
    names = [n for n in names if n != "cleanup"] + ["cleanup"]

    out_path: Path | None = None
    if kind == "path":
        src = Path(model)  # type: ignore[arg-type]
        out_path = Path(output) if output is not None else src.with_name(src.stem + ".graphsurg.onnx")
        if out_path.resolve() == src.resolve():
            raise OnnxInputError(
                f"output '{out_path}' is the input file; graphsurg never modifies its input — "
                "pass another -o/output path"
            )

    hold: list[Feed] | None = None
    if isinstance(diagnosis_or_data, Diagnosis):
        diag = diagnosis_or_data
        if data is not None:
            hold = validate_batches(m, load_batches(data, batch_size=batch_size))
            report.verification = f"verified on {len(hold)} given batch(es)"
        else:
            report.verification = "not verified: a diagnosis was given without data"
    else:
        batches = validate_batches(m, load_batches(diagnosis_or_data, batch_size=batch_size))
        calib, hold, how = split_holdout(batches)
        try:
            calib, hold = validate_batches(m, calib), validate_batches(m, hold)
        except OnnxInputError:  # a fixed batch dimension does not split
            calib, hold, how = batches, batches, "verified on the calibration batch itself"
        report.verification = how
        diag = analyze_model(m, calib, config=config)
    report.verified = hold is not None

    ref = _run(ort_session(m), hold) if hold is not None else None
    state = PassState()
    for name in names:
        cls = PASSES[name]
        p = cls(diag, state)
        if name == "cleanup" and kind != "ir":
            # proto and path results get shapes from onnx's C++ inference on the serialised
            # model below: one serialisation instead of an ir round trip
            p.infer_shapes = False  # type: ignore[attr-defined]
        rec = PassRecord(name=name, exact=cls.exact)
        report.passes.append(rec)
        snapshot = m.clone() if ref is not None else None
        saved_state = {k: set(v) for k, v in state.excised.items()}
        try:
            rec.modified = p(m).modified
        except OnnxInputError:
            raise
        except Exception as e:  # a pass bug must not cost the user the model: roll it back
            rec.kept, rec.reason = False, f"the pass failed: {type(e).__name__}: {e}"
            if snapshot is not None:
                m = snapshot
            state.excised = saved_state
            continue
        rec.rewrites = p.rewrites
        rec.refusals = [str(r) for r in p.refusals]
        rec.notes = list(p.notes)
        if ref is None or not rec.modified or hold is None:
            continue
        rec.bound = cert.exact_tolerance if cls.exact else cert.max_output_change
        try:
            got = _run(ort_session(m), hold)
            rec.max_abs, rec.max_rel, rec.output_change = _compare(ref, got)
        except Exception as e:
            rec.kept, rec.reason = False, f"onnxruntime cannot run the result: {e}"
        if rec.kept and not rec.output_change <= rec.bound:  # type: ignore[operator]
            rec.kept = False
            rec.reason = (
                f"output change {rec.output_change:.3g} > {'exact_tolerance' if cls.exact else 'max_output_change'} "
                f"{rec.bound:.3g}"
            )
        if not rec.kept:
            assert snapshot is not None
            m = snapshot
            state.excised = saved_state
    report.nodes_after, report.params_after = m.graph.num_nodes(), _params(m)
    result_proto: onnx.ModelProto | None = None
    if kind != "ir" and not has_external_tensors(m):
        result_proto = to_proto(m)
        try:
            result_proto = onnx.shape_inference.infer_shapes(result_proto, strict_mode=False)
        except Exception as e:  # best effort, as in the cleanup pass
            report.notes.append(f"shape inference skipped: {type(e).__name__}")
    if full_check:
        try:
            if result_proto is not None:
                onnx.checker.check_model(result_proto, full_check=True)
            else:
                check_full(m)
        except Exception as e:  # pragma: no cover - a bug, reported with the model kept out
            raise RuntimeError(f"graphsurg produced a model that fails onnx.checker: {e}") from e

    if kind == "path":
        assert out_path is not None
        if result_proto is not None and not save_external_data:
            save_proto(result_proto, out_path)
        else:
            save_model(
                m,
                out_path,
                save_external_data=save_external_data,
                external_data_size_threshold=external_data_size_threshold,
            )
        report.output = str(out_path)
        result: Any = out_path if isinstance(model, Path) else str(out_path)
        return result, report
    if kind == "proto":
        return (result_proto if result_proto is not None else to_proto(m)), report  # type: ignore[return-value]
    return m, report  # type: ignore[return-value]
