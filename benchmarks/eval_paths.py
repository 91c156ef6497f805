"""What `mode 0` evaluates on a CPU, timed: the network as it is (what mode 1 runs), the fused inference
model (what mode 0 runs there since it stopped compiling), and the network under torch.compile (what mode 0
ran before, and runs with `compile_on_cpu True`).

Two parts, each in float32 with 2 threads:

``model``
    one forward of a batch of 64 at 224 px (MindCV's evaluation batch), random weights, channels_last: each
    round times one call of every row, in turn, after two warm-up calls; a row's first call (its set-up:
    fusing, or compiling into an empty inductor cache) is reported apart.
``validate``
    ``validate.py`` as a user runs it: MindCV's x0.5 recipe with ``--amp_level O0 --distribute False``, on
    ``--data`` (an ImageFolder with ``val/``; hymenoptera's 153 photos), a random 2-class weight file.  Whole
    processes, so start-up, loader workers and compiling are included: ``compiled, cold`` gets an empty
    inductor cache each round (a first run on a machine), ``compiled, warm`` a cache the earlier rounds
    filled.  Rows take turns.  Each row's metrics are printed too: the paths must agree.

    python benchmarks/eval_paths.py --data runs/hymenoptera --json benchmarks/results/eval_paths/eval_paths.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "shufflenetv2" / "shufflenet_v2_0.5_ascend.yaml"


def time_models(names: list[str], rounds: int) -> list[dict[str, object]]:
    import torch

    from shufflenetv2 import create_model, fuse

    torch.set_num_threads(2)
    rows = []
    for name in names:
        torch.manual_seed(0)
        model = create_model(name, 1000).eval().to(memory_format=torch.channels_last)
        x = torch.randn(64, 3, 224, 224).contiguous(memory_format=torch.channels_last)
        nets, setup = {}, {}
        builds = {"eager (mode 1)": None, "fused (mode 0)": fuse, "compiled (compile_on_cpu)": torch.compile}
        for row, build in builds.items():
            start = time.perf_counter()
            nets[row] = build(model) if build is not None else model
            with torch.no_grad():
                nets[row](x)
            setup[row] = time.perf_counter() - start
            with torch.no_grad():
                nets[row](x)
        seconds: dict[str, list[float]] = {row: [] for row in nets}
        with torch.no_grad():
            for _ in range(rounds):
                for row, net in nets.items():
                    start = time.perf_counter()
                    net(x)
                    seconds[row].append(time.perf_counter() - start)
        for row, times in seconds.items():
            rates = [64 / t for t in times]
            rows.append({"model": name, "row": row, "img_s": statistics.median(rates), "min": min(rates),
                         "max": max(rates), "setup_s": setup[row]})  # fmt: skip
            print(f"{name}  b64  {row:26s} {rows[-1]['img_s']:7.1f} img/s ({min(rates):.1f}..{max(rates):.1f})  "
                  f"first call {setup[row]:.1f} s", flush=True)  # fmt: skip
    return rows


def time_validate(data: Path, rounds: int) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "x0_5_2_classes.safetensors"
        subprocess.run(
            [sys.executable, "-c", "import sys, torch; from shufflenetv2 import create_model, save_weights; "
             "torch.manual_seed(0); save_weights(sys.argv[1], create_model('shufflenet_v2_x0_5', 2))", str(weights)],
            check=True,
        )  # fmt: skip
        base = [sys.executable, str(REPO / "validate.py"), "-c", str(RECIPE), "--data_dir", str(data), "--num_classes",
                "2", "--ckpt_path", str(weights), "--amp_level", "O0", "--distribute", "False"]  # fmt: skip
        warm_cache = Path(tmp) / "warm"
        variants = {
            "mode 1 (eager)": (["--mode", "1"], None),
            "mode 0 (fused)": (["--mode", "0"], None),
            "mode 0, compiled, cold cache": (["--mode", "0", "--compile_on_cpu", "True"], "cold"),
            "mode 0, compiled, warm cache": (["--mode", "0", "--compile_on_cpu", "True"], warm_cache),
        }
        subprocess.run([*base, *variants["mode 0, compiled, warm cache"][0]], check=True, capture_output=True,
                       env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(warm_cache)})  # fmt: skip  # fills it
        seconds: dict[str, list[float]] = {row: [] for row in variants}
        reports: dict[str, dict[str, object]] = {}
        for i in range(rounds):
            for row, (flags, cache) in variants.items():
                env = dict(os.environ)
                if cache is not None:
                    env["TORCHINDUCTOR_CACHE_DIR"] = str(Path(tmp) / f"cold{i}" if cache == "cold" else cache)
                start = time.perf_counter()
                done = subprocess.run([*base, *flags], check=True, capture_output=True, text=True, env=env)
                seconds[row].append(time.perf_counter() - start)
                reports[row] = json.loads(done.stdout.splitlines()[-1])
        for row, times in seconds.items():
            report = reports[row]
            rows.append({"row": row, "seconds": statistics.median(times), "min": min(times), "max": max(times),
                         "images": report["images"], "top1": report["Top_1_Accuracy"],
                         "loss": report["loss"]})  # fmt: skip
            print(f"validate.py  {row:30s} {statistics.median(times):6.1f} s ({min(times):.1f}..{max(times):.1f})  "
                  f"{report['images']} images, top-1 {report['Top_1_Accuracy']:.4f}, loss {report['loss']:.8f}",
                  flush=True)  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="an ImageFolder with val/ for the validate.py rows")
    parser.add_argument("--models", nargs="+", default=["shufflenet_v2_x0_5", "shufflenet_v2_x1_0"])
    parser.add_argument("--rounds", type=int, default=9, help="timed calls per model row")
    parser.add_argument("--validate-rounds", type=int, default=3, help="validate.py runs per row")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="eval_paths_inductor_"))  # cold

    from shufflenetv2.bench import machine_record

    result: dict[str, object] = {"machine": machine_record(), "threads": 2}
    result["model"] = time_models(args.models, args.rounds)
    if args.data is not None:
        result["validate"] = time_validate(args.data, args.validate_rounds)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
