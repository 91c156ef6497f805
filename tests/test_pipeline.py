"""The fast pipeline (uint8 workers, batch-level jitter/normalise) against the per-image one it replaces."""

from __future__ import annotations

import dataclasses
import math
import sys
import types
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from shufflenetv2.config import Config, ConfigError, validate
from shufflenetv2.data import (
    SeededDataset,
    SubsetDataset,
    Unreadable,
    build_dataset,
    build_loader,
    build_transform,
    load_image,
)
from shufflenetv2.errors import DataError
from shufflenetv2.pipeline import (
    BRIGHTNESS,
    ERASE,
    IDENTITY,
    ORDER,
    SATURATION,
    AugmentedImage,
    BatchTransform,
    EvalSampleTransform,
    TrainSampleTransform,
    compiled_batch_step,
    describe_input,
    identity_params,
    params_vector,
    reduction_for,
)

NEEDS_NUMBA = pytest.mark.skipif(compiled_batch_step() is None, reason="numba is not installed (fast-cpu extra)")
# the batch step both ways on the CPU: torch's ops, and numba's compiled loop (the fast-cpu extra)
BOTH_STEPS = pytest.mark.parametrize(
    "compiled",
    [
        pytest.param(False, id="torch-step"),
        pytest.param(True, id="compiled-step", marks=NEEDS_NUMBA),
    ],
)


def cfg_for(**values) -> Config:
    base = {"dataset": "imagefolder", "image_resize": 24, "num_parallel_workers": 0, "batch_size": 4}
    return dataclasses.replace(Config(), **{**base, **values})


def photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth colour fields with some texture: like a photograph, rescaling barely changes it."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    channels = [np.sin(2 * np.pi * (f * xx + g * yy) + p) for f, g, p in rng.uniform(0.5, 3, (3, 3))]
    image = 127.5 + 100 * np.stack(channels, -1) + rng.normal(0, 4, (h, w, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def write_jpeg(path: Path, h: int, w: int, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(photo(h, w, seed)).save(path, quality=92)
    return path


def fast_train(cfg: Config, image: torch.Tensor, seed: int, compiled: bool = True) -> torch.Tensor:
    torch.manual_seed(seed)
    sample = TrainSampleTransform(cfg)(image)
    return BatchTransform(cfg, train=True, compiled=compiled)(sample.pixels[None], sample.params[None])[0]


def classic_train(cfg: Config, image: torch.Tensor, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return build_transform(cfg, train=True)(image)


IMAGE = torch.from_numpy(photo(60, 80)).permute(2, 0, 1).contiguous()
# a 24-px crop of IMAGE with a white and a black band: where a blend can reach 0 and 1
SATURATED = IMAGE[:, :24, :24].clone()
SATURATED[:, :6], SATURATED[:, -6:] = 255, 0
# (brightness, contrast, saturation factors), op order: ColorJitter(0.4)'s extremes 0.6 and 1.4
EXTREME_PARAMS = [
    ((0.6, 0.6, 0.6), (0, 1, 2)),
    ((1.4, 1.4, 1.4), (2, 1, 0)),
    ((0.6, 1.4, 0.6), (1, 0, 2)),
    ((1.4, 0.6, 1.4), (0, 2, 1)),
    ((1.0, 0.6, 1.4), (2, 0, 1)),
    ((0.6, 1.0, 1.4), (1, 2, 0)),
]


@BOTH_STEPS
@pytest.mark.parametrize("re_prob", [0.0, 1.0])
def test_same_crops_flips_and_erasing_as_the_per_image_pipeline(re_prob: float, compiled: bool) -> None:
    """Without jitter both pipelines compute the same floats, bit for bit (so the same training run):
    torchvision's samplers are drawn in the same order and the normalisation is the same arithmetic."""
    cfg = cfg_for(color_jitter=None, hflip=0.5, vflip=0.5, re_prob=re_prob)
    erased = 0
    for seed in range(24):
        fast, classic = fast_train(cfg, IMAGE, seed, compiled), classic_train(cfg, IMAGE, seed)
        assert fast.shape == classic.shape == (3, 24, 24)
        assert torch.equal(fast, classic), seed
        erased += int((classic == 0).all(0).any())
    assert re_prob == 0 or erased > 12  # the erasing boxes were really compared


@BOTH_STEPS
def test_jitter_is_torchvisions_float_kernels_in_each_images_order(compiled: bool) -> None:
    """The batched blends against torchvision's kernels, with the drawn factors and with factors at both
    ends of the range on saturated pixels, where the clamps matter."""
    cfg = cfg_for(hflip=0.0)
    transform, batch = TrainSampleTransform(cfg), BatchTransform(cfg, train=True, chunk=3, compiled=compiled)
    torch.manual_seed(0)
    samples = [transform(IMAGE) for _ in range(16)]
    pixels = torch.stack([s.pixels for s in samples] + [SATURATED] * len(EXTREME_PARAMS))
    extremes = [params_vector(f, order, IDENTITY[2]) for f, order in EXTREME_PARAMS]
    out = batch(pixels, torch.stack([s.params for s in samples] + extremes))
    kernels = {0: TF.adjust_brightness, 1: TF.adjust_contrast, 2: TF.adjust_saturation}
    mean, std = torch.tensor(cfg.mean).view(3, 1, 1) / 255, torch.tensor(cfg.std).view(3, 1, 1) / 255
    for k, params in enumerate([s.params for s in samples] + extremes):
        x = pixels[k].float() / 255
        for op in params[ORDER].long().tolist():
            x = kernels[op](x, float(params[op]))
        assert (out[k] - (x - mean) / std).abs().max() < 1e-5, k
    # the per-image pipeline jitters uint8 (rounding after every op): the same image within three levels
    for seed in range(8):
        difference = fast_train(cfg, IMAGE, seed, compiled) - classic_train(cfg, IMAGE, seed)
        assert difference.abs().max() < 3.5 / 255 / 0.224


def mindspore_crop_draws(
    height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float], n: int
) -> tuple[np.ndarray, np.ndarray]:
    """Area fractions and aspects of MindSpore's RandomResizedCrop, written from its documented algorithm:
    ten tries of (area ~ U(scale) * H * W, log aspect ~ U(log ratio)) until the box fits, else a centre crop."""
    rng = np.random.default_rng(1)
    areas, aspects = [], []
    for _ in range(n):
        for _ in range(10):
            area = height * width * rng.uniform(*scale)
            aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
            w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if 0 < w <= width and 0 < h <= height:
                break
        else:
            h, w = height, min(width, round(height * ratio[1]))
        areas.append(h * w / (height * width))
        aspects.append(w / h)
    return np.array(areas), np.array(aspects)


def test_crop_and_jitter_statistics_match_mindcvs_ranges() -> None:
    """RandomResizedCrop(scale (0.08, 1), ratio (3/4, 4/3)) and ColorJitter(0.4, 0.4, 0.4), as MindCV draws them."""
    cfg = cfg_for(image_resize=224)
    transform = TrainSampleTransform(cfg)
    reference = v2.RandomResizedCrop(224, scale=cfg.scale, ratio=cfg.ratio)
    areas, ratios, factors, orders = [], [], [], Counter()
    for seed in range(3000):
        torch.manual_seed(seed)
        box, _, _, params = transform._draw(375, 500)
        torch.manual_seed(seed)
        expected = reference.make_params([torch.empty(3, 375, 500)])  # draw for draw
        assert box == (expected["top"], expected["left"], expected["height"], expected["width"])
        _, _, height, width = box
        areas.append(height * width / (375 * 500))
        ratios.append(width / height)
        factors += params[BRIGHTNESS : SATURATION + 1].tolist()
        orders[tuple(params[ORDER].long().tolist())] += 1
    areas, ratios, factors = np.array(areas), np.array(ratios), np.array(factors)
    assert areas.min() >= 0.08 - 0.01 and areas.max() <= 1.0
    assert ratios.min() >= 0.75 - 0.02 and ratios.max() <= 1.333 + 0.02
    expected_areas, expected_ratios = mindspore_crop_draws(375, 500, cfg.scale, cfg.ratio, len(areas))
    quantiles = np.linspace(0.05, 0.95, 19)
    assert np.abs(np.quantile(areas, quantiles) - np.quantile(expected_areas, quantiles)).max() < 0.03
    assert np.abs(np.quantile(ratios, quantiles) - np.quantile(expected_ratios, quantiles)).max() < 0.03
    assert factors.min() >= 0.6 and factors.max() <= 1.4 and abs(factors.mean() - 1.0) < 0.01
    assert abs(np.std(factors) - 0.8 / math.sqrt(12)) < 0.01  # uniform on [0.6, 1.4]
    assert sorted(orders) == sorted([(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)])
    assert min(orders.values()) > 3000 / 6 * 0.85


def test_reduced_jpeg_decoding_gives_the_full_decodes_pixels(tmp_path: Path) -> None:
    """A 1200 x 1600 JPEG cropped to 64 px decodes at 1/8 scale, within a few grey levels of a full decode."""
    path = write_jpeg(tmp_path / "big.jpg", 1200, 1600)
    cfg = cfg_for(image_resize=64, scale=(0.3, 1.0), color_jitter=None, hflip=0.5)
    transform, full = TrainSampleTransform(cfg), load_image(path)
    reduced = 0
    for seed in range(12):
        torch.manual_seed(seed)
        (_, _, height, width), *_ = transform._draw(1200, 1600)
        reduced += reduction_for(height, width, 64) > 1
        torch.manual_seed(seed)
        fast = transform.from_file(path)
        torch.manual_seed(seed)
        exact = transform(full)
        assert torch.equal(fast.params, exact.params)
        # the box lands within half a pixel of the reduced image (a quarter of an output pixel), so on
        # this image's gradients (up to 1.2 levels per source pixel) a few levels differ, without bias
        difference = fast.pixels.float() - exact.pixels.float()
        assert difference.abs().mean() < 4.0 and difference.mean().abs() < 0.5 and difference.abs().max() < 16, seed
    assert reduced == 12


def test_fast_dct_moves_training_pixels_slightly_and_evaluation_not_at_all(tmp_path: Path) -> None:
    path = write_jpeg(tmp_path / "a.jpg", 90, 120)
    exact, fast = cfg_for(image_resize=64, fast_dct=False), cfg_for(image_resize=64)
    assert fast.fast_dct  # the default
    for seed in range(4):
        torch.manual_seed(seed)
        a = TrainSampleTransform(exact).from_file(path)
        torch.manual_seed(seed)
        b = TrainSampleTransform(fast).from_file(path)
        assert torch.equal(a.params, b.params)
        difference = (a.pixels.float() - b.pixels.float()).abs()
        assert 0 < difference.mean() < 1.5 and difference.max() <= 16, seed
    evaluated = [EvalSampleTransform(cfg).from_file(path).pixels for cfg in (exact, fast)]
    assert torch.equal(*evaluated)


@BOTH_STEPS
def test_workers_hand_over_hwc_rows_and_batches_are_channels_last(tmp_path: Path, compiled: bool) -> None:
    """No worker copy reorders pixels: the samples stay in the resize's HWC order, collated they are a
    channels_last batch, and the batch step's output equals that of a contiguous batch."""
    cfg = cfg_for(image_resize=32)
    samples = [TrainSampleTransform(cfg)(IMAGE) for _ in range(3)]
    samples.append(EvalSampleTransform(cfg).from_file(write_jpeg(tmp_path / "b.jpg", 50, 40)))
    assert all(s.pixels.permute(1, 2, 0).stride()[1:] == (3, 1) for s in samples)
    pixels, params = samples[0].collate_batch(samples)
    assert pixels.shape == (4, 3, 32, 32) and pixels.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(pixels, torch.stack([s.pixels for s in samples]))
    finish = BatchTransform(cfg, train=True, compiled=compiled)
    assert torch.equal(finish(pixels, params), finish(pixels.contiguous(), params))


@NEEDS_NUMBA
@pytest.mark.parametrize("shape", [(6, 24, 24), (3, 17, 29)])
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("jitter", [0.4, None])
def test_compiled_batch_step_equals_torchs_ops(shape: tuple[int, int, int], channels_last: bool, jitter) -> None:
    """numba's loop against torch's ops on the same batches, whatever the layouts in and out: equal bit
    for bit without jitter, within a few float32 ulps with it (its contrast mean is summed in float64)."""
    count, height, width = shape
    cfg = cfg_for(color_jitter=jitter, channels_last=channels_last, re_prob=1.0)
    generator = torch.Generator().manual_seed(count)
    pixels = torch.randint(0, 256, (count, height, width, 3), dtype=torch.uint8, generator=generator)
    pixels[0, : height // 2] = 255  # saturated rows, where the clamps act
    pixels[-1, height // 2 :] = 0
    rows = []
    for k in range(count):
        factors = [0.6, 1.4, 1.0] if k == 0 else (0.6 + 0.8 * torch.rand(3, generator=generator)).tolist()
        order = torch.randperm(3, generator=generator).tolist()
        erase = [k % height, k % width, height // 3, width // 4] if k % 2 else [0, 0, 0, 0]
        rows.append(params_vector(factors, order, erase))
    params = torch.stack(rows)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    for images in (pixels.permute(0, 3, 1, 2), pixels.permute(0, 3, 1, 2).contiguous()):
        compiled = BatchTransform(cfg, train=True)(images, params)
        reference = BatchTransform(cfg, train=True, compiled=False)(images, params)
        assert compiled.dtype == torch.float32 and compiled.is_contiguous(memory_format=memory_format)
        if jitter is None:
            assert torch.equal(compiled, reference)
        else:
            assert (compiled - reference).abs().max() < 4e-6  # 1.2e-6 seen: 5 ulps of the largest values
            assert not torch.equal(compiled, BatchTransform(cfg_for(color_jitter=None), train=True)(images, params))


def test_without_numba_the_batch_step_runs_torchs_ops_and_the_log_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, cpu = cfg_for(), torch.device("cpu")
    images = torch.from_numpy(photo(24, 24)).permute(2, 0, 1)[None]
    params = identity_params()[None]
    if compiled_batch_step() is not None:
        assert describe_input(cfg, None, cpu).endswith("; batch step compiled (numba)")
    assert "batch step" not in describe_input(cfg, None, torch.device("cuda"))  # there it runs on the GPU
    assert "batch step" not in describe_input(cfg)
    # numba made unimportable (None in sys.modules), and the kernel module imported afresh
    monkeypatch.setitem(sys.modules, "numba", None)
    monkeypatch.delitem(sys.modules, "shufflenetv2.batch_kernel", raising=False)
    compiled_batch_step.cache_clear()
    try:
        assert compiled_batch_step() is None
        assert describe_input(cfg, None, cpu).endswith("; batch step in torch ops (compiled with the fast-cpu extra)")
        step = BatchTransform(cfg, train=True)  # compiled asked for, torch's ops run
        assert torch.equal(step(images, params), BatchTransform(cfg, train=True, compiled=False)(images, params))
    finally:
        compiled_batch_step.cache_clear()


@NEEDS_NUMBA
def test_the_kernel_compiles_where_numba_cannot_cache_it() -> None:
    """numba refuses to cache code without a source file (a frozen application, an exec'd module); the
    kernel then compiles in each process instead of failing the import."""
    source = Path(compiled_batch_step().__file__).read_text()
    module = types.ModuleType("shufflenetv2.batch_kernel_without_file")
    module.__package__ = "shufflenetv2"
    exec(compile(source, "<batch_kernel without a file>", "exec"), module.__dict__)
    assert type(module._colour._cache).__name__ == "NullCache"  # numba's "no cache"
    images = torch.from_numpy(photo(20, 12)).permute(2, 0, 1)[None]
    params = params_vector((0.7, 1.3, 0.9), (2, 0, 1), IDENTITY[2])[None]
    step = BatchTransform(cfg_for(), train=True)
    args = (images, params, step.mean, step.std, True, torch.channels_last)
    assert torch.equal(module.colour_batch(*args), compiled_batch_step().colour_batch(*args))


def same_sample(a: object, b: object) -> bool:
    if isinstance(a, Unreadable) or isinstance(b, Unreadable):
        return a == b
    (x, label_x), (y, label_y) = a, b
    return label_x == label_y and torch.equal(x.pixels, y.pixels) and torch.equal(x.params, y.params)


def one_pass(dataset: object, key: tuple[int, int]) -> object:
    """A sample the way the loader made it before the two passes: all of it under its seed."""
    index, seed = key
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            return dataset[index]
        except DataError as exc:
            return Unreadable(str(exc))


@pytest.mark.parametrize("train", [True, False])
def test_a_batch_fetched_in_two_passes_equals_its_samples_fetched_one_by_one(tmp_path: Path, train: bool) -> None:
    """``SeededDataset.__getitems__`` plans every sample (reading, draws under its seed) before decoding
    any; the samples, and the unreadable ones with their reasons, must be those of one sample at a time."""
    for i in range(6):
        write_jpeg(tmp_path / "train" / f"c{i % 2}" / f"{i}.jpg", 40 + 7 * i, 60 - 3 * i, seed=i)
    Image.fromarray(photo(30, 50)).save(tmp_path / "train" / "c0" / "png.png")
    broken = tmp_path / "train" / "c1" / "cut.jpg"
    broken.write_bytes(write_jpeg(tmp_path / "whole.jpg", 60, 80).read_bytes()[:700])
    cfg = cfg_for(data_dir=str(tmp_path), re_prob=0.5, hflip=0.5)
    folder = build_dataset(cfg, "train", train=train)
    for dataset in (folder, SubsetDataset(folder, [7, 1, 5, 0, 3])):
        seeded = SeededDataset(dataset)
        keys = [(i, 100 + i) for i in range(len(dataset))] * 2  # each file twice: the same sample both times
        batch = seeded.__getitems__(keys)
        assert all(same_sample(a, b) for a, b in zip(batch, [one_pass(dataset, key) for key in keys], strict=True))
        assert all(same_sample(a, b) for a, b in zip(batch, [seeded[key] for key in keys], strict=True))
        assert sum(isinstance(sample, Unreadable) for sample in batch) == 2  # cut.jpg, twice
        assert any("cut.jpg" in sample.reason for sample in batch if isinstance(sample, Unreadable))
        half = len(dataset)
        assert all(same_sample(a, b) for a, b in zip(batch[:half], batch[half:], strict=True))


class RecordingTransform:
    """A fast-pipeline-shaped transform that records when each file is planned and when it is decoded."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def plan(self, path: str) -> Callable[[], AugmentedImage]:
        self.calls.append(("plan", Path(path).name))

        def rest() -> AugmentedImage:
            self.calls.append(("decode", Path(path).name))
            return AugmentedImage(torch.zeros(3, 4, 4, dtype=torch.uint8), identity_params())

        return rest


def test_the_loader_fetches_whole_batches_in_two_passes(tmp_path: Path) -> None:
    for i in range(6):
        write_jpeg(tmp_path / "train" / "c0" / f"{i}.jpg", 20, 20, seed=i)
    cfg = cfg_for(data_dir=str(tmp_path), batch_size=3, shuffle=False)
    folder = build_dataset(cfg, "train", train=True)
    folder.transform = recorder = RecordingTransform()
    batches = list(build_loader(cfg, folder, train=True))
    assert len(batches) == 2 and batches[0].images.shape == (3, 3, 4, 4)
    steps = [step for step, _ in recorder.calls]
    assert steps == ["plan"] * 3 + ["decode"] * 3 + ["plan"] * 3 + ["decode"] * 3


def test_reduction_never_enlarges() -> None:
    assert reduction_for(447, 1000, 224) == 1
    assert reduction_for(448, 1000, 224) == 2
    assert reduction_for(5000, 5000, 224) == 8
    assert reduction_for(900, 2000, 224) == 4


@BOTH_STEPS
def test_eval_pixels_equal_the_per_image_pipeline(tmp_path: Path, compiled: bool) -> None:
    cfg = cfg_for(image_resize=32, crop_pct=0.875)
    batch = BatchTransform(cfg, train=False, compiled=compiled)
    for k, (h, w) in enumerate([(75, 100), (100, 61), (37, 37)]):
        path = write_jpeg(tmp_path / f"{k}.jpg", h, w, seed=k)
        sample = EvalSampleTransform(cfg).from_file(path)
        fast = batch(sample.pixels[None], sample.params[None])[0]
        classic = build_transform(cfg, train=False)(load_image(path))
        assert torch.equal(fast, classic)


def test_other_formats_and_broken_files(tmp_path: Path) -> None:
    cfg = cfg_for()
    png = tmp_path / "a.png"
    Image.fromarray(photo(30, 40)).convert("L").save(png)
    assert TrainSampleTransform(cfg).from_file(png).pixels.shape == (3, 24, 24)
    cmyk = tmp_path / "cmyk.jpg"
    Image.fromarray(photo(30, 40)).convert("CMYK").save(cmyk)
    assert EvalSampleTransform(cfg).from_file(cmyk).pixels.shape == (3, 24, 24)
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(write_jpeg(tmp_path / "whole.jpg", 60, 80).read_bytes()[:700])
    with pytest.raises(DataError, match=r"cut\.jpg"):
        TrainSampleTransform(cfg).from_file(truncated)
    with pytest.raises(DataError, match=r"missing\.jpg"):
        TrainSampleTransform(cfg).from_file(tmp_path / "missing.jpg")


def test_loader_yields_uint8_and_parameters(tmp_path: Path) -> None:
    for i in range(8):
        write_jpeg(tmp_path / "train" / f"c{i % 2}" / f"{i}.jpg", 50 + 3 * i, 70, seed=i)
    cfg = cfg_for(data_dir=str(tmp_path), re_prob=0.5)
    loader = build_loader(cfg, build_dataset(cfg, "train", train=True), train=True)
    images, labels, unreadable, params = next(iter(loader))
    assert images.dtype == torch.uint8 and images.shape == (4, 3, 24, 24) and params.shape == (4, 10)
    assert unreadable == () and labels.dtype == torch.int64
    # torch's ops (the compiled step is compared with them in test_compiled_batch_step_equals_torchs_ops)
    chunked = BatchTransform(cfg, train=True, chunk=1, compiled=False)(images, params)
    whole = BatchTransform(cfg, train=True, chunk=64, compiled=False)(images, params)
    assert chunked.dtype == torch.float32 and torch.equal(chunked, whole)
    # a GPU erases with a mask (no boxes read on the host), a CPU with a slice per image: the same floats
    finish = BatchTransform(cfg, train=True, compiled=False)
    assert torch.equal(finish._erase_with_mask(finish._colour(images, params), params), whole)
    assert (params[:, ERASE][:, 3] >= 0).all() and (params[:, ERASE][:, 3] > 0).any()  # some boxes were erased


def test_pipeline_choice() -> None:
    with pytest.raises(ConfigError, match="data_pipeline fast cannot apply auto_augment"):
        validate(cfg_for(data_pipeline="fast", auto_augment="randaug-m9"))
    validate(cfg_for(data_pipeline="auto", auto_augment="randaug-m9"))


def test_auto_augment_takes_the_per_image_pipeline(tmp_path: Path) -> None:
    write_jpeg(tmp_path / "train" / "a" / "0.jpg", 40, 40)
    image, _ = build_dataset(cfg_for(data_dir=str(tmp_path), auto_augment="trivialaugwide"), "train", True)[0]
    assert image.dtype == torch.float32
    image, _ = build_dataset(cfg_for(data_dir=str(tmp_path)), "train", True)[0]
    assert image.pixels.dtype == torch.uint8
