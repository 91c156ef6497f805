"""Input-pipeline speed per CPU core on real image files: ours against torchvision's classic pipeline.

Each pipeline runs in this process on one thread, so its img/s is per core and counts all the CPU work
an image costs: reading and decoding the file, the per-image transforms, collating batches and, for
the fast pipeline, the batch-level jitter/normalisation (``pipeline.BatchTransform`` on the CPU; on a
GPU that part leaves the CPU).  A DataLoader with N workers scales these figures by about N.

Rows (train: RandomResizedCrop(224) + flip + ColorJitter(0.4) + normalise; eval: resize 256, crop 224):
``torchvision-classic`` is torchvision's ImageFolder with PIL transforms, as in its references;
``ours-per-image`` is this package's ``data_pipeline classic`` (transforms v2 on uint8 tensors);
``ours-fast`` is ``data_pipeline fast`` (the default), its batch step on this CPU included (compiled by
numba when the fast-cpu extra is installed, ``batch_kernel``);
``ours-fast-torch-step`` is ``ours-fast`` with that batch step in torch's ops, as it runs without numba;
``ours-fast-one-pass`` is ``ours-fast`` fetching one sample at a time, each read, drawn, decoded and
resized before the next, where the loader fetches a batch in two passes (``SeededDataset.__getitems__``);
``ours-fast-whole-decode`` (train only) is ``ours-fast`` decoding whole JPEGs instead of the crop box alone,
which is what it does without libjpeg-turbo 3 (``jpeg_region``): the same pixels, slower;
``ours-fast-workers`` is the same without the batch step: the CPU's share when that step runs on a GPU;
``ours-device-decode-workers`` is the CPU's share with ``decode_on_device True`` (reading, header, draws).
The last two leave work to a GPU, so they say what a GPU machine's CPU cores must sustain, nothing more.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .bench import check_threads
from .config import Config

# .data and .pipeline are imported where they are used: they import torchvision, which imports
# torch._dynamo, 1.5 s here that every command would pay, since the CLI's parser reads DATA_BACKENDS.

TRAIN_ONLY = ("ours-fast-whole-decode",)  # the eval transform never decodes a region
DATA_BACKENDS = (
    "torchvision-classic",
    "ours-per-image",
    "ours-fast",
    "ours-fast-torch-step",
    "ours-fast-one-pass",
    "ours-fast-whole-decode",
    "ours-fast-workers",
    "ours-device-decode-workers",
)


@dataclasses.dataclass
class DataRow:
    split: str  # "train" or "eval" transform
    backend: str
    images_per_second: float  # per core, median round
    spread: tuple[float, float]
    ms_per_image: float
    images: int  # images per round
    rounds: list[float] = dataclasses.field(default_factory=list)  # images/s per round, shared by the split's rows


def torchvision_classic(root: Path, train: bool, size: int = 224) -> torch.utils.data.Dataset:
    from torchvision import datasets
    from torchvision import transforms as T

    normalize = [T.ToTensor(), T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])]
    if train:
        steps = [T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ColorJitter(0.4, 0.4, 0.4), *normalize]
    else:
        steps = [T.Resize(round(size / 0.875)), T.CenterCrop(size), *normalize]
    return datasets.ImageFolder(str(root), transform=T.Compose(steps))


def ours(root: Path, train: bool, backend: str, size: int = 224) -> tuple[torch.utils.data.Dataset, Callable | None]:
    from .data import SeededDataset, build_dataset
    from .pipeline import build_batch_transform

    pipeline = "classic" if backend == "ours-per-image" else "fast"
    cfg = Config(
        dataset="imagefolder", data_dir=str(root.parent), image_resize=size, data_pipeline=pipeline,
        decode_on_device=backend == "ours-device-decode-workers",
    )  # fmt: skip
    folder = build_dataset(cfg, root.name, train=train)
    if backend == "ours-fast-whole-decode":
        folder.transform.decode_region = False
    if backend not in ("ours-fast", "ours-fast-torch-step", "ours-fast-one-pass", "ours-fast-whole-decode"):
        return SeededDataset(folder), None  # no batch step: the per-image pipeline, or the CPU's share alone
    return SeededDataset(folder), build_batch_transform(cfg, train, compiled=backend != "ours-fast-torch-step")


def epoch_runner(
    dataset: torch.utils.data.Dataset, finish: Callable | None, count: int, batch: int, one_by_one: bool = False
) -> Callable:
    """Load ``count`` images in batches, as a training step would receive them and as the DataLoader
    fetches them: our datasets a batch at a time through the loader's per-sample seeding
    (``SeededDataset.__getitems__``, part of their cost; ``one_by_one`` fetches each sample alone),
    torchvision's ImageFolder one sample at a time."""
    from .data import SeededDataset, collate_train

    seeded = isinstance(dataset, SeededDataset)

    def run() -> None:
        for start in range(0, count, batch):
            indices = [i % len(dataset) for i in range(start, min(start + batch, count))]
            if seeded and one_by_one:
                samples = [dataset[(i, 1000 + i)] for i in indices]
            elif seeded:
                samples = dataset.__getitems__([(i, 1000 + i) for i in indices])
            else:
                samples = [dataset[i] for i in indices]
            images = collate_train(samples)  # what the loader's workers do
            if finish is not None:
                finish(images.images, images.params)

    return run


def benchmark_pipelines(
    train_root: Path, eval_root: Path, backends: list[str], count: int = 96, batch: int = 32, repeats: int = 5
) -> list[DataRow]:
    """Per-core img/s of each pipeline, the backends of a split taking turns within each round."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows: list[DataRow] = []
    try:
        for split, root in (("train", train_root), ("eval", eval_root)):
            runs = []
            measured_backends = [b for b in backends if split == "train" or b not in TRAIN_ONLY]
            for backend in measured_backends:
                if backend == "torchvision-classic":
                    run = epoch_runner(torchvision_classic(root, split == "train"), None, count, batch)
                else:
                    dataset, finish = ours(root, split == "train", backend)
                    run = epoch_runner(dataset, finish, count, batch, one_by_one=backend == "ours-fast-one-pass")
                run()  # warm-up: file cache, first-call allocations
                runs.append(run)
            rates: list[list[float]] = [[] for _ in runs]
            for _ in range(repeats):
                for index, run in enumerate(runs):
                    torch.manual_seed(index)
                    start = time.perf_counter()
                    run()
                    rates[index].append(count / (time.perf_counter() - start))
                    check_threads(1, f"in a round of {measured_backends[index]}")
            for backend, measured in zip(measured_backends, rates, strict=True):
                median = statistics.median(measured)
                spread = (min(measured), max(measured))
                rows.append(DataRow(split, backend, median, spread, 1000 / median, count, measured))
                print(format_data_row(rows[-1]), flush=True)
    finally:
        torch.set_num_threads(threads)
    return rows


def format_data_row(row: DataRow) -> str:
    low, high = row.spread
    return (
        f"data {row.split:5s} {row.backend:22s} {row.images_per_second:8.1f} img/s per core "
        f"({low:.1f}..{high:.1f})  {row.ms_per_image:6.2f} ms/image"
    )
