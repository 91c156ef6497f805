"""The config: MindCV's recipes load as published, flags override files, and every mistake is named."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from shufflenetv2.config import (
    ALIASES,
    FIELDS,
    HELP,
    Config,
    ConfigError,
    changes_since,
    from_dict,
    load_yaml,
    parse_config,
    to_yaml,
)
from shufflenetv2.optim import lr_batch_note

from .conftest import REPO

RECIPES = REPO / "configs" / "shufflenetv2"
ALL_YAML = sorted(RECIPES.glob("*.yaml"))

# NOTES.md section 4: the per-width table ...
ASCEND = {
    "0.5": {"epoch_size": 250, "lr": 0.35, "warmup_epochs": 4, "decay_epochs": 246, "re_prob": 0.0},
    "1.0": {"epoch_size": 300, "lr": 0.4, "warmup_epochs": 5, "decay_epochs": 295, "re_prob": 0.5},
    "1.5": {"epoch_size": 300, "lr": 0.5, "warmup_epochs": 5, "decay_epochs": 295, "re_prob": 0.5},
    "2.0": {"epoch_size": 300, "lr": 0.5, "warmup_epochs": 5, "decay_epochs": 295, "re_prob": 0.25},
}
# ... and the values all four share.
COMMON = {
    "mode": 0,
    "distribute": True,
    "num_parallel_workers": 8,
    "val_while_train": True,
    "dataset": "imagenet",
    "shuffle": True,
    "batch_size": 64,
    "drop_remainder": True,
    "image_resize": 224,
    "hflip": 0.5,
    "color_jitter": 0.4,
    "interpolation": "bilinear",
    "crop_pct": 0.875,
    "num_classes": 1000,
    "keep_checkpoint_max": 30,
    "ckpt_save_dir": "./ckpt",
    "dataset_sink_mode": True,
    "amp_level": "O3",
    "loss": "CE",
    "label_smoothing": 0.1,
    "scheduler": "cosine_decay",
    "min_lr": 0.0,
    "opt": "momentum",
    "weight_decay_filter": "auto",
    "momentum": 0.9,
    "weight_decay": 0.00004,
    "loss_scale": 1024,
    "use_nesterov": False,
}
MODEL_OF_WIDTH = {"0.5": "shufflenet_v2_x0_5", "1.0": "shufflenet_v2_x1_0", "1.5": "shufflenet_v2_x1_5",
                  "2.0": "shufflenet_v2_x2_0"}  # fmt: skip


def _parse(*argv: str) -> Config:
    return parse_config(list(argv), prog="test")


def _write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- the recipes ----------------------------------------------------------------------------------


def test_recipes_are_all_found() -> None:
    names = {p.name for p in ALL_YAML}
    assert {f"shufflenet_v2_{w}_ascend.yaml" for w in ASCEND} <= names


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: p.name)
def test_every_recipe_loads_and_validates(path: Path) -> None:
    raw = load_yaml(path)
    cfg = from_dict(raw, where=str(path))
    for key, value in raw.items():  # every key in the file lands in the config with its value
        got = getattr(cfg, key)
        assert (list(got) if isinstance(got, tuple) else got) == value, key
    assert _parse("-c", str(path)) == cfg


@pytest.mark.parametrize("width", list(ASCEND))
def test_ascend_recipes_carry_mindcv_values(width: str) -> None:
    cfg = from_dict(load_yaml(RECIPES / f"shufflenet_v2_{width}_ascend.yaml"))
    expected = {**COMMON, **ASCEND[width], "model": MODEL_OF_WIDTH[width]}
    got = {key: getattr(cfg, key) for key in expected}
    assert got == expected
    for key in expected:  # and with the field's type (loss_scale 1024 -> 1024.0), as MindCV's argparse gives
        assert type(getattr(cfg, key)) is type(FIELDS[key].default), key
    assert cfg.scale == (0.08, 1.0) and cfg.ratio == (0.75, 1.333)  # MindCV's defaults, not set by the recipe
    # lr is per device batch 64 (8 devices) and is not rescaled
    assert cfg.lr == ASCEND[width]["lr"] and cfg.batch_size == 64
    assert cfg.lr_global_batch == 8 * 64  # ours: what the log compares a run's images per step with


def test_ascend_recipes_schedule_adds_up() -> None:
    for width, values in ASCEND.items():
        assert values["warmup_epochs"] + values["decay_epochs"] == values["epoch_size"], width


# --- the command line -----------------------------------------------------------------------------


def test_flags_override_yaml() -> None:
    recipe = str(RECIPES / "shufflenet_v2_1.0_ascend.yaml")
    cfg = _parse("-c", recipe, "--lr", "0.5", "--distribute", "False")
    assert cfg.lr == 0.5 and cfg.distribute is False
    assert cfg.epoch_size == 300 and cfg.re_prob == 0.5  # the rest still comes from the file
    assert _parse("--config", recipe, "--batch_size", "32").batch_size == 32


def test_an_lr_flag_drops_the_files_lr_global_batch() -> None:
    """The recipe's lr_global_batch describes the recipe's lr. A run given --lr 0.021875 (0.35 scaled to 32
    images per step) was told, before, to scale that once more, to --lr 0.001367."""
    recipe = str(RECIPES / "shufflenet_v2_0.5_ascend.yaml")
    kept = _parse("-c", recipe, "--batch_size", "32", "--distribute", "False")
    assert kept.lr_global_batch == 512 and "--lr 0.021875" in (lr_batch_note(kept, 1, 100) or "")
    own = _parse("-c", recipe, "--batch_size", "32", "--lr", "0.021875")
    assert own.lr_global_batch is None and lr_batch_note(own, 1, 100) is None
    both = _parse("-c", recipe, "--lr", "0.1", "--lr_global_batch", "128")
    assert both.lr_global_batch == 128 and "--lr 0.05 " in (lr_batch_note(both, 1, 100) or "") + " "


def test_help_explains_every_key_in_its_section(capsys: pytest.CaptureFixture[str]) -> None:
    assert [key for keys in HELP.values() for key in keys] == list(FIELDS)  # every key, once, in Config's order
    with pytest.raises(SystemExit):
        _parse("--help")
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "learning-rate schedule (config keys; a flag overrides the file):" in text
    assert "--amp_level V O0 = float32; O1-O3 = autocast in bfloat16" in text and "one of O0, O1, O2, O3" in text
    assert "(default: (58.395, 57.12, 57.375))" in text  # floats without their binary noise


def test_no_config_gives_mindcv_defaults() -> None:
    assert _parse() == Config()
    assert _parse("--epoch_size", "3").epoch_size == 3


def test_flags_may_fix_a_combination_the_file_gets_wrong(tmp_path: Path) -> None:
    """The combination is checked after the flags, not on the file alone."""
    path = _write(tmp_path, "ckpt_save_policy: top_k\nval_while_train: False\n")
    with pytest.raises(ConfigError, match="val_while_train"):
        _parse("-c", str(path))
    cfg = _parse("-c", str(path), "--val_while_train", "True")
    assert cfg.ckpt_save_policy == "top_k" and cfg.val_while_train


def test_unknown_flag_exits_with_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        _parse("--learning_rate", "0.1")
    assert exc.value.code == 2
    assert "--learning_rate" in capsys.readouterr().err


def test_abbreviated_flags_are_not_guessed() -> None:
    with pytest.raises(SystemExit) as exc:
        _parse("--epoch", "3")  # allow_abbrev=False: not silently --epoch_size
    assert exc.value.code == 2


@pytest.mark.parametrize(
    "argv, key",
    [(["--batch_size", "abc"], "batch_size"), (["--lr", "fast"], "lr"), (["--distribute", "maybe"], "distribute"),
     (["--scale", "[0.08,"], "scale"), (["--scale", "1"], "scale")],
)  # fmt: skip
def test_bad_flag_value_is_a_config_error_naming_the_key(argv: list[str], key: str) -> None:
    """Flag values are converted like the file's, so the CLI reports them as one line (no usage block)."""
    with pytest.raises(ConfigError) as exc:
        _parse(*argv)
    message = str(exc.value)
    assert message.startswith(key) and message.endswith("(from the command line)")
    assert "\n" not in message


def test_flag_values_are_coerced() -> None:
    cfg = _parse("--scale", "0.5,1.0", "--color_jitter", "None", "--num_samples", "7", "--val_while_train", "1")
    assert cfg.scale == (0.5, 1.0) and cfg.color_jitter is None and cfg.num_samples == 7 and cfg.val_while_train


# --- types ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [("True", True), ("False", False), ("true", True), ("false", False), ("1", True), ("0", False),
     (True, True), (False, False), (1, True), (0, False)],
)  # fmt: skip
def test_booleans(text: object, expected: bool) -> None:
    assert from_dict({"val_while_train": text}).val_while_train is expected
    assert _parse("--val_while_train", str(text)).val_while_train is expected


@pytest.mark.parametrize("value", ["maybe", 2, 0.5, "", [True]])
def test_bad_boolean_names_the_key(value: object) -> None:
    with pytest.raises(ConfigError, match="val_while_train"):
        from_dict({"val_while_train": value})


def test_yaml_booleans(tmp_path: Path) -> None:
    path = _write(tmp_path, "distribute: true\nshuffle: False\npretrained: 'True'\n")
    cfg = from_dict(load_yaml(path))
    assert cfg.distribute is True and cfg.shuffle is False and cfg.pretrained is True


@pytest.mark.parametrize(
    "key, value",
    [("batch_size", "abc"), ("batch_size", 2.5), ("batch_size", True), ("epoch_size", "3.5"), ("lr", "fast"),
     ("lr", True), ("lr", [0.1]), ("lr", "nan"), ("lr", float("inf")), ("momentum", None), ("scale", "1"),
     ("scale", 0.5), ("scale", [0.1, 0.5, 1.0]), ("scale", ["a", "b"]), ("scale", "[0.08,"), ("mean", [1, 2]),
     ("model", ["shufflenet_v2_x0_5"]), ("multi_step_decay_milestones", "30,sixty")],
)  # fmt: skip
def test_wrong_types_name_the_key(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=key):
        from_dict({key: value})


def test_numbers() -> None:
    cfg = from_dict({"batch_size": "16", "epoch_size": 5.0, "lr": "0.35", "loss_scale": 1024, "weight_decay": "4e-5"})
    assert (cfg.batch_size, cfg.epoch_size, cfg.lr, cfg.loss_scale, cfg.weight_decay) == (16, 5, 0.35, 1024.0, 4e-5)
    assert type(cfg.epoch_size) is int and type(cfg.loss_scale) is float


@pytest.mark.parametrize("text", ["0.08,1.0", "[0.08, 1.0]", " 0.08 , 1.0 ", [0.08, 1], (0.08, 1.0)])
def test_tuples(text: object) -> None:
    cfg = from_dict({"scale": text})
    assert cfg.scale == (0.08, 1.0) and all(type(v) is float for v in cfg.scale)


def test_variable_length_tuple() -> None:
    assert from_dict({"multi_step_decay_milestones": "10,20"}).multi_step_decay_milestones == (10, 20)
    assert from_dict({"multi_step_decay_milestones": [5]}).multi_step_decay_milestones == (5,)
    assert _parse("--multi_step_decay_milestones", "[1, 2, 3]").multi_step_decay_milestones == (1, 2, 3)


@pytest.mark.parametrize("value", [None, "None", "none", "null"])
def test_optional_fields_accept_none(value: object) -> None:
    cfg = from_dict({"color_jitter": value, "num_samples": value, "auto_augment": value})
    assert cfg.color_jitter is None and cfg.num_samples is None and cfg.auto_augment is None
    assert from_dict({"color_jitter": "0.3", "num_samples": "10"}).num_samples == 10


def test_none_is_not_accepted_where_a_value_is_needed() -> None:
    with pytest.raises(ConfigError, match="batch_size"):
        from_dict({"batch_size": "None"})


# --- unknown keys ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key, nearest",
    [
        ("learning_rate", "'lr'"),
        ("epochs", "'epoch_size'"),
        ("num_epochs", "'epoch_size'"),
        ("optimizer", "'opt'"),
        ("workers", "'num_parallel_workers'"),
        ("num_workers", "'num_parallel_workers'"),
        ("img_size", "'image_resize'"),
        ("image_size", "'image_resize'"),
        ("checkpoint_path", "'ckpt_path'"),
        ("resume", "'ckpt_path' or 'auto_resume'"),
        ("lr_scheduler", "'scheduler'"),
        ("nesterov", "'use_nesterov'"),
        ("amp", "'amp_level'"),
        ("smoothing", "'label_smoothing'"),
        ("ema_rate", "'ema_decay'"),
        ("data_path", "'data_dir'"),
        ("output", "'output_dir'"),
        ("Learning_Rate", "'lr'"),  # aliases ignore case and dashes
        ("batch-size", "'batch_size'"),
        ("label_smothing", "'label_smoothing'"),  # typos: difflib
        ("weight_decay_filtr", "'weight_decay_filter'"),
        ("keep_checkpoints_max", "'keep_checkpoint_max'"),
    ],
)
def test_unknown_yaml_key_names_the_nearest(tmp_path: Path, key: str, nearest: str) -> None:
    path = _write(tmp_path, f"{key}: 1\n")
    with pytest.raises(ConfigError) as exc:
        _parse("-c", str(path))
    message = str(exc.value)
    assert f"unknown key {key!r}" in message and str(path) in message
    assert message.endswith(f"did you mean {nearest}?")
    assert "\n" not in message


def test_unknown_key_without_a_near_one() -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'qqqqqq'.*--help"):
        from_dict({"qqqqqq": 1})
    with pytest.raises(ConfigError, match="unknown key 3"):
        from_dict({3: 1})


def test_aliases_point_at_real_keys() -> None:
    for alias, names in ALIASES.items():
        assert alias not in FIELDS, alias
        assert alias == alias.lower() and "-" not in alias, alias
        assert names and set(names) <= set(FIELDS), alias


# --- impossible values and combinations ----------------------------------------------------------


@pytest.mark.parametrize(
    "values, words",
    [
        ({"ckpt_save_policy": "top_k"}, ["top_k", "val_while_train"]),
        ({"batch_size": 0}, ["batch_size", "at least 1"]),
        ({"epoch_size": 0}, ["epoch_size", "at least 1"]),
        ({"hflip": 1.5}, ["hflip", "[0, 1]"]),
        ({"re_prob": -0.1}, ["re_prob"]),
        ({"label_smoothing": 1.0}, ["label_smoothing", "[0, 1)"]),
        ({"crop_pct": 0}, ["crop_pct", "(0, 1]"]),
        ({"crop_pct": 1.2}, ["crop_pct"]),
        ({"ema_decay": 1.0}, ["ema_decay"]),
        ({"precise_bn": -256}, ["precise_bn", "0 (off) or a number of training images", "-256"]),
        ({"lr": -0.1}, ["lr"]),
        ({"keep_checkpoint_max": 0}, ["keep_checkpoint_max"]),
        ({"loss_scale": 0}, ["loss_scale"]),
        ({"num_parallel_workers": -1}, ["num_parallel_workers"]),
        ({"num_samples": 0}, ["num_samples"]),
        ({"scale": [1.0, 0.08]}, ["scale"]),
        ({"opt": "lion"}, ["opt", "'lion'", "momentum", "sgd", "adamw"]),
        ({"scheduler": "poly"}, ["scheduler", "'poly'", "cosine_decay", "step_decay"]),
        ({"amp_level": "O4"}, ["amp_level", "'O4'", "O0", "O3"]),
        ({"dataset": "coco"}, ["dataset", "'coco'", "imagenet", "imagefolder", "cifar10"]),
        ({"mode": 2}, ["mode", "0", "1"]),
        ({"ckpt_save_policy": "best"}, ["ckpt_save_policy", "latest_k", "top_k"]),
    ],
)
def test_impossible_settings_are_explained(values: dict, words: list[str]) -> None:
    with pytest.raises(ConfigError) as exc:
        from_dict(values)
    message = str(exc.value)
    for word in words:
        assert word in message, (word, message)
    assert "\n" not in message


def test_limits_themselves_are_allowed() -> None:
    cfg = from_dict(
        {"hflip": 1.0, "label_smoothing": 0.0, "crop_pct": 1.0, "batch_size": 1, "epoch_size": 1, "precise_bn": 0}
    )
    assert cfg.hflip == 1.0 and cfg.crop_pct == 1.0
    assert from_dict({"ckpt_save_policy": "top_k", "val_while_train": True}).ckpt_save_policy == "top_k"
    assert from_dict({"ckpt_save_policy": "none", "keep_checkpoint_max": 0}).keep_checkpoint_max == 0


def test_a_failed_update_leaves_the_base_alone() -> None:
    base = from_dict({"lr": 0.2})
    with pytest.raises(ConfigError):
        from_dict({"lr": "fast"}, base=base)
    assert base.lr == 0.2
    assert from_dict({"batch_size": 8}, base=base).lr == 0.2 and base.batch_size == Config().batch_size


# --- files ----------------------------------------------------------------------------------------


def test_yaml_that_is_a_list(tmp_path: Path) -> None:
    path = _write(tmp_path, "- lr: 0.1\n- batch_size: 8\n")
    with pytest.raises(ConfigError, match="mapping"):
        _parse("-c", str(path))


def test_yaml_that_is_a_scalar(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="mapping"):
        load_yaml(_write(tmp_path, "just words\n"))


def test_invalid_yaml(tmp_path: Path) -> None:
    path = _write(tmp_path, "lr: [0.1\nbatch_size: : 8\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        _parse("-c", str(path))


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=r"nope\.yaml"):
        _parse("-c", str(missing))


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_yaml(tmp_path)


def test_empty_yaml_gives_defaults(tmp_path: Path) -> None:
    path = _write(tmp_path, "# nothing but a comment\n")
    assert load_yaml(path) == {}
    assert _parse("-c", str(path)) == Config()


# --- round trip -----------------------------------------------------------------------------------


def test_defaults_are_valid_and_round_trip() -> None:
    cfg = Config()
    assert from_dict({}) == cfg
    assert from_dict(yaml.safe_load(to_yaml(cfg))) == cfg


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: p.name)
def test_to_yaml_round_trips(path: Path) -> None:
    cfg = from_dict(load_yaml(path))
    again = from_dict(yaml.safe_load(to_yaml(cfg)))
    assert again == cfg
    assert to_yaml(again) == to_yaml(cfg)


def test_to_yaml_round_trips_unusual_values() -> None:
    cfg = from_dict(
        {"color_jitter": None, "num_samples": 5, "auto_augment": "randaug-m9-mstd0.5", "val_split": "True",
         "data_dir": "/data/with: colon", "multi_step_decay_milestones": [3], "mean": [1, 2, 3], "lr": 1e-7}
    )  # fmt: skip
    text = to_yaml(cfg)
    assert from_dict(yaml.safe_load(text)) == cfg
    assert set(yaml.safe_load(text)) == set(FIELDS)  # every key written, none invented
    assert dataclasses.asdict(cfg)["val_split"] == "True"  # a string that looks like a bool stays a string


def test_changes_since_lists_what_differs_from_a_saved_config() -> None:
    saved = dataclasses.asdict(Config())
    saved["scale"] = list(saved["scale"])  # a saved config may hold lists where Config has tuples (as YAML does)
    saved["retired_key"] = 1  # a key this version no longer has
    longer = Config().epoch_size + 10
    now = dataclasses.replace(Config(), lr=0.2, epoch_size=longer, auto_resume=True, ckpt_path="x")
    expected = [f"epoch_size {Config().epoch_size} -> {longer}", f"lr {Config().lr} -> 0.2"]
    assert changes_since(saved, now) == expected
    rescaled = changes_since(saved, dataclasses.replace(now, scale=(0.2, 1.0)))
    assert rescaled == ["scale [0.08, 1.0] -> (0.2, 1.0)", *expected]  # in Config's order
    assert changes_since({k: v for k, v in saved.items() if k != "lr"}, now) == expected[:1]
    assert changes_since(None, now) == changes_since({}, now) == []
