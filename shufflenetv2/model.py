"""The ShuffleNetV2 network in its two published layouts.

``mindcv`` is MindCV's network (identical to Megvii's official one): the channel shuffle happens at the
start of each stride-1 block as an even/odd channel split, the stem max-pool pads TensorFlow-style
("SAME": the extra row/column goes after), the classifier has no bias, and the stride-2 blocks keep
all input channels in the projection branch.

``torchvision`` is torchvision's network: halves split with ``chunk``, a shuffle after every block,
a symmetric stem pool, a biased classifier, and equal branch widths in stride-2 blocks.  Its
parameter names match torchvision's so its state dicts load unchanged.

The two agree on the channel plan only at x0.5 (see ``weights.convert_layout``).  Both accept any
input size (tested from 32 px up) and keep ``forward`` free of Python-side bookkeeping so it compiles cleanly.
"""

from __future__ import annotations

import torch
from torch import nn

from .batchnorm import BatchNorm2d, Layers, is_nhwc
from .stem import StemPool, stem_forward

# stage_out_channels[1:] of MindCV: stem, stage 2, stage 3, stage 4, conv5
WIDTHS: dict[str, tuple[int, int, int, int, int]] = {
    "shufflenet_v2_x0_5": (24, 48, 96, 192, 1024),
    "shufflenet_v2_x1_0": (24, 116, 232, 464, 1024),
    "shufflenet_v2_x1_5": (24, 176, 352, 704, 1024),
    "shufflenet_v2_x2_0": (24, 244, 488, 976, 2048),
}
STAGE_REPEATS = (4, 8, 4)
LAYOUTS = ("mindcv", "torchvision")


def _dw_conv(channels: int, stride: int) -> nn.Conv2d:
    return nn.Conv2d(channels, channels, 3, stride, 1, groups=channels, bias=False)


def _pw_conv(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, 1, 0, bias=False)


def _main_branch(in_channels: int, mid_channels: int, out_channels: int, stride: int) -> Layers:
    """1x1 -> BN -> ReLU -> dw3x3 -> BN -> 1x1 -> BN -> ReLU; indices match both libraries' names."""
    return Layers(
        _pw_conv(in_channels, mid_channels),
        BatchNorm2d(mid_channels),
        nn.ReLU(inplace=True),
        _dw_conv(mid_channels, stride),
        BatchNorm2d(mid_channels),
        _pw_conv(mid_channels, out_channels),
        BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def _proj_branch(in_channels: int, out_channels: int) -> Layers:
    """dw3x3/2 -> BN -> 1x1 -> BN -> ReLU, the shortcut side of a stride-2 block."""
    return Layers(
        _dw_conv(in_channels, 2),
        BatchNorm2d(in_channels),
        _pw_conv(in_channels, out_channels),
        BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def _stem_conv(in_channels: int, out_channels: int) -> Layers:
    return Layers(
        nn.Conv2d(in_channels, out_channels, 3, 2, 1, bias=False),
        BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def _head_conv(in_channels: int, out_channels: int) -> Layers:
    return Layers(_pw_conv(in_channels, out_channels), BatchNorm2d(out_channels), nn.ReLU(inplace=True))


def global_average(x: torch.Tensor) -> torch.Tensor:
    """The mean over H and W.  With gradients it is written as a sum over the count, the same values: the
    sum's backward is a broadcast view of the gradient, where the mean's is a new NCHW tensor, and that
    meets the channels_last activations in the head's ReLU backward, 50x slower than the view (CPU)."""
    if torch.is_grad_enabled():
        return x.sum((2, 3)) / (x.shape[2] * x.shape[3])
    return x.mean((2, 3))  # evaluation and export keep the plain mean (one ReduceMean in ONNX)


class EvenOddSplit(torch.autograd.Function):
    """``x[:, 0::2], x[:, 1::2]`` (MindCV's channel split) with a backward that keeps ``x``'s memory format.

    Autograd's own backward of two slices fills a zero tensor of ``x``'s size per slice, in NCHW, and
    adds them; under channels_last the NCHW gradient then meets NHWC activations in every ReLU and
    BatchNorm backward, which run several times slower on such mixed layouts (measured on CPU).  Here
    the two gradients are written once into one tensor laid out like ``x``.

    The odd channels feed the branch's first convolution, which needs them dense: copied here once, laid
    out like ``x``, rather than by the convolution in its forward and again in its backward (it saves the
    strided view).  The even channels go only into the concatenation, which reads them where they are.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.shape, ctx.dtype, ctx.device = x.shape, x.dtype, x.device
        ctx.layout = torch.channels_last if is_nhwc(x) else torch.contiguous_format
        return x[:, 0::2], x[:, 1::2].contiguous(memory_format=ctx.layout)

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_evens: torch.Tensor | None, grad_odds: torch.Tensor | None
    ) -> torch.Tensor:
        grad = torch.empty(ctx.shape, dtype=ctx.dtype, device=ctx.device, memory_format=ctx.layout)
        grad[:, 0::2] = 0 if grad_evens is None else grad_evens
        grad[:, 1::2] = 0 if grad_odds is None else grad_odds
        return grad


class MindCVBlock(nn.Module):
    """MindCV's ShuffleV2Block.  ``in_channels`` is the whole input for stride 2, half of it for stride 1."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        # branch_main first: MindSpore lists parameters in definition order and so do we
        self.branch_main = _main_branch(in_channels, out_channels // 2, out_channels - in_channels, stride)
        self.branch_proj = _proj_branch(in_channels, in_channels) if stride == 2 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.branch_proj is None:
            evens, odds = EvenOddSplit.apply(x)
            return torch.cat((evens, self.branch_main(odds)), 1)
        return torch.cat((self.branch_proj(x), self.branch_main(x)), 1)


def channel_shuffle(x: torch.Tensor, groups: int = 2) -> torch.Tensor:
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class TorchvisionBlock(nn.Module):
    """torchvision's InvertedResidual: equal-width branches, shuffle after the concatenation."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        half = out_channels // 2
        self.branch1 = _proj_branch(in_channels, half) if stride == 2 else nn.Sequential()
        self.branch2 = _main_branch(in_channels if stride == 2 else half, half, half, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), 1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), 1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    """MindCV's ShuffleNetV2; parameter names are MindCV's (gamma/beta aside, see ``weights``)."""

    layout = "mindcv"

    def __init__(
        self,
        widths: tuple[int, int, int, int, int],
        num_classes: int = 1000,
        in_channels: int = 3,
        stem_pool: str = "same",
        classifier_bias: bool = False,
    ) -> None:
        super().__init__()
        self.widths, self.num_classes, self.in_channels = tuple(widths), num_classes, in_channels
        stem, *stages, last = widths
        self.first_conv = _stem_conv(in_channels, stem)
        self.max_pool = StemPool(stem_pool)
        blocks: list[nn.Module] = []
        channels = stem
        for repeats, out_channels in zip(STAGE_REPEATS, stages, strict=True):
            blocks.append(MindCVBlock(channels, out_channels, 2))
            blocks += [MindCVBlock(out_channels // 2, out_channels, 1) for _ in range(repeats - 1)]
            channels = out_channels
        self.features = nn.Sequential(*blocks)
        self.conv_last = _head_conv(channels, last)
        self.classifier = nn.Linear(last, num_classes, bias=classifier_bias)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """MindCV's init: stem conv and classifier N(0, 0.01), other convs N(0, 1/fan_in_per_group)."""
        if self.classifier.weight.is_meta:  # shapes only (weights.py): drawing there would import torch._dynamo
            return
        for name, module in self.named_modules():
            if isinstance(module, nn.Conv2d):
                std = 0.01 if name.startswith("first") else 1.0 / module.weight.shape[1]
                nn.init.normal_(module.weight, 0.0, std)
            elif isinstance(module, nn.BatchNorm2d):
                module.reset_parameters()
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, 0.01)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_last(self.features(stem_forward(self.first_conv, self.max_pool, x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(global_average(self.forward_features(x)))


class ShuffleNetV2Torchvision(nn.Module):
    """torchvision's ShuffleNetV2 (same parameter names, same PyTorch default init)."""

    layout = "torchvision"

    def __init__(
        self,
        widths: tuple[int, int, int, int, int],
        num_classes: int = 1000,
        in_channels: int = 3,
        stem_pool: str = "symmetric",
        classifier_bias: bool = True,
    ) -> None:
        super().__init__()
        self.widths, self.num_classes, self.in_channels = tuple(widths), num_classes, in_channels
        stem, *stages, last = widths
        self.conv1 = _stem_conv(in_channels, stem)
        self.maxpool = StemPool(stem_pool)
        channels = stem
        for index, (repeats, out_channels) in enumerate(zip(STAGE_REPEATS, stages, strict=True)):
            blocks = [TorchvisionBlock(channels, out_channels, 2)]
            blocks += [TorchvisionBlock(out_channels, out_channels, 1) for _ in range(repeats - 1)]
            setattr(self, f"stage{index + 2}", nn.Sequential(*blocks))
            channels = out_channels
        self.conv5 = _head_conv(channels, last)
        self.fc = nn.Linear(last, num_classes, bias=classifier_bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = stem_forward(self.conv1, self.maxpool, x)
        return self.conv5(self.stage4(self.stage3(self.stage2(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(global_average(self.forward_features(x)))


def build_network(
    name: str,
    num_classes: int = 1000,
    in_channels: int = 3,
    layout: str = "mindcv",
    stem_pool: str | None = None,
    classifier_bias: bool | None = None,
) -> ShuffleNetV2 | ShuffleNetV2Torchvision:
    """A randomly initialised network; ``stem_pool`` / ``classifier_bias`` default to the layout's own."""
    if name not in WIDTHS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(WIDTHS)}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if num_classes < 1 or in_channels < 1:
        raise ValueError(f"num_classes and in_channels must be positive, got {num_classes}, {in_channels}")
    cls = ShuffleNetV2 if layout == "mindcv" else ShuffleNetV2Torchvision
    native = layout == "mindcv"
    return cls(
        WIDTHS[name],
        num_classes,
        in_channels,
        stem_pool=stem_pool or ("same" if native else "symmetric"),
        classifier_bias=(not native) if classifier_bias is None else classifier_bias,
    )


def architecture(model: nn.Module) -> dict[str, object]:
    """What it takes to rebuild ``model``'s structure: stored beside weights in our files."""
    pool = model.max_pool if model.layout == "mindcv" else model.maxpool
    head = model.classifier if model.layout == "mindcv" else model.fc
    name = next(n for n, w in WIDTHS.items() if w == model.widths)
    return {
        "model": name,
        "layout": model.layout,
        "num_classes": model.num_classes,
        "in_channels": model.in_channels,
        "stem_pool": pool.padding,
        "classifier_bias": head.bias is not None,
    }
