"""The IR-agnostic data model of a diagnosis: sites, problems, per-layer evidence.

Everything here is plain data: it round-trips through JSON and imports neither
torch.fx nor onnx, so the torch and ONNX adapters share it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args

ProblemKind = Literal[
    "DeadNeurons",
    "VanishingGradient",
    "ExplodingGradient",
    "Bottleneck",
    "Saturation",
    "NonFinite",
    # module-scale surgery: a held-out gap with co-adapting units, a head that stopped
    # learning, the positions of a sequence collapsed onto few directions
    "Overfitting",
    "LostPlasticity",
    "MixingCollapse",
]
PROBLEM_KINDS: tuple[str, ...] = get_args(ProblemKind)


@dataclass(frozen=True)
class Site:
    """A place in a graph where a problem can live.

    Attributes:
        module: the module path of the parametrised layer the site belongs to (for torch:
            ``"encoder.layer.0.intermediate.dense"``; for ONNX: the producing node's name).
            For an activation site this is the *producer* layer whose output units are measured.
        node: the graph node (torch) or value (ONNX) that was observed; ``""`` when the site is
            a layer's parameters.
        op: the operation at ``node`` (``"relu"``, ``"linear"``, ``"Gemm"``...).
        ir: ``"torch"`` or ``"onnx"``.
    """

    module: str
    node: str = ""
    op: str = ""
    ir: str = "torch"

    @property
    def address(self) -> str:
        """A stable string that names the site: ``module:node`` (or ``module``)."""
        return f"{self.module}:{self.node}" if self.node else self.module

    def __str__(self) -> str:
        return self.address


@dataclass(frozen=True)
class Problem:
    """One finding at a site, with the evidence it rests on.

    Attributes:
        kind: one of :data:`PROBLEM_KINDS`.
        site: where it is.
        severity: in [0, 1]; for dead units, the layer's flagged fraction.
        units: indices of the affected units (channels) at the site, if the problem is per unit.
        span: for gradient problems, the module paths of the consecutive affected layers, in
            forward order (the span a residual bypass will cover).
        evidence: measured numbers that justify the finding (JSON-serialisable).
    """

    kind: str
    site: Site
    severity: float = 1.0
    units: tuple[int, ...] = ()
    span: tuple[str, ...] = ()
    evidence: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.kind not in PROBLEM_KINDS:
            raise ValueError(
                f"Problem.kind={self.kind!r} is not one of {', '.join(PROBLEM_KINDS)}"
            )

    def describe(self) -> str:
        """A one-line human description."""
        ev = self.evidence
        if self.kind == "DeadNeurons":
            return (
                f"{len(self.units)}/{ev.get('width', '?')} units dormant "
                f"({ev.get('n_dead', 0)} dead), score <= {ev.get('tau', '?')}"
            )
        if self.kind == "Saturation":
            return f"{len(self.units)}/{ev.get('width', '?')} units saturated"
        if self.kind in ("VanishingGradient", "ExplodingGradient"):
            return (
                f"{len(self.span)} layer(s), grad norm {_fmt(ev.get('min_ratio'))}..."
                f"{_fmt(ev.get('max_ratio'))} x median"
            )
        if self.kind == "Bottleneck" and ev.get("reason") == "narrow":
            return f"width {ev.get('width')} between layers {ev.get('neighbour_width')} wide"
        if self.kind == "Bottleneck":
            return (
                f"rank {ev.get('rank')} of {ev.get('max_rank')} "
                f"(stable rank {_fmt(ev.get('stable_rank'))})"
            )
        if self.kind == "NonFinite":
            return f"{ev.get('count', '?')} non-finite values in {ev.get('where', '?')}"
        if self.kind == "Overfitting":
            return (f"held-out loss {_fmt(ev.get('val_loss'))} vs train {_fmt(ev.get('train_loss'))}"
                    f"; {ev.get('pairs', '?')} co-adapted unit pair(s)")
        if self.kind == "MixingCollapse":
            return (f"positions span rank {_fmt(ev.get('position_rank'))} of "
                    f"{ev.get('positions', '?')}")
        if self.kind == "LostPlasticity":
            return f"{_fmt(ev.get('dormant_fraction'))} of the head's units dormant"
        return ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["units"] = list(self.units)
        d["span"] = list(self.span)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Problem:
        return cls(
            kind=d["kind"],
            site=Site(**d["site"]),
            severity=float(d.get("severity", 1.0)),
            units=tuple(int(u) for u in d.get("units", ())),
            span=tuple(d.get("span", ())),
            evidence=dict(d.get("evidence", {})),
        )


@dataclass
class LayerReport:
    """Per-site measurements kept in a diagnosis (for reports and for the planner).

    Per-unit lists are kept in full: they feed the report's heat strips and let the
    planner re-threshold without another pass over the data.
    """

    site: Site
    kind: str  # "activation" or "parameters"
    activation: str = ""
    width: int = 0
    count: int = 0
    mean: list[float] = field(default_factory=list)
    var: list[float] = field(default_factory=list)
    dormancy: list[float] = field(default_factory=list)
    firing_rate: list[float] = field(default_factory=list)
    saturated_fraction: list[float] = field(default_factory=list)
    grad_norm: float | None = None
    dead_fraction: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerReport:
        d = dict(d)
        d["site"] = Site(**d["site"])
        return cls(**d)


@dataclass
class Diagnosis:
    """All problems found on a model, with the measurements they came from.

    Attributes:
        problems: the findings, in forward order of their sites.
        layers: measurements per site address.
        capture: how the model was captured: ``"export"``, ``"symbolic_trace"``, ``"hooks"``
            (or ``"onnxruntime"`` for ONNX models).
        gradients_checked: False when no ``loss_fn`` was given (gradient detectors skipped).
        batches: how many batches were measured.
        notes: anything the user should know (graph breaks, fallbacks, skipped checks).
    """

    problems: list[Problem] = field(default_factory=list)
    layers: dict[str, LayerReport] = field(default_factory=dict)
    capture: str = ""
    gradients_checked: bool = False
    batches: int = 0
    notes: list[str] = field(default_factory=list)

    # -- queries -------------------------------------------------------------------------
    def of_kind(self, kind: str) -> list[Problem]:
        return [p for p in self.problems if p.kind == kind]

    def at(self, module: str) -> list[Problem]:
        return [p for p in self.problems if p.site.module == module]

    def __len__(self) -> int:
        return len(self.problems)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.problems)

    @property
    def healthy(self) -> bool:
        return not self.problems

    # -- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "graphsurg.diagnosis/1",
            "capture": self.capture,
            "gradients_checked": self.gradients_checked,
            "batches": self.batches,
            "notes": list(self.notes),
            "problems": [p.to_dict() for p in self.problems],
            "layers": {k: v.to_dict() for k, v in self.layers.items()},
        }

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(_finite(self.to_dict()), indent=indent)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Diagnosis:
        if d.get("format") != "graphsurg.diagnosis/1":
            raise ValueError(
                f"not a graphsurg diagnosis (format={d.get('format')!r}); "
                "pass the output of Diagnosis.to_json()"
            )
        return cls(
            problems=[Problem.from_dict(p) for p in d.get("problems", [])],
            layers={k: LayerReport.from_dict(v) for k, v in d.get("layers", {}).items()},
            capture=d.get("capture", ""),
            gradients_checked=bool(d.get("gradients_checked", False)),
            batches=int(d.get("batches", 0)),
            notes=list(d.get("notes", [])),
        )

    @classmethod
    def from_json(cls, text: str) -> Diagnosis:
        return cls.from_dict(loads(text, "diagnosis"))

    def summary(self) -> str:
        """A plain-text table of the problems (one row each)."""
        head = (
            f"Diagnosis: {len(self.problems)} problem(s) over {self.batches} batch(es); "
            f"capture={self.capture}; gradients {'checked' if self.gradients_checked else 'not checked'}"
        )
        rows = [("problem", "site", "severity", "evidence")]
        for p in self.problems:
            rows.append((p.kind, p.site.address, f"{p.severity:.2f}", p.describe()))
        return head + "\n" + _table(rows) + "".join(f"\nnote: {n}" for n in self.notes)


def loads(text: str, what: str) -> Any:
    """``json.loads`` with a one-line error naming what was being read."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} JSON is malformed: {e}") from None


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.3g}"
    return str(x)


def _table(rows: Iterable[tuple[str, ...]]) -> str:
    rows = list(rows)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _finite(obj: Any) -> Any:
    """Make floats JSON-standard: NaN becomes null, +-Inf becomes +-1e308."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else (1e308 if obj > 0 else -1e308)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj
