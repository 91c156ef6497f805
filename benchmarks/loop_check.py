"""Does the training loop's own img/s agree with the bench?

Usage: loop_check.py BENCH.json train_rank0.log [ADJACENT.json]

With no loader workers the loop loads each batch, then trains on it, and logs both its ms/step and the
share of it spent waiting for data.  The batch step (jitter, normalisation) runs after that wait, on the
loaded batch, so the loop's compute rate, ``batch / (ms/step * (1 - data wait))``, must match the bench's
``ours-mindcv-channels-last`` train row (the network train.py trains) plus the batch step's cost per image
(the bench's ``ours-fast`` data row less its ``ours-fast-workers`` row), and its whole rate must match
``1 / (1 / step rate + 1 / data rate)``.  The bench's data rate is per core (one thread); the loop's
in-process loading gives torch's resize both threads, so its data part may be faster.

This machine's speed drifts by a quarter within minutes, for every backend alike (which is why the bench
reports ratios), so ADJACENT.json, a train row measured in the seconds right after the loop, is the
like-for-like comparison of the compute part.
"""

import json
import re
import sys
from pathlib import Path


def step_row(bench: dict) -> dict:
    """The train row of the network train.py trains."""
    return next(r for r in bench["train_rows"] if r["backend"] == "ours-mindcv-channels-last")


def data_row(bench: dict, backend: str) -> dict:
    """The train-split data row of ``backend``."""
    return next(r for r in bench["data_rows"] if r["split"] == "train" and r["backend"] == backend)


def against(row: dict, rate: float) -> str:
    """A bench row's rate and spread, and the loop's ``rate`` over it."""
    low, high = row["spread"]
    bench_rate = row["images_per_second"]
    return f"{bench_rate:.1f} img/s (spread {low:.1f}..{high:.1f}; loop / bench {rate / bench_rate:.2f})"


bench = json.loads(Path(sys.argv[1]).read_text())
step = step_row(bench)
data = data_row(bench, "ours-fast")
workers = data_row(bench, "ours-fast-workers")  # the same without the batch step
batch_step_ms = data["ms_per_image"] - workers["ms_per_image"]  # per image, on one core
expected = 1 / (1 / step["images_per_second"] + 1 / data["images_per_second"])
pattern = r"([0-9.]+) ms/step, ([0-9.]+) img/s, data wait ([0-9]+)%"
ms_per_step, rate, wait = (float(v) for v in re.findall(pattern, Path(sys.argv[2]).read_text())[-1])
batch = rate * ms_per_step / 1000
compute_rate = batch / (ms_per_step * (1 - wait / 100) / 1000)
loop_data_ms = ms_per_step * wait / 100 / batch
with_batch_step = 1 / (1 / step["images_per_second"] + batch_step_ms / 1000)
print(
    f"loop, last epoch: {rate:.1f} img/s ({ms_per_step:.1f} ms/step, {wait:.0f} % waiting for data)\n"
    f"  compute: loop {compute_rate:.1f} img/s, bench step {against(step, compute_rate)}\n"
    f"    with the batch step's {batch_step_ms:.2f} ms/image (the loop runs it after the data wait): "
    f"{with_batch_step:.1f} img/s (loop / bench {compute_rate / with_batch_step:.2f})\n"
    f"  data: loop {loop_data_ms:.2f} ms/image on 2 threads, bench {workers['ms_per_image']:.2f} ms/image per core "
    f"without the batch step\n"
    f"  whole: loop {rate:.1f} img/s, bench's step and per-core data one after the other {expected:.1f} img/s "
    f"(loop / bench {rate / expected:.2f})"
)
if len(sys.argv) > 3:
    near = step_row(json.loads(Path(sys.argv[3]).read_text()))
    print(f"  compute against the bench run right after the loop: {against(near, compute_rate)}")
