"""A loader batch becomes the model's input on the device; optionally JPEGs are decoded there too.

``DeviceInput`` is what the training loop and evaluation call: the per-image pipeline's float batch is
moved (and made channels_last), the fast pipeline's uint8 batch is moved and finished by
``pipeline.BatchTransform``, and an ``EncodedBatch`` is first decoded on the device.

With ``decode_on_device True`` a loader worker only reads the file, parses its header and draws the
sample's random parameters (the same draws as ``pipeline.TrainSampleTransform``); the main process
decodes the whole batch with one ``torchvision.io.decode_jpeg(list, device=...)`` call, then crops,
resizes and flips each image where it was decoded and hands the uint8 batch to ``BatchTransform``.
Decoding is what bounds a small network's data rate on the CPU (about 1.8 ms per ImageNet-sized JPEG
per core here), so this moves the bound to the GPU.  Files that are not JPEGs are decoded and cropped
in the worker as before and travel finished.  On a CPU device the same code runs on the CPU, which is
how it is tested; it is no faster there.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as TF

from .config import Config
from .data import LoadedBatch
from .errors import DataError
from .pipeline import (
    AugmentedImage,
    BatchTransform,
    EvalSampleTransform,
    TrainSampleTransform,
    build_batch_transform,
)

FINISHED = 0  # box height 0: ``data`` already holds the (3, S, S) result


class EncodedImage(NamedTuple):
    """A worker's output: the file's bytes and where to crop them, or finished pixels for other formats."""

    data: Tensor  # uint8: the JPEG's bytes (1-D), or (3, S, S) pixels when box[2] == FINISHED
    box: Tensor  # int64 (6,): top, left, height, width, horizontal flip, vertical flip
    params: Tensor  # float32: what BatchTransform applies (pipeline.NUM_PARAMS)
    source: str  # the file, for error messages

    @staticmethod
    def collate_batch(samples: list[EncodedImage]) -> tuple[EncodedBatch, Tensor]:
        """The batch, and its parameters (also in it) for ``data.LoadedBatch``."""
        params = torch.stack([s.params for s in samples])
        boxes = torch.stack([s.box for s in samples])
        return EncodedBatch([s.data for s in samples], boxes, params, [s.source for s in samples]), params


class EncodedBatch(NamedTuple):
    data: list[Tensor]
    boxes: Tensor
    params: Tensor
    sources: list[str]


def _encoded(raw: bytes, box: list[int], params: Tensor, path: str | os.PathLike[str]) -> EncodedImage:
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    return EncodedImage(data, torch.tensor(box, dtype=torch.int64), params, str(path))


def _finished(sample: AugmentedImage) -> EncodedImage:
    """A sample the worker decoded and cropped itself (not a JPEG, or one the device cannot decode)."""
    return EncodedImage(sample.pixels, torch.zeros(6, dtype=torch.int64), sample.params, "")


DEVICE_COLORSPACES = ("YCbCr", "Gray")  # what nvJPEG turns into RGB; CMYK/YCCK JPEGs go through PIL in the worker


class _Encoded:
    """Mixed into a sample transform: JPEGs the device can decode travel as bytes, all else finished."""

    def _takes(self, colorspace: str) -> bool:
        return colorspace in DEVICE_COLORSPACES

    def __call__(self, image: Tensor) -> EncodedImage:
        return _finished(super().__call__(image))  # type: ignore[misc]


class EncodedTrainTransform(_Encoded, TrainSampleTransform):
    """The worker half for training: the draws of ``TrainSampleTransform``, no decoding."""

    def _plan_jpeg(  # type: ignore[override]
        self, raw: bytes, path: str | os.PathLike[str], height: int, width: int
    ) -> Callable[[], EncodedImage]:
        box, hflip, vflip, params = self._draw(height, width)
        encoded = _encoded(raw, [*box, hflip, vflip], params, path)
        return lambda: encoded


class EncodedEvalTransform(_Encoded, EvalSampleTransform):
    """The worker half for evaluation: the whole image is decoded, resized and centre-cropped on the device."""

    def _plan_jpeg(  # type: ignore[override]
        self, raw: bytes, path: str | os.PathLike[str], height: int, width: int
    ) -> Callable[[], EncodedImage]:
        encoded = _encoded(raw, [0, 0, height, width, 0, 0], self.identity, path)
        return lambda: encoded


class DeviceDecoder:
    """EncodedBatch -> uint8 (B, 3, S, S) on ``device``, plus the files that could not be decoded."""

    def __init__(self, cfg: Config, train: bool, device: torch.device) -> None:
        sizes = EvalSampleTransform(cfg)  # the output size, interpolation and eval resize, as the workers'
        self.size, self.interpolation, self.resize = sizes.size, sizes.interpolation, sizes.resize
        self.train, self.device = train, device

    def __call__(self, batch: EncodedBatch) -> tuple[Tensor, list[int], list[str]]:
        """The images, the indices of the samples they are, and the reasons of those left out."""
        boxes = batch.boxes.tolist()
        jpegs = [k for k, box in enumerate(boxes) if box[2] != FINISHED]
        decoded, reasons = self._decode([batch.data[k] for k in jpegs], [batch.sources[k] for k in jpegs])
        decoded = {jpegs[position]: image for position, image in decoded.items()}  # by sample index
        images: list[Tensor] = []
        kept: list[int] = []
        for k, box in enumerate(boxes):
            if box[2] == FINISHED:
                images.append(batch.data[k].to(self.device, non_blocking=True))
            elif k in decoded:
                images.append(self._crop(decoded[k], box))
            else:
                continue
            kept.append(k)
        if not images:
            return torch.empty(0, 3, self.size, self.size, dtype=torch.uint8, device=self.device), kept, reasons
        return torch.stack(images), kept, reasons

    def _decode(self, data: list[Tensor], sources: list[str]) -> tuple[dict[int, Tensor], list[str]]:
        """One batched call; when it fails, one call per image so that only the broken files drop out."""
        if not data:
            return {}, []
        try:
            return dict(enumerate(decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device))), []
        except RuntimeError:
            pass
        decoded: dict[int, Tensor] = {}
        reasons = []
        for k, (raw, source) in enumerate(zip(data, sources, strict=True)):
            try:
                decoded[k] = decode_jpeg(raw, mode=ImageReadMode.RGB, device=self.device)
            except RuntimeError as exc:
                reasons.append(f"cannot decode image {source}: {' '.join(str(exc).split())[:200]}")
        return decoded, reasons

    def _crop(self, image: Tensor, box: list[int]) -> Tensor:
        if not self.train:
            return TF.center_crop(self._resized(image, [self.resize]), [self.size])
        top, left, height, width, hflip, vflip = box
        image = self._resized(image[:, top : top + height, left : left + width], [self.size, self.size])
        if hflip:
            image = image.flip(-1)
        if vflip:
            image = image.flip(-2)
        return image

    def _resized(self, image: Tensor, size: list[int]) -> Tensor:
        return TF.resize(image, size, interpolation=self.interpolation, antialias=True)


class DeviceInput:
    """LoadedBatch -> (float images, targets, unreadable reasons) on ``device``, ready for the model.

    A training batch keeps its size when the device cannot decode a file (copies of decoded images
    fill in, as ``data.collate_train`` does for files the workers cannot read); an evaluation batch
    leaves such files out, so metrics count real images only.
    """

    def __init__(self, cfg: Config, train: bool, device: torch.device) -> None:
        self.train, self.device, self.channels_last = train, device, cfg.channels_last
        self.finish: BatchTransform = build_batch_transform(cfg, train).to(device)
        self.decoder = DeviceDecoder(cfg, train, device) if cfg.decode_on_device else None

    def __call__(self, batch: LoadedBatch) -> tuple[Tensor | None, Tensor | None, tuple[str, ...]]:
        images, targets, unreadable, params = batch
        if images is None:
            return None, None, unreadable
        if isinstance(images, EncodedBatch):
            pixels, kept, reasons = self.decoder(images)
            unreadable += tuple(reasons)
            if not kept:
                if self.train:
                    raise DataError(f"no image of a training batch could be decoded, e.g. {reasons[0]}")
                return None, None, unreadable
            if self.train and len(kept) < len(images.sources):
                order = [k % len(kept) for k in range(len(images.sources))]
                pixels, kept = pixels[order], [kept[k] for k in order]
            targets, params = targets[kept], images.params[kept]
            images = pixels
        images = images.to(self.device, non_blocking=True)
        targets = targets.to(self.device, non_blocking=True)
        if params is not None:  # the fast pipeline's uint8 batch: jitter, normalise, erase here
            return self.finish(images, params), targets, unreadable
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, targets, unreadable


def build_sample_transform(cfg: Config, train: bool) -> EncodedTrainTransform | EncodedEvalTransform:
    """The worker half when ``decode_on_device``: read and draw, no decoding."""
    return EncodedTrainTransform(cfg) if train else EncodedEvalTransform(cfg)
