"""Checkpoint writes that fail for real (a full disk, a read-only mount, a file-size limit): one clear
error, exit code 2, and every checkpoint written before stays as it was."""

from __future__ import annotations

import errno
import os
import resource
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from shufflenetv2 import read_weights
from shufflenetv2.checkpoint import list_checkpoints, load_state
from shufflenetv2.cli import main

from .test_train import tiny_data  # noqa: F401 - a fixture

REPO = Path(__file__).resolve().parents[1]


def _snapshot(directory: Path) -> dict[str, bytes]:
    # .run.lock names the run that holds the folder: each run writes its own line there
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file() and p.name != ".run.lock"}


def _cli_args(data: Path, ckpt_dir: Path, out_dir: Path, epochs: int) -> list[str]:
    return [
        "train", "--dataset", "imagefolder", "--data_dir", str(data), "--num_classes", "3", "--image_resize", "16",
        "--batch_size", "8", "--num_parallel_workers", "0", "--epoch_size", str(epochs), "--mode", "1",
        "--opt", "momentum", "--lr", "0.05", "--warmup_epochs", "0", "--val_while_train", "True",
        "--ckpt_save_dir", str(ckpt_dir), "--output_dir", str(out_dir), "--auto_resume", "True",
    ]  # fmt: skip


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 48 MiB tmpfs: writes beyond it fail with ENOSPC from the kernel. Needs CAP_SYS_ADMIN."""
    mount_point = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount_point)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()}); needs root with CAP_SYS_ADMIN")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def _fill(disk: Path, leave: int) -> None:
    """Write a filler file until the disk is full, then free ``leave`` bytes."""
    filler = disk / "filler.bin"
    with open(filler, "wb") as f:
        chunk = b"\0" * (1 << 20)
        try:
            while True:
                f.write(chunk)
                f.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    with open(filler, "r+b") as f:
        f.truncate(max(0, filler.stat().st_size - leave))


def test_full_disk_stops_with_a_clear_error_and_keeps_the_checkpoints(
    tiny_data: Path,  # noqa: F811
    small_disk: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ckpt_dir, out_dir = small_disk / "ckpt", tmp_path / "logs"
    assert main(_cli_args(tiny_data, ckpt_dir, out_dir, epochs=1)) == 0
    before = _snapshot(ckpt_dir)
    (last,) = list_checkpoints(ckpt_dir)
    _fill(small_disk, leave=256 * 1024)  # room for the start-up write test, not for 1.4 MB of weights

    assert main(_cli_args(tiny_data, ckpt_dir, out_dir, epochs=2)) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err
    assert "No space left on device" in errors[0] and "the disk is full" in errors[0]
    assert "Training stopped" in errors[0] and "intact" in errors[0]
    assert _snapshot(ckpt_dir) == before  # not one byte of the earlier checkpoint changed; no partial file left
    read_weights(last.weights), load_state(last.state)

    (small_disk / "filler.bin").unlink()  # space again: the run continues from the same checkpoint
    assert main(_cli_args(tiny_data, ckpt_dir, out_dir, epochs=2)) == 0
    assert [r.epoch for r in list_checkpoints(ckpt_dir)] == [1, 2]


def test_read_only_folder_is_refused_before_training(
    tiny_data: Path,  # noqa: F811
    small_disk: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ckpt_dir = small_disk / "ckpt"
    assert main(_cli_args(tiny_data, ckpt_dir, tmp_path / "logs", epochs=1)) == 0
    before = _snapshot(ckpt_dir)
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    try:
        assert main(_cli_args(tiny_data, ckpt_dir, tmp_path / "logs2", epochs=2)) == 2
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
    err = capsys.readouterr().err
    assert "Read-only file system" in err and "mounted read-only" in err and "Traceback" not in err
    assert "ckpt_save_dir" in err
    assert not (tmp_path / "logs2" / "metrics.jsonl").exists()  # refused before any work
    assert _snapshot(ckpt_dir) == before


def _limit_file_size(limit: int) -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG


def test_file_size_limit_is_a_clear_error_without_root(tiny_data: Path, tmp_path: Path) -> None:  # noqa: F811
    """RLIMIT_FSIZE makes the kernel refuse large writes for any user: the same code path as a full disk."""
    ckpt_dir = tmp_path / "ckpt"
    assert main(_cli_args(tiny_data, ckpt_dir, tmp_path / "logs", epochs=1)) == 0
    before = _snapshot(ckpt_dir)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "shufflenetv2", *_cli_args(tiny_data, ckpt_dir, tmp_path / "logs", epochs=2)]
    done = subprocess.run(
        args, capture_output=True, text=True, env=env, timeout=300, preexec_fn=lambda: _limit_file_size(1 << 20)
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "File too large" in done.stderr and "ulimit -f" in done.stderr and "Traceback" not in done.stderr
    assert _snapshot(ckpt_dir) == before


@pytest.mark.parametrize("target", ["model.onnx", "model.pt2", "model.ckpt"])
def test_export_and_convert_that_cannot_write_keep_the_earlier_file(target: str, tmp_path: Path) -> None:
    """A second export (or convert) over a good file, into a disk that takes only 200 KB: exit 2 with the
    reason, and the earlier file byte for byte as it was (torch's writers used to leave 200 KB of it)."""
    if target.endswith(".onnx"):
        pytest.importorskip("onnx")
    from shufflenetv2 import create_model, save_weights

    weights = save_weights(tmp_path / "w.safetensors", create_model("shufflenet_v2_x0_5", num_classes=3))
    command = "convert" if target.endswith(".ckpt") else "export"
    out = tmp_path / "out"
    out.mkdir()
    args = [sys.executable, "-m", "shufflenetv2", command, str(weights), str(out / target)]
    first = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    before = _snapshot(out)
    assert len(before[target]) > 1 << 20
    done = subprocess.run(
        args, capture_output=True, text=True, timeout=300, preexec_fn=lambda: _limit_file_size(200_000)
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "cannot write the " in done.stderr and "File too large" in done.stderr and "ulimit -f" in done.stderr
    assert "Traceback" not in done.stderr
    assert _snapshot(out) == before  # no partial file, no temporary file left beside it
