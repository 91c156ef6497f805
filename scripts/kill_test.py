"""Kill test: SIGKILL a training run at random moments, restart it with auto_resume each time, and check
that nothing saved was ever partial and that the final weights equal an uninterrupted run's, bit for bit.

    python scripts/kill_test.py                       # 12 kills (the figures in the README)
    python scripts/kill_test.py --kills 25 --seed 1   # more
    python scripts/kill_test.py --kills 10 --quick    # the reduced form CI runs (tests/test_kill.py)

The run is real: ``python -m shufflenetv2 train`` in a subprocess, on a generated image folder, with
DataLoader workers, EMA, interim checkpoints every 2 optimizer steps, and validation every epoch.
Kills are timed from the moment the restarted process logs that training began, uniformly over about
one epoch, so they land in training steps, loader start-up, validation and checkpoint writes alike.
After every kill, every checkpoint file on disk is opened and read in full.  The final comparison
covers the network weights, the EMA weights, the optimizer state and the per-epoch losses.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from shufflenetv2.checkpoint import STATE_SUFFIX, list_checkpoints, load_state  # noqa: E402
from shufflenetv2.weights import read_weights  # noqa: E402


def make_dataset(root: Path, per_class: int, seed: int = 0) -> None:
    """Three classes of noisy coloured squares with a class-specific stripe (learnable in a few steps)."""
    rng = np.random.default_rng(seed)
    colours = [(40, 60, 200), (40, 180, 60), (210, 40, 40)]
    for split, count in (("train", per_class), ("val", max(2, per_class // 4))):
        for c, rgb in enumerate(colours):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = np.clip(np.array(rgb) + rng.integers(-40, 40, (24, 24, 3)), 0, 255).astype(np.uint8)
                pixels[4 + 6 * c : 8 + 6 * c] = 255
                Image.fromarray(pixels).save(folder / f"{i}.png")


def write_config(path: Path, data: Path, out: Path, epochs: int, workers: int) -> None:
    config = {
        "mode": 1, "dataset": "imagefolder", "data_dir": str(data), "num_classes": 3, "image_resize": 16,
        "batch_size": 8, "num_parallel_workers": workers, "epoch_size": epochs, "val_while_train": True,
        "ckpt_save_dir": str(out), "ckpt_save_steps": 2, "keep_checkpoint_max": 3, "log_interval": 1,
        "opt": "momentum", "lr": 0.05, "warmup_epochs": 1, "decay_epochs": epochs, "min_lr": 0.0,
        "scale": [0.5, 1.0], "hflip": 0.5, "color_jitter": 0.2, "ema": True, "ema_decay": 0.9,
        "label_smoothing": 0.1, "weight_decay": 1e-4, "seed": 5, "auto_resume": True,
    }  # fmt: skip
    path.write_text(yaml.safe_dump(config))


def command(config: Path) -> list[str]:
    return [sys.executable, "-m", "shufflenetv2", "train", "--config", str(config)]


def environment() -> dict[str, str]:
    # the same thread count in every process: float sums in another order would differ in the last bit
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def audit(directory: Path) -> dict[str, int]:
    """Open and fully read every checkpoint file on disk; any failure is a lost or partial save."""
    counts = {"weights_files": 0, "state_files": 0, "temporary_files": 0}
    for path in sorted(directory.iterdir()):
        if path.name.startswith(".") and path.name.endswith(".tmp"):
            counts["temporary_files"] += 1  # an interrupted atomic write: never under a checkpoint's name
        elif path.name.endswith(".safetensors"):
            tensors = read_weights(path).tensors
            assert tensors and all(torch.isfinite(t.float()).all() for t in tensors.values()), path
            counts["weights_files"] += 1
        elif path.name.endswith(STATE_SUFFIX):
            load_state(path)
            counts["state_files"] += 1
        elif path.name == "checkpoints.json":
            json.loads(path.read_text())
    for ref in list_checkpoints(directory):  # every complete checkpoint resumes: both halves readable
        read_weights(ref.weights)
        load_state(ref.state)
    return counts


def wait_for_training(log: Path, start_size: int, process: subprocess.Popen, timeout: float = 120) -> bool:
    """True once the process has logged past ``start_size`` bytes (it is training), False if it ended."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        if log.exists() and log.stat().st_size > start_size:
            return True
        time.sleep(0.01)
    raise TimeoutError(f"no training progress in {timeout} s; see {log}")


def phase(last_line: str) -> str:
    """Where the process was, judged by the last line it logged before the kill."""
    if "batch: [" in last_line:
        return "training steps"
    if "validation:" in last_line:
        return "after validation (saving, or starting the next epoch)"
    return "start-up (resuming, starting loader workers)"


def final_state(directory: Path) -> dict[str, object]:
    last = list_checkpoints(directory)[-1]
    metrics = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
    return {
        "checkpoint": last,
        "weights": read_weights(last.weights).tensors,
        "ema": read_weights(last.ema).tensors,
        "optimizer": load_state(last.state)["optimizer"],
        "losses": [(row["epoch"], row["train_loss"], row.get("top1")) for row in metrics],
    }


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def same_optimizer(a: dict, b: dict) -> bool:
    return (
        all(
            same_tensors(
                {k: v for k, v in a["state"][i].items() if torch.is_tensor(v)},
                {k: v for k, v in b["state"][i].items() if torch.is_tensor(v)},
            )
            for i in a["state"]
        )
        and a["state"].keys() == b["state"].keys()
    )


def run(args: argparse.Namespace) -> dict[str, object]:
    work = Path(args.work)
    data, reference, killed = work / "data", work / "reference", work / "killed"
    for folder in (reference, killed):
        if folder.exists():
            raise SystemExit(f"{folder} exists: use an empty --work folder")
    make_dataset(data, per_class=args.per_class)
    for name, out in (("reference", reference), ("killed", killed)):
        write_config(work / f"{name}.yaml", data, out, args.epochs, args.workers)

    start = time.perf_counter()
    process = subprocess.Popen(
        command(work / "reference.yaml"),
        env=environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_training(reference / "train_rank0.log", 0, process)
    logging_from = time.perf_counter()
    _, stderr = process.communicate()
    if process.returncode != 0:
        raise SystemExit(f"the uninterrupted run failed:\n{stderr}")
    reference_seconds = time.perf_counter() - start
    # each restart should get a little further: kills land within 1.5/kills of the logged part of a run
    window = args.window or 1.5 * (time.perf_counter() - logging_from) / max(args.kills, 1)
    batches = sum(1 for _ in (data / "train").rglob("*.png")) // 8
    print(
        f"uninterrupted run: {args.epochs} epochs x {batches} steps in {reference_seconds:.1f} s; "
        f"kills land 0-{window:.1f} s after a process logs its first line"
    )

    rng = random.Random(args.seed)
    log = killed / "train_rank0.log"
    kills: list[dict[str, object]] = []
    restarts = 0
    while True:
        size = log.stat().st_size if log.exists() else 0
        process = subprocess.Popen(
            command(work / "killed.yaml"), env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        restarts += 1
        if len(kills) < args.kills and wait_for_training(log, size, process):
            time.sleep(rng.uniform(0, window))
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                process.wait()
                tail = log.read_text().splitlines()[-1] if log.exists() else ""
                counts = audit(killed)
                kills.append({"phase": phase(tail), "after_log_line": tail[20:120], **counts})
                print(f"kill {len(kills):2d} ({phase(tail)}): after {tail[20:100]!r}; on disk {counts}")
                continue
        _, stderr = process.communicate()  # enough kills, or the run finished first: let it complete
        if process.returncode != 0:
            raise SystemExit(f"a resumed run failed (exit {process.returncode}):\n{stderr}")
        break

    audit(killed)
    a, b = final_state(reference), final_state(killed)
    checks = {
        "weights_bit_identical": same_tensors(a["weights"], b["weights"]),
        "ema_bit_identical": same_tensors(a["ema"], b["ema"]),
        "optimizer_state_bit_identical": same_optimizer(a["optimizer"], b["optimizer"]),
        "epoch_losses_identical": a["losses"] == b["losses"],
        "same_final_checkpoint": a["checkpoint"].stem.name == b["checkpoint"].stem.name,
    }
    summary = {
        "kills": len(kills),
        "processes_started": restarts,
        "epochs": args.epochs,
        "steps_per_epoch": batches,
        "loader_workers": args.workers,
        "uninterrupted_seconds": round(reference_seconds, 1),
        "temporary_files_seen_after_kills": sum(int(k["temporary_files"]) for k in kills),
        "kills_by_phase": dict(Counter(str(k["phase"]) for k in kills)),
        "checks": checks,
        "kill_log": kills,
        "command": " ".join(["python", "scripts/kill_test.py", *sys.argv[1:]]),
        "torch": torch.__version__,
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "kill_log"}, indent=1))
    if len(kills) < args.kills:
        raise SystemExit(f"only {len(kills)} of {args.kills} kills landed before the run finished; use more --epochs")
    if not all(checks.values()):
        raise SystemExit(f"FAILED: {[k for k, ok in checks.items() if not ok]}")
    print(f"PASSED: {len(kills)} kills, every file on disk readable after each, final state bit-identical")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--per-class", type=int, default=48, help="training images per class (3 classes)")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers in the killed process")
    parser.add_argument("--window", type=float, help="kill within this many seconds of start (default: adaptive)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill moments")
    parser.add_argument("--work", default="runs/kill_test", help="an empty folder for data and runs")
    parser.add_argument("--json", help="also write the summary here")
    parser.add_argument("--quick", action="store_true", help="CI's reduced form: 3 epochs, 32 images per class")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.per_class = 3, 32
    summary = run(args)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
