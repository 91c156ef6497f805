"""Training-mode BatchNorm, and BatchNorm followed by ReLU, for channels_last CPU tensors, compiled by numba.

In torch's ops a BatchNorm and its ReLU take about eight passes over the activation per training step
(statistics; normalise; ReLU; ReLU's backward; the two gradient sums; the input gradient, itself two
ops in ``batchnorm._WideBatchNorm``) plus a dozen small ops on per-channel vectors, each a dispatch.
Here it is four: the statistics and the normalise-and-ReLU forward, the gradient sums and the input
gradient backward, each one loop over the (pixels, C) matrix an NHWC tensor is.  The ReLU's mask is
recomputed from ``x`` with the forward's own arithmetic (``x * scale + shift > 0``: the same float
operations, so the same mask), so there is no ReLU output to read.  A gradient that is a channel slice
of a wider tensor (concatenation's backward) is read where it is.  ``pooled_backward`` does the same
for the stem's pooling-first BatchNorm, ReLU and max-pool (``stem``).

Paired in one process on this project's 2-core CPU (x0.5, batch 32, 224 px), the training step took
177.3 ms against 196.7 with torch's ops and the wide view (1.13x, x1.0 too; ``benchmarks/bn_kernel.py``);
the kernels themselves are about 35 ms of it, near the memory bandwidth.  ``shufflenetv2 bench --suites
train`` measures the whole step against torchvision's.

Numerics: sums in float64, of values shifted by a per-channel pivot (the first row) for the variance and
of ``x - mean`` for the weight gradient, so neither suffers the cancellation of a plain sum of
squares; the elementwise maps run in the tensor's dtype.  Rows split into a fixed number of chunks
(images for ``pooled_backward``) whatever the thread count, so results do not depend on it.

``batchnorm`` imports this module only when such a BatchNorm trains on a CPU with numba installed (the
fast-cpu extra); without numba it runs torch's ops.  The first call compiles the kernels for the
dtype (several seconds) and caches them on disk, as ``batch_kernel`` does.
"""

from __future__ import annotations

import functools

import numba
import numpy as np
from numba import prange

CHUNKS = 16  # row chunks per call, shared among the threads: a fixed summation order


def _compiled(function=None, *, parallel: bool = True):  # a decorator
    if function is None:
        return functools.partial(_compiled, parallel=parallel)
    # no fastmath: ``x * scale + shift`` must round the same way in the forward and the backward's mask
    options = {"parallel": parallel, "nogil": True, "boundscheck": False}
    try:
        return numba.njit(cache=True, **options)(function)
    except RuntimeError:  # numba finds no place to cache code without a source file: compile per process
        return numba.njit(**options)(function)


@_compiled(parallel=False)
def _chunk_totals(sums: np.ndarray) -> np.ndarray:
    """The chunks' partial sums added in chunk order.  A plain loop, outside the parallel kernels: there
    numba turns an array's ``.sum()`` into a parallel reduction, one thread launch per channel."""
    totals = np.zeros(sums.shape[1:])
    for chunk in range(sums.shape[0]):
        for i in range(sums.shape[1]):
            for c in range(sums.shape[2]):
                totals[i, c] += sums[chunk, i, c]
    return totals


@_compiled
def moments(x: np.ndarray, running_mean: np.ndarray, running_var: np.ndarray, momentum: float, out: np.ndarray) -> None:
    """Per-column mean and biased variance of the (P, C) matrix ``x`` into ``out[0]``, ``out[1]`` (float64),
    and BatchNorm's update of the running statistics (exponential averages, the unbiased variance)."""
    rows, channels = x.shape
    step = (rows + CHUNKS - 1) // CHUNKS
    pivot = x[0].astype(np.float64)
    sums = np.zeros((CHUNKS, 2, channels))
    for chunk in prange(CHUNKS):
        total, squares = np.zeros(channels), np.zeros(channels)
        for r in range(chunk * step, min(rows, (chunk + 1) * step)):
            row = x[r]
            for c in range(channels):
                d = np.float64(row[c]) - pivot[c]
                total[c] += d
                squares[c] += d * d
        sums[chunk, 0], sums[chunk, 1] = total, squares
    totals = _chunk_totals(sums)
    for c in range(channels):
        shifted_mean = totals[0, c] / rows
        var = max(totals[1, c] / rows - shifted_mean * shifted_mean, 0.0)
        out[0, c], out[1, c] = pivot[c] + shifted_mean, var
        running_mean[c] = (1.0 - momentum) * running_mean[c] + momentum * out[0, c]
        running_var[c] = (1.0 - momentum) * running_var[c] + momentum * var * rows / (rows - 1)


@_compiled
def forward(
    x: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray,
    running_mean: np.ndarray,
    running_var: np.ndarray,
    momentum: float,
    eps: float,
    relu: bool,
    out: np.ndarray,
    statistics: np.ndarray,
    affine: np.ndarray,
) -> None:
    """``out = [relu](batch_norm(x))`` over the rows of the (P, C) matrix ``x``, updating the running
    statistics.  Writes float64 ``statistics`` (mean, biased variance, 1 / std) and ``affine`` (scale,
    shift, in x's dtype) for the backward."""
    rows, channels = x.shape
    step = (rows + CHUNKS - 1) // CHUNKS
    moments(x, running_mean, running_var, momentum, statistics)
    for c in range(channels):
        invstd = 1.0 / np.sqrt(statistics[1, c] + eps)
        statistics[2, c] = invstd
        affine[0, c] = weight[c] * invstd
        affine[1, c] = bias[c] - statistics[0, c] * affine[0, c]
    scale, shift, zero = affine[0], affine[1], np.zeros(1, x.dtype)[0]
    for chunk in prange(CHUNKS):
        for r in range(chunk * step, min(rows, (chunk + 1) * step)):
            row, target = x[r], out[r]
            for c in range(channels):
                v = row[c] * scale[c] + shift[c]
                target[c] = zero if relu and v <= zero else v  # NaN stays NaN, as torch's ReLU keeps it


@_compiled
def backward(
    grad: np.ndarray,
    column: int,
    x: np.ndarray,
    statistics: np.ndarray,
    affine: np.ndarray,
    relu: bool,
    grad_x: np.ndarray,
    grad_weight: np.ndarray,
    grad_bias: np.ndarray,
) -> None:
    """Gradients of ``forward`` for the output gradient held in columns ``column : column + C`` of the
    rows of ``grad`` (a channel slice of a wider NHWC tensor, as concatenation's backward hands over):
    the weight's, the bias's and (unless ``grad_x`` has no rows) the input's."""
    rows, channels = x.shape
    step = (rows + CHUNKS - 1) // CHUNKS
    mean, invstd = statistics[0], statistics[2]
    scale, shift, zero = affine[0], affine[1], np.zeros(1, x.dtype)[0]
    sums = np.zeros((CHUNKS, 2, channels))
    for chunk in prange(CHUNKS):
        total, weighted = np.zeros(channels), np.zeros(channels)
        for r in range(chunk * step, min(rows, (chunk + 1) * step)):
            row, g = x[r], grad[r, column : column + channels]
            for c in range(channels):
                kept = not relu or row[c] * scale[c] + shift[c] > zero  # ReLU's mask: its output > 0
                gc = np.float64(g[c]) if kept else 0.0
                total[c] += gc
                weighted[c] += gc * (np.float64(row[c]) - mean[c])
        sums[chunk, 0], sums[chunk, 1] = total, weighted
    # dL/dx = scale * (g - sum(g) / n - xhat * sum(g * xhat) / n) = scale * g + c1 * x + c0
    c1, c0 = np.empty(channels, x.dtype), np.empty(channels, x.dtype)
    totals = _chunk_totals(sums)
    for c in range(channels):
        bias_sum = totals[0, c]
        weight_sum = totals[1, c] * invstd[c]
        grad_weight[c], grad_bias[c] = weight_sum, bias_sum
        k1 = -np.float64(scale[c]) * invstd[c] * weight_sum / rows
        c1[c] = k1
        c0[c] = -np.float64(scale[c]) * bias_sum / rows - k1 * mean[c]
    if grad_x.shape[0] == 0:
        return
    for chunk in prange(CHUNKS):
        for r in range(chunk * step, min(rows, (chunk + 1) * step)):
            row, g, target = x[r], grad[r, column : column + channels], grad_x[r]
            for c in range(channels):
                kept = not relu or row[c] * scale[c] + shift[c] > zero
                target[c] = (scale[c] * g[c] if kept else zero) + (c1[c] * row[c] + c0[c])


@_compiled
def pooled_backward(
    grad: np.ndarray,
    column: int,
    pooled: np.ndarray,
    out: np.ndarray,
    indices: np.ndarray,
    statistics: np.ndarray,
    scale: np.ndarray,
    z: np.ndarray,
    grad_weight: np.ndarray,
    grad_bias: np.ndarray,
) -> None:
    """The backward of ``stem._ConvBatchNormReLUPool`` from the pooled side: ``out = relu(scale * pooled +
    shift)`` with ``pooled`` the 3 x 3 maxima of ``z`` at ``indices``.

    ``grad`` holds the output gradient in columns ``column : column + C`` of its rows; ``pooled``, ``out``
    and ``indices`` are (N, P, C) (indices count pixels within an image's plane); ``z`` is (N, Z, C) and
    becomes the gradient of ``z``: BatchNorm's ``c1 * z + c0`` everywhere plus ``scale * g`` at each
    window's maximum (twice where two windows share it), image by image while the image is in cache.
    ``statistics`` holds the mean and, in row 2, 1 / std (``forward``'s layout)."""
    images, pixels, channels = pooled.shape
    mean, invstd = statistics[0], statistics[2]
    zero = np.zeros(1, z.dtype)[0]
    sums = np.zeros((images, 2, channels))  # per image: the fixed summation order of ``backward``'s chunks
    for n in prange(images):
        total, weighted = np.zeros(channels), np.zeros(channels)
        for p in range(pixels):
            r = n * pixels + p
            g, kept, values = grad[r, column : column + channels], out[n, p], pooled[n, p]
            for c in range(channels):
                gc = np.float64(g[c]) if kept[c] > zero else 0.0  # ReLU's mask: its output > 0
                total[c] += gc
                weighted[c] += gc * (np.float64(values[c]) - mean[c])
        sums[n, 0], sums[n, 1] = total, weighted
    totals = _chunk_totals(sums)
    count = images * z.shape[1]
    c1, c0 = np.empty(channels, z.dtype), np.empty(channels, z.dtype)
    for c in range(channels):
        weight_sum = totals[1, c] * invstd[c]
        grad_weight[c], grad_bias[c] = weight_sum, totals[0, c]
        k1 = -np.float64(scale[c]) * invstd[c] * weight_sum / count
        c1[c] = k1
        c0[c] = -np.float64(scale[c]) * totals[0, c] / count - k1 * mean[c]
    for n in prange(images):
        image = z[n]
        for i in range(image.shape[0]):
            row = image[i]
            for c in range(channels):
                row[c] = c1[c] * row[c] + c0[c]
        for p in range(pixels):
            g, kept, where = grad[n * pixels + p, column : column + channels], out[n, p], indices[n, p]
            for c in range(channels):
                if kept[c] > zero:
                    image[where[c], c] += scale[c] * g[c]
