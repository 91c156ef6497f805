"""BatchNorm2d for CPU training on channels_last tensors, and ``Layers``, which hands it the ReLU after it.

Two paths stand in for torch's kernels where a training-mode BatchNorm normalises a channels_last CPU
tensor; everything else (other layouts, GPUs, evaluation, autocast, compilation) is plain
``nn.BatchNorm2d``.

``bn_kernel`` (numba, the fast-cpu extra), for any channel count: BatchNorm, and BatchNorm with the ReLU
that follows it (``Layers``), in two passes each way over the (pixels, C) matrix an NHWC tensor is, with
float64 sums.  At x0.5 batch 32 on this project's 2-core CPU, paired in one process, the whole
training step ran 1.13x faster than with the wide view below (x1.0 too; ``benchmarks/bn_kernel.py``),
with the stem's statistics and backward (``stem``) through the same module.

The wide view, where numba is not installed.  PyTorch's channels_last BatchNorm kernels treat the tensor
as a (pixels, C) matrix and walk it one row of C values at a time.  With C = 24 (every stage-2
activation of x0.5, and the stem of every width) or 58 (stage 2 of x1.0) those rows are too short for
the vector loop to pay for itself: at batch 32, on this project's 2-core CPU, a 24-channel 56 x 56
BatchNorm took 1.9 ms forward and 9.8 ms backward, 1.3 and 2.2 ms through the wide view; 24 channels at
28 x 28, 0.67 and 2.85 against 0.49 and 0.59 ms; the stem's statistics (24 channels, 112 x 112) 12.6
against 3.7 ms (ad-hoc microbenchmarks, not committed; ``shufflenetv2 bench --suites train`` measures
the whole step).  An NHWC tensor is, in memory, a (pixels, C) matrix, and also a (pixels / k, k * C)
one whose column j holds channel ``j % C``.  Both of BatchNorm's reductions (the batch statistics
forward, the sums of the gradient backward) run on that wider matrix, whose rows are long enough, and
the k partial results of each channel are then combined; the per-element maps use per-column copies of
the per-channel scale and shift.

Both give BatchNorm's results with the sums taken in another order (float64 tests: 1e-10).
"""

from __future__ import annotations

import functools
import importlib
import math
import threading
from types import ModuleType

import numpy as np
import torch
from torch import nn
from torch.autograd.function import FunctionCtx, once_differentiable

ROW_MULTIPLE = 16  # channel counts that are multiples of this already run at full speed
# from this many channels up the plain kernels win, or lose too little to pay for the extra small ops:
# whole forward + backward at batch 32, plain / wide, 3.3x (24 channels, 56 x 56), 2.5x (58, 28 x 28),
# but 0.94x (88, 28 x 28), 0.87x (116, 14 x 14), 0.5x (232, 7 x 7)
WIDEST = 64


def is_nhwc(x: torch.Tensor) -> bool:
    """Laid out channels_last and not also plain contiguous (as 1 x 1 or one-channel tensors are)."""
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def columns_per_channel(x: torch.Tensor) -> int:
    """k for the (pixels / k, k * C) view of the NHWC tensor ``x``: the smallest k that makes a row a
    multiple of ``ROW_MULTIPLE`` values, or 1 (the plain kernels) when ``x`` is not NHWC, when C already
    is such a multiple or is ``WIDEST`` or more, or when the pixels do not split into k equal parts."""
    if not is_nhwc(x):
        return 1
    channels = x.shape[1]
    k = ROW_MULTIPLE // math.gcd(channels, ROW_MULTIPLE)
    return k if channels < WIDEST and (x.numel() // channels) % k == 0 else 1


def wide_view(x: torch.Tensor, k: int) -> torch.Tensor:
    """The (pixels / k, k * C) matrix of an NHWC tensor, sharing its memory."""
    return x.permute(0, 2, 3, 1).reshape(-1, k * x.shape[1])


def per_column(k: int, *vectors: torch.Tensor) -> torch.Tensor:
    """The per-channel ``vectors`` as rows of one (len(vectors), k * C) tensor, each repeated k times to
    match the wide view's columns: one small copy (``Tensor.repeat`` per vector cost more than the
    arithmetic it served)."""
    return torch.cat([torch.stack(vectors)] * k, 1)


def channel_affine(
    x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``scale[c] * x + shift[c]`` (BatchNorm's per-element map) into ``out``, which may be ``x`` itself.

    NHWC tensors go through the wide view: broadcasting C values over (pixels, C) runs loops of C
    elements, slow for the same reason as the reductions (the stem's 38.5 MB: 4.0 ms as ``mul_`` and
    ``add_``, 2.2 ms as one ``addcmul``, 1.6 ms through the wide view)."""
    out = torch.empty_like(x) if out is None else out
    k = columns_per_channel(x) if is_nhwc(out) else 1
    if k == 1:
        return torch.addcmul(shift.view(1, -1, 1, 1), x, scale.view(1, -1, 1, 1), out=out)
    wide_shift, wide_scale = per_column(k, shift, scale)
    torch.addcmul(wide_shift, wide_view(x, k), wide_scale, out=wide_view(out, k))
    return out


def batch_statistics(
    x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor, momentum: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of ``x`` over (N, H, W), updating the running statistics as
    BatchNorm's training forward does (exponential averages, the unbiased variance).

    Through the wide view where it pays: every column holds the same number of values, so a channel's
    mean is the mean of its k column means and its variance the mean of the column variances plus the
    variance of the column means.  With numba, for any channels_last CPU tensor, ``bn_kernel.moments``
    (one pass, float64 sums): the stem's 38.5 MB at x0.5 batch 32 in 1.6 instead of 4.9 ms per step."""
    kernels = compiled_kernels() if kernel_layout(x) else None
    if kernels is not None:
        numba_threads(kernels)
        moments = torch.empty(2, x.shape[1], dtype=torch.float64)
        kernels.moments(_rows(x), running_mean.numpy(), running_var.numpy(), momentum, moments.numpy())
        mean, var = moments.to(x.dtype)
        return mean, var
    k = columns_per_channel(x)
    if k == 1:
        return torch.batch_norm_update_stats(x, running_mean, running_var, momentum)
    channels, count = x.shape[1], x.numel() // x.shape[1]
    means, variances = torch.batch_norm_update_stats(wide_view(x, k), None, None, 0.0)
    means, variances = means.view(k, channels), variances.view(k, channels)
    mean = means.mean(0)
    var = (variances + (means - mean).square()).mean(0)
    running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
    running_var.mul_(1 - momentum).add_(var, alpha=momentum * count / (count - 1))
    return mean, var


def gradient_sums(
    grad: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sum(grad * (x - mean) / sqrt(var + eps))`` and ``sum(grad)`` per channel: BatchNorm's weight and
    bias gradients.  Evaluation-mode ``native_batch_norm_backward`` computes exactly these (per column
    of the wide view, where that pays) from the statistics it is given."""
    k = columns_per_channel(x)
    if k == 1:
        return torch.ops.aten.native_batch_norm_backward(
            grad, x, None, mean, var, None, None, False, eps, [False, True, True]
        )[1:]
    grad = grad.contiguous(memory_format=torch.channels_last)
    channels = x.shape[1]
    wide_mean, wide_var = per_column(k, mean, var)
    _, weighted, plain = torch.ops.aten.native_batch_norm_backward(
        wide_view(grad, k), wide_view(x, k), None, wide_mean, wide_var, None, None, False, eps, [False, True, True]
    )
    return weighted.view(k, channels).sum(0), plain.view(k, channels).sum(0)


class _WideBatchNorm(torch.autograd.Function):
    """Training-mode ``batch_norm`` of an NHWC tensor through its (pixels / k, k * C) view."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor,
        running_mean: torch.Tensor,
        running_var: torch.Tensor,
        momentum: float,
        eps: float,
    ) -> torch.Tensor:
        mean, var = batch_statistics(x, running_mean, running_var, momentum)
        scale = weight * torch.rsqrt(var + eps)
        shift = bias - mean * scale  # BatchNorm's CPU kernel computes scale * x + shift, as here
        out = channel_affine(x, scale, shift)
        ctx.save_for_backward(x, weight, mean, var)
        ctx.eps = eps
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, mean, var = ctx.saved_tensors
        grad = grad.contiguous(memory_format=torch.channels_last)
        grad_weight, grad_bias = gradient_sums(grad, x, mean, var, ctx.eps)
        grad_x = None
        if ctx.needs_input_grad[0]:
            # dL/dx = scale * (g - sum(g) / n - xhat * sum(g * xhat) / n) = scale * g + c1 * x + c0
            count = x.numel() // x.shape[1]
            invstd = torch.rsqrt(var + ctx.eps)
            scale = weight * invstd
            c1 = -scale * invstd * grad_weight / count
            c0 = -scale * grad_bias / count - c1 * mean
            grad_x = channel_affine(x, c1, c0)
            k = columns_per_channel(x)
            wide_view(grad_x, k).addcmul_(wide_view(grad, k), per_column(k, scale)[0])
        return grad_x, grad_weight, grad_bias, None, None, None, None


def wide_path_applies(bn: nn.BatchNorm2d, x: torch.Tensor) -> bool:
    """Whether the training-mode BatchNorm ``bn`` of ``x`` takes the wide view (see the module docstring)."""
    return cpu_training(bn, x) and columns_per_channel(x) > 1


def cpu_training(bn: nn.BatchNorm2d, x: torch.Tensor) -> bool:
    """A training-mode, affine BatchNorm with running statistics, of a float CPU tensor, in eager mode
    without autocast: where this module's own paths may stand in for torch's kernels."""
    return (
        not isinstance(x, torch.fx.Proxy) and not torch.compiler.is_compiling()
        and bn.training and bn.track_running_stats and bn.affine and bn.running_mean is not None
        and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
        and not torch.is_autocast_enabled("cpu")
    )  # fmt: skip


@functools.cache
def compiled_kernels() -> ModuleType | None:
    """``bn_kernel``, or None where numba is not installed (the fast-cpu extra)."""
    try:
        return importlib.import_module(".bn_kernel", __package__)
    except ImportError:
        return None


def kernel_path_applies(bn: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``bn`` (this module's BatchNorm2d, not a subclass) trains on ``x`` with ``bn_kernel``:
    a channels_last CPU tensor with more than one value per channel, numba installed."""
    return (
        type(bn) is BatchNorm2d and cpu_training(bn, x) and kernel_layout(x)
        and bn.weight.dtype == bn.running_mean.dtype == x.dtype and compiled_kernels() is not None
    )  # fmt: skip


def kernel_layout(x: torch.Tensor) -> bool:
    """A CPU tensor that is a (pixels, C) matrix in memory (channels_last), with more than one row."""
    return (
        x.device.type == "cpu" and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
        and x.numel() > x.shape[1]
    )  # fmt: skip


def _rows(x: torch.Tensor) -> np.ndarray:
    """The (pixels, C) matrix of a dense NHWC tensor, sharing its memory."""
    return x.detach().permute(0, 2, 3, 1).reshape(-1, x.shape[1]).numpy()


def row_block(grad: torch.Tensor) -> tuple[np.ndarray, int]:
    """``grad``'s NHWC rows as a (pixels, L) array and the column of its channel 0.

    Concatenation's backward hands each input a channel slice of the output's gradient: rows of C
    values L apart.  The kernel reads those where they are rather than from a dense copy."""
    if grad.is_contiguous(memory_format=torch.channels_last):
        return _rows(grad), 0
    n, c, h, w = grad.shape
    row = grad.stride(3)
    if grad.stride(1) == 1 and grad.stride(2) == w * row and grad.stride(0) == h * w * row and row >= c:
        column = min(grad.storage_offset(), row - c)
        start = grad.storage_offset() - column
        if start + n * h * w * row <= grad.untyped_storage().nbytes() // grad.element_size():
            return torch.as_strided(grad.detach(), (n * h * w, row), (row, 1), start).numpy(), column
    return _rows(grad.detach().contiguous(memory_format=torch.channels_last)), 0


_applied_threads = threading.local()  # numba's thread count is per calling thread, as torch's count is


def numba_threads(kernels: ModuleType) -> None:
    """numba's thread count set to torch's (within numba's own limit), so ``torch.set_num_threads`` rules.
    Only when torch's count changed: asking numba for its count took 17 us a call inside a training step.

    The first call starts numba's OpenMP threads, which sets this thread's OpenMP count to all of them
    (``NUMBA_NUM_THREADS``, the machine's cores), and torch's count is that same setting: put back, or a
    process that torchrun gave one thread, or bench ``--threads 2`` on a bigger machine, runs every
    torch op on every core from then on."""
    wanted = torch.get_num_threads()
    if getattr(_applied_threads, "count", None) != wanted:
        kernels.numba.set_num_threads(min(wanted, kernels.numba.config.NUMBA_NUM_THREADS))
        if torch.get_num_threads() != wanted:
            torch.set_num_threads(wanted)
        _applied_threads.count = wanted


class _KernelBatchNorm(torch.autograd.Function):
    """Training-mode ``batch_norm`` of an NHWC CPU tensor, followed by ReLU when ``relu``, in ``bn_kernel``."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor,
        running_mean: torch.Tensor,
        running_var: torch.Tensor,
        momentum: float,
        eps: float,
        relu: bool,
    ) -> torch.Tensor:
        kernels = compiled_kernels()
        numba_threads(kernels)
        channels = x.shape[1]
        out = torch.empty_like(x, memory_format=torch.channels_last)
        statistics = torch.empty(3, channels, dtype=torch.float64)  # mean, biased variance, 1 / std
        affine = torch.empty(2, channels, dtype=x.dtype)  # scale, shift
        kernels.forward(
            _rows(x), weight.detach().numpy(), bias.detach().numpy(), running_mean.numpy(), running_var.numpy(),
            momentum, eps, relu, _rows(out), statistics.numpy(), affine.numpy(),
        )  # fmt: skip
        ctx.save_for_backward(x, statistics, affine)
        ctx.relu = relu
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, statistics, affine = ctx.saved_tensors
        kernels = compiled_kernels()
        numba_threads(kernels)
        channels, x_rows = x.shape[1], _rows(x)
        if ctx.needs_input_grad[0]:
            grad_x = torch.empty_like(x, memory_format=torch.channels_last)
            grad_x_rows = _rows(grad_x)
        else:
            grad_x, grad_x_rows = None, np.empty((0, channels), dtype=x_rows.dtype)
        grad_weight, grad_bias = torch.empty(channels, dtype=x.dtype), torch.empty(channels, dtype=x.dtype)
        grad_rows, column = row_block(grad)
        kernels.backward(
            grad_rows, column, x_rows, statistics.numpy(), affine.numpy(), ctx.relu,
            grad_x_rows, grad_weight.numpy(), grad_bias.numpy(),
        )  # fmt: skip
        return grad_x, grad_weight, grad_bias, None, None, None, None, None


class BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` (same parameters, buffers, state dict and results) with faster paths for CPU
    training on channels_last inputs: ``bn_kernel`` where numba is installed, otherwise the wide view
    where it pays (see the module docstring).

    ``relu=True`` applies ReLU to the result, in the same kernel where it runs (``Layers`` passes it for
    a BatchNorm that a ReLU follows)."""

    def forward(self, x: torch.Tensor, relu: bool = False) -> torch.Tensor:
        kernel = kernel_path_applies(self, x)
        if kernel or wide_path_applies(self, x):
            self.num_batches_tracked.add_(1)
            momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            args = (x, self.weight, self.bias, self.running_mean, self.running_var, momentum, self.eps)
            if kernel:
                return _KernelBatchNorm.apply(*args, relu)
            out = _WideBatchNorm.apply(*args)
        else:
            out = super().forward(x)
        return out.relu_() if relu else out


def fuses_relu(layer: nn.Module, relu: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``Layers`` runs ``layer`` followed by ``relu`` on ``x`` as one ``bn_kernel`` call: hooks on
    the ReLU module would not run, so it has none (nor are there global ones)."""
    return (
        type(relu) is nn.ReLU and kernel_path_applies(layer, x)
        and not (relu._forward_hooks or relu._forward_pre_hooks)
        and not (nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks)
    )  # fmt: skip


class Layers(nn.Sequential):
    """``nn.Sequential`` (same children, names and state dict) that runs a ``BatchNorm2d`` and the ReLU
    after it as one kernel call where ``bn_kernel`` trains them: one pass fewer each way over the
    activation, and no ReLU output or mask to keep."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layers = list(self._modules.values())
        i = 0
        while i < len(layers):
            if i + 1 < len(layers) and fuses_relu(layers[i], layers[i + 1], x):
                x, i = layers[i](x, relu=True), i + 2
            else:
                x, i = layers[i](x), i + 1
        return x


def is_local_batchnorm(module: nn.Module) -> bool:
    """A BatchNorm over this process's batch only: ``nn.BatchNorm2d`` or this module's ``BatchNorm2d``, not a
    subclass that changes the statistics (``AllReduceBatchNorm2d``, ``nn.SyncBatchNorm``)."""
    return type(module) in (nn.BatchNorm2d, BatchNorm2d)
