"""End-to-end training on a tiny generated ImageFolder: resume, outputs, validate, errors, DDP."""

from __future__ import annotations

import dataclasses
import gc
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from shufflenetv2 import batchnorm, create_model, engine, read_weights, save_weights
from shufflenetv2.checkpoint import list_checkpoints, load_state
from shufflenetv2.compiling import CompiledOrEager
from shufflenetv2.config import Config, ConfigError, evaluation_of, from_dict
from shufflenetv2.engine import (
    Precision,
    Trainer,
    TrainingError,
    bfloat16_kernels_on_cpu,
    compiles,
    describe_mode,
    evaluates_fused,
    idle_cores_note,
    train,
    trains_batchnorm_in_kernels,
    validate,
)
from shufflenetv2.errors import CheckpointError
from shufflenetv2.optim import lr_schedule

REPO = Path(__file__).resolve().parents[1]
COLOURS = {"blue": (40, 60, 200), "green": (40, 180, 60), "red": (210, 40, 40)}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes of noisy coloured squares with a class-specific stripe: learnable in a few steps."""
    root = tmp_path_factory.mktemp("tiny")
    g = torch.Generator().manual_seed(0)
    for split, count in (("train", 16), ("val", 6)):
        for c, (name, rgb) in enumerate(COLOURS.items()):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                noise = torch.randint(-40, 40, (24, 24, 3), generator=g)
                pixels = (torch.tensor(rgb) + noise).clamp(0, 255).to(torch.uint8)
                pixels[4 + 6 * c : 8 + 6 * c, :, :] = 255
                Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")
    return root


def tiny_config(data: Path, out: Path, **overrides: object) -> Config:
    values = dict(
        mode=1, dataset="imagefolder", data_dir=str(data), num_classes=3, image_resize=16, batch_size=8,
        num_parallel_workers=0, epoch_size=2, val_while_train=True, ckpt_save_dir=str(out), log_interval=2,
        opt="momentum", lr=0.05, warmup_epochs=1, decay_epochs=1, min_lr=0.0, scale=(0.5, 1.0), hflip=0.5,
        color_jitter=0.2, crop_pct=1.0, keep_checkpoint_max=5, weight_decay=1e-4, weight_decay_filter="auto",
        label_smoothing=0.1, seed=7,
    )  # fmt: skip
    values.update(overrides)
    return from_dict(values)


def final_weights(directory: Path) -> dict[str, torch.Tensor]:
    return read_weights(list_checkpoints(directory)[-1].weights).tensors


def test_two_epochs_equal_one_plus_resume(tiny_data: Path, tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    train(tiny_config(tiny_data, straight))
    first = list_checkpoints(straight)[0]
    assert first.epoch == 1
    resumed = tmp_path / "resumed"
    result = train(tiny_config(tiny_data, resumed, ckpt_path=str(first.weights), resume_opt=True))
    assert result.epochs == 2
    a, b = final_weights(straight), final_weights(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    via_state = tmp_path / "via_state"  # --ckpt_path may also name the .state.pt file
    train(tiny_config(tiny_data, via_state, ckpt_path=str(first.state), resume_opt=True))
    c = final_weights(via_state)
    assert all(torch.equal(a[k], c[k]) for k in a)
    assert not torch.equal(a["classifier.weight"], read_weights(first.weights).tensors["classifier.weight"])


def test_auto_resume_picks_the_newest_checkpoint(tiny_data: Path, tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    train(tiny_config(tiny_data, straight, ema=True, ema_decay=0.9))
    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    first = list_checkpoints(straight)[0]
    best = straight / "shufflenet_v2_x0_5_best.safetensors"  # epoch 1's: epoch 2 ties its top-1
    for path in (first.weights, first.state, best):
        (interrupted / path.name).write_bytes(path.read_bytes())
    result = train(tiny_config(tiny_data, interrupted, auto_resume=True, ema=True, ema_decay=0.9))
    assert result.epochs == 2
    a, b = final_weights(straight), final_weights(interrupted)
    assert all(torch.equal(a[k], b[k]) for k in a)
    ema_a = read_weights(straight / "shufflenet_v2_x0_5-2_6_ema.safetensors").tensors
    ema_b = read_weights(interrupted / "shufflenet_v2_x0_5-2_6_ema.safetensors").tensors
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    # the resumed run names what differs from the config the checkpoint was saved with (auto_resume aside)
    changed = (
        f"note: changed since that checkpoint was saved: ckpt_save_dir {str(straight)!r} -> {str(interrupted)!r}\n"
    )
    log = (interrupted / "train_rank0.log").read_text()
    assert changed in log and "changed since" not in (straight / "train_rank0.log").read_text()
    assert "training finished: 1 epoch (epoch 2 of 2, resumed after epoch 1) in " in log
    # the same command again, on the finished run (a requeued job): it says so and names what the run saved
    again = train(tiny_config(tiny_data, interrupted, auto_resume=True, ema=True, ema_decay=0.9))
    log = (interrupted / "train_rank0.log").read_text()[len(log) :]
    last = interrupted / "shufflenet_v2_x0_5-2_6.safetensors"
    assert (
        f"nothing to train: the run is at epoch 2 and epoch_size is 2; a larger --epoch_size trains on from {last}"
        in log
    )
    assert "training finished" not in log and again.epochs == 2 and again.last is None
    assert again.last_checkpoint == last and again.best_path == interrupted / "shufflenet_v2_x0_5_best.safetensors"


def test_run_directory_contents(tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = train(tiny_config(tiny_data, out, epoch_size=3, keep_checkpoint_max=2))
    names = {p.name for p in out.iterdir()}
    assert {"result.log", "metrics.jsonl", "curves.png", "config.yaml", "train_rank0.log"} <= names
    assert [(r.epoch, r.step) for r in list_checkpoints(out)] == [(2, 6), (3, 6)]  # latest_k, k = 2
    assert "shufflenet_v2_x0_5_best.safetensors" in names and result.best_path is not None
    # warmup 1 + decay 1: epoch 3 runs at min_lr 0, which the log says, and which changes no weight
    assert (
        "so the last epoch of this 3-epoch run trains at min_lr 0 (with lr 0 it changes no weight, only "
        in (out / "train_rank0.log").read_text()
    )
    before, after = (read_weights(ref.weights).tensors for ref in list_checkpoints(out))
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in moved), moved
    header, *rows = (out / "result.log").read_text().splitlines()
    assert header.split("\t") == [
        "Epoch", "TrainLoss", "Top_1_Accuracy", "Top_5_Accuracy", "TrainTime", "EvalTime", "TotalTime"
    ]  # fmt: skip
    assert len(rows) == 3 and rows[-1].split("\t")[0] == "3"
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    assert all(0.0 <= m["top1"] <= 1.0 and m["train_loss"] > 0 for m in metrics)
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["epoch_size"] == 3 and saved["data_dir"] == str(tiny_data)
    log = (out / "train_rank0.log").read_text()
    assert "img/s" in log and "data wait" in log and "ETA" in log and "ms/step" in log
    assert "input: fast pipeline, no JPEG files (images decoded whole)" in log  # PNGs: no crop-box claim


def test_learns_the_tiny_task(tiny_data: Path, tmp_path: Path) -> None:
    result = train(tiny_config(tiny_data, tmp_path / "run", epoch_size=10, lr=0.01, decay_epochs=9, image_resize=32))
    assert result.last is not None and result.last.top1 >= 0.8  # chance is 1/3
    assert result.last.count == 18


def _val_with_blue_renamed_teal(data: Path, tmp_path: Path) -> Path:
    """A copy of ``data``'s val split whose class folder "blue" is named "teal"."""
    renamed = tmp_path / "renamed"
    shutil.copytree(data / "val", renamed / "val")
    (renamed / "val" / "blue").rename(renamed / "val" / "teal")
    return renamed


def test_validate_any_weight_format(tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    result = train(tiny_config(tiny_data, out, epoch_size=1, warmup_epochs=0))
    best = out / "shufflenet_v2_x0_5_best.safetensors"
    cfg = tiny_config(tiny_data, out, ckpt_path=str(best))
    capsys.readouterr()
    reference = validate(cfg)
    assert reference.top1 == pytest.approx(result.last.top1) and reference.count == 18
    assert "warning" not in capsys.readouterr().err
    recorded = evaluation_of(cfg)  # the run's evaluation transform, recorded with every weight file it wrote
    assert read_weights(best).evaluation == recorded == read_weights(result.last_checkpoint).evaluation
    assert recorded == {"image_resize": 16, "crop_pct": 1.0, "interpolation": "bilinear",
                        "mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375]}  # fmt: skip
    assert cfg.std[1] != 57.12  # 0.224 * 255 in binary: the record leaves the noise out
    validate(dataclasses.replace(cfg, image_resize=24))  # scored otherwise than the run scored it: said so
    assert capsys.readouterr().err == (
        f"warning: the config evaluates {best} with image_resize 24 (the weights': 16): its training run used the "
        "weights' values, so results here may be worse than the run's; pass that run's config (config.yaml in its "
        "run folder) or those values as flags\n"
    )
    renamed = _val_with_blue_renamed_teal(tiny_data, tmp_path)  # the same images: the label of one class moves
    validate(dataclasses.replace(cfg, data_dir=str(renamed)))
    assert "trained on classes that differ from those of split 'val' (only in training: blue; only in val: teal)" in (
        capsys.readouterr().err
    )
    from shufflenetv2 import create_model

    model = create_model("shufflenet_v2_x0_5", num_classes=3, checkpoint_path=best)
    for suffix in (".ckpt", ".pth"):
        path = save_weights(tmp_path / f"w{suffix}", model)
        other = validate(dataclasses.replace(cfg, ckpt_path=str(path)))
        assert other.top1 == reference.top1 and other.loss == pytest.approx(reference.loss, abs=1e-5)


def test_validate_runs_an_exported_onnx_file(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The accuracy of the file one deploys: validate.py takes what ``shufflenetv2 export`` wrote and runs it
    in ONNX Runtime, in float32 whatever amp_level says, with the weights' metrics."""
    pytest.importorskip("onnxruntime")
    from shufflenetv2.cli import main

    out = tmp_path / "run"
    train(tiny_config(tiny_data, out, epoch_size=1, warmup_epochs=0))
    best = out / "shufflenet_v2_x0_5_best.safetensors"
    exported = tmp_path / "deployed.onnx"
    assert main(["export", str(best), str(exported), "--input-size", "16"]) == 0
    cfg = tiny_config(tiny_data, out, ckpt_path=str(best))
    reference = validate(cfg)
    capsys.readouterr()
    scored = validate(dataclasses.replace(cfg, ckpt_path=str(exported), amp_level="O2", mode=0))
    assert scored.count == reference.count == 18 and scored.top1 == reference.top1 and scored.top5 == reference.top5
    assert scored.loss == pytest.approx(reference.loss, rel=1e-5, abs=1e-6)
    assert "warning" not in capsys.readouterr().err  # no bfloat16 advice: ONNX Runtime runs float32
    renamed = _val_with_blue_renamed_teal(tiny_data, tmp_path)  # the export's class names are checked too
    validate(dataclasses.replace(cfg, ckpt_path=str(exported), data_dir=str(renamed)))
    assert "trained on classes that differ from those of split 'val' (only in training: blue" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"deployed\.onnx takes 16 x 16 images and the config crops to 32 px"):
        validate(dataclasses.replace(cfg, ckpt_path=str(exported), image_resize=32))
    with pytest.raises(ConfigError, match="--num_classes 3"):
        validate(dataclasses.replace(cfg, ckpt_path=str(exported), num_classes=5))


def test_drop_classifier_fine_tunes_a_checkpoint_with_another_class_count(tiny_data: Path, tmp_path: Path) -> None:
    source = create_model("shufflenet_v2_x0_5", num_classes=10)  # e.g. an ImageNet checkpoint for 3 classes
    path = tmp_path / "ten_classes.safetensors"
    save_weights(path, source)
    with pytest.raises(CheckpointError, match="--drop_classifier True"):
        Trainer(tiny_config(tiny_data, tmp_path / "strict", ckpt_path=str(path)))
    trainer = Trainer(tiny_config(tiny_data, tmp_path / "tuned", ckpt_path=str(path), drop_classifier=True))
    loaded, theirs = trainer.model.state_dict(), source.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in theirs.items() if not k.startswith("classifier."))
    assert loaded["classifier.weight"].shape == (3, 1024)
    log = (tmp_path / "tuned" / "train_rank0.log").read_text()
    assert f"loaded weights from {path} (10 classes), with a new 3-class classifier" in log
    assert "note:" not in log  # a new classifier: nothing to say about the old one's classes
    # 3 classes of other names: fine-tuning keeps the classifier, and the log says whose rows it takes
    named = save_weights(tmp_path / "named.safetensors", create_model("shufflenet_v2_x0_5", 3), classes=["a", "b", "c"])
    Trainer(tiny_config(tiny_data, tmp_path / "renamed", ckpt_path=str(named)))
    log = (tmp_path / "renamed" / "train_rank0.log").read_text()
    assert "note: " in log and "only in the weights': a, b, c; only in the data's: blue, green, red" in log


def test_validate_never_runs_on_random_weights(tiny_data: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="never evaluates random weights"):
        validate(tiny_config(tiny_data, tmp_path))
    with pytest.raises(ConfigError, match="does not exist"):
        validate(tiny_config(tiny_data, tmp_path, ckpt_path=str(tmp_path / "missing.safetensors")))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(tiny_config(tiny_data, out, epoch_size=1, warmup_epochs=0))
    log = (out / "train_rank0.log").read_text()
    kernels = "; BatchNorm compiled (numba)" if batchnorm.compiled_kernels() else "; BatchNorm in torch ops (compiled"
    assert kernels in log.splitlines()[0]
    threads = torch.get_num_threads()
    assert f"; device cpu ({threads} thread{'s' if threads > 1 else ''} per process); " in log.splitlines()[0]
    first_step = "numba: first training step took " in log
    assert first_step == (batchnorm.compiled_kernels() is not None) and log.count("first training step took") == 1
    good = list_checkpoints(out)[-1]
    before = good.weights.read_bytes()
    with pytest.raises(TrainingError, match=r"NaN or infinite at step \d+"):
        train(tiny_config(tiny_data, out, epoch_size=3, auto_resume=True, lr=1e35, warmup_epochs=0, decay_epochs=3))
    assert list_checkpoints(out)[-1] == good and good.weights.read_bytes() == before


def test_bf16_autocast_on_cpu_and_fp16_refused(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = train(tiny_config(tiny_data, tmp_path / "bf16", epoch_size=1, warmup_epochs=0, amp_level="O2"))
    assert result.last is not None and result.last.loss == result.last.loss  # finite, not NaN
    log = (tmp_path / "bf16" / "train_rank0.log").read_text()
    lacking = "warning: amp_level O2 runs under autocast bfloat16, but this CPU lacks the AVX-512 that oneDNN's"
    if bfloat16_kernels_on_cpu() is False:  # this machine's CPU decides which of the two the run says
        assert lacking in log and "Pass --amp_level O0" in log and "note: amp_level" not in log
    else:
        assert "note: amp_level O2 runs under autocast bfloat16, which on a CPU trains this network slower" in log
        assert lacking not in log
    capsys.readouterr()
    best = tmp_path / "bf16" / "shufflenet_v2_x0_5_best.safetensors"
    scored = validate(tiny_config(tiny_data, tmp_path, amp_level="O2", ckpt_path=str(best), mode=0))
    assert scored.count == 18 and (lacking in capsys.readouterr().err) == (bfloat16_kernels_on_cpu() is False)
    assert "; BatchNorm in torch ops" in log.splitlines()[0]  # the numba kernels stand aside under autocast
    if batchnorm.compiled_kernels() is not None:  # and the log says why
        assert "in float32 or float64, without autocast or sync_bn)" in log.splitlines()[0]
    with pytest.raises(ConfigError, match="float16"):
        Trainer(tiny_config(tiny_data, tmp_path / "fp16", amp_level="O3", amp_dtype="float16"))


def test_the_log_says_whether_batchnorm_trains_in_the_kernels(tmp_path: Path) -> None:
    """Asked of the network itself, through the test its BatchNorms make in every training forward."""
    from shufflenetv2.distributed import convert_sync_batchnorm
    from shufflenetv2.model import build_network

    cfg, cpu = tiny_config(tmp_path, tmp_path), torch.device("cpu")
    numba = batchnorm.compiled_kernels() is not None
    net = build_network("shufflenet_v2_x0_5", num_classes=3).eval()
    assert trains_batchnorm_in_kernels(net, cfg, cpu, autocast=False) == numba
    assert not net.training  # the question leaves the network as it was
    assert trains_batchnorm_in_kernels(net.double(), cfg, cpu, autocast=False) == numba
    assert not trains_batchnorm_in_kernels(net, cfg, cpu, autocast=True)
    assert not trains_batchnorm_in_kernels(net, dataclasses.replace(cfg, channels_last=False), cpu, autocast=False)
    assert not trains_batchnorm_in_kernels(net, dataclasses.replace(cfg, mode=0, compile_on_cpu=True), cpu, False)
    assert not trains_batchnorm_in_kernels(convert_sync_batchnorm(net, cpu), cfg, cpu, autocast=False)


def test_train_and_validate_stop_their_loader_workers_before_returning(tiny_data: Path, tmp_path: Path) -> None:
    """Left to the garbage collector, a persistent-workers iterator can outlive its queues and then wait
    5 s per worker, twice, for workers that never hear the stop: 40 s of whatever ran next (a CIFAR-10
    run's 2 train and 2 eval workers stalled the next test that way).  Checked with the collector off,
    so that nothing but train() and validate() themselves can have stopped the workers."""
    gc.collect()
    before = set(multiprocessing.active_children())
    gc.disable()
    try:
        cfg = tiny_config(tiny_data, tmp_path / "run", epoch_size=1, warmup_epochs=0, num_parallel_workers=2)
        result = train(cfg)
        assert set(multiprocessing.active_children()) == before
        validate(dataclasses.replace(cfg, ckpt_path=str(result.best_path)))
        assert set(multiprocessing.active_children()) == before
    finally:
        gc.enable()


def test_class_count_mismatch_is_a_config_error(tiny_data: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="num_classes 3"):
        Trainer(tiny_config(tiny_data, tmp_path, num_classes=10))


def _run(args: list[str], cwd: Path, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env, check=False)


@pytest.mark.slow
def test_seed_commands(tiny_data: Path, tmp_path: Path) -> None:
    """MindCV's own command lines: train.py --config ... --data_dir ... --distribute False, then validate.py."""
    cfg = tiny_config(tiny_data, tmp_path / "ckpt", epoch_size=1, warmup_epochs=0)
    config_file = tmp_path / "tiny.yaml"
    values = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}
    values.pop("data_dir")
    config_file.write_text(yaml.safe_dump(values))
    trained = _run(
        [sys.executable, str(REPO / "train.py"), "--config", str(config_file), "--data_dir", str(tiny_data),
         "--distribute", "False"], cwd=tmp_path,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    assert "Epoch: [1/1]" in trained.stdout and "run directory" in trained.stdout
    best = tmp_path / "ckpt" / "shufflenet_v2_x0_5_best.safetensors"
    checked = _run(
        [sys.executable, str(REPO / "validate.py"), "-c", str(config_file), "--data_dir", str(tiny_data),
         "--ckpt_path", str(best)], cwd=tmp_path,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stderr
    assert "'Top_1_Accuracy'" in checked.stdout
    as_json = json.loads(checked.stdout.strip().splitlines()[-1])
    assert as_json["images"] == 18 and 0.0 <= as_json["Top_1_Accuracy"] <= 1.0
    missing = _run([sys.executable, str(REPO / "validate.py"), "-c", str(config_file), "--data_dir", str(tiny_data)],
                   cwd=tmp_path)  # fmt: skip
    assert missing.returncode == 2 and "Traceback" not in missing.stderr and "ckpt_path" in missing.stderr
    bad_key = _run([sys.executable, str(REPO / "train.py"), "--config", str(config_file), "--learning_rate", "1"],
                   cwd=tmp_path)  # fmt: skip
    assert bad_key.returncode == 2


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_ddp_step_is_the_full_batch_step(tiny_data: Path, tmp_path: Path, layout: str) -> None:
    """2 gloo processes with sync BN and DDP give the full-batch gradient (float64, to rounding)."""
    torchrun = Path(sys.executable).with_name("torchrun")
    out = tmp_path / "gradients.json"
    worker = REPO / "tests" / "ddp_gradient_worker.py"
    done = _run(
        [str(torchrun), "--nproc_per_node", "2", "--standalone", str(worker), str(tiny_data), str(out),
         layout],
        cwd=tmp_path, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["synced_bn_layers"] == 56  # every BatchNorm of x0.5
    assert result["relative_gradient_difference"] < 1e-10


@pytest.mark.slow
def test_two_process_ddp_follows_one_process(tiny_data: Path, tmp_path: Path) -> None:
    """torchrun, 2 gloo processes x batch 4 with sync BN, against 1 process x batch 8: same global batches.

    The first loss (before any update) agrees to float32 rounding.  After that the curves agree only
    loosely: at MindCV's initialisation float32 gradients of this network carry about 2 % noise (measured
    against float64 in one process), which training amplifies; the exact equivalence of the distributed
    step is what ``test_ddp_step_is_the_full_batch_step`` checks in float64.
    """
    base = tiny_config(tiny_data, tmp_path, epoch_size=2, sync_bn=True, log_interval=1, lr=0.001)
    config_file = tmp_path / "ddp.yaml"
    values = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(base).items()}
    config_file.write_text(yaml.safe_dump(values))
    single = _run(
        [sys.executable, str(REPO / "train.py"), "-c", str(config_file), "--ckpt_save_dir", str(tmp_path / "one"),
         "--batch_size", "8"], cwd=tmp_path,
    )  # fmt: skip
    assert single.returncode == 0, single.stderr
    torchrun = Path(sys.executable).with_name("torchrun")
    double = _run(
        [str(torchrun), "--nproc_per_node", "2", "--standalone", str(REPO / "train.py"), "-c",
         str(config_file), "--ckpt_save_dir", str(tmp_path / "two"), "--batch_size", "4"], cwd=tmp_path,
    )  # fmt: skip
    assert double.returncode == 0, double.stderr[-3000:]
    assert double.stdout.count("run directory: ") == 1 and "checkpoint: None" not in double.stdout  # rank 0's
    assert "Warning" not in double.stderr, double.stderr[-3000:]  # sync BN's all-reduce warned on every rank
    assert (tmp_path / "two" / "train_rank1.log").exists()
    first_line = (tmp_path / "two" / "train_rank1.log").read_text().splitlines()[0]
    assert "; device cpu (1 thread per process); " in first_line
    assert "; BatchNorm in torch ops" in first_line  # sync BN all-reduces its statistics: not the kernels

    def step_losses(run: str) -> list[float]:
        lines = (tmp_path / run / "train_rank0.log").read_text().splitlines()
        return [float(line.split("loss: ")[1].split(",")[0]) for line in lines if "loss: " in line]

    one, two = step_losses("one"), step_losses("two")
    assert len(one) == len(two) == 12  # 6 steps x 2 epochs, same global batches
    assert two[0] == pytest.approx(one[0], rel=3e-5)  # float32 rounding of sync BN's all-reduce (1.2e-5 seen)
    assert two[1] == pytest.approx(one[1], rel=1e-4)  # after the first update (lr 0.001 keeps it tame longer)
    m1 = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(m1, m2, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=0.25)
    assert [m["epoch"] for m in m2] == [1, 2]

    # validate.py on both ranks: each image scored once over the two shards, reported once
    scored = _run(
        [str(torchrun), "--nproc_per_node", "2", "--standalone", str(REPO / "validate.py"), "-c",
         str(config_file), "--ckpt_path", str(tmp_path / "two" / "shufflenet_v2_x0_5_best.safetensors")],
        cwd=tmp_path,
    )  # fmt: skip
    assert scored.returncode == 0, scored.stderr[-3000:]
    reports = [json.loads(line) for line in scored.stdout.splitlines() if line.startswith('{"')]
    assert len(reports) == 1 and reports[0]["images"] == 18, scored.stdout
    assert reports[0]["Top_1_Accuracy"] == pytest.approx(m2[-1]["top1"], abs=1e-6)


@pytest.mark.parametrize("kernels", [False, True, None])
def test_autocast_on_a_cpu_without_bfloat16_kernels_is_a_warning(
    kernels: bool | None, tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Which CPU the suite runs on decides the branch of the training test above; this covers the others."""
    monkeypatch.setattr(engine, "bfloat16_kernels_on_cpu", lambda: kernels)
    cpu, cfg = torch.device("cpu"), tiny_config(tiny_data, tmp_path, amp_level="O3")
    warning, message = engine.cpu_autocast_advice(cfg, Precision.from_config(cfg, cpu), cpu)
    assert warning == (kernels is False) and message.startswith("amp_level O3 runs under autocast bfloat16")
    assert ("15x and evaluated 6x slower" in message) == (kernels is False)
    assert engine.cpu_autocast_advice(cfg, Precision.from_config(cfg, cpu), torch.device("cuda")) is None
    float32 = tiny_config(tiny_data, tmp_path, amp_level="O0")
    assert engine.cpu_autocast_advice(float32, Precision.from_config(float32, cpu), cpu) is None


def test_mode_0_on_a_cpu_trains_eager_and_evaluates_the_fused_model(tiny_data: Path, tmp_path: Path) -> None:
    cpu = torch.device("cpu")
    trainer = Trainer(tiny_config(tiny_data, tmp_path, mode=0, device="cpu"))
    assert not trainer.compiled_training and not isinstance(trainer.net, CompiledOrEager)
    assert trainer.fused_evaluation and not isinstance(trainer.eval_net, CompiledOrEager)
    assert describe_mode(trainer.cfg, cpu).startswith("training eager and evaluation on the fused inference model")
    compiled = Trainer(tiny_config(tiny_data, tmp_path / "compiled", mode=0, compile_on_cpu=True, device="cpu"))
    assert not compiled.fused_evaluation and isinstance(compiled.eval_net, CompiledOrEager)
    assert compiles(tiny_config(tiny_data, tmp_path, mode=0, compile_on_cpu=True), cpu)
    assert compiles(tiny_config(tiny_data, tmp_path, mode=0), torch.device("cuda"))
    assert not evaluates_fused(tiny_config(tiny_data, tmp_path, mode=0), torch.device("cuda"))
    autocast = tiny_config(tiny_data, tmp_path, mode=0, amp_level="O2")  # the fused model is slower under bf16
    assert not evaluates_fused(autocast, cpu) and not compiles(autocast, cpu)
    assert (
        describe_mode(autocast, cpu)
        == "eager, which on a CPU trains faster than compiled; compile_on_cpu True compiles"
    )
    assert not compiles(tiny_config(tiny_data, tmp_path, mode=1, compile_on_cpu=True), torch.device("cuda"))
    eager = Trainer(tiny_config(tiny_data, tmp_path / "eager", mode=1, device="cpu"))
    assert not eager.fused_evaluation and not isinstance(eager.eval_net, CompiledOrEager)


def test_mode_0_on_a_cpu_gives_mode_1s_weights_and_metrics_compiling_nothing(tiny_data: Path, tmp_path: Path) -> None:
    """MindCV's recipes say mode 0. On a CPU that trains eager, as mode 1 does, and evaluates the fused model,
    whose logits differ from the model's by float32 rounding only; neither train.py nor validate.py compiles."""
    frames = dict(torch._dynamo.utils.counters["frames"])
    runs = {}
    for mode in (0, 1):
        config = tiny_config(tiny_data, tmp_path / f"mode{mode}", mode=mode, epoch_size=2, device="cpu", ema=True)
        runs[mode] = train(config)
    assert dict(torch._dynamo.utils.counters["frames"]) == frames  # no torch.compile call
    log = (tmp_path / "mode0" / "train_rank0.log").read_text()
    assert "; mode 0 (training eager and evaluation on the fused inference model " in log
    assert "first validation took" not in log and "torch.compile" not in log
    fused, eager = final_weights(tmp_path / "mode0"), final_weights(tmp_path / "mode1")
    assert all(torch.equal(fused[k], eager[k]) for k in eager)
    rows = [
        [json.loads(line) for line in (tmp_path / f"mode{m}" / "metrics.jsonl").read_text().splitlines()]
        for m in (0, 1)
    ]
    for fused_row, eager_row in zip(*rows, strict=True):
        assert fused_row["top1"] == eager_row["top1"] and fused_row["top5"] == eager_row["top5"]
        assert fused_row["val_loss"] == pytest.approx(eager_row["val_loss"], rel=1e-5, abs=1e-6)
    assert [r["val_loss"] for r in rows[0]] != [r["val_loss"] for r in rows[1]]  # the fused network ran, not the model
    best = str(tmp_path / "mode0" / "shufflenet_v2_x0_5_best.safetensors")
    scored = {m: validate(tiny_config(tiny_data, tmp_path, mode=m, ckpt_path=best, device="cpu")) for m in (0, 1)}
    assert dict(torch._dynamo.utils.counters["frames"]) == frames
    assert scored[0].count == scored[1].count == 18 and scored[0].top1 == scored[1].top1
    assert scored[0].loss == pytest.approx(scored[1].loss, rel=1e-5, abs=1e-6) and scored[0].loss != scored[1].loss


@pytest.mark.slow
def test_mode_0_compiles_and_reports_compile_time(tiny_data: Path, tmp_path: Path) -> None:
    config = tiny_config(tiny_data, tmp_path, mode=0, epoch_size=1, warmup_epochs=0, compile_on_cpu=True)
    result = train(config)
    log = (tmp_path / "train_rank0.log").read_text()
    assert "; mode 0 (torch.compile); " in log and "note: amp_level" not in log  # float32: no precision note
    assert "torch.compile (mode 0): first training step took" in log
    assert "first validation took" in log
    assert "torch.compile failed" not in log and "runs eager from here on" not in log  # compiled, no fallback
    assert result.last is not None and result.last.count == 18


def test_a_checkpoints_state_file_passed_as_weights_names_the_weight_files(tiny_data: Path, tmp_path: Path) -> None:
    """`.state.pt` sits beside the weights and is easily picked for them (validate, info, --ckpt_path), and
    `--ema` on the weights looks for 'ema.*' tensors that our runs write to a file of their own."""
    train(tiny_config(tiny_data, tmp_path, epoch_size=1, ema=True, ema_decay=0.9))
    ref = list_checkpoints(tmp_path)[-1]
    assert ref.ema.exists()
    for ema in (False, True):
        with pytest.raises(CheckpointError, match="is the training state of a checkpoint") as raised:
            read_weights(ref.state, ema=ema)
        assert f"in {ref.weights}, and their EMA copy in {ref.ema}." in str(raised.value)
    with pytest.raises(CheckpointError, match=f"this checkpoint's EMA copy is {re.escape(str(ref.ema))}"):
        read_weights(ref.weights, ema=True)
    assert read_weights(ref.ema).arch["model"] == "shufflenet_v2_x0_5"  # the file the messages name


def test_precise_bn_changes_only_the_statistics_that_evaluation_and_the_files_use(
    tiny_data: Path, tmp_path: Path
) -> None:
    """At each epoch's end the network's and its EMA's BatchNorm statistics are recomputed from training
    batches, which draws nothing from the loop's random state: the same training step for step, the same
    weights, other statistics (so another validation), and the files hold them."""
    common = dict(epoch_size=2, ema=True, ema_decay=0.9, log_interval=1)
    train(tiny_config(tiny_data, tmp_path / "plain", **common))
    trainer = Trainer(tiny_config(tiny_data, tmp_path / "precise", precise_bn=12, **common))
    trainer.run()
    log = (tmp_path / "precise" / "train_rank0.log").read_text()
    assert (
        "precise_bn: the network's and its EMA's BatchNorm statistics recomputed from 16 training images under "
        "epoch 1's weights in " in log
    )  # 12 images round up to 2 whole batches of 8
    assert log.count("precise_bn: ") == 1 and "warning" not in log
    # one such validation alone, as a first epoch from scratch often gives, is no warning
    train(tiny_config(tiny_data, tmp_path / "one", **{**common, "epoch_size": 1}))
    (row,) = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert row["val_loss"] > 1e5 and "warning" not in (tmp_path / "one" / "train_rank0.log").read_text()
    # without it, the validation loss is millions after epoch 1 and thousands after epoch 2 (by thread count):
    # the second in a row is a warning that says why
    plain_log = (tmp_path / "plain" / "train_rank0.log").read_text()
    assert plain_log.count("warning: the validation loss, ") == 1
    assert re.search(
        r"Epoch 2/2 validation: .*\n.* warning: the validation loss, [\d,]+\.\d \(and [\d,]{9}\.\d at the validation "
        r"before\), is more than 10 times both the training loss \(\d\.\d{3}\) and a uniform guess's \(1\.099\): "
        r"BatchNorm's running statistics probably lag the weights \(6 optimizer steps an epoch, and fine-tuning or a "
        r"high lr moves the weights fast\)\. --precise_bn 1024 recomputes them from training images before each "
        r"validation; `shufflenetv2 recalibrate` does it for weights already saved\n",
        plain_log,
    )

    def step_losses(run: str) -> list[str]:
        lines = (tmp_path / run / "train_rank0.log").read_text().splitlines()
        return [line.split("loss: ")[1].split(",")[0] for line in lines if "batch: [" in line]

    assert len(step_losses("plain")) == 12 and step_losses("precise") == step_losses("plain")
    plain_rows = [json.loads(x) for x in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()]
    precise_rows = [json.loads(x) for x in (tmp_path / "precise" / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(plain_rows, precise_rows, strict=True):
        assert a["train_loss"] == b["train_loss"] and a["val_loss"] != b["val_loss"]
        assert "precise_bn_time" not in a and b["precise_bn_time"] > 0
    plain_ref, ref = list_checkpoints(tmp_path / "plain")[-1], list_checkpoints(tmp_path / "precise")[-1]
    for a, b in ((plain_ref.weights, ref.weights), (plain_ref.ema, ref.ema)):
        a, b = read_weights(a).tensors, read_weights(b).tensors
        assert a.keys() == b.keys()
        for key in a:  # the weights are the same, every statistic is another
            assert torch.equal(a[key], b[key]) != ("running" in key), key

    files = [(trainer.model, read_weights(ref.weights).tensors), (trainer.ema.module, read_weights(ref.ema).tensors)]
    for model, saved in files:
        for key, value in model.state_dict().items():
            if "running" in key:
                assert torch.equal(saved[key], value), key
    trainer._recompute_batchnorm_statistics(1)  # the same batches under the same weights: the same statistics
    for model, saved in files:
        for key, value in model.state_dict().items():
            if "running" in key:
                torch.testing.assert_close(value, saved[key], rtol=1e-6, atol=1e-7, msg=key)


def test_gradient_accumulation_steps_the_optimizer_every_n_batches(tiny_data: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_data, tmp_path, batch_size=4, gradient_accumulation_steps=3, epoch_size=1, lr_global_batch=4)
    trainer = Trainer(cfg)
    assert trainer.batches_per_epoch == 12 and trainer.steps_per_epoch == 4
    assert len(trainer.schedule) == 4
    trainer.run()
    assert trainer.global_step == 4
    log = (tmp_path / "train_rank0.log").read_text()
    assert "of 4 per device x 1 = 4, 3 batches per optimizer step;" in log
    # lr was tuned for 4 images per step and this run takes 12: the log says so, and lr stays as set
    assert "this run takes 12 (4 per device x 1 device x 3 accumulated)" in log and "--lr 0.15" in log
    assert trainer.schedule == lr_schedule(dataclasses.replace(cfg, lr_global_batch=None), 4)
    assert int(trainer.optimizer.state_dict()["state"][0]["momentum_buffer"].ne(0).any()) == 1


def _scaled_trainer(cfg: Config, mode: str, scale: float, drop: bool) -> Trainer:
    """A float32 run whose loss scale overflows the gradients: the loss-scaling code paths, on a CPU.

    float16 autocast is refused on CPUs, but scaling, overflow detection and skipping do not depend on
    the dtype: a scale of 3e38 overflows float32 gradients just as 65536 overflows float16 ones.
    """
    trainer = Trainer(cfg)
    trainer.precision = Precision(None, mode, scale, drop)
    if mode == "dynamic":
        trainer.scaler = torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=1000)
    return trainer


def test_overflowing_fixed_loss_scale_drops_the_update(tiny_data: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_data, tmp_path / "drop", epoch_size=1, warmup_epochs=0, val_while_train=False)
    trainer = _scaled_trainer(cfg, "fixed", 3e38, drop=True)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items() if "running" not in k}
    trainer.run()
    after = trainer.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.endswith("weight"))  # every update dropped
    assert trainer.global_step == 6  # the steps still count, as in MindSpore
    applied = _scaled_trainer(dataclasses.replace(cfg, ckpt_save_dir=str(tmp_path / "keep")), "fixed", 3e38, False)
    with pytest.raises(TrainingError, match="NaN or infinite at step"):  # MindSpore's default applies it
        applied.run()
    assert list_checkpoints(tmp_path / "keep") == []


def test_dynamic_loss_scale_skips_overflowing_steps_and_recovers(tiny_data: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_data, tmp_path, epoch_size=2, warmup_epochs=0, decay_epochs=4, val_while_train=False)
    trainer = _scaled_trainer(cfg, "dynamic", 2.0**124, drop=False)
    initial = trainer.model.classifier.weight.detach().clone()
    trainer.run()
    assert trainer.scaler.get_scale() < 2.0**124  # halved on each overflow
    weights = trainer.model.state_dict()
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert not torch.equal(initial, weights["classifier.weight"])  # once the scale fits, steps are applied
    assert load_state(list_checkpoints(tmp_path)[-1].state)["scaler"]["scale"] == trainer.scaler.get_scale()


def test_a_note_names_the_cores_torchruns_one_thread_per_process_leaves_idle() -> None:
    note = idle_cores_note(threads=1, processes_here=2, cores=16)
    assert note is not None and "compute with 1 thread each, 2 of its 16 cores" in note
    assert "`OMP_NUM_THREADS=8 torchrun ...`" in note
    assert idle_cores_note(threads=1, processes_here=2, cores=2) is None  # every core busy (this VM under torchrun)
    assert idle_cores_note(threads=8, processes_here=2, cores=16) is None  # OMP_NUM_THREADS set to the share
    assert idle_cores_note(threads=2, processes_here=1, cores=16) is None  # not torchrun's doing: one process
