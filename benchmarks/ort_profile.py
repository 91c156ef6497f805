"""Where ONNX Runtime spends its time in our exported graph (``fuse_for_onnx``, as ``export`` writes it)
and in torchvision's: time per operator type, from ORT's own profiler (its per-node timings add some
overhead per node, which counts against torchvision's graph with its many small shape nodes more than
against ours; the two graphs are profiled one after the other, so a slow spell of the host can fall on
either):

    python benchmarks/ort_profile.py [MODEL] [BATCH]      (default shufflenet_v2_x0_5 32; 2 threads)
"""

from __future__ import annotations

import collections
import json
import sys
import tempfile
from pathlib import Path

import torch

from shufflenetv2.bench import _exported, onnx_session, torchvision_model
from shufflenetv2.model import build_network
from shufflenetv2.onnx_graph import fuse_for_onnx

RUNS = 30


def profile(path: str, x: torch.Tensor, prefix: str) -> tuple[float, list[tuple[str, float, int]]]:
    """ms per run in all, and (operator, ms per run, nodes) by time."""
    session = onnx_session(path, 2, enable_profiling=True, profile_file_prefix=prefix)  # as bench runs it
    feed = {session.get_inputs()[0].name: x.numpy()}
    for _ in range(RUNS):
        session.run(None, feed)
    with open(session.end_profiling()) as f:
        events = json.load(f)
    spent: collections.Counter[str] = collections.Counter()
    nodes: collections.Counter[str] = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            spent[event["args"]["op_name"]] += event["dur"]
            nodes[event["args"]["op_name"]] += 1
    total = sum(spent.values()) / RUNS / 1000
    return total, [(op, us / RUNS / 1000, nodes[op] // RUNS) for op, us in spent.most_common()]


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else "shufflenet_v2_x0_5"
    batch = int(sys.argv[2]) if len(sys.argv) > 2 else 32
    torch.manual_seed(0)
    x = torch.randn(batch, 3, 224, 224)
    ours = fuse_for_onnx(build_network(name).eval())  # the graph `export` writes and the bench's ORT row runs
    with tempfile.TemporaryDirectory() as scratch:
        models = {"ours": ours, "torchvision": torchvision_model(name)}
        for label, model in models.items():
            (Path(scratch) / label).mkdir()
            path = _exported(model, x, Path(scratch) / label)
            total, ops = profile(str(path), x, f"{scratch}/{label}")
            print(f"{label}: {total:.1f} ms per run ({name}, batch {batch}, sum of node times)")
            for op, ms, count in ops[:12]:
                print(f"  {op:24s} {ms:7.2f} ms  {count:4d} nodes  {100 * ms / total:5.1f} %")


if __name__ == "__main__":
    main()
