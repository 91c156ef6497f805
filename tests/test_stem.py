"""The stem's pooling-first BatchNorm-ReLU-pool (CPU training) against the modules run one by one."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from shufflenetv2 import stem
from shufflenetv2.model import build_network
from shufflenetv2.stem import StemPool, stem_forward


def stem_modules(channels: int = 6, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    modules = nn.Sequential(
        nn.Conv2d(3, channels, 3, 2, 1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(inplace=True)
    )
    with torch.no_grad():
        modules[1].weight.uniform_(0.5, 1.5)
        modules[1].bias.uniform_(-0.5, 0.5)
        modules[1].running_mean.uniform_(-1, 1)
    return modules.double()


def run(modules: nn.Sequential, pool: StemPool, x: torch.Tensor, grad: torch.Tensor, fused: bool) -> dict:
    modules = copy.deepcopy(modules)
    x = x.clone().requires_grad_()
    out = stem_forward(modules, pool, x) if fused else pool(modules(x))
    out.backward(grad)
    bn = modules[1]
    return {
        "out": out.detach(), "x": x.grad, "conv": modules[0].weight.grad, "weight": bn.weight.grad,
        "bias": bn.bias.grad, "running_mean": bn.running_mean, "running_var": bn.running_var,
        "batches": bn.num_batches_tracked,
    }  # fmt: skip


@pytest.mark.parametrize("padding", ["same", "symmetric"])
@pytest.mark.parametrize("size", [32, 33])
@pytest.mark.parametrize("channels_last", [False, True])
def test_pooling_first_is_batchnorm_relu_pool(padding: str, size: int, channels_last: bool) -> None:
    """Forward, every gradient and the running statistics, float64, even and odd sizes, both layouts."""
    modules, pool = stem_modules(), StemPool(padding)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(4, 3, size, size, dtype=torch.float64).contiguous(memory_format=layout)
    with torch.no_grad():
        grad = torch.randn_like(pool(modules(x)))
    assert stem._pools_first(copy.deepcopy(modules)[1], x)  # the fused path is the one taken
    expected, got = run(modules, pool, x, grad, fused=False), run(modules, pool, x, grad, fused=True)
    assert (expected["out"] > 0).float().mean() > 0.3  # ReLU really cuts (and really passes)
    for key, value in expected.items():
        assert torch.allclose(got[key], value, rtol=1e-10, atol=1e-12), key


def test_float32_agrees_to_rounding() -> None:
    modules, pool = stem_modules().float(), StemPool("same")
    x = torch.randn(8, 3, 40, 40).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(8, 6, 10, 10)
    expected, got = run(modules, pool, x, grad, fused=False), run(modules, pool, x, grad, fused=True)
    for key, value in expected.items():
        scale = value.abs().max().clamp_min(1)
        assert (got[key] - value).abs().max() / scale < 1e-5, key


def test_momentum_none_is_the_cumulative_average() -> None:
    modules, pool = stem_modules(), StemPool("same")
    modules[1].momentum = None
    x, grad = torch.randn(2, 3, 16, 16, dtype=torch.float64), torch.randn(2, 6, 4, 4, dtype=torch.float64)
    expected, got = run(modules, pool, x, grad, fused=False), run(modules, pool, x, grad, fused=True)
    assert torch.allclose(got["running_var"], expected["running_var"], rtol=1e-12)
    assert int(got["batches"]) == 1


def test_the_modules_run_as_they_are_where_pooling_first_is_not_exact_or_not_worth_it() -> None:
    modules = stem_modules().float()
    x = torch.randn(2, 3, 16, 16)
    assert stem._pools_first(modules[1], x)
    negative = copy.deepcopy(modules)
    with torch.no_grad():
        negative[1].weight[2] = -0.5  # that channel's map decreases: max-pooling z first would be wrong
    assert not stem._pools_first(negative[1], x)
    assert not stem._pools_first(copy.deepcopy(modules).eval()[1], x)  # running statistics: plain modules
    assert not stem._pools_first(modules[1], x.half())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not stem._pools_first(modules[1], x)
    sync = nn.SyncBatchNorm(6)
    assert not stem._pools_first(sync, x)
    # the negative-weight network still computes BatchNorm -> ReLU -> pool
    pool = StemPool("same")
    with torch.no_grad():
        assert torch.equal(stem_forward(copy.deepcopy(negative), pool, x), pool(copy.deepcopy(negative)(x)))


@pytest.mark.parametrize("layout", ["mindcv", "torchvision"])
def test_networks_train_through_it(layout: str) -> None:
    """A whole network's training step is the same with the stem's modules run one by one."""
    torch.manual_seed(0)
    net = build_network("shufflenet_v2_x0_5", num_classes=10, layout=layout).double().train()
    stem_seq = net.first_conv if layout == "mindcv" else net.conv1
    plain = copy.deepcopy(net)
    plain.forward_features = lambda x: _features_without_fusion(plain, x)
    x = torch.randn(4, 3, 64, 64, dtype=torch.float64)
    assert stem._pools_first(stem_seq[1], x)
    for model in (net, plain):
        model(x).logsumexp(1).sum().backward()
    for (name, a), b in zip(net.named_parameters(), plain.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, rtol=1e-9, atol=1e-12), name


def _features_without_fusion(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if net.layout == "mindcv":
        return net.conv_last(net.features(net.max_pool(net.first_conv(x))))
    x = net.maxpool(net.conv1(x))
    return net.conv5(net.stage4(net.stage3(net.stage2(x))))
