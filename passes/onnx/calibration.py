"""Calibration and analysis: run an ONNX model in onnxruntime with its activations exposed as
extra outputs, reduce them batch by batch with :func:`graphsurg.kernels.neuron_stats` (no
activation is kept), and detect problems.

Findings (all in one :class:`graphsurg.Diagnosis`, ``capture="onnxruntime"``):

- ``DeadNeurons`` at the output of Relu/LeakyRelu/Sigmoid/Tanh/Gelu/... nodes: units whose
  ReDo dormancy score is ``<= dormant_tau`` or that are constant on the data. The evidence
  lists the constant units and their values (what ``excise_dead_units`` removes and folds).
- ``Saturation`` of Sigmoid/Tanh/HardSigmoid/Clip units.
- ``NonFinite`` activations.
- ``Bottleneck`` weights: MatMul/Gemm/Conv initializers whose numerical rank is below
  ``rank_fraction x min(d_in, d_out)``.

Sites are ``Site(module=<producing layer's node name>, node=<observed value name>,
op=<activation op type>, ir="onnx")``.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx_ir as ir
import torch
from graphsurg.kernels import NeuronStats, neuron_stats

from graphsurg._config import DiagnoseConfig
from graphsurg._problems import Diagnosis, LayerReport, Problem, Site

from ._base import const_array
from ._common import KNOWN_DOMAINS, Feed, ort_session

#: Activation ops observed by the analysis.
ACTIVATIONS = frozenset(
    {
        "Relu", "LeakyRelu", "PRelu", "ThresholdedRelu", "Elu", "Selu", "Celu", "Gelu",
        "Sigmoid", "HardSigmoid", "Tanh", "Softplus", "Softsign", "HardSwish", "Mish", "Clip",
    }
)  # fmt: skip
RELU_FAMILY = frozenset({"Relu", "LeakyRelu", "PRelu", "ThresholdedRelu", "Clip"})
SATURATING = frozenset({"Sigmoid", "HardSigmoid", "Tanh", "Clip"})
LINEAR_PRODUCERS = frozenset({"Gemm", "MatMul", "Conv", "ConvTranspose"})
CHANNEL_FIRST = frozenset({"Conv", "ConvTranspose", "BatchNormalization"})
_PRODUCER_PASS = frozenset({"Add", "BatchNormalization", "Identity"})


def find_producer(value: ir.Value) -> tuple[ir.Node | None, list[ir.Node]]:
    """Walk back from an activation's input through bias Add / BatchNormalization / Identity
    to the linear layer (Gemm/MatMul/Conv) that produces its units. Returns the layer (or
    None) and the nodes walked through, nearest first."""
    chain: list[ir.Node] = []
    v: ir.Value | None = value
    while v is not None:
        p = v.producer()
        if p is None:
            return None, chain
        if p.op_type in LINEAR_PRODUCERS and p.domain in ("", "ai.onnx"):
            return p, chain
        if p.op_type in _PRODUCER_PASS and p.domain in ("", "ai.onnx") and len(chain) < 4:
            chain.append(p)
            if p.op_type == "Add":
                a, b = p.inputs[0], p.inputs[1]
                v = b if const_array(a) is not None else a
            else:
                v = p.inputs[0]
            continue
        return None, chain
    return None, chain


def channel_dim_of(act: ir.Node) -> int:
    """The unit dimension at an activation's output: 1 after Conv/BatchNormalization, else -1."""
    layer, chain = find_producer(act.inputs[0]) if act.inputs and act.inputs[0] else (None, [])
    ops = {n.op_type for n in chain} | ({layer.op_type} if layer is not None else set())
    return 1 if ops & CHANNEL_FIRST else -1


def _site_of(act: ir.Node) -> Site:
    assert act.inputs[0] is not None
    layer, _ = find_producer(act.inputs[0])
    module = (layer.name if layer is not None else act.name) or act.outputs[0].name or ""
    return Site(module=module, node=act.outputs[0].name or "", op=act.op_type, ir="onnx")


def observed_activations(model: ir.Model) -> list[ir.Node]:
    """The activation nodes of the main graph, in graph order."""
    return [
        n
        for n in model.graph
        if n.op_type in ACTIVATIONS
        and n.domain in ("", "ai.onnx")
        and n.inputs
        and n.inputs[0] is not None
        and n.outputs[0].name
    ]


def _sat_threshold(op: str, margin: float) -> float | None:
    if op in ("Tanh", "Clip"):
        return 1.0 - margin
    if op in ("Sigmoid", "HardSigmoid"):
        return 1.0 - 2.0 * margin  # measured on 2*sigmoid - 1
    return None


def analyze_model(
    model: ir.Model, batches: Iterable[Feed], *, config: DiagnoseConfig | None = None
) -> Diagnosis:
    """Analyse an ``ir.Model`` (left unchanged) on validated feed dicts. See the module doc."""
    cfg = config or DiagnoseConfig()
    acts = observed_activations(model)
    notes: list[str] = []
    custom = sorted(
        {f"{n.domain}::{n.op_type}" for n in model.graph.all_nodes() if n.domain not in KNOWN_DOMAINS}
    )
    if custom:
        notes.append(f"custom-domain ops left untouched and unanalysed: {', '.join(custom)}")

    observed = model.clone()
    obs_nodes = {n.name: n for n in observed.graph}
    outputs = {v.name for v in observed.graph.outputs}
    names: list[str] = []
    dims: dict[str, int] = {}
    ops: dict[str, str] = {}
    for act in acts:
        name = act.outputs[0].name
        assert name is not None
        oact = obs_nodes.get(act.name)
        if oact is None:  # unnamed nodes: find by output name
            oact = next(n for n in observed.graph if n.outputs and n.outputs[0].name == name)
        v = oact.outputs[0]
        if v.type is None:
            src = oact.inputs[0]
            v.type = src.type if src is not None and src.type is not None else ir.TensorType(
                ir.DataType.FLOAT
            )
        if name not in outputs:
            observed.graph.outputs.append(v)
        names.append(name)
        dims[name] = channel_dim_of(act)
        ops[name] = act.op_type
    sess = ort_session(observed)
    out_names = [o.name for o in sess.get_outputs()]
    final_names = [v.name or "" for v in model.graph.outputs]

    stats: dict[str, NeuronStats] = {}
    sat: dict[str, NeuronStats] = {}
    n_batches = 0
    nonfinite_out = 0
    for feed in batches:
        if cfg.max_batches is not None and n_batches >= cfg.max_batches:
            break
        res = dict(zip(out_names, sess.run(None, feed), strict=True))
        n_batches += 1
        for fo in final_names:
            if fo in res and np.issubdtype(res[fo].dtype, np.floating):
                nonfinite_out += int((~np.isfinite(res[fo])).sum())
        for name in names:
            arr = res[name]
            if arr.ndim == 0 or not np.issubdtype(arr.dtype, np.floating):
                continue
            t = torch.from_numpy(np.ascontiguousarray(arr))
            cd = dims[name] if arr.ndim > 1 else -1
            thr = _sat_threshold(ops[name], cfg.saturation_margin)
            op = ops[name]
            if op in ("Sigmoid", "HardSigmoid"):
                s = neuron_stats(t, cd)
                ss = neuron_stats(t * 2 - 1, cd, sat_threshold=thr)
                sat[name] = ss if name not in sat else sat[name].merge(ss)
            else:
                s = neuron_stats(t, cd, sat_threshold=thr)
            stats[name] = s if name not in stats else stats[name].merge(s)

    problems: list[Problem] = []
    layers: dict[str, LayerReport] = {}
    for act in acts:
        name = act.outputs[0].name
        assert name is not None
        if name not in stats:
            continue
        s = stats[name]
        site = _site_of(act)
        ps, layer = _detect_units(s, sat.get(name, s), site, dims[name], cfg)
        problems.extend(ps)
        layers[site.address] = layer
    problems.extend(detect_bottlenecks(model, cfg))
    if nonfinite_out:
        problems.append(
            Problem(
                "NonFinite",
                Site(module="graph", node=",".join(final_names), op="output", ir="onnx"),
                evidence={"count": nonfinite_out, "where": "graph outputs"},
            )
        )
    order = {n.name: i for i, n in enumerate(model.graph)}
    problems.sort(key=lambda p: order.get(p.site.module, len(order)))
    return Diagnosis(
        problems=problems,
        layers=layers,
        capture="onnxruntime",
        gradients_checked=False,
        batches=n_batches,
        notes=notes,
    )


def _detect_units(
    s: NeuronStats, sat_s: NeuronStats, site: Site, cd: int, cfg: DiagnoseConfig
) -> tuple[list[Problem], LayerReport]:
    width = s.channels
    mean = s.mean.double()
    var = s.var.double()
    dorm = s.dormancy_score.double()
    fire = s.firing_rate.double()
    constant = (var <= cfg.dead_var * (1.0 + mean * mean)) & (s.n_nonfinite == 0) & (s.count > 0)
    if site.op in RELU_FAMILY:
        dead = constant & (fire == 0)
    else:
        dead = constant
    dormant = (dorm <= cfg.dormant_tau) | dead
    satf = sat_s.saturated_fraction.double()
    problems: list[Problem] = []
    units = tuple(int(i) for i in torch.nonzero(dormant).flatten().tolist())
    const_units = [int(i) for i in torch.nonzero(constant).flatten().tolist()]
    if len(units) >= cfg.min_dead_units and units:
        problems.append(
            Problem(
                "DeadNeurons",
                site,
                severity=len(units) / width,
                units=units,
                evidence={
                    "width": width,
                    "n_dead": int(dead.sum()),
                    "tau": cfg.dormant_tau,
                    "channel_dim": cd,
                    "constant_units": const_units,
                    "constant_values": [float(mean[i]) for i in const_units],
                    "samples": int(s.count.max()),
                },
            )
        )
    if site.op in SATURATING:
        su = tuple(int(i) for i in torch.nonzero(satf >= cfg.saturation_fraction).flatten())
        if su:
            problems.append(
                Problem(
                    "Saturation",
                    site,
                    severity=len(su) / width,
                    units=su,
                    evidence={"width": width, "fraction": cfg.saturation_fraction},
                )
            )
    nf = int(s.n_nonfinite.sum())
    if nf:
        problems.append(
            Problem("NonFinite", site, evidence={"count": nf, "where": site.node})
        )
    layer = LayerReport(
        site=site,
        kind="activation",
        activation=site.op,
        width=width,
        count=int(s.count.max()),
        mean=[float(x) for x in mean],
        var=[float(x) for x in var],
        dormancy=[float(x) for x in dorm],
        firing_rate=[float(x) for x in fire],
        saturated_fraction=[float(x) for x in satf],
        dead_fraction=float(dead.sum()) / width,
    )
    return problems, layer


def weight_of(node: ir.Node) -> tuple[ir.Value, np.ndarray] | None:
    """The constant weight of a MatMul/Gemm/Conv node as ``(value, 2-D (d_in, d_out) or
    (d_out, d_in*k) matrix)``, or None when it is not an initializer/constant."""
    if node.op_type not in LINEAR_PRODUCERS or len(node.inputs) < 2:
        return None
    w = node.inputs[1]
    arr = const_array(w)
    if w is None or arr is None:
        return None
    if arr.ndim < 2 or not np.issubdtype(arr.dtype, np.floating):
        return None
    if node.op_type in ("Conv", "ConvTranspose"):
        return w, arr.reshape(arr.shape[0], -1)
    if arr.ndim != 2:
        return None
    return w, arr


def numerical_rank(mat: np.ndarray, rtol: float | None) -> tuple[int, np.ndarray, float]:
    """Numerical rank of ``mat`` (float64 SVD): singular values ``<= rtol x sigma_max`` are
    zero; ``rtol`` defaults to ``max(shape) x eps(float32)``. Returns (rank, sigmas, rtol)."""
    tol = rtol if rtol is not None else max(mat.shape) * float(np.finfo(np.float32).eps)
    s = np.linalg.svd(mat.astype(np.float64), compute_uv=False)
    if s.size == 0 or s[0] == 0:
        return 0, s, tol
    return int((s > tol * s[0]).sum()), s, tol


def detect_bottlenecks(model: ir.Model, cfg: DiagnoseConfig) -> list[Problem]:
    """``Bottleneck`` problems for weights whose numerical rank is ``< rank_fraction x
    min(d_in, d_out)`` (weights narrower than ``min_rank_dim`` are skipped)."""
    out: list[Problem] = []
    for node in model.graph:
        wv = weight_of(node)
        if wv is None:
            continue
        w, mat = wv
        full = min(mat.shape)
        if full < cfg.min_rank_dim:
            continue
        rank, s, tol = numerical_rank(mat, cfg.rank_rtol)
        if rank < cfg.rank_fraction * full:
            stable = float((s**2).sum() / s[0] ** 2) if s.size and s[0] > 0 else 0.0
            out.append(
                Problem(
                    "Bottleneck",
                    Site(module=node.name or "", node=w.name or "", op=node.op_type, ir="onnx"),
                    severity=1.0 - rank / full,
                    evidence={
                        "rank": rank,
                        "max_rank": full,
                        "stable_rank": stable,
                        "rtol": tol,
                        "sigma_max": float(s[0]) if s.size else 0.0,
                        "sigma_dropped": float(s[rank]) if rank < s.size else 0.0,
                        "shape": list(mat.shape),
                    },
                )
            )
    return out

