"""The training/validation configuration: MindCV's keys and meanings, validated strictly.

A YAML file (``-c/--config``) sets the values, command-line flags override them, and anything unknown
or of the wrong type is an error naming the key and the nearest valid one.  The config is plain data
(a dataclass); nothing here knows about models, data or devices.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from .errors import ShuffleNetV2Error


class ConfigError(ShuffleNetV2Error, ValueError):
    """A configuration value or combination that cannot work; the message says which and why."""


IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)  # MindCV normalises 0..255 pixels
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)

CHOICES: dict[str, tuple[Any, ...]] = {
    "mode": (0, 1),
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
}


@dataclasses.dataclass
class Config:
    """MindCV's ``config.py`` arguments that apply to ShuffleNetV2, with MindCV's defaults.

    Keys marked "ours" are additions; the others keep MindCV's names and semantics.
    """

    # system
    mode: int = 0  # 0: compiled (MindSpore graph mode -> torch.compile), 1: eager (pynative)
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
    keep_checkpoint_max: int = 10
    ckpt_save_dir: str = "./ckpt"
    ckpt_save_interval: int = 1
    ckpt_save_policy: str = "latest_k"
    auto_resume: bool = False
    resume_opt: bool = False
    epoch_size: int = 90
    dataset_sink_mode: bool = True  # MindSpore-only; accepted and ignored
    amp_level: str = "O0"
    amp_dtype: str = "auto"  # ours: auto = bfloat16 where supported, else float16
    ema: bool = False
    ema_decay: float = 0.9999
    channels_last: bool = False  # ours
    # loss
    loss: str = "CE"
    label_smoothing: float = 0.0
    # learning-rate schedule
    scheduler: str = "cosine_decay"
    lr: float = 0.001
    min_lr: float = 1e-6
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
    text = str(key).strip()
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
        setattr(cfg, key, _coerce(key, _TYPES[key], value))
    if check:
        validate(cfg)
    return cfg


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must be a mapping of keys to values, not a {type(data).__name__}")
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
    if cfg.num_samples is not None and cfg.num_samples < 1:
        raise ConfigError(f"num_samples must be at least 1 (or None for all), got {cfg.num_samples}")
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
    if not 0.0 <= cfg.max_bad_fraction <= 1.0:
        raise ConfigError(f"max_bad_fraction must lie in [0, 1], got {cfg.max_bad_fraction}")


def _flag_type(key: str):
    annotation = _TYPES[key]

    def parse(text: str) -> Any:
        try:
            return _coerce(key, annotation, text)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = key
    return parse


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """``-c/--config`` plus one ``--key VALUE`` flag per config key (default: not given)."""
    parser.add_argument("-c", "--config", default="", help="YAML file with MindCV config keys")
    groups = {}
    for key, field in FIELDS.items():
        group = groups.setdefault(field.metadata.get("group", "options"), parser)
        default = field.default if field.default is not dataclasses.MISSING else None
        group.add_argument(
            f"--{key}", type=_flag_type(key), default=argparse.SUPPRESS, metavar="V", help=f"(default: {default!r})"
        )


def from_args(args: argparse.Namespace) -> Config:
    """Defaults, then the YAML file, then the flags that were given."""
    given = {k: v for k, v in vars(args).items() if k in FIELDS}
    cfg = Config()
    if getattr(args, "config", ""):  # combinations are checked once, after the flags: they may fix the file's
        cfg = from_dict(load_yaml(args.config), where=str(args.config), check=False)
    return from_dict(given, base=cfg, where="the command line")


def parse_config(argv: Sequence[str] | None, prog: str, description: str = "") -> Config:
    parser = argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False)
    add_config_arguments(parser)
    return from_args(parser.parse_args(argv))


def to_yaml(cfg: Config) -> str:
    data = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}
    return yaml.safe_dump(data, sort_keys=False)
