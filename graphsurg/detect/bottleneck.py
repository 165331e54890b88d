"""Bottleneck: collapsed weights and narrow layers that lose information.

* ``reason="rank"``: the weight's numerical rank (singular values above ``rtol x sigma_max``,
  ``rtol = max(d_in, d_out) x eps(float32)`` by default) is below ``rank_fraction x
  min(d_in, d_out)``. The stable rank ``||W||_F^2 / sigma_max^2`` and the effective rank of the
  layer's activations (the number of singular values holding ``effective_rank_energy`` of a
  sample's spectral energy) are reported as evidence.
* ``reason="narrow"``: a thin layer between wide ones (Net2Net's case) *that measurably loses
  information*. Narrow by shape alone is design (an inverted-residual or ResNet bottleneck,
  a squeeze-excite reduction, one key/value head, a 4h->h projection), so all four must hold:

  1. shape: the width is below ``rank_fraction x`` the narrower of its own input width and
     its next layers' widths;
  2. no parallel path: the layer is not *bypassed* (``LayerMeasure.bypassed``: no residual
     add, gate/excite multiply, concat or sibling branch joins its output with data that does
     not pass through it -- information flows around such a layer);
  3. information arrives: the *input information* is at least ``narrow_input_factor x`` the
     width. It is measured, not read from shapes: each layer's *information* is the
     effective rank of its output sample, capped by its input information (data processing:
     a layer cannot create information); the input information of a layer is the largest
     information among the layers feeding it (the first layer: its input's dimension, for a
     Linear ``d_in``). A projection fed, through an expansion, by a stream narrower than
     itself (MobileNetV2's linear bottleneck) receives no more than that stream carried;
  4. the layer is full: its output's effective rank is at least ``narrow_saturation x`` its
     width (a narrow layer whose own output does not use its width is not what limits it).

  A narrow layer without an output sample (hooks capture) is not judged. Evidence adds
  ``input_rank`` (input information), ``output_rank`` and ``bypassed``.

Layers narrower than ``min_rank_dim`` are not rank-checked (a 4x4 weight is what it is).
The SVD runs only where three cheaper certificates fail: the stable rank (a lower bound on the
numerical rank, from power iteration), a Cholesky factorisation of ``k`` rows' Gram matrix
(``rows_certified``) and the whole Gram matrix's spectrum (``rank_certified``). The
activations' effective ranks feed only the narrow rule: they are computed only when a layer
is narrow by shape, not bypassed and could receive enough information (rules 1-3 on upper
bounds), so a model with no narrow layer costs no sample SVD.
"""

from __future__ import annotations

import math

import torch

from graphsurg._config import DiagnoseConfig
from graphsurg._problems import Problem, Site

from . import LayerMeasure, Measurements


def effective_rank(sample: torch.Tensor, energy: float) -> int:
    """Number of singular values of the centred sample holding ``energy`` of the energy.

    Rows with a non-finite value are left out (NonFinite reports them); no finite row: 0.
    The squared singular values are the eigenvalues of the smaller Gram matrix, in float64
    (a third of an SVD's cost; the energy fractions are exact to ~1e-15 of the total)."""
    x = sample.double()
    x = x[torch.isfinite(x).all(dim=1)] if x.dim() == 2 else x
    if x.numel() == 0:
        return 0
    x = x - x.mean(0, keepdim=True)
    if x.dim() != 2:
        s2 = torch.linalg.svdvals(x).pow(2)
    else:
        g = x @ x.T if x.shape[0] <= x.shape[1] else x.T @ x
        s2 = torch.linalg.eigvalsh(g).flip(0).clamp_min(0.0)  # descending, as svdvals
    total = float(s2.sum())
    if total <= 0:
        return 0
    c = torch.cumsum(s2, 0) / total
    return int((c < energy).sum()) + 1


def weight_ranks(w: torch.Tensor, rtol: float | None) -> tuple[int, float, int]:
    """(numerical rank, stable rank, max rank) of a weight viewed as (d_out, -1)."""
    w2 = w.detach().reshape(w.shape[0], -1).float()
    max_rank = min(w2.shape)
    s = torch.linalg.svdvals(w2)
    smax = float(s[0]) if s.numel() else 0.0
    if smax == 0.0:
        return 0, 0.0, max_rank
    tol = (rtol if rtol is not None else max(w2.shape) * torch.finfo(torch.float32).eps) * smax
    rank = int((s > tol).sum())
    stable = float(s.pow(2).sum()) / smax**2
    return rank, stable, max_rank


def _sigma_max_estimate(w2: torch.Tensor, iters: int = 20) -> float:
    """sigma_max of the 2-D float ``w2`` by power iteration from a fixed random start: never
    above sigma_max; below sigma_max / 2 only with probability ~1e-11 for a 3072-wide weight
    (Kuczynski-Wozniakowski: P(relative error of the Rayleigh quotient > e) <=
    1.65 sqrt(n) exp(-e (2 iters - 1)))."""
    g = torch.Generator(device=w2.device).manual_seed(0)
    v = torch.randn(w2.shape[1], generator=g, device=w2.device, dtype=w2.dtype)
    smax = 0.0
    for _ in range(iters):
        u = w2 @ v
        v = w2.T @ u
        n = float(v.norm())
        if n == 0:
            return 0.0
        v = v / n
        smax = math.sqrt(n)
    return smax


def stable_rank_fast(w: torch.Tensor, iters: int = 20) -> float:
    """||W||_F^2 / sigma_max^2 with sigma_max from power iteration (a lower bound on rank)."""
    w2 = w.detach().reshape(w.shape[0], -1).float()
    smax = _sigma_max_estimate(w2, iters)
    fro = float(w2.pow(2).sum())
    # power iteration underestimates sigma_max: inflate it slightly to keep a true lower bound
    return fro / (1.02 * smax) ** 2 if smax > 0 else 0.0


def _margin(shape: tuple[int, ...], rtol: float | None) -> float:
    """The certificates' threshold on ``sigma_k / sigma_max``: 1e-2, or 10x the rank
    tolerance if larger (far above float32 noise and above the tolerance)."""
    tol = rtol if rtol is not None else max(shape) * torch.finfo(torch.float32).eps
    return max(1e-2, 10 * tol)


def rows_certified(w: torch.Tensor, k: int, rtol: float | None) -> bool:
    """True when ``k`` rows of ``w`` (of its wide orientation) already show that ``w`` has at
    least ``k`` singular values above the rank tolerance -- the cheapest certificate.

    Interlacing: the ``k``-th singular value of ``w`` is at least the smallest singular value
    of any ``k`` of its rows. That one is certified at least ``margin x`` an upper bound of
    sigma_max (the smaller of ||W||_F and twice the power-iteration estimate) by a Cholesky
    factorisation of the rows' ``k x k`` Gram matrix minus that square, in float64 (its
    round-off, ~k eps ||G||, is far below the margin). A random or trained full-rank weight
    passes at ~k^2 n / 3 of the multiply-adds of :func:`rank_certified` and without an
    eigensolver; a weight it cannot certify goes on to :func:`rank_certified`."""
    w2 = w.detach().reshape(w.shape[0], -1)
    if w2.shape[0] > w2.shape[1]:
        w2 = w2.T
    if k <= 0:
        return True
    if k > w2.shape[0]:
        return False
    margin = _margin(tuple(w2.shape), rtol)
    if margin >= 0.5:
        return False
    wf = w2.float()
    bound = min(float(wf.norm()), 2.0 * _sigma_max_estimate(wf))
    if bound <= 0.0:
        return False
    sub = w2[:k].double()
    g = sub @ sub.T
    g.diagonal().sub_((margin * bound) ** 2)
    _, info = torch.linalg.cholesky_ex(g)
    return int(info) == 0


def rank_certified(w: torch.Tensor, k: int, rtol: float | None) -> bool:
    """True when ``w`` certainly has at least ``k`` singular values above the rank tolerance.

    Half the cost of an SVD: the eigenvalues of the smaller Gram matrix are the squared
    singular values. In float32 the Gram resolves singular values down to about
    ``sqrt(eps) x sigma_max`` (3.5e-4), so the test asks for ``sigma_k >= margin x sigma_max``
    with a margin of 1e-2 (or 10x the rank tolerance, if larger): far above that noise floor
    and above the tolerance. Weights near the threshold fall through to the exact SVD.
    """
    w2 = w.detach().reshape(w.shape[0], -1).float()
    m = min(w2.shape)
    if k <= 0:
        return True
    if k > m:
        return False
    margin = _margin(tuple(w2.shape), rtol)
    if margin >= 0.5:
        return False
    g = w2 @ w2.T if w2.shape[0] <= w2.shape[1] else w2.T @ w2
    ev = torch.linalg.eigvalsh(g)  # ascending: ev[-k] is sigma_k^2
    top = float(ev[-1])
    return top > 0 and float(ev[-k]) >= margin * margin * top


def detect_bottlenecks(m: Measurements, config: DiagnoseConfig) -> list[Problem]:
    out: list[Problem] = []
    layers = sorted(m.layers, key=lambda lm: lm.order)
    sample_of: dict[str, torch.Tensor | None] = {
        s.module: s.sample for s in m.sites if s.sample is not None
    }
    flow = _Flow(layers, config, sample_of)
    for lm in layers:
        problem = (_rank_problem(lm, config, sample_of, m.ir)
                   or _narrow_problem(lm, flow, config, m.ir))
        if problem is not None:
            out.append(problem)
    return out


class _Flow:
    """Per layer: its output's effective rank and the information reaching it (see the module
    docstring, narrow rule 3). Layers are visited in forward order, so a layer's feeders are
    known before it (a feeder found later, in a loop, is ignored).

    The effective ranks (one sample SVD each) are computed only when needed: a first pass
    propagates the upper bound that takes every output rank as its width; only when some
    layer is narrow by shape, not bypassed and receives enough information by that bound
    is the exact pass run."""

    def __init__(self, layers: list[LayerMeasure], config: DiagnoseConfig,
                 sample_of: dict[str, torch.Tensor | None]) -> None:
        self.width = {lm.module: lm.d_out for lm in layers}
        self.feeders: dict[str, list[str]] = {lm.module: [] for lm in layers}
        for lm in layers:
            for n in lm.next_modules:
                if n in self.feeders and lm.module not in self.feeders[n]:
                    self.feeders[n].append(lm.module)
        self.output_rank: dict[str, int | None] = {}
        self.input_info: dict[str, int] = {}
        self._pass(layers, config, sample_of, exact=False)
        if any(self._may_be_narrow(lm, config) for lm in layers):
            self._pass(layers, config, sample_of, exact=True)

    def _pass(self, layers: list[LayerMeasure], config: DiagnoseConfig,
              sample_of: dict[str, torch.Tensor | None], *, exact: bool) -> None:
        info: dict[str, int] = {}
        for lm in layers:
            s = sample_of.get(lm.module)
            r = (effective_rank(s, config.effective_rank_energy)
                 if exact and s is not None and s.dim() == 2 and s.shape[0] >= 2
                 and bool(torch.isfinite(s).all()) else None)
            self.output_rank[lm.module] = r
            if not exact and s is not None and s.dim() == 2:  # rank <= the sample's width
                r = max(lm.d_out, int(s.shape[1]))
            fed = [info[f] for f in self.feeders[lm.module] if f in info]
            if fed:
                inp = max(fed)
            elif lm.weight is not None:
                inp = int(lm.weight[0].numel())
            else:
                inp = lm.d_in
            if lm.kind == "linear":
                inp = min(inp, lm.d_in)
            self.input_info[lm.module] = inp
            info[lm.module] = min(inp, r if r is not None else lm.d_out)

    def _may_be_narrow(self, lm: LayerMeasure, config: DiagnoseConfig) -> bool:
        """Narrow rules 1-3 on the upper bounds (an effective rank is at most the width)."""
        nxt = [self.width[n] for n in lm.next_modules if n in self.width]
        if not nxt or lm.bypassed:
            return False
        if lm.d_out >= config.rank_fraction * min(lm.d_in, min(nxt)):
            return False
        return self.input_info[lm.module] >= config.narrow_input_factor * lm.d_out


def _activation_rank(lm: LayerMeasure, config: DiagnoseConfig,
                     sample_of: dict[str, torch.Tensor | None]) -> int | None:
    s = sample_of.get(lm.module)
    if s is None or s.shape[0] < 2 or not bool(torch.isfinite(s).all()):
        return None
    return effective_rank(s, config.effective_rank_energy)


def _rank_problem(lm: LayerMeasure, config: DiagnoseConfig,
                  sample_of: dict[str, torch.Tensor | None], ir: str) -> Problem | None:
    if lm.weight is None or lm.kind == "conv_transpose":
        return None
    if not bool(torch.isfinite(lm.weight).all()):
        return None  # NonFinite reports it
    max_rank = min(lm.d_out, lm.weight[0].numel())
    if max_rank < config.min_rank_dim:
        return None
    threshold = config.rank_fraction * max_rank
    if stable_rank_fast(lm.weight) >= threshold:
        return None  # stable rank <= numerical rank: healthy without an SVD
    if rows_certified(lm.weight, math.ceil(threshold), config.rank_rtol):
        return None  # k rows already hold k large singular values: no eigensolver
    if rank_certified(lm.weight, math.ceil(threshold), config.rank_rtol):
        return None  # the Gram spectrum already shows enough large singular values
    rank, stable, max_rank = weight_ranks(lm.weight, config.rank_rtol)
    if rank >= threshold:
        return None
    return Problem(
        "Bottleneck",
        Site(lm.module, "", lm.kind, ir=ir),
        severity=1.0 - rank / max_rank,
        evidence={
            "reason": "rank", "rank": rank, "max_rank": max_rank, "stable_rank": stable,
            "effective_rank": _activation_rank(lm, config, sample_of),
            "d_in": lm.d_in, "d_out": lm.d_out, "threshold": threshold,
        },
    )


def _narrow_problem(lm: LayerMeasure, flow: _Flow, config: DiagnoseConfig,
                    ir: str) -> Problem | None:
    nxt = [flow.width[n] for n in lm.next_modules if n in flow.width]
    if not nxt:
        return None
    around = min(lm.d_in, min(nxt))
    if lm.d_out >= config.rank_fraction * around:
        return None  # 1. not narrow by shape
    if lm.bypassed:
        return None  # 2. information flows around it
    input_rank = flow.input_info[lm.module]
    if input_rank < config.narrow_input_factor * lm.d_out:
        return None  # 3. no more information arrives than it can pass
    output_rank = flow.output_rank[lm.module]
    if output_rank is None or output_rank < config.narrow_saturation * lm.d_out:
        return None  # 4. not measured, or its own width is not used
    return Problem(
        "Bottleneck",
        Site(lm.module, "", lm.kind, ir=ir),
        severity=1.0 - lm.d_out / around,
        evidence={
            "reason": "narrow", "rank": lm.d_out, "max_rank": around, "width": lm.d_out,
            "stable_rank": None, "effective_rank": output_rank, "output_rank": output_rank,
            "input_rank": input_rank, "bypassed": lm.bypassed,
            "d_in": lm.d_in, "d_out": lm.d_out, "neighbour_width": around,
            "threshold": config.rank_fraction * around,
        },
    )
