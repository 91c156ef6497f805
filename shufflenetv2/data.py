"""Data: image decoding, MindCV's transforms, datasets, loaders and batch mixing.

MindCV decodes with MindSpore's C++ ops and applies its augmentations on HWC uint8 arrays; here
images are decoded to uint8 CHW RGB tensors and go through ``torchvision.transforms.v2`` with the
same parameters (see ``build_transform``).  Every problem a user can cause or fix (a wrong
``data_dir``, a missing split, an unreadable file, an offline download) is a ``DataError`` whose
message says what to do, because a traceback from deep inside a DataLoader worker does not.
"""

from __future__ import annotations

import contextlib
import gc
import io
import itertools
import json
import math
import operator
import os
import random
import re
import shutil
import socket
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, default_collate
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode

from .config import Config
from .errors import DataError
from .interrupt import ignore_in_worker, reap_workers_at_exit

try:  # torchvision 0.29 deprecated its image codecs (TorchCodec replaces them); PIL remains as fallback
    from torchvision.io import ImageReadMode, decode_image
except ImportError:  # pragma: no cover - a torchvision without image codecs
    decode_image = None

# The deprecation warning would otherwise be raised once per decoded image; the fallback covers removal.
warnings.filterwarnings(
    "ignore", message="The image decoding and encoding capabilities of TorchVision", category=DeprecationWarning
)

MAX_IMAGE_PIXELS = 89_478_485  # PIL's own warning threshold (about 9,459 x 9,459); ImageNet's largest is ~20 M
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
FOLDER_DATASETS = ("imagenet", "imagefolder")
TORCHVISION_DATASETS = ("cifar10", "cifar100", "mnist")

Batch = tuple[Tensor, Tensor]

# ---------------------------------------------------------------------------------------------------
# Decoding


def load_image(path: str | os.PathLike[str]) -> Tensor:
    """The image at ``path`` as a uint8 tensor of shape (3, H, W), RGB.

    torchvision's decoders (JPEG, PNG, GIF, WebP) are tried first because they are faster than PIL
    and give identical pixels; PIL covers the rest (BMP, TIFF, PPM/PGM).  Like PIL's ``convert("RGB")``
    (what MindCV's pipeline amounts to), grey images are replicated to three channels, alpha is
    dropped, palettes are expanded, the first frame of an animation is used and EXIF orientation is
    NOT applied.  Anything unreadable raises ``DataError`` naming the file, so a caller can decide to
    skip and count it.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read image {path}: {exc.strerror or exc}") from None
    if not raw:
        raise DataError(f"cannot decode image {path}: the file is empty; remove it or replace it with the image")
    _refuse_huge(path, raw)
    try:
        if decode_image is None:
            raise RuntimeError("torchvision cannot decode images")
        image = decode_image(torch.frombuffer(bytearray(raw), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError:
        image = _decode_with_pil(path, raw)
    if image.ndim == 4:  # animated GIF: the first frame, as PIL gives
        image = image[0]
    if image.dtype != torch.uint8:  # 16-bit PNG: keep the 8 most significant bits
        image = v2.functional.to_dtype(image, torch.uint8, scale=True)
    return image


def _refuse_huge(path: Path, raw: bytes) -> None:
    """Read only the header: a few kilobytes can declare gigapixels (a decompression bomb)."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw)) as img:
                width, height = img.size
    except Image.DecompressionBombError:
        width, height = MAX_IMAGE_PIXELS + 1, 1  # PIL refuses twice its own limit before telling the size
    except Exception:  # not a format PIL identifies: the decoders below give the error
        return
    if width * height > MAX_IMAGE_PIXELS:
        size = f"{width} x {height} pixels" if height > 1 else "more pixels than PIL will open"
        raise DataError(
            f"cannot decode image {path}: it declares {size}, above the limit of {MAX_IMAGE_PIXELS:,} "
            "(a decompression bomb, or a scan far larger than a training image); downscale or remove it"
        )


def _decode_with_pil(path: Path, raw: bytes) -> Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(raw)) as img:
            rgb = img.convert("RGB")
    except UnidentifiedImageError:
        raise DataError(
            f"cannot decode image {path}: it is in no image format torchvision or PIL knows (it starts with "
            f"{raw[:16]!r}); remove the file or replace it with a valid image"
        ) from None
    except Exception as exc:  # PIL's plugins raise many types for corrupt files
        raise DataError(
            f"cannot decode image {path}: neither torchvision nor PIL can read it ({exc}); "
            "remove the file or replace it with a valid image"
        ) from None
    return torch.from_numpy(np.array(rgb)).permute(2, 0, 1).contiguous()


# ---------------------------------------------------------------------------------------------------
# Transforms

# MindCV's Inter names -> tensor-capable torchvision modes.  Tensors have no AREA mode: antialiased
# bilinear (a triangle filter as wide as the scale factor) is the nearest equivalent when shrinking.
_INTERPOLATION = {
    "nearest": InterpolationMode.NEAREST,
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "area": InterpolationMode.BILINEAR,
    "lanczos": InterpolationMode.LANCZOS,
}

AUTO_AUGMENT_FORMS = (
    "randaug-m<magnitude 0..10>[-n<ops>][-mstd<std>][-inc<0|1>][-w<idx>][-mmax<max>] (e.g. randaug-m9-mstd0.5-inc1)",
    "autoaug, autoaugr or 3a, optionally with -mstd<std> (AutoAugment, ImageNet policy)",
    "trivialaugwide",
    "augmix[-m<severity 1..10>][-w<width>][-d<depth>][-a<alpha>][-mstd<std>][-b<0|1>]",
)


def interpolation_mode(name: str) -> InterpolationMode:
    try:
        return _INTERPOLATION[name]
    except KeyError:
        raise DataError(f"interpolation must be one of {', '.join(_INTERPOLATION)}, got {name!r}") from None


def _parse_policy(text: str, allowed: Sequence[str]) -> tuple[str, dict[str, float]]:
    """``"randaug-m9-mstd0.5"`` -> ``("randaug", {"m": 9.0, "mstd": 0.5})``, or a DataError."""
    head, *sections = text.strip().lower().split("-")
    options: dict[str, float] = {}
    for section in sections:
        match = re.fullmatch(r"([a-z]+)(\d+(?:\.\d*)?)?", section)
        if match is None or match.group(1) not in allowed:
            raise _unknown_policy(text, f"section {section!r} is not understood")
        options[match.group(1)] = float(match.group(2) or 1)
    return head, options


def _unknown_policy(text: str, why: str) -> DataError:
    forms = "; ".join(AUTO_AUGMENT_FORMS)
    return DataError(f"auto_augment {text!r}: {why}. Accepted forms: {forms}. Or leave auto_augment unset (None)")


def build_auto_augment(text: str, cfg: Config) -> v2.Transform:
    """The torchvision policy for one of MindCV's ``auto_augment`` strings.

    MindCV's policies are timm's; torchvision's are close but not identical: magnitude noise
    (``mstd``), increasing-severity ops (``inc``) and choice weights (``w``) are accepted and ignored.
    RandAugment magnitudes keep timm's 0..10 scale (101 bins, so 9 means 90 % of each op's range).
    As in MindCV, geometric ops fill with the dataset mean and use the configured interpolation
    (bicubic and lanczos fall back to bilinear: tensors cannot be warped with them).
    """
    interpolation = InterpolationMode.NEAREST if cfg.interpolation == "nearest" else InterpolationMode.BILINEAR
    fill = [min(255, round(m)) for m in cfg.mean]
    name = text.strip().lower()
    if name.startswith("randaug"):
        head, opts = _parse_policy(name, ("m", "n", "mstd", "inc", "w", "mmax"))
        magnitude = opts.get("m", 10.0)
        if head != "randaug" or not 0 <= magnitude <= 10 or opts.get("n", 2) < 1:
            raise _unknown_policy(text, "RandAugment needs a magnitude m in 0..10 and at least one op (n)")
        return v2.RandAugment(
            num_ops=int(opts.get("n", 2)),
            magnitude=round(magnitude * 10),
            num_magnitude_bins=101,
            interpolation=interpolation,
            fill=fill,
        )
    if name.split("-")[0] in ("autoaug", "autoaugr", "3a"):
        _parse_policy(name, ("mstd",))
        return v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET, interpolation=interpolation, fill=fill)
    if name == "trivialaugwide":
        return v2.TrivialAugmentWide(interpolation=interpolation, fill=fill)
    if name.startswith("augmix"):
        head, opts = _parse_policy(name, ("m", "w", "d", "a", "mstd", "b"))
        if head != "augmix" or not 1 <= opts.get("m", 3) <= 10:
            raise _unknown_policy(text, "AugMix needs a severity m in 1..10")
        depth = int(opts.get("d", -1))
        return v2.AugMix(
            severity=int(opts.get("m", 3)),
            mixture_width=int(opts.get("w", 3)),
            chain_depth=depth if depth > 0 else -1,
            alpha=opts.get("a", 1.0),
            interpolation=interpolation,
            fill=fill,
        )
    raise _unknown_policy(text, "unknown policy")


def build_transform(cfg: Config, train: bool) -> v2.Compose:
    """MindCV's ImageNet pipeline on uint8 CHW tensors, ending in a normalised float32 tensor.

    Train: RandomResizedCrop -> flips -> auto-augment policy or ColorJitter -> normalise ->
    RandomErasing.  Eval: resize the shorter side to ``floor(image_resize / crop_pct)`` -> centre
    crop.  ``cfg.mean``/``cfg.std`` are on 0..255 pixels as in MindCV, so they are divided by 255
    for the 0..1 tensors; erasing comes after normalising, so ``re_value`` 0 means "the mean".
    """
    interpolation = interpolation_mode(cfg.interpolation)
    normalize = [
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=[m / 255 for m in cfg.mean], std=[s / 255 for s in cfg.std]),
    ]
    if not train:
        resize = math.floor(cfg.image_resize / cfg.crop_pct)
        return v2.Compose(
            [
                v2.Resize(resize, interpolation=interpolation, antialias=True),
                v2.CenterCrop(cfg.image_resize),
                *normalize,
            ]
        )
    steps: list[v2.Transform] = [
        v2.RandomResizedCrop(
            cfg.image_resize, scale=cfg.scale, ratio=cfg.ratio, interpolation=interpolation, antialias=True
        )
    ]
    if cfg.hflip > 0:
        steps.append(v2.RandomHorizontalFlip(cfg.hflip))
    if cfg.vflip > 0:
        steps.append(v2.RandomVerticalFlip(cfg.vflip))
    if cfg.auto_augment:
        steps.append(build_auto_augment(cfg.auto_augment, cfg))
    elif cfg.color_jitter:
        steps.append(v2.ColorJitter(cfg.color_jitter, cfg.color_jitter, cfg.color_jitter))
    steps += normalize
    if cfg.re_prob > 0:
        steps.append(v2.RandomErasing(p=cfg.re_prob, scale=cfg.re_scale, ratio=cfg.re_ratio, value=cfg.re_value))
    return v2.Compose(steps)


# ---------------------------------------------------------------------------------------------------
# Datasets


class SampleTable(Sequence[tuple[str, int]]):
    """``(path, label)`` pairs kept in NumPy arrays instead of a tuple and a string object per sample.

    A DataLoader worker is a fork of the process that built the dataset and shares its memory until it
    writes to it, and reading a Python object writes its reference count.  With a list of tuples, each
    worker thus copies the pages it reads and ends an epoch holding its own copy of the whole list.  For
    an ImageNet-sized folder each worker ended an epoch with 325 MiB of its own that way, 29 MiB with
    this table and ``SharingLoader`` (``benchmarks/dataset_scale.py``): 20 GB against 1.9 over MindCV's
    8 workers x 8 devices.  Arrays are read without a write; they also pickle in one piece for spawned
    workers.

    The paths are one buffer of file-system bytes separated by NULs, which no path contains.  They are
    encoded as ``os.fsencode`` would, so a file name that is not valid UTF-8 comes back as the same name.
    """

    def __init__(self, paths: Sequence[str], labels: Sequence[int]) -> None:
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        joined = "\0".join(paths).encode(_FS_ENCODING, _FS_ERRORS)
        self._bytes = np.frombuffer(joined, dtype=np.uint8)
        self._ends = np.append(np.flatnonzero(self._bytes == 0), len(joined)) if paths else np.zeros(0, np.int64)
        self._labels = np.array(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, index: int) -> tuple[str, int]:  # type: ignore[override]
        index = operator.index(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"sample {index} of {len(self)}")
        index %= len(self)
        start = int(self._ends[index - 1]) + 1 if index else 0
        path = self._bytes[start : int(self._ends[index])].tobytes().decode(_FS_ENCODING, _FS_ERRORS)
        return path, int(self._labels[index])


_FS_ENCODING, _FS_ERRORS = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()  # os.fsencode's


class ImageFilesDataset(Dataset):
    """Image files with their labels, decoded through ``load_image`` (or the fast pipeline's own reader),
    so every unreadable file is a ``DataError`` that names it.  Returns ``(transform(image), label)``.

    ``predict`` labels each file with its position: the labels of a loader batch then say which of its
    files were read."""

    def __init__(
        self, paths: Sequence[str], labels: Sequence[int], transform: Callable[[Tensor], Any] | None = None
    ) -> None:
        self.transform = transform
        self.targets = labels
        self.samples = SampleTable(paths, labels)
        self.source = ""

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return self.prepare(index)()

    def prepare(self, index: int) -> Callable[[], tuple[Any, int]]:
        """Sample ``index`` in two halves, for ``SeededDataset.__getitems__``: this call draws every random
        number the sample needs, the callable it returns does the rest and draws none."""
        path, label = self.samples[index]
        if hasattr(self.transform, "plan"):  # the fast pipeline decodes the file itself (pipeline.py)
            rest = self.transform.plan(path)
            return lambda: (rest(), label)
        image = load_image(path)
        sample = (self.transform(image) if self.transform is not None else image), label
        return lambda: sample


class ImageFolderDataset(ImageFilesDataset):
    """``root/<class>/**/<image>``: classes sorted by folder name, samples in sorted path order.

    Our own (not torchvision's ImageFolder) so that decoding goes through ``load_image`` and every
    layout problem is a ``DataError`` that says what to fix.
    """

    def __init__(self, root: str | os.PathLike[str], transform: Callable[[Tensor], Any] | None = None) -> None:
        self.root = Path(root)
        self.classes, paths, targets = _index_folder(self.root)
        super().__init__(paths, targets, transform)
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.source = str(self.root)


def is_image_name(name: str) -> bool:
    """An image file by its extension (any case), and not hidden."""
    dot = name.rfind(".")
    return dot > 0 and not name.startswith(".") and name[dot:].lower() in IMAGE_EXTENSIONS


def _index_folder(root: Path) -> tuple[list[str], list[str], list[int]]:
    """Class names, image paths and their labels: no object per sample beyond its path, and the labels
    share one int object per class (``SampleTable`` says why that matters)."""
    extensions = " ".join(sorted(IMAGE_EXTENSIONS))
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        loose = sum(1 for e in os.scandir(root) if e.is_file() and is_image_name(e.name))
        found = f" It holds {loose} image files directly; move them into per-class folders." if loose else ""
        raise DataError(
            f"{root} has no class folders. An image-folder split needs one sub-folder per class, "
            f"e.g. {root}/cat/1.jpg and {root}/dog/2.jpg (classes are numbered in sorted folder-name order).{found}"
        )
    paths: list[str] = []
    labels: list[int] = []
    empty = []
    for label, name in enumerate(classes):
        files = []
        visited: set[tuple[int, int]] = set()  # linked folders are followed, but each real folder once
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
            stat = os.stat(dirpath)
            if (stat.st_dev, stat.st_ino) in visited:  # a symlink loop, or a second link to the same folder
                dirnames[:] = []
                continue
            visited.add((stat.st_dev, stat.st_ino))
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            prefix = os.path.join(dirpath, "")
            files += [prefix + f for f in filenames if is_image_name(f)]
        if not files:
            empty.append(name)
        files.sort()
        paths += files
        labels += [label] * len(files)
    if not paths:
        raise DataError(
            f"{root} has {len(classes)} class folder(s) ({_preview(classes)}) but no images in them. "
            f"Image files must end in one of {extensions} (any case); hidden files are ignored."
        )
    if empty:
        warnings.warn(
            f"{root}: {len(empty)} class folder(s) contain no images ({_preview(empty)}); they are kept as "
            "classes so that class indices match the other splits",
            stacklevel=3,
        )
    return classes, paths, labels


def describe_class_difference(
    train: Sequence[str], val: Sequence[str], names: tuple[str, str] = ("training", "validation")
) -> str:
    """Which class names only one of two lists has, for an error message; ``names`` says whose they are."""
    train_names, val_names = set(train), set(val)
    only_train = [c for c in train if c not in val_names]
    only_val = [c for c in val if c not in train_names]
    parts = [f"only in {names[0]}: {_preview(only_train)}"] if only_train else []
    parts += [f"only in {names[1]}: {_preview(only_val)}"] if only_val else []
    return "; ".join(parts) or "the same names in a different order"


def _preview(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _split_dir(data_dir: str, split: str, dataset: str) -> Path:
    """``data_dir/split``, or a DataError saying which part of the layout is missing."""
    layout = f"data_dir/{split}/<class>/<image files>"
    if not data_dir:
        raise DataError(
            f"dataset {dataset} reads images laid out as {layout}, but data_dir is not set. Set data_dir "
            "(in the YAML file or with --data_dir), or try dataset digits, which needs no download."
        )
    base = Path(data_dir).expanduser()
    if not base.exists():
        raise DataError(f"data_dir {base} does not exist. Check the path; dataset {dataset} expects {layout}.")
    if not base.is_dir():
        if base.name.lower().endswith(ARCHIVE_SUFFIXES):
            extract = f"unzip {base} -d DIR" if base.suffix.lower() == ".zip" else f"mkdir DIR && tar -xf {base} -C DIR"
            raise DataError(
                f"data_dir {base} is an archive, not a folder: extract it first ({extract}) and pass the folder "
                f"that holds the split folders; dataset {dataset} expects {layout}."
            )
        raise DataError(f"data_dir {base} is a file, not a folder; dataset {dataset} expects {layout}.")
    root = base / split
    if not root.is_dir():
        subdirs = sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
        have = f"it has: {', '.join(subdirs)}" if subdirs else "it has no sub-folders at all"
        deeper = _holder_below(base, split)
        where = (
            f"{deeper} has one: pass --data_dir {deeper}"
            if deeper
            else "set train_split / val_split to the folder names you have, or point data_dir at the folder that "
            "holds the splits"
        )
        raise DataError(f"data_dir {base} has no {split!r} split folder ({have}). Expected {layout}; {where}.")
    return root


ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar.zst", ".zip")


def _holder_below(base: Path, split: str, depth: int = 4, fan_out: int = 10) -> Path | None:
    """The nearest folder under ``base`` that holds ``split``: an archive extracted with its own top folder
    (``hymenoptera_data/``, ImageNet's ``ILSVRC/Data/CLS-LOC/``).  Only folders with at most ``fan_out``
    sub-folders are entered, so a class folder's thousands of images are never listed."""
    level = [base]
    for _ in range(depth):
        below = []
        for folder in level:
            try:  # scandir's entries know their type without a stat per file
                with os.scandir(folder) as entries:
                    subdirs = sorted(Path(e.path) for e in entries if e.is_dir() and not e.name.startswith("."))
            except OSError:
                continue
            if len(subdirs) > fan_out:
                continue
            holder = next((d for d in subdirs if (d / split).is_dir()), None)
            if holder is not None:
                return holder
            below += subdirs
        level = below
    return None


class ArrayImageDataset(Dataset):
    """In-memory uint8 images (CIFAR, MNIST) served as CHW RGB tensors through the usual transform."""

    def __init__(
        self,
        images: Tensor,
        targets: Sequence[int],
        classes: Sequence[str],
        transform: Callable[[Tensor], Any] | None,
        source: str,
    ) -> None:
        self.images = images  # (N, H, W, 3) or (N, H, W) grey
        self.targets = [int(t) for t in targets]
        self.classes = list(classes)
        self.transform = transform
        self.source = source

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = self.images[index]
        image = image.unsqueeze(0).repeat(3, 1, 1) if image.ndim == 2 else image.permute(2, 0, 1).contiguous()
        return (self.transform(image) if self.transform is not None else image), self.targets[index]


class SubsetDataset(Dataset):
    """Some samples of a dataset, keeping its ``classes`` (so labels keep their meaning)."""

    def __init__(self, base: Any, indices: Sequence[int]) -> None:
        self.base = base
        self.indices = np.asarray(indices, dtype=np.int64)  # an array, for the reason given in SampleTable
        self.classes = base.classes
        self.targets = [base.targets[i] for i in indices]
        self.source = f"{base.source}, a subset of {len(base):,}"

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Any:
        return self.base[int(self.indices[index])]

    def prepare(self, index: int) -> Callable[[], Any]:
        return prepare_sample(self.base, int(self.indices[index]))


def prepare_sample(dataset: Dataset, index: int) -> Callable[[], Any]:
    """``dataset``'s sample ``index`` in two halves where the dataset splits its work (``prepare``): the
    random draws now, the rest in the returned callable.  Other datasets do all of it now."""
    prepare = getattr(dataset, "prepare", None)
    if prepare is not None:
        return prepare(index)
    sample = dataset[index]
    return lambda: sample


def balanced_subset(targets: Sequence[int], num_samples: int, seed: int) -> list[int]:
    """``num_samples`` indices spread over the classes as evenly as their sizes allow, in index order.

    Each class's samples are put in a seeded random order and the classes are dealt from in turn
    (ties broken by a seeded class order), so the subset depends only on (targets, num_samples, seed).
    """
    targets_np = np.asarray(targets, dtype=np.int64)
    if num_samples >= len(targets_np):
        return list(range(len(targets_np)))
    rng = np.random.default_rng(seed)
    classes = np.unique(targets_np)
    class_rank = dict(zip(classes.tolist(), rng.permutation(len(classes)).tolist(), strict=True))
    turn = np.empty(len(targets_np), dtype=np.int64)  # the round in which each sample is dealt
    for c in classes.tolist():
        members = np.flatnonzero(targets_np == c)
        turn[members] = rng.permutation(len(members))
    tie = np.array([class_rank[c] for c in targets_np.tolist()], dtype=np.int64)
    chosen = np.lexsort((tie, turn))[:num_samples]
    return sorted(chosen.tolist())


# --- cifar10 / cifar100 / mnist through torchvision ---------------------------------------------------


def cache_root() -> Path:
    """Where built-in datasets go when data_dir is unset: ``$SHUFFLENETV2_HOME`` or ~/.cache/shufflenetv2."""
    return Path(os.environ.get("SHUFFLENETV2_HOME") or Path.home() / ".cache" / "shufflenetv2").expanduser()


@contextlib.contextmanager
def _network_timeout(seconds: float) -> Iterator[None]:
    """torchvision's downloads use urllib without a timeout; a stalled server must fail, not hang."""
    previous = socket.getdefaulttimeout()
    if previous is None:
        socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _torchvision_dataset(cfg: Config, split: str, transform: Callable[[Tensor], Any] | None) -> ArrayImageDataset:
    from torchvision import datasets

    cls = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100, "mnist": datasets.MNIST}[cfg.dataset]
    root = Path(cfg.data_dir).expanduser() if cfg.data_dir else cache_root() / cfg.dataset
    is_train = split == cfg.train_split
    if cfg.dataset == "mnist":
        urls = [f"{mirror}{name}" for mirror in cls.mirrors for name, _ in cls.resources[:1]]
        files = f"{root}/MNIST/raw/ (the four *-ubyte files; .gz ones are extracted when dataset_download is True)"
    else:
        urls = [cls.url]
        files = (
            f"{root}/{cls.base_folder}/ (the extracted python version; or put {cls.filename} in {root} and set "
            "dataset_download True: a verified archive there is extracted without downloading)"
        )
    try:
        with _network_timeout(60):
            ds = cls(root=str(root), train=is_train, download=cfg.dataset_download)
    except (RuntimeError, OSError) as exc:  # urllib's URLError/HTTPError are OSErrors
        reason = " ".join(str(exc).split())
        if cfg.dataset_download:
            raise DataError(
                f"downloading {cfg.dataset} from {' or '.join(urls)} failed ({reason}). Check the network "
                f"(and any proxy settings) and run again, or fetch the files on a machine with internet "
                f"access and put them in {files}."
            ) from None
        raise DataError(
            f"{cfg.dataset} was not found (or is corrupted) in {root}: torchvision expects {files}. "
            f"Set dataset_download True to download it from {urls[0]}, or put the files there yourself."
        ) from None
    images = torch.as_tensor(ds.data)
    targets = torch.as_tensor(ds.targets).tolist()
    name = "train" if is_train else "test"
    return ArrayImageDataset(images, targets, ds.classes, transform, f"{cfg.dataset} {name} set in {root}")


# --- digits: scikit-learn's bundled 8x8 digits as a real image folder ---------------------------------

DIGITS_MARKER = ".digits-export.json"
DIGITS_SIZE = 32  # each 8x8 digit is stored 4x upscaled by pixel replication (lossless)
_DIGITS_VERSION = 1


def digits_root(cfg: Config) -> Path:
    return Path(cfg.data_dir).expanduser() if cfg.data_dir else cache_root() / "digits"


def _digits_complete(root: Path) -> bool:
    try:
        return json.loads((root / DIGITS_MARKER).read_text()).get("version") == _DIGITS_VERSION
    except (OSError, ValueError):
        return False


def export_digits(root: str | os.PathLike[str]) -> Path:
    """Write scikit-learn's 1,797 digits once as ``root/{train,val}/<digit>/<index>.png`` and return root.

    The export is what makes "digits" useful: an offline dataset that goes through the same file
    pipeline as ImageNet.  It is written into a temporary folder beside ``root`` and renamed into
    place, so a crash or a concurrent rank never leaves a half-written dataset; a complete export
    (marked by ``.digits-export.json``) is reused untouched.  Split: 20 % of each digit (seeded,
    independent of the training seed) is ``val``.  PNGs are 32x32 grey, 0..16 scaled to 0..255.
    """
    root = Path(root)
    if _digits_complete(root):
        return root
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DataError(
            f"{root} exists but is not a digits export, so it is left alone. Point data_dir at a new or "
            "empty folder (or leave data_dir unset to use the cache) for dataset digits."
        )
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("dataset digits needs scikit-learn: pip install scikit-learn") from None
    from PIL import Image

    digits = load_digits()
    pixels = np.clip(np.rint(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    scale = DIGITS_SIZE // pixels.shape[1]
    rng = np.random.default_rng(0)
    counts = {"train": 0, "val": 0}
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".tmp", dir=root.parent))
    try:
        for digit in range(10):
            members = np.flatnonzero(digits.target == digit)
            is_val = np.zeros(len(members), dtype=bool)
            is_val[rng.permutation(len(members))[: round(0.2 * len(members))]] = True
            for index, val in zip(members.tolist(), is_val.tolist(), strict=True):
                split = "val" if val else "train"
                folder = tmp / split / str(digit)
                folder.mkdir(parents=True, exist_ok=True)
                big = pixels[index].repeat(scale, axis=0).repeat(scale, axis=1)
                Image.fromarray(big, mode="L").save(folder / f"{index:04d}.png")
                counts[split] += 1
        info = {"version": _DIGITS_VERSION, "source": "sklearn.datasets.load_digits", "size": DIGITS_SIZE, **counts}
        (tmp / DIGITS_MARKER).write_text(json.dumps(info))
        try:
            with contextlib.suppress(OSError):
                root.rmdir()  # only if empty (checked above): a rename cannot replace a folder everywhere
            os.replace(tmp, root)
        except OSError:
            if not _digits_complete(root):  # a concurrent process (another rank) may have won the race
                raise
    except OSError as exc:
        raise DataError(
            f"cannot write the digits dataset to {root}: {exc}; set data_dir to a writable folder"
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


# --- the entry point -------------------------------------------------------------------------------


def sample_transform(cfg: Config, train: bool) -> Any:
    """What a loader worker does to one file: the whole per-image transform, or the fast pipeline's
    worker half (decoding and cropping to uint8), or with ``decode_on_device`` only reading the bytes."""
    from . import device_input, pipeline  # both build on this module

    if not pipeline.uses_fast_pipeline(cfg):
        return build_transform(cfg, train)
    if cfg.decode_on_device:
        return device_input.build_sample_transform(cfg, train)
    return pipeline.build_sample_transform(cfg, train)


def build_dataset(cfg: Config, split: str, train: bool, *, subset: bool | None = None) -> Dataset:
    """The ``split`` of ``cfg.dataset`` with ``build_transform(cfg, train)`` applied to every image.

    The result has ``.classes`` (list[str]), ``.targets`` (list[int]) and returns ``(image, label)``.
    ``cfg.num_samples`` keeps a seeded, class-balanced subset; like MindCV's train.py it applies to
    training data only unless ``subset`` says otherwise (``subset=True`` for a quick validation).
    """
    transform = sample_transform(cfg, train)
    if cfg.dataset in FOLDER_DATASETS:
        ds: Any = ImageFolderDataset(_split_dir(cfg.data_dir, split, cfg.dataset), transform)
    elif cfg.dataset == "digits":
        root = export_digits(digits_root(cfg))
        ds = ImageFolderDataset(_split_dir(str(root), split, cfg.dataset), transform)
    elif cfg.dataset in TORCHVISION_DATASETS:
        ds = _torchvision_dataset(cfg, split, transform)
    else:
        choices = ", ".join((*FOLDER_DATASETS, *TORCHVISION_DATASETS, "digits"))
        raise DataError(f"dataset must be one of {choices}, got {cfg.dataset!r}")
    use_subset = train if subset is None else subset
    if use_subset and cfg.num_samples is not None and cfg.num_samples < len(ds):
        ds = SubsetDataset(ds, balanced_subset(ds.targets, cfg.num_samples, cfg.seed))
    return ds


def describe_dataset(dataset: Any) -> str:
    """One log line: how many images and classes, and where they come from."""
    classes = getattr(dataset, "classes", None)
    text = f"{len(dataset):,} images"
    if classes is not None:
        text += f", {len(classes)} classes"
    source = getattr(dataset, "source", None)
    return f"{text} ({source})" if source else text


# ---------------------------------------------------------------------------------------------------
# Loaders


class EpochShuffleSampler(Sampler[int]):
    """All indices, shuffled as a function of (seed, epoch) only, so a resumed run sees the same order.

    Uses the same generator recipe as DistributedSampler, so one device and a world of size 1 agree.
    ``set_epoch`` must be called before each epoch, as with DistributedSampler.
    """

    def __init__(self, size: int, shuffle: bool = True, seed: int = 0) -> None:
        self.size = size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.size))
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


class EvalShardSampler(Sampler[int]):
    """Rank ``rank``'s share of an evaluation set: every ``world_size``-th index, nothing padded.

    DistributedSampler pads with repeated samples to even out the shards, which would count some
    validation images twice; here shards differ by at most one and together hold each image once.
    """

    def __init__(self, size: int, rank: int, world_size: int) -> None:
        self.indices = range(rank, size, world_size)

    def set_epoch(self, epoch: int) -> None:  # same interface as the training samplers
        pass

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class SeededSampler(Sampler[tuple[int, int]]):
    """Pairs each index with a seed derived from (seed, epoch, index) for that sample's augmentation.

    Augmentation randomness then depends on neither the worker that happens to load a sample nor how
    long workers have lived, so a run resumed from a checkpoint draws exactly the crops, flips and
    jitters the uninterrupted run would have drawn.
    """

    def __init__(self, sampler: Sampler[int], seed: int) -> None:
        self.sampler, self.seed, self.epoch, self.skip = sampler, seed, 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Start ``epoch``; ``skip`` leaves out its first samples (they were trained on before a resume)."""
        self.epoch, self.skip = epoch, skip
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        base = (self.seed * 1_000_003 + self.epoch) * 2_147_483_629
        keys = ((index, (base + index) % 2**63) for index in self.sampler)
        return itertools.islice(keys, self.skip, None)

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.skip)


class SeededDataset(Dataset):
    """Serves ``(index, seed)`` keys: the sample is drawn with torch's RNG seeded to ``seed``.

    The global generator is restored afterwards, so loading in the main process (no workers) leaves the
    training loop's own random stream (mixup, dropout) untouched.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list[tuple[int, int]]) -> list[Any]:
        """A batch (the DataLoader asks for whole batches), in two passes over it: first every sample's
        reading and random draws, each under its seed, then the decoding and resizing, which draw
        nothing.  The samples are those of one pass per sample, bit for bit; the CPU's caches keep
        each pass's code and data from one image to the next, which takes 0.16 ms (9 %) off an
        ImageNet-sized training JPEG (``pipeline._SampleTransform.plan``)."""
        pending = [self._prepare(key) for key in keys]
        return [rest if isinstance(rest, Unreadable) else _or_unreadable(rest) for rest in pending]

    def _prepare(self, key: tuple[int, int]) -> Callable[[], Any] | Unreadable:
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            # the CPU generator alone: torch.manual_seed also visits every accelerator backend, which
            # costs 0.2 ms per sample (measured), and augmentation draws only from the CPU generator
            torch.default_generator.manual_seed(seed)
            return _or_unreadable(lambda: prepare_sample(self.dataset, index))


def _or_unreadable(work: Callable[[], Any]) -> Any:
    """``work()``, or the ``Unreadable`` that stands in for it: the collate function decides what a bad
    sample means."""
    try:
        return work()
    except DataError as exc:
        return Unreadable(str(exc))


class Unreadable(NamedTuple):
    """Stands in for a sample whose file could not be read; ``reason`` names the file."""

    reason: str


class LoadedBatch(NamedTuple):
    """What the loaders yield: a batch plus the reasons of the samples that could not be read.

    ``images``/``targets`` are None only for an evaluation batch in which nothing could be read.  With
    the fast pipeline ``images`` are uint8 and ``params`` holds what ``pipeline.BatchTransform`` still
    has to apply; with the per-image pipeline they are normalised float32 and ``params`` is None.
    """

    images: Tensor | None
    targets: Tensor | None
    unreadable: tuple[str, ...]
    params: Tensor | None = None


def _collate(items: list[Any], unreadable: tuple[str, ...]) -> LoadedBatch:
    first = items[0][0]
    if hasattr(first, "collate_batch"):  # pipeline.AugmentedImage, device_input.EncodedImage
        images, params = first.collate_batch([image for image, _ in items])
        return LoadedBatch(images, default_collate([target for _, target in items]), unreadable, params)
    images, targets = default_collate(items)
    return LoadedBatch(images, targets, unreadable)


def _partition(items: list[Any]) -> tuple[list[Any], tuple[str, ...]]:
    """The readable samples, and the reasons of the unreadable ones."""
    good = [item for item in items if not isinstance(item, Unreadable)]
    return good, tuple(item.reason for item in items if isinstance(item, Unreadable))


def collate_train(items: list[Any]) -> LoadedBatch:
    """Unreadable samples are replaced by copies of readable ones from the same batch.

    The batch keeps its size, so BatchNorm statistics, compiled graphs and DDP's equal shards are
    unaffected; the loop counts the replacements and stops when there are too many.
    """
    good, bad = _partition(items)
    if not bad:
        return _collate(items, ())
    if not good:
        raise DataError(
            f"no image of a training batch of {len(items)} could be read, e.g. {bad[0]}. Check the dataset "
            "(a failing disk or mount?) and remove or replace the broken files."
        )
    filled = [good[i % len(good)] for i in range(len(items))]
    filled[: len(good)] = good  # readable samples keep their place at the front, copies fill the rest
    return _collate(filled, bad)


def collate_eval(items: list[Any]) -> LoadedBatch:
    """Unreadable samples are left out (never duplicated: metrics count real images only)."""
    good, bad = _partition(items)
    if not good:
        return LoadedBatch(None, None, bad)
    return _collate(good, bad)


def _seed_worker(worker_id: int) -> None:
    """torch seeds each worker (base seed + id); give ``random`` and NumPy the same seed."""
    ignore_in_worker()
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def build_loader(
    cfg: Config, dataset: Dataset, train: bool, rank: int = 0, world_size: int = 1, seed: int | None = None
) -> DataLoader:
    """Batches of ``cfg.batch_size`` per device; call ``loader.sampler.set_epoch(epoch)`` every epoch.

    Train: shuffled per ``cfg.shuffle``, the last partial batch dropped per ``cfg.drop_remainder``.
    Eval: in order, every sample exactly once.  The sample order depends only on (seed, epoch) and
    each sample's augmentation only on (seed, epoch, index), so a resumed run repeats an uninterrupted one.
    Batches are ``LoadedBatch(images, targets, unreadable)``: see ``collate_train`` / ``collate_eval``
    for what happens to files that cannot be read.
    """
    seed = cfg.seed if seed is None else seed
    shuffle = train and cfg.shuffle
    drop_last = train and cfg.drop_remainder
    size = len(dataset)
    sampler: Sampler[int]
    if world_size > 1 and train:
        sampler = DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last
        )
    elif world_size > 1:
        sampler = EvalShardSampler(size, rank, world_size)
    else:
        sampler = EpochShuffleSampler(size, shuffle=shuffle, seed=seed)
    if drop_last and len(sampler) < cfg.batch_size:
        raise DataError(
            f"the training set gives {len(sampler)} images per device, fewer than batch_size "
            f"{cfg.batch_size}, and drop_remainder True drops that partial batch, leaving nothing to train "
            "on. Lower batch_size, set drop_remainder False, or use more images (num_samples)."
        )
    workers = min(cfg.num_parallel_workers, os.cpu_count() or 1)
    if workers:
        reap_workers_at_exit()
    generator = torch.Generator()
    generator.manual_seed(seed + rank)
    return SharingLoader(
        SeededDataset(dataset),
        batch_size=cfg.batch_size,
        sampler=SeededSampler(sampler, seed),
        collate_fn=collate_train if train else collate_eval,
        drop_last=drop_last,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
        worker_init_fn=_seed_worker,
        generator=generator,
    )


class SharingLoader(DataLoader):
    """A DataLoader whose forked workers leave the objects they inherit to the garbage collector's
    frozen generation.

    A full collection in a worker writes to every object it tracks, so without this each worker copies
    every page of the parent's heap that holds one (the modules of torch, the model, the dataset's
    Python objects) the first time its collector runs a full pass.  Freezing them before the fork, as
    Python's documentation of ``gc.freeze`` advises, keeps those pages shared; the parent unfreezes
    at once, so its own collections are as before.  A program that froze objects itself is left as it is.
    Measured (``benchmarks/dataset_scale.py``): after an epoch of an ImageNet-sized folder each worker
    held 29 MiB of its own with this, 106 MiB without.
    """

    def _get_iterator(self) -> Any:  # where DataLoader starts its workers
        if self.num_workers == 0 or gc.get_freeze_count():
            return super()._get_iterator()
        gc.freeze()
        try:
            return super()._get_iterator()
        finally:
            gc.unfreeze()


def stop_workers(loader: DataLoader | None) -> None:
    """Stop ``loader``'s persistent worker processes now rather than whenever the garbage collector gets
    to them.  Collected in a cycle, the iterator can outlive its own queues; its shutdown then puts a
    stop message that no thread delivers, waits 5 s for each worker, sends the SIGTERM these workers
    ignore (``interrupt.ignore_in_worker``) and waits 5 s more: 40 s of whatever the caller ran next,
    after a run with 2 train and 2 eval workers."""
    iterator = getattr(loader, "_iterator", None)  # where torch keeps the persistent-workers iterator
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        loader._iterator = None
        iterator._shutdown_workers()


# ---------------------------------------------------------------------------------------------------
# Mixup / CutMix


class BatchMix:
    """MixUp and/or CutMix on a whole batch, applied with probability ``prob``; returns soft targets.

    Mirrors MindCV's Mixup(prob=cutmix_prob, switch_prob=0.5) in batch mode: one lambda per batch,
    an even choice between MixUp and CutMix when both are on.  Batches left alone still get one-hot
    float targets so the loss always sees the same shape.  No label smoothing here: the loss does it.
    """

    def __init__(self, transform: Callable[[Tensor, Tensor], Batch], num_classes: int, prob: float) -> None:
        self.transform = transform
        self.num_classes = num_classes
        self.prob = prob

    def __call__(self, images: Tensor, labels: Tensor) -> Batch:
        if self.prob >= 1.0 or float(torch.rand(())) < self.prob:
            return self.transform(images, labels)
        return images, torch.nn.functional.one_hot(labels, self.num_classes).float()


def build_mixup(cfg: Config, num_classes: int) -> Callable[[Tensor, Tensor], Batch] | None:
    """A ``(images, int labels) -> (images, soft targets [B, num_classes])`` function, or None when off."""
    if cfg.mixup == 0 and cfg.cutmix == 0:
        return None
    choices: list[v2.Transform] = []
    if cfg.mixup > 0:
        choices.append(v2.MixUp(alpha=cfg.mixup, num_classes=num_classes))
    if cfg.cutmix > 0:
        choices.append(v2.CutMix(alpha=cfg.cutmix, num_classes=num_classes))
    transform = choices[0] if len(choices) == 1 else v2.RandomChoice(choices)
    return BatchMix(transform, num_classes, cfg.cutmix_prob)
