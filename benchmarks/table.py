"""The README's performance tables, printed as Markdown from the committed JSON results.

    python benchmarks/table.py [benchmarks/results/cpu/bench.json] [benchmarks/results/mindcv_cpu.json]

Ratios are taken only between rows of one file (one run); MindCV's rows come from their own run, with
torchvision measured beside them, so MindCV is compared through that run's torchvision row.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

MODELS = {"shufflenet_v2_x0_5": "x0.5", "shufflenet_v2_x1_0": "x1.0"}


def inference(bench: dict) -> None:
    rate = {(r["model"], r["batch"], r["backend"]): r["images_per_second"] for r in bench["rows"]}
    backends = ["ours-eager", "ours-fused", "ours-fused-compiled", "ours-onnxruntime",
                "torchvision-eager", "torchvision-compiled", "torchvision-onnxruntime"]  # fmt: skip
    print("| img/s | " + " | ".join(backends) + " | fused / tv eager | best ours / tv ONNX Runtime |")
    print("|---" * (len(backends) + 3) + "|")
    for model, batch in sorted({(m, b) for m, b, _ in rate}):
        row = [rate.get((model, batch, b)) for b in backends]
        ours_torch = max(rate[(model, batch, "ours-fused")], rate[(model, batch, "ours-fused-compiled")])
        best = max(v for k, v in rate.items() if k[:2] == (model, batch) and k[2].startswith("ours"))
        cells = " | ".join(f"{v:.1f}" if v else "" for v in row)
        tv_eager, tv_ort = rate[(model, batch, "torchvision-eager")], rate[(model, batch, "torchvision-onnxruntime")]
        print(f"| {MODELS[model]} b{batch} | {cells} | {ours_torch / tv_eager:.2f}x | {best / tv_ort:.2f}x |")


def training(bench: dict, mindcv: dict | None) -> None:
    rows = bench["train_rows"]
    base = next(r["images_per_second"] for r in rows if r["backend"] == "torchvision-eager")
    print("| training step, x0.5, batch 32 | img/s | / torchvision eager | loss vs torchvision (float32 noise) |")
    print("|---|---|---|---|")
    for r in rows:
        diff = r["max_relative_loss_difference"]
        check = f"{diff:.1e} ({r['float32_noise_floor']:.1e})" if diff is not None else "another function"
        print(f"| {r['backend']} | {r['images_per_second']:.1f} | {r['images_per_second'] / base:.2f}x | {check} |")
    if mindcv:
        ms = {(r["peer"], r["kind"], r["model"], r["batch"]): r["images_per_second"] for r in mindcv["rows"]}
        key = ("train", "shufflenet_v2_x0_5", 32)
        tv_there = ms[("torchvision", *key)]
        print(f"| MindCV (its own run, GRAPH_MODE) | {ms[('mindcv', *key)]:.1f} | "
              f"{ms[('mindcv', *key)] / tv_there:.2f}x of that run's torchvision ({tv_there:.1f}) | |")  # fmt: skip


def mindcv_rows(mindcv: dict) -> None:
    rate = {(r["peer"], r["kind"], r["model"], r["batch"]): r["images_per_second"] for r in mindcv["rows"]}
    print("| MindCV 0.3.0 / MindSpore 2.10, GRAPH_MODE | MindCV img/s | torchvision eager, same run | ratio |")
    print("|---|---|---|---|")
    for peer, kind, model, batch in rate:
        if peer == "mindcv":
            theirs, tv = rate[(peer, kind, model, batch)], rate[("torchvision", kind, model, batch)]
            print(f"| {kind} {MODELS[model]} b{batch} | {theirs:.1f} | {tv:.1f} | {theirs / tv:.2f}x |")


def data(bench: dict) -> None:
    rows = bench["data_rows"]
    print("| input pipeline, per core | train img/s | / torchvision classic | eval img/s | / torchvision classic |")
    print("|---|---|---|---|---|")
    rate = {(r["split"], r["backend"]): r["images_per_second"] for r in rows}
    for backend in dict.fromkeys(r["backend"] for r in rows):
        train, evaluation = rate[("train", backend)], rate[("eval", backend)]
        print(f"| {backend} | {train:.1f} | {train / rate[('train', 'torchvision-classic')]:.2f}x | "
              f"{evaluation:.1f} | {evaluation / rate[('eval', 'torchvision-classic')]:.2f}x |")  # fmt: skip


def main() -> None:
    bench_path = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/cpu/bench.json")
    mindcv_path = Path(sys.argv[2] if len(sys.argv) > 2 else "benchmarks/results/mindcv_cpu.json")
    bench = json.loads(bench_path.read_text())
    mindcv = json.loads(mindcv_path.read_text()) if mindcv_path.exists() else None
    inference(bench)
    print()
    training(bench, mindcv)
    print()
    data(bench)
    if mindcv:
        print()
        mindcv_rows(mindcv)


if __name__ == "__main__":
    main()
