"""Distributed faults under torchrun (2 gloo processes on CPU): a worker killed mid-epoch makes torchrun
restart the job, which resumes from the last checkpoint and ends where an unbroken job ends; a SIGTERM
to one rank stops every rank at the same step with one checkpoint."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from shufflenetv2.checkpoint import list_checkpoints, load_state
from shufflenetv2.interrupt import EXIT_INTERRUPTED

from .conftest import built_once
from .test_train import final_weights, tiny_config, tiny_data  # noqa: F401 - tiny_data is a fixture

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
pytestmark = pytest.mark.slow


def _config(data: Path, out: Path, path: Path) -> Path:
    cfg = tiny_config(
        data, out, epoch_size=3, batch_size=4, log_interval=1, ckpt_save_steps=2, auto_resume=True, sync_bn=True
    )
    values = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}
    path.write_text(yaml.safe_dump(values))
    return path


def _torchrun(config: Path, *extra: str) -> list[str]:
    """``--standalone``: torchrun's c10d rendezvous on a port it finds free.  Restarts need it (with
    ``--master_port`` a restarted worker can read its predecessors' addresses from the reused store), and a
    fixed port collides with another test's torchrun under pytest-xdist (EADDRINUSE)."""
    return [str(TORCHRUN), "--nproc_per_node", "2", "--standalone", *extra, str(REPO / "train.py"), "-c", str(config)]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _worker_pid(parent: int, rank: int) -> int:
    """The pid of torchrun's child process that runs ``rank``, found through /proc."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    raise AssertionError(f"no rank {rank} process under torchrun {parent}")


def _wait_for(log: Path, text: str, process: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while text not in (log.read_text() if log.exists() else ""):
        assert process.poll() is None, f"torchrun ended before {text!r}: {process.communicate()}"
        assert time.monotonic() < deadline, f"no {text!r} in {log} after {timeout} s"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def unbroken(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    """The run without faults, once per session (``built_once``; tiny_data is the same in every worker)."""

    def build(folder: Path) -> None:
        config = _config(tiny_data, folder / "run", folder / "unbroken.yaml")
        done = subprocess.run(_torchrun(config), env=_env(), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]

    return built_once(tmp_path_factory, "unbroken_ddp", build) / "run"


def test_killed_worker_restarts_and_resumes_from_the_last_checkpoint(
    tiny_data: Path,  # noqa: F811
    unbroken: Path,
    tmp_path: Path,
) -> None:
    out = tmp_path / "run"
    config = _config(tiny_data, out, tmp_path / "run.yaml")
    process = subprocess.Popen(
        _torchrun(config, "--max-restarts", "2", "--monitor-interval", "0.2"),
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    _wait_for(out / "train_rank1.log", "Epoch: [2/3], batch: [5/6]", process)  # mid-epoch, after an interim save
    victim = _worker_pid(process.pid, rank=1)
    os.kill(victim, signal.SIGKILL)
    _, stderr = process.communicate(timeout=300)
    (tmp_path / "torchrun.stderr").write_text(stderr)
    assert process.returncode == 0, stderr[-3000:]
    log = (out / "train_rank0.log").read_text()
    assert "resumed from" in log and "after epoch 2, batch 4" in log  # the interim checkpoint before the kill
    assert "Signals.SIGKILL" in stderr or "exitcode: -9" in stderr  # torchrun saw the kill and restarted
    a, b = final_weights(unbroken), final_weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_to_one_rank_stops_all_ranks_at_the_same_step(
    tiny_data: Path,  # noqa: F811
    unbroken: Path,
    tmp_path: Path,
) -> None:
    out = tmp_path / "run"
    config = _config(tiny_data, out, tmp_path / "run.yaml")
    process = subprocess.Popen(_torchrun(config), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)  # fmt: skip
    _wait_for(out / "train_rank0.log", "Epoch: [1/3], batch: [3/6]", process)
    os.kill(_worker_pid(process.pid, rank=1), signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode != 0  # torchrun reports the workers' non-zero exit
    assert f"exitcode  : {EXIT_INTERRUPTED}" in stderr or f"exitcode: {EXIT_INTERRUPTED}" in stderr, stderr[-3000:]
    saved = list_checkpoints(out)[-1]
    state = load_state(saved.state)
    logged = [
        sum("batch: [" in line for line in (out / f"train_rank{rank}.log").read_text().splitlines()) for rank in (0, 1)
    ]
    # both ranks stopped after the same optimizer step (the vote), saved before that step's log line
    assert logged[0] == logged[1] == state["global_step"] - 1
    assert len(state["rng"]) == 2 and "stopped by a signal on another rank" in stderr

    resumed = subprocess.run(_torchrun(config), env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = final_weights(unbroken), final_weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
