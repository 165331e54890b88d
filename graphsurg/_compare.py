"""The one output-change measure, for both IRs: ``||f' - f|| / ||f||`` in float64.

Outputs are sequences of arrays (torch tensors or numpy arrays, one per output per batch).
A comparison that cannot be made honestly fails (``rel = inf``); it never passes by default:

* shapes or counts differ;
* the new output is non-finite where the reference is finite;
* the reference is non-finite where the new output differs from it (NaN matches NaN, an
  infinity matches the same infinity);
* the reference has no finite floating value at all (nothing was compared).

Integer and boolean outputs must be equal.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Change:
    """How far new outputs are from a reference.

    Attributes:
        rel: ``||new - old|| / ||ref||`` over every finite floating value (``inf``: failed).
        max_abs: the largest absolute difference.
        max_rel: ``max_abs / max |ref|``.
        compared: how many floating values were compared.
        reason: why the comparison failed (empty when it did not).
    """

    rel: float
    max_abs: float = 0.0
    max_rel: float = 0.0
    compared: int = 0
    reason: str = ""

    def within(self, bound: float) -> bool:
        return math.isfinite(self.rel) and self.rel <= bound


def _fail(reason: str) -> Change:
    return Change(math.inf, math.inf, math.inf, 0, reason)


def _np(a: Any) -> np.ndarray:
    if hasattr(a, "detach"):  # torch.Tensor without importing torch here
        a = a.detach().cpu()
        if str(a.dtype) == "torch.bfloat16":
            a = a.float()
        return a.numpy()
    return np.asarray(a)


def output_change(new: Sequence[Any], old: Sequence[Any], ref: Sequence[Any] | None = None
                  ) -> Change:
    """Compare ``new`` with ``old`` relative to ``ref`` (default ``old``); see the module doc."""
    ref = old if ref is None else ref
    if not (len(new) == len(old) == len(ref)):
        return _fail(f"{len(new)} outputs against {len(old)}")
    num = den = 0.0
    max_abs = ref_max = 0.0
    compared = 0
    for a_, b_, r_ in zip(new, old, ref, strict=True):
        a, b, r = _np(a_), _np(b_), _np(r_)
        if a.shape != b.shape or b.shape != r.shape:
            return _fail(f"output shape {a.shape} against {b.shape}")
        if not np.issubdtype(b.dtype, np.floating):
            if not np.array_equal(a, b):
                return _fail("a non-floating output changed")
            continue
        a64, b64, r64 = a.astype(np.float64), b.astype(np.float64), r.astype(np.float64)
        fin = np.isfinite(b64) & np.isfinite(r64)
        if not np.array_equal(a64[~fin], b64[~fin], equal_nan=True):
            return _fail("the output differs where the reference is not finite")
        if not np.isfinite(a64[fin]).all():
            return _fail("the output is not finite where the reference is")
        d = a64[fin] - b64[fin]
        rf = r64[fin]
        compared += int(d.size)
        num += float((d * d).sum())
        den += float((rf * rf).sum())
        if d.size:
            max_abs = max(max_abs, float(np.abs(d).max()))
            ref_max = max(ref_max, float(np.abs(rf).max()))
    if compared == 0 and any(np.issubdtype(_np(b).dtype, np.floating) for b in old):
        return _fail("the reference has no finite value to compare against")
    if not math.isfinite(num):
        return _fail("the difference overflows")
    rel = math.sqrt(num) / max(math.sqrt(den), 1e-30) if num else 0.0
    max_rel = max_abs / ref_max if ref_max > 0 else (0.0 if max_abs == 0 else math.inf)
    return Change(rel, max_abs, max_rel, compared)


__all__ = ["Change", "output_change"]
