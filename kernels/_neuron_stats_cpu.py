"""The tuned CPU path of ``neuron_stats``: one pass over ``x`` in a small C kernel.

Why C and not a torch extension: ``torch.utils.cpp_extension.load_inline`` compiles against
the torch headers (about a minute on two cores), which would make the first test run slow.
This kernel needs nothing from torch: it is plain C, compiled with the system ``gcc`` in about
a second on first use, cached on disk keyed by its source, compiler flags and the CPU's
feature flags (it is built with ``-march=native``), and called through ``ctypes`` (which
releases the GIL, so Python threads run it in parallel: the rows, or channels, are cut into
about 8 tasks per thread that the threads pull in turn). When ``gcc`` is missing or
compiling fails, :func:`available` is False and ``neuron_stats`` uses the chunked torch path
-- no error, no warning. Set ``GRAPHSURG_NO_NATIVE=1`` to disable it, ``GRAPHSURG_CACHE`` to
move the cache.

Layouts read without a copy: rows ``(R, C)`` with any row stride and unit channel stride
(``(N, C)``, ``(N, T, C)``, channels-last), a transposed matrix, and ``(N, C, L)`` with
contiguous ``L`` (NCHW; short ``C*L`` blocks are read as rows of ``C*L`` and folded).

Numerics. Each channel is shifted by a pivot (the finite mean of the first few rows), so
the sums of ``d = x - pivot`` and ``d*d`` are well conditioned even at ``x + 1e4``. The
kernel accumulates those sums in the input's accumulation type (float32 for fp16/bf16/fp32)
per lane over at most 64 rows (``ROW_TILE``) and then adds them into float64 per-channel
totals, so rounding error does not grow with the batch size. Threads
share the pivot, so their float64 totals add exactly as sums. Non-finite values are counted
and contribute nothing else.

Range. The pivot is averaged in float64 (64 values near 3.4e38 overflow a float32 sum), so
it is a finite value of the input's type. A float32 lane can still overflow on data near the
top of float32's range (``d*d`` above 3.4e38 needs only ``|d| > 1.8e19``); an overflow cannot
come back to a finite number, so a channel whose float64 totals are not finite after the
pass (non-finite inputs are masked and never reach them) is recomputed exactly in float64 by
:func:`~graphsurg.kernels._neuron_stats_chunked.repair_overflow`. Clean data pays one
``isfinite`` over ``3*C`` totals; the C kernel runs as fast as before.
"""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from ._layout import as_3d, pivot_of
from ._neuron_stats_chunked import repair_overflow

# Output layout: 7 float64 arrays of C channels, in this order.
_S1, _S2, _ABS, _MAX, _NONPOS, _SAT, _NONFIN = range(7)

_C_SOURCE = r"""
#include <stdint.h>
#include <float.h>

#define ROW_TILE 64
#define CH_BLOCK 256
#define SEG_FLUSH 16384

static inline float ld_f32(const float *p) { return *p; }
static inline double ld_f64(const double *p) { return *p; }
static inline float ld_bf16(const uint16_t *p) {
    uint32_t u = ((uint32_t)*p) << 16; float f; __builtin_memcpy(&f, &u, 4); return f;
}
/* half -> float with integer ops only (vectorizes everywhere; a plain _Float16 conversion
   becomes a libgcc call per element on CPUs without AVX512-FP16): shift the exponent and
   mantissa into place, rescale by 2^112 (bias 127 - 15; also normalises subnormals), and
   rebuild inf/NaN. */
static inline float ld_f16(const uint16_t *p) {
    uint32_t h = *p, em = h & 0x7fffu;
    uint32_t bits = em << 13; float f; __builtin_memcpy(&f, &bits, 4); f *= 0x1p112f;
    uint32_t r; __builtin_memcpy(&r, &f, 4);
    r = em >= 0x7c00u ? (bits | 0x7f800000u) : r;
    r |= (h & 0x8000u) << 16;
    __builtin_memcpy(&f, &r, 4); return f;
}

/* One row of cb channels into per-channel accumulators (a loop gcc vectorizes). */
#define DEF_UPD(NAME, T, ACC, LD, MAXV)                                                    \
static inline void upd_##NAME(const T *restrict row, const ACC *restrict pv, int64_t cb, \
                              ACC thr, ACC *restrict s1, ACC *restrict s2,               \
                              ACC *restrict ab, ACC *restrict mx, ACC *restrict np,      \
                              ACC *restrict st, ACC *restrict nf) {                      \
    for (int64_t j = 0; j < cb; ++j) {                                                   \
        ACC v = LD(row + j);                                                             \
        ACC a = v < 0 ? -v : v;                                                          \
        int fin = a <= MAXV;                                                             \
        ACC d = fin ? v - pv[j] : (ACC)0;                                                \
        a = fin ? a : (ACC)0;                                                            \
        s1[j] += d; s2[j] += d * d; ab[j] += a;                                          \
        mx[j] = a > mx[j] ? a : mx[j];                                                   \
        np[j] += (fin & (v <= 0)) ? (ACC)1 : (ACC)0;                                     \
        st[j] += (fin & (a >= thr)) ? (ACC)1 : (ACC)0;                                   \
        nf[j] += fin ? (ACC)0 : (ACC)1;                                                  \
    }                                                                                    \
}

/* float32/float64 rows: register-blocked with gcc vector types (portable; lowered to the
   machine's SIMD). Two 64-byte vectors of channels, 7 accumulators each, stay in registers
   across a tile of rows and are flushed to the float64 totals once per tile. About 10% less
   CPU time than the array loop below, which handles the channel tail and fp16/bf16 (whose
   vector conversions measured slower). */
typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef double vd __attribute__((vector_size(64)));
typedef int64_t vl __attribute__((vector_size(64)));

static inline vf ldv_f32(const float *p) { vf v; __builtin_memcpy(&v, p, 64); return v; }
static inline vd ldv_f64(const double *p) { vd v; __builtin_memcpy(&v, p, 64); return v; }
#define DEF_ROWSV(NAME, T, ACC, V, IV, LDV, MAXV, ABSMASK)                                  \
static void rowsv_##NAME(const T *x, int64_t rt, int64_t cv, int64_t sR, const ACC *pivot, \
                         ACC thr_s, int64_t C, double *out) {                             \
    enum { VL = 64 / sizeof(ACC) };                                                       \
    const V zero = {0}; const V one = zero + 1; const V thr = zero + thr_s;               \
    const V maxv = zero + MAXV; const IV absm = (IV){0} + ABSMASK;                         \
    for (int64_t c0 = 0; c0 < cv; c0 += 2 * VL) {                                         \
        V p0, p1; __builtin_memcpy(&p0, pivot + c0, 64); __builtin_memcpy(&p1, pivot + c0 + VL, 64); \
        V s1a = zero, s2a = zero, aba = zero, mxa = zero, npa = zero, sta = zero, nfa = zero; \
        V s1b = zero, s2b = zero, abb = zero, mxb = zero, npb = zero, stb = zero, nfb = zero; \
        for (int64_t r = 0; r < rt; ++r) {                                                \
            const T *row = x + r * sR + c0;                                               \
            V v0 = LDV(row), v1 = LDV(row + VL);                                          \
            V a0 = (V)((IV)v0 & absm), a1 = (V)((IV)v1 & absm);                           \
            IV f0 = a0 <= maxv, f1 = a1 <= maxv;                                          \
            V d0 = (V)((IV)(v0 - p0) & f0), d1 = (V)((IV)(v1 - p1) & f1);                 \
            a0 = (V)((IV)a0 & f0); a1 = (V)((IV)a1 & f1);                                 \
            s1a += d0; s1b += d1; s2a += d0 * d0; s2b += d1 * d1; aba += a0; abb += a1;   \
            IV g0 = a0 > mxa, g1 = a1 > mxb;                                              \
            mxa = (V)(((IV)a0 & g0) | ((IV)mxa & ~g0));                                   \
            mxb = (V)(((IV)a1 & g1) | ((IV)mxb & ~g1));                                   \
            npa += (V)((IV)one & (f0 & (v0 <= zero)));                                    \
            npb += (V)((IV)one & (f1 & (v1 <= zero)));                                    \
            sta += (V)((IV)one & (f0 & (a0 >= thr)));                                     \
            stb += (V)((IV)one & (f1 & (a1 >= thr)));                                     \
            nfa += (V)((IV)one & ~f0); nfb += (V)((IV)one & ~f1);                         \
        }                                                                                 \
        double *o = out + c0;                                                             \
        for (int k = 0; k < VL; ++k) {                                                    \
            o[k] += s1a[k]; o[C + k] += s2a[k]; o[2 * C + k] += aba[k];                   \
            o[3 * C + k] = o[3 * C + k] > mxa[k] ? o[3 * C + k] : mxa[k];                 \
            o[4 * C + k] += npa[k]; o[5 * C + k] += sta[k]; o[6 * C + k] += nfa[k];       \
            o[VL + k] += s1b[k]; o[C + VL + k] += s2b[k]; o[2 * C + VL + k] += abb[k];    \
            o[3 * C + VL + k] = o[3 * C + VL + k] > mxb[k] ? o[3 * C + VL + k] : mxb[k];  \
            o[4 * C + VL + k] += npb[k]; o[5 * C + VL + k] += stb[k];                     \
            o[6 * C + VL + k] += nfb[k];                                                  \
        }                                                                                 \
    }                                                                                     \
}
DEF_ROWSV(f32, float, float, vf, vi, ldv_f32, FLT_MAX, 0x7fffffff)
DEF_ROWSV(f64, double, double, vd, vl, ldv_f64, DBL_MAX, 0x7fffffffffffffffLL)

/* x: (R, C) rows with row stride sR (elements), channel stride 1.
   out: 7*C doubles (s1, s2, abs, absmax, nonpos, sat, nonfinite), accumulated into. */
#define DEF_ROWS(NAME, T, ACC)                                                             \
void stats_rows_##NAME(const T *x, int64_t R, int64_t C, int64_t sR, const ACC *pivot,   \
                       double thr_d, double *out) {                                      \
    ACC s1[CH_BLOCK], s2[CH_BLOCK], ab[CH_BLOCK], mx[CH_BLOCK], np[CH_BLOCK],              \
        st[CH_BLOCK], nf[CH_BLOCK];                                                      \
    const ACC thr = (ACC)thr_d;                                                          \
    for (int64_t r0 = 0; r0 < R; r0 += ROW_TILE) {                                       \
        int64_t rt = R - r0 < ROW_TILE ? R - r0 : ROW_TILE;                              \
        int64_t cv = 0;                                                                  \
        ROWSV_##NAME(cv = C / (128 / (int64_t)sizeof(ACC)) * (128 / (int64_t)sizeof(ACC));  \
                     rowsv_##NAME(x + r0 * sR, rt, cv, sR, pivot, thr, C, out);)          \
        for (int64_t c0 = cv; c0 < C; c0 += CH_BLOCK) {                                  \
            int64_t cb = C - c0 < CH_BLOCK ? C - c0 : CH_BLOCK;                          \
            for (int64_t j = 0; j < cb; ++j) {                                           \
                s1[j] = 0; s2[j] = 0; ab[j] = 0; mx[j] = 0; np[j] = 0; st[j] = 0; nf[j] = 0; \
            }                                                                            \
            for (int64_t r = 0; r < rt; ++r)                                             \
                upd_##NAME(x + (r0 + r) * sR + c0, pivot + c0, cb, thr,                  \
                           s1, s2, ab, mx, np, st, nf);                                  \
            double *o = out + c0;                                                        \
            for (int64_t j = 0; j < cb; ++j) {                                           \
                o[0 * C + j] += s1[j]; o[1 * C + j] += s2[j]; o[2 * C + j] += ab[j];     \
                o[3 * C + j] = o[3 * C + j] > mx[j] ? o[3 * C + j] : mx[j];              \
                o[4 * C + j] += np[j]; o[5 * C + j] += st[j]; o[6 * C + j] += nf[j];     \
            }                                                                            \
        }                                                                                \
    }                                                                                    \
}

/* x: (O, C, I) with strides (sO, sC, 1): each (o, c) is a contiguous segment of I values,
   read as rows of CH_BLOCK lanes that all use the channel's pivot; the lanes are folded into
   float64 totals every ROW_TILE rows. */
#define DEF_INNER(NAME, T, ACC)                                                            \
void stats_inner_##NAME(const T *x, int64_t O, int64_t C, int64_t I, int64_t sO,          \
                        int64_t sC, const ACC *pivot, double thr_d, double *out) {       \
    ACC s1[CH_BLOCK], s2[CH_BLOCK], ab[CH_BLOCK], mx[CH_BLOCK], np[CH_BLOCK],              \
        st[CH_BLOCK], nf[CH_BLOCK], pv[CH_BLOCK];                                        \
    const ACC thr = (ACC)thr_d;                                                          \
    const int64_t w = I < CH_BLOCK ? I : CH_BLOCK;                                       \
    for (int64_t c = 0; c < C; ++c) {                                                    \
        for (int64_t j = 0; j < CH_BLOCK; ++j) pv[j] = pivot[c];                         \
        double t1 = 0, t2 = 0, ta = 0, tn = 0, ts = 0, tf = 0; ACC tm = 0;               \
        int64_t rows = ROW_TILE;                                                         \
        for (int64_t o = 0; o <= O; ++o) {                                               \
            for (int64_t i = 0; o == O || i < I; i += CH_BLOCK) {                        \
                if (rows >= ROW_TILE || o == O) {                                        \
                    if (o > 0 || i > 0) {                                                \
                        for (int64_t j = 0; j < w; ++j) {                                \
                            t1 += s1[j]; t2 += s2[j]; ta += ab[j]; tn += np[j];          \
                            ts += st[j]; tf += nf[j]; tm = mx[j] > tm ? mx[j] : tm;      \
                        }                                                                \
                    }                                                                    \
                    if (o == O) break;                                                   \
                    for (int64_t j = 0; j < w; ++j) {                                    \
                        s1[j] = 0; s2[j] = 0; ab[j] = 0; mx[j] = 0; np[j] = 0; st[j] = 0; \
                        nf[j] = 0;                                                       \
                    }                                                                    \
                    rows = 0;                                                            \
                }                                                                        \
                int64_t cb = I - i < CH_BLOCK ? I - i : CH_BLOCK;                        \
                upd_##NAME(x + o * sO + c * sC + i, pv, cb, thr, s1, s2, ab, mx, np, st, nf); \
                ++rows;                                                                  \
            }                                                                            \
        }                                                                                \
        out[0 * C + c] += t1; out[1 * C + c] += t2; out[2 * C + c] += ta;                \
        out[3 * C + c] = out[3 * C + c] > tm ? out[3 * C + c] : tm;                      \
        out[4 * C + c] += tn; out[5 * C + c] += ts; out[6 * C + c] += tf;                \
    }                                                                                    \
}

#define ROWSV_f32(...) __VA_ARGS__
#define ROWSV_f64(...) __VA_ARGS__
#define ROWSV_bf16(...)
#define ROWSV_f16(...)

#define DEF_ALL(NAME, T, ACC, LD, MAXV) \
    DEF_UPD(NAME, T, ACC, LD, MAXV) DEF_ROWS(NAME, T, ACC) DEF_INNER(NAME, T, ACC)

DEF_ALL(f32, float, float, ld_f32, FLT_MAX)
DEF_ALL(f64, double, double, ld_f64, DBL_MAX)
DEF_ALL(bf16, uint16_t, float, ld_bf16, FLT_MAX)
DEF_ALL(f16, uint16_t, float, ld_f16, FLT_MAX)
"""

_FLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-fno-math-errno", "-fno-trapping-math"]
_SUFFIX = {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16", torch.float16: "f16"}

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_pid = 0


def _cache_dir() -> Path:
    root = os.environ.get("GRAPHSURG_CACHE") or os.environ.get("XDG_CACHE_HOME")
    base = Path(root) if root else Path.home() / ".cache"
    return base / "graphsurg" if not os.environ.get("GRAPHSURG_CACHE") else base


def _cpu_key() -> str:
    """The CPU's feature flags: a library built with -march=native must not run elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    import platform

    return platform.processor() + platform.machine()


def compile_library(source: str, stem: str) -> ctypes.CDLL | None:
    """Build the C ``source`` with :data:`_FLAGS` into ``<cache>/<stem>_<key>.so`` (the key:
    source, flags, compiler and CPU; written atomically, so concurrent builders never see
    half a file) and load it. None where there is no C compiler on Linux or no cache folder
    is writable."""
    cc = shutil.which(os.environ.get("CC", "gcc"))
    if cc is None or not sys.platform.startswith("linux"):
        return None
    key = hashlib.sha256(
        "\0".join([source, " ".join(_FLAGS), cc, _cpu_key()]).encode()
    ).hexdigest()[:16]
    for d in (_cache_dir(), Path(tempfile.gettempdir()) / f"graphsurg-{os.getuid()}"):
        so = d / f"{stem}_{key}.so"
        try:
            if not so.exists():
                d.mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryDirectory(dir=d) as tmp:
                    src = Path(tmp) / f"{stem}.c"
                    src.write_text(source)
                    out = Path(tmp) / f"{stem}.so"
                    subprocess.run([cc, *_FLAGS, str(src), "-o", str(out)], check=True,
                                   capture_output=True, timeout=120)
                    os.replace(out, so)
            return ctypes.CDLL(str(so))
        except (OSError, subprocess.SubprocessError):
            continue
    return None


def _build() -> ctypes.CDLL | None:
    lib = compile_library(_C_SOURCE, "neuron_stats")
    if lib is None:
        return None
    i64, dbl, vp = ctypes.c_int64, ctypes.c_double, ctypes.c_void_p
    for sfx in _SUFFIX.values():
        f = getattr(lib, f"stats_rows_{sfx}")
        f.argtypes = [vp, i64, i64, i64, vp, dbl, vp]
        f.restype = None
        g = getattr(lib, f"stats_inner_{sfx}")
        g.argtypes = [vp, i64, i64, i64, i64, i64, vp, dbl, vp]
        g.restype = None
    return lib


def _get_lib() -> ctypes.CDLL | None:
    global _lib, _tried
    if not _tried:
        with _lock:
            if not _tried:
                if not os.environ.get("GRAPHSURG_NO_NATIVE"):
                    _lib = _build()
                _tried = True
    return _lib


def available() -> bool:
    """True when the C kernel is (or could be) built and loaded on this machine."""
    return _get_lib() is not None


def supports(x: torch.Tensor) -> bool:
    return (not x.is_cuda) and x.device.type == "cpu" and x.dtype in _SUFFIX


def _get_pool(n: int) -> ThreadPoolExecutor:
    global _pool, _pool_size, _pool_pid
    with _lock:
        if _pool_pid != os.getpid():  # a forked child (e.g. a DataLoader worker) has no threads
            _pool, _pool_size = None, 0
        if _pool is None or _pool_size < n:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="graphsurg-stats")
            _pool_size = n
            _pool_pid = os.getpid()
        return _pool


def raw_sums(
    x: torch.Tensor, cd: int, sat_threshold: float | None, threads: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Run the C kernel over ``x`` (channel dimension ``cd``, normalised).

    Returns ``(pivot (C,), sums (7, C) float64, values per channel)``; the sums rows are
    sum(d), sum(d*d), sum|x|, max|x|, #(x <= 0), #(|x| >= sat_threshold), #non-finite, with
    ``d = x - pivot`` over finite values.
    """
    lib = _get_lib()
    assert lib is not None
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    v3 = as_3d(x, cd)
    base, n_o, C, n_i = v3.base, v3.outer, v3.channels, v3.inner
    sO, sC, sI = v3.outer_stride, v3.channel_stride, v3.inner_stride
    if n_i == 1 and sC != 1 and sO == 1 and n_o > 1:
        # rows are contiguous and channels strided (a transposed matrix): read it as (1, C, n_o)
        n_o, n_i, sO, sI = 1, n_o, 0, 1
    if not ((n_i == 1 and sC == 1) or (n_i > 1 and sI == 1)):
        # no layout the kernel reads directly (e.g. a strided channel slice): copy once
        base = x.movedim(cd, -1).contiguous()
        n_o, n_i, sO, sC, sI = base.numel() // C, 1, C, 1, 1
    view = torch.as_strided(base, (n_o, C, n_i), (sO, sC, sI))
    # averaged in float64: a float32 sum of 64 values near 3.4e38 overflows
    pivot = pivot_of(view, torch.float64).to(acc)
    thr = float("inf") if sat_threshold is None else float(sat_threshold)
    nthreads = max(1, threads if threads is not None else torch.get_num_threads())
    sfx = _SUFFIX[x.dtype]
    esz = base.element_size()
    ptr = base.data_ptr()
    if n_i > 1 and n_i < _SHORT_SEGMENT and sC == n_i:
        # short contiguous (C, n_i) blocks, e.g. NCHW with small H*W: read each (C*n_i) block as
        # one row whose "channels" are (c, i) pairs, then fold i
        piv_rows = pivot.repeat_interleave(n_i)
        out = _rows(lib, sfx, ptr, esz, n_o, C * n_i, sO, piv_rows, thr, nthreads)
        o3 = out.view(7, C, n_i)
        folded = o3.sum(2)
        folded[_MAX] = o3[_MAX].amax(1)
        return pivot, repair_overflow(view, pivot, folded, thr), n_o * n_i
    if n_i == 1:
        out = _rows(lib, sfx, ptr, esz, n_o, C, sO, pivot, thr, nthreads)
        return pivot, repair_overflow(view, pivot, out, thr), n_o
    fn = getattr(lib, f"stats_inner_{sfx}")
    parts = max(1, min(_TASKS_PER_THREAD * nthreads, (n_o * C * n_i) // 65536, C))
    bounds = [C * k // parts for k in range(parts + 1)]
    out = torch.zeros(7, C, dtype=torch.float64)
    subs = [torch.zeros(7, bounds[k + 1] - bounds[k], dtype=torch.float64) for k in range(parts)]
    pe = pivot.element_size()
    _run(
        [
            (fn, (ptr + bounds[k] * sC * esz, n_o, bounds[k + 1] - bounds[k], n_i, sO, sC,
                  pivot.data_ptr() + bounds[k] * pe, thr, subs[k].data_ptr()))
            for k in range(parts)
        ],
        nthreads,
    )
    for k in range(parts):
        out[:, bounds[k] : bounds[k + 1]] = subs[k]
    return pivot, repair_overflow(view, pivot, out, thr), n_o * n_i


_SHORT_SEGMENT = 256
_ROWS_PER_THREAD = 256  # rows per task at least, so small inputs do not pay for threads
_TASKS_PER_THREAD = 8


def _rows(
    lib: ctypes.CDLL, sfx: str, ptr: int, esz: int, R: int, C: int, sR: int,
    pivot: torch.Tensor, thr: float, nthreads: int,
) -> torch.Tensor:
    fn = getattr(lib, f"stats_rows_{sfx}")
    parts = max(1, min(_TASKS_PER_THREAD * nthreads, R // _ROWS_PER_THREAD))
    bounds = [R * k // parts for k in range(parts + 1)]
    outs = [torch.zeros(7, C, dtype=torch.float64) for _ in range(parts)]
    _run(
        [
            (fn, (ptr + bounds[k] * sR * esz, bounds[k + 1] - bounds[k], C, sR,
                  pivot.data_ptr(), thr, outs[k].data_ptr()))
            for k in range(parts)
        ],
        nthreads,
    )
    both = torch.stack(outs)  # fixed order: the result does not depend on thread timing
    out = both.sum(0)
    out[_MAX] = both[:, _MAX].amax(0)
    return out


def _run(calls: list, nthreads: int) -> None:
    """Run ``calls`` (fn, args) on ``nthreads`` threads (the caller and pool workers), each
    pulling the next call from a shared counter: with more calls than threads, a thread that
    shares its core with another process does less of the work instead of holding up the
    result."""
    workers = min(nthreads, len(calls))
    if workers <= 1:
        for fn, args in calls:
            fn(*args)
        return
    counter = itertools.count()  # next() on a count is atomic under the GIL

    def drain() -> None:
        for i in iter(counter.__next__, None):
            if i >= len(calls):
                return
            fn, args = calls[i]
            fn(*args)

    pool = _get_pool(workers - 1)
    futs = [pool.submit(drain) for _ in range(workers - 1)]
    drain()
    for f in futs:
        f.result()
