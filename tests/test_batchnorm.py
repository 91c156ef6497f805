"""The wide-view BatchNorm2d (CPU training, channels_last) against nn.BatchNorm2d, in float64."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from shufflenetv2.batchnorm import (
    BatchNorm2d,
    batch_statistics,
    columns_per_channel,
    gradient_sums,
    wide_path_applies,
)
from shufflenetv2.model import build_network

CL = torch.channels_last


def twins(channels: int, momentum: float | None = 0.1, seed: int = 0) -> tuple[nn.BatchNorm2d, BatchNorm2d]:
    torch.manual_seed(seed)
    reference = nn.BatchNorm2d(channels, momentum=momentum).double()
    with torch.no_grad():
        reference.weight.uniform_(-1.5, 1.5)  # negative weights too: nothing here depends on the sign
        reference.bias.normal_()
        reference.running_mean.normal_()
        reference.running_var.uniform_(0.5, 2.0)
    ours = BatchNorm2d(channels, momentum=momentum).double()
    ours.load_state_dict(reference.state_dict())
    return reference, ours


def train_steps(module: nn.Module, inputs: list[torch.Tensor], grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """Outputs, input gradients and parameter gradients of a few training steps, then the buffers."""
    results = []
    for x, g in zip(inputs, grads, strict=True):
        x = x.clone().requires_grad_()
        out = module(x)
        out.backward(g)
        results += [out.detach(), x.grad, module.weight.grad.clone(), module.bias.grad.clone()]
        module.weight.grad, module.bias.grad = None, None
    return [*results, module.running_mean, module.running_var, module.num_batches_tracked]


def data(shape: tuple[int, ...], steps: int = 3, layout: torch.memory_format = CL, seed: int = 1) -> tuple[list, list]:
    generator = torch.Generator().manual_seed(seed)
    inputs = [(torch.randn(shape, generator=generator, dtype=torch.float64) * 3 + 2).contiguous(memory_format=layout)]
    inputs += [torch.randn(shape, generator=generator, dtype=torch.float64).contiguous(memory_format=layout)]
    inputs = (inputs * steps)[:steps]
    grads = [torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(steps)]
    return inputs, grads


@pytest.mark.parametrize(
    ("shape", "k"),
    [((4, 24, 10, 10), 2), ((2, 58, 8, 8), 8), ((3, 6, 8, 6), 8), ((2, 60, 2, 3), 4), ((2, 9, 4, 4), 16)],
)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_wide_path_equals_batchnorm(shape: tuple[int, ...], k: int, momentum: float | None) -> None:
    reference, ours = twins(shape[1], momentum)
    inputs, grads = data(shape)
    assert columns_per_channel(inputs[0]) == k and wide_path_applies(ours, inputs[0])
    expected, got = train_steps(reference, inputs, grads), train_steps(ours, inputs, grads)
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)
    assert got[0].is_contiguous(memory_format=CL) and got[1].is_contiguous(memory_format=CL)


@pytest.mark.parametrize(
    "case",
    ["contiguous", "multiple of 16", "64 or more", "pixels do not split", "evaluation", "no running stats", "autocast"],
)
def test_other_cases_take_plain_batchnorm(case: str) -> None:
    shapes = {"multiple of 16": (2, 32, 4, 4), "64 or more": (2, 116, 4, 4), "pixels do not split": (1, 24, 3, 3)}
    shape = shapes.get(case, (2, 24, 4, 4))
    reference, ours = twins(shape[1])
    if case == "no running stats":
        reference.track_running_stats = ours.track_running_stats = False
        reference.running_mean = reference.running_var = ours.running_mean = ours.running_var = None
    layout = torch.contiguous_format if case == "contiguous" else CL
    inputs, grads = data(shape, layout=layout)
    if case == "evaluation":
        reference.eval(), ours.eval()
    if case == "autocast":
        assert wide_path_applies(ours, inputs[0])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not wide_path_applies(ours, inputs[0])
        return
    assert not wide_path_applies(ours, inputs[0])
    expected, got = train_steps(reference, inputs, grads), train_steps(ours, inputs, grads)
    for e, g in zip(expected, got, strict=True):
        assert (e is None and g is None) or torch.equal(g, e)  # the same kernels: bit for bit


def test_gradient_in_another_layout() -> None:
    """The wide path's backward accepts a gradient laid out NCHW (it makes it NHWC first)."""
    reference, ours = twins(24)
    inputs, grads = data((2, 24, 6, 6), steps=1)
    results = []
    for module in (reference, ours):
        x = inputs[0].clone().requires_grad_()
        (module(x).contiguous() * grads[0].contiguous()).sum().backward()
        results.append((x.grad, module.weight.grad))
    for e, g in zip(*results, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)


def test_gradcheck() -> None:
    _, ours = twins(6)
    x = torch.randn(2, 6, 4, 2, dtype=torch.float64).contiguous(memory_format=CL).requires_grad_()
    assert wide_path_applies(ours, x)
    ours.momentum = 0.0  # gradcheck runs the forward many times: keep the running statistics where they are
    assert torch.autograd.gradcheck(lambda v: ours(v), (x,))


def test_statistics_and_gradient_sums_against_formulas() -> None:
    torch.manual_seed(0)
    x = (torch.randn(4, 24, 6, 6, dtype=torch.float64) * 2 + 1).contiguous(memory_format=CL)
    g = torch.randn_like(x)
    running_mean, running_var = torch.zeros(24, dtype=torch.float64), torch.ones(24, dtype=torch.float64)
    mean, var = batch_statistics(x, running_mean, running_var, 0.25)
    torch.testing.assert_close(mean, x.mean((0, 2, 3)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var, x.var((0, 2, 3), unbiased=False), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(running_mean, 0.25 * mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(running_var, 0.75 + 0.25 * x.var((0, 2, 3), unbiased=True), rtol=1e-12, atol=1e-12)
    weighted, plain = gradient_sums(g, x, mean, var, 1e-5)
    xhat = (x - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + 1e-5)
    torch.testing.assert_close(weighted, (g * xhat).sum((0, 2, 3)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(plain, g.sum((0, 2, 3)), rtol=1e-12, atol=1e-12)


def test_state_dict_is_batchnorms() -> None:
    reference, ours = twins(24)
    assert ours.state_dict().keys() == reference.state_dict().keys()
    plain = nn.BatchNorm2d(24).double()
    plain.load_state_dict(ours.state_dict())
    assert all(torch.equal(plain.state_dict()[key], value) for key, value in ours.state_dict().items())


def test_network_channels_last_training_equals_plain_batchnorm() -> None:
    """x0.5's stage-2 activations have 24 channels: the whole network, float64, channels_last, one step."""
    torch.manual_seed(0)
    ours = build_network("shufflenet_v2_x0_5", num_classes=10).double().to(memory_format=CL).train()
    plain = copy.deepcopy(ours)
    for module in plain.modules():
        if type(module) is BatchNorm2d:
            module.__class__ = nn.BatchNorm2d
    wide = []
    for module in ours.modules():
        if type(module) is BatchNorm2d:
            module.register_forward_pre_hook(lambda m, args: wide.append(wide_path_applies(m, args[0])))
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64).contiguous(memory_format=CL)
    labels = torch.tensor([3, 7])
    for net in (ours, plain):
        nn.functional.cross_entropy(net(x), labels).backward()
    assert sum(wide) == 14  # stage 2's 24-channel BatchNorms (the stem's statistics take the same path)
    for (name, a), b in zip(ours.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-10, msg=name)
    for (name, a), b in zip(ours.named_buffers(), plain.buffers(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)
