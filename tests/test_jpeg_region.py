"""Crop-box JPEG decoding (libjpeg-turbo 3) against whole-image decoding, pixel for pixel."""

from __future__ import annotations

import ctypes.util
import dataclasses
import io
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from shufflenetv2 import jpeg_region
from shufflenetv2.config import Config
from shufflenetv2.data import ArrayImageDataset, ImageFolderDataset, SubsetDataset
from shufflenetv2.pipeline import EvalSampleTransform, TrainSampleTransform, describe_input, source_span

needs_library = pytest.mark.skipif(
    not jpeg_region.available(), reason="no libjpeg-turbo 3: pip install -e '.[fast-jpeg]' (make does)"
)
HYMENOPTERA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hymenoptera.tar.gz"


def encode(h: int, w: int, seed: int, subsampling: int = 2, grey: bool = False) -> bytes:
    """A JPEG of noisy colour gradients: chroma that changes from pixel to pixel, so that an upsampler
    reading the wrong neighbour shows."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    image = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) % 256], -1)
    image = np.clip(image + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    picture = Image.fromarray(image).convert("L") if grey else Image.fromarray(image)
    picture.save(out, format="JPEG", quality=90, **({} if grey else {"subsampling": subsampling}))
    return out.getvalue()


def whole(raw: bytes, factor: int, fast_dct: bool) -> np.ndarray:
    height, width, _, _ = simplejpeg.decode_jpeg_header(raw)
    smallest = {"min_height": math.ceil(height / factor), "min_width": math.ceil(width / factor)}
    return simplejpeg.decode_jpeg(raw, colorspace="RGB", fastdct=fast_dct, **smallest)


def boxes(height: int, width: int, rng: np.random.Generator, count: int) -> list[tuple[int, int, int, int]]:
    """Random boxes, plus the whole image, a 1x1 corner and boxes touching each border."""
    drawn = [(0, 0, height, width), (height - 1, width - 1, 1, 1), (0, width // 3, height, width - width // 3)]
    drawn.append((height // 2, 0, height - height // 2, max(1, width // 5)))
    for _ in range(count):
        h, w = int(rng.integers(1, height + 1)), int(rng.integers(1, width + 1))
        drawn.append((int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w))
    return drawn


@needs_library
@pytest.mark.parametrize("subsampling", ["4:4:4", "4:2:2", "4:2:0", "grey"])
def test_box_equals_the_whole_decode_cropped(subsampling: str) -> None:
    """Every subsampling PIL writes, odd sizes, all four scales, both IDCTs: identical pixels."""
    rng = np.random.default_rng(0)
    for k, (h, w) in enumerate([(203, 317), (64, 48), (97, 131)]):
        sub = {"4:4:4": 0, "4:2:2": 1, "4:2:0": 2, "grey": 0}[subsampling]
        raw = encode(h, w, seed=k, subsampling=sub, grey=subsampling == "grey")
        for factor in (1, 2, 4, 8):
            for fast_dct in (False, True):
                reference = whole(raw, factor, fast_dct)
                for top, left, bh, bw in boxes(*reference.shape[:2], rng, count=12):
                    region = jpeg_region.decode_box(raw, top, left, bh, bw, factor, fast_dct)
                    assert region is not None and region.shape == (bh, bw, 3)
                    expected = reference[top : top + bh, left : left + bw]
                    assert np.array_equal(region.numpy(), expected), (h, w, factor, fast_dct, top, left, bh, bw)


@needs_library
def test_decoding_in_place_writes_only_the_box_and_its_context() -> None:
    raw = encode(203, 317, seed=5)
    reference = whole(raw, 1, False)
    for top, left, bh, bw in [(50, 70, 40, 100), (0, 0, 203, 317), (150, 300, 53, 17)]:
        canvas = np.full((203, 317, 3), 7, dtype=np.uint8)
        result = jpeg_region.decode_box(raw, top, left, bh, bw, out=canvas)
        assert result is not None and result.data_ptr() == canvas.ctypes.data  # the canvas itself
        assert np.array_equal(canvas[top : top + bh, left : left + bw], reference[top : top + bh, left : left + bw])
        written = np.zeros((203, 317), dtype=bool)  # the box, a pixel of context, the left edge's iMCU
        written[max(0, top - 1) : top + bh + 1, max(0, left - 1) // 16 * 16 : left + bw + 1] = True
        assert (canvas[~written] == 7).all()
    with pytest.raises(ValueError, match=r"C-contiguous uint8 \(203, 317, 3\) array"):
        jpeg_region.decode_box(raw, 0, 0, 8, 8, out=np.zeros((203, 316, 3), dtype=np.uint8))


@needs_library
def test_the_box_is_smaller_work_than_the_image() -> None:
    """The decoded region is the box plus its context, not the whole image (the point of the module)."""
    raw = encode(400, 600, seed=1)
    region = jpeg_region.decode_box(raw, 100, 200, 50, 60)
    assert region is not None
    buffer = region.untyped_storage().nbytes()
    assert buffer < 400 * 600 * 3 / 10 and buffer >= 50 * 60 * 3


@needs_library
def test_broken_files_give_none_and_bad_boxes_an_error(tmp_path: Path) -> None:
    raw = encode(60, 80, seed=2)
    assert jpeg_region.decode_box(raw[:700], 0, 0, 60, 80) is None  # truncated: libjpeg-turbo warns
    assert jpeg_region.decode_box(b"\xff\xd8 not a jpeg", 0, 0, 4, 4) is None
    out = io.BytesIO()
    Image.new("CMYK", (40, 30), (10, 20, 30, 40)).save(out, format="JPEG")
    assert jpeg_region.decode_box(out.getvalue(), 0, 0, 30, 40) is None  # no CMYK to RGB in TurboJPEG
    assert jpeg_region.decode_box(raw, 0, 0, 60, 80) is not None  # the handle still works afterwards
    with pytest.raises(ValueError, match="outside the 60x80 image"):
        jpeg_region.decode_box(raw, 10, 0, 60, 80)
    with pytest.raises(ValueError, match="outside the 30x40 image"):
        jpeg_region.decode_box(raw, 0, 0, 30, 41, factor=2)


@needs_library
def test_library_lookup_skips_what_is_not_libjpeg_turbo_3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    found = jpeg_region.library_path()
    not_a_library = tmp_path / "libturbojpeg.so"
    not_a_library.write_text("not a shared object")
    libc = ctypes.util.find_library("c")
    try:
        for override in (str(not_a_library), libc):  # unreadable; a real library without tj3 functions
            monkeypatch.setenv(jpeg_region.LIBRARY_VARIABLE, override)
            jpeg_region._library.cache_clear()
            assert jpeg_region.library_path() == found
        monkeypatch.setenv(jpeg_region.LIBRARY_VARIABLE, found)
        jpeg_region._library.cache_clear()
        assert jpeg_region.library_path() == found and jpeg_region._candidates()[0] == found
        monkeypatch.setenv(jpeg_region.LIBRARY_VARIABLE, "none")  # the way to turn region decoding off
        jpeg_region._library.cache_clear()
        assert not jpeg_region.available() and not TrainSampleTransform(cfg_for()).decode_region
        with pytest.raises(RuntimeError, match="no libjpeg-turbo 3 found"):
            jpeg_region.decode_box(encode(8, 8, seed=0), 0, 0, 8, 8)
    finally:
        jpeg_region._library.cache_clear()


def test_the_training_log_says_what_there_is_to_decode(tmp_path: Path) -> None:
    """The crop-box path is for JPEG files only: PNG folders and in-memory arrays say so instead."""
    cfg = cfg_for()
    for name in ("a.jpg", "b.JPEG", "c.png"):
        folder = tmp_path / name[0]
        folder.mkdir()
        Image.new("RGB", (8, 8)).save(folder / name, format="PNG" if name.endswith("png") else "JPEG")
    folder = ImageFolderDataset(tmp_path, None)
    assert describe_input(cfg, folder).endswith("(2 of 3 files are JPEGs by name)")
    assert describe_input(cfg, SubsetDataset(folder, [0, 1])) == describe_input(cfg)  # all JPEGs: no count
    assert describe_input(cfg, SubsetDataset(folder, [2])) == "fast pipeline, no JPEG files (images decoded whole)"
    arrays = ArrayImageDataset(torch.zeros(2, 8, 8, 3, dtype=torch.uint8), [0, 1], ["x", "y"], None, "arrays")
    assert describe_input(cfg, arrays) == "fast pipeline, images from in-memory arrays (nothing to decode)"
    assert describe_input(cfg, SubsetDataset(arrays, [1])).endswith("(nothing to decode)")


def cfg_for(**values) -> Config:
    base = {"dataset": "imagefolder", "num_parallel_workers": 0, "batch_size": 4, "re_prob": 0.5}
    return dataclasses.replace(Config(), **{**base, **values})


def same_samples(transform: TrainSampleTransform, path: Path, seeds: range) -> int:
    """Asserts the region and whole-image decodes give identical samples; returns how many were compared."""
    for seed in seeds:
        outputs = []
        for region in (True, False):
            transform.decode_region = region
            torch.manual_seed(seed)
            outputs.append(transform.from_file(path))
        assert torch.equal(outputs[0].params, outputs[1].params)
        assert torch.equal(outputs[0].pixels, outputs[1].pixels), (path, seed)
    return len(seeds)


@needs_library
@pytest.mark.parametrize("fast_dct", [True, False])
def test_train_samples_are_the_same_with_and_without_region_decoding(tmp_path: Path, fast_dct: bool) -> None:
    """Boxes at full, 1/2, 1/4 and 1/8 scale: the worker's output does not depend on the decoder."""
    big, small = tmp_path / "big.jpg", tmp_path / "small.jpg"
    big.write_bytes(encode(1200, 1600, seed=3))
    small.write_bytes(encode(90, 120, seed=4, subsampling=0))
    transform = TrainSampleTransform(cfg_for(image_resize=64, scale=(0.02, 1.0), fast_dct=fast_dct, hflip=0.5))
    assert transform.decode_region  # the default where the library is found
    assert same_samples(transform, big, range(40)) + same_samples(transform, small, range(10)) == 50


def test_source_span_is_what_the_resize_reads() -> None:
    """An output range computed from a span of the input alone equals the whole resize's (torch's kernel)."""
    rng = np.random.default_rng(6)
    for in_size, out_size in [(375, 256), (500, 341), (1000, 256), (240, 256), (150, 256), (256, 256)]:
        image = torch.from_numpy(rng.integers(0, 256, (3, 8, in_size), dtype=np.uint8))
        full = TF.resize(image, [8, out_size], antialias=True)
        for start, stop in [(0, out_size), (16, min(out_size, 240)), (out_size - 5, out_size)]:
            a, b = source_span(start, stop, in_size, out_size)
            garbled = image.clone()
            garbled[..., :a] = 255 - garbled[..., :a]  # change everything outside the span
            garbled[..., b:] = 255 - garbled[..., b:]
            part = TF.resize(garbled, [8, out_size], antialias=True)[..., start:stop]
            assert torch.equal(part, full[..., start:stop]), (in_size, out_size, start, stop)
    assert source_span(16, 240, 375, 256) == (23, 352)  # 1.46 source px per output px, plus the support


def same_eval_samples(transform: EvalSampleTransform, path: Path) -> None:
    outputs = []
    for region in (True, False):
        transform.decode_region = region
        outputs.append(transform.from_file(path).pixels)
    assert torch.equal(*outputs), path


@needs_library
@pytest.mark.parametrize(
    ("height", "width", "subsampling", "image_resize", "crop_pct"),
    [
        (375, 500, 2, 224, 0.875),  # ImageNet-like landscape
        (500, 375, 0, 224, 0.875),  # portrait, 4:4:4
        (333, 1000, 1, 224, 0.875),  # a panorama: most columns are never decoded
        (1000, 300, 2, 224, 0.95),
        (240, 250, 2, 224, 0.875),  # upsampled to 256
        (150, 180, 0, 224, 0.875),
        (230, 230, 2, 224, 1.0),  # the crop is the whole resized image
        (97, 131, 2, 64, 0.8),
    ],
)
def test_eval_samples_are_the_same_with_and_without_region_decoding(
    tmp_path: Path, height: int, width: int, subsampling: int, image_resize: int, crop_pct: float
) -> None:
    path = tmp_path / "a.jpg"
    path.write_bytes(encode(height, width, seed=height, subsampling=subsampling))
    transform = EvalSampleTransform(cfg_for(image_resize=image_resize, crop_pct=crop_pct))
    assert transform.decode_region
    same_eval_samples(transform, path)


@needs_library
@pytest.mark.skipif(not HYMENOPTERA.exists(), reason=f"{HYMENOPTERA} is not there (only CI and developers have it)")
def test_region_decoding_on_real_photos(tmp_path: Path) -> None:
    """The MindCV recipe's 224-px crops of the hymenoptera photos (their own subsamplings and sizes)."""
    with tarfile.open(HYMENOPTERA) as archive:
        members = [m for m in archive.getmembers() if m.isfile() and m.name.lower().endswith((".jpg", ".jpeg"))]
        archive.extractall(tmp_path, members=members[::6], filter="data")
    photos = sorted(tmp_path.rglob("*.jp*g"))
    transform = TrainSampleTransform(cfg_for(image_resize=224))
    assert len(photos) >= 50 and sum(same_samples(transform, path, range(2)) for path in photos) == 2 * len(photos)
    evaluation = EvalSampleTransform(cfg_for(image_resize=224))
    for path in photos:
        same_eval_samples(evaluation, path)


def test_the_training_log_says_how_jpegs_are_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = cfg_for()
    found = "JPEG crop boxes decoded alone" if jpeg_region.available() else "whole JPEGs decoded"
    assert found in describe_input(cfg)
    classic = dataclasses.replace(cfg, data_pipeline="classic")
    assert describe_input(classic) == "per-image transforms (data_pipeline classic)"
    assert describe_input(dataclasses.replace(cfg, decode_on_device=True)).endswith("JPEGs decoded on the device")
    monkeypatch.setenv(jpeg_region.LIBRARY_VARIABLE, "none")
    jpeg_region._library.cache_clear()
    try:  # without the library the log says what to install
        assert "whole JPEGs decoded (no libjpeg-turbo 3: pip install 'shufflenetv2[fast-jpeg]')" in describe_input(cfg)
    finally:
        jpeg_region._library.cache_clear()
