"""Exact weight conversion between the MindCV and torchvision layouts, where one exists.

The two layouts route channels differently: MindCV splits even/odd channels at the start of a
stride-1 block and never shuffles; torchvision splits halves and shuffles after each block.  A
channel produced by some branch is eventually consumed by exactly one later layer (the main branch of
a stride-1 block, a whole stride-2 block, or conv5).  Since the output channels of a branch may be
permuted freely (with the BN rows and the consumers' input columns), the two networks compute the
same function exactly when every branch produces the same number of channels for each consumer in
both layouts.  We simulate both channel flows, pair the channels by consumer, and permute.

This holds for x0.5 only: in the first block of x1.0 and wider MindCV keeps 24 channels in the
projection branch where torchvision keeps half the stage width, so they are different networks.
The stem pool differs too (SAME vs symmetric padding), so a converted model must keep the source's
pool, and a torchvision classifier bias has no place in MindCV's network unless we keep it.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from .errors import CheckpointError
from .model import STAGE_REPEATS, WIDTHS

Label = tuple[int, str, int]  # (block, branch: "stem" | "proj" | "main", channel)
_MAIN = {"mindcv": "branch_main", "torchvision": "branch2"}
_PROJ = {"mindcv": "branch_proj", "torchvision": "branch1"}


def _block_plan(widths: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """(input channels, output channels, stride) of the 16 blocks."""
    plan, channels = [], widths[0]
    for repeats, out in zip(STAGE_REPEATS, widths[1:4], strict=True):
        plan.append((channels, out, 2))
        plan += [(out, out, 1)] * (repeats - 1)
        channels = out
    return plan


def _block_prefix(layout: str, block: int) -> str:
    if layout == "mindcv":
        return f"features.{block}"
    starts = [0, STAGE_REPEATS[0], STAGE_REPEATS[0] + STAGE_REPEATS[1]]
    stage = sum(block >= s for s in starts) - 1
    return f"stage{stage + 2}.{block - starts[stage]}"


def _branch_widths(layout: str, c_in: int, c_out: int, stride: int) -> tuple[int, int]:
    """Channels produced by (projection or pass-through side, main branch)."""
    if stride == 1:
        return c_out // 2, c_out - c_out // 2
    if layout == "mindcv":
        return c_in, c_out - c_in
    return c_out // 2, c_out // 2


def _flow(layout: str, widths: tuple[int, ...]) -> tuple[list[dict[str, list[Label]]], list[Label]]:
    """Per block, the labels entering each branch (in input order); and the labels entering conv5."""
    x: list[Label] = [(-1, "stem", i) for i in range(widths[0])]
    blocks = []
    for b, (c_in, c_out, stride) in enumerate(_block_plan(widths)):
        n_proj, n_main = _branch_widths(layout, c_in, c_out, stride)
        made_main = [(b, "main", i) for i in range(n_main)]
        if stride == 2:
            blocks.append({"proj": list(x), "main": list(x)})
            out = [(b, "proj", i) for i in range(n_proj)] + made_main
        elif layout == "mindcv":
            blocks.append({"main": x[1::2]})
            out = x[0::2] + made_main
        else:
            blocks.append({"main": x[len(x) // 2 :]})
            out = x[: len(x) // 2] + made_main
        if layout == "torchvision":  # channel_shuffle(groups=2): interleave the two halves
            half = len(out) // 2
            out = [out[j // 2 + (j % 2) * half] for j in range(len(out))]
        x = out
    return blocks, x


def _consumers(blocks: list[dict[str, list[Label]]], final: list[Label]) -> dict[Label, tuple[int, str]]:
    """Which layer consumes each label: (block, "main") for stride-1 main branches, else (block, "all")."""
    fate: dict[Label, tuple[int, str]] = {}
    for b, inputs in enumerate(blocks):
        kind = "all" if "proj" in inputs else "main"
        for label in inputs["main"]:
            fate.setdefault(label, (b, kind))
    for label in final:
        fate.setdefault(label, (len(blocks), "all"))
    return fate


def _check_convertible(name: str, widths: tuple[int, ...]) -> None:
    for b, (c_in, c_out, stride) in enumerate(_block_plan(widths)):
        ours = _branch_widths("mindcv", c_in, c_out, stride)
        theirs = _branch_widths("torchvision", c_in, c_out, stride)
        if ours != theirs:
            raise CheckpointError(
                f"{name} cannot be converted between the MindCV and torchvision layouts: in block {b} MindCV's "
                f"branches produce {ours[0]} + {ours[1]} channels where torchvision's produce "
                f"{theirs[0]} + {theirs[1]}, so they are different networks, not a permutation of one "
                "another (only shufflenet_v2_x0_5 converts). Load these weights with the layout they were "
                "saved in instead"
            )


def _label_map(widths: tuple[int, ...]) -> dict[Label, Label]:
    """mindcv label -> torchvision label with the same consumer, pairing within each branch."""
    flows = {layout: _flow(layout, widths) for layout in _MAIN}
    fates = {layout: _consumers(*flows[layout]) for layout in _MAIN}
    groups: dict[str, dict[tuple, list[Label]]] = {layout: defaultdict(list) for layout in _MAIN}
    for layout, fate in fates.items():
        for label, consumer in fate.items():
            groups[layout][(label[0], label[1], consumer)].append(label)
    if {k: len(v) for k, v in groups["mindcv"].items()} != {k: len(v) for k, v in groups["torchvision"].items()}:
        raise CheckpointError("the two layouts route channels to different consumers; no exact conversion exists")
    mapping: dict[Label, Label] = {}
    for key, labels in groups["mindcv"].items():
        mapping.update(zip(sorted(labels), sorted(groups["torchvision"][key]), strict=True))
    return mapping


def _permutations(name: str) -> dict[str, tuple[str, torch.Tensor | None, torch.Tensor | None]]:
    """For each mindcv parameter prefix: (torchvision prefix, rows, columns) such that
    ``tv[prefix] = mindcv[prefix][rows][:, columns]`` (None: unchanged)."""
    widths = WIDTHS[name]
    _check_convertible(name, widths)
    mapping = _label_map(widths)
    flows = {layout: _flow(layout, widths) for layout in _MAIN}

    def source_index(mindcv_inputs: list[Label], tv_inputs: list[Label]) -> torch.Tensor:
        """For each torchvision input position, the mindcv input position holding the same channel."""
        where = {mapping[label]: i for i, label in enumerate(mindcv_inputs)}
        return torch.tensor([where[label] for label in tv_inputs])

    def produced(block: int, branch: str, count: int) -> torch.Tensor:
        """Row order of a producing layer: torchvision row r takes mindcv row rows[r]."""
        inverse = {mapping[(block, branch, i)][2]: i for i in range(count)}
        return torch.tensor([inverse[r] for r in range(count)])

    plan: dict[str, tuple[str, torch.Tensor | None, torch.Tensor | None]] = {}
    for b, (c_in, c_out, stride) in enumerate(_block_plan(widths)):
        n_proj, n_main = _branch_widths("mindcv", c_in, c_out, stride)
        ours, theirs = _block_prefix("mindcv", b), _block_prefix("torchvision", b)
        mindcv_in, tv_in = flows["mindcv"][0][b], flows["torchvision"][0][b]
        main_cols = source_index(mindcv_in["main"], tv_in["main"])
        main_rows = produced(b, "main", n_main)
        main, tv_main = f"{ours}.branch_main", f"{theirs}.branch2"
        plan[f"{main}.0"] = (f"{tv_main}.0", None, main_cols)
        for i in (1, 3, 4):
            plan[f"{main}.{i}"] = (f"{tv_main}.{i}", None, None)
        plan[f"{main}.5"] = (f"{tv_main}.5", main_rows, None)
        plan[f"{main}.6"] = (f"{tv_main}.6", main_rows, None)
        if stride == 2:
            proj, tv_proj = f"{ours}.branch_proj", f"{theirs}.branch1"
            proj_in = source_index(mindcv_in["proj"], tv_in["proj"])
            proj_rows = produced(b, "proj", n_proj)
            plan[f"{proj}.0"] = (f"{tv_proj}.0", proj_in, None)  # depthwise: its channels are its inputs
            plan[f"{proj}.1"] = (f"{tv_proj}.1", proj_in, None)
            plan[f"{proj}.2"] = (f"{tv_proj}.2", proj_rows, proj_in)
            plan[f"{proj}.3"] = (f"{tv_proj}.3", proj_rows, None)
    plan["first_conv.0"] = ("conv1.0", None, None)
    plan["first_conv.1"] = ("conv1.1", None, None)
    plan["conv_last.0"] = ("conv5.0", None, source_index(flows["mindcv"][1], flows["torchvision"][1]))
    plan["conv_last.1"] = ("conv5.1", None, None)
    plan["classifier"] = ("fc", None, None)
    return plan


def _apply(tensor: torch.Tensor, rows: torch.Tensor | None, cols: torch.Tensor | None) -> torch.Tensor:
    if tensor.ndim == 0:  # num_batches_tracked
        return tensor.clone()
    if rows is not None:
        tensor = tensor[rows]
    if cols is not None and tensor.ndim > 1:
        tensor = tensor[:, cols]
    return tensor.clone()


def _invert(index: torch.Tensor | None) -> torch.Tensor | None:
    return None if index is None else torch.argsort(index)


def convert_layout(state_dict: dict[str, torch.Tensor], name: str, source: str, target: str) -> dict[str, torch.Tensor]:
    """Re-express ``state_dict`` (of model ``name`` in layout ``source``) in layout ``target``.

    Exact: the converted network gives the same logits provided it keeps the source's stem pool
    padding and classifier bias (``weights.load_weights`` carries both along).
    """
    if source == target:
        return dict(state_dict)
    if {source, target} != set(_MAIN):
        raise CheckpointError(f"unknown layouts {source!r} -> {target!r}; use 'mindcv' or 'torchvision'")
    plan = _permutations(name)
    if source == "torchvision":
        plan = {tv: (ours, _invert(rows), _invert(cols)) for ours, (tv, rows, cols) in plan.items()}
    converted: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        prefix, _, leaf = key.rpartition(".")
        if prefix not in plan:
            raise CheckpointError(f"cannot convert {key!r}: it is not a parameter of {name} ({source} layout)")
        new_prefix, rows, cols = plan[prefix]
        converted[f"{new_prefix}.{leaf}"] = _apply(tensor, rows, cols)
    return converted
