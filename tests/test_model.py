from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shufflenetv2 import build_network, create_model
from shufflenetv2.model import WIDTHS, MindCVBlock, StemPool, global_average

from .conftest import assert_depends_on_the_image, assert_same_logits, calibrated, logits

TRAINABLE = {  # MindCV's and the paper's counts at 1000 classes
    "shufflenet_v2_x0_5": 1_365_792,
    "shufflenet_v2_x1_0": 2_278_760,
    "shufflenet_v2_x1_5": 3_506_720,
    "shufflenet_v2_x2_0": 7_402_600,
}
WITH_BN_STATS = {  # MindCV README's params(M), which also counts moving mean/variance
    "shufflenet_v2_x0_5": 1.37,
    "shufflenet_v2_x1_0": 2.29,
    "shufflenet_v2_x1_5": 3.53,
    "shufflenet_v2_x2_0": 7.44,
}


@pytest.mark.parametrize("name", list(WIDTHS))
def test_parameter_counts_match_mindcv(name: str) -> None:
    model = create_model(name)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    stats = sum(b.numel() for n, b in model.named_buffers() if n.endswith(("running_mean", "running_var")))
    assert trainable == TRAINABLE[name]
    assert round((trainable + stats) / 1e6, 2) == WITH_BN_STATS[name]


def test_x0_5_with_bn_stats_is_exact() -> None:
    model = create_model("shufflenet_v2_x0_5")
    total = sum(p.numel() for p in model.parameters())
    total += sum(b.numel() for n, b in model.named_buffers() if n.endswith(("running_mean", "running_var")))
    assert total == 1_373_744


def test_mindcv_parameter_names_and_structure() -> None:
    model = create_model("shufflenet_v2_x0_5")
    names = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
    assert len(names) == 281  # the tensor count of a MindCV checkpoint
    assert names[0] == "first_conv.0.weight" and names[-1] == "classifier.weight"
    assert model.classifier.bias is None
    assert all(m.bias is None for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    strided = [i for i, block in enumerate(model.features) if block.stride == 2]
    assert strided == [0, 4, 12]
    assert not any(isinstance(m, torch.nn.Dropout) for m in model.modules())
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(m.eps == 1e-5 and m.momentum == pytest.approx(0.1) for m in bns)  # MindSpore momentum 0.9


def test_first_block_widths_follow_mindcv() -> None:
    block = create_model("shufflenet_v2_x1_0").features[0]
    assert block.branch_proj[2].out_channels == 24  # projection keeps the input width
    assert block.branch_main[5].out_channels == 116 - 24


def test_mindcv_init_statistics() -> None:
    torch.manual_seed(0)
    model = create_model("shufflenet_v2_x2_0")
    stem = model.first_conv[0].weight
    assert stem.std().item() == pytest.approx(0.01, rel=0.1)
    head = model.classifier.weight
    assert head.std().item() == pytest.approx(0.01, rel=0.02)
    pointwise = model.conv_last[0].weight  # std = 1 / in_channels
    assert pointwise.std().item() == pytest.approx(1 / pointwise.shape[1], rel=0.02)
    depthwise = model.features[5].branch_main[3].weight  # weight.shape[1] == 1 -> std 1
    assert depthwise.std().item() == pytest.approx(1.0, rel=0.1)
    bn = model.features[5].branch_main[1]
    assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)


@pytest.mark.parametrize("size", [(32, 32), (33, 47), (97, 131), (224, 224), (257, 190)])
@pytest.mark.parametrize("layout", ["mindcv", "torchvision"])
def test_any_input_size_from_32(size: tuple[int, int], layout: str) -> None:
    model = create_model("shufflenet_v2_x0_5", num_classes=7, layout=layout).eval()
    out = logits(model, torch.randn(2, 3, *size))
    assert out.shape == (2, 7) and torch.isfinite(out).all()


def test_same_pool_pads_like_mindspore() -> None:
    """Even sizes: the extra row/column after (0, 1); odd sizes: one on each side (1, 1)."""
    x = torch.randn(1, 2, 10, 9)
    expected = F.max_pool2d(F.pad(x, (1, 1, 0, 1), value=float("-inf")), 3, 2)
    assert torch.equal(StemPool("same")(x), expected)
    assert StemPool("same")(x).shape == (1, 2, 5, 5)  # ceil(n / 2), as SAME promises
    assert not torch.equal(StemPool("same")(x), StemPool("symmetric")(x))


def test_stride1_block_splits_even_odd() -> None:
    block = create_model("shufflenet_v2_x0_5").features[1].eval()
    x = torch.randn(1, 48, 8, 8)
    with torch.no_grad():
        out = block(x)
    assert torch.equal(out[:, :24], x[:, 0::2])  # even channels pass through untouched


def test_in_channels_one() -> None:
    model = create_model("shufflenet_v2_x0_5", in_channels=1, num_classes=3).eval()
    assert logits(model, torch.randn(1, 1, 64, 64)).shape == (1, 3)


def test_unknown_model_and_layout() -> None:
    with pytest.raises(ValueError, match="shufflenet_v2_x0_5"):
        build_network("shufflenet_v2_x3_0")
    with pytest.raises(ValueError, match="layout"):
        build_network("shufflenet_v2_x0_5", layout="timm")


@pytest.mark.parametrize("name", list(WIDTHS))
def test_torchvision_layout_matches_torchvision(name: str) -> None:
    torchvision = pytest.importorskip("torchvision")
    reference = calibrated(getattr(torchvision.models, name)(num_classes=1000))
    ours = create_model(name, layout="torchvision").eval()
    ours.load_state_dict(reference.state_dict())  # unchanged names and shapes, strict
    for shape in [(2, 3, 224, 224), (1, 3, 97, 131)]:
        x = torch.randn(*shape)
        assert_same_logits(logits(ours, x), logits(reference, x))
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in reference.parameters())


def test_forward_compiles_without_graph_breaks() -> None:
    """One graph for the whole network: no Python-side work per forward."""
    import torch._dynamo

    model = create_model("shufflenet_v2_x0_5", num_classes=4).eval()
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(torch.randn(1, 3, 64, 64))
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1


@pytest.mark.parametrize("shape", [(2, 3, 112, 112), (2, 3, 49, 66), (1, 2, 48, 65), (1, 1, 1, 1), (1, 2, 2, 3)])
def test_same_stem_pool_is_the_padded_pool(shape: tuple[int, ...]) -> None:
    """MindSpore's SAME pool (padding after on even sizes, both sides on odd) computed without F.pad."""
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    pad_h, pad_w = 1 + shape[-2] % 2, 1 + shape[-1] % 2
    padding = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)
    expected = F.max_pool2d(F.pad(x, padding, value=float("-inf")), 3, 2)
    got = StemPool("same")(x)
    weights = torch.randn_like(expected)
    assert torch.equal(got, expected)
    assert torch.equal(*(torch.autograd.grad((y * weights).sum(), x)[0] for y in (got, expected)))


def test_global_average_is_the_mean_and_its_gradient_a_broadcast_view() -> None:
    x = torch.randn(4, 16, 7, 7).contiguous(memory_format=torch.channels_last).requires_grad_()
    with torch.no_grad():
        reference = x.mean((2, 3))
    assert torch.equal(global_average(x), reference)
    grad = torch.randn(4, 16)
    (mean_grad,) = torch.autograd.grad(x.mean((2, 3)), x, grad)
    (ours,) = torch.autograd.grad(global_average(x), x, grad)
    assert torch.equal(ours, mean_grad)
    assert ours.stride()[2:] == (0, 0)  # no NCHW tensor to meet the channels_last activations


def test_the_calibrated_test_models_logits_depend_on_the_image() -> None:
    """The parity tests above and in test_weights/test_cli/test_checkpoint lean on this: with logits that
    hardly move between images, an error in the stem or the early blocks could not be seen."""
    torchvision = pytest.importorskip("torchvision")
    assert_depends_on_the_image(calibrated(torchvision.models.shufflenet_v2_x0_5(num_classes=10)), size=224)
    assert_depends_on_the_image(calibrated(create_model("shufflenet_v2_x0_5", num_classes=10)), size=224)


@pytest.mark.slow
def test_blocks_train_compiled_under_bfloat16_autocast() -> None:
    """How ``gpu.sh`` trains (mode 0, bf16 autocast, channels_last), on two blocks so the CPU compiles in
    seconds: our BatchNorm and even/odd split, compiled under autocast, stay as close to the float32 step as
    eager autocast does (outputs, gradients, BatchNorm running statistics).  bf16 alone moves these by up to
    a fifth of their scale, and gradients that are zero in exact arithmetic (a bias just before a BatchNorm)
    entirely, so the bar is eager bf16's own distance from float32."""
    torch.manual_seed(0)
    template = nn.Sequential(MindCVBlock(24, 48, 2), MindCVBlock(24, 48, 1)).to(memory_format=torch.channels_last)
    x = torch.randn(4, 24, 16, 16).contiguous(memory_format=torch.channels_last)
    weights = torch.randn(4, 48, 8, 8)

    def train_step(compiled: bool, amp: bool) -> list[torch.Tensor]:
        blocks = copy.deepcopy(template)
        inputs = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = (torch.compile(blocks) if compiled else blocks)(inputs)
        assert out.dtype == (torch.bfloat16 if amp else torch.float32)
        (out.float() * weights).sum().backward()
        return [out.float(), inputs.grad, *(p.grad for p in blocks.parameters()), *blocks.buffers()]

    exact, eager, compiled = train_step(False, False), train_step(False, True), train_step(True, True)
    assert len(exact) == 2 + 24 + 24  # 8 convolutions, 8 BatchNorms (weight, bias; mean, variance, count)
    for reference, e, c in zip(exact, eager, compiled, strict=True):
        scale = reference.double().abs().max().item()
        eager_error, compiled_error = ((t.double() - reference.double()).abs().max().item() for t in (e, c))
        assert compiled_error <= 2 * eager_error + 1e-3 * scale, (compiled_error, eager_error, scale)
