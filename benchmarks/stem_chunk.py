"""How many images at a time the fused model's stem should take on the CPU (``FusedShuffleNetV2.stem_chunk``).

The stem's convolution writes the largest activation of the network (24 x 112 x 112 floats, 1.2 MB per
image).  At batch 32 that is 38 MB, written to memory and read back by the max-pool; cut into pieces of a
few images, it stays in cache between the two.  This script times the fused model (eager, and frozen as
``fuse(freeze=True)`` builds it) with several piece sizes, taking turns within each round like
``shufflenetv2 bench``, and prints each size's median round and the median of its per-round ratios to the
whole batch at once (``stem_chunk = 0``).

    python benchmarks/stem_chunk.py --json benchmarks/results/cpu_stem_chunk/stem_chunk.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from shufflenetv2 import build_network
from shufflenetv2.bench import interleaved_rounds, machine_record
from shufflenetv2.deploy import FrozenCompiled, FusedShuffleNetV2


def variants(model: torch.nn.Module, chunks: list[int], batch: int) -> dict[str, torch.nn.Module]:
    """One fused model per (form, piece size); sizes at or above the batch would run it whole, like 0."""
    base = FusedShuffleNetV2(model).eval().requires_grad_(False).to(memory_format=torch.channels_last)
    out: dict[str, torch.nn.Module] = {}
    for chunk in [c for c in chunks if c < batch]:
        fused = copy.deepcopy(base)
        fused.stem_chunk = chunk
        out[f"fused/{chunk}"] = fused
        out[f"frozen/{chunk}"] = FrozenCompiled(copy.deepcopy(fused))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["shufflenet_v2_x0_5", "shufflenet_v2_x1_0"])
    parser.add_argument("--batches", nargs="+", type=int, default=[8, 32])
    parser.add_argument("--chunks", nargs="+", type=int, default=[0, 2, 4, 8])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for name in args.models:
        model = build_network(name).eval()
        for batch in args.batches:
            torch._dynamo.reset()  # every frozen variant compiles the same forward
            x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
            x = x.contiguous(memory_format=torch.channels_last)
            modules = variants(model, args.chunks, batch)
            with torch.no_grad():
                expected = model(x)
            runs = []
            for label, module in modules.items():
                with torch.inference_mode():
                    got = module(x)  # also the frozen rows' compilation
                    error = ((got - expected).abs().max() / expected.abs().max()).item()
                    start = time.perf_counter()
                    module(x)
                iterations = max(1, round(0.33 / (time.perf_counter() - start)))
                runs.append((_inference(module, x), iterations))
                print(f"{name} b{batch} {label}: largest logit error {error:.1e} of the largest logit", flush=True)
            rates = dict(zip(modules, interleaved_rounds(runs, batch, args.repeats), strict=True))
            for label, rounds in rates.items():
                form = label.split("/")[0]
                whole = rates[f"{form}/0"]
                ratio = statistics.median(a / b for a, b in zip(rounds, whole, strict=True))
                median = statistics.median(rounds)
                print(f"{name:20s} b{batch:<3d} {label:10s} {median:8.1f} img/s  {ratio:5.2f}x whole batch", flush=True)
                results.append({"model": name, "batch": batch, "variant": label, "images_per_second": median,
                                "ratio_to_whole_batch": ratio, "rounds": rounds})  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        settings = {"threads": args.threads, "repeats": args.repeats, "image_size": 224, "dtype": "float32"}
        record = {"rows": results, "settings": settings, "machine": machine_record()}
        args.json.write_text(json.dumps(record, indent=1) + "\n")


def _inference(module: torch.nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def run() -> object:
        with torch.inference_mode():
            return module(x)

    return run


if __name__ == "__main__":
    main()
