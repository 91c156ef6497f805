"""The fast pipeline's batch step on a CPU, compiled by numba: 3.6x faster than torch's ops on one core.

``pipeline.BatchTransform`` in torch ops makes about sixteen memory passes over each float image
(convert and reorder, three blends with their grey levels and clamps, normalise, reorder back), a
quarter of everything a training image costs one CPU core.  Here each image is split into three
float planes that stay in the core's cache, each jitter op is one vectorised loop over them, and
the planes are written out interleaved (channels_last) or as they are (NCHW).  Flat indices
(``3 * i + c``) rather than 2-D ones let LLVM vectorise the de- and re-interleaving.

The arithmetic is the torch path's: without jitter the same float32 operations in the same order
(``x * (1/255)``, ``- mean``, ``/ std``), so the batches are equal bit for bit; each jitter op is
torchvision's blend ``clamp(f x + (1 - f) target)`` in float32, the contrast target (the mean grey
level) summed in float64, so within a few ulps of torchvision's kernels, as the torch path is.

numba comes from the ``fast-cpu`` extra.  ``pipeline`` imports this module only when a batch step runs
on a CPU, and without numba ``BatchTransform`` runs its torch ops.  The first call compiles the kernel
(about 1.5 s) and caches it on disk (``__pycache__``, or numba's user-wide cache where the package is
read-only), so later processes load it.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from torch import Tensor

from .pipeline import CONTRAST, GRAY_WEIGHTS, ORDER, SATURATION

W0, W1, W2 = (np.float32(weight) for weight in GRAY_WEIGHTS)  # float32 constants of the compiled code
INV_255, ONE, ZERO = np.float32(1.0 / 255), np.float32(1.0), np.float32(0.0)
ORDER_START = ORDER.start  # the parameter vector's op order: three op codes from here


def _compiled(fastmath: bool | set[str] = False):  # a decorator
    def compile_(function):
        try:
            return numba.njit(cache=True, nogil=True, boundscheck=False, fastmath=fastmath)(function)
        except RuntimeError:  # numba finds no place to cache code without a source file: compile per process
            return numba.njit(nogil=True, boundscheck=False, fastmath=fastmath)(function)

    return compile_


@_compiled(fastmath={"reassoc"})  # reassociation lets the sum vectorise; float64 keeps it accurate
def _mean_grey(red: np.ndarray, green: np.ndarray, blue: np.ndarray) -> np.float32:
    total = 0.0
    for i in range(red.shape[0]):
        total += red[i] * W0 + green[i] * W1 + blue[i] * W2
    return np.float32(total / red.shape[0])


@_compiled()
def _blend(
    red: np.ndarray,
    green: np.ndarray,
    blue: np.ndarray,
    factor: np.float32,
    grey_share: np.float32,
    level: np.float32,
    mean: np.ndarray,
    std: np.ndarray,
    normalise: bool,
) -> None:
    """One jitter op in place: ``clamp(f x + (1 - f) target)`` with target ``grey_share * grey + level``:
    brightness (0, 0), contrast (0, mean grey) or saturation (1, 0).  Branch-free, so it vectorises,
    and exact: the unused term adds 0, and factor 1 leaves the image as it is.  With ``normalise`` the
    result is also normalised in the same pass, which saves one over the planes."""
    rest = ONE - factor
    m0, m1, m2, s0, s1, s2 = mean[0], mean[1], mean[2], std[0], std[1], std[2]
    for i in range(red.shape[0]):
        target = rest * (grey_share * (red[i] * W0 + green[i] * W1 + blue[i] * W2) + level)
        r = min(max(red[i] * factor + target, ZERO), ONE)
        g = min(max(green[i] * factor + target, ZERO), ONE)
        b = min(max(blue[i] * factor + target, ZERO), ONE)
        if normalise:  # loop-invariant: LLVM compiles the loop once with and once without it
            r, g, b = (r - m0) / s0, (g - m1) / s1, (b - m2) / s2
        red[i], green[i], blue[i] = r, g, b


@_compiled()
def _colour(
    images: np.ndarray,
    params: np.ndarray,
    mean: np.ndarray,
    std: np.ndarray,
    jitter: bool,
    out: np.ndarray,
    planar: bool,
) -> None:
    """uint8 (B, 3 N) HWC rows -> float32 (B, 3 N) rows of ``out``, HWC or (planar) CHW."""
    count, pixels = images.shape[0], images.shape[1] // 3
    red, green, blue = np.empty(pixels, np.float32), np.empty(pixels, np.float32), np.empty(pixels, np.float32)
    for k in range(count):
        source = images[k]
        for i in range(pixels):
            red[i] = np.float32(source[3 * i]) * INV_255
            green[i] = np.float32(source[3 * i + 1]) * INV_255
            blue[i] = np.float32(source[3 * i + 2]) * INV_255
        if jitter:
            for position in range(3):
                op = int(params[k, ORDER_START + position])
                grey_share = ONE if op == SATURATION else ZERO
                level = _mean_grey(red, green, blue) if op == CONTRAST else ZERO
                _blend(red, green, blue, np.float32(params[k, op]), grey_share, level, mean, std, position == 2)
        else:  # factor 1: normalisation alone
            _blend(red, green, blue, ONE, ZERO, ZERO, mean, std, True)
        target = out[k]
        if planar:
            target[:pixels] = red
            target[pixels : 2 * pixels] = green
            target[2 * pixels :] = blue
        else:
            for i in range(pixels):
                target[3 * i] = red[i]
                target[3 * i + 1] = green[i]
                target[3 * i + 2] = blue[i]


def colour_batch(
    images: Tensor, params: Tensor, mean: Tensor, std: Tensor, jitter: bool, memory_format: torch.memory_format
) -> Tensor:
    """uint8 (B, 3, H, W) on the CPU -> jittered (when ``jitter``), normalised float32 in ``memory_format``.

    ``params`` is pipeline's (B, NUM_PARAMS) vector; ``mean`` and ``std`` hold the three channels' values
    on the 0..1 scale.  Erasing is left to the caller.
    """
    count = images.shape[0]
    rows = images.permute(0, 2, 3, 1)  # workers hand over HWC rows, so this is usually a view
    if not rows.is_contiguous():
        rows = rows.contiguous()
    out = torch.empty(images.shape, dtype=torch.float32, memory_format=memory_format)
    planar = memory_format == torch.contiguous_format
    written = out if planar else out.permute(0, 2, 3, 1)
    _colour(
        rows.reshape(count, -1).numpy(),
        params.to(torch.float32).contiguous().numpy(),
        mean.reshape(3).to(torch.float32).numpy(),
        std.reshape(3).to(torch.float32).numpy(),
        jitter,
        written.reshape(count, -1).numpy(),
        planar,
    )
    return out
