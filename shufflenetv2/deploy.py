"""An inference-only ShuffleNetV2: BatchNorm folded into the convolutions, the channel shuffle folded
into weights and slices, channels_last, optionally compiled; and ONNX export.

``fuse(model)`` returns a module with the same inputs and outputs as ``model.eval()`` (logits equal
to float32 rounding).  For MindCV's layout the even/odd split that opens each stride-1 block is a
fixed permutation, so activations are kept "evens first" between blocks, and as two tensors: the
logical evens (the next block's pass-through) and the logical odds (its branch input).  The split is
then no copy at all, the permutation moves into the weights that read or write those channels, and
each block ends with two concatenations of two slices.  torchvision's layout keeps its
explicit shuffle (its interleaving does not settle into one fixed storage order), with BN folded.
For ONNX Runtime, ``onnx_graph.fuse_for_onnx`` arranges the channels differently.  On channels_last
the 1x1 convolutions become matrix products (``PointwiseLinear``), and for ``torch.compile`` the
depthwise ones become nine shifted multiply-adds (``UnrolledDepthwise``).
"""

from __future__ import annotations

import copy
import importlib.util
import io
import json
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ShuffleNetV2Error
from .fileio import atomic_path, storage_error
from .model import MindCVBlock, ShuffleNetV2
from .weights import EVALUATION_KEY

CLASSES_KEY = "classes"  # where exports keep the names of the logits


def fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """``bn(conv(x))`` as one convolution with a bias (the BN running statistics, eval mode)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    fused = nn.Conv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
        conv.dilation, conv.groups, bias=True, device=conv.weight.device, dtype=conv.weight.dtype,
    )  # fmt: skip
    with torch.no_grad():
        fused.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        fused.bias.copy_((bias - bn.running_mean) * scale + bn.bias)
    return fused


BATCHNORMS = (nn.BatchNorm2d, nn.SyncBatchNorm)  # in eval mode both are the affine map of their running statistics


def fold_all_batchnorms(module: nn.Module) -> nn.Module:
    """Every Conv2d directly followed by a BatchNorm inside an ``nn.Sequential`` becomes one conv."""
    for child in module.children():
        fold_all_batchnorms(child)
    if isinstance(module, nn.Sequential):
        layers = list(module)
        for i in range(len(layers) - 1):
            if isinstance(layers[i], nn.Conv2d) and isinstance(layers[i + 1], BATCHNORMS):
                module[i] = fold_batchnorm(layers[i], layers[i + 1])
                module[i + 1] = nn.Identity()
    return module


def evens_first(channels: int) -> torch.Tensor:
    """The storage order between fused blocks: position p holds logical channel ``order[p]``."""
    return torch.cat((torch.arange(0, channels, 2), torch.arange(1, channels, 2)))


def _convs(branch: nn.Sequential) -> list[nn.Conv2d]:
    return [m for m in branch if isinstance(m, nn.Conv2d)]


ZERO = -1  # in a channel order: a channel of zeros (padding, see ``onnx_graph``), read with zero weights
ChannelOrder = torch.Tensor | Sequence[int]


def _pick(conv: nn.Conv2d, order: ChannelOrder) -> tuple[torch.Tensor, torch.Tensor]:
    """``order`` as indices for ``conv``'s weights, and 1 where a channel is real, 0 where it is ``ZERO``."""
    order = torch.as_tensor(order, device=conv.weight.device)
    return order.clamp(min=0), (order != ZERO).to(conv.weight.dtype)


@torch.no_grad()
def _read_in_order(conv: nn.Conv2d, order: ChannelOrder) -> None:
    """Make ``conv`` read an input whose position p holds logical channel ``order[p]`` (``ZERO``: zeros)."""
    if conv.groups > 1:  # depthwise: channel p of the output is channel p of the input, so outputs move along
        _write_in_order(conv, order)
        return
    index, keep = _pick(conv, order)
    conv.weight = nn.Parameter(conv.weight[:, index] * keep.view(1, -1, 1, 1))
    conv.in_channels = len(index)


@torch.no_grad()
def _write_in_order(conv: nn.Conv2d, order: ChannelOrder) -> None:
    """Make ``conv`` write logical output channel ``order[p]`` at position p (``ZERO``: a channel of zeros,
    which stays zero through the ReLU after it); a depthwise convolution takes its inputs along."""
    index, keep = _pick(conv, order)
    conv.weight = nn.Parameter(conv.weight[index] * keep.view(-1, 1, 1, 1))
    if conv.bias is not None:
        conv.bias = nn.Parameter(conv.bias[index] * keep)
    conv.out_channels = len(index)
    if conv.groups > 1:
        conv.in_channels = conv.groups = len(index)


Halves = tuple[torch.Tensor, ...]  # the activation between fused blocks: its "evens first" storage, cut in two


class FusedDownBlock(nn.Module):
    """A stride-2 block reading any known storage order (one tensor, or the halves of one) and writing
    the logical evens and the logical odds of its output as two tensors."""

    def __init__(self, block: MindCVBlock, input_order: torch.Tensor) -> None:
        super().__init__()
        self.branch_proj, self.branch_main = block.branch_proj, block.branch_main
        proj_dw, proj_pw = _convs(self.branch_proj)
        main_pw1, _, main_pw2 = _convs(self.branch_main)
        _read_in_order(proj_dw, input_order)
        _read_in_order(proj_pw, input_order)  # its input is the depthwise output, in the same order
        _read_in_order(main_pw1, input_order)
        _write_in_order(proj_pw, evens_first(proj_pw.out_channels))
        _write_in_order(main_pw2, evens_first(main_pw2.out_channels))
        self.proj_half, self.main_half = proj_pw.out_channels // 2, main_pw2.out_channels // 2

    def forward(self, x: Halves) -> Halves:
        x = x[0] if len(x) == 1 else torch.cat(x, 1)
        p_even, p_odd = torch.split(self.branch_proj(x), self.proj_half, 1)
        m_even, m_odd = torch.split(self.branch_main(x), self.main_half, 1)
        return torch.cat((p_even, m_even), 1), torch.cat((p_odd, m_odd), 1)


class FusedBlock(nn.Module):
    """A stride-1 block on the halves of "evens first" storage: the logical evens pass through, the logical
    odds feed the branch, and the output halves are again the logical evens and odds.

    Keeping the halves apart, rather than one tensor that each block slices, saves a copy of the whole
    activation per block: 1.02x-1.04x in eager PyTorch (x0.5 batch 1 and 32, x1.0 batch 1; measured paired
    on this project's CPU), and 1.03x-1.13x in ONNX Runtime before ``onnx_graph``'s routing replaced it there.
    """

    def __init__(self, block: MindCVBlock) -> None:
        super().__init__()
        self.branch_main = block.branch_main
        main_pw2 = _convs(self.branch_main)[-1]
        _write_in_order(main_pw2, evens_first(main_pw2.out_channels))
        self.half = main_pw2.out_channels // 2

    def forward(self, x: Halves) -> Halves:
        proj, odds = x
        b_even, b_odd = torch.split(self.branch_main(odds), self.half, 1)
        return torch.cat((proj[:, 0::2], b_even), 1), torch.cat((proj[:, 1::2], b_odd), 1)


class FusedShuffleNetV2(nn.Module):
    """MindCV's network for inference: 0 BatchNorms, 0 gathers, two concatenations per block."""

    def __init__(self, model: ShuffleNetV2) -> None:
        super().__init__()
        model = fold_all_batchnorms(copy.deepcopy(model).eval())
        unfolded = [name for name, m in model.named_modules() if isinstance(m, BATCHNORMS)]
        if unfolded:  # the storage orders below move channels in the convolutions only, not in a BatchNorm
            raise ValueError(f"fuse: BatchNorm {unfolded[0]} follows no convolution; it cannot be folded")
        self.in_channels, self.num_classes = model.in_channels, model.num_classes
        self.first_conv, self.max_pool = model.first_conv, model.max_pool
        blocks: list[nn.Module] = []
        order = torch.arange(model.first_conv[0].out_channels)  # the stem writes logical order
        for block in model.features:
            blocks.append(FusedDownBlock(block, order) if block.stride == 2 else FusedBlock(block))
            order = evens_first(_block_out_channels(block))
        self.features = nn.Sequential(*blocks)
        self.conv_last = model.conv_last
        _read_in_order(_convs(self.conv_last)[0], order)
        self.classifier = model.classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():  # ONNX Runtime fuses Conv + Relu, so keep them adjacent there
            x = self.max_pool(self.first_conv(x))
        else:  # max-pool and ReLU commute (ReLU is increasing): ReLU on the pooled quarter of the stem
            conv, _, relu = self.first_conv
            x = relu(self.max_pool(conv(x)))
        x = self.conv_last(torch.cat(self.features((x,)), 1))
        return self.classifier(x.mean((2, 3)))


def _block_out_channels(block: MindCVBlock) -> int:
    main_out = _convs(block.branch_main)[-1].out_channels
    return main_out + (_convs(block.branch_proj)[-1].out_channels if block.stride == 2 else main_out)


def is_foldable(model: nn.Module) -> bool:
    """Whether the shuffle folds into weights: MindCV's layout, with even branch outputs (true for all four
    published widths; the storage orders need them)."""
    if not isinstance(model, ShuffleNetV2):
        return False
    branches = [b for block in model.features for b in (block.branch_main, block.branch_proj) if b is not None]
    return all(_convs(branch)[-1].out_channels % 2 == 0 for branch in branches)


class PointwiseLinear(nn.Module):
    """A 1x1, stride-1 convolution on channels_last activations as one matrix product over the channels.

    On NHWC data such a convolution is exactly ``(N*H*W, C_in) @ W.T + b``.  torch runs that through BLAS
    on the activation's own memory, strided channel slices included, whereas eager oneDNN convolutions
    re-pack their weights on every call and take a slow path for those slices: +17 % at x1.0 batch 1
    eager, +22 % compiled (measured on this project's CPU).  Only for channels_last models; an ONNX
    export keeps real convolutions, which ONNX Runtime packs once.
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.weight = nn.Parameter(conv.weight.detach().flatten(1).clone(), requires_grad=False)
        bias = conv.bias.detach().clone() if conv.bias is not None else None
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.permute(0, 2, 3, 1), self.weight, self.bias).permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[1]}, {self.weight.shape[0]}"


def _replace_convs(
    module: nn.Module, matches: Callable[[nn.Conv2d], bool], make: Callable[[nn.Conv2d], nn.Module]
) -> nn.Module:
    """Every Conv2d below ``module`` that ``matches`` is replaced, in place, by ``make(conv)``."""
    for name, child in module.named_children():
        if isinstance(child, nn.Conv2d) and matches(child):
            setattr(module, name, make(child))
        else:
            _replace_convs(child, matches, make)
    return module


def _is_pointwise(conv: nn.Conv2d) -> bool:
    return (
        conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.groups == 1
        and conv.padding in ((0, 0), "valid") and conv.dilation == (1, 1)
    )  # fmt: skip


def pointwise_as_linear(module: nn.Module) -> nn.Module:
    """Every 1x1, stride-1, ungrouped, unpadded Conv2d below ``module`` becomes a ``PointwiseLinear``."""
    return _replace_convs(module, _is_pointwise, PointwiseLinear)


class UnrolledDepthwise(nn.Module):
    """A 3x3 depthwise convolution (padding 1, stride 1 or 2) as nine shifted multiply-adds, for torch.compile.

    Eager, that is nine passes over the activation and slower than the convolution.  Compiled, inductor
    fuses the nine taps, the padding and the bias into one vectorised loop with no call into oneDNN and
    no weight re-packing: x0.5 at batch 1 runs 1.8x faster than compiled with the convolution, x1.0 at
    batch 1 1.2x, x0.5 at batch 32 about the same, x1.0 at batch 32 about 0.87x (measured on this
    project's CPU), where the uncompiled fused model is the faster one anyway.
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.stride = conv.stride[0]
        self.weight = nn.Parameter(conv.weight.detach().clone(), requires_grad=False)  # (C, 1, 3, 3)
        bias = conv.bias.detach().clone() if conv.bias is not None else conv.weight.new_zeros(conv.out_channels)
        self.bias = nn.Parameter(bias.view(1, -1, 1, 1), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stride
        rows, cols = (x.shape[-2] - 1) // s + 1, (x.shape[-1] - 1) // s + 1  # padding 1, kernel 3
        padded = F.pad(x, (1, 1, 1, 1))
        # in the input's dtype, as the convolution under autocast: float32 weights would promote a bf16
        # activation to float32 (inductor still computes the fused taps in float32 and rounds once)
        weight, out = self.weight.to(x.dtype), self.bias.to(x.dtype)
        for i in range(3):
            for j in range(3):
                tap = padded[:, :, i : i + s * (rows - 1) + 1 : s, j : j + s * (cols - 1) + 1 : s]
                out = out + tap * weight[:, :, i, j].view(1, -1, 1, 1)
        return out


def _is_depthwise_3x3(conv: nn.Conv2d) -> bool:
    return (
        conv.groups == conv.in_channels == conv.out_channels and conv.kernel_size == (3, 3)
        and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.stride in ((1, 1), (2, 2))
        and conv.padding_mode == "zeros"
    )  # fmt: skip


def unroll_depthwise(module: nn.Module) -> nn.Module:
    """Every 3x3 depthwise Conv2d with padding 1 below ``module`` becomes an ``UnrolledDepthwise``."""
    return _replace_convs(module, _is_depthwise_3x3, UnrolledDepthwise)


class FrozenCompiled(nn.Module):
    """``torch.compile`` with inductor's freezing: the weights become constants of the compiled graph, so
    on the CPU every convolution is a oneDNN call with its weights packed once at compile time and its
    ReLU fused in (eager, and plain compile, re-pack on every call).  The compiled graph keeps the weights
    it was compiled with; this is a deploy module, not one to train or edit.  Freezing applies only to
    graphs compiled without autograd, hence ``no_grad``; the config is patched per call, so that a
    recompile (a new batch size) also freezes and other compiled modules in the process are unaffected.

    Against torchvision eager on this project's AVX-512 CPU, 2 threads (``benchmarks/results/cpu_frozen``):
    3.3x at x0.5 batch 32 (fused 2.5x, compiled 2.3x), 2.2x at x1.0 batch 32 (1.7x); at batch 1 the
    unrolled depthwise convolutions of ``fuse(compile=True)`` are ahead in that run (x0.5 3.1x against
    2.2x, x1.0 2.5x against 2.2x; an earlier paired try had x1.0 batch 1 the other way, 2.5x against 2.15x).
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.compiled = torch.compile(module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch._inductor import config as inductor_config

        with torch.no_grad(), inductor_config.patch(freezing=True):
            return self.compiled(x)


def fuse(model: nn.Module, channels_last: bool = True, compile: bool = False, freeze: bool = False) -> nn.Module:
    """An inference copy of ``model`` (which is left untouched): same inputs, same logits.

    ``channels_last`` stores activations NHWC, which the CPU and GPU convolution kernels prefer, and
    runs the 1x1 convolutions as matrix products (``PointwiseLinear``);
    ``compile`` wraps the result in ``torch.compile`` (its first call then takes seconds), with the 3x3
    depthwise convolutions unrolled for the compiler (``UnrolledDepthwise``);
    ``freeze`` compiles with the weights frozen into the graph instead (``FrozenCompiled``): convolutions
    stay oneDNN convolutions (channels_last), packed once; weights changed afterwards are not seen until
    something (another batch size, another grad mode) makes it recompile, so treat the result as read-only.
    For ONNX Runtime use ``fuse_for_onnx`` (``onnx_graph``).
    """
    if compile and freeze:
        raise ValueError(
            "fuse(compile=True, freeze=True): pick one; freeze already compiles (with the weights frozen "
            "into the graph), compile alone keeps them as parameters"
        )
    fused = _folded(model)
    if freeze:  # oneDNN convolutions with packed weights beat both the matmuls and the unrolled taps here
        return FrozenCompiled(fused.to(memory_format=torch.channels_last) if channels_last else fused)
    if channels_last:
        fused = pointwise_as_linear(fused).to(memory_format=torch.channels_last)
    return torch.compile(unroll_depthwise(fused)) if compile else fused


def _folded(model: nn.Module) -> nn.Module:
    """A read-only eval copy with every BatchNorm folded (and, for our network, the shuffle)."""
    if is_foldable(model):
        fused: nn.Module = FusedShuffleNetV2(model)
    else:
        fused = fold_all_batchnorms(copy.deepcopy(model).eval())
    return fused.eval().requires_grad_(False)


def frozen_graph(model: nn.Module) -> nn.Module:
    """What ``fuse(model, freeze=True)`` compiles, uncompiled: folded, channels_last, real convolutions
    (inductor's freezing packs their weights for oneDNN once).  ``compile_package`` compiles it too."""
    return _folded(model).to(memory_format=torch.channels_last)


def _example(model: nn.Module, input_size: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, getattr(model, "in_channels", 3), input_size, input_size)


def export_onnx(
    model: nn.Module,
    path: str | Path,
    input_size: int = 224,
    opset: int = 17,
    classes: Sequence[str] | None = None,
) -> Path:
    """``model`` (fused or not) as ONNX with a dynamic batch dimension; input ``images``, output ``logits``.
    See ``onnx_bytes``."""
    return write_export(path, onnx_bytes(model, input_size, opset, classes), "the ONNX export")


def onnx_bytes(
    model: nn.Module,
    input_size: int = 224,
    opset: int = 17,
    classes: Sequence[str] | None = None,
    evaluation: dict[str, object] | None = None,
) -> bytes:
    """What ``export_onnx`` writes, built in memory (so it can be checked before anything is written).

    Uses torch's TorchScript-based exporter, which needs no extra package and exists in every torch
    this project supports (the newer dynamo exporter needs onnxscript); its deprecation notice is muted.
    ``classes`` (the names of the logits, in order) go into the model's metadata as a JSON list under
    ``classes``, which ONNX Runtime returns in ``session.get_modelmeta().custom_metadata_map``, and the
    weights' evaluation settings as a JSON object under ``evaluation``; writing them needs the ``onnx`` package.
    """
    model = model.eval()
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model, (_example(model, input_size, 1),), buffer, opset_version=opset, input_names=["images"],
            output_names=["logits"], dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False,
        )  # fmt: skip
    data = buffer.getvalue()
    metadata = {CLASSES_KEY: json.dumps(list(classes), ensure_ascii=False)} if classes is not None else {}
    if evaluation is not None:
        metadata[EVALUATION_KEY] = json.dumps(evaluation)
    if metadata:
        import onnx

        graph = onnx.load_from_string(data)
        for key, value in metadata.items():
            entry = graph.metadata_props.add()
            entry.key, entry.value = key, value
        data = graph.SerializeToString()
    return data


def export_program(
    model: nn.Module, path: str | Path, input_size: int = 224, classes: Sequence[str] | None = None
) -> Path:
    """``model`` as a ``torch.export`` program (``.pt2``) with a dynamic batch: loads with
    ``torch.export.load(path).module()`` and runs without this package.  ``classes`` go in as the extra
    file ``classes.json``: ``torch.export.load(path, extra_files={"classes.json": ""})`` fills it in."""
    return write_export(path, program_bytes(model, input_size, classes), "the exported program")


def program_bytes(
    model: nn.Module,
    input_size: int = 224,
    classes: Sequence[str] | None = None,
    evaluation: dict[str, object] | None = None,
) -> bytes:
    """What ``export_program`` writes, built in memory; the weights' evaluation settings, when given, go in
    as the extra file ``evaluation.json``, as the ``.onnx`` export keeps them in its metadata."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad():
        program = torch.export.export(model.eval(), (_example(model, input_size),), dynamic_shapes=({0: batch},))
    extra = {f"{CLASSES_KEY}.json": json.dumps(list(classes), ensure_ascii=False)} if classes is not None else {}
    if evaluation is not None:
        extra[f"{EVALUATION_KEY}.json"] = json.dumps(evaluation)
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files=extra or None)
    return buffer.getvalue()


Logits = Callable[[torch.Tensor], torch.Tensor]


def onnx_runner(data: bytes) -> Logits | None:
    """An ONNX model in ONNX Runtime's CPU provider as a function of float32 images; None without onnxruntime."""
    if importlib.util.find_spec("onnxruntime") is None:
        return None
    import onnxruntime

    try:
        session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's exception types differ between its versions
        raise ExportMismatch(
            f"ONNX Runtime {onnxruntime.__version__} cannot load the export ({str(exc).strip().splitlines()[0]}), so "
            "it was not written. Please report it, with the weights and the versions of torch and onnxruntime"
        ) from None
    return lambda x: torch.from_numpy(session.run(None, {"images": x.numpy()})[0])


def program_runner(data: bytes) -> Logits:
    """An exported program (``program_bytes``) as a function; it unpickles parts, so only for one's own."""
    return torch.export.load(io.BytesIO(data)).module()


EXPORT_TOLERANCE = 1e-4  # of the largest logit (or of 1): float32 rounding moves logits ~1e-6 of it, a bug O(1)


class ExportMismatch(ShuffleNetV2Error):
    """An export whose logits are not the model's: nothing was written."""


@dataclass(frozen=True)
class ExportCheck:
    difference: float  # the largest |logit difference| between the export and the model, float32
    scale: float  # the largest |logit| of the model on the check's input
    where: str  # what ran the export, and on which batch

    def __str__(self) -> str:
        return f"max |logit difference| {self.difference:.1e} (logits up to {self.scale:.1e}) {self.where}"


def check_export(model: nn.Module, run: Logits, where: str, input_size: int, batch: int = 3) -> ExportCheck:
    """Compare ``run`` (the export, loaded, on the CPU) with ``model`` on seeded noise, or raise ``ExportMismatch``.

    The default batch of 3 is neither the batch of 1 the ONNX export traces with nor the 2 of
    ``torch.export``, so the dynamic batch dimension is checked as well."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, getattr(model, "in_channels", 3), input_size, input_size, generator=generator)
    device, training = next(model.parameters()).device, model.training
    try:
        with torch.no_grad():
            expected, got = model.eval()(x.to(device)).float().cpu(), run(x).float()
    finally:
        model.train(training)
    if got.shape != expected.shape:
        raise ExportMismatch(
            f"the export gives logits of shape {tuple(got.shape)} {where}, not {tuple(expected.shape)}; it was not "
            "written"
        )
    check = ExportCheck(float((expected - got).abs().max()), float(expected.abs().max()), where)
    if not check.difference <= EXPORT_TOLERANCE * max(1.0, check.scale):  # NaN fails too
        raise ExportMismatch(
            f"the export's logits differ from the weights': {check}; more than float32 rounding, so it was not "
            "written. Please report it, with the weights and the versions of torch and onnxruntime"
        )
    return check


def write_export(path: str | Path, data: bytes, what: str) -> Path:
    """Exports are built in memory and written by Python into a file renamed over ``path`` once complete:
    a full disk or a Ctrl-C leaves an earlier export at ``path`` as it was, and the failure is an
    ``OSError`` that says why (torch's own writers gave a truncated file and a C++ error), which becomes
    a ``StorageError``."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
    except OSError as exc:
        raise storage_error(exc, path, what) from None
    return path
