"""An optional compiled kernel for the searched activation mixture on CPU (issue 15, speed).

The eager mixture (:class:`plugin.engine.quantizers._ActivationMixtureSTE`) runs about 20 tensor
passes per site and step (K widths x divide, round, clamp, scale, times theta, add; and in the
backward the masks, the ``[K, N] @ grad`` product, the products with ``sum(theta)``), and saves a
``[K, *x.shape]`` buffer for the logits' gradient. On the small activations of the models people
compress to 2 bits, dispatch and memory passes, not arithmetic, set its cost: it was about 40% of
a ResNet-8 search step. This module compiles two C loops (one forward, one backward), with the
system's C compiler, the first time they are needed, into a per-user cache
(``~/.cache/prunequant/kernels``, written atomically), and calls them through :mod:`ctypes`:

- forward, one pass over ``x``: per element and width the same float32 operations in the same order as the eager node
  (``x / (clip / n)``, round half to even, clamp to the width's integers, times the scale, times
  theta, the widths added in order; no fused multiply-add: ``-ffp-contract=off``), so ``y`` is
  the same values (a zero's sign may differ where torch's vectorised clamp turns ``-0`` into ``0``);
- backward, one pass: the pass-through gradient ``g * sum(theta)`` inside the clip range (exactly the
  eager node's value), and the clip's and the logits' gradients as sums, recomputing each
  ``Q_j(x)`` instead of saving them, accumulated in 16 float32 lanes and added in float64 (then
  rounded to float32): the same sums as the eager node's in another order.

The kernels take the clip as a float and the widths' top integers as a C array made once per
width set, and derive the scales, the integer bounds and the clip masks' thresholds themselves:
a call makes no small tensors (stop 29: those made up much of a site's Python time).

Nothing is needed for correctness: where there is no compiler, the build fails, the tensors are not
contiguous float32 on CPU, or ``PRUNEQUANT_NATIVE=0``, the eager node runs (logged once).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

NATIVE_ENV = "PRUNEQUANT_NATIVE"
MAX_WIDTHS = 8

_SOURCE = r"""
#include <math.h>
#include <stdint.h>

#define LANES 16
#define MAXK 8

static inline float quantize(float x, float scale, float lo, float hi) {
    float q = rintf(x / scale);
    q = q < lo ? lo : q;   /* NaN passes, as torch's clamp */
    q = q > hi ? hi : q;
    return q * scale;
}

/* the widths' parameters as the eager node computes them: scale_j = clip / n_j (one float32
   division), integers [-n_j, n_j] signed or [0, n_j] unsigned */
static inline int params(float clip, const int *levels, int k, int is_signed, float *scale, float *lo,
                         float *hi) {
    if (k > MAXK) k = MAXK;
    for (int j = 0; j < k; j++) {
        hi[j] = (float)levels[j];
        lo[j] = is_signed ? -hi[j] : 0.0f;
        scale[j] = clip / hi[j];
    }
    return k;
}

/* one pass over x: per element the widths in order, y = Q_0 t_0, then y + Q_j t_j */
void pq_mixture_forward(const float *x, float *y, int64_t n, float clip, const int *levels,
                        const float *theta, int k, int is_signed) {
    float scale[MAXK], lo[MAXK], hi[MAXK];
    k = params(clip, levels, k, is_signed, scale, lo, hi);
    int64_t blocks = n / LANES;
    for (int64_t b = 0; b < blocks; b++) {
        const float *xb = x + b * LANES;
        float acc[LANES];
        for (int l = 0; l < LANES; l++) acc[l] = quantize(xb[l], scale[0], lo[0], hi[0]) * theta[0];
        for (int j = 1; j < k; j++)
            for (int l = 0; l < LANES; l++) acc[l] = acc[l] + quantize(xb[l], scale[j], lo[j], hi[j]) * theta[j];
        for (int l = 0; l < LANES; l++) y[b * LANES + l] = acc[l];
    }
    for (int64_t i = blocks * LANES; i < n; i++) {
        float a = quantize(x[i], scale[0], lo[0], hi[0]) * theta[0];
        for (int j = 1; j < k; j++) a = a + quantize(x[i], scale[j], lo[j], hi[j]) * theta[j];
        y[i] = a;
    }
}

/* one pass: gx = g * total inside the clip range (-clip, clip) signed, [0, clip) unsigned, else 0;
   out[0] = total * (sum of g where x >= clip, minus where x <= -clip if signed);
   out[1 + j] = sum Q_j(x) g, Q_j recomputed. x >= clip is x > nextafter(clip, -inf) and x >= 0 is
   x > -(smallest subnormal), as the eager node's float masks; NaN passes. */
void pq_mixture_backward(const float *x, const float *g, float *gx, int64_t n, float clip, int is_signed,
                         float total, const int *levels, int k, float *out) {
    float scale[MAXK], lo[MAXK], hi[MAXK];
    k = params(clip, levels, k, is_signed, scale, lo, hi);
    const float lower = is_signed ? -clip : -0x1p-149f;
    const float below_clip = nextafterf(clip, -INFINITY);
    float edge[LANES], dot[MAXK][LANES];
    for (int l = 0; l < LANES; l++) {
        edge[l] = 0.0f;
        for (int j = 0; j < MAXK; j++) dot[j][l] = 0.0f;
    }
    int64_t blocks = n / LANES;
    for (int64_t b = 0; b < blocks; b++) {
        const float *xb = x + b * LANES, *gb = g + b * LANES;
        float *ob = gx + b * LANES;
        for (int l = 0; l < LANES; l++) {
            float xi = xb[l], gi = gb[l];
            int blocked = (xi <= lower) | (xi >= clip);
            ob[l] = blocked ? 0.0f : gi * total;
            float e = (xi <= below_clip) ? 0.0f : gi;
            float e2 = (-xi <= below_clip) ? 0.0f : gi;
            edge[l] += is_signed ? e - e2 : e;
        }
        for (int j = 0; j < k; j++)
            for (int l = 0; l < LANES; l++) dot[j][l] += quantize(xb[l], scale[j], lo[j], hi[j]) * gb[l];
    }
    double e_sum = 0.0, d_sum[MAXK];
    for (int j = 0; j < MAXK; j++) d_sum[j] = 0.0;
    for (int64_t i = blocks * LANES; i < n; i++) {
        float xi = x[i], gi = g[i];
        int blocked = (xi <= lower) | (xi >= clip);
        gx[i] = blocked ? 0.0f : gi * total;
        float e = (xi <= below_clip) ? 0.0f : gi;
        float e2 = (-xi <= below_clip) ? 0.0f : gi;
        e_sum += is_signed ? e - e2 : e;
        for (int j = 0; j < k; j++) d_sum[j] += (double)(quantize(xi, scale[j], lo[j], hi[j]) * gi);
    }
    for (int l = 0; l < LANES; l++) {
        e_sum += edge[l];
        for (int j = 0; j < k; j++) d_sum[j] += dot[j][l];
    }
    out[0] = (float)(e_sum * (double)total);
    for (int j = 0; j < k; j++) out[1 + j] = (float)d_sum[j];
}
"""

_FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-trapping-math", "-fno-math-errno",
          "-fPIC", "-shared")

_LOCK = threading.Lock()
_STATE: dict[str, object] = {}
_UNSET = object()


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "prunequant" / "kernels"


def _compiler() -> str | None:
    for name in (os.environ.get("CC") or "", "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _build() -> ctypes.CDLL | None:
    cc = _compiler()
    if cc is None:
        logger.info("no C compiler found: the activation mixture runs its eager (slower) form")
        return None
    key = hashlib.sha256((_SOURCE + " ".join(_FLAGS) + cc).encode()).hexdigest()[:16]
    target = _cache_dir() / f"mixture-{key}.so"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            src = Path(tmp) / "mixture.c"
            src.write_text(_SOURCE)
            built = Path(tmp) / "mixture.so"
            done = subprocess.run([cc, *_FLAGS, "-o", str(built), str(src), "-lm"], capture_output=True,
                                  text=True, timeout=120)
            if done.returncode != 0:
                logger.info("compiling the activation mixture kernel failed (%s): the eager form runs",
                            (done.stderr or "").strip().splitlines()[-1:] or done.returncode)
                return None
            os.replace(built, target)  # atomic: another process sees the whole file or none
    lib = ctypes.CDLL(str(target))
    f, i64, i32, fl, ints = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.POINTER(ctypes.c_int)
    lib.pq_mixture_forward.argtypes = [f, f, i64, fl, ints, f, i32, i32]
    lib.pq_mixture_forward.restype = None
    lib.pq_mixture_backward.argtypes = [f, f, f, i64, fl, i32, fl, ints, i32, f]
    lib.pq_mixture_backward.restype = None
    logger.debug("activation mixture kernel: %s", target)
    return lib


def kernel() -> ctypes.CDLL | None:
    """The compiled kernels, built on first use (None: unavailable or turned off)."""
    if os.environ.get(NATIVE_ENV, "1") == "0":
        return None
    lib = _STATE.get("lib", _UNSET)
    if lib is not _UNSET:  # built (or found unavailable) already: no lock per call
        return lib  # type: ignore[return-value]
    with _LOCK:
        if "lib" not in _STATE:
            try:
                _STATE["lib"] = _build()
            except (OSError, subprocess.SubprocessError) as exc:
                logger.info("the activation mixture kernel is unavailable (%s): the eager form runs", exc)
                _STATE["lib"] = None
        return _STATE["lib"]  # type: ignore[return-value]


def usable(x: Tensor, k: int) -> bool:
    """Whether the kernels can take this input: contiguous float32 on CPU, at most MAX_WIDTHS widths."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.is_contiguous() and 1 <= k <= MAX_WIDTHS
            and kernel() is not None)


_LEVELS: dict[tuple[int, ...], ctypes.Array] = {}


def _levels(levels: tuple[int, ...]) -> ctypes.Array:
    """The widths' top integers as a C array (one per tuple, kept: the kernels read them every call)."""
    arr = _LEVELS.get(levels)
    if arr is None:
        arr = _LEVELS[levels] = (ctypes.c_int * len(levels))(*levels)
    return arr


def forward(x: Tensor, clip: float, theta: Tensor, levels: tuple[int, ...], signed: bool) -> Tensor:
    """``sum_j theta_j * Q_j(x)``; ``clip`` the (floored) clip as a float32 value: the kernel takes
    each scale ``clip / n_j`` as torch's 0-d float32 division computes it."""
    lib = _STATE["lib"]  # usable() built it
    if theta.dtype != torch.float32 or not theta.is_contiguous():
        theta = theta.detach().to(torch.float32).contiguous()
    y = torch.empty_like(x)
    lib.pq_mixture_forward(x.data_ptr(), y.data_ptr(), x.numel(), clip, _levels(levels), theta.data_ptr(),
                           len(levels), signed)
    return y


def backward(x: Tensor, grad: Tensor, clip: float, total: float, levels: tuple[int, ...],
             signed: bool) -> tuple[Tensor, Tensor]:
    """(the gradient of x, a float32 ``[1 + K]``: the clip's gradient ``total * edge sum``, then the
    logits' ``[K]``); ``total`` is ``sum(theta)`` (``d y / d x`` inside the clip range)."""
    lib = _STATE["lib"]  # usable() built it
    grad = grad.contiguous()
    gx = torch.empty_like(x)
    out = torch.empty(1 + len(levels), dtype=torch.float32)
    lib.pq_mixture_backward(x.data_ptr(), grad.data_ptr(), gx.data_ptr(), x.numel(), clip, signed, total,
                            _levels(levels), len(levels), out.data_ptr())
    return gx, out
