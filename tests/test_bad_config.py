"""Bad configurations end as one ``error:`` paragraph and exit status 2, never a traceback.

Each case is run through the real command (``shufflenetv2.cli.main``, as ``train.py`` and ``validate.py`` call it)
with otherwise good settings on a tiny image folder, so the named mistake is the only thing wrong.  Mistakes the
config can judge on its own must be reported before the trainer starts: no run folder, no dataset indexed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from shufflenetv2 import create_model, save_weights
from shufflenetv2.checkpoint import checkpoint_ref, save_checkpoint
from shufflenetv2.cli import main
from shufflenetv2.config import MODELS, from_dict, load_yaml
from shufflenetv2.model import WIDTHS

from .conftest import REPO

# A run that would train if nothing were wrong: {tmp} is the test's folder, {data} a 3-class image folder in it.
BASE = ["--dataset", "imagefolder", "--data_dir", "{data}", "--num_classes", "3", "--image_resize", "16",
        "--batch_size", "2", "--epoch_size", "1", "--mode", "1", "--num_parallel_workers", "0",
        "--ckpt_save_dir", "{tmp}/out", "--device", "cpu"]  # fmt: skip
MISSING = object()  # a config file that does not exist

# (id, extra flags, YAML file text or bytes (None: no -c), words the message must contain)
CONFIG_ERRORS = [
    ("unknown_yaml_key", [], "learning_rate: 0.1\n", ["unknown key 'learning_rate'", "c.yaml", "did you mean 'lr'"]),
    ("unknown_flag", ["--learning_rate", "0.1"], None, ["'--learning_rate'", "did you mean 'lr'"]),
    ("yaml_section_instead_of_keys", [], "optimizer:\n  lr: 0.1\n", ["unknown key 'optimizer'", "'opt'"]),
    ("flag_text_for_int", ["--batch_size", "abc"], None, ["batch_size", "integer", "'abc'", "command line"]),
    ("yaml_text_for_int", [], "log_interval: ten\n", ["log_interval", "integer", "'ten'", "c.yaml"]),
    ("list_of_wrong_length", ["--scale", "0.1,0.5,1.0"], None, ["scale", "2 values", "got 3"]),
    ("bool_maybe", ["--val_while_train", "maybe"], None, ["val_while_train", "True or False", "'maybe'"]),
    ("nan", ["--lr", "nan"], None, ["lr", "finite"]),
    ("yaml_inf", [], "lr: .inf\n", ["lr", "finite", "c.yaml"]),
    ("batch_size_0", ["--batch_size", "0"], None, ["batch_size", "at least 1", "got 0"]),
    ("epoch_size_0", ["--epoch_size", "0"], None, ["epoch_size", "at least 1"]),
    ("lr_negative", ["--lr=-1"], None, ["lr", "negative", "-1.0"]),
    ("keep_checkpoint_max_0", ["--keep_checkpoint_max", "0"], None, ["keep_checkpoint_max", "at least 1"]),
    ("log_interval_0", ["--log_interval", "0"], None, ["log_interval", "at least 1"]),
    ("workers_negative", ["--num_parallel_workers=-1"], None, ["num_parallel_workers", "0 or more"]),
    ("gradient_accumulation_0", ["--gradient_accumulation_steps", "0"], None, ["gradient_accumulation_steps"]),
    ("top_k_without_validation", ["--ckpt_save_policy", "top_k", "--val_while_train", "False"], None,
     ["ckpt_save_policy top_k", "val_while_train True", "latest_k"]),
    ("float16_on_cpu", ["--amp_level", "O2", "--amp_dtype", "float16"], None,
     ["amp_level O2", "float16", "device is cpu", "bfloat16"]),
    ("resume_opt_without_ckpt_path", ["--resume_opt", "True"], None,
     ["resume_opt", "ckpt_path is empty", "auto_resume"]),
    ("drop_classifier_without_ckpt_path", ["--drop_classifier", "True"], None,
     ["drop_classifier True", "ckpt_path is empty", "set drop_classifier False"]),
    ("drop_classifier_with_resume_opt", ["--drop_classifier", "True", "--resume_opt", "True", "--ckpt_path", "{tmp}"],
     None, ["drop_classifier True", "resume_opt True continues a run", "resume_opt False"]),
    ("ckpt_path_missing", ["--ckpt_path", "{tmp}/missing.safetensors"], None, ["ckpt_path", "does not exist"]),
    ("ckpt_path_is_a_folder", ["--ckpt_path", "{tmp}"], None, ["ckpt_path", "is a folder", "holds no weight file"]),
    ("model_unknown", ["--model", "resnet50"], None, ["model", "'resnet50'", "shufflenet_v2_x0_5"]),
    ("in_channels_not_3", ["--in_channels", "1"], None, ["in_channels", "RGB", "set in_channels 3"]),
    ("builtin_dataset_classes", ["--dataset", "cifar100", "--num_classes", "10"], None,
     ["cifar100", "100 classes", "set num_classes 100"]),
    ("weight_decay_negative", ["--weight_decay=-1e-4"], None, ["weight_decay", "negative"]),
    ("clip_value_negative", ["--clip_grad", "True", "--clip_value=-1"], None, ["clip_value", "positive", "clip_grad"]),
    ("rmsprop_eps_0", ["--opt", "rmsprop", "--eps", "0"], None, ["rmsprop", "eps", "positive"]),
    ("nesterov_without_momentum", ["--opt", "nesterov", "--momentum", "0"], None, ["Nesterov", "momentum"]),
    ("std_zero", ["--std", "0,58,57"], None, ["std", "positive"]),
    ("color_jitter_negative", ["--color_jitter=-0.4"], None, ["color_jitter", "0 or more"]),
    ("ratio_zero", ["--ratio", "0,1.333"], None, ["ratio", "positive"]),
    ("decay_epochs_0", ["--decay_epochs", "0"], None, ["decay_epochs", "cosine_decay"]),
    ("seed_negative", ["--seed=-1"], None, ["seed", "2**63"]),
    ("ckpt_save_dir_is_a_file", ["--ckpt_save_dir", "{tmp}/afile"], None, ["ckpt_save_dir", "is a file"]),
    ("output_dir_below_a_file", ["--output_dir", "{tmp}/afile/run"], None, ["output_dir", "afile is a file"]),
    ("flag_without_value", ["--lr"], None, ["--lr", "expected one argument", "give --lr a value"]),
    ("negative_value_after_a_space", ["--ratio", "-1,1"], None, ["--ratio", "--ratio=VALUE"]),
    ("ambiguous_abbreviation", ["--warmup", "3"], None, ["--warmup", "warmup_epochs", "warmup_factor"]),
    ("yaml_list", [], "- lr: 0.1\n- batch_size: 8\n", ["c.yaml", "mapping", "not a list", "key: value"]),
    ("yaml_scalar", [], "just words\n", ["c.yaml", "mapping", "not a str"]),
    ("yaml_syntax_error", [], "lr: [0.1\nbatch_size: : 8\n", ["c.yaml", "not valid YAML", "line 2, column 11"]),
    ("yaml_tab_indent", [], "lr: 0.1\n\tbatch_size: 8\n", ["c.yaml", "not valid YAML", "'\\t'", "line 2"]),
    ("yaml_duplicate_key", [], "lr: 0.1\nopt: sgd\nlr: 0.2\n", ["c.yaml", "'lr' twice", "lines 1 and 3"]),
    ("yaml_not_utf8", [], b"lr: 0.1\nopt: \xff\xfe\n", ["c.yaml", "not UTF-8", "0xff"]),
    ("yaml_python_tag", [], "lr: !!python/object/apply:os.getcwd []\n", ["c.yaml", "not valid YAML", "python"]),
    ("config_file_missing", [], MISSING,
     ["config file", "nope.yaml", "does not exist", "-c/--config", "shipped recipe: shufflenet_v2_0.5_ascend, "]),
    ("config_clone_path_without_a_clone", ["-c", "{tmp}/configs/shufflenetv2/shufflenet_v2_0.5_ascend.yaml"], None,
     ["shufflenet_v2_0.5_ascend.yaml does not exist",
      "the shipped recipe of that name is `-c shufflenet_v2_0.5_ascend`"]),
    ("config_is_a_folder", ["-c", "{tmp}"], None, ["cannot read config file", "-c/--config"]),
]  # fmt: skip

# Mistakes only the data (or the device) can reveal: reported by the trainer, still as one line.
RUN_ERRORS = [
    ("imagenet_without_data_dir", ["--dataset", "imagenet", "--data_dir", ""], ["data_dir", "not set"]),
    ("data_dir_missing", ["--data_dir", "{tmp}/nope"], ["data_dir", "nope", "does not exist"]),
    ("data_dir_is_a_file", ["--data_dir", "{tmp}/afile"], ["data_dir", "afile", "file"]),
    ("val_split_missing", ["--data_dir", "{tmp}/train_only", "--val_while_train", "True"], ["'val'", "val_split"]),
    ("num_classes_not_the_folders", ["--num_classes", "5"], ["num_classes", "3 classes"]),
    ("fewer_images_than_a_batch", ["--batch_size", "64"], ["batch_size"]),
]

VALIDATE_ERRORS = [
    ("validate_without_ckpt_path", [], ["--ckpt_path", "never evaluates random weights"]),
    ("validate_ckpt_path_missing", ["--ckpt_path", "{tmp}/missing.ckpt"],
     ["ckpt_path", "missing.ckpt", "does not exist"]),
]  # fmt: skip


def _image_folder(root: Path, splits: tuple[str, ...]) -> Path:
    for split in splits:
        for c, name in enumerate(("red", "green", "blue")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (20, 20), (80 * c, 60 * i, 40)).save(folder / f"{i}.png")
    return root


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    _image_folder(tmp_path / "data", ("train", "val"))
    _image_folder(tmp_path / "train_only", ("train",))
    (tmp_path / "afile").write_text("not a folder\n")
    return tmp_path


def _argv(tmp: Path, command: str, extra: list[str], text: str | bytes | object | None = None) -> list[str]:
    config = []
    if text is MISSING:
        config = ["-c", str(tmp / "nope.yaml")]
    elif text is not None:
        path = tmp / "c.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        config = ["-c", str(path)]
    words = [command, *config, *BASE, *extra]
    return [w.replace("{tmp}", str(tmp)).replace("{data}", str(tmp / "data")) for w in words]


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """main's exit status (argparse's own errors exit through SystemExit, as a real process would) and stderr."""
    try:
        status = main(argv)
    except SystemExit as exc:
        status = exc.code
    return status, capsys.readouterr().err


def _assert_one_error_paragraph(status: int, err: str, words: list[str]) -> None:
    assert status == 2, err
    assert "Traceback" not in err
    assert err.startswith("error: ") and err.endswith("\n") and err.count("\n") == 1, err  # one line, nothing else
    assert "usage:" not in err
    for word in words:
        assert word in err, (word, err)


@pytest.mark.parametrize(("extra", "text", "words"), [c[1:] for c in CONFIG_ERRORS], ids=[c[0] for c in CONFIG_ERRORS])
def test_config_mistakes_are_one_line_before_any_work(
    tmp: Path, capsys: pytest.CaptureFixture[str], extra: list[str], text: object, words: list[str]
) -> None:
    status, err = _run(_argv(tmp, "train", extra, text), capsys)
    _assert_one_error_paragraph(status, err, words)
    assert not (tmp / "out").exists(), "the trainer started: this mistake should have been caught by config.validate"


@pytest.mark.parametrize(("extra", "words"), [c[1:] for c in RUN_ERRORS], ids=[c[0] for c in RUN_ERRORS])
def test_data_mistakes_are_one_line(
    tmp: Path, capsys: pytest.CaptureFixture[str], extra: list[str], words: list[str]
) -> None:
    status, err = _run(_argv(tmp, "train", extra), capsys)
    _assert_one_error_paragraph(status, err, words)


@pytest.mark.parametrize(("extra", "words"), [c[1:] for c in VALIDATE_ERRORS], ids=[c[0] for c in VALIDATE_ERRORS])
def test_validate_mistakes_are_one_line(
    tmp: Path, capsys: pytest.CaptureFixture[str], extra: list[str], words: list[str]
) -> None:
    status, err = _run(_argv(tmp, "validate", extra), capsys)
    _assert_one_error_paragraph(status, err, words)


def test_a_run_folder_as_ckpt_path_names_its_newest_and_best_weights(
    tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp / "run"
    model = create_model("shufflenet_v2_x0_5", num_classes=3)
    for epoch in (1, 2, 10):  # newest by epoch, not by name
        save_checkpoint(checkpoint_ref(run, "shufflenet_v2_x0_5", epoch, 6 * epoch), model, {"epoch": epoch})
    save_weights(run / "shufflenet_v2_x0_5_best.safetensors", model)
    status, err = _run(_argv(tmp, "validate", ["--ckpt_path", str(run)]), capsys)
    newest = "the newest checkpoint there is shufflenet_v2_x0_5-10_60.safetensors"
    _assert_one_error_paragraph(status, err, ["is a folder", newest, "the best shufflenet_v2_x0_5_best.safetensors"])


def test_the_good_run_the_cases_start_from_is_valid(tmp: Path) -> None:
    """Without the mistake the base command parses and validates, so each case fails for its own reason only."""
    from shufflenetv2.cli import build_parser
    from shufflenetv2.config import from_args

    args, unknown = build_parser().parse_known_args(_argv(tmp, "train", []))
    assert unknown == []
    cfg = from_args(args)
    assert cfg.data_dir == str(tmp / "data") and cfg.num_classes == 3 and cfg.device == "cpu"


# --- what MindCV allows stays allowed ---------------------------------------------------------------------------

ALLOWED = [
    {"warmup_epochs": 10, "epoch_size": 5},  # the warmup is cut at the run's end
    {"mixup": 0.2, "mixup_off_epoch": 50, "epoch_size": 5},  # mixup simply never switches off
    {"min_lr": 0.5, "lr": 0.1},  # a schedule that rises: odd, but MindCV computes it
    {"val_while_train": True, "val_interval": 10, "epoch_size": 3},  # the last epoch is always validated
    {"gradient_accumulation_steps": 1000},  # more than the batches in an epoch: one step per epoch
    {"distribute": True},  # outside torchrun it trains alone, with a note
    {"auto_resume": True, "ckpt_path": "not/there/yet.safetensors"},  # ckpt_path is only the fallback
    {"auto_resume": True, "resume_opt": True},  # auto_resume restores the optimizer by itself
    {"amp_level": "O2", "amp_dtype": "float16", "device": "auto"},  # judged by the trainer on the real device
    {"amp_level": "O0", "amp_dtype": "float16", "device": "cpu"},  # O0 is float32: amp_dtype is unused
    {"opt": "adam", "eps": 0.0},  # eps is RMSProp's only
    {"opt": "adam", "momentum": -1.0},  # momentum is not Adam's
    {"clip_grad": False, "clip_value": -1.0},  # unused
    {"re_prob": 0.0, "re_scale": [0.5, 0.1]},  # random erasing is off
    {"dataset": "imagefolder", "num_classes": 7},  # a folder's class count is only known from the folder
    {"seed": 2**40},
    {"ckpt_save_policy": "none", "keep_checkpoint_max": 0},
]


@pytest.mark.parametrize("values", ALLOWED, ids=lambda v: ",".join(v))
def test_legal_mindcv_settings_stay_allowed(values: dict) -> None:
    cfg = from_dict(values)
    for key, value in values.items():
        got = getattr(cfg, key)
        assert (list(got) if isinstance(got, tuple) else got) == value


def test_yaml_merge_keys_may_be_overridden(tmp_path: Path) -> None:
    """Only a key written twice is a duplicate; one that overrides a merged mapping (<<) is YAML's own override."""
    path = tmp_path / "m.yaml"
    path.write_text("<<: {lr: 0.1, opt: sgd}\nlr: 0.2\n")
    assert load_yaml(path) == {"lr": 0.2, "opt": "sgd"}


def test_model_names_match_the_networks() -> None:
    assert tuple(WIDTHS) == MODELS


# --- the real processes -----------------------------------------------------------------------------------------


def _script(tmp_path: Path, script: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(REPO / script), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )


def _assert_process_error(result: subprocess.CompletedProcess[str], words: list[str]) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    for word in words:
        assert word in result.stderr, (word, result.stderr)


def test_train_py_duplicate_yaml_key(tmp_path: Path) -> None:
    config = tmp_path / "dup.yaml"
    config.write_text((REPO / "configs/shufflenetv2/shufflenet_v2_0.5_digits_demo.yaml").read_text() + "lr: 0.5\n")
    result = _script(tmp_path, "train.py", "--config", str(config))
    _assert_process_error(result, ["dup.yaml", "'lr' twice"])
    assert not (tmp_path / "runs").exists()


def test_train_py_flag_without_value(tmp_path: Path) -> None:
    recipe = REPO / "configs/shufflenetv2/shufflenet_v2_0.5_digits_demo.yaml"
    result = _script(tmp_path, "train.py", "--config", str(recipe), "--epoch_size")
    _assert_process_error(result, ["--epoch_size", "expected one argument"])


def test_validate_py_missing_checkpoint(tmp_path: Path) -> None:
    recipe = REPO / "configs/shufflenetv2/shufflenet_v2_0.5_digits_demo.yaml"
    result = _script(tmp_path, "validate.py", "-c", str(recipe), "--ckpt_path", str(tmp_path / "gone.ckpt"))
    _assert_process_error(result, ["ckpt_path", "gone.ckpt", "does not exist"])


def test_validate_names_the_class_count_of_the_checkpoint(tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A checkpoint with another class count: the one remedy is --num_classes (a new classifier, which the
    weights loader also offers for fine-tuning, would score chance), and a lone process's note about
    distribute names validate.py."""
    from shufflenetv2 import create_model, save_weights

    path = save_weights(tmp / "ten.safetensors", create_model("shufflenet_v2_x0_5", num_classes=10))
    status, err = _run(_argv(tmp, "validate", ["--ckpt_path", str(path), "--distribute", "True"]), capsys)
    note, error = err.split("\n", 1)
    assert note.startswith("note: distribute is True") and "validates alone" in note and "N validate.py" in note
    _assert_one_error_paragraph(status, error, ["ten.safetensors", "for 10 classes", "num_classes is 3"])
    assert "--num_classes 10" in error and "drop_classifier" not in error
