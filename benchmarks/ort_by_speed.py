"""Our ONNX graph against torchvision's in ONNX Runtime, split by how fast torchvision's ran in that round.

On the shared 2-core VMs the ONNX Runtime rows swing by up to 2x within one run (slow spells of the
host), and torchvision's graph loses more in a slow spell than ours.  So the median ratio of a run
depends on how many of its rounds fell in a spell.  This pools the paired rounds of the given bench
JSON files and prints the median per-round ratio over the thirds of rounds where torchvision's session
ran slowest, in between, and fastest:

    python benchmarks/ort_by_speed.py benchmarks/results/cpu*/bench.json
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict


def main(paths: list[str]) -> None:
    pairs: dict[tuple[str, int], list[tuple[float, float]]] = defaultdict(list)
    for path in paths:
        with open(path) as f:
            rows = json.load(f).get("rows", [])
        rounds = {(r["model"], r["batch"], r["backend"]): r["rounds"] for r in rows}
        for (model, batch, backend), ours in rounds.items():
            theirs = rounds.get((model, batch, "torchvision-onnxruntime"))
            if backend == "ours-onnxruntime" and theirs:
                pairs[model, batch] += zip(ours, theirs, strict=True)
    print("| row | rounds | tv slowest third: ours / tv | middle third | tv fastest third |")
    print("|---|---|---|---|---|")
    for (model, batch), paired in sorted(pairs.items()):
        paired.sort(key=lambda p: p[1])  # by torchvision's speed in the round
        third = len(paired) // 3
        parts = (paired[:third], paired[third : len(paired) - third], paired[len(paired) - third :])
        cells = [
            f"{statistics.median(o / t for o, t in part):.2f}x (tv {part[0][1]:.0f}-{part[-1][1]:.0f} img/s)"
            for part in parts
        ]
        print(f"| {model.removeprefix('shufflenet_v2_')} b{batch} | {len(paired)} | {' | '.join(cells)} |")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
