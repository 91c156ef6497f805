"""MindCV's own ShuffleNetV2 on CPU, with torchvision's shufflenet_v2 as the baseline.

    python benchmarks/mindcv_cpu.py [--peer mindcv|torchvision] [--json OUT]

MindSpore 2.10 and torch cannot share one virtual environment here (MindSpore needs numpy<2), so
each peer runs in its own process from its own venv; benchmarks/mindcv_cpu.sh runs both and merges
the two JSON files. Because the peers cannot take turns inside one process, they run one after
the other in the same shell script, and only rows of the same run should be compared.

How it measures, and why:
- 2 threads, float32, 224x224 random inputs (the values do not change the work of a CNN).
- MindSpore runs in GRAPH_MODE, its fast path; the first call of each input shape compiles the
  graph, so that first call is reported apart as setup_seconds and is never timed.
- MindSpore may return before the work is done, so every timed call ends with .asnumpy() on the
  output (inference) or the loss (training); torch's CPU calls are synchronous.
- Warm-up of at least 3 calls, then ROUNDS timed rounds. Each round repeats the call as often as
  fits in about TARGET_S seconds (at least once: MindSpore's batch-32 calls take longer than
  that on their own). The figure is the median of the rounds, with the min..max spread, because
  these shared machines show 10-50 % spreads within a run.
- If a MindSpore row fails in GRAPH_MODE it is retried in PYNATIVE_MODE, and each row records
  the mode it ran in.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback

THREADS = 2
SIZE = 224
ROUNDS = 7
WARMUP = 3
TARGET_S = 1.5
LR = 0.01
MOMENTUM = 0.9
# (model, kind, batch)
ROWS = [
    ("shufflenet_v2_x0_5", "inference", 1),
    ("shufflenet_v2_x0_5", "inference", 32),
    ("shufflenet_v2_x1_0", "inference", 1),
    ("shufflenet_v2_x1_0", "inference", 32),
    ("shufflenet_v2_x0_5", "train", 32),
]

os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))

import numpy as np  # noqa: E402  (after OMP_NUM_THREADS)


def measure(call, batch: int) -> dict:
    """Time call() (which must block until its result exists) as described in the docstring."""
    t0 = time.perf_counter()
    call()
    setup = time.perf_counter() - t0
    warm = []
    for _ in range(WARMUP - 1):
        t0 = time.perf_counter()
        call()
        warm.append(time.perf_counter() - t0)
    per_round = max(1, round(TARGET_S / min(warm)))
    rates = []
    for _ in range(ROUNDS):
        t0 = time.perf_counter()
        for _ in range(per_round):
            call()
        rates.append(per_round * batch / (time.perf_counter() - t0))
    median = statistics.median(rates)
    return {
        "batch": batch,
        "images_per_second": median,
        "spread": [min(rates), max(rates)],
        "latency_ms": 1000.0 * batch / median,
        "setup_seconds": setup,
        "calls_per_round": per_round,
    }


def inputs(batch: int):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 3, SIZE, SIZE), dtype=np.float32)
    y = rng.integers(0, 1000, size=batch, dtype=np.int32)
    return x, y


def run_mindcv() -> tuple[dict, dict, list]:
    import mindspore as ms
    from mindcv import __version__ as mindcv_version
    from mindcv.models import create_model
    from mindspore import nn

    ms.set_device("CPU")
    ms.device_context.cpu.op_tuning.threads_num(THREADS)
    ms.set_context(mode=ms.GRAPH_MODE)

    def make_call(model: str, kind: str, batch: int):
        x, y = inputs(batch)
        x, y = ms.Tensor(x), ms.Tensor(y)
        net = create_model(model, num_classes=1000)
        if kind == "inference":
            net.set_train(False)
            return lambda: net(x).asnumpy()
        loss = nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean")
        opt = nn.Momentum(net.trainable_params(), learning_rate=LR, momentum=MOMENTUM)
        step = nn.TrainOneStepCell(nn.WithLossCell(net, loss), opt)
        step.set_train(True)
        return lambda: step(x, y).asnumpy()

    rows = []
    for model, kind, batch in ROWS:
        row = None
        for mode, name in ((ms.GRAPH_MODE, "GRAPH_MODE"), (ms.PYNATIVE_MODE, "PYNATIVE_MODE")):
            ms.set_context(mode=mode)
            try:
                row = {"mode": name, **measure(make_call(model, kind, batch), batch)}
                break
            except Exception:
                print(f"mindcv {model} {kind} b{batch} failed in {name}:", file=sys.stderr)
                traceback.print_exc()
        ms.set_context(mode=ms.GRAPH_MODE)
        if row is None:
            row = {"mode": "failed", "batch": batch}
        rows.append({"peer": "mindcv", "model": model, "kind": kind, **row})
        print_row(rows[-1])
    versions = {"mindspore": ms.__version__, "mindcv": mindcv_version, "numpy": np.__version__}
    settings = {
        "mindspore_mode": "GRAPH_MODE (PYNATIVE_MODE only as a per-row fallback)",
        "mindspore_threads": f"device_context.cpu.op_tuning.threads_num({THREADS}), OMP_NUM_THREADS={THREADS}",
        "mindspore_train": "nn.TrainOneStepCell(nn.WithLossCell(net, SoftmaxCrossEntropyWithLogits), nn.Momentum)",
    }
    return versions, settings, rows


def run_torchvision() -> tuple[dict, dict, list]:
    import torch
    import torchvision

    torch.set_num_threads(THREADS)

    def make_call(model: str, kind: str, batch: int):
        x, y = inputs(batch)
        x, y = torch.from_numpy(x), torch.from_numpy(y).long()
        net = getattr(torchvision.models, model)(weights=None)
        if kind == "inference":
            net.eval()

            def infer():
                with torch.inference_mode():
                    return net(x)

            return infer
        net.train()
        opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM)
        loss_fn = torch.nn.CrossEntropyLoss()

        def train_step():
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(net(x), y)
            loss.backward()
            opt.step()
            return loss.item()

        return train_step

    rows = []
    for model, kind, batch in ROWS:
        row = {"peer": "torchvision", "model": model, "kind": kind, "mode": "eager"}
        rows.append({**row, **measure(make_call(model, kind, batch), batch)})
        print_row(rows[-1])
    versions = {"torch": torch.__version__, "torchvision": torchvision.__version__, "numpy": np.__version__}
    settings = {"torch_threads": f"torch.set_num_threads({THREADS})", "torch_train": "CrossEntropyLoss, optim.SGD"}
    return versions, settings, rows


def print_row(r: dict) -> None:
    if "images_per_second" not in r:
        print(f"{r['peer']:<12} {r['model']:<19} {r['kind']:<9} {r['batch']:>5}  failed", flush=True)
        return
    lo, hi = r["spread"]
    print(
        f"{r['peer']:<12} {r['model']:<19} {r['kind']:<9} {r['batch']:>5} {r['images_per_second']:>8.1f}"
        f" {lo:>7.1f}..{hi:<7.1f} {r['latency_ms']:>9.1f} {r['setup_seconds']:>8.2f}  {r['mode']}",
        flush=True,
    )


HEADER = (
    f"{'peer':<12} {'model':<19} {'kind':<9} {'batch':>5} {'img/s':>8} {'min..max':^16} {'ms/call':>9} {'setup s':>8}"
    "  mode"
)


def cpu_name() -> str:
    with open("/proc/cpuinfo") as f:
        return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), platform.processor())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peer", choices=["mindcv", "torchvision"], default="mindcv")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    print(HEADER, flush=True)
    versions, settings, rows = (run_mindcv if args.peer == "mindcv" else run_torchvision)()
    result = {
        "machine": {
            "cpu": cpu_name(),
            "logical_cpus": os.cpu_count(),
            "platform": platform.platform(),
            "peers": {args.peer: {"python": platform.python_version(), **versions}},
        },
        "settings": {
            "threads": THREADS,
            "dtype": "float32",
            "input": f"random normal, {SIZE}x{SIZE}",
            "warmup_calls": WARMUP,
            "rounds": ROUNDS,
            "target_round_seconds": TARGET_S,
            "statistic": "median img/s over rounds; spread = min..max of rounds; setup = first call",
            "train_step": f"forward, cross-entropy, backward, SGD lr {LR} momentum {MOMENTUM}",
            **settings,
        },
        "rows": rows,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
