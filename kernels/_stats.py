"""Per-neuron activation statistics: the data type, merging, and the dispatching entry point.

Three paths compute the same statistics: the pure-torch reference (``_neuron_stats_torch``,
also the fallback), the compiled C kernel for CPU tensors (``_neuron_stats_cpu``), and the
Triton kernel for CUDA tensors (``_neuron_stats_triton``, imported lazily).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import torch

Backend = Literal["auto", "torch", "native", "chunked", "triton"]
_BACKENDS = ("auto", "torch", "native", "chunked", "triton")
_FIELDS = ("count", "mean", "m2", "abs_sum", "n_nonpos", "absmax", "n_nonfinite", "n_sat")


@dataclass
class NeuronStats:
    """Per-channel statistics of an activation, merged exactly across batches and ranks.

    All tensors have shape ``(C,)``. Counting fields are int64; moments are float32 for
    fp16/bf16/fp32 inputs and float64 for float64 inputs. Non-finite values are counted in
    ``n_nonfinite`` and excluded from every other field.

    Attributes:
        count: finite values seen per channel.
        mean, m2: running mean and sum of squared deviations (Welford/Chan).
        abs_sum: sum of |x| (for the ReDo dormancy score).
        n_nonpos: count of x <= 0 (for the firing rate).
        absmax: max |x|.
        n_nonfinite: count of NaN/Inf.
        n_sat: count of |x| >= ``sat_threshold`` (zeros when no threshold was given).
        sat_threshold: the threshold ``n_sat`` was counted at, or None.
        mean_residual: optional ``(C,)``, the rounding residual of ``mean``: the mean to
            float64 precision is ``mean + mean_residual``. Merges use it, so float32
            statistics of data far from zero (``x + 1e4``) keep merging exactly; None means 0.
    """

    count: torch.Tensor
    mean: torch.Tensor
    m2: torch.Tensor
    abs_sum: torch.Tensor
    n_nonpos: torch.Tensor
    absmax: torch.Tensor
    n_nonfinite: torch.Tensor
    n_sat: torch.Tensor
    sat_threshold: float | None = None
    mean_residual: torch.Tensor | None = None

    # -- construction ------------------------------------------------------------------
    @classmethod
    def empty(
        cls,
        channels: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        sat_threshold: float | None = None,
    ) -> NeuronStats:
        """Statistics of zero samples, the identity of :meth:`merge`."""
        if channels <= 0:
            raise ValueError(f"channels must be positive, got {channels}")
        z = torch.zeros(channels, dtype=dtype, device=device)
        zi = torch.zeros(channels, dtype=torch.int64, device=device)
        return cls(zi, z, z.clone(), z.clone(), zi.clone(), z.clone(), zi.clone(), zi.clone(),
                   sat_threshold)

    @property
    def channels(self) -> int:
        return int(self.mean.shape[0])

    # -- derived -----------------------------------------------------------------------
    @property
    def var(self) -> torch.Tensor:
        """Population variance per channel (0 where no sample was seen)."""
        return self.m2 / self.count.clamp_min(1).to(self.m2.dtype)

    @property
    def std(self) -> torch.Tensor:
        return self.var.sqrt()

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.abs_sum / self.count.clamp_min(1).to(self.abs_sum.dtype)

    @property
    def firing_rate(self) -> torch.Tensor:
        """Fraction of finite values > 0 per channel."""
        c = self.count.clamp_min(1).to(self.mean.dtype)
        return (self.count - self.n_nonpos).to(self.mean.dtype) / c

    @property
    def saturated_fraction(self) -> torch.Tensor:
        c = self.count.clamp_min(1).to(self.mean.dtype)
        return self.n_sat.to(self.mean.dtype) / c

    @property
    def dormancy_score(self) -> torch.Tensor:
        """ReDo score: a unit's mean |h| over the mean of its layer's units' mean |h|."""
        ma = self.mean_abs
        layer = ma.mean()
        if float(layer) == 0.0:
            return torch.zeros_like(ma)
        return ma / layer

    # -- merging -------------------------------------------------------------------------
    def merge(self, other: NeuronStats) -> NeuronStats:
        """Exact merge (Chan et al.): the statistics of the union of both samples."""
        if not isinstance(other, NeuronStats):
            raise TypeError(f"can only merge NeuronStats, got {type(other).__name__}")
        if other.channels != self.channels:
            raise ValueError(
                f"cannot merge statistics of different widths: other has {other.channels} "
                f"channels, this has {self.channels}"
            )
        if other.sat_threshold != self.sat_threshold:
            raise ValueError(
                f"cannot merge statistics counted at different sat_threshold: "
                f"{self.sat_threshold} vs {other.sat_threshold}"
            )
        dt = self.mean.dtype
        f64 = torch.float64
        dev = self.mean.device
        o = [getattr(other, f).to(device=dev) for f in _FIELDS]
        n = self.count + o[0]
        na = self.count.to(f64)
        nb = o[0].to(f64)
        nn = n.clamp_min(1).to(f64)
        mean_a = self.exact_mean()
        mean_b = other.exact_mean().to(dev)
        delta = mean_b - mean_a
        mean = mean_a + delta * (nb / nn)
        m2 = self.m2.to(f64) + o[2].to(f64) + delta * delta * (na * nb / nn)
        mean_dt = mean.to(dt)
        return NeuronStats(
            count=n,
            mean=mean_dt,
            m2=m2.to(dt),
            abs_sum=(self.abs_sum.to(f64) + o[3].to(f64)).to(dt),
            n_nonpos=self.n_nonpos + o[4],
            absmax=torch.maximum(self.absmax, o[5].to(dt)),
            n_nonfinite=self.n_nonfinite + o[6],
            n_sat=self.n_sat + o[7],
            sat_threshold=self.sat_threshold,
            mean_residual=(mean - mean_dt.to(f64)).to(dt),
        )

    def exact_mean(self) -> torch.Tensor:
        """``mean + mean_residual`` in float64, shape ``(C,)``."""
        m = self.mean.to(torch.float64)
        if self.mean_residual is not None:
            m = m + self.mean_residual.to(device=m.device, dtype=torch.float64)
        return m

    def update(
        self, x: torch.Tensor, channel_dim: int = -1, *, backend: Backend = "auto"
    ) -> NeuronStats:
        """Fold a batch into these statistics in place and return self."""
        merged = self.merge(
            neuron_stats(
                x, channel_dim=channel_dim, sat_threshold=self.sat_threshold, backend=backend
            )
        )
        for f in _FIELDS:
            setattr(self, f, getattr(merged, f))
        self.mean_residual = merged.mean_residual
        return self

    def all_reduce(self, group: object | None = None) -> NeuronStats:
        """Merge these statistics across all ranks of ``group`` (torch.distributed).

        Every rank ends with the statistics of the union of all ranks' samples. The exact
        merge is done from all-gathered per-rank statistics, in rank order, so every rank
        computes bit-identical results.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "NeuronStats.all_reduce needs an initialised torch.distributed process group; "
                "call torch.distributed.init_process_group first"
            )
        world = dist.get_world_size(group)  # type: ignore[arg-type]
        dt = self.mean.dtype
        packed = torch.stack(
            [getattr(self, f).to(torch.float64) for f in _FIELDS]
            + [self.exact_mean() - self.mean.to(torch.float64)]
        )
        gathered = [torch.empty_like(packed) for _ in range(world)]
        dist.all_gather(gathered, packed, group=group)  # type: ignore[arg-type]
        out: NeuronStats | None = None
        for g in gathered:
            fields = {
                f: g[i].to(torch.int64) if f.startswith("n") or f == "count" else g[i].to(dt)
                for i, f in enumerate(_FIELDS)
            }
            s = NeuronStats(
                **fields, sat_threshold=self.sat_threshold, mean_residual=g[len(_FIELDS)].to(dt)
            )
            out = s if out is None else out.merge(s)
        assert out is not None
        for f in _FIELDS:
            setattr(self, f, getattr(out, f))
        self.mean_residual = out.mean_residual
        return self

    def to(self, device: torch.device | str) -> NeuronStats:
        """A copy of these statistics on ``device``."""
        fields = {f: getattr(self, f).to(device) for f in _FIELDS}
        res = None if self.mean_residual is None else self.mean_residual.to(device)
        return NeuronStats(**fields, sat_threshold=self.sat_threshold, mean_residual=res)


def _check_input(x: torch.Tensor, channel_dim: int) -> int:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0:
        raise ValueError("x is 0-dimensional: pass an activation with a channel dimension")
    if not (x.is_floating_point()):
        raise ValueError(f"x has dtype {x.dtype}: neuron_stats needs a floating-point activation")
    if not -x.dim() <= channel_dim < x.dim():
        raise ValueError(
            f"channel_dim={channel_dim} is out of range for a {x.dim()}-d tensor of shape "
            f"{tuple(x.shape)}"
        )
    cd = channel_dim % x.dim()
    if x.shape[cd] == 0:
        raise ValueError(f"x has no channels (shape {tuple(x.shape)}, channel_dim={channel_dim})")
    if x.numel() == 0:
        raise ValueError(f"x is empty (shape {tuple(x.shape)}): pass at least one sample")
    return cd


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def neuron_stats(
    x: torch.Tensor,
    channel_dim: int = -1,
    *,
    sat_threshold: float | None = None,
    backend: Backend = "auto",
) -> NeuronStats:
    """Reduce ``x`` over every dimension except ``channel_dim``, in one pass.

    Args:
        x: a floating-point activation, e.g. ``(N, C)``, ``(N, T, C)``, or ``(N, C, H, W)``
            with ``channel_dim=1`` (channels-last memory works too, without a copy).
        channel_dim: the dimension that indexes neurons/channels.
        sat_threshold: if given, also count ``|x| >= sat_threshold`` per channel.
        backend: ``"auto"`` (Triton for CUDA tensors; on CPU the compiled C kernel when it
            could be built, else the chunked torch path), or one of ``"torch"`` (the pure-torch
            reference), ``"native"`` (the CPU C kernel), ``"chunked"`` (row-chunked eager
            torch, the fallback), ``"triton"`` (the Triton kernel; on a CPU tensor this needs
            ``TRITON_INTERPRET=1`` set before triton is imported).

    Returns:
        A :class:`NeuronStats` with ``C = x.shape[channel_dim]`` channels. ``x`` is not
        modified.

    Raises:
        ValueError: ``x`` is 0-dim, empty, not floating point, ``channel_dim`` is out of
            range, ``sat_threshold`` is NaN, or ``backend`` is unknown / cannot run here.

    Example:
        >>> s = neuron_stats(torch.randn(64, 8))
        >>> s.var.shape
        torch.Size([8])
    """
    cd = _check_input(x, channel_dim)
    if sat_threshold is not None and not (float(sat_threshold) == float(sat_threshold)):
        raise ValueError("sat_threshold is NaN: pass a number, or None to skip saturation")
    if backend not in _BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {_BACKENDS}")
    if backend == "auto":
        if x.is_cuda:
            backend = "triton"
        elif x.device.type == "cpu":
            from . import _neuron_stats_cpu as cpu

            backend = "native" if cpu.supports(x) and cpu.available() else "chunked"
        else:  # another device (mps, xpu, ...): the device-agnostic reference
            backend = "torch"
    with torch.no_grad():  # statistics are observations: never record an autograd graph
        return _dispatch(x, cd, sat_threshold, backend)


def _dispatch(
    x: torch.Tensor, cd: int, sat_threshold: float | None, backend: str
) -> NeuronStats:
    if backend == "triton":
        if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                "backend='triton' on a CPU tensor needs TRITON_INTERPRET=1 set before triton "
                "is imported; use backend='auto' or move x to a CUDA device"
            )
        from ._neuron_stats_triton import neuron_stats_triton

        return neuron_stats_triton(x, cd, sat_threshold)
    if backend == "native":
        return _neuron_stats_native(x, cd, sat_threshold)
    if backend == "chunked":
        if x.device.type != "cpu":
            raise ValueError(f"backend='chunked' is a CPU path; x is on {x.device}")
        from ._neuron_stats_chunked import raw_sums_chunked

        return _from_sums(x, *raw_sums_chunked(x, cd, sat_threshold), sat_threshold)
    return _neuron_stats_torch(x, cd, sat_threshold)


def _neuron_stats_native(x: torch.Tensor, cd: int, sat_threshold: float | None) -> NeuronStats:
    from . import _neuron_stats_cpu as cpu

    if not cpu.supports(x):
        raise ValueError(
            f"backend='native' runs on CPU tensors of float16/bfloat16/float32/float64, got a "
            f"{x.dtype} tensor on {x.device}"
        )
    if not cpu.available():
        raise ValueError(
            "backend='native' is unavailable: the C kernel could not be compiled here (no gcc, "
            "or GRAPHSURG_NO_NATIVE is set); use backend='auto' or 'torch'"
        )
    return _from_sums(x, *cpu.raw_sums(x, cd, sat_threshold), sat_threshold)


def _from_sums(
    x: torch.Tensor,
    pivot: torch.Tensor,
    sums: torch.Tensor,
    per_channel: int,
    sat_threshold: float | None,
) -> NeuronStats:
    """NeuronStats from shifted float64 sums (rows: sum d, sum d*d, sum|x|, max|x|, #x<=0,
    #|x|>=thr, #non-finite, with d = x - pivot over finite values)."""
    dt = acc_dtype(x.dtype)
    n_nonfinite = sums[6].to(torch.int64)
    count = per_channel - n_nonfinite
    c = count.clamp_min(1).to(torch.float64)
    s1 = sums[0]
    mean = pivot.to(torch.float64) + s1 / c
    mean_dt = mean.to(dt)
    return NeuronStats(
        count=count,
        mean=mean_dt,
        mean_residual=(mean - mean_dt.to(torch.float64)).to(dt),
        m2=(sums[1] - s1 * s1 / c).clamp_min(0).to(dt),
        abs_sum=sums[2].to(dt),
        n_nonpos=sums[4].to(torch.int64),
        absmax=sums[3].to(dt),
        n_nonfinite=n_nonfinite,
        n_sat=sums[5].to(torch.int64),
        sat_threshold=sat_threshold,
    )


def _neuron_stats_torch(x: torch.Tensor, cd: int, sat_threshold: float | None) -> NeuronStats:
    dt = acc_dtype(x.dtype)
    x2 = x.movedim(cd, -1).reshape(-1, x.shape[cd]).to(dt)
    finite = torch.isfinite(x2)
    n_nonfinite = (~finite).sum(0)
    if bool(n_nonfinite.any()):
        xz = torch.where(finite, x2, torch.zeros((), dtype=dt))
    else:
        xz = x2
    count = finite.sum(0)
    cnt = count.clamp_min(1).to(dt)
    mean64 = xz.sum(0, dtype=torch.float64) / cnt.to(torch.float64)
    mean = mean64.to(dt)
    residual = (mean64 - mean.to(torch.float64)).to(dt)
    # x - mean is exact for x near mean; subtracting the small residual after keeps the
    # deviations accurate even when float32 cannot hold the mean to the data's spread
    dev = torch.where(finite, (xz - mean) - residual, torch.zeros((), dtype=dt))
    m2 = (dev * dev).sum(0)
    a = xz.abs()
    n_nonpos = ((xz <= 0) & finite).sum(0)
    n_sat = (
        ((a >= sat_threshold) & finite).sum(0)
        if sat_threshold is not None
        else torch.zeros_like(count)
    )
    return NeuronStats(
        count=count,
        mean=mean,
        mean_residual=residual,
        m2=m2,
        abs_sum=a.sum(0),
        n_nonpos=n_nonpos,
        absmax=a.amax(0),
        n_nonfinite=n_nonfinite,
        n_sat=n_sat,
        sat_threshold=sat_threshold,
    )
