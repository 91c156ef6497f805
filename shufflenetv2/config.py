"""The training/validation configuration: MindCV's keys and meanings, validated strictly.

A YAML file (``-c/--config``) sets the values, command-line flags override them, and anything unknown
or of the wrong type is an error naming the key and the nearest valid one.  The config is plain data
(a dataclass) and this module does not import torch: ``validate`` checks every value and combination that
can be judged without a device or a dataset (including cheap file-system checks of ckpt_path and the
output folders), so a mistake is reported before any dataset is indexed or model built.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import re
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import yaml

from . import recipes
from .errors import ShuffleNetV2Error


class ConfigError(ShuffleNetV2Error, ValueError):
    """A configuration value or combination that cannot work; the message says which and why."""


IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)  # MindCV normalises 0..255 pixels
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)

# model.WIDTHS' names, spelled out so that the config stays free of torch (tests/test_bad_config.py checks they agree)
MODELS = ("shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "shufflenet_v2_x1_5", "shufflenet_v2_x2_0")

# The fixed class counts of the built-in datasets: a wrong num_classes is reported before any download or export.
DATASET_CLASSES = {"cifar10": 10, "cifar100": 100, "mnist": 10, "digits": 10}

CHOICES: dict[str, tuple[Any, ...]] = {
    "mode": (0, 1),
    "model": MODELS,
    "dataset": ("imagenet", "imagefolder", "cifar10", "cifar100", "mnist", "digits"),
    "interpolation": ("bilinear", "bicubic", "nearest", "area", "lanczos"),
    "ckpt_save_policy": ("latest_k", "top_k", "none"),
    "amp_level": ("O0", "O1", "O2", "O3"),
    "amp_dtype": ("auto", "bfloat16", "float16"),
    "loss": ("CE", "BCE"),
    "scheduler": (
        "cosine_decay",
        "warmup_cosine_decay",
        "constant",
        "step_decay",
        "multi_step_decay",
        "linear_decay",
    ),
    "opt": ("momentum", "sgd", "nesterov", "adamw", "adam", "rmsprop"),
    "weight_decay_filter": ("disable", "auto", "norm_and_bias"),
    "loss_scale_type": ("fixed", "dynamic", "auto"),
    "device": ("auto", "cpu", "cuda"),
    "data_pipeline": ("auto", "fast", "classic"),
}


@dataclasses.dataclass
class Config:
    """MindCV's ``config.py`` arguments that apply to ShuffleNetV2, with MindCV's defaults.

    Keys marked "ours" are additions; the others keep MindCV's names and semantics.
    """

    # system
    mode: int = 0  # 0: compiled (MindSpore graph mode -> torch.compile), 1: eager (pynative)
    # ours: on a CPU mode 0 compiles nothing, because torch.compile trains this network slower there (0.67-0.88x
    # eager channels_last in every bench run, after a minute of compiling) and evaluates it no faster than the
    # fused inference model (engine.evaluates_fused); True compiles both, as on a GPU
    compile_on_cpu: bool = False
    distribute: bool = False  # under torchrun it is switched on when WORLD_SIZE > 1
    val_while_train: bool = False
    val_split: str = "val"
    val_interval: int = 1
    log_interval: int = 100
    seed: int = 42
    device: str = "auto"  # ours: auto = CUDA when present, else CPU
    device_target: str = "auto"  # MindCV's key; accepted for recipe compatibility, "device" decides
    num_parallel_workers: int = 8
    sync_bn: bool = False  # ours
    deterministic: bool = False  # ours: deterministic algorithms (slower on GPU)
    # dataset
    dataset: str = "imagenet"
    data_dir: str = ""
    train_split: str = "train"
    dataset_download: bool = False
    shuffle: bool = True
    num_samples: int | None = None
    batch_size: int = 32  # per device, as in MindCV
    drop_remainder: bool = True
    # augmentation
    image_resize: int = 224
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (0.75, 1.333)
    hflip: float = 0.5
    vflip: float = 0.0
    color_jitter: float | None = 0.4
    interpolation: str = "bilinear"
    auto_augment: str | None = None
    fast_dct: bool = True  # ours: the fast pipeline's workers decode training JPEGs with libjpeg-turbo's fast IDCT
    # (~10 % faster, 1.2 grey levels off on average); evaluation always decodes exactly
    decode_on_device: bool = False  # ours: the fast pipeline decodes JPEGs on the training device (nvJPEG on a GPU)
    data_pipeline: str = "auto"  # ours: fast = uint8 workers + batch jitter/normalise (pipeline.py); auto = fast
    # unless auto_augment is set; classic = every transform per image in the workers (data.build_transform)
    re_prob: float = 0.0
    re_scale: tuple[float, float] = (0.02, 0.33)
    re_ratio: tuple[float, float] = (0.3, 3.3)
    re_value: float = 0.0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    crop_pct: float = 0.875
    mixup: float = 0.0
    cutmix: float = 0.0
    cutmix_prob: float = 1.0
    mixup_off_epoch: float = 0.0
    # model
    model: str = "shufflenet_v2_x0_5"
    num_classes: int = 1000
    in_channels: int = 3
    pretrained: bool = False
    ckpt_path: str = ""
    drop_classifier: bool = False  # ours: ckpt_path with another class count gets a new num_classes classifier
    keep_checkpoint_max: int = 10
    ckpt_save_dir: str = "./ckpt"
    ckpt_save_interval: int = 1
    ckpt_save_steps: int = 0  # ours: also save every N optimizer steps inside an epoch (0 = epoch ends only)
    ckpt_save_policy: str = "latest_k"
    auto_resume: bool = False
    resume_opt: bool = False
    epoch_size: int = 90
    dataset_sink_mode: bool = True  # MindSpore-only; accepted and ignored
    amp_level: str = "O0"
    amp_dtype: str = "auto"  # ours: auto = bfloat16 where supported, else float16
    ema: bool = False
    ema_decay: float = 0.9999
    precise_bn: int = 0  # ours: training images to recompute BatchNorm statistics from at each epoch's end
    channels_last: bool = True  # ours: NHWC activations; faster training on CPUs and on GPUs (benchmarks/)
    # loss
    loss: str = "CE"
    label_smoothing: float = 0.0
    # learning-rate schedule
    scheduler: str = "cosine_decay"
    lr: float = 0.001
    min_lr: float = 1e-6
    # ours: the images per optimizer step that lr was tuned for (MindCV's ImageNet recipes: 8 devices x 64).
    # lr is never rescaled (MindCV does not); a run that takes another number per step says how to match it
    lr_global_batch: int | None = None
    warmup_epochs: int = 3
    warmup_factor: float = 0.0
    decay_epochs: int = 10
    decay_rate: float = 0.9
    multi_step_decay_milestones: tuple[int, ...] = (30, 60, 90)
    lr_epoch_stair: bool = False
    num_cycles: int = 1
    cycle_decay: float = 1.0
    # optimizer
    opt: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 1e-6
    weight_decay_filter: str = "disable"
    use_nesterov: bool = False
    eps: float = 1e-10
    loss_scale_type: str = "fixed"
    loss_scale: float = 1.0
    drop_overflow_update: bool = False
    clip_grad: bool = False
    clip_value: float = 15.0
    gradient_accumulation_steps: int = 1
    # outputs
    output_dir: str = ""  # ours: run directory for logs and curves (default: ckpt_save_dir)
    max_bad_fraction: float = 0.01  # ours: undecodable images tolerated before training stops


# What ``--help`` says of each key, by section (the same sections as ``Config``); the choices and the
# default are added to each line.  tests/test_config.py checks that every key has one.
HELP: dict[str, dict[str, str]] = {
    "system": {
        "mode": "0 = MindSpore's graph mode: torch.compile on a GPU (on a CPU: eager training, fused evaluation); "
        "1 = eager (PyNative)",
        "compile_on_cpu": "ours: compile training and evaluation on a CPU too, as on a GPU (slower there)",
        "distribute": "data-parallel training; under torchrun it is switched on by itself when WORLD_SIZE > 1",
        "val_while_train": "evaluate on val_split during training (every val_interval epochs, and after the last)",
        "val_split": "the folder under data_dir to evaluate on",
        "val_interval": "evaluate every N epochs",
        "log_interval": "log the loss, lr and speed every N batches",
        "seed": "seeds every random draw: a run repeats itself exactly on one machine",
        "device": "ours: where to run; auto = CUDA when present, else the CPU",
        "device_target": "MindCV's device key: accepted for its recipes, `device` decides",
        "num_parallel_workers": "loader worker processes per device (capped at the CPU count)",
        "sync_bn": "ours: BatchNorm statistics over the global batch of all devices",
        "deterministic": "ours: deterministic algorithms only (slower on GPUs)",
    },
    "dataset": {
        "dataset": "imagenet and imagefolder read data_dir/<split>/<class>/*; cifar and mnist are downloaded "
        "(dataset_download), digits is embedded",
        "data_dir": "the dataset's folder",
        "train_split": "the folder under data_dir to train on",
        "dataset_download": "download cifar10 / cifar100 / mnist into data_dir when missing",
        "shuffle": "shuffle the training samples every epoch",
        "num_samples": "train on a seeded, class-balanced subset of this many images",
        "batch_size": "images per device per step, as in MindCV",
        "drop_remainder": "drop the last incomplete training batch",
    },
    "augmentation": {
        "image_resize": "the side of the training crop and of the evaluation centre crop, in pixels",
        "scale": "RandomResizedCrop's range of crop areas, as fractions of the image",
        "ratio": "RandomResizedCrop's range of aspect ratios",
        "hflip": "probability of a horizontal flip",
        "vflip": "probability of a vertical flip",
        "color_jitter": "brightness, contrast and saturation jitter strength (null: none)",
        "interpolation": "resampling for the resizes",
        "auto_augment": "randaug-*, autoaug, trivialaugwide or augmix policy (null: none; the classic pipeline)",
        "fast_dct": "ours: decode training JPEGs with libjpeg-turbo's fast integer IDCT (about 10 %% faster)",
        "decode_on_device": "ours: decode the batch's JPEGs where the model runs (nvJPEG on a GPU)",
        "data_pipeline": "ours: fast = uint8 workers and per-batch jitter and normalisation; classic = torchvision's "
        "per-image transforms; auto = fast unless auto_augment is set",
        "re_prob": "probability of random erasing",
        "re_scale": "random erasing's range of areas",
        "re_ratio": "random erasing's range of aspect ratios",
        "re_value": "the value erased pixels get, after normalisation (0: the mean)",
        "mean": "per-channel mean for normalisation, on the 0-255 scale",
        "std": "per-channel standard deviation for normalisation, on the 0-255 scale",
        "crop_pct": "evaluation resizes to image_resize / crop_pct, then crops the centre",
        "mixup": "mixup alpha (0: off)",
        "cutmix": "cutmix alpha (0: off)",
        "cutmix_prob": "the probability that a batch is mixed (mixup or cutmix, an even choice when both are on)",
        "mixup_off_epoch": "turn mixup and cutmix off from this epoch on (0: never)",
    },
    "model": {
        "model": "the network width",
        "num_classes": "the classifier's outputs; must match the class folders",
        "in_channels": "input channels",
        "pretrained": "start from MindCV's released ImageNet weights (downloaded once)",
        "ckpt_path": "weights to start from or to validate (.safetensors, MindCV .ckpt, .pth; validate also .onnx), "
        "or a run's checkpoint to resume with resume_opt",
        "drop_classifier": "ours: ckpt_path with another class count gets a new num_classes classifier",
        "keep_checkpoint_max": "how many epoch checkpoints to keep",
        "ckpt_save_dir": "where checkpoints (and, unless output_dir, logs and curves) go",
        "ckpt_save_interval": "save a checkpoint every N epochs (and after the last)",
        "ckpt_save_steps": "ours: also save every N optimizer steps inside an epoch (0: epoch ends only)",
        "ckpt_save_policy": "keep the newest (latest_k) or the best (top_k) checkpoints, or none",
        "auto_resume": "continue from the newest checkpoint in ckpt_save_dir, if any",
        "resume_opt": "with ckpt_path: resume its optimizer, schedule and epoch, not only its weights",
        "epoch_size": "epochs to train",
        "dataset_sink_mode": "MindSpore-only; accepted for its recipes and ignored",
        "amp_level": "O0 = float32; O1-O3 = autocast in bfloat16 (or float16 where bfloat16 is missing)",
        "amp_dtype": "ours: the autocast type; auto = bfloat16 where supported, else float16",
        "ema": "keep an exponential moving average of the weights, evaluated and saved beside them",
        "ema_decay": "the average's decay per step",
        "precise_bn": "ours: at each epoch's end, recompute the BatchNorm statistics that evaluation and the saved "
        "weights use from this many training images under the current weights (0: keep the running averages); "
        "for fine-tuning and small datasets, where the averages lag the weights",
        "channels_last": "ours: NHWC activations, faster on CPUs and GPUs",
    },
    "loss": {
        "loss": "cross-entropy (CE) or binary cross-entropy (BCE)",
        "label_smoothing": "label smoothing factor",
    },
    "learning-rate schedule": {
        "scheduler": "the decay after warmup",
        "lr": "the peak learning rate (never rescaled for the batch size; see lr_global_batch)",
        "min_lr": "the learning rate the decay ends at",
        "lr_global_batch": "ours: the images per optimizer step that lr was tuned for; a run that takes another "
        "number says how to match it. An --lr flag drops the file's value",
        "warmup_epochs": "epochs of linear warmup",
        "warmup_factor": "warmup starts at lr * warmup_factor",
        "decay_epochs": "the cosine's period in epochs, or the step decay's interval",
        "decay_rate": "the step and multi-step decays' factor",
        "multi_step_decay_milestones": "epochs after warmup at which multi_step_decay multiplies by decay_rate",
        "lr_epoch_stair": "change the learning rate once per epoch instead of every step",
        "num_cycles": "cosine cycles of decay_epochs each (1: no restart)",
        "cycle_decay": "each cosine cycle's peak is lr * cycle_decay ** cycle",
    },
    "optimizer": {
        "opt": "the optimizer",
        "momentum": "momentum (momentum, sgd, nesterov, rmsprop)",
        "weight_decay": "weight decay",
        "weight_decay_filter": "disable decays every parameter, auto all but BatchNorm's, norm_and_bias also no bias",
        "use_nesterov": "Nesterov momentum with opt momentum or sgd",
        "eps": "RMSProp's epsilon",
        "loss_scale_type": "float16 loss scaling: fixed, or dynamic (auto)",
        "loss_scale": "the fixed loss scale, or the dynamic one's start",
        "drop_overflow_update": "with a fixed loss scale: skip updates whose gradients overflowed",
        "clip_grad": "clip the gradients' global norm",
        "clip_value": "the norm to clip to",
        "gradient_accumulation_steps": "batches per optimizer step",
    },
    "outputs": {
        "output_dir": "ours: the run's folder for logs, metrics and curves; '' = ckpt_save_dir",
        "max_bad_fraction": "ours: the fraction of an epoch's images that may be unreadable before training stops",
    },
}


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(Config)}
_TYPES = typing.get_type_hints(Config)


# Names people type from other trainers (timm, torchvision, Lightning) that MindCV spells differently;
# difflib cannot find these because the spellings share too little.
ALIASES: dict[str, tuple[str, ...]] = {
    "learning_rate": ("lr",),
    "base_lr": ("lr",),
    "min_learning_rate": ("min_lr",),
    "lr_min": ("min_lr",),
    "epochs": ("epoch_size",),
    "num_epochs": ("epoch_size",),
    "max_epochs": ("epoch_size",),
    "warmup": ("warmup_epochs",),
    "optimizer": ("opt",),
    "optim": ("opt",),
    "lr_scheduler": ("scheduler",),
    "sched": ("scheduler",),
    "nesterov": ("use_nesterov",),
    "wd": ("weight_decay",),
    "workers": ("num_parallel_workers",),
    "num_workers": ("num_parallel_workers",),
    "img_size": ("image_resize",),
    "image_size": ("image_resize",),
    "input_size": ("image_resize",),
    "bs": ("batch_size",),
    "drop_last": ("drop_remainder",),
    "checkpoint_path": ("ckpt_path",),
    "checkpoint": ("ckpt_path",),
    "weights": ("ckpt_path",),
    "resume": ("ckpt_path", "auto_resume"),
    "checkpoint_dir": ("ckpt_save_dir",),
    "save_dir": ("ckpt_save_dir",),
    "amp": ("amp_level",),
    "fp16": ("amp_level",),
    "mixed_precision": ("amp_level",),
    "smoothing": ("label_smoothing",),
    "ema_rate": ("ema_decay",),
    "model_ema": ("ema",),
    "model_ema_decay": ("ema_decay",),
    "reprob": ("re_prob",),
    "aa": ("auto_augment",),
    "data_path": ("data_dir",),
    "data_root": ("data_dir",),
    "root": ("data_dir",),
    "arch": ("model",),
    "output": ("output_dir",),
}


def suggest_key(key: object) -> str:
    """``; did you mean 'x'?`` for an unknown key: a known alias, the key with dashes fixed, or difflib's pick."""
    if not isinstance(key, str):  # YAML keys such as 3 or null: nothing to compare with the names
        return "; see `shufflenetv2 train --help` for the valid keys"
    text = key.strip()
    normal = text.lower().replace("-", "_")
    names = ALIASES.get(normal) or ((normal,) if normal in FIELDS else ())
    if not names:
        names = tuple(difflib.get_close_matches(normal, FIELDS, n=1, cutoff=0.5))
    if not names:
        return "; see `shufflenetv2 train --help` for the valid keys"
    return f"; did you mean {' or '.join(map(repr, names))}?"


def _parse_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ConfigError(f"{key} must be True or False, got {value!r}")


def _coerce(key: str, annotation: Any, value: Any) -> Any:
    """``value`` converted to the field's type, or a ConfigError naming the key."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        empty = value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", ""))
        if empty and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, inner[0], value)
    if annotation is bool:
        return _parse_bool(key, value)
    if origin is tuple:
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value if value.strip().startswith("[") else f"[{value}]")
            except yaml.YAMLError:
                raise ConfigError(f"{key} must be a list such as 0.08,1.0 or [0.08, 1.0], got {value!r}") from None
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        if args and args[-1] is not Ellipsis and len(value) != len(args):
            raise ConfigError(f"{key} must have {len(args)} values, got {len(value)}: {value!r}")
        item_type = args[0] if args else float
        return tuple(_coerce(key, item_type, v) for v in value)
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(str(value).strip())
        except ValueError:
            raise ConfigError(f"{key} must be an integer, got {value!r}") from None
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} must be a number, got {value!r}") from None
        if not math.isfinite(number):  # nan would pass every range check below and train on garbage
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        return number
    if annotation is str:
        if isinstance(value, (dict, list, tuple)):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return "" if value is None else str(value)
    raise ConfigError(f"{key}: unsupported type {annotation}")  # pragma: no cover - schema bug


def from_dict(values: dict[str, Any], base: Config | None = None, where: str = "config", check: bool = True) -> Config:
    """A Config: ``values`` over ``base`` (or the defaults), validated unless ``check`` is False."""
    cfg = dataclasses.replace(base) if base is not None else Config()
    for key, value in values.items():
        if key not in FIELDS:
            raise ConfigError(f"unknown key {key!r} in {where}{suggest_key(key)}")
        try:
            setattr(cfg, key, _coerce(key, _TYPES[key], value))
        except ConfigError as exc:
            raise ConfigError(f"{exc} (from {where})") from None
    if check:
        validate(cfg)
    return cfg


class _DuplicateKeyError(yaml.constructor.ConstructorError):
    def __init__(self, key: object, first: yaml.Mark, again: yaml.Mark) -> None:
        super().__init__(problem=f"duplicate key {key!r}", problem_mark=again)
        self.key, self.lines = key, (first.line + 1, again.line + 1)


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping: PyYAML silently keeps the last."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:  # before merge keys (<<: *anchor) are flattened: overriding them is fine
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if first is not key_node:
                raise _DuplicateKeyError(key, first.start_mark, key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's multi-line report (with a caret drawing) as one line: the problem, where, and in what."""
    if not isinstance(exc, yaml.MarkedYAMLError) or exc.problem is None:
        return " ".join(str(exc).split())
    text = exc.problem
    if exc.problem_mark is not None:
        text += f" at line {exc.problem_mark.line + 1}, column {exc.problem_mark.column + 1}"
    if exc.context:
        text += f" ({exc.context}"
        if exc.context_mark is not None:
            text += f" that starts at line {exc.context_mark.line + 1}, column {exc.context_mark.column + 1}"
        text += ")"
    return " ".join(text.split())


def load_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML config file, or in the shipped recipe ``path`` names (``recipes.find``); a file
    that cannot be one is a ConfigError saying how to fix it."""
    given, path = path, recipes.find(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {given} does not exist; {recipes.missing_advice(given)}") from None
    except OSError as exc:
        raise ConfigError(
            f"cannot read config file {path}: {exc.strerror or exc}; check the path given to -c/--config"
        ) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {path} is not UTF-8 text (byte {exc.start} is 0x{exc.object[exc.start]:02x}); -c/--config "
            "takes a YAML file of `key: value` lines such as configs/shufflenetv2/shufflenet_v2_0.5_ascend.yaml"
        ) from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # safe: _StrictLoader is a SafeLoader
    except _DuplicateKeyError as exc:
        first, again = exc.lines
        raise ConfigError(
            f"{path} sets {exc.key!r} twice (lines {first} and {again}); YAML would silently keep the last value, "
            "so delete the one you do not want"
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"{path} is not valid YAML: {_yaml_problem(exc)}; fix that line (one `key: value` per line, indented "
            "with spaces, not tabs)"
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path} must be a mapping of keys to values, not a {type(data).__name__}; write one `key: value` per "
            "line at the top level, e.g. `lr: 0.1`"
        )
    return data


def validate(cfg: Config) -> None:
    """Values and combinations that cannot work, each reported with what to change."""
    for key, choices in CHOICES.items():
        if getattr(cfg, key) not in choices:
            raise ConfigError(f"{key} must be one of {', '.join(map(str, choices))}, got {getattr(cfg, key)!r}")
    positive = ("batch_size", "epoch_size", "val_interval", "log_interval", "ckpt_save_interval",
                "gradient_accumulation_steps", "num_classes", "in_channels", "image_resize")  # fmt: skip
    for key in positive:
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{key} must be at least 1, got {getattr(cfg, key)}")
    if cfg.num_parallel_workers < 0:
        raise ConfigError(f"num_parallel_workers must be 0 or more, got {cfg.num_parallel_workers}")
    for key in ("num_samples", "lr_global_batch"):
        if getattr(cfg, key) is not None and getattr(cfg, key) < 1:
            raise ConfigError(f"{key} must be at least 1 (or None), got {getattr(cfg, key)}")
    if cfg.lr < 0 or cfg.min_lr < 0:
        raise ConfigError(f"lr and min_lr must not be negative, got {cfg.lr} and {cfg.min_lr}")
    for key in ("hflip", "vflip", "re_prob", "cutmix_prob"):
        if not 0.0 <= getattr(cfg, key) <= 1.0:
            raise ConfigError(f"{key} is a probability and must lie in [0, 1], got {getattr(cfg, key)}")
    if not 0.0 <= cfg.label_smoothing < 1.0:
        raise ConfigError(f"label_smoothing must lie in [0, 1), got {cfg.label_smoothing}")
    if not 0.0 < cfg.crop_pct <= 1.0:
        raise ConfigError(f"crop_pct must lie in (0, 1], got {cfg.crop_pct}")
    if not 0.0 < cfg.ema_decay < 1.0:
        raise ConfigError(f"ema_decay must lie in (0, 1), got {cfg.ema_decay}")
    if cfg.data_pipeline == "fast" and cfg.auto_augment:
        raise ConfigError(
            f"data_pipeline fast cannot apply auto_augment {cfg.auto_augment!r} (its policies are per-image float "
            "operations); set data_pipeline auto or classic"
        )
    if cfg.decode_on_device and (cfg.data_pipeline == "classic" or cfg.auto_augment):
        raise ConfigError(
            "decode_on_device True belongs to the fast data pipeline, which data_pipeline classic or an auto_augment "
            "policy turns off; set decode_on_device False, or data_pipeline auto without auto_augment"
        )
    if cfg.ckpt_save_policy == "top_k" and not cfg.val_while_train:
        raise ConfigError(
            "ckpt_save_policy top_k keeps the checkpoints with the best validation accuracy, so it needs "
            "val_while_train True (or use ckpt_save_policy latest_k)"
        )
    if cfg.keep_checkpoint_max < 1 and cfg.ckpt_save_policy != "none":
        raise ConfigError(f"keep_checkpoint_max must be at least 1, got {cfg.keep_checkpoint_max}")
    if cfg.loss_scale <= 0:
        raise ConfigError(f"loss_scale must be positive, got {cfg.loss_scale}")
    if cfg.warmup_epochs < 0 or cfg.decay_epochs < 0:
        raise ConfigError("warmup_epochs and decay_epochs must not be negative")
    if cfg.mixup < 0 or cfg.cutmix < 0:
        raise ConfigError("mixup and cutmix are Beta-distribution alphas and must not be negative")
    if cfg.scale[0] > cfg.scale[1] or cfg.ratio[0] > cfg.ratio[1]:
        raise ConfigError(f"scale and ratio must be (min, max) ranges, got {cfg.scale} and {cfg.ratio}")
    if cfg.precise_bn < 0:
        raise ConfigError(f"precise_bn must be 0 (off) or a number of training images, got {cfg.precise_bn}")
    if cfg.ckpt_save_steps < 0:
        raise ConfigError(f"ckpt_save_steps must be 0 (epoch ends only) or more, got {cfg.ckpt_save_steps}")
    if not 0.0 <= cfg.max_bad_fraction <= 1.0:
        raise ConfigError(f"max_bad_fraction must lie in [0, 1], got {cfg.max_bad_fraction}")
    _validate_data(cfg)
    _validate_schedule_and_optimizer(cfg)
    _validate_run(cfg)


def _validate_data(cfg: Config) -> None:
    """What the data pipeline and the model's input and output need."""
    if cfg.in_channels != 3:
        raise ConfigError(
            f"in_channels is {cfg.in_channels}, but train and validate always feed 3-channel RGB images (grey ones "
            "are repeated to 3 channels); set in_channels 3"
        )
    classes = DATASET_CLASSES.get(cfg.dataset)
    if classes is not None and cfg.num_classes != classes:
        raise ConfigError(
            f"dataset {cfg.dataset} has {classes} classes but num_classes is {cfg.num_classes}; "
            f"set num_classes {classes}"
        )
    if cfg.color_jitter is not None and cfg.color_jitter < 0:
        raise ConfigError(f"color_jitter must be 0 or more (0 or None: no jitter), got {cfg.color_jitter}")
    if min(cfg.std) <= 0:
        raise ConfigError(f"std divides every pixel and each of its 3 values must be positive, got {list(cfg.std)}")
    if cfg.scale[0] < 0 or cfg.scale[1] <= 0:
        raise ConfigError(
            f"scale is the (min, max) fraction of the image area a random crop keeps, so it must be at least 0 with "
            f"a positive max, got {list(cfg.scale)}; MindCV's default is [0.08, 1.0]"
        )
    if min(cfg.ratio) <= 0:
        raise ConfigError(
            f"ratio is the (min, max) aspect ratio of a random crop and must be positive, got {list(cfg.ratio)}; "
            "MindCV's default is [0.75, 1.333]"
        )
    if cfg.re_prob > 0 and not 0 <= cfg.re_scale[0] <= cfg.re_scale[1] <= 1:
        raise ConfigError(
            f"re_scale is the (min, max) fraction of the image that random erasing covers and must be a range "
            f"within [0, 1], got {list(cfg.re_scale)}; MindCV's default is [0.02, 0.33]"
        )
    if cfg.re_prob > 0 and not 0 < cfg.re_ratio[0] <= cfg.re_ratio[1]:
        raise ConfigError(
            f"re_ratio is the (min, max) aspect ratio of the erased patch and must be a range of positive numbers, "
            f"got {list(cfg.re_ratio)}; MindCV's default is [0.3, 3.3]"
        )
    if not 0 <= cfg.seed < 2**63:
        raise ConfigError(f"seed must be a whole number from 0 to 2**63 - 1, got {cfg.seed}")


_MOMENTUM_OPTIMIZERS = ("momentum", "sgd", "nesterov", "rmsprop")


def _validate_schedule_and_optimizer(cfg: Config) -> None:
    """The checks ``optim`` would make after the dataset is indexed and the model built, made up front."""
    for key in ("warmup_factor", "decay_rate", "cycle_decay"):
        if getattr(cfg, key) < 0:
            raise ConfigError(
                f"{key} multiplies the learning rate, so a negative one makes it negative; got {getattr(cfg, key)}"
            )
    if cfg.scheduler in ("cosine_decay", "warmup_cosine_decay", "step_decay") and cfg.decay_epochs < 1:
        raise ConfigError(
            f"scheduler {cfg.scheduler} needs decay_epochs of at least 1 (the epochs one decay lasts), got "
            f"{cfg.decay_epochs}; MindCV's recipes use epoch_size - warmup_epochs"
        )
    if cfg.num_cycles < 1:
        raise ConfigError(f"num_cycles must be at least 1, got {cfg.num_cycles}")
    if min(cfg.multi_step_decay_milestones, default=0) < 0:
        raise ConfigError(
            f"multi_step_decay_milestones are epochs after warmup and must not be negative, got "
            f"{list(cfg.multi_step_decay_milestones)}"
        )
    if cfg.weight_decay < 0:
        raise ConfigError(f"weight_decay must not be negative (0 turns it off), got {cfg.weight_decay}")
    if cfg.opt in _MOMENTUM_OPTIMIZERS and cfg.momentum < 0:
        raise ConfigError(f"momentum must not be negative (0 turns it off), got {cfg.momentum}")
    nesterov = cfg.opt == "nesterov" or (cfg.use_nesterov and cfg.opt in ("momentum", "sgd"))
    if nesterov and cfg.momentum <= 0:
        raise ConfigError(
            f"Nesterov momentum needs momentum > 0, got momentum {cfg.momentum}; set momentum (e.g. 0.9), or use "
            "opt sgd with use_nesterov False"
        )
    if cfg.opt == "adam" and cfg.use_nesterov:
        raise ConfigError("use_nesterov is not supported with opt adam; set use_nesterov False")
    if cfg.opt == "rmsprop" and cfg.eps <= 0:
        raise ConfigError(f"opt rmsprop divides by sqrt(mean square) + eps, so eps must be positive, got {cfg.eps}")
    if cfg.clip_grad and cfg.clip_value <= 0:
        raise ConfigError(
            f"clip_grad True scales the gradients down to a norm of clip_value, which must be positive, got "
            f"{cfg.clip_value}; set clip_value (MindCV's default is 15) or clip_grad False"
        )
    if cfg.amp_level != "O0" and cfg.amp_dtype == "float16" and cfg.device == "cpu":
        raise ConfigError(
            f"amp_level {cfg.amp_level} with amp_dtype float16 needs a GPU, but device is cpu: float16 autocast on a "
            "CPU is slow and unsupported for training here; use amp_dtype bfloat16 (or auto), or amp_level O0"
        )


def _file_in_the_way(folder: str) -> Path | None:
    """The existing file that stands where ``folder`` or one of its parents would have to be a folder."""
    path = Path(folder).expanduser()
    for candidate in (path, *path.parents):
        if candidate.exists():
            return None if candidate.is_dir() else candidate
    return None


def _validate_run(cfg: Config) -> None:
    """Resuming and the output folders: cheap file-system checks, so a typo costs seconds, not an indexed dataset."""
    if cfg.resume_opt and not cfg.ckpt_path and not cfg.auto_resume:
        raise ConfigError(
            "resume_opt True continues from the optimizer state saved beside the checkpoint named by ckpt_path, but "
            "ckpt_path is empty; set ckpt_path to a checkpoint written by train, set auto_resume True to continue "
            "from the latest one in ckpt_save_dir, or set resume_opt False"
        )
    if cfg.drop_classifier and (cfg.resume_opt or not cfg.ckpt_path):
        why = "resume_opt True continues a run, classifier included" if cfg.resume_opt else "ckpt_path is empty"
        raise ConfigError(
            f"drop_classifier True starts a fine-tuning from ckpt_path's weights with a new classifier, but {why}; "
            "set drop_classifier False, or name the weights to fine-tune with ckpt_path (and resume_opt False)"
        )
    if cfg.ckpt_path and not cfg.auto_resume:  # with auto_resume it is only the fallback when no checkpoint exists
        path = Path(cfg.ckpt_path)
        if not path.exists():
            raise ConfigError(
                f"ckpt_path {path} does not exist; check the path (a .safetensors, MindCV .ckpt or .pth file, or a "
                "train checkpoint), or leave ckpt_path empty"
            )
        if path.is_dir():
            raise ConfigError(f"ckpt_path {path} is a folder; set it to a weight file in it{_weight_files_in(path)}")
    for key in ("ckpt_save_dir", "output_dir"):
        value = getattr(cfg, key)
        blocker = _file_in_the_way(value) if value else None
        if blocker is not None:
            problem = "is a file" if blocker == Path(value).expanduser() else f"cannot be created: {blocker} is a file"
            raise ConfigError(f"{key} {value} {problem}, not a folder; choose another {key} or move that file")


def _weight_files_in(folder: Path) -> str:
    """The files a folder passed as ckpt_path was most likely meant for: a run's newest checkpoint and
    its best, else the first few weight files by name."""
    from .checkpoint import WEIGHTS_SUFFIX, list_checkpoints  # checkpoint.py imports torch and the model
    from .weights import EXTENSIONS

    newest = list_checkpoints(folder)[-1:]
    best = sorted(folder.glob(f"*_best{WEIGHTS_SUFFIX}"))[:1]
    if newest:
        return (
            f" (the newest checkpoint there is {newest[0].weights.name}{''.join(f', the best {p.name}' for p in best)})"
        )
    files = best + sorted(p for p in folder.iterdir() if p.suffix in EXTENSIONS)[:3]
    return f" ({', '.join(dict.fromkeys(p.name for p in files))})" if files else " (it holds no weight file)"


_NO_VALUE = re.compile(r"argument (?:\S+/)?(\S+): expected one argument")


def _argument_error(message: str) -> NoReturn:
    """argparse's own errors printed as the CLI prints a ConfigError: one ``error:`` line, exit status 2.

    argparse would print its usage block first: for ~100 flags that buries the one line that matters.
    """
    match = _NO_VALUE.fullmatch(message)
    if match:
        flag = match.group(1)
        message += f"; give {flag} a value (written {flag}=VALUE when the value starts with '-')"
    elif message.startswith("unrecognized arguments:"):
        flags = [word for word in message.split(":", 1)[1].split() if word.startswith("--")]
        if flags:  # the same words as the CLI's own report of unknown train/validate flags
            message = "; ".join(
                f"unknown option {flag!r}{suggest_key(flag.lstrip('-').split('=')[0])}" for flag in flags
            )
    else:
        message += "; see --help"
    sys.stderr.write(f"error: {message}\n")
    sys.exit(2)


def _shown(value: object) -> str:
    """A default as ``--help`` shows it: floats rounded off their binary noise (57.12, not 57.120000000000005)."""
    if isinstance(value, float):
        return repr(round(value, 10))
    if isinstance(value, tuple):
        return "(" + ", ".join(_shown(v) for v in value) + ")"
    return repr(value)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """``-c/--config`` plus one ``--key VALUE`` flag per config key (default: not given).

    Values stay text here and are converted by ``from_dict``, so a wrong one is a ConfigError like a wrong
    value in the YAML file; argparse's own complaints (a flag without a value) become one ``error:`` line.
    """
    parser.error = _argument_error  # type: ignore[method-assign]
    parser.add_argument(
        "-c", "--config", default="",
        help="YAML file with MindCV config keys, or the name of a shipped recipe (`shufflenetv2 recipes` lists them)",
    )  # fmt: skip
    for section, keys in HELP.items():
        group = parser.add_argument_group(f"{section} (config keys; a flag overrides the file)")
        for key, text in keys.items():
            choices = f"; one of {', '.join(map(str, CHOICES[key]))}" if key in CHOICES else ""
            help_text = f"{text}{choices} (default: {_shown(FIELDS[key].default)})"
            group.add_argument(f"--{key}", default=argparse.SUPPRESS, metavar="V", help=help_text)


def from_args(args: argparse.Namespace) -> Config:
    """Defaults, then the YAML file, then the flags that were given.

    A file's ``lr_global_batch`` says what its own ``lr`` was tuned for, so an ``--lr`` flag drops it unless
    ``--lr_global_batch`` comes too: otherwise the run's note would tell whoever had already scaled the
    recipe's lr for their batch to scale it once more."""
    given = {k: v for k, v in vars(args).items() if k in FIELDS}
    cfg = Config()
    if getattr(args, "config", ""):  # combinations are checked once, after the flags: they may fix the file's
        cfg = from_dict(load_yaml(args.config), where=str(args.config), check=False)
    if "lr" in given and "lr_global_batch" not in given:
        given["lr_global_batch"] = None
    return from_dict(given, base=cfg, where="the command line")


def parse_config(argv: Sequence[str] | None, prog: str, description: str = "") -> Config:
    parser = argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False)
    add_config_arguments(parser)
    return from_args(parser.parse_args(argv))


def _tupled(value: object) -> object:
    return tuple(value) if isinstance(value, list) else value


def _listed(value: object) -> object:
    """A tuple as YAML (and a config read back from it) holds it: a list."""
    return list(value) if isinstance(value, tuple) else value


def to_yaml(cfg: Config) -> str:
    data = {k: _listed(v) for k, v in dataclasses.asdict(cfg).items()}
    return yaml.safe_dump(data, sort_keys=False)


EVALUATION_KEYS = ("image_resize", "crop_pct", "interpolation", "mean", "std")  # the evaluation transform's


def evaluation_of(cfg: Config) -> dict[str, Any]:
    """The settings of ``cfg``'s evaluation transform, which our weight files record beside the class names:
    weights trained at 64 px lose much of their accuracy through MindCV's default 224 px crop, and nothing
    else in the file says which size they take.  Floats lose their binary noise (57.12, not the default
    std's 57.120000000000005), here and so in every comparison with a record."""
    return {key: _unnoised(getattr(cfg, key)) for key in EVALUATION_KEYS}


def _unnoised(value: object) -> object:
    """A setting as a record holds it: floats rounded, tuples and lists as lists."""
    if isinstance(value, float):
        return round(value, 10)
    return [_unnoised(v) for v in value] if isinstance(value, tuple | list) else value


def with_evaluation(cfg: Config, recorded: dict[str, Any], where: str) -> Config:
    """``cfg`` with the evaluation settings a weight file recorded (``where`` names it in errors)."""
    return from_dict({k: v for k, v in recorded.items() if k in EVALUATION_KEYS}, base=cfg, where=where)


def evaluation_differences(cfg: Config, recorded: dict[str, Any] | None) -> list[str]:
    """``key value (the weights': other)`` for each evaluation setting that the file recorded otherwise."""
    if not recorded:
        return []
    ours = evaluation_of(cfg)
    return [
        f"{key} {_shown(getattr(cfg, key))} (the weights': {_shown(_tupled(recorded[key]))})"
        for key in EVALUATION_KEYS
        if key in recorded and _unnoised(recorded[key]) != ours[key]
    ]


RESUME_KEYS = ("auto_resume", "ckpt_path", "resume_opt")  # they name the resume itself, so they always differ


def changes_since(saved: dict[str, Any] | None, cfg: Config) -> list[str]:
    """``key old -> new`` for every key whose value differs from ``saved`` (the config a checkpoint was written
    under), so that a resumed run says what it does differently: a changed batch size, lr or schedule length
    moves the learning rate at the resume step, which otherwise shows only as a jump in the loss.  Keys the
    saved config predates are left out."""
    if not saved:
        return []
    return [
        f"{key} {_shown(saved[key])} -> {_shown(value)}"
        for key, value in dataclasses.asdict(cfg).items()
        if key not in RESUME_KEYS and key in saved and _listed(saved[key]) != _listed(value)
    ]
