"""ImageNet-sized folder datasets: indexing time and the memory each loader worker adds, ours against torchvision.

An ImageNet training folder holds 1,281,167 files in 1,000 class folders.  A dataset that keeps one Python
``(path, label)`` tuple per file makes every forked DataLoader worker copy those objects page by page as
it reads them (reading an object writes its reference count), so each worker ends an epoch with a private
copy of the whole list: MindCV's recipe runs 8 workers on each of 8 devices, 64 copies per machine.

This script builds such a tree from hard links to one tiny JPEG (so it costs inodes, not disk), indexes it
with ``shufflenetv2``'s ``ImageFolderDataset`` and with torchvision's ``ImageFolder``, then runs one full
epoch of each through a DataLoader with forked workers and reads every worker's private memory
(``Private_Dirty`` of ``/proc/PID/smaps_rollup``, Linux only) right after the workers start and after
the epoch.  Ours goes through the training loader (``data.build_loader``: seeded sampling, the fast
pipeline), and again as a plain DataLoader (``ours-unfrozen``: without ``data.SharingLoader``'s
``gc.freeze`` around the fork); torchvision's through its ImageFolder and PIL transforms.  Images are
cropped to 32 px so that an epoch takes minutes: the memory measured is the dataset's, not the images'.

    python benchmarks/dataset_scale.py --json benchmarks/results/dataset_scale/ours_vs_torchvision.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision import transforms as T
from torchvision.io import encode_jpeg

from shufflenetv2.bench import machine_record
from shufflenetv2.config import Config
from shufflenetv2.data import ImageFolderDataset, build_dataset, build_loader, stop_workers

ROWS = ("ours", "ours-unfrozen", "torchvision")
IMAGENET_CLASSES, IMAGENET_PER_CLASS = 1000, 1282  # 1,282,000 files: ImageNet's 1,281,167, rounded up


def build_tree(root: Path, classes: int, per_class: int) -> Path:
    """``root/train/n0XXXXXXX/n0XXXXXXX_I.JPEG``, ImageNet's names, every file a hard link to one JPEG."""
    train = root / "train"
    if train.is_dir():
        return train
    jpeg = root / "source.JPEG"
    jpeg.write_bytes(encode_jpeg(torch.randint(0, 256, (3, 48, 64), dtype=torch.uint8)).numpy().tobytes())
    for c in range(classes):
        folder = train / f"n{1440764 + c:08d}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            os.link(jpeg, folder / f"{folder.name}_{10026 + i}.JPEG")
    return train


def private_mb(pid: int) -> float:
    """Memory only this process holds (pages it wrote after the fork included), in MiB."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        fields = dict(line.split()[:2] for line in f if line.split()[0].endswith(":"))
    return int(fields["Private_Dirty:"]) / 1024


def time_index(make: Callable[[], object], repeats: int) -> tuple[float, list[float]]:
    seconds = []
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        make()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), seconds


def measure_epoch(loader: DataLoader, label: str) -> dict[str, object]:
    """One epoch through ``loader``'s persistent workers; their private MiB at the start and at the end."""
    iterator = iter(loader)
    first = next(iterator)
    pids = [w.pid for w in loader._iterator._workers]  # torch keeps the persistent workers there
    at_start = [private_mb(p) for p in pids]
    start, batches = time.perf_counter(), 1
    for _ in iterator:
        batches += 1
    seconds = time.perf_counter() - start
    at_end = [private_mb(p) for p in pids]
    print(
        f"{label}: {batches} batches in {seconds:.0f} s; worker private MiB at start {at_start}, "
        f"after the epoch {[round(m) for m in at_end]}",
        flush=True,
    )
    del first
    return {
        "batches": batches,
        "epoch_s": seconds,
        "worker_private_mib_start": at_start,
        "worker_private_mib_end": at_end,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", help="where to build the tree (default: a temporary folder in /dev/shm)")
    parser.add_argument("--classes", type=int, default=IMAGENET_CLASSES)
    parser.add_argument("--per-class", type=int, default=IMAGENET_PER_CLASS)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--index-repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    args = parser.parse_args()
    if not sys.platform.startswith("linux"):
        raise SystemExit("this benchmark reads /proc/PID/smaps_rollup: Linux only")
    torch.set_num_threads(1)
    shm = Path("/dev/shm")
    with tempfile.TemporaryDirectory(dir=shm if shm.is_dir() else None) as scratch:
        root = Path(args.root) if args.root else Path(scratch)
        start = time.perf_counter()
        train = build_tree(root, args.classes, args.per_class)
        print(f"tree: {args.classes} x {args.per_class} files under {train} ({time.perf_counter() - start:.0f} s)")
        result: dict[str, object] = {"machine": machine_record(), "files": args.classes * args.per_class}
        result["index_s"] = {
            "ours": time_index(lambda: ImageFolderDataset(train), args.index_repeats),
            "torchvision": time_index(lambda: datasets.ImageFolder(str(train)), args.index_repeats),
        }
        print(f"index seconds (median, all): {result['index_s']}", flush=True)

        cfg = Config(
            dataset="imagefolder", data_dir=str(root), image_resize=32, batch_size=args.batch,
            num_parallel_workers=args.workers,
        )  # fmt: skip
        for row in args.rows:
            if row == "torchvision":
                continue
            ours = build_loader(cfg, build_dataset(cfg, "train", train=True), train=True)
            if row == "ours-unfrozen":  # the same loader, as a plain DataLoader: no gc.freeze around the fork
                ours.__class__ = DataLoader
            result[row] = measure_epoch(ours, row)
            stop_workers(ours)
            del ours
            gc.collect()
        if "torchvision" not in args.rows:
            return finish(result, args.json)
        peer = datasets.ImageFolder(str(train), transform=T.Compose([T.RandomResizedCrop(32), T.PILToTensor()]))
        theirs = DataLoader(
            peer, batch_size=args.batch, shuffle=True, num_workers=args.workers, persistent_workers=True
        )
        result["torchvision"] = measure_epoch(theirs, "torchvision")
        stop_workers(theirs)
    finish(result, args.json)


def finish(result: dict[str, object], path: Path | None) -> None:
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
