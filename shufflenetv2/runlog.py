"""What a run leaves behind for people and programs: MindCV's ``result.log``, ``metrics.jsonl``,
``curves.png`` and per-rank text logs."""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

RESULT_COLUMNS = ("Epoch", "TrainLoss", "Top_1_Accuracy", "Top_5_Accuracy", "TrainTime", "EvalTime", "TotalTime")


def setup_logger(run_dir: Path, rank: int) -> logging.Logger:
    """Every rank writes its own file; only rank 0 also prints."""
    logger = logging.getLogger(f"shufflenetv2.train.rank{rank}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    run_dir.mkdir(parents=True, exist_ok=True)
    file_handler = logging.FileHandler(run_dir / f"train_rank{rank}.log")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    logger.addHandler(file_handler)
    if rank == 0:
        console = logging.StreamHandler(sys.stdout)
        console.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(console)
    return logger


class RunRecord:
    """Appends one row per epoch to result.log and metrics.jsonl (rank 0 only)."""

    def __init__(self, run_dir: Path, resume: bool) -> None:
        self.result_log = run_dir / "result.log"
        self.metrics = run_dir / "metrics.jsonl"
        if not resume or not self.result_log.exists():
            self.result_log.write_text("\t".join(RESULT_COLUMNS) + "\n")
            self.metrics.write_text("")

    def add(self, row: dict[str, Any]) -> None:
        def fmt(value: Any, spec: str) -> str:
            return "nan" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)

        cells = [
            str(row["epoch"]),
            fmt(row["train_loss"], ".7f"),
            fmt(row.get("top1"), ".4f"),
            fmt(row.get("top5"), ".4f"),
            fmt(row["train_time"], ".2f"),
            fmt(row.get("eval_time", 0.0), ".2f"),
            fmt(row["total_time"], ".2f"),
        ]
        with open(self.result_log, "a") as f:
            f.write("\t".join(cells) + "\n")
        with open(self.metrics, "a") as f:
            f.write(json.dumps(row) + "\n")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(metrics_path: Path, out: Path) -> Path | None:
    """loss, learning rate and top-1/top-5 per epoch; None when matplotlib is missing."""
    rows = read_metrics(metrics_path)
    if not rows:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    epochs = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    ax.plot(epochs, [r["train_loss"] for r in rows], "o-", label="train loss")
    if any(r.get("val_loss") is not None for r in rows):
        ax.plot(epochs, [r.get("val_loss") for r in rows], "s-", label="val loss")
    ax.set(title="loss (log scale)", xlabel="epoch")
    ax.set_yscale("log")  # early validation losses can be 1000x the final ones while BN statistics settle
    ax.legend()
    ax = axes[1]
    ax.plot(epochs, [r["lr"] for r in rows], "o-", color="tab:green", label="lr at epoch end")
    ax.set(title="learning rate", xlabel="epoch")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax = axes[2]
    if any(r.get("top1") is not None for r in rows):
        ax.plot(epochs, [100 * r["top1"] if r.get("top1") is not None else None for r in rows], "o-", label="top-1")
        ax.plot(epochs, [100 * r["top5"] if r.get("top5") is not None else None for r in rows], "s--", label="top-5")
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no validation\n(val_while_train False)", ha="center", va="center", transform=ax.transAxes)
    ax.set(title="validation accuracy (%)", xlabel="epoch")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
