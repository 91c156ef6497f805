"""Data pipeline: decoding, MindCV's transforms, folder layout errors, subsets, digits, loaders, mixing."""

from __future__ import annotations

import dataclasses
import http.server
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from shufflenetv2.config import Config
from shufflenetv2.data import (
    DIGITS_MARKER,
    EpochShuffleSampler,
    EvalShardSampler,
    balanced_subset,
    build_auto_augment,
    build_dataset,
    build_loader,
    build_mixup,
    build_transform,
    describe_dataset,
    load_image,
)
from shufflenetv2.errors import DataError

# torchvision 0.29 deprecates its image codecs; data.py filters the warning at run time, pytest re-enables it
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")


def cfg_for(**values) -> Config:
    """These tests are about the per-image pipeline; tests/test_pipeline.py covers the fast one."""
    base = {"dataset": "imagefolder", "image_resize": 24, "num_parallel_workers": 0, "batch_size": 4}
    base["data_pipeline"] = "classic"
    return dataclasses.replace(Config(), **{**base, **values})


def noise(h: int, w: int, seed: int = 0, channels: int = 3) -> np.ndarray:
    shape = (h, w, channels) if channels > 1 else (h, w)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def save(path: Path, kind: str, h: int, w: int, seed: int = 0) -> None:
    """One image file of a given flavour, to exercise every decoding path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "gray":
        img = Image.fromarray(noise(h, w, seed, 1), "L")
    elif kind == "palette":
        img = Image.fromarray(noise(h, w, seed)).convert("P")
    elif kind == "rgba":
        img = Image.fromarray(noise(h, w, seed, 4), "RGBA")
    else:
        img = Image.fromarray(noise(h, w, seed))
    img.save(path)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """data_dir with train (3 classes, mixed formats and sizes, distractors) and val splits."""
    train = tmp_path / "data" / "train"
    save(train / "b_dog" / "1.jpg", "rgb", 40, 60)
    save(train / "b_dog" / "2.PNG", "gray", 33, 21)
    save(train / "b_dog" / "nested" / "3.png", "palette", 50, 50)
    save(train / "a_cat" / "4.png", "rgba", 64, 48)
    save(train / "a_cat" / "5.JPEG", "gray", 30, 80)
    save(train / "c_bird" / "6.bmp", "rgb", 25, 25)
    save(train / "c_bird" / "7.tiff", "rgb", 26, 29)
    save(train / "c_bird" / ".hidden.jpg", "rgb", 10, 10)  # ignored
    (train / "c_bird" / "notes.txt").write_text("not an image")  # ignored
    (train / ".git").mkdir()  # hidden folder: not a class
    for i, cls in enumerate(("a_cat", "b_dog", "c_bird")):
        save(tmp_path / "data" / "val" / cls / f"v{i}.png", "rgb", 36, 36, seed=i)
    return tmp_path / "data"


# --- decoding -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kind", "exact"),
    [
        ("a.jpg", "rgb", False),
        ("a.png", "rgb", True),
        ("g.png", "gray", True),
        ("p.png", "palette", True),
        ("t.png", "rgba", True),
        ("b.bmp", "rgb", True),
        ("t.tif", "rgb", True),
        ("x.ppm", "rgb", True),
        ("x.pgm", "gray", True),
        ("x.gif", "palette", True),
        ("x.webp", "rgb", False),
    ],
)
def test_load_image_gives_uint8_rgb_chw(tmp_path: Path, name: str, kind: str, exact: bool) -> None:
    path = tmp_path / name
    save(path, kind, 13, 17)
    image = load_image(path)
    assert image.dtype == torch.uint8 and image.shape == (3, 13, 17)
    reference = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
    difference = (image.int() - reference.int()).abs().max().item()
    assert difference == 0 if exact else difference <= 2


def test_load_image_16bit_png_keeps_high_byte(tmp_path: Path) -> None:
    values = noise(5, 7, channels=1).astype(np.uint16) * 257
    Image.fromarray(values).save(tmp_path / "deep.png")
    image = load_image(tmp_path / "deep.png")
    assert image.dtype == torch.uint8
    assert torch.equal(image[0], torch.from_numpy((values >> 8).astype(np.uint8)))


@pytest.mark.parametrize(("content", "words"), [(b"not an image at all", "decode"), (b"", "empty"), (None, "read")])
def test_load_image_errors_name_the_file(tmp_path: Path, content: bytes | None, words: str) -> None:
    path = tmp_path / "broken.jpg"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=words) as info:
        load_image(path)
    assert str(path) in str(info.value)


# --- transforms ---------------------------------------------------------------------------------------


def test_folder_dataset_samples_labels_and_shapes(folder: Path) -> None:
    ds = build_dataset(cfg_for(data_dir=str(folder)), "train", train=True)
    assert ds.classes == ["a_cat", "b_dog", "c_bird"]
    names = [Path(p).name for p, _ in ds.samples]
    assert names == ["4.png", "5.JPEG", "1.jpg", "2.PNG", "3.png", "6.bmp", "7.tiff"]
    assert ds.targets == [0, 0, 1, 1, 1, 2, 2]
    for i in range(len(ds)):
        image, label = ds[i]
        assert image.dtype == torch.float32 and image.shape == (3, 24, 24)
        assert label == ds.targets[i]
    val = build_dataset(cfg_for(data_dir=str(folder)), "val", train=False)
    assert val.classes == ds.classes and val.targets == [0, 1, 2]
    assert all(val[i][0].shape == (3, 24, 24) for i in range(len(val)))
    assert "7 images, 3 classes" in describe_dataset(ds)


def test_eval_transform_resizes_short_side_then_centre_crops() -> None:
    cfg = Config()  # image_resize 224, crop_pct 0.875
    steps = build_transform(cfg, train=False).transforms
    image = torch.from_numpy(noise(300, 400)).permute(2, 0, 1)
    assert steps[0](image).shape == (3, 256, 341)
    assert build_transform(cfg, train=False)(image).shape == (3, 224, 224)
    assert build_transform(cfg, train=True)(image).shape == (3, 224, 224)
    # an image already 256 square is only cropped: its central 224 pixels, normalised
    square = torch.from_numpy(noise(256, 256)).permute(2, 0, 1)
    out = build_transform(cfg, train=False)(square)
    mean = torch.tensor(cfg.mean).view(3, 1, 1)
    std = torch.tensor(cfg.std).view(3, 1, 1)
    assert torch.allclose(out * std + mean, square[:, 16:240, 16:240].float(), atol=1e-3)


def test_normalize_maps_the_mean_to_zero() -> None:
    cfg = Config()
    normalize = build_transform(cfg, train=False).transforms[-1]
    assert isinstance(normalize, v2.Normalize)
    mean_image = (torch.tensor(cfg.mean) / 255).view(3, 1, 1).expand(3, 8, 8).contiguous()
    assert normalize(mean_image).abs().max() < 1e-6
    rounded = torch.tensor([round(m) for m in cfg.mean], dtype=torch.uint8).view(3, 1, 1).expand(3, 230, 230)
    assert build_transform(cfg, train=False)(rounded.contiguous()).abs().max() < 0.01


def test_random_resized_crop_respects_scale_and_ratio() -> None:
    cfg = Config()
    crop = build_transform(cfg, train=True).transforms[0]
    assert isinstance(crop, v2.RandomResizedCrop)
    image = torch.zeros(3, 400, 400, dtype=torch.uint8)
    torch.manual_seed(1)
    areas, ratios = [], []
    for _ in range(2000):
        p = crop.make_params([image])
        areas.append(p["height"] * p["width"] / (400 * 400))
        ratios.append(p["width"] / p["height"])
    assert cfg.scale[0] * 0.97 <= min(areas) < 0.12 and 0.9 < max(areas) <= cfg.scale[1]
    assert cfg.ratio[0] * 0.98 <= min(ratios) < 0.8 and 1.25 < max(ratios) <= cfg.ratio[1] * 1.02


def test_hflip_rate_and_color_jitter_factors() -> None:
    cfg = Config(hflip=0.3)
    steps = build_transform(cfg, train=True).transforms
    flip, jitter = steps[1], steps[2]
    assert isinstance(flip, v2.RandomHorizontalFlip) and isinstance(jitter, v2.ColorJitter)
    image = torch.arange(12, dtype=torch.uint8).view(1, 3, 4).expand(3, 3, 4).contiguous()
    torch.manual_seed(2)
    flipped = sum(not torch.equal(flip(image), image) for _ in range(2000)) / 2000
    assert abs(flipped - 0.3) < 0.04
    factors = [jitter.make_params([image]) for _ in range(1000)]
    for key in ("brightness_factor", "contrast_factor", "saturation_factor"):
        values = [f[key] for f in factors]
        assert 0.6 <= min(values) < 0.65 and 1.35 < max(values) <= 1.4
    assert all(f["hue_factor"] is None for f in factors)
    assert not any(isinstance(t, v2.ColorJitter) for t in build_transform(Config(color_jitter=0), True).transforms)
    assert not any(isinstance(t, v2.ColorJitter) for t in build_transform(Config(color_jitter=None), True).transforms)
    no_flip = build_transform(Config(hflip=0.0, vflip=0.5), True).transforms
    assert isinstance(no_flip[1], v2.RandomVerticalFlip)
    assert not any(isinstance(t, v2.RandomHorizontalFlip) for t in no_flip)


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("randaug-m9-mstd0.5-inc1", v2.RandAugment),
        ("randaug-m7-n3", v2.RandAugment),
        ("autoaug", v2.AutoAugment),
        ("autoaugr-mstd0.5", v2.AutoAugment),
        ("3a", v2.AutoAugment),
        ("trivialaugwide", v2.TrivialAugmentWide),
        ("augmix", v2.AugMix),
        ("augmix-m3-w2-d1", v2.AugMix),
    ],
)
def test_auto_augment_strings(text: str, kind: type) -> None:
    cfg = Config(image_resize=32, auto_augment=text)
    policy = build_auto_augment(text, cfg)
    assert isinstance(policy, kind)
    steps = build_transform(cfg, train=True).transforms
    assert any(isinstance(t, kind) for t in steps) and not any(isinstance(t, v2.ColorJitter) for t in steps)
    assert build_transform(cfg, train=True)(torch.from_numpy(noise(40, 50)).permute(2, 0, 1)).shape == (3, 32, 32)


def test_randaug_parameters() -> None:
    policy = build_auto_augment("randaug-m9-mstd0.5-inc1", Config())
    assert (policy.num_ops, policy.magnitude, policy.num_magnitude_bins) == (2, 90, 101)
    assert build_auto_augment("randaug-m7-n3", Config()).num_ops == 3


@pytest.mark.parametrize("text", ["randomaug", "randaug-x5", "randaug-m11", "autoaug-m9", "augmix-q1", "rand-m9"])
def test_unknown_auto_augment_is_a_data_error(text: str) -> None:
    with pytest.raises(DataError, match=r"Accepted forms.*randaug-m9-mstd0.5-inc1.*trivialaugwide"):
        build_transform(Config(auto_augment=text), train=True)


def test_random_erasing_with_probability_one_erases() -> None:
    image = torch.from_numpy(noise(64, 64)).permute(2, 0, 1)
    torch.manual_seed(3)
    erased = build_transform(Config(image_resize=32, re_prob=1.0), train=True)
    plain = build_transform(Config(image_resize=32, re_prob=0.0), train=True)
    assert isinstance(erased.transforms[-1], v2.RandomErasing)
    for _ in range(5):
        assert (erased(image) == 0).sum() >= 3 * 32 * 32 * 0.02 * 0.9
        assert (plain(image) == 0).sum() == 0


# --- layout errors ------------------------------------------------------------------------------------


def test_data_dir_unset_missing_or_a_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data_dir is not set.*digits"):
        build_dataset(cfg_for(data_dir=""), "train", train=True)
    with pytest.raises(DataError, match="does not exist"):
        build_dataset(cfg_for(data_dir=str(tmp_path / "nowhere")), "train", train=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="is a file"):
        build_dataset(cfg_for(data_dir=str(tmp_path / "file")), "train", train=True)


def test_an_archive_as_data_dir_says_to_extract_it(tmp_path: Path) -> None:
    for name, extract in (("hymenoptera.tar.gz", "mkdir DIR && tar -xf {} -C DIR"), ("digits.ZIP", "unzip {} -d DIR")):
        archive = tmp_path / name
        archive.write_bytes(b"\x1f\x8b")
        with pytest.raises(DataError) as error:
            build_dataset(cfg_for(data_dir=str(archive)), "train", train=True)
        assert str(error.value).startswith(
            f"data_dir {archive} is an archive, not a folder: extract it first ({extract.format(archive)}) and pass "
            "the folder that holds the split folders"
        )


def test_a_split_one_folder_down_is_named(tmp_path: Path) -> None:
    """An archive extracted with its own top folders, as ImageNet's is: the message names the folder to pass."""
    holder = tmp_path / "ILSVRC" / "Data" / "CLS-LOC"
    (holder / "train" / "n01440764").mkdir(parents=True)
    (tmp_path / "LOC_synset_mapping.txt").write_text("n01440764 tench\n")
    with pytest.raises(DataError) as error:
        build_dataset(cfg_for(data_dir=str(tmp_path)), "train", train=True)
    assert str(error.value) == (
        f"data_dir {tmp_path} has no 'train' split folder (it has: ILSVRC). Expected data_dir/train/<class>/<image "
        f"files>; {holder} has one: pass --data_dir {holder}."
    )
    wide = tmp_path / "wide"  # a folder of many sub-folders (class folders, say) is not searched
    for k in range(11):
        (wide / f"c{k}" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match=r"\(it has: c0, c1, .*\).*; set train_split / val_split"):
        build_dataset(cfg_for(data_dir=str(wide)), "train", train=True)


def test_missing_split_lists_the_folders_that_exist(folder: Path) -> None:
    with pytest.raises(DataError, match=r"no 'test' split folder \(it has: train, val\).*val_split"):
        build_dataset(cfg_for(data_dir=str(folder)), "test", train=False)


def test_no_class_folders(tmp_path: Path) -> None:
    save(tmp_path / "train" / "loose.jpg", "rgb", 8, 8)
    with pytest.raises(DataError, match=r"no class folders.*1 image files directly.*per-class"):
        build_dataset(cfg_for(data_dir=str(tmp_path)), "train", train=True)


def test_split_without_images(tmp_path: Path) -> None:
    for cls in ("x", "y"):
        (tmp_path / "train" / cls).mkdir(parents=True)
        (tmp_path / "train" / cls / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"2 class folder\(s\) \(x, y\) but no images.*\.jpeg"):
        build_dataset(cfg_for(data_dir=str(tmp_path)), "train", train=True)


def test_empty_class_folder_is_kept_with_a_warning(folder: Path) -> None:
    (folder / "val" / "d_empty").mkdir()
    with pytest.warns(UserWarning, match="d_empty"):
        val = build_dataset(cfg_for(data_dir=str(folder)), "val", train=False)
    assert val.classes == ["a_cat", "b_dog", "c_bird", "d_empty"]
    assert val.targets == [0, 1, 2]


# --- num_samples --------------------------------------------------------------------------------------


def test_balanced_subset_is_balanced_and_deterministic() -> None:
    targets = [0] * 10 + [1] * 6 + [2] * 2
    chosen = balanced_subset(targets, 9, seed=5)
    counts = Counter(targets[i] for i in chosen)
    assert len(chosen) == 9 == len(set(chosen)) and chosen == sorted(chosen)
    assert counts[2] == 2 and sorted((counts[0], counts[1])) == [3, 4]
    assert chosen == balanced_subset(targets, 9, seed=5)
    assert {tuple(balanced_subset(targets, 9, seed=s)) for s in range(6)} != {tuple(chosen)}
    many = [0] * 50 + [1] * 50 + [2] * 50
    even = Counter(many[i] for i in balanced_subset(many, 30, seed=0))
    assert even == {0: 10, 1: 10, 2: 10}
    assert balanced_subset(targets, 100, seed=0) == list(range(18))


def test_num_samples_applies_to_training_data(folder: Path) -> None:
    cfg = cfg_for(data_dir=str(folder), num_samples=4)
    train = build_dataset(cfg, "train", train=True)
    assert len(train) == 4 and sorted(Counter(train.targets).values()) == [1, 1, 2]
    assert train.targets == build_dataset(cfg, "train", train=True).targets
    assert train[0][0].shape == (3, 24, 24) and train.classes == ["a_cat", "b_dog", "c_bird"]
    assert "4 images" in describe_dataset(train) and "subset of 7" in describe_dataset(train)
    assert len(build_dataset(dataclasses.replace(cfg, num_samples=2), "val", train=False)) == 3
    assert len(build_dataset(dataclasses.replace(cfg, num_samples=2), "val", train=False, subset=True)) == 2


# --- digits -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("digits") / "export"
    build_dataset(cfg_for(dataset="digits", data_dir=str(root)), "val", train=False)
    return root


def test_digits_export(digits_dir: Path) -> None:
    cfg = cfg_for(dataset="digits", data_dir=str(digits_dir), image_resize=32)
    train = build_dataset(cfg, "train", train=True)
    val = build_dataset(cfg, "val", train=False)
    assert len(train) + len(val) == 1797
    assert train.classes == val.classes == [str(d) for d in range(10)]
    val_share = Counter(val.targets)
    assert all(abs(val_share[d] / (val_share[d] + Counter(train.targets)[d]) - 0.2) < 0.01 for d in range(10))
    image, label = val[0]
    assert image.shape == (3, 32, 32) and label == 0
    # the PNG holds the digit exactly: 4x pixel replication of 0..16 scaled to 0..255
    from sklearn.datasets import load_digits

    path = Path(val.samples[0][0])
    raw = load_image(path)
    expected = np.rint(load_digits().images[int(path.stem)] * 255 / 16)
    assert torch.equal(raw[0, ::4, ::4], torch.from_numpy(expected).to(torch.uint8))
    assert torch.equal(raw[0], raw[1]) and torch.equal(raw[0], raw[2])


def test_digits_second_call_does_not_rewrite(digits_dir: Path) -> None:
    png = next((digits_dir / "train" / "3").iterdir())
    before = (png.stat().st_mtime_ns, (digits_dir / DIGITS_MARKER).stat().st_mtime_ns)
    time.sleep(0.01)
    build_dataset(cfg_for(dataset="digits", data_dir=str(digits_dir)), "train", train=True)
    assert (png.stat().st_mtime_ns, (digits_dir / DIGITS_MARKER).stat().st_mtime_ns) == before
    assert not [p for p in digits_dir.parent.iterdir() if p.name.endswith(".tmp")]


def test_digits_refuses_a_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("precious")
    with pytest.raises(DataError, match="not a digits export"):
        build_dataset(cfg_for(dataset="digits", data_dir=str(tmp_path)), "train", train=True)
    assert (tmp_path / "mine.txt").read_text() == "precious"


def test_digits_without_scikit_learn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(DataError, match="pip install scikit-learn"):
        build_dataset(cfg_for(dataset="digits", data_dir=str(tmp_path / "d")), "train", train=True)


def test_digits_cache_root_follows_env(digits_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    (home / "digits").parent.mkdir()
    (home / "digits").symlink_to(digits_dir)  # a finished export: no second export needed
    monkeypatch.setenv("SHUFFLENETV2_HOME", str(home))
    ds = build_dataset(cfg_for(dataset="digits", data_dir=""), "val", train=False)
    assert str(home / "digits") in describe_dataset(ds)


# --- loaders ------------------------------------------------------------------------------------------


@pytest.fixture
def ten(tmp_path: Path) -> Path:
    for i in range(10):
        save(tmp_path / "train" / f"c{i % 3}" / f"{i}.png", "rgb", 20, 20, seed=i)
    return tmp_path


def test_loader_batches_and_drop_remainder(ten: Path) -> None:
    cfg = cfg_for(data_dir=str(ten), image_resize=16, batch_size=4)
    ds = build_dataset(cfg, "train", train=True)
    batches = list(build_loader(cfg, ds, train=True))
    assert len(batches) == 2
    images, labels, unreadable, params = batches[0]
    assert unreadable == () and params is None
    assert images.shape == (4, 3, 16, 16) and images.dtype == torch.float32 and labels.dtype == torch.int64
    kept = list(build_loader(dataclasses.replace(cfg, drop_remainder=False), ds, train=True))
    assert [len(b[1]) for b in kept] == [4, 4, 2]
    evaluation = list(build_loader(cfg, build_dataset(cfg, "train", train=False), train=False))
    assert [len(b[1]) for b in evaluation] == [4, 4, 2]
    assert torch.cat([b[1] for b in evaluation]).tolist() == ds.targets  # eval: in order
    with pytest.raises(DataError, match="fewer than batch_size"):
        build_loader(dataclasses.replace(cfg, batch_size=16), ds, train=True)


def test_epoch_sampler_is_a_function_of_seed_and_epoch(ten: Path) -> None:
    cfg = cfg_for(data_dir=str(ten), image_resize=16, batch_size=2)
    ds = build_dataset(cfg, "train", train=True)
    first, second = build_loader(cfg, ds, train=True, seed=7), build_loader(cfg, ds, train=True, seed=7)
    assert isinstance(first.sampler.sampler, EpochShuffleSampler)
    orders = []
    for epoch in (0, 1, 0):
        first.sampler.sampler.set_epoch(epoch)
        second.sampler.sampler.set_epoch(epoch)
        assert list(first.sampler.sampler) == list(second.sampler.sampler)
        orders.append(list(first.sampler.sampler))
    assert orders[0] == orders[2] != orders[1] and sorted(orders[0]) == list(range(10))
    other_seed = build_loader(cfg, ds, train=True, seed=8).sampler.sampler
    assert list(other_seed) != orders[0]
    assert list(build_loader(dataclasses.replace(cfg, shuffle=False), ds, train=True).sampler.sampler) == list(
        range(10)
    )
    assert list(build_loader(cfg, ds, train=False).sampler.sampler) == list(range(10))


def test_distributed_samplers_partition_the_dataset(ten: Path) -> None:
    cfg = cfg_for(data_dir=str(ten), image_resize=16, batch_size=2)
    ds = build_dataset(cfg, "train", train=True)
    shards = []
    for rank in (0, 1):
        loader = build_loader(cfg, ds, train=True, rank=rank, world_size=2, seed=3)
        assert isinstance(loader.sampler.sampler, torch.utils.data.DistributedSampler)
        loader.sampler.sampler.set_epoch(4)
        shards.append(list(loader.sampler.sampler))
    assert len(shards[0]) == len(shards[1]) == 5
    assert set(shards[0]).isdisjoint(shards[1]) and set(shards[0]) | set(shards[1]) == set(range(10))
    eval_shards = [list(build_loader(cfg, ds, False, r, 3).sampler.sampler) for r in range(3)]
    assert all(isinstance(build_loader(cfg, ds, False, r, 3).sampler.sampler, EvalShardSampler) for r in range(3))
    assert sorted(i for shard in eval_shards for i in shard) == list(range(10))


def test_loader_with_two_workers_matches_in_process(ten: Path) -> None:
    cfg = cfg_for(data_dir=str(ten), image_resize=16, batch_size=3)
    ds = build_dataset(cfg, "train", train=False)
    serial = list(build_loader(cfg, ds, train=False))
    loader = build_loader(dataclasses.replace(cfg, num_parallel_workers=2), ds, train=False)
    assert loader.num_workers == 2 and loader.persistent_workers
    parallel = list(loader)
    assert len(parallel) == len(serial) == 4
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(serial, parallel, strict=True))


# --- mixup / cutmix -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("mixup", "cutmix"), [(0.2, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_mixup_cutmix_give_soft_targets(mixup: float, cutmix: float) -> None:
    mix = build_mixup(Config(mixup=mixup, cutmix=cutmix), num_classes=10)
    assert mix is not None
    images, labels = torch.rand(8, 3, 16, 16), torch.arange(8)
    for _ in range(5):
        mixed, targets = mix(images, labels)
        assert mixed.shape == images.shape and targets.shape == (8, 10) and targets.dtype == torch.float32
        assert torch.allclose(targets.sum(1), torch.ones(8))
    assert (targets.max(1).values < 1).any()  # really mixed


def test_mixup_off_or_never_applied() -> None:
    assert build_mixup(Config(mixup=0.0, cutmix=0.0), 10) is None
    never = build_mixup(Config(mixup=0.5, cutmix_prob=0.0), 10)
    images, labels = torch.rand(4, 3, 8, 8), torch.tensor([1, 2, 3, 9])
    same, targets = never(images, labels)
    assert same is images and torch.equal(targets, torch.nn.functional.one_hot(labels, 10).float())


# --- torchvision datasets -----------------------------------------------------------------------------


@pytest.fixture
def http_404() -> Iterator[str]:
    """A real local HTTP server that answers 404 to everything."""

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_error(404)

        do_HEAD = do_GET

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


def test_cifar10_missing_without_download(tmp_path: Path) -> None:
    cfg = cfg_for(dataset="cifar10", data_dir=str(tmp_path), dataset_download=False)
    with pytest.raises(DataError, match=r"not found.*cifar-10-batches-py.*dataset_download True"):
        build_dataset(cfg, "train", train=True)


def test_cifar10_failed_download_names_the_url(
    tmp_path: Path, http_404: str, no_proxy: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchvision

    url = f"{http_404}/cifar-10-python.tar.gz"
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "url", url)
    cfg = cfg_for(dataset="cifar10", data_dir=str(tmp_path), dataset_download=True)
    started = time.monotonic()
    with pytest.raises(DataError, match=r"downloading cifar10 from .* failed.*404") as info:
        build_dataset(cfg, "train", train=True)
    assert url in str(info.value) and "network" in str(info.value)
    assert time.monotonic() - started < 10


def test_mnist_failed_download_names_the_mirrors(
    tmp_path: Path, http_404: str, no_proxy: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchvision

    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", [f"{http_404}/a/", f"{http_404}/b/"])
    cfg = cfg_for(dataset="mnist", data_dir=str(tmp_path), dataset_download=True)
    with pytest.raises(DataError, match="downloading mnist from") as info:
        build_dataset(cfg, "train", train=True)
    assert f"{http_404}/a/train-images-idx3-ubyte.gz" in str(info.value)
    with pytest.raises(DataError, match="MNIST/raw"):
        build_dataset(dataclasses.replace(cfg, dataset_download=False), "val", train=False)


def test_mnist_served_as_rgb_tensors(tmp_path: Path) -> None:
    """A tiny fake MNIST in torchvision's raw format goes through the usual transform as RGB."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images = noise(28, 28 * 5, channels=1).reshape(28, 5, 28).transpose(1, 0, 2).copy()
    for prefix in ("train", "t10k"):
        header = (2051).to_bytes(4, "big") + (5).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(header + images.tobytes())
        labels = (2049).to_bytes(4, "big") + (5).to_bytes(4, "big") + bytes([3, 1, 4, 1, 5])
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(labels)
    cfg = cfg_for(dataset="mnist", data_dir=str(tmp_path), image_resize=28, crop_pct=1.0)
    ds = build_dataset(cfg, "train", train=False)
    assert len(ds) == 5 and ds.targets == [3, 1, 4, 1, 5] and len(ds.classes) == 10
    image, label = ds[0]
    assert image.shape == (3, 28, 28) and label == 3
    pixels = image * torch.tensor(cfg.std).view(3, 1, 1) + torch.tensor(cfg.mean).view(3, 1, 1)
    gray = torch.from_numpy(images[0]).float()
    assert all(torch.allclose(pixels[c], gray, atol=1e-3) for c in range(3))


@pytest.mark.parametrize("pipeline", ["classic", "fast"])
def test_augmentation_is_a_function_of_seed_epoch_and_index(ten: Path, pipeline: str) -> None:
    """The same (seed, epoch) gives the same augmented batches whatever the worker count or RNG state."""
    cfg = cfg_for(data_dir=str(ten), image_resize=16, batch_size=5, num_parallel_workers=0, data_pipeline=pipeline)
    ds = build_dataset(cfg, "train", train=True)

    def epoch_batches(workers: int, epoch: int) -> list[torch.Tensor]:
        loader = build_loader(dataclasses.replace(cfg, num_parallel_workers=workers), ds, train=True, seed=11)
        loader.sampler.set_epoch(epoch)
        torch.manual_seed(workers * 1000 + epoch)  # the global stream must not matter
        # the fast pipeline's batches are uint8 images plus the jitter parameters, both seeded per sample
        return [images if params is None else torch.cat((images.flatten(1).float(), params), 1)
                for images, _, _, params in loader]  # fmt: skip

    in_process = epoch_batches(0, 3)
    assert all(torch.equal(a, b) for a, b in zip(in_process, epoch_batches(2, 3), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(in_process, epoch_batches(0, 4), strict=True))
    state = torch.get_rng_state()
    epoch_batches(0, 3)
    torch.set_rng_state(state)
    assert torch.equal(torch.get_rng_state(), state)
