"""Thresholds and knobs, in one place, with documented defaults."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any


@dataclass(frozen=True)
class DiagnoseConfig:
    """Configuration of :func:`graphsurg.diagnose` and of the ONNX analysis.

    Attributes:
        max_batches: at most this many batches of ``data`` are measured (None: all).
        dormant_tau: ReDo threshold (Sokar et al. 2023): a unit whose score
            ``mean|h_i| / mean_j mean|h_j|`` is ``<= dormant_tau`` is dormant.
        dead_var: a unit is *dead* (constant on the data) when its variance is ``<=
            dead_var * (1 + mean^2)`` -- relative to its magnitude, so float32 round-off of a
            constant never counts as variation -- and, for the ReLU family, it never fired.
        min_dead_units: a DeadNeurons problem is raised for a layer with at least this many
            dead units (never fired, constant on the data), or ...
        min_dormant_fraction: ... with at least this fraction of its units dormant. Freshly
            initialised healthy ReLU MLPs were measured with up to ~16% of a layer's units at
            ReDo score <= 0.1 (units that fire 1-10% of the time); a layer where a quarter
            of the units sleep, or any unit never fires, is broken.
        saturation_fraction: a tanh/sigmoid/hardtanh unit is saturated when it sits in the
            flat region for at least this fraction of inputs.
        saturation_margin: the flat region: ``|tanh| >= 1 - margin``, ``sigmoid <= margin``
            or ``>= 1 - margin``.
        vanishing_ratio / exploding_ratio: a layer's gradient norm below ``vanishing_ratio``
            x or above ``exploding_ratio`` x the median layer's. When both occur, the side
            that holds the output layer (where gradients enter) is not reported.
        vanishing_abs: an absolute gradient norm below this is vanishing regardless of the
            median.
        rank_fraction: flag a weight whose numerical rank is below ``rank_fraction x
            min(d_in, d_out)``.
        rank_rtol: numerical-rank tolerance: singular values ``<= rank_rtol x sigma_max``
            are zero (the default is ``max(d_in, d_out) x eps(float32)`` when None).
        effective_rank_energy: the activations' effective rank keeps this fraction of the
            spectral energy.
        rank_sample: rows of activations kept per site for the effective rank.
        min_rank_dim: layers narrower than this (min(d_in, d_out)) are not checked for rank.
        narrow_input_factor: a narrow layer loses information only when the information
            reaching it (the measured effective rank upstream, see
            ``graphsurg.detect.bottleneck``) is at least this many times its width ...
        narrow_saturation: ... and its own output's effective rank is at least this fraction
            of its width.
        dormant_every_layer: ReDo's policy: when some layer of the model is reported for
            dead or dormant units, every other ReLU-family layer with at least one dormant
            unit is reported too (its few dormant units get treated with the rest). Off by
            default: a healthy layer has a few rarely-firing units.
        min_unit_samples: dormancy and dead units are judged only at sites where every unit
            was observed at least this many times (a squeeze-excite layer sees one pooled
            vector per image: a few images say nothing about its units); skipped sites are
            named in the diagnosis notes.
        progress: show a progress bar (None: when stderr is a TTY).
        overfit_gap: with ``val_data=``, the model over-fits when the held-out loss exceeds
            ``(1 + overfit_gap) x`` the training loss ...
        overfit_min_delta: ... and the two differ by more than this (absolute).
        coadapt_corr: units co-adapt when ``|corr|`` over the sampled rows exceeds this; the
            over-fitting problem is localised to the layers that have such pairs.
        mixing_rank_fraction: a sequence value's positions have collapsed when their
            effective rank is at most this fraction of ``min(T - 1, d)`` (see
            ``graphsurg.detect.mixing``).
    """

    max_batches: int | None = 32
    dormant_tau: float = 0.1
    dead_var: float = 1e-10
    min_dead_units: int = 1
    min_dormant_fraction: float = 0.25
    saturation_fraction: float = 0.99
    saturation_margin: float = 0.01
    vanishing_ratio: float = 1e-3
    exploding_ratio: float = 1e3
    vanishing_abs: float = 1e-8
    rank_fraction: float = 0.5
    rank_rtol: float | None = None
    effective_rank_energy: float = 0.99
    rank_sample: int = 512
    min_rank_dim: int = 8
    narrow_input_factor: float = 2.0
    narrow_saturation: float = 0.75
    min_unit_samples: int = 32
    dormant_every_layer: bool = False
    progress: bool | None = None
    overfit_gap: float = 0.5
    overfit_min_delta: float = 1e-3
    coadapt_corr: float = 0.99
    mixing_rank_fraction: float = 0.1

    def replace(self, **changes: Any) -> DiagnoseConfig:
        names = {f.name for f in fields(self)}
        bad = sorted(set(changes) - names)
        if bad:
            raise ValueError(f"unknown DiagnoseConfig field(s) {bad}; known: {sorted(names)}")
        return replace(self, **changes)
