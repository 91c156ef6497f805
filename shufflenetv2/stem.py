"""The stem's max-pool (MindSpore's "same" padding or PyTorch's symmetric one) and, for CPU training, the
stem's convolution, BatchNorm, ReLU and pool in one autograd function that pools first.

At batch 32 and 224 px the stem's 24-channel 112 x 112 activation is 38.5 MB, about 30 % of all the
BatchNorm data of a step, and its BatchNorm, ReLU and max-pool, forward and backward, take a quarter of
a CPU training step.  BatchNorm's affine map ``scale * z + shift`` (``scale = weight / std``) is increasing
when ``scale > 0`` (``stem_forward`` negates the channels where it is not) and ReLU is increasing, so
``maxpool(relu(scale * z + shift)) == relu(scale * maxpool(z) + shift)`` exactly, rounding included.
Pooling the convolution's output first leaves the affine map and the ReLU a quarter of the data; in the
backward, BatchNorm's sums over the gradient (zero except at the pooled maxima) are sums over the pooled
tensor, and the gradient of ``z`` is one per-channel affine function of ``z`` plus one scatter, written
into ``z``'s own memory.  Batch statistics, running statistics and gradients are BatchNorm's (float64
tests: 1e-10).  With numba (the fast-cpu extra) and channels_last tensors the statistics and that
backward run in ``bn_kernel`` (``moments``, ``pooled_backward``): two passes instead of seven ops.
"""

from __future__ import annotations

from types import ModuleType

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import FunctionCtx, once_differentiable

from . import batchnorm
from .batchnorm import (
    batch_statistics,
    channel_affine,
    gradient_sums,
    is_local_batchnorm,
    is_nhwc,
    kernel_layout,
    numba_threads,
    row_block,
)

STEM_POOLS = ("same", "symmetric")


def same_max_pool(x: torch.Tensor) -> torch.Tensor:
    """3x3/2 max-pool with "same" padding, without materialising the padding.

    On an even axis the one -inf row after is what ceil_mode's last, partial window sees; on an odd
    axis it is the symmetric pool.  Same values and gradients as F.pad + max_pool2d (tested), minus a
    copy of the stem's output each way, about 15 % of a CPU training step at 224 px.
    """
    padding, ceil_mode = _pool_geometry("same", x)
    return F.max_pool2d(x, 3, 2, padding=padding, ceil_mode=ceil_mode)


def _pool_geometry(padding: str, x: torch.Tensor) -> tuple[list[int], bool]:
    """max_pool2d's padding and ceil_mode for a 3x3/2 stem pool of this kind on ``x``."""
    if padding == "symmetric":
        return [1, 1], False
    return [x.shape[-2] % 2, x.shape[-1] % 2], True


class StemPool(nn.Module):
    """3x3/2 max-pool with either MindSpore's "same" padding or PyTorch's symmetric padding of 1.

    "same" pads ``1 + n % 2`` in total per axis, the odd one after: (0, 1) on even sizes, (1, 1) on
    odd ones.  On odd sizes it therefore equals the symmetric pool; on even sizes (224 px inputs)
    the two differ and so do the logits.
    """

    def __init__(self, padding: str = "same") -> None:
        super().__init__()
        if padding not in STEM_POOLS:
            raise ValueError(f"stem pool padding must be one of {STEM_POOLS}, got {padding!r}")
        self.padding = padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == "symmetric":
            return F.max_pool2d(x, 3, 2, 1)
        if torch.onnx.is_in_onnx_export():  # one MaxPool node, right for any input size (see _SamePoolOnnx)
            return _SamePoolOnnx.apply(x)
        return same_max_pool(x)

    def extra_repr(self) -> str:
        return f"padding={self.padding!r}"


class _SamePoolOnnx(torch.autograd.Function):
    """The "same" stem pool for ONNX export: ``MaxPool(auto_pad=SAME_UPPER)`` is MindSpore's "same" by
    definition (the odd padding pixel after), and ONNX Runtime keeps it in its blocked NCHWc layout.
    An explicit ``Pad`` there costs a round trip out of that layout, about a fifth of the whole graph's
    time at batch 32 (measured with ORT's profiler)."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        return same_max_pool(x)

    @staticmethod
    def symbolic(g: object, x: object) -> object:
        return g.op("MaxPool", x, kernel_shape_i=[3, 3], strides_i=[2, 2], auto_pad_s="SAME_UPPER")


def stem_forward(conv_bn_relu: nn.Sequential, pool: StemPool, x: torch.Tensor) -> torch.Tensor:
    """``pool(conv_bn_relu(x))``; convolution, BatchNorm, ReLU and pool are one pooling-first function when
    that is exact and pays: CPU training in float32/float64 with plain BatchNorm and no weight exactly 0.

    A channel whose BatchNorm weight is negative has a decreasing map, whose maximum over a window sits at
    the minimum of ``z``.  Its convolution filter is negated instead (``z`` becomes ``-z``, exactly), which
    makes the channel's weight ``|w|`` and its map increasing again; the running mean is kept negated
    around the call, and autograd carries the sign back to the filter's and the weight's gradients.  Such
    weights are no corner case: x0.5 with MindCV's recipe (lr 0.35) at batch 32 had 4 of its 24 stem
    weights negative after one epoch on the hymenoptera photos.  A weight of exactly 0 makes the channel
    constant, where the pool's tie-breaking picks another position than the pooling-first order would.

    Elsewhere ``conv_bn_relu`` and ``pool`` run as they are: on GPUs (fast BatchNorm kernels, and the
    weight check would synchronise), under autocast, torch.compile (inductor fuses them itself) or FX
    tracing, for SyncBatchNorm, when a weight is 0, and when the convolution has forward hooks (they would
    see its output, whose memory the fused backward reuses).  In the fused path hooks on ``conv_bn_relu``
    do not run.
    """
    conv, bn, _ = conv_bn_relu
    if not _pools_first(conv, bn, x):
        return pool(conv_bn_relu(x))
    bn.num_batches_tracked.add_(1)  # what BatchNorm's forward does before normalising
    momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    conv_geometry = (conv.stride, conv.padding)
    conv_weight, weight = conv.weight, bn.weight
    negative = weight.detach() < 0
    flipped = bool(negative.any())
    if flipped:
        sign = torch.where(negative, -1.0, 1.0).to(weight.dtype)
        conv_weight, weight = conv_weight * sign.view(-1, 1, 1, 1), weight * sign
        bn.running_mean.mul_(sign)  # the negated channels' statistics are those of -z
    try:
        return _ConvBatchNormReLUPool.apply(
            x, conv_weight, weight, bn.bias, bn.running_mean, bn.running_var, momentum, bn.eps,
            conv_geometry, pool.padding,
        )  # fmt: skip
    finally:
        if flipped:
            bn.running_mean.mul_(sign)


def _plain_conv(conv: nn.Module) -> bool:
    """A bias-free, ungrouped, zero-padded Conv2d whose output nothing else sees (no forward hooks)."""
    return (
        type(conv) is nn.Conv2d and conv.bias is None and conv.groups == 1 and conv.dilation == (1, 1)
        and conv.padding_mode == "zeros" and isinstance(conv.padding, tuple)
        and not (conv._forward_hooks or conv._forward_pre_hooks)
        and not (nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks)
    )  # fmt: skip


def _pools_first(conv: nn.Module, bn: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``stem_forward`` takes the pooling-first function for the stem input ``x``."""
    return (
        _plain_conv(conv) and is_local_batchnorm(bn)
        and bn.training and bn.track_running_stats and bn.affine
        and not isinstance(x, torch.fx.Proxy) and not torch.compiler.is_compiling()
        and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
        and not torch.is_autocast_enabled("cpu") and bool((bn.weight != 0).all())
    )  # fmt: skip


class _ConvBatchNormReLUPool(torch.autograd.Function):
    """``maxpool(relu(batch_norm(conv(x))))`` in training mode, computed as ``relu(scale * maxpool(z) + shift)``
    with ``z = conv(x)``.

    ``z`` (38.5 MB at batch 32, 224 px) lives only in here, so the backward writes the gradient of ``z``
    into ``z``'s own memory: one in-place affine pass and a scatter-add, where a separate gradient took
    a zero-filled 38.5 MB tensor, ``max_pool2d_with_indices_backward`` and two more passes.  That is a
    38.5 MB smaller peak and 11.3 -> 9.7 ms at that size with ``host_memory.keep_freed_memory`` (the
    default); where malloc hands such blocks back to the system, the fresh tensor's page faults made
    it 23–29 ms.  A second backward through a retained graph recomputes ``z``.
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        x: torch.Tensor,
        conv_weight: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor,
        running_mean: torch.Tensor,
        running_var: torch.Tensor,
        momentum: float,
        eps: float,
        conv_geometry: tuple[tuple[int, int], tuple[int, int]],
        pool_padding: str,
    ) -> torch.Tensor:
        stride, padding = conv_geometry
        z = F.conv2d(x, conv_weight, None, stride, padding)
        mean, var = batch_statistics(z, running_mean, running_var, momentum)  # running ones updated too
        invstd = torch.rsqrt(var + eps)
        scale = weight * invstd
        shift = bias - mean * scale  # BatchNorm's CPU kernel computes scale * z + shift, as here
        pool_pads, ceil_mode = _pool_geometry(pool_padding, z)
        pooled, indices = torch.ops.aten.max_pool2d_with_indices(z, [3, 3], [2, 2], pool_pads, [1, 1], ceil_mode)
        out = channel_affine(pooled, scale, shift).relu_()
        ctx.save_for_backward(x, conv_weight, pooled, indices, out, weight, mean, var)
        ctx.z, ctx.conv_geometry, ctx.eps = z, conv_geometry, eps
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, conv_weight, pooled, indices, out, weight, mean, var = ctx.saved_tensors
        stride, padding = ctx.conv_geometry
        z, ctx.z = ctx.z, None
        if z is None:  # the first backward turned z into its gradient
            z = F.conv2d(x, conv_weight, None, stride, padding)
        # asked through the module, so that one switch (batchnorm.compiled_kernels) covers BatchNorm and the stem
        kernels = batchnorm.compiled_kernels() if all(map(kernel_layout, (z, pooled, indices, out))) else None
        if kernels is not None:  # _torch_pooled_backward's steps in two passes of bn_kernel.pooled_backward
            grad_weight, grad_bias = _pooled_backward(
                kernels, grad, pooled, out, indices, weight, mean, var, ctx.eps, z
            )
            grad_z = z
        else:
            grad_z, grad_weight, grad_bias = _torch_pooled_backward(
                grad, pooled, out, indices, weight, mean, var, ctx.eps, z
            )
        grad_x, grad_conv_weight, _ = torch.ops.aten.convolution_backward(
            grad_z, x, conv_weight, None, stride, padding, [1, 1], False, [0, 0], 1,
            [ctx.needs_input_grad[0], ctx.needs_input_grad[1], False],
        )  # fmt: skip
        return grad_x, grad_conv_weight, grad_weight, grad_bias, None, None, None, None, None, None


def _torch_pooled_backward(
    grad: torch.Tensor,
    pooled: torch.Tensor,
    out: torch.Tensor,
    indices: torch.Tensor,
    weight: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    eps: float,
    z: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradient of ``z`` (written into ``z``) and BatchNorm's weight and bias gradients, in torch's ops."""
    grad = torch.ops.aten.threshold_backward(grad, out, 0)  # ReLU's
    # BatchNorm's gradient sums over z: the gradient is zero off the pooled maxima, so they are sums
    # over the pooled tensor (a position two windows share counts twice, as its gradient does)
    grad_weight, grad_bias = gradient_sums(grad, pooled, mean, var, eps)
    count = z.numel() // z.shape[1]
    invstd = torch.rsqrt(var + eps)
    scale = weight * invstd
    # dL/dz = scale * (g - sum(g) / n - zhat * sum(g * zhat) / n), zhat = (z - mean) * invstd:
    # a per-channel affine function c1 * z + c0, plus scale * g added where the pool took its maxima
    c1 = -scale * invstd * grad_weight / count
    c0 = -scale * grad_bias / count - c1 * mean
    grad_z = channel_affine(z, c1, c0, out=z)
    # indices count positions within each (image, channel) plane: flattened, they index its pixels
    _scatter_add_planes(grad_z, indices, grad * scale.view(1, -1, 1, 1))
    return grad_z, grad_weight, grad_bias


def _pooled_backward(
    kernels: ModuleType,
    grad: torch.Tensor,
    pooled: torch.Tensor,
    out: torch.Tensor,
    indices: torch.Tensor,
    weight: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    eps: float,
    z: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchNorm's weight and bias gradients, with ``z`` turned into its own gradient, by ``bn_kernel``."""
    numba_threads(kernels)
    n, c = z.shape[:2]
    statistics = torch.stack((mean, var, var)).double()
    statistics[2] = torch.rsqrt(statistics[1] + eps)  # mean, variance, 1 / std: the kernels' layout
    scale = weight.detach() * torch.rsqrt(var + eps)
    grad_weight, grad_bias = torch.empty_like(weight), torch.empty_like(weight)
    grad_rows, column = row_block(grad)

    def images(t: torch.Tensor) -> np.ndarray:  # (N, pixels, C) of an NHWC tensor
        return t.detach().permute(0, 2, 3, 1).reshape(n, -1, c).numpy()

    kernels.pooled_backward(
        grad_rows, column, images(pooled), images(out), images(indices), statistics.numpy(),
        scale.numpy(), images(z), grad_weight.numpy(), grad_bias.numpy(),
    )  # fmt: skip
    return grad_weight, grad_bias


def _scatter_add_planes(target: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> None:
    """``target[n, c].view(-1)[indices[n, c]] += values[n, c]`` (the max-pool's backward, accumulated).

    The scatter runs along the pixels of a (N, pixels, C) view for channels_last tensors and of an
    (N, C, pixels) one otherwise: along the axis that is not innermost in memory.  Along the other one
    torch's kernel took about three times as long on the stem's 38.5 MB (19 against 5.6 ms)."""
    n, c = target.shape[:2]
    if is_nhwc(target):
        target.permute(0, 2, 3, 1).view(n, -1, c).scatter_add_(  # a view: the sums land in target
            1, indices.permute(0, 2, 3, 1).reshape(n, -1, c), values.permute(0, 2, 3, 1).reshape(n, -1, c)
        )
    else:
        target.view(n, c, -1).scatter_add_(2, indices.reshape(n, c, -1), values.reshape(n, c, -1))
