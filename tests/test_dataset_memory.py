"""Forked loader workers share what they inherit instead of copying it: the file list of an ImageNet-sized
folder, and the parent's Python objects when a worker's garbage collector runs."""

from __future__ import annotations

import gc
import multiprocessing
import os
import pickle
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.io import encode_jpeg

from shufflenetv2.config import Config
from shufflenetv2.data import ImageFolderDataset, SampleTable, SubsetDataset, build_loader

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")


def linked_tree(root: Path, classes: int, per_class: int, name_length: int) -> Path:
    """``classes`` folders of hard links to one JPEG, with long names so the file list weighs megabytes."""
    source = root / "source.jpg"
    source.write_bytes(encode_jpeg(torch.zeros(3, 8, 8, dtype=torch.uint8)).numpy().tobytes())
    for c in range(classes):
        folder = root / "train" / f"class{c:03d}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            os.link(source, folder / (f"{i:06d}".rjust(name_length, "x") + ".jpg"))
    return root / "train"


def private_mib() -> float:
    with open("/proc/self/smaps_rollup") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Private_Dirty:")) / 1024


def private_mib_added_by(read: Callable[[], None]) -> float:
    """How much memory a forked child makes its own while it runs ``read``, as a DataLoader worker would
    (``Private_Dirty`` of ``/proc/self/smaps_rollup``).  The garbage collector is off in the child: a full
    collection writes to every object it tracks, the parent's other objects too, which would hide what
    reading alone copies."""

    def child(conn: multiprocessing.connection.Connection) -> None:
        gc.disable()
        before = private_mib()
        read()
        conn.send(private_mib() - before)

    receive, send = multiprocessing.get_context("fork").Pipe(duplex=False)
    process = multiprocessing.get_context("fork").Process(target=child, args=(send,))
    process.start()
    added = receive.recv()
    process.join()
    return added


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps_rollup")


@linux_only
def test_a_forked_worker_reading_every_sample_does_not_copy_the_file_list(tmp_path: Path) -> None:
    dataset = ImageFolderDataset(linked_tree(tmp_path, classes=20, per_class=3000, name_length=140))
    samples = dataset.samples
    as_tuples = [samples[i] for i in range(len(samples))]  # the list of tuples torchvision's ImageFolder keeps

    def read_table() -> None:
        for i in range(len(samples)):
            path, _ = samples[i]  # as ImageFolderDataset.prepare reads a sample
            len(path)

    def read_tuples() -> None:
        for i in range(len(as_tuples)):
            path, _ = as_tuples[i]
            len(path)

    table, tuples = private_mib_added_by(read_table), private_mib_added_by(read_tuples)
    # the control shows the measurement sees copying: 60,000 tuples of ~200-character paths are ~19 MiB
    assert tuples > 10, f"the control child copied only {tuples:.1f} MiB of the list of tuples"
    assert table < 2, f"a child reading the SampleTable made {table:.1f} MiB its own (the tuples: {tuples:.1f})"


def test_sample_table_is_a_sequence_of_path_label_pairs(tmp_path: Path) -> None:
    pairs = [("/data/a/1.jpg", 0), ("/data/ü/ž.JPEG", 1), ("", 2), (os.fsdecode(b"/data/\xff\xfe.jpg"), 1)]
    table = SampleTable([path for path, _ in pairs], [label for _, label in pairs])
    assert len(table) == 4 and list(table) == pairs and table[-1] == pairs[-1]
    assert os.fsencode(table[3][0]) == b"/data/\xff\xfe.jpg"  # a name that is not UTF-8 comes back as itself
    with pytest.raises(IndexError):
        table[4]
    with pytest.raises(IndexError):
        table[-5]
    assert list(pickle.loads(pickle.dumps(table))) == pairs  # what a spawned worker receives
    assert list(SampleTable([], [])) == []
    with pytest.raises(ValueError, match="2 paths but 1 labels"):
        SampleTable(["a", "b"], [0])


@pytest.mark.skipif(sys.platform != "linux", reason="Linux lets a file name be any bytes")
def test_a_file_name_that_is_not_utf8_is_indexed_and_read(tmp_path: Path) -> None:
    folder = tmp_path / "train" / "ants"
    folder.mkdir(parents=True)
    image = torch.arange(3 * 16 * 16, dtype=torch.int64).remainder(251).to(torch.uint8).reshape(3, 16, 16)
    with open(os.path.join(os.fsencode(folder), b"caf\xe9.jpg"), "wb") as f:  # Latin-1, as old archives have
        f.write(encode_jpeg(image, quality=100).numpy().tobytes())
    dataset = ImageFolderDataset(tmp_path / "train")
    loaded, label = dataset[0]
    assert label == 0 and loaded.shape == (3, 16, 16)
    assert os.fsencode(dataset.samples[0][0]).endswith(b"caf\xe9.jpg")


def test_a_subset_keeps_labels_and_order(tmp_path: Path) -> None:
    dataset = ImageFolderDataset(linked_tree(tmp_path, classes=3, per_class=4, name_length=8))
    subset = SubsetDataset(dataset, [11, 0, 5])
    assert subset.targets == [2, 0, 1] and len(subset) == 3
    assert subset[0][1] == 2 and subset[2][1] == 1


class CollectingProbe(Dataset):
    """Each sample is what a full garbage collection in the worker made private, and the worker's count of
    frozen objects."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> tuple[float, int]:
        before = private_mib()
        gc.collect()
        return private_mib() - before, gc.get_freeze_count()


@linux_only
def test_a_workers_garbage_collection_leaves_the_parents_objects_shared() -> None:
    import torchvision  # noqa: F401  (the parent's heap holds what a training run imports)

    plain = DataLoader(CollectingProbe(), batch_size=None, num_workers=1, multiprocessing_context="fork")
    plain_copied, plain_frozen = next(iter(plain))
    cfg = Config(dataset="imagefolder", batch_size=1, num_parallel_workers=1)
    ours = build_loader(cfg, CollectingProbe(), train=False)  # the loader train.py and validate.py use
    batch = next(iter(ours))
    copied, frozen = batch.images.item(), batch.targets.item()
    # the control: a plain worker's first full collection writes to the parent's objects, tens of MiB
    assert plain_copied > 20 and plain_frozen == 0, (plain_copied, plain_frozen)
    assert copied < 5 and frozen > 10_000, (copied, frozen)
    assert gc.get_freeze_count() == 0  # the parent's own collector is as it was
