"""The fast pipeline's CPU batch step alone: numba's compiled loop against torch's ops, paired per round.

The batch step (colour jitter, normalisation, layout; ``pipeline.BatchTransform``) runs once per batch
in the training process.  This times it on one thread at batch 32, 224 px, on uint8 batches collated
as the loader's are (HWC rows, so channels_last), with and without jitter and for both output layouts,
the two implementations taking turns within each round; glibc keeps freed memory as in ``bench``
(``host_memory``), so the 19 MB output is not faulted in afresh every call.  The first (compiling or
cache-loading) call is excluded.

    python benchmarks/batch_step.py [ROUNDS]
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from shufflenetv2.config import Config
from shufflenetv2.host_memory import keep_freed_memory
from shufflenetv2.pipeline import BatchTransform, compiled_batch_step, params_vector

BATCH, SIZE = 32, 224


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, 256, (BATCH, SIZE, SIZE, 3), dtype=torch.uint8, generator=generator)
    params = [
        params_vector(
            (0.6 + 0.8 * torch.rand(3, generator=generator)).tolist(),
            torch.randperm(3, generator=generator).tolist(),
            (0, 0, 0, 0),
        )
        for _ in range(BATCH)
    ]
    return rows.permute(0, 3, 1, 2), torch.stack(params)


def per_image_ms(step: BatchTransform, images: torch.Tensor, params: torch.Tensor) -> float:
    start = time.perf_counter()
    step(images, params)
    return (time.perf_counter() - start) * 1000 / BATCH


def main(rounds: int) -> None:
    if compiled_batch_step() is None:
        sys.exit("numba is not installed: pip install 'shufflenetv2[fast-cpu]'")
    keep_freed_memory()
    torch.set_num_threads(1)
    images, params = batch()
    print(f"batch step, ms per {SIZE}-px image at batch {BATCH}, 1 thread, median of {rounds} paired rounds")
    print("| jitter | output layout | numba | torch ops | torch / numba |")
    print("|---|---|---|---|---|")
    for jitter in (0.4, None):
        for channels_last in (True, False):
            cfg = Config(image_resize=SIZE, color_jitter=jitter, channels_last=channels_last)
            steps = [BatchTransform(cfg, train=True, compiled=compiled) for compiled in (True, False)]
            for step in steps:
                step(images, params)  # numba compiles or loads its cache here
            times: list[list[float]] = [[], []]
            for _ in range(rounds):
                for index, step in enumerate(steps):
                    times[index].append(per_image_ms(step, images, params))
            ratio = statistics.median(t / c for c, t in zip(*times, strict=True))
            compiled_ms, torch_ms = (statistics.median(t) for t in times)
            layout = "channels_last" if channels_last else "NCHW"
            print(f"| {jitter} | {layout} | {compiled_ms:.3f} | {torch_ms:.3f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 15)
