"""The training step with BatchNorm in numba's kernels (``bn_kernel``) against the same step in torch's ops.

One process, one network's weights in two copies, the two steps taken in alternating rounds so that the
machine's drift hits both alike; the figure is the median of the per-round ratios.  The "torch ops" step
is what runs where numba is not installed (``batchnorm``'s wide view, the stem's torch-ops backward).
The first steps' losses are printed side by side: the same work, up to float32 rounding.

    python benchmarks/bn_kernel.py [--models shufflenet_v2_x0_5 shufflenet_v2_x1_0] [--rounds 15] [--json F]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import time
from collections.abc import Iterator

import torch

from shufflenetv2 import batchnorm
from shufflenetv2.bench import machine_record
from shufflenetv2.bench_train import as_delivered, batches, step_function
from shufflenetv2.host_memory import keep_freed_memory
from shufflenetv2.model import build_network


@contextlib.contextmanager
def torch_ops() -> Iterator[None]:
    """BatchNorm as it trains without numba, for the duration."""
    kernels = batchnorm.compiled_kernels
    batchnorm.compiled_kernels = lambda: None  # the stem asks through this module too
    try:
        yield
    finally:
        batchnorm.compiled_kernels = kernels


def measure(name: str, batch: int, rounds: int, size: int = 224) -> dict:
    torch.manual_seed(0)
    net = build_network(name).train().to(memory_format=torch.channels_last)
    paths = {"numba": contextlib.nullcontext, "torch ops": torch_ops}
    steps = {path: step_function(copy.deepcopy(net), channels_last=True) for path in paths}
    data = as_delivered(batches(4, batch, size, 1000), channels_last=True)
    losses = {path: [] for path in paths}
    for path, step in steps.items():
        with paths[path]():
            losses[path] = [float(step(*data[i])) for i in range(3)]  # warm-up, numba's compile included
    times = {path: [] for path in paths}
    for r in range(rounds):
        for path, step in steps.items():
            with paths[path]():
                start = time.perf_counter()
                step(*data[r % len(data)])
                times[path].append(time.perf_counter() - start)
    ratios = [t / k for k, t in zip(times["numba"], times["torch ops"], strict=True)]
    return {
        "model": name, "batch": batch, "rounds": rounds,
        "ms_per_step": {path: 1000 * statistics.median(t) for path, t in times.items()},
        "speedup_median_of_rounds": statistics.median(ratios), "speedup_range": [min(ratios), max(ratios)],
        "first_losses": losses,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["shufflenet_v2_x0_5", "shufflenet_v2_x1_0"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    if batchnorm.compiled_kernels() is None:
        raise SystemExit("numba is not installed: pip install 'shufflenetv2[fast-cpu]'")
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as train, validate and bench do
    results = []
    for name in args.models:
        row = measure(name, args.batch, args.rounds)
        ms = row["ms_per_step"]
        low, high = row["speedup_range"]
        print(
            f"{name} batch {args.batch}, {args.threads} threads: numba {ms['numba']:.1f} ms/step, torch ops "
            f"{ms['torch ops']:.1f}; numba {row['speedup_median_of_rounds']:.3f}x faster (median of "
            f"{args.rounds} paired rounds, {low:.3f}-{high:.3f}); first losses "
            + ", ".join(f"{a:.5f}/{b:.5f}" for a, b in zip(*row["first_losses"].values(), strict=True))
        )
        results.append(row)
    if args.json:
        with open(args.json, "w") as f:
            record = {"machine": machine_record(), "threads": args.threads, "torch": torch.__version__, "rows": results}
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
