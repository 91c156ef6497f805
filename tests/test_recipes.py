"""The shipped recipes: ``-c NAME`` in a clone and in a wheel installed elsewhere, and ``shufflenetv2 recipes``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from shufflenetv2 import recipes
from shufflenetv2.cli import main
from shufflenetv2.config import ConfigError, load_yaml

from .conftest import REPO

CONFIGS = REPO / "configs" / "shufflenetv2"


def test_every_config_of_the_clone_is_a_shipped_recipe() -> None:
    assert recipes.shipped() == {p.stem: p for p in sorted(CONFIGS.glob("*.yaml"))}
    assert "shufflenet_v2_0.5_ascend" in recipes.shipped()


def test_c_takes_a_recipe_by_name_and_a_file_of_that_name_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no configs/ folder here: a user's own project folder
    recipe = load_yaml(CONFIGS / "shufflenet_v2_1.0_ascend.yaml")
    assert recipe["model"] == "shufflenet_v2_x1_0"
    assert load_yaml("shufflenet_v2_1.0_ascend") == recipe
    assert load_yaml("shufflenet_v2_1.0_ascend.yaml") == recipe

    (tmp_path / "shufflenet_v2_1.0_ascend.yaml").write_text("lr: 0.5\n")  # the user's own file wins
    assert load_yaml("shufflenet_v2_1.0_ascend.yaml") == {"lr": 0.5}
    assert load_yaml("shufflenet_v2_1.0_ascend") == recipe  # a name without the suffix is not that file


def test_a_missing_config_says_what_to_pass(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as missing:  # the README's clone path, where there is no clone
        load_yaml("configs/shufflenetv2/shufflenet_v2_0.5_ascend.yaml")
    assert str(missing.value) == (
        "config file configs/shufflenetv2/shufflenet_v2_0.5_ascend.yaml does not exist; the shipped recipe of "
        "that name is `-c shufflenet_v2_0.5_ascend`"
    )
    with pytest.raises(ConfigError) as unknown:
        load_yaml("shufflenet_v2_3.0_ascend")
    message = str(unknown.value)
    assert message.startswith("config file shufflenet_v2_3.0_ascend does not exist; check the path given to")
    assert all(name in message for name in recipes.shipped())


def test_recipes_command_lists_them_and_prints_one(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recipes"]) == 0
    listing = capsys.readouterr().out
    for name, path in recipes.shipped().items():  # each name, and under it the start of what it is for
        assert f"{name}\n    {recipes.summary(path)[:40]}" in listing
    assert "\nshufflenet_v2_2.0_ascend\n    MindCV's recipe for shufflenet_v2_x2_0 (ImageNet-1K, 8 devices" in listing
    assert "shufflenetv2 recipes NAME > mine.yaml" in listing
    assert recipes.summary(CONFIGS / "shufflenet_v2_2.0_ascend.yaml") == (  # the first sentence, not the launch line
        "MindCV's recipe for shufflenet_v2_x2_0 (ImageNet-1K, 8 devices x batch 64), same keys and values (plus "
        "lr_global_batch, ours)."
    )

    assert main(["recipes", "shufflenet_v2_0.5_cifar10"]) == 0
    assert capsys.readouterr().out == (CONFIGS / "shufflenet_v2_0.5_cifar10.yaml").read_text()

    assert main(["recipes", "resnet50"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: no shipped recipe is called 'resnet50'; there are: shufflenet_v2_0.5_ascend, ")


@pytest.mark.slow
def test_a_wheel_carries_the_recipes_and_trains_with_one_outside_a_clone(tmp_path: Path) -> None:
    """What `pip install` of this project gives, checked where no clone is: the wheel built from the sources,
    installed into a folder of its own, and a run started from another folder by recipe name."""
    pytest.importorskip("setuptools", minversion="64")  # the build backend pyproject.toml names
    pytest.importorskip("sklearn")  # the digits recipe's data
    source = tmp_path / "source"  # a copy, so that the build's own files stay out of the clone
    for folder in ("shufflenetv2", "configs"):
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path / "wheel", source],
                   check=True, capture_output=True, timeout=300)  # fmt: skip
    (wheel,) = (tmp_path / "wheel").glob("shufflenetv2-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        packed = {Path(n).stem: archive.read(n) for n in archive.namelist() if n.startswith("shufflenetv2/configs/")}
    assert packed == {name: path.read_bytes() for name, path in recipes.shipped().items()}

    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "-q", "--target", site, wheel], check=True, capture_output=True,
                   timeout=300)  # fmt: skip
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "SHUFFLENETV2_HOME": str(tmp_path / "home")}
    run = subprocess.run(
        [sys.executable, "-c", "import sys, shufflenetv2.cli as cli; print(cli.__file__); sys.exit(cli.main())",
         "train", "-c", "shufflenet_v2_0.5_digits_demo", "--epoch_size", "1", "--ckpt_save_dir", "out",
         # numba compiles its kernels afresh for a new install folder, 40 of this run's 60 s: these flags keep
         # every BatchNorm input off the (pixels, C) layout its kernels take, and the batch step in torch
         "--channels_last", "False", "--image_resize", "64", "--data_pipeline", "classic", "--num_samples", "128"],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert run.stdout.splitlines()[0] == str(site / "shufflenetv2" / "cli.py")  # the wheel's, not the clone's
    assert "training finished: 1 epoch in" in run.stdout
    assert len(list((elsewhere / "out").glob("shufflenet_v2_x0_5-1_*.safetensors"))) == 1
