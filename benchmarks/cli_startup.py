"""Wall time of short CLI commands, which is mostly imports: medians over rounds, commands taking turns.

    python benchmarks/cli_startup.py [--baseline DIR] [--rounds 7]

``--baseline DIR`` times a checkout of another revision too (``git worktree add DIR REV``), run with this
interpreter and DIR first on PYTHONPATH, in the same rounds: the two figures of a row are paired.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def timed(tree: Path, argv: list[str], cwd: str) -> float:
    """``cwd`` holds no package: ``-m`` puts the working directory before PYTHONPATH."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "shufflenetv2", *argv], env=env, cwd=cwd, capture_output=True, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, help="a checkout of another revision to time beside this one")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    trees = {"this tree": REPO, **({f"baseline {args.baseline}": args.baseline.resolve()} if args.baseline else {})}
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "m.safetensors"
        subprocess.run(
            [sys.executable, "-c", "import sys; from shufflenetv2 import create_model, save_weights; "
             "save_weights(sys.argv[1], create_model('shufflenet_v2_x0_5'))", str(weights)],
            env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=tmp, check=True,
        )  # fmt: skip
        commands = {
            "--help": ["--help"],
            "info": ["info", str(weights)],
            "summary": ["summary", "shufflenet_v2_x0_5", "--no-layers"],
            "convert": ["convert", str(weights), str(Path(tmp) / "tv.safetensors"), "--layout", "torchvision"],
        }
        for name, argv in commands.items():
            seconds: dict[str, list[float]] = {tree: [] for tree in trees}
            for _ in range(args.rounds):
                for tree, path in trees.items():
                    seconds[tree].append(timed(path, argv, tmp))
            figures = "  ".join(f"{tree}: {statistics.median(s):.2f} s" for tree, s in seconds.items())
            print(f"shufflenetv2 {name:8s} {figures}", flush=True)


if __name__ == "__main__":
    main()
