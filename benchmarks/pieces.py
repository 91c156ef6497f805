"""How many images at a time the fused model should take on the CPU: the whole network
(``FusedShuffleNetV2.batch_piece``) and its stem (``stem_chunk``).

The stem's convolution writes the largest activation of the network (24 x 112 x 112 floats, 1.2 MB per
image).  At batch 32 that is 38 MB, written to memory and read back by the max-pool; cut into pieces of a
few images, it stays in cache between the two.  Past some batch size the other layers' activations
outgrow the cache too.  This script times the fused model (eager, and frozen as ``fuse(freeze=True)``
builds it) with several (batch piece, stem piece) pairs, written ``PIECE/CHUNK`` (0: the whole batch),
taking turns within each round like ``shufflenetv2 bench``, and prints each variant's median round and
the median of its per-round ratios to the first variant.

    python benchmarks/pieces.py --variants 0/0 0/4 16/4 32/4 --batches 32 64 --json out.json
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
from shufflenetv2.host_memory import keep_freed_memory


def variants(model: torch.nn.Module, pairs: list[tuple[int, int]], batch: int) -> dict[str, torch.nn.Module]:
    """One fused model per (form, batch piece, stem piece), leaving out a pair that cuts the batch as an
    earlier one does (pieces of the batch or more cut nothing)."""
    base = FusedShuffleNetV2(model).eval().requires_grad_(False).to(memory_format=torch.channels_last)
    out: dict[str, torch.nn.Module] = {}
    seen = set()
    for piece, chunk in pairs:
        whole = piece if 0 < piece < batch else batch
        cuts = (whole, chunk if 0 < chunk < whole else whole)
        if cuts in seen:
            continue
        seen.add(cuts)
        for form in ("fused", "frozen"):
            fused = copy.deepcopy(base)
            fused.batch_piece, fused.stem_chunk = piece, chunk
            out[f"{form}/{piece}/{chunk}"] = FrozenCompiled(fused) if form == "frozen" else fused
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["shufflenet_v2_x0_5", "shufflenet_v2_x1_0"])
    parser.add_argument("--batches", nargs="+", type=int, default=[8, 32])
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["0/0", "0/4", "32/4", "16/4", "8/4"],
        help="PIECE/CHUNK pairs, images per piece of the network and of its stem (0: whole batch)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--malloc", choices=["reuse", "default"], default="reuse",
                        help="reuse: glibc keeps freed memory, as bench and training set it (host_memory); "
                        "default: malloc as a plain Python process has it, which maps every block over its "
                        "threshold afresh")  # fmt: skip
    args = parser.parse_args()
    reuse = args.malloc == "reuse" and keep_freed_memory()
    torch.set_num_threads(args.threads)
    results = []
    for name in args.models:
        model = build_network(name).eval()
        for batch in args.batches:
            torch._dynamo.reset()  # every frozen variant compiles the same forward
            x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
            x = x.contiguous(memory_format=torch.channels_last)
            pairs = [tuple(int(n) for n in v.split("/")) for v in args.variants]
            modules = variants(model, pairs, batch)
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
            baseline = args.variants[0]
            for label, rounds in rates.items():
                first = rates[f"{label.split('/')[0]}/{baseline}"]
                ratio = statistics.median(a / b for a, b in zip(rounds, first, strict=True))
                median = statistics.median(rounds)
                print(f"{name:20s} b{batch:<3d} {label:12s} {median:8.1f} img/s  {ratio:5.2f}x {baseline}", flush=True)
                results.append({"model": name, "batch": batch, "variant": label, "images_per_second": median,
                                "ratio_to_baseline": ratio, "baseline": baseline, "rounds": rounds})  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        settings = {"threads": args.threads, "repeats": args.repeats, "image_size": 224, "dtype": "float32",
                    "malloc": "glibc keeps freed memory (host_memory)" if reuse else "as configured"}  # fmt: skip
        record = {"rows": results, "settings": settings, "machine": machine_record()}
        args.json.write_text(json.dumps(record, indent=1) + "\n")


def _inference(module: torch.nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def run() -> object:
        with torch.inference_mode():
            return module(x)

    return run


if __name__ == "__main__":
    main()
