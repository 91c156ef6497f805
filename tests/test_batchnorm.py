"""Our BatchNorm2d's CPU training paths (channels_last) against nn.BatchNorm2d, in float64: the wide view
(torch's ops, without numba) and ``bn_kernel`` (numba), alone and fused with the ReLU after it."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from collections.abc import Callable

import pytest
import torch
from torch import nn

from shufflenetv2 import batchnorm
from shufflenetv2.batchnorm import (
    BatchNorm2d,
    Layers,
    batch_statistics,
    columns_per_channel,
    compiled_kernels,
    gradient_sums,
    kernel_path_applies,
    wide_path_applies,
)
from shufflenetv2.distributed import AllReduceBatchNorm2d
from shufflenetv2.model import build_network

CL = torch.channels_last
NEEDS_NUMBA = pytest.mark.skipif(compiled_kernels() is None, reason="numba is not installed (fast-cpu extra)")


@pytest.fixture
def without_numba(monkeypatch: pytest.MonkeyPatch) -> None:
    """BatchNorm2d as it runs where numba is not installed: the wide view, or torch's kernels."""
    monkeypatch.setattr(batchnorm, "compiled_kernels", lambda: None)


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


def train_steps(
    module: nn.Module, inputs: list[torch.Tensor], grads: list[torch.Tensor], forward: Callable | None = None
) -> list[torch.Tensor]:
    """Outputs, input gradients and parameter gradients of a few training steps, then the buffers;
    ``forward`` (default: the module) computes the output from the input."""
    results = []
    for x, g in zip(inputs, grads, strict=True):
        x = x.clone().requires_grad_()
        out = (forward or module)(x)
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
@pytest.mark.usefixtures("without_numba")
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
@pytest.mark.usefixtures("without_numba")
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


@pytest.mark.usefixtures("without_numba")
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


@pytest.mark.usefixtures("without_numba")
def test_gradcheck() -> None:
    _, ours = twins(6)
    x = torch.randn(2, 6, 4, 2, dtype=torch.float64).contiguous(memory_format=CL).requires_grad_()
    assert wide_path_applies(ours, x)
    ours.momentum = 0.0  # gradcheck runs the forward many times: keep the running statistics where they are
    assert torch.autograd.gradcheck(lambda v: ours(v), (x,))


@pytest.mark.parametrize("numba", [pytest.param(True, marks=NEEDS_NUMBA), False])
def test_statistics_and_gradient_sums_against_formulas(numba: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not numba:
        monkeypatch.setattr(batchnorm, "compiled_kernels", lambda: None)
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


@pytest.mark.usefixtures("without_numba")
def test_network_channels_last_training_equals_plain_batchnorm() -> None:
    """Without numba: x0.5's stage-2 activations have 24 channels: the whole network, float64,
    channels_last, one step."""
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


# ---- bn_kernel: numba's BatchNorm (+ ReLU) for channels_last CPU training


def kernel_steps(
    reference: nn.Module, ours: BatchNorm2d, inputs: list, grads: list, relu: bool
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``train_steps`` of nn.BatchNorm2d followed by torch's ReLU, and of ours with ``relu`` passed."""

    def plain(x: torch.Tensor) -> torch.Tensor:
        return torch.relu(reference(x)) if relu else reference(x)

    def fused(x: torch.Tensor) -> torch.Tensor:
        assert kernel_path_applies(ours, x)
        return ours(x, relu=relu)

    return train_steps(reference, inputs, grads, plain), train_steps(ours, inputs, grads, fused)


@NEEDS_NUMBA
@pytest.mark.parametrize("shape", [(4, 24, 10, 10), (2, 58, 8, 8), (3, 5, 3, 4), (2, 1024, 2, 3), (1, 7, 1, 2)])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_kernel_equals_batchnorm(shape: tuple[int, ...], relu: bool, momentum: float | None) -> None:
    """Outputs, input and parameter gradients over three steps, then the running statistics and the count
    (the first batch with mean 2 and std 3); one value in a channel's last row, 1024 channels."""
    reference, ours = twins(shape[1], momentum)
    inputs, grads = data(shape)
    expected, got = kernel_steps(reference, ours, inputs, grads, relu)
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)
    assert got[0].is_contiguous(memory_format=CL) and got[1].is_contiguous(memory_format=CL)


@NEEDS_NUMBA
def test_kernel_float32_stays_within_float32_rounding_of_float64() -> None:
    reference, ours = twins(24)
    ours.float()
    inputs, grads = data((4, 24, 12, 12), steps=1)
    x64, x32 = inputs[0].clone().requires_grad_(), inputs[0].float().requires_grad_()
    out64 = torch.relu(reference(x64))
    out64.backward(grads[0])
    out = ours(x32, relu=True)
    out.backward(grads[0].float())
    expected = (out64, x64.grad, reference.weight.grad, reference.bias.grad)
    got = (out, x32.grad, ours.weight.grad, ours.bias.grad)
    for e, g in zip((*expected, reference.running_var), (*got, ours.running_var), strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.double(), e, rtol=2e-6, atol=2e-6)


@NEEDS_NUMBA
@pytest.mark.parametrize("grad_layout", ["channel slice", "NCHW", "broadcast"])
def test_kernel_takes_gradients_in_any_layout(grad_layout: str) -> None:
    """Concatenation's backward hands a channel slice of a wider NHWC gradient (read in place), a mean's
    backward a broadcast one, and anything else may come: all give BatchNorm's gradients."""
    reference, ours = twins(24)
    x = data((2, 24, 5, 5), steps=1)[0][0]
    wide = torch.randn(2, 60, 5, 5, dtype=torch.float64).contiguous(memory_format=CL)
    grad = {
        "channel slice": wide[:, 30:54],
        "NCHW": torch.randn(2, 24, 5, 5, dtype=torch.float64),
        "broadcast": torch.randn(2, 24, 1, 1, dtype=torch.float64).expand(2, 24, 5, 5),
    }[grad_layout]
    if grad_layout == "channel slice":
        assert batchnorm.row_block(grad)[1] == 30  # read where it is, not copied
    results = []
    for module, fused in ((reference, False), (ours, True)):
        xx = x.clone().requires_grad_()
        out = module(xx, relu=True) if fused else torch.relu(module(xx))
        out.backward(grad)
        results.append((out, xx.grad, module.weight.grad, module.bias.grad))
    for e, g in zip(*results, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)


@NEEDS_NUMBA
def test_kernel_input_without_gradient_and_gradcheck() -> None:
    reference, ours = twins(6)
    x = torch.randn(2, 6, 4, 3, dtype=torch.float64).contiguous(memory_format=CL)
    grad = torch.randn_like(x)
    ours(x, relu=True).backward(grad)
    torch.relu(reference(x)).backward(grad)
    torch.testing.assert_close(ours.weight.grad, reference.weight.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ours.bias.grad, reference.bias.grad, rtol=1e-10, atol=1e-10)
    ours.momentum = 0.0  # gradcheck runs the forward many times: keep the running statistics where they are
    x.requires_grad_()
    assert kernel_path_applies(ours, x)
    assert torch.autograd.gradcheck(lambda v: ours(v), (x,))


@NEEDS_NUMBA
def test_kernel_results_do_not_depend_on_the_thread_count() -> None:
    """The rows split into a fixed number of chunks, summed in a fixed order: bit for bit."""
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            _, ours = twins(24)
            ours.float()
            x = torch.randn(4, 24, 9, 9, generator=torch.Generator().manual_seed(3)) * 2 + 1
            x = x.contiguous(memory_format=CL).requires_grad_()
            out = ours(x, relu=True)
            out.backward(torch.ones_like(out))
            results.append((out, x.grad, ours.weight.grad, ours.running_var))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


THREAD_COUNTS = """
import torch
torch.set_num_threads(1)
import numba
from shufflenetv2.batchnorm import BatchNorm2d, kernel_path_applies
bn = BatchNorm2d(8).train()
x = torch.randn(4, 8, 6, 6).contiguous(memory_format=torch.channels_last).requires_grad_()
assert kernel_path_applies(bn, x)
bn(x, relu=True).sum().backward()
print(torch.get_num_threads(), numba.get_num_threads())
"""


@NEEDS_NUMBA
def test_starting_numbas_threads_leaves_torchs_thread_count_alone() -> None:
    """numba's OpenMP layer, started by the first kernel call, sets the calling thread's OpenMP count to
    all of numba's threads, which torch reads as its own: torchrun's one thread per process, or bench's
    ``--threads``, became every core.  A process of its own: numba starts its threads once."""
    env = {**os.environ, "NUMBA_NUM_THREADS": "3"}  # more than the one asked for, even on a 1-core machine
    done = subprocess.run(
        [sys.executable, "-c", THREAD_COUNTS], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["1", "1"]  # torch's count, and numba's, after the kernels ran


@NEEDS_NUMBA
def test_kernel_keeps_nan_like_torch() -> None:
    """A NaN makes its channel's statistics NaN, and ReLU passes NaN on: a diverged step must show."""
    reference, ours = twins(4)
    x = data((2, 4, 3, 3), steps=1)[0][0]
    x[1, 2, 0, 0] = float("nan")
    expected, got = torch.relu(reference(x)), ours(x, relu=True)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10, equal_nan=True)
    assert got[:, 2].isnan().all() and not got[:, :2].isnan().any()


@NEEDS_NUMBA
@pytest.mark.parametrize(
    "case", ["NCHW", "one value per channel", "evaluation", "autocast", "subclass", "float32 buffers", "no numba"]
)
def test_kernel_stands_aside(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    bn = (AllReduceBatchNorm2d if case == "subclass" else BatchNorm2d)(8).double()
    x = torch.randn(1 if case == "one value per channel" else 2, 8, 1 if case == "one value per channel" else 3, 3,
                    dtype=torch.float64)  # fmt: skip
    x = x if case == "NCHW" else x.contiguous(memory_format=CL)
    if case == "one value per channel":
        x = x[:, :, :1, :1]
    if case == "evaluation":
        bn.eval()
    if case == "float32 buffers":
        bn.running_mean = bn.running_mean.float()
    if case == "no numba":
        monkeypatch.setattr(batchnorm, "compiled_kernels", lambda: None)
    if case == "autocast":
        assert kernel_path_applies(bn, x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not kernel_path_applies(bn, x)
        return
    assert not kernel_path_applies(bn, x)
    if case == "one value per channel":  # torch's own error, as nn.BatchNorm2d gives it
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            bn(x)


def fused_pairs(layers: nn.Module) -> list[bool]:
    """For each ReLU in ``layers``: whether it ran as a module (False) or inside the BatchNorm (True)."""
    ran = {}
    for module in layers.modules():
        if type(module) is nn.ReLU:
            ran[module] = False
            module.register_forward_pre_hook(lambda m, args: ran.__setitem__(m, True))
    return ran


@NEEDS_NUMBA
def test_layers_fuse_batchnorm_and_relu_and_equal_sequential() -> None:
    torch.manual_seed(0)
    layers = Layers(nn.Conv2d(5, 24, 1, bias=False), BatchNorm2d(24), nn.ReLU(inplace=True),
                    nn.Conv2d(24, 24, 3, padding=1, groups=24, bias=False), BatchNorm2d(24),
                    nn.Conv2d(24, 16, 1, bias=False), BatchNorm2d(16), nn.ReLU(inplace=True)).double()  # fmt: skip
    plain = nn.Sequential(*copy.deepcopy(list(layers)))
    x = torch.randn(2, 5, 6, 6, dtype=torch.float64).contiguous(memory_format=CL)
    calls = []
    for module in layers:
        if isinstance(module, BatchNorm2d):
            module.register_forward_hook(lambda m, args, kwargs, out: calls.append(kwargs.get("relu", False)),
                                         with_kwargs=True)  # fmt: skip
    outs = [net(x) for net in (layers, plain)]
    assert calls == [True, False, True]  # both ReLUs ran inside their BatchNorm
    outs[0].square().sum().backward(), outs[1].square().sum().backward()
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-10, atol=1e-10)
    for (name, a), b in zip(layers.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-10, msg=name)
    assert list(layers.state_dict()) == list(plain.state_dict())


@NEEDS_NUMBA
def test_layers_leave_a_hooked_relu_to_run() -> None:
    layers = Layers(BatchNorm2d(8), nn.ReLU()).double()
    seen = []
    layers[1].register_forward_hook(lambda m, args, out: seen.append(out))
    x = torch.randn(2, 8, 3, 3, dtype=torch.float64).contiguous(memory_format=CL)
    out = layers(x)
    assert len(seen) == 1 and seen[0] is out


@NEEDS_NUMBA
@pytest.mark.parametrize("name", ["shufflenet_v2_x0_5", "shufflenet_v2_x1_0"])
def test_network_training_with_kernels_equals_plain_batchnorm(name: str) -> None:
    """Two training steps of the whole network, float64, channels_last: every BatchNorm through the kernel
    (most with their ReLU), against nn.BatchNorm2d and ReLU modules one by one."""
    torch.manual_seed(0)
    ours = build_network(name, num_classes=10).double().to(memory_format=CL).train()
    plain = copy.deepcopy(ours)
    for module in plain.modules():
        if type(module) is BatchNorm2d:
            module.__class__ = nn.BatchNorm2d
        elif type(module) is Layers:
            module.__class__ = nn.Sequential
    fused = []
    for module in ours.modules():
        if type(module) is BatchNorm2d:
            module.register_forward_pre_hook(
                lambda m, args, kwargs: fused.append((kernel_path_applies(m, args[0]), kwargs.get("relu", False))),
                with_kwargs=True,
            )
    optimizers = [torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9) for net in (ours, plain)]
    generator = torch.Generator().manual_seed(1)
    for _ in range(2):
        x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=generator).contiguous(memory_format=CL)
        labels = torch.randint(0, 10, (2,), generator=generator)
        for net, optimizer in zip((ours, plain), optimizers, strict=True):
            nn.functional.cross_entropy(net(x), labels).backward()
            optimizer.step()
            optimizer.zero_grad()
    blocks = sum(len(block.branch_main) for block in ours.features) // 8
    # every BatchNorm but the stem's (pooling-first, statistics through the kernel) ran in the kernel
    assert len(fused) == 2 * (3 * blocks + 2 * 3 + 1) and all(kernel for kernel, _ in fused)
    assert sum(relu for _, relu in fused) == 2 * (2 * blocks + 3 + 1)
    # Two steps at lr 0.1 on batches of 2 amplify float64 rounding (the sums run in another order) to about
    # 2e-10 on an AMD EPYC with AVX2 (5e-10 relative), less on AVX-512; an error in the kernels is far larger
    for (key, a), b in zip(ours.state_dict().items(), plain.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9, msg=key)
