"""BatchNorm2d for CPU training on channels_last tensors with few channels (not a multiple of 16, under 64).

PyTorch's channels_last BatchNorm kernels treat the tensor as a (pixels, C) matrix and walk it one
row of C values at a time.  With C = 24 (every stage-2 activation of x0.5, and the stem of every
width) or 58 (stage 2 of x1.0) those rows are too short for the vector loop to pay for itself: at
batch 32, on this project's 2-core CPU, a 24-channel 56 x 56 BatchNorm took 1.9 ms forward and 9.8 ms
backward, 1.3 and 2.2 ms through the wide view below; 24 channels at 28 x 28, 0.67 and 2.85 against
0.49 and 0.59 ms; the stem's statistics (24 channels, 112 x 112) 12.6 against 3.7 ms (ad-hoc
microbenchmarks, not committed; ``shufflenetv2 bench --suites train`` measures the whole step).

An NHWC tensor is, in memory, a (pixels, C) matrix, and also a (pixels / k, k * C) one whose column j
holds channel ``j % C``.  Both of BatchNorm's reductions (the batch statistics forward, the sums of
the gradient backward) run on that wider matrix, whose rows are long enough, and the k partial results
of each channel are then combined; the per-element maps use per-column copies of the per-channel
scale and shift.  The result is BatchNorm's, with the statistics summed in another order (float64
tests: 1e-10).  Everything else (other layouts, GPUs, evaluation, autocast, compilation) is plain
``nn.BatchNorm2d``.
"""

from __future__ import annotations

import math

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
    variance of the column means."""
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
    return (
        not isinstance(x, torch.fx.Proxy) and not torch.compiler.is_compiling()
        and bn.training and bn.track_running_stats and bn.affine and bn.running_mean is not None
        and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
        and not torch.is_autocast_enabled("cpu") and columns_per_channel(x) > 1
    )  # fmt: skip


class BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` (same parameters, buffers, state dict and results) with the wide-view kernels
    for CPU training on channels_last inputs where they pay (see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not wide_path_applies(self, x):
            return super().forward(x)
        self.num_batches_tracked.add_(1)
        momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        return _WideBatchNorm.apply(x, self.weight, self.bias, self.running_mean, self.running_var, momentum, self.eps)


def is_local_batchnorm(module: nn.Module) -> bool:
    """A BatchNorm over this process's batch only: ``nn.BatchNorm2d`` or this module's ``BatchNorm2d``, not a
    subclass that changes the statistics (``AllReduceBatchNorm2d``, ``nn.SyncBatchNorm``)."""
    return type(module) in (nn.BatchNorm2d, BatchNorm2d)
