"""The visual report: one self-contained HTML file (PNG images embedded as base64) plus
``report.json`` with the same numbers.

Per model: per-layer dead fraction before/after (bars), per-layer gradient norm before/after
(log scale), per-unit activation variance as heat strips, the plan as a table (problem ->
replacement -> scale -> guarantee -> verified evidence) and treated-vs-untreated training
curves when training ran. Plots are drawn with matplotlib's Agg backend (no display needed).
matplotlib is in the ``report`` extra: without it the HTML page has the tables and a note
saying how to get the figures (``missing_figures()``), and every command still works.
Both files are written atomically (a temporary file in the same folder, then ``os.replace``).
"""

from __future__ import annotations

import base64
import html
import importlib
import io
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._files import atomic_outputs, write_bytes
from ._problems import Diagnosis, _finite

BEFORE_COLOR = "#d1495b"  # untreated / before
AFTER_COLOR = "#2e86ab"  # treated / after
REPORT_EXTRA = "pip install 'graphsurg[report]'"


def missing_figures() -> str | None:
    """None when the report can draw its figures; else one line saying why not and the fix."""
    try:
        importlib.import_module("matplotlib")
    except ImportError:
        return f"matplotlib is not installed: the report has tables but no figures ({REPORT_EXTRA})"
    return None


@dataclass
class ModelReport:
    """Everything the report shows about one model.

    Attributes:
        name / description: what the model is.
        before: the diagnosis of the input model.
        after: the diagnosis of the operated model (None when no surgery ran).
        plan: one dict per schema: ``problem, site, replacement, scale, guarantee, evidence,
            kept`` (strings, ``kept`` a bool).
        metrics: rows ``(metric, before, after)`` for the before/after table.
        curves: training losses per step, ``{"untreated": [...], "treated": [...]}``.
        curve_offsets: the step a curve starts after (the treated copy's curve starts after
            the healing steps that ran inside ``operate``).
        notes: lines shown under the model's title.
        surgery: the surgery result as JSON-ready data (kept in report.json).
    """

    name: str
    description: str
    before: Diagnosis
    after: Diagnosis | None = None
    plan: list[dict[str, Any]] = field(default_factory=list)
    metrics: list[tuple[str, str, str]] = field(default_factory=list)
    curves: dict[str, list[float]] = field(default_factory=dict)
    curve_offsets: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    surgery: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "before": self.before.to_dict(),
            "after": self.after.to_dict() if self.after is not None else None,
            "plan": self.plan,
            "metrics": [list(m) for m in self.metrics],
            "curves": self.curves,
            "curve_offsets": self.curve_offsets,
            "notes": self.notes,
            "surgery": self.surgery,
        }


@dataclass
class Report:
    title: str
    models: list[ModelReport]
    notes: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "graphsurg.report/1",
            "title": self.title,
            "notes": self.notes,
            "meta": self.meta,
            "models": [m.to_dict() for m in self.models],
        }

    def write(self, out_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
        """Write ``report.html`` and ``report.json`` into ``out_dir`` (created if needed),
        atomically and together (a failure leaves neither new file); returns both paths."""
        out = Path(out_dir)
        html_path, json_path = out / "report.html", out / "report.json"
        page = render_html(self)
        data = json.dumps(_finite(self.to_dict()), indent=1)
        with atomic_outputs(html_path, json_path) as (tmp_html, tmp_json):
            tmp_html.write_text(page, encoding="utf-8")
            tmp_json.write_text(data, encoding="utf-8")
        return html_path, json_path


def write_atomic(path: str | os.PathLike[str], data: str | bytes) -> None:
    """Write ``data`` (text as UTF-8) to ``path`` atomically (graphsurg._files): readers see
    the old file or the new one, never half of one."""
    write_bytes(path, data.encode("utf-8") if isinstance(data, str) else data)


# -- figures ----------------------------------------------------------------------------------

def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update({
        "font.size": 8, "axes.titlesize": 9, "axes.titleweight": "bold",
        "axes.spines.top": False, "axes.spines.right": False, "figure.dpi": 110,
    })
    return plt


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _activation_layers(d: Diagnosis) -> list[tuple[str, Any]]:
    return [(r.site.module or k, r) for k, r in d.layers.items() if r.kind == "activation" and r.var]


def _param_layers(d: Diagnosis) -> list[tuple[str, Any]]:
    return [(r.site.module or k, r) for k, r in d.layers.items() if r.kind == "parameters"]


def _union(a: list[str], b: list[str]) -> list[str]:
    seen = dict.fromkeys(a)
    for x in b:
        seen.setdefault(x)
    return list(seen)


def _short(label: str, n: int = 18) -> str:
    return label if len(label) <= n else "…" + label[-(n - 1):]


def fig_dead_fraction(before: Diagnosis, after: Diagnosis | None) -> str:
    plt = _plt()
    b = {k: r.dead_fraction for k, r in _activation_layers(before)}
    a = {k: r.dead_fraction for k, r in _activation_layers(after)} if after is not None else {}
    labels = _union(list(b), list(a))
    fig, ax = plt.subplots(figsize=(4.6, 2.5))
    x = list(range(len(labels)))
    w = 0.4 if after is not None else 0.7
    ax.bar([i - (w / 2 if after is not None else 0) for i in x], [b.get(k, 0.0) for k in labels], w,
           color=BEFORE_COLOR, label="before")
    if after is not None:
        ax.bar([i + w / 2 for i in x], [a.get(k, 0.0) for k in labels], w, color=AFTER_COLOR,
               label="after surgery")
    ax.set_xticks(x, [_short(k) for k in labels], rotation=90 if len(labels) > 8 else 0,
                  fontsize=7 if len(labels) > 8 else 8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("dead / dormant fraction")
    ax.set_xlabel("layer")
    ax.set_title("Dead units per layer (lower is better)")
    ax.yaxis.grid(True, alpha=0.3)
    ax.legend(loc="upper right", framealpha=0.95, edgecolor="none")
    return _png(fig)


def fig_grad_norm(before: Diagnosis, after: Diagnosis | None) -> str | None:
    plt = _plt()
    b = {k: r.grad_norm for k, r in _param_layers(before) if r.grad_norm is not None}
    a = {k: r.grad_norm for k, r in _param_layers(after) if r.grad_norm is not None} if after is not None else {}
    if not b and not a:
        return None
    labels = _union(list(b), list(a))
    fig, ax = plt.subplots(figsize=(4.6, 2.5))
    floor = 1e-30

    def series(d: dict[str, float]) -> tuple[list[int], list[float]]:
        xs = [i for i, k in enumerate(labels) if k in d]
        return xs, [max(float(d[labels[i]]), floor) for i in xs]

    xs, ys = series(b)
    ax.plot(xs, ys, "o-", color=BEFORE_COLOR, label="before", ms=3.5)
    if a:
        xs, ys = series(a)
        ax.plot(xs, ys, "s-", color=AFTER_COLOR, label="after surgery", ms=3.5)
    ax.set_yscale("log")
    ax.set_xticks(range(len(labels)), [_short(k) for k in labels],
                  rotation=90 if len(labels) > 8 else 0, fontsize=7 if len(labels) > 8 else 8)
    ax.set_ylabel("‖∇W‖ (log scale)")
    ax.set_xlabel("layer (input → output)")
    ax.set_title("Gradient norm per layer")
    ax.yaxis.grid(True, alpha=0.3, which="major")
    ax.legend(frameon=False)
    return _png(fig)


def fig_variance_strip(before: Diagnosis, after: Diagnosis | None) -> str | None:
    import numpy as np

    plt = _plt()
    panels = [("before", before)] + ([("after surgery", after)] if after is not None else [])
    mats = []
    for _, d in panels:
        layers = _activation_layers(d)
        if not layers:
            continue
        width = max(len(r.var) for _, r in layers)
        m = np.full((len(layers), width), np.nan)
        for i, (_, r) in enumerate(layers):
            v = np.asarray(r.var, dtype=float)
            m[i, : len(v)] = np.log10(np.clip(np.nan_to_num(v, nan=0.0), 1e-8, None))
        mats.append((m, [k for k, _ in layers]))
    if not mats:
        return None
    n_rows = max(m.shape[0] for m, _ in mats)
    fig, axes = plt.subplots(1, len(mats), figsize=(4.6 * len(mats), 0.6 + 0.17 * n_rows + 0.5),
                             squeeze=False)
    cmap = plt.get_cmap("viridis").with_extremes(bad="#eeeeee")
    finite = np.concatenate([m[np.isfinite(m)] for m, _ in mats])
    vmin, vmax = -8.0, max(float(finite.max()) if finite.size else 0.0, -7.0)
    im = None
    for ax, (m, labels), (title, _) in zip(axes[0], mats, panels, strict=False):
        im = ax.imshow(np.ma.masked_invalid(m), aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax,
                       interpolation="nearest")
        ax.set_yticks(range(len(labels)), [_short(k, 14) for k in labels],
                      fontsize=6 if len(labels) > 10 else 7)
        ax.set_xlabel("unit")
        ax.set_title(f"Activation variance per unit, {title}")
        for s in ax.spines.values():
            s.set_visible(False)
    cb = fig.colorbar(im, ax=axes[0].tolist(), fraction=0.03, pad=0.02)
    cb.set_label("log10 variance\n(darkest = constant: dead)", fontsize=7)
    return _png(fig)


def fig_curves(curves: dict[str, list[float]], offsets: dict[str, int] | None = None) -> str | None:
    plt = _plt()
    if not any(curves.values()):
        return None
    offsets = offsets or {}
    fig, ax = plt.subplots(figsize=(4.6, 2.5))
    colors = {"untreated": BEFORE_COLOR, "treated": AFTER_COLOR}
    healed = max(offsets.values(), default=0)
    if healed:
        ax.axvspan(0, healed, color="#e9ecef", zorder=0)
        ax.text(healed / 2, 0.97, "healing\n(inside operate)", transform=ax.get_xaxis_transform(),
                ha="center", va="top", fontsize=7, color="#5b6573")
    for name, ys in curves.items():
        if ys:
            start = offsets.get(name, 0)
            ax.plot(range(start + 1, start + len(ys) + 1), ys, color=colors.get(name, "#555555"),
                    label=name, lw=1.4)
    ax.set_yscale("log")
    ax.set_xlabel("training step (same seed, same data)")
    ax.set_ylabel("training loss (log scale)")
    ax.set_title("Training: treated vs untreated")
    ax.yaxis.grid(True, alpha=0.3)
    ax.legend(frameon=False, loc="lower left")
    return _png(fig)


# -- HTML -------------------------------------------------------------------------------------

_CSS = """
body{font-family:-apple-system,BlinkMacSystemFont,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;
margin:0;background:#f5f6f8;color:#1d2430}
header{background:#1d2430;color:#fff;padding:18px 28px}
header h1{margin:0 0 4px 0;font-size:22px}
header p{margin:2px 0;color:#c8cfdb;font-size:13px}
main{padding:16px 28px;max-width:1180px}
section{background:#fff;border-radius:8px;box-shadow:0 1px 3px rgba(0,0,0,.08);
padding:14px 20px;margin:0 0 18px 0}
h2{margin:0 0 2px 0;font-size:18px}
.desc{color:#5b6573;margin:0 0 8px 0;font-size:13px}
.badge{display:inline-block;border-radius:10px;padding:1px 9px;font-size:12px;margin-left:8px;
vertical-align:middle;color:#fff}
.bad{background:#d1495b}.good{background:#2a9d5c}.info{background:#6c757d}
table{border-collapse:collapse;font-size:13px;margin:6px 0 10px 0}
th,td{border-bottom:1px solid #e3e6ea;padding:4px 10px;text-align:left}
th{background:#f0f2f5}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.grid{display:flex;flex-wrap:wrap;gap:8px;align-items:flex-start}
.grid img{border:1px solid #eceff2;border-radius:4px}
.grid img.small{width:calc(33.3% - 8px)}
.grid img.wide{max-width:100%}
.tables{display:flex;flex-wrap:wrap;gap:0 28px;align-items:flex-start}
.notes{color:#5b6573;font-size:12px;margin:4px 0}
.summary td{padding:3px 12px}
"""


def _table_html(header: list[str], rows: list[list[str]], num_from: int = 1) -> str:
    h = "".join(f"<th>{html.escape(c)}</th>" for c in header)
    body = []
    for r in rows:
        cells = "".join(
            f'<td class="num">{html.escape(c)}</td>' if i >= num_from else f"<td>{html.escape(c)}</td>"
            for i, c in enumerate(r)
        )
        body.append(f"<tr>{cells}</tr>")
    return f"<table><tr>{h}</tr>{''.join(body)}</table>"


def _img(b64: str | None, alt: str, cls: str = "small") -> str:
    if b64 is None:
        return ""
    return f'<img class="{cls}" alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def _badge(m: ModelReport) -> str:
    n0 = len(m.before.problems)
    g = (m.surgery or {}).get("guarantee") or {}
    if g.get("strict_subset") is not None:  # the global certificate, on held-out batches
        ok = bool(g["strict_subset"])
        return (f'<span class="badge {"good" if ok else "bad"}">{g["before"]} → {g["after"]} '
                f'problem(s), {"strict subset" if ok else "NOT a strict subset"}</span>')
    if m.after is not None:
        n1 = len(m.after.problems)
        cls = "good" if n1 < n0 or n0 == 0 else "bad"
        return f'<span class="badge {cls}">{n0} problem(s) → {n1} after surgery</span>'
    cls = "bad" if n0 else "good"
    return f'<span class="badge {cls}">{n0} problem(s) found</span>'


def _problem_rows(d: Diagnosis) -> list[list[str]]:
    return [[p.kind, p.site.address, f"{p.severity:.2f}", p.describe()] for p in d.problems]


def _model_html(m: ModelReport, *, figures: bool = True) -> str:
    left: list[str] = []
    if m.before.problems:
        left.append("<b>Diagnosis</b>" + _table_html(["problem", "site", "severity", "evidence"],
                                                      _problem_rows(m.before), num_from=2))
    else:
        left.append("<p>Diagnosis: no problems found.</p>")
    if m.plan:
        rows = [[str(s.get("problem", "")), str(s.get("site", "")), str(s.get("replacement", "")),
                 str(s.get("scale", "")), str(s.get("guarantee", "")), str(s.get("evidence", "")),
                 "kept" if s.get("kept", True) else "rolled back"] for s in m.plan]
        left.append("<b>Plan</b>" + _table_html(
            ["problem", "site", "replacement", "scale", "guarantee", "verified evidence", "outcome"],
            rows, num_from=99))
    if m.after is not None and m.after.problems:
        left.append("<b>Problems after surgery</b> (diagnosis of the operated, healed model)"
                    + _table_html(["problem", "site", "severity", "evidence"],
                                  _problem_rows(m.after), num_from=2))
    right = ""
    if m.metrics:
        right = "<b>Before / after</b>" + _table_html(
            ["metric", "before / untreated", "after / treated"], [list(r) for r in m.metrics])
    notes = "".join(f'<p class="notes">{html.escape(n)}</p>' for n in m.notes)
    imgs = [] if not figures else [
        _img(fig_dead_fraction(m.before, m.after), f"{m.name}: dead fraction per layer"),
        _img(fig_grad_norm(m.before, m.after), f"{m.name}: gradient norm per layer"),
        _img(fig_curves(m.curves, m.curve_offsets), f"{m.name}: training curves"),
        _img(fig_variance_strip(m.before, m.after), f"{m.name}: activation variance per unit",
             "wide"),
    ]
    return (
        f'<section id="{html.escape(m.name)}"><h2>{html.escape(m.name)}{_badge(m)}</h2>'
        f'<p class="desc">{html.escape(m.description)}</p>'
        f'<div class="tables"><div>{right}</div><div>{"".join(left)}</div></div>{notes}'
        f'<div class="grid">{"".join(i for i in imgs if i)}</div></section>'
    )


def render_html(report: Report) -> str:
    """The report as one self-contained HTML page (no external resources)."""
    when = report.meta.get("created") or time.strftime("%Y-%m-%d %H:%M")
    summary_rows = []
    for m in report.models:
        after = str(len(m.after.problems)) if m.after is not None else "—"
        summary_rows.append(
            f'<tr><td><a href="#{html.escape(m.name)}" style="color:#fff">{html.escape(m.name)}</a></td>'
            f"<td>{len(m.before.problems)} problem(s)</td><td>after surgery: {after}</td></tr>"
        )
    missing = missing_figures()
    notes = "".join(f"<p>{html.escape(n)}</p>" for n in
                    [*report.notes, *([missing] if missing else [])])
    body = "".join(_model_html(m, figures=missing is None) for m in report.models)
    return (
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(report.title)}</title><style>{_CSS}</style></head><body>"
        f"<header><h1>{html.escape(report.title)}</h1>"
        f"<p>graphsurg {html.escape(str(report.meta.get('version', '')))} · {html.escape(when)}"
        " · diagnose → plan → operate → verify</p>"
        f'{notes}<table class="summary" style="color:#fff;border:0">{"".join(summary_rows)}</table>'
        f"</header><main>{body}</main></body></html>"
    )


def fmt(x: float | None, digits: int = 3) -> str:
    """A number for a table: 3 significant digits, ``—`` for None, ``nan``/``inf`` spelled."""
    if x is None:
        return "—"
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return f"{x:.{digits}g}"


__all__ = ["REPORT_EXTRA", "ModelReport", "Report", "fmt", "missing_figures", "render_html",
           "write_atomic"]
