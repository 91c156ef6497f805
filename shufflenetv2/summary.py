"""Parameter counts, multiply-accumulates and a per-layer table, measured on the real module."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class LayerRow:
    name: str
    kind: str
    output_shape: tuple[int, ...]
    params: int
    macs: int


@dataclass
class ModelSummary:
    trainable_params: int
    params_with_bn_stats: int  # what MindCV's README calls params(M): also counts moving mean/variance
    macs: int
    input_size: tuple[int, int]
    layers: list[LayerRow]


def _layer_macs(module: nn.Module, output: torch.Tensor) -> int:
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return output[0].numel() * (module.in_channels // module.groups) * kh * kw
    if isinstance(module, nn.Linear):
        return output[0].numel() * module.in_features
    return 0


def summarize(model: nn.Module, input_size: tuple[int, int] = (224, 224)) -> ModelSummary:
    """Run one image through ``model`` (in eval mode, restored afterwards) and tally every conv/linear."""
    rows: list[LayerRow] = []
    hooks = []

    def record(name: str):
        def hook(module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
            params = sum(p.numel() for p in module.parameters(recurse=False))
            rows.append(
                LayerRow(name, type(module).__name__, tuple(output.shape[1:]), params, _layer_macs(module, output))
            )

        return hook

    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
            hooks.append(module.register_forward_hook(record(name)))
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters())
        x = torch.zeros(1, model.in_channels, *input_size, dtype=param.dtype, device=param.device)
        with torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    stats = sum(b.numel() for n, b in model.named_buffers() if n.endswith(("running_mean", "running_var")))
    return ModelSummary(trainable, trainable + stats, sum(r.macs for r in rows), tuple(input_size), rows)


def format_summary(summary: ModelSummary, title: str, layers: bool = True) -> str:
    lines = []
    if layers:
        lines.append(f"{'layer':<34} {'type':<12} {'output':<16} {'params':>10} {'MACs':>12}")
        for r in summary.layers:
            shape = "x".join(map(str, r.output_shape))
            lines.append(f"{r.name:<34} {r.kind:<12} {shape:<16} {r.params:>10,} {r.macs:>12,}")
        lines.append("")
    h, w = summary.input_size
    totals = [
        ("trainable params", summary.trainable_params),
        ("params with BN statistics", summary.params_with_bn_stats),
        (f"MACs at {h}x{w}", summary.macs),
    ]
    lines.append(title)
    lines += [f"  {label + ':':<28}{value:>14,}  ({value / 1e6:.2f} M)" for label, value in totals]
    return "\n".join(lines)
