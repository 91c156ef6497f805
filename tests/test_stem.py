"""The stem's pooling-first BatchNorm-ReLU-pool (CPU training) against the modules run one by one."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from shufflenetv2 import batchnorm, stem
from shufflenetv2.model import build_network
from shufflenetv2.stem import StemPool, stem_forward

KERNELS = batchnorm.compiled_kernels()


@dataclasses.dataclass
class BackwardPath:
    name: str
    kernel_calls: int = 0


@pytest.fixture(
    params=[
        pytest.param("numba", marks=pytest.mark.skipif(KERNELS is None, reason="numba is not installed")),
        "torch ops",
    ]
)
def backward_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> BackwardPath:
    """The fused backward both ways: ``bn_kernel.pooled_backward`` (numba, channels_last tensors) and
    torch's ops, counting the kernel's calls."""
    path = BackwardPath(request.param)
    if path.name == "numba":
        kernel = stem._pooled_backward

        def counted(*args: object) -> object:
            path.kernel_calls += 1
            return kernel(*args)

        monkeypatch.setattr(stem, "_pooled_backward", counted)
    else:
        monkeypatch.setattr(batchnorm, "compiled_kernels", lambda: None)
    return path


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
def test_pooling_first_is_batchnorm_relu_pool(
    padding: str, size: int, channels_last: bool, backward_path: BackwardPath
) -> None:
    """Forward, every gradient and the running statistics, float64, even and odd sizes, both layouts."""
    modules, pool = stem_modules(), StemPool(padding)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(4, 3, size, size, dtype=torch.float64).contiguous(memory_format=layout)
    with torch.no_grad():
        grad = torch.randn_like(pool(modules(x)))
    assert stem._pools_first(*copy.deepcopy(modules)[:2], x)  # the fused path is the one taken
    expected, got = run(modules, pool, x, grad, fused=False), run(modules, pool, x, grad, fused=True)
    assert (expected["out"] > 0).float().mean() > 0.3  # ReLU really cuts (and really passes)
    for key, value in expected.items():
        assert torch.allclose(got[key], value, rtol=1e-10, atol=1e-12), key
    assert backward_path.kernel_calls == (channels_last and backward_path.name == "numba")


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
    assert stem._pools_first(*modules[:2], x)
    zero = copy.deepcopy(modules)
    with torch.no_grad():
        zero[1].weight[2] = 0.0  # a constant channel: the pool's tie-breaking would pick other positions
    assert not stem._pools_first(*zero[:2], x)
    assert not stem._pools_first(*copy.deepcopy(modules).eval()[:2], x)  # running statistics: plain modules
    assert not stem._pools_first(*modules[:2], x.half())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not stem._pools_first(*modules[:2], x)
    sync = nn.SyncBatchNorm(6)
    assert not stem._pools_first(modules[0], sync, x)
    # the zero-weight network still computes BatchNorm -> ReLU -> pool
    pool = StemPool("same")
    with torch.no_grad():
        assert torch.equal(stem_forward(copy.deepcopy(zero), pool, x), pool(copy.deepcopy(zero)(x)))


@pytest.mark.parametrize("padding", ["same", "symmetric"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_negative_batchnorm_weights_pool_first_through_negated_filters(
    padding: str, channels_last: bool, backward_path: BackwardPath
) -> None:
    """A negative weight makes its channel's map decreasing; the fused path negates that channel's filter and
    must still give BatchNorm -> ReLU -> pool's outputs, gradients and running statistics (float64)."""
    modules, pool = stem_modules(), StemPool(padding)
    with torch.no_grad():
        modules[1].weight[[0, 3, 4]] *= -1
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(4, 3, 33, 33, dtype=torch.float64).contiguous(memory_format=layout)
    with torch.no_grad():
        grad = torch.randn_like(pool(modules(x)))
    assert stem._pools_first(*copy.deepcopy(modules)[:2], x)
    expected, got = run(modules, pool, x, grad, fused=False), run(modules, pool, x, grad, fused=True)
    assert (expected["out"][:, [0, 3, 4]] > 0).float().mean() > 0.2  # the negated channels really pass
    for key, value in expected.items():
        assert torch.allclose(got[key], value, rtol=1e-10, atol=1e-12), key
    assert (got["weight"][[0, 3, 4]] != 0).all() and (got["conv"][[0, 3, 4]] != 0).all()
    assert backward_path.kernel_calls == (channels_last and backward_path.name == "numba")


def as_layout(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.parametrize("target_last", [False, True])
@pytest.mark.parametrize("values_last", [False, True])
def test_the_scatter_is_max_pool_backward_accumulated(target_last: bool, values_last: bool) -> None:
    """In either layout of the target and of the gradient (the scatter must land in the target itself)."""
    torch.manual_seed(0)
    z = torch.randn(3, 5, 9, 11, dtype=torch.float64)
    z[:, :, 2:5, 2:5] = 1.0  # ties, and positions that two windows share
    pooled, indices = torch.ops.aten.max_pool2d_with_indices(z, [3, 3], [2, 2], [1, 1], [1, 1], True)
    values = torch.randn_like(pooled)
    expected = torch.ops.aten.max_pool2d_with_indices_backward(values, z, [3, 3], [2, 2], [1, 1], [1, 1], True, indices)
    target = as_layout(torch.full_like(z, 0.5), target_last)
    stem._scatter_add_planes(target, as_layout(indices, target_last), as_layout(values, values_last))
    assert torch.allclose(target, expected + 0.5, rtol=0, atol=1e-12)


@pytest.mark.parametrize("channels_last", [False, True])
def test_a_second_backward_through_a_retained_graph_recomputes_the_convolution(
    channels_last: bool, backward_path: BackwardPath
) -> None:
    """The first backward writes the gradient of z into z's memory; the second must not see that."""
    modules, pool = stem_modules(), StemPool("same")
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 3, 20, 20, dtype=torch.float64).contiguous(memory_format=layout).requires_grad_()
    grad = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    fused, plain = copy.deepcopy(modules), copy.deepcopy(modules)
    out = stem_forward(fused, pool, x)
    out.backward(grad, retain_graph=True)
    first = (x.grad.clone(), fused[0].weight.grad.clone(), fused[1].weight.grad.clone())
    out.backward(grad)  # accumulates: twice the first backward's gradients
    x_plain = x.detach().clone().requires_grad_()
    pool(plain(x_plain)).backward(grad)
    accumulated = (x.grad, fused[0].weight.grad, fused[1].weight.grad)
    reference = (x_plain.grad, plain[0].weight.grad, plain[1].weight.grad)
    for got, once, expected in zip(accumulated, first, reference, strict=True):
        assert torch.allclose(once, expected, rtol=1e-10, atol=1e-12)
        assert torch.allclose(got, 2 * expected, rtol=1e-10, atol=1e-12)
    assert backward_path.kernel_calls == 2 * (channels_last and backward_path.name == "numba")


def test_a_convolution_others_can_see_or_that_is_not_plain_takes_the_modules() -> None:
    """Forward hooks on the convolution see its output, whose memory the fused backward reuses."""
    modules, pool = stem_modules().float(), StemPool("same")
    x = torch.randn(2, 3, 16, 16)
    seen = []
    handle = modules[0].register_forward_hook(lambda module, inputs, output: seen.append(output))
    assert not stem._pools_first(*modules[:2], x)
    out = stem_forward(modules, pool, x)
    out.sum().backward()
    assert len(seen) == 1 and torch.equal(out, pool(modules[1:](seen[0])))  # the hook's tensor is intact
    handle.remove()
    assert stem._pools_first(*modules[:2], x)
    biased = nn.Conv2d(3, 6, 3, 2, 1)
    assert not stem._pools_first(biased, modules[1], x)
    assert not stem._pools_first(nn.Conv2d(3, 6, 3, 2, 1, bias=False, padding_mode="reflect"), modules[1], x)


@pytest.mark.parametrize("layout", ["mindcv", "torchvision"])
@pytest.mark.parametrize("negative", [False, True])
def test_networks_train_through_it(layout: str, negative: bool, backward_path: BackwardPath) -> None:
    """A whole network's training step is the same with the stem's modules run one by one, also with some
    stem BatchNorm weights negative (as training leaves them)."""
    torch.manual_seed(0)
    net = build_network("shufflenet_v2_x0_5", num_classes=10, layout=layout).double().train()
    stem_seq = net.first_conv if layout == "mindcv" else net.conv1
    if negative:
        with torch.no_grad():
            stem_seq[1].weight[::3] *= -1
    plain = copy.deepcopy(net)
    plain.forward_features = lambda x: _features_without_fusion(plain, x)
    net, plain = net.to(memory_format=torch.channels_last), plain.to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 64, 64, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    assert stem._pools_first(*stem_seq[:2], x)
    for model in (net, plain):
        model(x).logsumexp(1).sum().backward()
    assert backward_path.kernel_calls == (backward_path.name == "numba")
    for (name, a), b in zip(net.named_parameters(), plain.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, rtol=1e-9, atol=1e-12), name


def _features_without_fusion(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if net.layout == "mindcv":
        return net.conv_last(net.features(net.max_pool(net.first_conv(x))))
    x = net.maxpool(net.conv1(x))
    return net.conv5(net.stage4(net.stage3(net.stage2(x))))
