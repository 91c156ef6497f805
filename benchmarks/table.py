"""The README's performance tables, printed as Markdown from the committed JSON results.

    python benchmarks/table.py [benchmarks/results/cpu/bench.json] [benchmarks/results/mindcv_cpu.json]

Ratios are taken only between rows of one file (one run), and where the JSON has each round's figure,
as the median of the per-round ratios: the rows of a table take turns within every round, so a slow
spell of the shared machine cancels out of a round's ratio.  MindCV's rows come from their own run,
with torchvision measured beside them, so MindCV is compared through that run's torchvision row.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

MODELS = {"shufflenet_v2_x0_5": "x0.5", "shufflenet_v2_x1_0": "x1.0"}


def ratio(row: dict, base: dict) -> float:
    """``row`` over ``base``: the median per-round ratio when both carry their rounds, else of the medians."""
    ours, theirs = row.get("rounds") or [], base.get("rounds") or []
    if ours and len(ours) == len(theirs):
        return statistics.median(a / b for a, b in zip(ours, theirs, strict=True))
    return row["images_per_second"] / base["images_per_second"]


BACKENDS = ["ours-eager", "ours-fused", "ours-fused-compiled", "ours-fused-frozen", "ours-aot", "ours-onnxruntime",
            "ours-openvino", "torchvision-eager", "torchvision-compiled", "torchvision-frozen", "torchvision-aot",
            "torchvision-onnxruntime", "torchvision-openvino"]  # fmt: skip
OUR_PYTORCH = ["ours-fused", "ours-fused-compiled", "ours-fused-frozen", "ours-aot"]
OURS = [b for b in BACKENDS if b.startswith("ours")]
# (header, our rows, their rows): the fastest present of each side, per (model, batch)
RATIOS = [
    ("our PyTorch / tv eager", OUR_PYTORCH, ["torchvision-eager"]),
    (
        "best PyTorch, ours / tv",
        OUR_PYTORCH,
        ["torchvision-eager", "torchvision-compiled", "torchvision-frozen", "torchvision-aot"],
    ),
    ("best ours / tv ONNX Runtime", OURS, ["torchvision-onnxruntime"]),
    ("best ours / tv OpenVINO", OURS, ["torchvision-openvino"]),
]


def _fastest(rows: dict, names: list[str]) -> dict | None:
    present = [rows[b] for b in names if b in rows]
    return max(present, key=lambda r: r["images_per_second"]) if present else None


def inference(bench: dict) -> None:
    by_key = {(r["model"], r["batch"], r["backend"]): r for r in bench["rows"]}
    groups = {}
    for model, batch in sorted({(m, b) for m, b, _ in by_key}):
        groups[model, batch] = {b: by_key[(m, n, b)] for m, n, b in by_key if (m, n) == (model, batch)}
    backends = [b for b in BACKENDS if any(b in rows for rows in groups.values())]  # only rows that ran
    columns = [c for c in RATIOS if any(_fastest(r, c[1]) and _fastest(r, c[2]) for r in groups.values())]
    print("| img/s | " + " | ".join(backends + [header for header, _, _ in columns]) + " |")
    print("|---" * (1 + len(backends) + len(columns)) + "|")
    for (model, batch), rows in groups.items():
        cells = [f"{rows[b]['images_per_second']:.1f}" if b in rows else "" for b in backends]
        for _, ours, theirs in columns:
            mine, base = _fastest(rows, ours), _fastest(rows, theirs)
            cells.append(f"{ratio(mine, base):.2f}x" if mine and base else "")
        print(f"| {MODELS[model]} b{batch} | " + " | ".join(cells) + " |")


def training(bench: dict, mindcv: dict | None) -> None:
    rows = bench["train_rows"]
    base = next(r for r in rows if r["backend"] == "torchvision-eager")
    print("| training step, x0.5, batch 32 | img/s | / torchvision eager | loss vs torchvision (float32 noise) |")
    print("|---|---|---|---|")
    for r in rows:
        diff = r["max_relative_loss_difference"]
        check = f"{diff:.1e} ({r['float32_noise_floor']:.1e})" if diff is not None else "another function"
        print(f"| {r['backend']} | {r['images_per_second']:.1f} | {ratio(r, base):.2f}x | {check} |")
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
    row = {(r["split"], r["backend"]): r for r in rows}
    for backend in dict.fromkeys(r["backend"] for r in rows):
        cells = []
        for split in ("train", "eval"):
            if (split, backend) in row:  # some rows are train-only
                mine, peer = row[(split, backend)], row[(split, "torchvision-classic")]
                cells += [f"{mine['images_per_second']:.1f}", f"{ratio(mine, peer):.2f}x"]
            else:
                cells += ["", ""]
        print(f"| {backend} | {' | '.join(cells)} |")


def main() -> None:
    bench_path = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/cpu/bench.json")
    mindcv_path = Path(sys.argv[2] if len(sys.argv) > 2 else "benchmarks/results/mindcv_cpu.json")
    bench = json.loads(bench_path.read_text())
    mindcv = json.loads(mindcv_path.read_text()) if mindcv_path.exists() else None
    machine = bench.get("machine", {})
    # results written before the CPU was recorded say only "x86_64"
    print(f"{bench_path}: {machine.get('cpu', machine.get('processor', 'machine not recorded'))}, "
          f"torch {machine.get('torch', '?')}\n")  # fmt: skip
    for table, key in ((inference, "rows"), (lambda b: training(b, mindcv), "train_rows"), (data, "data_rows")):
        if bench.get(key):  # a run of some suites only (``bench --suites inference``) has only their tables
            table(bench)
            print()
    if mindcv:
        mindcv_rows(mindcv)


if __name__ == "__main__":
    main()
