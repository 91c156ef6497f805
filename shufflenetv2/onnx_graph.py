"""MindCV's network arranged for ONNX Runtime: every channel is written where the block that reads it will
look for it, so that between convolutions there is one split and one concatenation per block.

Within a stage, channel q of a block's output (MindCV's logical order) is either read by a later block's
branch or passed through to the stage's end: a stride-1 block feeds its branch the odd channels of its
input and passes on the even ones, channel q becoming channel q/2.  So channel q is read by the branch
``v + 1`` blocks later, where ``2**v`` is the largest power of two dividing q (q = 0, and any q that
reaches the stage's end first, go on to the next stage).  Each convolution that ends a branch writes
its channels grouped by that reader, its output is split into those groups, and a branch's input is the
concatenation of the groups addressed to it, with its first 1x1 convolution's weights permuted to
match.  No activation is ever sliced with a stride.

``fuse(model)`` instead keeps each block's output as its logical evens and odds (two tensors), which
costs two strided slices and two concatenations per block.  Over the same convolutions, in ONNX Runtime
(which has no blocked-layout slice, so each of those is a plain NCHW copy) this arrangement ran 1.02x and
1.07x at x0.5 batch 1 and 32, 1.05x and 1.12x at x1.0 (paired, 2 threads, ``benchmarks/results/cpu_routed``);
in eager PyTorch it gained nothing (0.97-1.03x), so ``fuse`` keeps the simpler halves.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .deploy import ZERO, _convs, _read_in_order, _write_in_order, fold_all_batchnorms, fuse, is_foldable
from .model import MindCVBlock, ShuffleNetV2

ONNX_CHANNEL_MULTIPLE = 4  # what ORT's blocked-layout (NCHWc) convolutions need; see ``fuse_for_onnx``
ONNX_STEM_MULTIPLE = 16  # ORT's widest block (AVX-512), for its blocked max-pool; see ``fuse_for_onnx``


def fuse_for_onnx(model: nn.Module, pad: bool = True) -> nn.Module:
    """The model as ``export`` writes it for ONNX Runtime: BatchNorm folded, NCHW, and for MindCV's layout
    the routed graph (``RoutedShuffleNetV2``) with two kinds of zero-channel padding, same logits.
    ``pad=False`` leaves the padding out, for OpenVINO, which picks its own blocked layouts: there the
    padded graph ran 0.93x and 0.97x the unpadded one (x0.5 batch 32, x1.0 batch 1), and the routed graph
    1.9x the halves graph of ``fuse(model, channels_last=False)``.

    - Branches, and the input a stride-1 block feeds its branch, padded to a multiple of 4: ORT's
      blocked-layout convolutions need one, and x1.0's and x2.0's stage-2 branches (58 and 122 channels)
      otherwise run as plain NCHW convolutions.  Padded to 60 and 124, the whole network ran 1.13x (batch
      1) and 1.14x (batch 32) faster at x1.0, 1.06x at x2.0 batch 1 (paired, on this project's CPU).
    - The stem's 24 channels padded to 32.  ORT runs its blocked max-pool only on a multiple of its block,
      16 channels with AVX-512; with 24 the stem's convolution leaves the blocked layout, the pool runs on
      plain NCHW and the first block converts back: two reorders of the network's largest activation.
      Padded, the stem, its pool and the first block stay blocked, and the convolutions already computed
      32 channels inside ORT (their blocks are padded), so only the pool does more work.  Paired against
      the unpadded graph on this project's AVX-512 CPU, 2 threads, three runs
      (``benchmarks/results/cpu_stem_pad``): 1.07-1.11x at x0.5 batch 1, 1.11-1.17x at x0.5 batch 32,
      0.99-1.19x (noisy) and 1.01-1.03x at x1.0.  Where the block is 8 (AVX2) 24 channels were already
      aligned, and the pad costs a third more pooling work.
    """
    if is_foldable(model):
        multiples = (ONNX_CHANNEL_MULTIPLE, ONNX_STEM_MULTIPLE) if pad else (1, 1)
        return RoutedShuffleNetV2(model, *multiples).eval().requires_grad_(False)
    return fuse(model, channels_last=False)


def _shortfall(channels: int, multiple: int) -> int:
    """The zero channels that round ``channels`` up to a multiple of ``multiple``."""
    return -channels % multiple


def _padded(channels: int, multiple: int) -> list[int]:
    return [*range(channels), *[ZERO] * _shortfall(channels, multiple)]


def _pad_branch(branch: nn.Sequential, multiple: int) -> None:
    """Round a main branch's inner width (its first 1x1 and its depthwise convolution) up to ``multiple``."""
    pw1, dw, pw2 = _convs(branch)
    inner = _padded(pw1.out_channels, multiple)
    _write_in_order(pw1, inner)
    _write_in_order(dw, inner)
    _read_in_order(pw2, inner)


def _reader(q: int, block: int, blocks: int) -> tuple[int, int]:
    """Which stride-1 block (1..``blocks``; ``blocks + 1`` for the stage's end) reads channel ``q`` of
    block ``block``'s output (0 is the stage's stride-2 block), and as which of its input channels."""
    reader = block + 1
    while reader <= blocks and q % 2 == 0:
        q //= 2
        reader += 1
    return reader, (q - 1) // 2 if reader <= blocks else q


class RoutedStage(nn.Module):
    """One stage: a stride-2 block reading one tensor whose channel p is logical channel
    ``input_order[p]``, then stride-1 blocks; it returns one tensor in the order ``output_order``."""

    def __init__(self, blocks: list[MindCVBlock], input_order: list[int], multiple: int) -> None:
        super().__init__()
        down, *rest = blocks
        count = len(rest)
        proj_dw, proj_pw = _convs(down.branch_proj)
        _read_in_order(proj_dw, input_order)
        _read_in_order(proj_pw, input_order)  # its input is the depthwise output, in the same order
        _read_in_order(_convs(down.branch_main)[0], input_order)
        self.proj, self.mains = down.branch_proj, nn.ModuleList([down.branch_main, *(b.branch_main for b in rest)])
        proj_width = proj_pw.out_channels  # the stride-2 block's output: its projection, then its main branch
        width = proj_width + _convs(down.branch_main)[-1].out_channels
        # groups[reader] lists what each reader gets, as (piece number, its logical input channels)
        groups: dict[int, list[tuple[int, list[int]]]] = {reader: [] for reader in range(1, count + 2)}
        self.piece_sizes: list[list[int]] = []  # per writer: the proj branch, then each main branch

        def route(conv: nn.Conv2d, first: int, block: int, pad_reader: int = 0, pad: int = 0) -> None:
            by_reader: dict[int, list[tuple[int, int]]] = {}
            for channel in range(conv.out_channels):
                reader, position = _reader(first + channel, block, count)
                by_reader.setdefault(reader, []).append((channel, position))
            if pad:  # zero channels that round the reader's input up to ``multiple``
                by_reader.setdefault(pad_reader, []).extend([(ZERO, ZERO)] * pad)
            order = sorted(by_reader)
            _write_in_order(conv, [channel for reader in order for channel, _ in by_reader[reader]])
            piece = sum(len(sizes) for sizes in self.piece_sizes)
            for number, reader in enumerate(order, piece):
                groups[reader].append((number, [position for _, position in by_reader[reader]]))
            self.piece_sizes.append([len(by_reader[reader]) for reader in order])

        pad = _shortfall(width // 2, multiple) if count else 0  # every stride-1 branch reads width // 2
        route(proj_pw, 0, 0)
        for block, main in enumerate(self.mains):  # each main branch pads the input of the block after it
            first = proj_width if block == 0 else width // 2  # its first output channel's logical position
            route(_convs(main)[-1], first, block, pad_reader=block + 1, pad=pad if block < count else 0)
            _pad_branch(main, multiple)
        self.reads: list[list[int]] = []  # the pieces each stride-1 branch reads, in order
        for reader, main in enumerate(self.mains[1:], 1):
            self.reads.append([number for number, _ in groups[reader]])
            _read_in_order(_convs(main)[0], [p for _, positions in groups[reader] for p in positions])
        self.ends = [number for number, _ in groups[count + 1]]
        self.output_order = [p for _, positions in groups[count + 1] for p in positions]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pieces = [*torch.split(self.proj(x), self.piece_sizes[0], 1)]
        pieces += torch.split(self.mains[0](x), self.piece_sizes[1], 1)
        for main, reads, sizes in zip(self.mains[1:], self.reads, self.piece_sizes[2:], strict=True):
            branch_input = pieces[reads[0]] if len(reads) == 1 else torch.cat([pieces[i] for i in reads], 1)
            pieces += torch.split(main(branch_input), sizes, 1)
        return torch.cat([pieces[i] for i in self.ends], 1)


class RoutedShuffleNetV2(nn.Module):
    """MindCV's network for ONNX Runtime (``fuse_for_onnx``): BatchNorms folded, channels routed by reader
    (see the module's docstring), branches and stride-1 inputs padded with zero channels to ``multiple``,
    the stem to ``stem_multiple``.  NCHW; the same logits as the model it was built from."""

    def __init__(self, model: ShuffleNetV2, multiple: int = 1, stem_multiple: int = 1) -> None:
        super().__init__()
        for label, value in (("multiple", multiple), ("stem_multiple", stem_multiple)):
            if value < 1:
                raise ValueError(f"{label} must be a positive integer, not {value}")
        model = fold_all_batchnorms(copy.deepcopy(model).eval())
        self.in_channels, self.num_classes = model.in_channels, model.num_classes
        self.first_conv, self.max_pool = model.first_conv, model.max_pool
        stem = _convs(self.first_conv)[0]
        order = _padded(stem.out_channels, stem_multiple)
        _write_in_order(stem, order)
        stages: list[list[MindCVBlock]] = []
        for block in model.features:
            if block.stride == 2:
                stages.append([])
            stages[-1].append(block)
        self.stages = nn.Sequential()
        for blocks in stages:
            self.stages.append(RoutedStage(blocks, order, multiple))
            order = self.stages[-1].output_order
        self.conv_last = model.conv_last
        _read_in_order(_convs(self.conv_last)[0], order)
        self.classifier = model.classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_last(self.stages(self.max_pool(self.first_conv(x))))  # Conv and Relu adjacent: ORT fuses them
        return self.classifier(x.mean((2, 3)))
