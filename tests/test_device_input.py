"""decode_on_device: workers read and draw, the batch is decoded where the model runs (here the CPU)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from PIL import Image

from shufflenetv2.config import Config, ConfigError, validate
from shufflenetv2.data import build_dataset, build_loader
from shufflenetv2.device_input import DeviceInput, EncodedBatch
from tests.test_pipeline import photo, write_jpeg

CPU = torch.device("cpu")


def folder(root: Path, broken: bool = False) -> Path:
    for k in range(6):
        write_jpeg(root / "train" / f"c{k % 2}" / f"{k}.jpg", 40 + 7 * k, 64, seed=k)
    Image.fromarray(photo(30, 30)).save(root / "train" / "c0" / "9.png")  # decoded in the worker
    if broken:  # a valid header, then garbage: only a decoder finds out
        good = (root / "train" / "c1" / "1.jpg").read_bytes()
        (root / "train" / "c1" / "8.jpg").write_bytes(good[:400] + bytes(range(256)) * 8)
    return root


def batches(cfg: Config, train: bool) -> list[tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]]:
    loader = build_loader(cfg, build_dataset(cfg, "train", train=train), train=train)
    loader.sampler.set_epoch(1)
    inputs = DeviceInput(cfg, train, CPU)
    return [inputs(batch) for batch in loader]


def test_device_decoding_gives_the_workers_pixels(tmp_path: Path) -> None:
    """The same draws and the same libjpeg-turbo decode: the batches are those of worker decoding (at 40 px
    no crop of these small files is large enough for the workers' reduced-scale decoding; the workers'
    fast IDCT, which the device decoders do not offer, is off)."""
    base = Config(dataset="imagefolder", data_dir=str(folder(tmp_path)), image_resize=40, batch_size=7,
                  num_parallel_workers=0, drop_remainder=False, re_prob=0.5, fast_dct=False)  # fmt: skip
    for train in (True, False):
        on_device = batches(dataclasses.replace(base, decode_on_device=True), train)
        in_workers = batches(base, train)
        assert len(on_device) == len(in_workers) == 1
        (a, ya, bad_a), (b, yb, bad_b) = on_device[0], in_workers[0]
        assert bad_a == bad_b == () and torch.equal(ya, yb)
        assert a.shape == (7, 3, 40, 40) and a.is_contiguous(memory_format=torch.channels_last)
        assert (a - b).abs().max() < 1e-5


def test_loader_sends_bytes_not_pixels(tmp_path: Path) -> None:
    cfg = Config(dataset="imagefolder", data_dir=str(folder(tmp_path)), image_resize=24, batch_size=7,
                 num_parallel_workers=0, decode_on_device=True)  # fmt: skip
    loaded = next(iter(build_loader(cfg, build_dataset(cfg, "train", train=True), train=True)))
    assert isinstance(loaded.images, EncodedBatch)
    sizes = sorted(d.ndim for d in loaded.images.data)
    assert sizes == [1] * 6 + [3]  # six JPEGs travel as bytes, the PNG finished


def test_undecodable_files_are_replaced_in_training_and_left_out_in_evaluation(tmp_path: Path) -> None:
    cfg = Config(dataset="imagefolder", data_dir=str(folder(tmp_path, broken=True)), image_resize=24, batch_size=8,
                 num_parallel_workers=0, decode_on_device=True, drop_remainder=False)  # fmt: skip
    ((images, targets, bad),) = batches(cfg, train=True)
    assert images.shape[0] == targets.shape[0] == 8 and len(bad) == 1 and "8.jpg" in bad[0]
    ((images, targets, bad),) = batches(cfg, train=False)
    assert images.shape[0] == targets.shape[0] == 7 and len(bad) == 1


def test_decode_on_device_needs_the_fast_pipeline() -> None:
    try:
        validate(Config(decode_on_device=True, data_pipeline="classic"))
    except ConfigError as exc:
        assert "decode_on_device" in str(exc)
    else:
        raise AssertionError("decode_on_device with the classic pipeline was accepted")


def test_training_run_with_device_decoding(tmp_path: Path) -> None:
    from shufflenetv2.config import from_dict
    from shufflenetv2.engine import train

    data = folder(tmp_path / "data")
    for k in range(4):
        write_jpeg(data / "val" / f"c{k % 2}" / f"{k}.jpg", 50, 60, seed=10 + k)
    values = dict(dataset="imagefolder", data_dir=str(data), num_classes=2, image_resize=32, batch_size=4,
                  num_parallel_workers=1, epoch_size=2, val_while_train=True, mode=1, opt="momentum", lr=0.01,
                  warmup_epochs=0, decay_epochs=2, ckpt_save_dir=str(tmp_path / "run"),
                  decode_on_device=True)  # fmt: skip
    cfg = from_dict(values)
    result = train(cfg)
    assert result.epochs == 2 and result.last is not None and result.last.count == 4
    assert torch.isfinite(torch.tensor(result.last.loss))
