"""Stopping on request (SIGTERM, Ctrl-C) and interim checkpoints: the current step finishes, a checkpoint
is saved, the process exits with 75, and resuming gives the uninterrupted run's weights bit for bit."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from shufflenetv2 import read_weights
from shufflenetv2.checkpoint import list_checkpoints, load_state
from shufflenetv2.engine import Trainer, TrainingError, train
from shufflenetv2.interrupt import EXIT_INTERRUPTED, StopRequest, TrainingInterrupted

from .conftest import built_once
from .test_train import COLOURS, final_weights, tiny_config, tiny_data  # noqa: F401 - tiny_data is a fixture

REPO = Path(__file__).resolve().parents[1]


class StoppedAt(Trainer):
    """Raises a real SIGTERM inside the loop right after optimizer step ``stop_at`` (deterministic timing)."""

    def __init__(self, cfg, stop_at: int, sig: int = signal.SIGTERM) -> None:
        super().__init__(cfg)
        self.stop_at, self.sig = stop_at, sig

    def _optimizer_step(self) -> None:
        super()._optimizer_step()
        if self.global_step == self.stop_at:
            signal.raise_signal(self.sig)


def _handlers() -> tuple[object, object]:
    """SIGINT's and SIGTERM's handlers: the ones a run must put back (a background job starts with SIGINT
    ignored, an interactive one with Python's default)."""
    return signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def straight(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("straight")
    train(tiny_config(tiny_data, out, ema=True, ema_decay=0.9))
    return out


@pytest.mark.parametrize(("stop_at", "sig"), [(3, signal.SIGTERM), (6, signal.SIGINT), (8, signal.SIGTERM)])
def test_stop_saves_and_resume_is_exact(
    tiny_data: Path,  # noqa: F811
    straight: Path,
    tmp_path: Path,
    stop_at: int,
    sig: int,
) -> None:
    """Step 3: mid-epoch; step 6: the last batch of epoch 1 (saved under the epoch-end name); step 8: epoch 2."""
    cfg = tiny_config(tiny_data, tmp_path, ema=True, ema_decay=0.9)
    before = _handlers()
    with pytest.raises(TrainingInterrupted, match=f"stopped by {signal.Signals(sig).name}") as info:
        StoppedAt(cfg, stop_at, sig).run()
    saved = list_checkpoints(tmp_path)[-1]
    assert str(saved.weights) in str(info.value) and "--auto_resume True" in str(info.value)
    epoch, batch = divmod(stop_at - 1, 6)
    assert (saved.epoch, saved.step) == (epoch + 1, batch + 1)
    state = load_state(saved.state)
    assert (state["epoch"], state["batch"], state["global_step"]) == (epoch, batch + 1, stop_at)
    assert _handlers() == before  # handlers are put back after the run

    result = train(dataclasses.replace(cfg, auto_resume=True))
    assert result.epochs == 2
    assert same(final_weights(straight), final_weights(tmp_path))
    assert same(
        read_weights(list_checkpoints(straight)[-1].ema).tensors,
        read_weights(list_checkpoints(tmp_path)[-1].ema).tensors,
    )
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    expected = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]  # one row per epoch, none repeated or lost
    assert [r["train_loss"] for r in rows] == [r["train_loss"] for r in expected]


def test_resuming_refuses_changed_class_folders_and_names_a_changed_image_count(
    tiny_data: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    data, out = tmp_path / "data", tmp_path / "run"
    shutil.copytree(tiny_data, data)
    cfg = tiny_config(data, out, epoch_size=1)
    with pytest.raises(TrainingInterrupted):
        StoppedAt(cfg, 3).run()  # a checkpoint inside the epoch, after batch 3 of 6
    saved = list_checkpoints(out)
    assert read_weights(saved[-1].weights).classes == sorted(COLOURS)  # the names, in label order

    for split in ("train", "val"):  # "blue" renamed "teal": sorted, it now comes last and takes label 2
        (data / split / "blue").rename(data / split / "teal")
    with pytest.raises(TrainingError, match=r"only in the checkpoint's: blue; only in the data's: teal\)"):
        train(dataclasses.replace(cfg, auto_resume=True))
    assert list_checkpoints(out) == saved
    for split in ("train", "val"):
        (data / split / "teal").rename(data / split / "blue")

    for i in range(2):  # two more training images: the rest of the epoch draws from another order
        shutil.copy(data / "train" / "red" / f"{i}.png", data / "train" / "red" / f"copy{i}.png")
    result = train(dataclasses.replace(cfg, auto_resume=True))
    assert result.epochs == 1
    log = (out / "train_rank0.log").read_text()
    assert "warning: the training set has 50 images, and had 48 when" in log and "inside epoch 1" in log


def test_stop_with_gradient_accumulation_waits_for_the_optimizer_step(tiny_data: Path, tmp_path: Path) -> None:  # noqa: F811
    """A stop requested between accumulated batches is honoured at the next optimizer step, never halfway."""
    cfg = tiny_config(tiny_data, tmp_path / "a", gradient_accumulation_steps=2)
    reference = train(dataclasses.replace(cfg, ckpt_save_dir=str(tmp_path / "ref")))

    class StopMidAccumulation(Trainer):
        def _train_epoch(self, epoch: int):
            if epoch == 0:
                signal.raise_signal(signal.SIGTERM)  # before batch 1: the step completes after batch 2
            return super()._train_epoch(epoch)

    with pytest.raises(TrainingInterrupted, match="after batch 2/6"):
        StopMidAccumulation(cfg).run()
    assert load_state(list_checkpoints(tmp_path / "a")[-1].state)["global_step"] == 1
    train(dataclasses.replace(cfg, auto_resume=True))
    assert same(final_weights(tmp_path / "ref"), final_weights(tmp_path / "a"))
    assert reference.epochs == 2


def test_interim_checkpoints_change_nothing_and_are_cleaned_up(
    tiny_data: Path,  # noqa: F811
    straight: Path,
    tmp_path: Path,
) -> None:
    train(tiny_config(tiny_data, tmp_path, ema=True, ema_decay=0.9, ckpt_save_steps=2))
    assert same(final_weights(straight), final_weights(tmp_path))
    assert [(r.epoch, r.step) for r in list_checkpoints(tmp_path)] == [(1, 6), (2, 6)]
    log = (tmp_path / "train_rank0.log").read_text()
    assert "NaN" not in log


def test_a_second_ctrl_c_stops_at_once() -> None:
    before = _handlers()
    with StopRequest() as stop:
        signal.raise_signal(signal.SIGINT)
        assert stop.signal_name == "SIGINT"
        signal.raise_signal(signal.SIGTERM)  # further SIGTERMs are absorbed
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert _handlers() == before


# --- the real command, real signals -------------------------------------------------------------------


def _config_file(data: Path, out: Path, path: Path, **overrides: object) -> Path:
    cfg = tiny_config(data, out, num_parallel_workers=1, log_interval=1, epoch_size=3, **overrides)
    values = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}
    path.write_text(yaml.safe_dump(values))
    return path


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _train(config: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), "--config", str(config), *extra]


@pytest.fixture(scope="module")
def reference_run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    """The uninterrupted run, once per session (``built_once``; tiny_data is the same in every worker)."""

    def build(folder: Path) -> None:
        config = _config_file(tiny_data, folder / "run", folder / "reference.yaml")
        done = subprocess.run(_train(config), env=_env(), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr

    return built_once(tmp_path_factory, "reference_run", build) / "run"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sig", "whole_group"),
    [(signal.SIGTERM, False), (signal.SIGINT, True), (signal.SIGTERM, True)],
    ids=["SIGTERM-to-the-trainer", "Ctrl-C-to-the-group", "SIGTERM-to-the-group"],
)
def test_train_py_stops_on_a_signal_and_resumes_exactly(
    tiny_data: Path,  # noqa: F811
    reference_run: Path,
    tmp_path: Path,
    sig: int,
    whole_group: bool,
) -> None:
    """The group variants also hit the DataLoader worker, as a terminal's Ctrl-C or a scheduler's kill does."""
    out = tmp_path / "run"
    config = _config_file(tiny_data, out, tmp_path / "run.yaml")
    process = subprocess.Popen(_train(config), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)  # fmt: skip
    log = out / "train_rank0.log"
    deadline = time.monotonic() + 120
    while "Epoch: [2/3], batch: [2/6]" not in (log.read_text() if log.exists() else ""):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    if whole_group:
        os.killpg(process.pid, sig)
    else:
        process.send_signal(sig)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == EXIT_INTERRUPTED, stderr
    name = signal.Signals(sig).name
    assert f"{name} received: finishing the current step" in stderr
    assert f"stopped by {name} in epoch 2" in stderr and "Traceback" not in stderr
    saved = list_checkpoints(out)[-1]
    assert saved.epoch == 2 and 2 <= saved.step < 6, saved  # the step in flight when the signal came, or the next

    resumed = subprocess.run(_train(config, "--auto_resume", "True"), env=_env(), capture_output=True, text=True,
                             timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert same(final_weights(reference_run), final_weights(out))
