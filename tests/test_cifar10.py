"""Real data: shufflenet_v2_x0_5 learns CIFAR-10 (a class-balanced subset of the team's JPEG archive) on CPU."""

from __future__ import annotations

import re
import tarfile
import time
from collections import Counter
from pathlib import Path

import pytest

from shufflenetv2.checkpoint import list_checkpoints
from shufflenetv2.config import Config, from_dict, load_yaml
from shufflenetv2.engine import train, validate

from .conftest import REPO, shared_file

ARCHIVE = "data/cifar10-jpg.tar.gz"
RECIPE = REPO / "configs" / "shufflenetv2" / "shufflenet_v2_0.5_cifar10_subset_ci.yaml"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
PER_CLASS = {"train": 500, "test": 100}  # 5,000 training and 1,000 validation images
# [one top-level folder/]train|test/<class>/<file>.jpg and nothing else: no "..", no absolute or nested paths
_MEMBER = re.compile(r"^(?:\./)?(?:\w[\w.-]*/)?(train|test)/([a-z]+)/([\w-]+\.jpe?g)\Z", re.IGNORECASE)
MIN_TOP1 = 0.30  # measured 0.399-0.426 over 3 seeds (see the test's docstring); chance is 0.10


def extract_subset(archive: Path, dest: Path, per_class: dict[str, int]) -> dict[str, Counter]:
    """The first ``per_class[split]`` images of every class of each split, in archive order, under ``dest``.

    The archive is read once, front to back (``r:gz`` streams: no seeking, no ``extractall`` of 60,000
    files), and reading stops as soon as every quota is met.  Only regular files whose names have the
    ImageFolder shape are taken, and their bytes go to paths built here from the validated parts, never
    from the raw member name, so neither "../" names nor links can write outside ``dest``.
    """
    counts: dict[str, Counter] = {split: Counter() for split in per_class}
    wanted = sum(per_class.values()) * len(CLASSES)
    taken = 0
    with tarfile.open(archive, mode="r:gz") as tar:
        for member in tar:
            if not member.isfile():
                continue
            match = _MEMBER.match(member.name)
            if match is None:
                continue
            split, label, name = match.groups()
            if split not in per_class or label not in CLASSES or counts[split][label] >= per_class[split]:
                continue
            source = tar.extractfile(member)
            assert source is not None
            target = dest / split / label / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read())
            counts[split][label] += 1
            taken += 1
            if taken == wanted:
                break
    return counts


@pytest.fixture(scope="module")
def cifar10_subset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``<tmp>/train/<class>/`` (500 each) and ``<tmp>/test/<class>/`` (100 each), extracted once per module."""
    archive = shared_file(ARCHIVE)
    root = tmp_path_factory.mktemp("cifar10_subset")
    start = time.perf_counter()
    counts = extract_subset(archive, root, PER_CLASS)
    seconds = time.perf_counter() - start
    for split, quota in PER_CLASS.items():
        assert counts[split] == dict.fromkeys(CLASSES, quota), f"{archive} {split}: {dict(counts[split])}"
    print(f"\n{archive}: extracted {sum(PER_CLASS.values()) * len(CLASSES)} images in {seconds:.1f} s")
    return root


def subset_config(data: Path, out: Path, **overrides: object) -> Config:
    """The CI recipe with this run's data and run directory."""
    return from_dict({**load_yaml(RECIPE), "data_dir": str(data), "ckpt_save_dir": str(out), **overrides})


def test_extraction_is_balanced_and_contained(cifar10_subset: Path) -> None:
    for split, quota in PER_CLASS.items():
        folders = sorted(p.name for p in (cifar10_subset / split).iterdir())
        assert folders == list(CLASSES)
        assert all(len(list((cifar10_subset / split / c).iterdir())) == quota for c in CLASSES)
    assert sorted(p.name for p in cifar10_subset.iterdir()) == ["test", "train"]


def test_member_names_outside_the_layout_are_refused() -> None:
    good = ("train/cat/0001.jpg", "cifar10/test/ship/42.jpeg", "./train/dog/7.JPG", "./cifar-10/test/cat/1.jpg")
    bad = (
        "../train/cat/1.jpg", "/train/cat/1.jpg", "train/../../x.jpg", "train/cat/../../evil.jpg", "..\\x.jpg",
        "a/b/train/cat/1.jpg", "train/cat/sub/1.jpg", "train/cat/1.png", "val/cat/1.jpg", "train/cat/.jpg",
        "train/cat/1.jpg/", "train/cat/1.jpg\n", ".../train/cat/1.jpg",
    )  # fmt: skip
    assert all(_MEMBER.match(name) for name in good)
    assert not any(_MEMBER.match(name) for name in bad)


@pytest.mark.slow
def test_learns_cifar10_subset_on_cpu(cifar10_subset: Path, tmp_path: Path) -> None:
    """7 epochs of 5,000 CIFAR-10 images at 64 px reach about 41 % top-1 on 1,000 test images (chance 10 %).

    Measured on the 2-core CPU machine (torch 2.14 CPU, eager, 2 loader workers, other jobs sharing it at times);
    "train" is train()'s wall time, validation after each epoch included:

        seed 42 (this test): top-1 42.6 %, top-5 89.6 %, loss 1.601, train 156-189 s (3 runs)
        seed 7:              top-1 39.9 %, top-5 89.2 %, loss 1.623, train 166 s
        seed 0:              top-1 41.1 %, top-5 89.0 %, loss 1.618, train 151 s

    Extracting the 6,000 images (one pass over the 20 MB archive): 3.2-3.9 s.  The whole module took
    188-198 s under pytest (213-223 s with interpreter start-up).  Image size, 8 epochs, seed 42: 32 px (native)
    31.6 %, 48 px 38.7 %, 64 px 43.4 %; eager CPU steps are overhead-bound, so 64 px costs about the same.
    MIN_TOP1 = 30 % sits 10 points under the worst seed (runs are deterministic for a given seed, torch
    build and CPU; other versions or CPUs take other trajectories) and 20 points above chance.

    Command: .venv/bin/python -m pytest -q tests/test_cifar10.py -s  (other seeds: train.py -c RECIPE
    --data_dir <extracted subset> --seed 7, which gave the figures above).
    """
    out = tmp_path / "run"
    start = time.perf_counter()
    result = train(subset_config(cifar10_subset, out))
    seconds = time.perf_counter() - start
    last = result.last
    assert last is not None and result.epochs == 7 and last.count == 1000
    print(f"\ncifar10 subset: top-1 {last.top1:.4f}  top-5 {last.top5:.4f}  loss {last.loss:.4f}  {seconds:.1f} s")
    assert last.top1 >= MIN_TOP1, f"top-1 {last.top1:.3f} after {result.epochs} epochs"
    assert last.top5 >= 0.70 and last.loss < 2.0  # chance: top-5 50 %, loss ln 10 = 2.30

    names = {p.name for p in out.iterdir()}
    assert {"curves.png", "result.log", "shufflenet_v2_x0_5_best.safetensors"} <= names
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((out / "result.log").read_text().splitlines()) == 1 + 7  # header + one row per epoch
    assert result.best_path == out / "shufflenet_v2_x0_5_best.safetensors"
    assert result.best_top1 is not None and result.best_top1 >= last.top1

    final = list_checkpoints(out)[-1]
    assert final.epoch == 7 and final.weights == result.last_checkpoint
    again = validate(subset_config(cifar10_subset, out, ckpt_path=str(final.weights)))
    assert again.count == last.count
    assert again.top1 == pytest.approx(last.top1, abs=1e-6)
    assert again.loss == pytest.approx(last.loss, abs=1e-4)
