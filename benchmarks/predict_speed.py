"""Classifying a folder of ImageNet-sized JPEGs: ``shufflenetv2.predict`` against the loop people write
with torchvision today.

The folder holds ``--images`` hard links to the JPEGs of hymenoptera (``train/`` and ``val/``, 397 photos
of 500 x 375 or so, the GIF left out), named ``i_<name>`` so each file is read as if it were new.  Rows:

``ours``
    ``shufflenetv2.predict.predict`` over every file with MindCV's defaults (224 px, crop_pct 0.875, batches
    of 32, ``num_parallel_workers`` capped at the CPU count), consumed to the last ``Prediction``.
``torchvision``
    torchvision's ``shufflenet_v2_x0_5`` in eval mode, fed by a DataLoader with the same batch size and
    worker count over PIL's ``Image.open(...).convert("RGB")`` and ``Resize(256)``, ``CenterCrop(224)``,
    ``ToTensor``, ``Normalize``: the classic evaluation transform.

Both do the same work per image (decode, resize the shorter side to 256, centre crop, normalise,
x0.5's forward at 224 px, softmax, top 5) with the same torch, threads and workers.  Every repetition is a
whole pass over the folder, worker start-up included; the first pass of each row is a warm-up and not
counted (it pulls the files into the page cache).  Rows alternate, so drift hits both.

    python benchmarks/predict_speed.py --data runs/hymenoptera --json benchmarks/results/predict/predict.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from shufflenetv2 import create_model, save_weights
from shufflenetv2.bench import machine_record
from shufflenetv2.config import Config
from shufflenetv2.predict import Prediction, predict


def link_folder(source: Path, target: Path, count: int) -> list[str]:
    """``count`` hard links to the JPEGs under ``source``, cycling through them, in one flat folder."""
    photos = sorted(p for p in source.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    if not photos:
        raise SystemExit(f"no JPEG files under {source}: pass --data, the extracted hymenoptera folder")
    target.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(count):
        link = target / f"{i:05d}_{photos[i % len(photos)].name}"
        if not link.exists():
            os.link(photos[i % len(photos)], link)
        files.append(str(link))
    return files


class PilFiles(Dataset):
    def __init__(self, files: list[str]) -> None:
        self.files = files
        self.transform = T.Compose(
            [T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])]
        )

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        with Image.open(self.files[index]) as image:
            return self.transform(image.convert("RGB"))


def torchvision_pass(files: list[str], workers: int, batch: int) -> int:
    model = torchvision.models.shufflenet_v2_x0_5().eval()
    loader = DataLoader(PilFiles(files), batch_size=batch, num_workers=workers)
    done = 0
    with torch.no_grad():
        for images in loader:
            top = model(images).softmax(dim=1).topk(5, dim=1)
            done += len(top.indices.tolist())
    return done


def ours_pass(weights: Path, files: list[str], cfg: Config) -> int:
    return sum(isinstance(result, Prediction) for result in predict(weights, files, cfg, top=5))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("runs/hymenoptera"), help="extracted hymenoptera folder")
    parser.add_argument("--images", type=int, default=1200)
    parser.add_argument("--repeats", type=int, default=5, help="counted passes per row, after one warm-up pass")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = Config()  # MindCV's evaluation defaults
    workers = min(cfg.num_parallel_workers, os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(prefix="predict_speed_") as tmp:
        files = link_folder(args.data, Path(tmp) / "photos", args.images)
        weights = save_weights(Path(tmp) / "x0_5.safetensors", create_model("shufflenet_v2_x0_5").eval())
        rows: dict[str, Callable[[], int]] = {
            "ours": lambda: ours_pass(weights, files, cfg),
            "torchvision": lambda: torchvision_pass(files, workers, cfg.batch_size),
        }
        seconds: dict[str, list[float]] = {name: [] for name in rows}
        for repeat in range(args.repeats + 1):
            for name, run in rows.items():
                start = time.perf_counter()
                done = run()
                elapsed = time.perf_counter() - start
                if done != len(files):
                    raise SystemExit(f"{name} classified {done} of {len(files)} images")
                if repeat:
                    seconds[name].append(elapsed)
                print(
                    f"{name:12s} pass {repeat}{' (warm-up)' if not repeat else ''}: {len(files) / elapsed:7.1f} img/s"
                )
    summary = {}
    for name, times in seconds.items():
        rates = [len(files) / t for t in times]
        summary[name] = {"img_per_s_median": statistics.median(rates), "img_per_s": rates}
        print(f"{name:12s} median {statistics.median(rates):7.1f} img/s  (min {min(rates):.1f}, max {max(rates):.1f})")
    ratio = summary["ours"]["img_per_s_median"] / summary["torchvision"]["img_per_s_median"]
    print(f"ours / torchvision: {ratio:.2f}x  ({len(files)} images, {workers} workers, {args.threads} threads)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "machine": machine_record(),
            "threads": args.threads,
            "images": len(files),
            "workers": workers,
            "batch_size": cfg.batch_size,
            "repeats": args.repeats,
            "rows": summary,
            "ratio_ours_to_torchvision": ratio,
            "command": " ".join(["python", *sys.argv]),
        }
        args.json.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
