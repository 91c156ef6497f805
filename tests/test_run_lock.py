"""One training run per folder: a second run into a folder in use stops before it touches anything.

Without the lock, two runs in one folder failed at random (one removed the other's write probe) or,
started a little apart, the second removed the first's saves in flight as "left by an interrupted save"
and both wrote checkpoints and records into one another's."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from shufflenetv2.engine import Trainer, train
from shufflenetv2.errors import DataError, DirectoryInUse
from shufflenetv2.fileio import lock_run_directory

from .test_train import tiny_config, tiny_data  # noqa: F401 - tiny_data is a fixture

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="flock is POSIX")

# Holds the lock on argv[1] the way a training run does, prints its pid, then waits to be killed.
HOLDER = """
import sys, time
from shufflenetv2.fileio import lock_run_directory
lock = lock_run_directory(sys.argv[1])
print("holding", flush=True)
time.sleep(600)
"""


def hold_in_another_process(folder: Path) -> subprocess.Popen:
    folder.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
    return holder


def test_a_second_run_into_a_folder_in_use_stops_and_touches_nothing(tiny_data: Path, tmp_path: Path) -> None:  # noqa: F811
    out = tmp_path / "run"
    holder = hold_in_another_process(out)
    in_flight = out / ".shufflenet_v2_x0_5-3_12.safetensors.abc123.tmp"  # the other run's save, half written
    in_flight.write_bytes(b"half")
    try:
        with pytest.raises(DirectoryInUse) as info:
            train(tiny_config(tiny_data, out, epoch_size=1))
        message = str(info.value)
        assert f"{out.resolve()} is in use by another training run (pid {holder.pid} on " in message
        assert "another ckpt_save_dir" in message
        assert in_flight.read_bytes() == b"half"  # not taken for the leftover of an interrupted save
        assert sorted(p.name for p in out.iterdir()) == [".run.lock", in_flight.name]  # no log, config or record
    finally:
        holder.kill()
        holder.wait()
    result = train(tiny_config(tiny_data, out, epoch_size=1))  # the kernel dropped the killed holder's lock
    assert result.epochs == 1
    assert f"pid {os.getpid()} on " in (out / ".run.lock").read_text()


def test_the_command_line_exits_2_with_the_holder_named(tiny_data: Path, tmp_path: Path) -> None:  # noqa: F811
    out = tmp_path / "run"
    holder = hold_in_another_process(out)
    try:
        command = [sys.executable, str(REPO / "train.py"), "--dataset", "imagefolder", "--data_dir", str(tiny_data),
                   "--num_classes", "3", "--mode", "1", "--ckpt_save_dir", str(out)]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"error: {out.resolve()} is in use by another training run (pid {holder.pid} ")


def test_a_run_holds_its_folders_until_it_ends_and_a_failed_start_holds_none(
    tiny_data: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    first = Trainer(tiny_config(tiny_data, tmp_path / "ckpt", output_dir=str(tmp_path / "out"), epoch_size=1))
    for folder in ("ckpt", "out"):  # both folders it writes, each refused to a second run
        with pytest.raises(DirectoryInUse, match=re.escape(f"{tmp_path / folder} is in use")):
            lock_run_directory(tmp_path / folder)
    first.run()
    for folder in ("ckpt", "out"):
        lock_run_directory(tmp_path / folder).release()  # released when the run ended

    bad = tiny_config(tiny_data, tmp_path / "again", data_dir=str(tmp_path / "no-such-data"))
    with pytest.raises(DataError):
        Trainer(bad)
    lock_run_directory(tmp_path / "again").release()  # even while the failed trainer's traceback is alive


# Holds the lock, forks a child that sleeps (as a DataLoader worker would, for a while after its parent
# dies), prints the child's pid, then waits to be killed.
FORKING_HOLDER = """
import os, sys, time
from shufflenetv2.fileio import lock_run_directory
lock = lock_run_directory(sys.argv[1])
child = os.fork()
if child == 0:
    time.sleep(120)
    os._exit(0)
print(child, flush=True)
time.sleep(600)
"""


def test_a_killed_runs_forked_children_do_not_keep_its_folder(tmp_path: Path) -> None:
    command = [sys.executable, "-c", FORKING_HOLDER, str(tmp_path)]
    holder = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None
    child = int(holder.stdout.readline())
    try:
        with pytest.raises(DirectoryInUse):
            lock_run_directory(tmp_path)
        holder.kill()
        holder.wait()
        os.kill(child, 0)  # the child lives on, with its copy of the parent's files
        lock_run_directory(tmp_path).release()  # but not with the lock
    finally:
        os.kill(child, signal.SIGKILL)
