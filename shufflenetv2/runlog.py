"""What a run leaves behind for people and programs: MindCV's ``result.log``, ``metrics.jsonl``,
``curves.png`` and per-rank text logs."""

from __future__ import annotations

import json
import logging
import math
import sys
from functools import partial
from pathlib import Path
from typing import Any

from .fileio import atomic_path

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
    file_handler = _QuietFileHandler(run_dir / f"train_rank{rank}.log")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    logger.addHandler(file_handler)
    if rank == 0:  # progress to stdout, warnings to stderr
        console = logging.StreamHandler(sys.stdout)
        console.addFilter(lambda record: record.levelno < logging.WARNING)
        problems = logging.StreamHandler(sys.stderr)
        problems.setLevel(logging.WARNING)
        for handler in (console, problems):
            handler.setFormatter(logging.Formatter("%(message)s"))
            logger.addHandler(handler)
    return logger


class _QuietFileHandler(logging.FileHandler):
    """When the log file cannot be written (a full disk), say so once instead of a traceback per line."""

    failed = False

    def handleError(self, record: logging.LogRecord) -> None:
        if not self.failed:
            self.failed = True
            error = sys.exc_info()[1]
            print(
                f"warning: cannot write {self.baseFilename} ({error}); messages go to the console only", file=sys.stderr
            )


class RunRecord:
    """Appends one row per epoch to result.log and metrics.jsonl (rank 0 only).

    A resumed run (``resume_after`` = the epochs its checkpoint had completed) keeps the rows up to
    that epoch and drops later ones, which a crash may have written before its checkpoint; the
    files are rewritten from metrics.jsonl, so a line cut short by a kill disappears too.
    """

    def __init__(self, run_dir: Path, resume_after: int | None) -> None:
        self.result_log = run_dir / "result.log"
        self.metrics = run_dir / "metrics.jsonl"
        rows = [r for r in read_metrics(self.metrics) if r["epoch"] <= resume_after] if resume_after else []
        with atomic_path(self.metrics) as tmp:
            tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
        with atomic_path(self.result_log) as tmp:
            tmp.write_text("".join(line + "\n" for line in ["\t".join(RESULT_COLUMNS), *map(_result_line, rows)]))

    def add(self, row: dict[str, Any]) -> None:
        with open(self.result_log, "a") as f:
            f.write(_result_line(row) + "\n")
        with open(self.metrics, "a") as f:
            f.write(json.dumps(row) + "\n")


def _result_line(row: dict[str, Any]) -> str:
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
    return "\t".join(cells)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of metrics.jsonl; a line cut short (a kill while appending) is left out."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("epoch"), int):
            rows.append(row)
    return rows


def _minor_label(ax: Any, value: float, _position: int) -> str:
    """Losses often stay within one decade (2 down to 0.8), where a log axis labels one tick or none: there
    the 2s, 3s and 5s of each decade are labelled too, and within a factor of 3 every tick."""
    low, high = ax.get_ylim()
    if low <= 0 or high / low >= 10:
        return ""
    mantissa = round(value / 10 ** math.floor(math.log10(value) + 1e-9))
    return f"{value:g}" if high / low < 3 or mantissa in (2, 3, 5) else ""


def plot_curves(metrics_path: Path, out: Path) -> Path | None:
    """loss, learning rate and top-1/top-5 per epoch; None when matplotlib is missing."""
    rows = read_metrics(metrics_path)
    if not rows:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib import ticker
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
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))  # 1, not 10^0
    ax.yaxis.set_minor_formatter(ticker.FuncFormatter(partial(_minor_label, ax)))
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
        ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))  # epochs: no tick at 2.5
    fig.tight_layout()
    with atomic_path(out) as tmp:  # a kill while drawing must not leave half a PNG
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return out
