"""Weight files in and out: MindSpore ``.ckpt``, safetensors, and ``.pth``/``.pt``.

Every file is read into one shape, :class:`Weights`: tensors named as our modules name them, the
layout they belong to, and the architecture they imply.  The format is recognised from the first
bytes, not the extension.  Pickles are never executed: ``.pth`` goes through
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import mindspore_ckpt
from .errors import CheckpointError
from .fileio import atomic_path, torch_bytes
from .layout import convert_layout
from .model import WIDTHS, architecture, build_network

FORMATS = ("ckpt", "safetensors", "pth")
EXTENSIONS = {".ckpt": "ckpt", ".safetensors": "safetensors", ".pth": "pth", ".pt": "pth"}
# MindSpore's BatchNorm names -> PyTorch's
MS_TO_TORCH = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_variance": "running_var"}
TORCH_TO_MS = {v: k for k, v in MS_TO_TORCH.items()}
MS_BN_ORDER = ("moving_mean", "moving_variance", "gamma", "beta")  # the order MindSpore writes them
TOP_LEVEL = {
    "mindcv": ("first_conv", "features", "conv_last", "classifier"),
    "torchvision": ("conv1", "stage2", "stage3", "stage4", "conv5", "fc"),
}
HEAD = {"mindcv": "classifier", "torchvision": "fc"}
STEM = {"mindcv": "first_conv.0.weight", "torchvision": "conv1.0.weight"}
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers
PTH_CONTAINER_KEYS = ("state_dict", "model", "model_state_dict", "net")
PTH_EMA_KEYS = ("model_ema", "ema", "state_dict_ema", "ema_state_dict")


@dataclass
class Weights:
    """Network tensors of a file, in our naming, plus what they say about the architecture."""

    tensors: dict[str, torch.Tensor]
    layout: str
    arch: dict[str, object]  # model, num_classes, in_channels, stem_pool, classifier_bias
    source: str
    format: str
    metadata: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # training state left out (moments.*, global_step...)

    @property
    def classes(self) -> list[str] | None:
        """The class names a training run of ours recorded, in label order; None for any other file.

        Labels are positions in the sorted class-folder names, so the same weights on a folder whose
        names differ mean other classes; ``validate`` and resuming compare these with the data's."""
        return recorded_classes(self.metadata.get("classes"), self.arch["num_classes"])

    @property
    def evaluation(self) -> dict[str, object] | None:
        """The evaluation-transform settings (``config.EVALUATION_KEYS``) of the run that wrote the file."""
        return recorded_evaluation(self.metadata.get(EVALUATION_KEY))


EVALUATION_KEY = "evaluation"  # where our files and exports keep the evaluation settings, as a JSON object


def recorded_evaluation(text: str | None) -> dict[str, object] | None:
    """A recorded JSON object of evaluation settings, or None where it is missing or is not one (values are
    checked as config values where they are used)."""
    try:
        value = json.loads(text) if text else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def read_evaluation(path: str | os.PathLike[str]) -> dict[str, object] | None:
    """The evaluation settings a ``.safetensors`` file of ours recorded, from its header alone; None for
    other formats and for files that cannot be read (reading the weights then says why)."""
    from safetensors import safe_open

    try:
        if detect_format(path) != "safetensors":
            return None
        with safe_open(str(path), framework="pt") as f:
            return recorded_evaluation((f.metadata() or {}).get(EVALUATION_KEY))
    except Exception:  # any unreadable file: the full read reports it
        return None


def recorded_classes(text: str | None, count: object) -> list[str] | None:
    """Class names as our files record them (a JSON list of ``count`` strings: safetensors metadata, the
    ``classes`` entry of an exported ONNX file), or None where the record is missing or malformed."""
    try:
        names = json.loads(text) if text is not None else None
    except ValueError:
        return None
    valid = isinstance(names, list) and all(isinstance(n, str) for n in names)
    return names if valid and len(names) == count else None


EXPORTS = {
    ".onnx": "an ONNX model (`predict` and `validate.py` run it in ONNX Runtime, `bench --onnx` times it)",
    ".pt2": "a torch.export program or a compiled package (torch.export.load(path).module() or "
    "shufflenetv2.load_package(path) loads it)",
}


def detect_format(path: str | os.PathLike[str]) -> str:
    """``ckpt``, ``safetensors`` or ``pth``, from the file's first bytes."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as exc:
        raise CheckpointError(f"cannot read weight file {path}: {exc.strerror or exc}") from None
    if size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes); the copy or download was probably interrupted")
    if path.suffix.lower() in EXPORTS:  # a .pt2 is a zip like torch.save's, whose reader then calls it corrupt
        raise CheckpointError(
            f"{path} is {EXPORTS[path.suffix.lower()]}, what `shufflenetv2 export` writes, not a weight file; "
            "this needs the weights it was exported from (.safetensors, MindCV .ckpt or .pth)"
        )
    if mindspore_ckpt.detect_encryption(head):
        return "ckpt"
    if head.startswith(b"PK\x03\x04") or head.startswith(b"\x80"):
        return "pth"  # torch.save's zip container, or its legacy pickle stream
    if len(head) >= 9 and head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= size:
        return "safetensors"
    if head.startswith(b"\x0a"):
        return "ckpt"  # protobuf: field 1, length-delimited
    raise CheckpointError(
        f"{path} is not a weight file this package reads (its first bytes are {head[:8].hex()}): expected a "
        "MindSpore .ckpt, a .safetensors file, or a .pth/.pt written by torch.save"
    )


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({exc}); it may be truncated or corrupt"
        ) from None


def _training_state_message(path: Path) -> str:
    """Where the weights are, for a checkpoint's ``.state.pt`` passed in their place: it sits beside them
    in a listing, and its EMA entry is the trainer's EMA state, not a weight file."""
    from .checkpoint import EMA_SUFFIX, STATE_SUFFIX, WEIGHTS_SUFFIX  # checkpoint.py imports this module

    stem = path.name.removesuffix(STATE_SUFFIX)
    ema_copy = path.with_name(stem + EMA_SUFFIX)
    return (
        f"{path} is the training state of a checkpoint (optimizer, counters, random states), not its weights: "
        f"those are in {path.with_name(stem + WEIGHTS_SUFFIX)}"
        + (f", and their EMA copy in {ema_copy}" if ema_copy.exists() else "")
        + ". Pass the weights (with --resume_opt True to continue the run, which reads this file from beside them)"
    )


def _pickled_objects_message(path: Path, reason: str) -> str:
    """Why a .pth was refused, naming what it pickles: torch's own text is a page of options (one of them
    ``weights_only=False``) around that name, with terminal colour codes in it."""
    found = re.search(r"Unsupported global: GLOBAL (\S+)", reason)
    what = f"a pickled {found[1]}" if found else "pickled Python objects other than tensors"
    if found and re.fullmatch(r"torchvision\.models\..*|shufflenetv2\..*", found[1]):
        what += " (a whole model, as torch.save(model) writes it)"
    return (
        f"refused to load {path}: it holds {what}, and unpickling could run arbitrary code. Where you trust the "
        "file, save its weights alone and pass those: torch.save(model.state_dict(), 'weights.pth'), or "
        "shufflenetv2.save_weights('weights.safetensors', model)"
    )


def _read_pth(path: Path, ema: bool) -> dict[str, torch.Tensor]:
    try:
        # a file object, not the path: torch.load hands any path ending in .safetensors to safetensors,
        # but the format was already recognised from the content
        with open(path, "rb") as f:
            obj = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(_pickled_objects_message(path, str(exc))) from None
    except Exception as exc:
        # a damaged file can make torch.load raise nearly anything: RuntimeError and BadZipFile from the
        # zip container, and from the pickle stream struct.error, IndexError, KeyError, TypeError and
        # AssertionError (all seen fuzzing truncated and bit-flipped files); none of them is a bug here
        raise CheckpointError(
            f"{path} is not a readable torch file ({type(exc).__name__}: {exc}); it may be truncated or corrupt"
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
    if {"optimizer", "global_step", "rng"} <= obj.keys():  # a run checkpoint's .state.pt (checkpoint.py)
        raise CheckpointError(_training_state_message(path))
    if ema:
        found = next((k for k in PTH_EMA_KEYS if isinstance(obj.get(k), dict)), None)
        if found is None:
            raise CheckpointError(f"{path} holds no EMA weights (looked for {', '.join(PTH_EMA_KEYS)})")
        obj = obj[found]
    else:
        found = next((k for k in PTH_CONTAINER_KEYS if isinstance(obj.get(k), dict)), None)
        if found is not None:
            obj = obj[found]
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _read_ckpt(path: Path) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in mindspore_ckpt.read_ckpt(path).items()}


def _torch_name(key: str) -> str:
    prefix, _, leaf = key.rpartition(".")
    return f"{prefix}.{MS_TO_TORCH[leaf]}" if prefix and leaf in MS_TO_TORCH else key


def _strip_wrappers(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    return key


def _network_tensors(raw: dict[str, torch.Tensor], ema: bool, source: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Split network weights from training state; with ``ema`` take MindCV's ``ema.*`` copies."""
    tensors = {_torch_name(_strip_wrappers(k)): v for k, v in raw.items()}
    if ema and any(k.startswith("ema.") for k in tensors):
        averaged = {k[len("ema.") :]: v for k, v in tensors.items() if k.startswith("ema.")}
        tensors = {**tensors, **averaged}  # BN statistics are not averaged in MindCV: they stay the network's
    elif ema:
        from .checkpoint import EMA_SUFFIX, WEIGHTS_SUFFIX  # checkpoint.py imports this module

        copy = Path(source).with_name(Path(source).name.removesuffix(WEIGHTS_SUFFIX) + EMA_SUFFIX)
        where = f"; this checkpoint's EMA copy is {copy}: pass that file, without --ema" if copy.exists() else ""
        raise CheckpointError(f"{source} holds no EMA weights (no 'ema.*' tensors); load it without ema=True{where}")
    known = {p for names in TOP_LEVEL.values() for p in names}
    network = {k: v for k, v in tensors.items() if k.split(".", 1)[0] in known}
    skipped = [k for k in tensors if k not in network]
    return network, skipped


def _detect_layout(tensors: dict[str, torch.Tensor], source: str) -> str:
    hits = {layout: sum(k.split(".", 1)[0] in names for k in tensors) for layout, names in TOP_LEVEL.items()}
    if not any(hits.values()):
        raise CheckpointError(
            f"{source} contains no ShuffleNetV2 weights: none of its {len(tensors)} tensor names start with "
            f"{', '.join(TOP_LEVEL['mindcv'])} (MindCV) or {', '.join(TOP_LEVEL['torchvision'])} (torchvision)"
        )
    if all(hits.values()):
        raise CheckpointError(f"{source} mixes MindCV and torchvision parameter names; it is not one network")
    return max(hits, key=hits.get)


def infer_architecture(tensors: dict[str, torch.Tensor], layout: str) -> dict[str, object]:
    """Model name, class count, input channels and head bias implied by the tensors' shapes.

    ``model`` is None when no width fits (the caller reports the mismatching tensors).
    """
    head, stem = HEAD[layout], STEM[layout]
    head_weight = tensors.get(f"{head}.weight")
    # a 0-dim head (a corrupt or foreign file) has no class count: load_weights reports its shape
    num_classes = int(head_weight.shape[0]) if head_weight is not None and head_weight.ndim else None
    in_channels = int(tensors[stem].shape[1]) if stem in tensors and tensors[stem].ndim == 4 else None
    found = None
    for name in WIDTHS:
        with torch.device("meta"):
            reference = build_network(name, 1, 1, layout).state_dict()
        body = {
            k: v.shape
            for k, v in reference.items()
            if not k.startswith((head, stem)) and not k.endswith("num_batches_tracked")
        }
        if all(k in tensors and tensors[k].shape == shape for k, shape in body.items()):
            found = name
            break
    return {
        "model": found,
        "layout": layout,
        "num_classes": num_classes,
        "in_channels": in_channels,
        "stem_pool": "same" if layout == "mindcv" else "symmetric",
        "classifier_bias": f"{head}.bias" in tensors,
    }


def read_weights(path: str | os.PathLike[str], ema: bool = False) -> Weights:
    """Read any supported weight file; ``ema`` picks the exponential-moving-average copy."""
    path = Path(path)
    fmt = detect_format(path)
    metadata: dict[str, str] = {}
    if fmt == "ckpt":
        raw = _read_ckpt(path)
    elif fmt == "safetensors":
        raw, metadata = _read_safetensors(path)
    else:
        raw = _read_pth(path, ema)  # picks the EMA copy by its container key
    tensors, skipped = _network_tensors(raw, ema and fmt != "pth", str(path))
    layout = _detect_layout(tensors, str(path))
    arch = infer_architecture(tensors, layout)
    if metadata.get("format") == "shufflenetv2":
        arch["stem_pool"] = metadata.get("stem_pool", arch["stem_pool"])
    return Weights(tensors, layout, arch, str(path), fmt, metadata, skipped)


def _describe(arch: dict[str, object]) -> str:
    name = arch["model"] or "no known ShuffleNetV2 width"
    return f"{name} ({arch['layout']} layout, num_classes={arch['num_classes']}, in_channels={arch['in_channels']})"


def _listed(problems: list[str]) -> str:
    return "; ".join(problems[:12]) + (f"; and {len(problems) - 12} more" if len(problems) > 12 else "")


def _check_convertible_shapes(tensors: dict[str, torch.Tensor], name: str, weights: Weights, layout: str) -> None:
    """Layout conversion permutes channels by index, so every tensor it permutes must have the shape it
    has in ``name``; a wrong-shaped one is reported here, in the file's own names, instead of failing (or
    being silently scrambled) inside the permutation."""
    head, stem = HEAD[weights.layout], STEM[weights.layout]
    with torch.device("meta"):
        reference = build_network(name, 1, 1, weights.layout).state_dict()
    problems = [
        f"{key}: file has {tuple(value.shape)}, {name} expects {tuple(reference[key].shape)}"
        for key, value in tensors.items()
        if key in reference and not key.startswith((head, stem)) and value.shape != reference[key].shape
    ]
    if problems:
        raise CheckpointError(
            f"{weights.source} holds {_describe(weights.arch)}, which cannot be converted to the {layout} layout "
            f"of {name}: {len(problems)} mismatching tensors: {_listed(problems)}."
        )


def load_weights(model: nn.Module, weights: Weights, drop_classifier: bool = False) -> None:
    """Copy ``weights`` into ``model``, converting layouts where that is exact.

    Every mismatch is reported at once.  ``drop_classifier`` keeps the model's own (freshly
    initialised) classifier when the class counts differ, for fine-tuning.  A 3-channel stem is
    summed over its input axis for a 1-channel model, as MindCV does.
    """
    target = architecture(model)
    name, layout = str(target["model"]), str(target["layout"])
    tensors = dict(weights.tensors)
    if weights.arch["stem_pool"] != target["stem_pool"]:
        raise CheckpointError(
            f"{weights.source} was trained with a {weights.arch['stem_pool']!r} stem pool but the model uses "
            f"{target['stem_pool']!r}, which changes the logits: build the model with "
            f"stem_pool={weights.arch['stem_pool']!r} (create_model does this for you)"
        )
    if weights.layout != layout:
        if weights.arch["model"] not in (None, name):
            raise CheckpointError(f"{weights.source} holds {_describe(weights.arch)}, not {name}")
        _check_convertible_shapes(tensors, name, weights, layout)
        tensors = convert_layout(tensors, name, weights.layout, layout)
    head, stem = HEAD[layout], STEM[layout]
    expected = model.state_dict()
    if stem in tensors and stem in expected and tensors[stem].ndim == 4:
        theirs, ours = tensors[stem].shape[1], expected[stem].shape[1]
        if theirs == 3 and ours == 1:
            tensors[stem] = tensors[stem].sum(1, keepdim=True)
    bias = f"{head}.bias"
    if bias in expected and bias not in tensors and f"{head}.weight" in tensors:
        tensors[bias] = torch.zeros_like(expected[bias])  # a bias-free head is a zero-bias head
    if bias in tensors and bias not in expected and not tensors[bias].any():
        del tensors[bias]
    head_mismatch = any(
        k.startswith(head + ".") and k in tensors and tensors[k].shape != v.shape for k, v in expected.items()
    )
    if drop_classifier and head_mismatch:
        tensors = {k: v for k, v in tensors.items() if not k.startswith(head + ".")}
    problems = []
    for key, value in expected.items():
        if key not in tensors:
            if key.endswith("num_batches_tracked") or (drop_classifier and key.startswith(head + ".")):
                continue
            problems.append(f"{key}: missing (model expects {tuple(value.shape)})")
        elif tensors[key].shape != value.shape:
            problems.append(f"{key}: file has {tuple(tensors[key].shape)}, model expects {tuple(value.shape)}")
    problems += [f"{key}: not a parameter of the model" for key in tensors if key not in expected]
    if problems:
        hint = ""
        if head_mismatch and len(problems) <= 2:
            hint = (
                f" Only the classifier differs: pass num_classes={weights.arch['num_classes']} to use it, or "
                "drop_classifier=True to fine-tune a new one (train.py: --num_classes "
                f"{weights.arch['num_classes']}, or --drop_classifier True)."
            )
        raise CheckpointError(
            f"{weights.source} holds {_describe(weights.arch)}, which does not fit the model "
            f"{_describe(target)}: {len(problems)} mismatching tensors: {_listed(problems)}.{hint}"
        )
    with torch.no_grad():
        for key, value in tensors.items():
            expected[key].copy_(value.to(expected[key].dtype))


def _ms_state(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Our MindCV-layout state dict in MindSpore's names and order, as float32 numpy arrays."""
    bn_prefixes = [k[: -len(".running_mean")] for k in state if k.endswith(".running_mean")]
    out: dict[str, np.ndarray] = {}
    for key, value in state.items():
        prefix, _, leaf = key.rpartition(".")
        if leaf == "num_batches_tracked":
            continue
        if prefix in bn_prefixes:
            if leaf == "weight":  # first BN tensor: write all four in MindSpore's order
                for ms_leaf in MS_BN_ORDER:
                    tensor = state[f"{prefix}.{MS_TO_TORCH[ms_leaf]}"]
                    out[f"{prefix}.{ms_leaf}"] = tensor.detach().float().cpu().numpy()
            continue
        out[key] = value.detach().float().cpu().numpy()
    return out


def _mindcv_native(state: dict[str, torch.Tensor], arch: dict[str, object]) -> dict[str, torch.Tensor]:
    """The state as MindCV's own network would hold it, or an error saying why that is not exact."""
    if arch["stem_pool"] != "same":
        raise CheckpointError(
            "MindCV's network pads its stem pool SAME-style but these weights were trained with a symmetric "
            "pool, so as a .ckpt they would give different logits in MindCV; save them as .safetensors instead"
        )
    if arch["layout"] == "torchvision":
        state = convert_layout(state, str(arch["model"]), "torchvision", "mindcv")
    bias = state.pop("classifier.bias", None)
    if bias is not None and bias.any():
        raise CheckpointError(
            "these weights have a nonzero classifier bias, which MindCV's classifier does not have; "
            "save them as .safetensors instead"
        )
    return state


def output_format(path: str | os.PathLike[str], fmt: str | None = None) -> str:
    """``fmt``, else the one ``path``'s extension names."""
    fmt = fmt or EXTENSIONS.get(Path(path).suffix.lower())
    if fmt not in FORMATS:
        raise CheckpointError(f"cannot tell the format of {path}: use a .ckpt, .safetensors, .pth or .pt name")
    return fmt


def save_weights(
    path: str | os.PathLike[str],
    model: nn.Module,
    fmt: str | None = None,
    source: str = "",
    classes: Sequence[str] | None = None,
    evaluation: dict[str, object] | None = None,
) -> Path:
    """Write ``model``'s weights atomically; the format comes from ``fmt`` or the extension.

    ``.safetensors`` records the architecture in its metadata, and the class names and evaluation settings
    when given (``Weights.classes``, ``Weights.evaluation``).  ``.pth`` is a plain state dict (what
    torchvision loads), so it refuses an architecture it cannot express.  ``.ckpt`` is for MindCV.
    """
    path = Path(path)
    fmt = output_format(path, fmt)
    arch = architecture(model)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if fmt == "safetensors":
        from safetensors.torch import save

        metadata = {"format": "shufflenetv2", "source": source, **{k: str(v) for k, v in arch.items()}}
        if classes is not None:
            metadata["classes"] = json.dumps(list(classes), ensure_ascii=False)
        if evaluation is not None:
            metadata[EVALUATION_KEY] = json.dumps(evaluation)
        with atomic_path(path) as tmp:  # bytes written by Python, so a full disk is a plain OSError
            tmp.write_bytes(save(state, metadata=metadata))
    elif fmt == "pth":
        default_pool = "same" if arch["layout"] == "mindcv" else "symmetric"
        if arch["stem_pool"] != default_pool:
            raise CheckpointError(
                f"a .pth file is a plain state dict and cannot record this model's {arch['stem_pool']!r} stem "
                f"pool (the {arch['layout']} layout's default is {default_pool!r}); loading it back would change "
                "the logits. Save as .safetensors, which records it"
            )
        with atomic_path(path) as tmp:
            tmp.write_bytes(torch_bytes(state))
    else:
        arrays = _ms_state(_mindcv_native(state, arch))
        with atomic_path(path) as tmp:
            tmp.write_bytes(mindspore_ckpt.serialize_ckpt(arrays))
    return path
