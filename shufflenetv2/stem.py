"""The stem's max-pool (MindSpore's "same" padding or PyTorch's symmetric one) and, for CPU training, the
stem's BatchNorm, ReLU and pool in one autograd function that pools first.

At batch 32 and 224 px the stem's 24-channel 112 x 112 activation is 38.5 MB, about 30 % of all the
BatchNorm data of a step, and its BatchNorm, ReLU and max-pool, forward and backward, take a quarter of
a CPU training step.  BatchNorm's affine map ``scale * z + shift`` (``scale = weight / std``) is increasing
when ``scale > 0`` and ReLU is increasing, so ``maxpool(relu(scale * z + shift)) ==
relu(scale * maxpool(z) + shift)`` exactly, rounding included.  Pooling the convolution's output first
leaves the affine map and the ReLU a quarter of the data; in the backward, BatchNorm's sums over the
gradient (zero except at the pooled maxima) are sums over the pooled tensor, and the input gradient is
one scatter plus one per-channel affine function of ``z``.  Batch statistics, running statistics and
gradients are BatchNorm's (float64 tests: 1e-10).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import FunctionCtx, once_differentiable

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
    """``pool(conv_bn_relu(x))``; BatchNorm, ReLU and pool are one pooling-first function when that is
    exact and pays: CPU training in float32/float64 with plain BatchNorm and every weight positive.

    Elsewhere ``conv_bn_relu`` and ``pool`` run as they are: on GPUs (fast BatchNorm kernels, and the
    weight check would synchronise), under autocast, torch.compile (inductor fuses them itself) or FX
    tracing, for SyncBatchNorm, and when a weight is not positive (that channel's map decreases, and
    the pool would have to take minima).  In the fused path forward hooks on ``conv_bn_relu`` do not run.
    """
    conv, bn, _ = conv_bn_relu
    if not _pools_first(bn, x):
        return pool(conv_bn_relu(x))
    z = conv(x)
    bn.num_batches_tracked.add_(1)  # what BatchNorm's forward does before normalising
    momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    padding, ceil_mode = _pool_geometry(pool.padding, z)
    return _BatchNormReLUPool.apply(
        z, bn.weight, bn.bias, bn.running_mean, bn.running_var, momentum, bn.eps, padding, ceil_mode
    )


def _pools_first(bn: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``stem_forward`` takes the pooling-first function for the stem input ``x``."""
    return (
        type(bn) is nn.BatchNorm2d and bn.training and bn.track_running_stats and bn.affine
        and not isinstance(x, torch.fx.Proxy) and not torch.compiler.is_compiling()
        and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
        and not torch.is_autocast_enabled("cpu") and bool((bn.weight > 0).all())
    )  # fmt: skip


class _BatchNormReLUPool(torch.autograd.Function):
    """``maxpool(relu(batch_norm(z)))`` in training mode, computed as ``relu(scale * maxpool(z) + shift)``."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        z: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor,
        running_mean: torch.Tensor,
        running_var: torch.Tensor,
        momentum: float,
        eps: float,
        padding: list[int],
        ceil_mode: bool,
    ) -> torch.Tensor:
        # BatchNorm's own statistics kernel; it also updates the running mean and (unbiased) variance
        mean, var = torch.batch_norm_update_stats(z, running_mean, running_var, momentum)
        invstd = torch.rsqrt(var + eps)
        scale = weight * invstd
        shift = bias - mean * scale  # BatchNorm's CPU kernel computes scale * z + shift, as here
        pooled, indices = torch.ops.aten.max_pool2d_with_indices(z, [3, 3], [2, 2], padding, [1, 1], ceil_mode)
        out = torch.addcmul(shift.view(1, -1, 1, 1), pooled, scale.view(1, -1, 1, 1)).relu_()
        ctx.save_for_backward(z, pooled, indices, out, weight, mean, invstd)
        ctx.geometry, ctx.eps = (padding, ceil_mode), eps
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        z, pooled, indices, out, weight, mean, invstd = ctx.saved_tensors
        padding, ceil_mode = ctx.geometry
        grad = torch.ops.aten.threshold_backward(grad, out, 0)  # ReLU's
        # BatchNorm's gradient sums over z: the gradient is zero off the pooled maxima, so they are sums
        # over the pooled tensor (a position two windows share counts twice, as its gradient does)
        _, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
            grad, pooled, weight, None, None, mean, invstd, True, ctx.eps, [False, True, True]
        )
        count = z.numel() // z.shape[1]
        scale = weight * invstd
        # dL/dz = scale * (g - sum(g) / n - zhat * sum(g * zhat) / n), zhat = (z - mean) * invstd:
        # the scattered scale * g plus a per-channel affine function c1 * z + c0
        c1 = -scale * invstd * grad_weight / count
        c0 = -scale * grad_bias / count - c1 * mean
        grad_z = torch.ops.aten.max_pool2d_with_indices_backward(
            grad * scale.view(1, -1, 1, 1), z, [3, 3], [2, 2], padding, [1, 1], ceil_mode, indices
        )
        grad_z.addcmul_(z, c1.view(1, -1, 1, 1)).add_(c0.view(1, -1, 1, 1))
        return grad_z, grad_weight, grad_bias, None, None, None, None, None, None
