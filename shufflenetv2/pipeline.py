"""The fast input pipeline: workers decode and crop to uint8, the batch is coloured and normalised on the device.

MindCV's train transform (RandomResizedCrop, flips, ColorJitter, Normalize, RandomErasing) costs most of
its CPU time after decoding, on per-image float work.  Here a worker does only what needs the file:

* it draws every random parameter of the sample with torchvision's own samplers, in the order the
  per-image ``transforms.v2`` pipeline (``data.build_transform``) draws them, so both pipelines give the
  same crop boxes, flips, jitter factors and erasing boxes for the same per-sample seed;
* it decodes a JPEG at 1/2, 1/4 or 1/8 scale inside libjpeg-turbo when the crop box still has at least
  the output size at that scale, so no crop is ever enlarged from a smaller decode;
* it decodes only the crop box where libjpeg-turbo 3 is found (``jpeg_region``; 1.4 instead of 2.0 ms per
  ImageNet-sized photo), else the whole image (``simplejpeg``), with the same pixels either way;
* it resizes the box to the output size in uint8 and flips it, and hands over 150 KB instead of 600 KB,
  in the HWC order the resize leaves it in: the batch is collated as (B, S, S, 3) rows, and the batch
  step's one uint8-to-float copy puts the channels first, so no worker spends a copy on reordering;
* with ``fast_dct`` (the default) training JPEGs use libjpeg-turbo's fast integer IDCT, which decodes
  them about 10 % faster.  On the hymenoptera photos the pixels move by 1.2 grey levels on average
  (PSNR 43 dB against the exact IDCT), far less than the colour jitter moves them; evaluation and
  ``fast_dct False`` decode exactly.

``BatchTransform`` then applies the colour jitter (each image's three operations in its own random
order, clamped after each as torchvision's float kernels do), the normalisation and the erasing to
the whole uint8 batch wherever the batch lives: on the GPU it costs nothing measurable, on a CPU it
runs as one numba-compiled loop per image (``batch_kernel``: 0.19 ms per 224-px image, where torch's
ops take 0.67) and erases with one slice per image.  The eval transform (resize, centre crop) is
deterministic and decodes at full scale (with libjpeg-turbo 3 only the part the crop reads), so its
pixels are those of the per-image pipeline.
"""

from __future__ import annotations

import functools
import importlib
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import default_collate
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from . import jpeg_region
from .config import Config
from .data import MAX_IMAGE_PIXELS, interpolation_mode, load_image

try:  # libjpeg-turbo with scaled decoding; without it JPEGs decode at full size through load_image
    import simplejpeg
except ImportError:  # pragma: no cover - simplejpeg is a dependency, but keep working without it
    simplejpeg = None

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale, also OpenCV's (MindSpore's) BT.601
# The per-sample parameter vector: jitter factors, the order of the three jitter ops, the erasing box.
BRIGHTNESS, CONTRAST, SATURATION, ORDER, ERASE = 0, 1, 2, slice(3, 6), slice(6, 10)
NUM_PARAMS = 10
JPEG_MAGIC = b"\xff\xd8"
Box = tuple[int, int, int, int]  # a crop box: top, left, height, width


class AugmentedImage(NamedTuple):
    """A worker's output: the cropped, flipped uint8 image and what the batch step still has to do."""

    pixels: Tensor  # uint8 (3, S, S), its memory usually in HWC order (strides (1, 3 S, 3))
    params: Tensor  # float32 (NUM_PARAMS,); see BRIGHTNESS .. ERASE

    @staticmethod
    def collate_batch(samples: list[AugmentedImage]) -> tuple[Tensor, Tensor]:
        """uint8 (B, 3, S, S) stored channels_last, and (B, NUM_PARAMS) parameters.

        Stacked as HWC rows, each image is one contiguous copy (into shared memory in a loader worker,
        as ``default_collate`` does); stacking (3, S, S) views would reorder every pixel instead.
        """
        rows = default_collate([sample.pixels.permute(1, 2, 0) for sample in samples])
        return rows.permute(0, 3, 1, 2), torch.stack([sample.params for sample in samples])


def _draw_params(transform: v2.Transform, inputs: list[Tensor]) -> dict:
    """A v2 transform's random parameters (``make_params`` since torchvision 0.21, ``_get_params`` before)."""
    make = getattr(transform, "make_params", None) or transform._get_params
    return make(inputs)


def _dims_only(channels: int, height: int, width: int) -> Tensor:
    """A tensor with this shape and no storage: torchvision's samplers read only the shape."""
    return torch.empty(()).expand(channels, height, width)


def jpeg_header(raw: bytes) -> tuple[int, int, str] | None:
    """(height, width, colour space) from a JPEG header, or None when ``raw`` is not a JPEG simplejpeg reads."""
    if simplejpeg is None or not raw.startswith(JPEG_MAGIC):
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(raw)
    except ValueError:
        return None
    return height, width, colorspace


def read_jpeg(path: str | os.PathLike[str]) -> tuple[bytes, int, int, str] | None:
    """(bytes, height, width, colour space) of a JPEG the fast decoders may take; None sends the file to
    ``load_image``, which reads everything else and words every refusal (unreadable, too many pixels)."""
    try:
        raw = Path(path).read_bytes()
    except OSError:
        return None
    header = jpeg_header(raw)
    if header is None or header[0] * header[1] > MAX_IMAGE_PIXELS:
        return None
    return (raw, *header)


def params_vector(factors: Sequence[float], order: Sequence[int], erase: Sequence[float]) -> Tensor:
    """The parameter vector laid out as BRIGHTNESS .. ERASE.  One tensor from one list: writing the fields
    one by one into a tensor cost about 0.07 ms per image."""
    return torch.tensor([*factors, *order, *erase], dtype=torch.float32)


IDENTITY = ((1.0, 1.0, 1.0), (BRIGHTNESS, CONTRAST, SATURATION), (0.0, 0.0, 0.0, 0.0))  # factors 1, no erasing


def identity_params() -> Tensor:
    """The parameter vector that leaves an image as it is: factors 1, no erasing box."""
    return params_vector(*IDENTITY)


def reduction_for(box_height: int, box_width: int, size: int) -> int:
    """The largest JPEG scale-down (1, 2, 4 or 8) that keeps a box of this size at least ``size`` pixels.

    libjpeg-turbo also scales by other multiples of 1/8, but those run slower than a full decode here.
    """
    factor = 1
    while factor < 8 and min(box_height, box_width) >= 2 * factor * size:
        factor *= 2
    return factor


def scale_box(box: Box, height: int, width: int, to_height: int, to_width: int) -> Box:
    """A (top, left, height, width) box of a height x width image in the pixels of its to_height x to_width
    reduced decode: within half a pixel there, a quarter of an output pixel."""
    if (to_height, to_width) == (height, width):
        return box
    top, left, box_height, box_width = box
    scale_h, scale_w = to_height / height, to_width / width
    top, left = round(top * scale_h), round(left * scale_w)
    return (
        top,
        left,
        max(1, min(round(box_height * scale_h), to_height - top)),
        max(1, min(round(box_width * scale_w), to_width - left)),
    )


def decode_jpeg_scaled(raw: bytes, height: int, width: int, factor: int = 1, fast_dct: bool = False) -> Tensor | None:
    """An (H', W', 3) uint8 RGB array decoded at 1/``factor`` scale, or None to fall back to ``load_image``.

    ``fast_dct`` takes libjpeg-turbo's fast integer IDCT instead of its accurate one.
    """
    try:
        array = simplejpeg.decode_jpeg(
            raw,
            colorspace="RGB",
            fastdct=fast_dct,
            min_height=math.ceil(height / factor),
            min_width=math.ceil(width / factor),
        )
    except ValueError:  # CMYK, truncated, corrupt: load_image decodes it or says precisely what is wrong
        return None
    return torch.from_numpy(array)


class _SampleTransform:
    """Shared by the train and eval transforms: reading a file, the size check, uint8 resizing."""

    def __init__(self, cfg: Config) -> None:
        self.size = cfg.image_resize
        self.interpolation = interpolation_mode(cfg.interpolation)
        # decode only what the crop reads (libjpeg-turbo 3); False decodes whole images, same pixels
        self.decode_region = jpeg_region.available()

    def from_file(self, path: str | os.PathLike[str]) -> AugmentedImage:
        """The sample for the file at ``path``; JPEGs take the fast decoder, everything else ``load_image``."""
        return self.plan(path)()

    def plan(self, path: str | os.PathLike[str]) -> Callable[[], AugmentedImage]:
        """Read the file and draw the sample's random parameters now; return the rest of the work (decoding,
        cropping, resizing), which draws no random numbers.

        ``data.SeededDataset`` plans a whole batch, each sample under its own seed, before it decodes any
        of it, so each half's code stays in the CPU's caches from one image to the next: 1.63 instead of
        1.79 ms per ImageNet-sized training JPEG, batch step included (paired, same pixels).  Files other
        than JPEGs are decoded here already, since the draws need their size."""
        found = read_jpeg(path)
        if found is None or not self._takes(found[3]):
            sample = self(load_image(path))
            return lambda: sample
        raw, height, width, _ = found
        return self._plan_jpeg(raw, path, height, width)

    def _takes(self, colorspace: str) -> bool:
        """Whether ``_plan_jpeg`` handles a JPEG in this colour space (simplejpeg reads them all)."""
        return True

    def _plan_jpeg(self, raw: bytes, path: str | os.PathLike[str], height: int, width: int) -> Callable[[], Any]:
        raise NotImplementedError

    def _resize(self, hwc: Tensor, size: list[int]) -> Tensor:
        """uint8 resize of an (H, W, 3) view.  Made contiguous first, the crop is a channels-last image,
        which takes torch's vectorised uint8 kernel: 0.27 instead of 0.43 ms per crop, same pixels."""
        return TF.resize(hwc.contiguous().permute(2, 0, 1), size, interpolation=self.interpolation, antialias=True)


class TrainSampleTransform(_SampleTransform):
    """RandomResizedCrop and flips to uint8, plus the jitter and erasing parameters for ``BatchTransform``.

    Calls torchvision's samplers in the per-image pipeline's order: crop box, horizontal flip, vertical
    flip, ColorJitter (op order, then brightness, contrast, saturation), RandomErasing (coin, then box).
    """

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.crop = v2.RandomResizedCrop(self.size, scale=cfg.scale, ratio=cfg.ratio, antialias=True)
        self.hflip, self.vflip = cfg.hflip, cfg.vflip
        self.fast_dct = cfg.fast_dct
        self.jitter = v2.ColorJitter(cfg.color_jitter, cfg.color_jitter, cfg.color_jitter) if cfg.color_jitter else None
        self.erase = (
            v2.RandomErasing(p=cfg.re_prob, scale=cfg.re_scale, ratio=cfg.re_ratio, value=cfg.re_value)
            if cfg.re_prob > 0
            else None
        )

    def _draw(self, height: int, width: int) -> tuple[Box, bool, bool, Tensor]:
        drawn = _draw_params(self.crop, [_dims_only(3, height, width)])
        box = (drawn["top"], drawn["left"], drawn["height"], drawn["width"])
        hflip = self.hflip > 0 and bool(torch.rand(1) < self.hflip)
        vflip = self.vflip > 0 and bool(torch.rand(1) < self.vflip)
        factors, order, erase = IDENTITY
        if self.jitter is not None:
            drawn = _draw_params(self.jitter, [])
            order = [int(i) for i in drawn["fn_idx"] if int(i) < 3]  # hue (3) is never on: MindCV jitters b, c, s
            factors = [drawn["brightness_factor"], drawn["contrast_factor"], drawn["saturation_factor"]]
        if self.erase is not None and bool(torch.rand(1) < self.erase.p):
            drawn = _draw_params(self.erase, [_dims_only(3, self.size, self.size)])
            if drawn["v"] is not None:  # None: no box fitted in ten tries, nothing is erased
                erase = [drawn["i"], drawn["j"], drawn["h"], drawn["w"]]
        return box, hflip, vflip, params_vector(factors, order, erase)

    def _finish(self, hwc: Tensor, box: Box, flips: tuple[bool, bool], params: Tensor) -> AugmentedImage:
        top, left, h, w = box
        image = self._resize(hwc[top : top + h, left : left + w], [self.size, self.size])
        hflip, vflip = flips
        if hflip:
            image = image.flip(-1)
        if vflip:
            image = image.flip(-2)
        return AugmentedImage(image, params)  # still HWC in memory: flips keep the strides

    def __call__(self, image: Tensor) -> AugmentedImage:
        """An already decoded uint8 (3, H, W) image (CIFAR arrays, PNGs)."""
        box, hflip, vflip, params = self._draw(image.shape[-2], image.shape[-1])
        return self._finish(image.permute(1, 2, 0), box, (hflip, vflip), params)

    def _plan_jpeg(
        self, raw: bytes, path: str | os.PathLike[str], height: int, width: int
    ) -> Callable[[], AugmentedImage]:
        drawn, hflip, vflip, params = self._draw(height, width)
        return functools.partial(self._decode, raw, path, height, width, drawn, (hflip, vflip), params)

    def _decode(
        self,
        raw: bytes,
        path: str | os.PathLike[str],
        height: int,
        width: int,
        drawn: Box,
        flips: tuple[bool, bool],
        params: Tensor,
    ) -> AugmentedImage:
        factor = reduction_for(drawn[2], drawn[3], self.size)
        if self.decode_region:
            box = scale_box(drawn, height, width, math.ceil(height / factor), math.ceil(width / factor))
            region = jpeg_region.decode_box(raw, *box, factor, self.fast_dct)
            if region is not None:
                return self._finish(region, (0, 0, *region.shape[:2]), flips, params)
        hwc = decode_jpeg_scaled(raw, height, width, factor, self.fast_dct)
        if hwc is None:
            return self._finish(load_image(path).permute(1, 2, 0), drawn, flips, params)
        return self._finish(hwc, scale_box(drawn, height, width, hwc.shape[0], hwc.shape[1]), flips, params)


def source_span(start: int, stop: int, in_size: int, out_size: int) -> tuple[int, int]:
    """The input pixels [a, b) that torch's antialiased bilinear resize from ``in_size`` to ``out_size``
    reads for the outputs [start, stop): each output's window around its centre, as torch computes it."""
    scale = in_size / out_size
    support = max(scale, 1.0)  # bilinear's support of 1, widened by the scale when shrinking
    return max(int(scale * (start + 0.5) - support + 0.5), 0), min(int(scale * (stop - 0.5) + support + 0.5), in_size)


class EvalSampleTransform(_SampleTransform):
    """Resize the shorter side to ``floor(image_resize / crop_pct)``, centre crop, uint8; full-scale decode.

    With libjpeg-turbo 3 only the source pixels the centre crop's outputs read are decoded, in place in
    an otherwise unwritten full-size image, so the resize sees the whole image's geometry and the crop's
    pixels are those of a whole decode; the rest of the resized image is thrown away with the crop.
    """

    SLACK = 4  # output pixels of margin around the crop: the decoded span never depends on rounding

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.resize = math.floor(cfg.image_resize / cfg.crop_pct)
        self.identity = identity_params()

    def _decode_centre(self, raw: bytes, height: int, width: int) -> Tensor | None:
        """A full-size (H, W, 3) image whose pixels under the centre crop are decoded, or None."""
        short, long = min(height, width), max(height, width)
        resized_long = int(self.resize * long / short)  # torchvision's rule for a shorter-side size
        out_h, out_w = (self.resize, resized_long) if height <= width else (resized_long, self.resize)
        if out_h < self.size or out_w < self.size:  # the crop pads the image: decode all of it
            return None
        top, left = round((out_h - self.size) / 2), round((out_w - self.size) / 2)
        y0, y1 = source_span(max(0, top - self.SLACK), min(out_h, top + self.size + self.SLACK), height, out_h)
        x0, x1 = source_span(max(0, left - self.SLACK), min(out_w, left + self.size + self.SLACK), width, out_w)
        canvas = np.empty((height, width, 3), dtype=np.uint8)
        return jpeg_region.decode_box(raw, y0, x0, y1 - y0, x1 - x0, out=canvas)

    def _finish(self, hwc: Tensor) -> AugmentedImage:
        image = TF.center_crop(self._resize(hwc, [self.resize]), [self.size])
        return AugmentedImage(image, self.identity)  # a view: collating copies it once

    def __call__(self, image: Tensor) -> AugmentedImage:
        return self._finish(image.permute(1, 2, 0))

    def _plan_jpeg(
        self, raw: bytes, path: str | os.PathLike[str], height: int, width: int
    ) -> Callable[[], AugmentedImage]:
        return functools.partial(self._decode, raw, path, height, width)  # nothing to draw

    def _decode(self, raw: bytes, path: str | os.PathLike[str], height: int, width: int) -> AugmentedImage:
        hwc = self._decode_centre(raw, height, width) if self.decode_region else None
        if hwc is None:
            hwc = decode_jpeg_scaled(raw, height, width)
        return self._finish(load_image(path).permute(1, 2, 0) if hwc is None else hwc)


def build_sample_transform(cfg: Config, train: bool) -> TrainSampleTransform | EvalSampleTransform:
    """The worker half of the fast pipeline (``config.validate`` refuses it with auto_augment)."""
    return TrainSampleTransform(cfg) if train else EvalSampleTransform(cfg)


class BatchTransform(torch.nn.Module):
    """uint8 (B, 3, S, S) images and their (B, NUM_PARAMS) parameters -> normalised float32, on their device,
    channels_last when ``cfg.channels_last``.

    Each jitter op is torchvision's float kernel: ``clamp(f * x + (1 - f) * target)`` with target 0
    (brightness), the image's mean grey level (contrast) or each pixel's grey level (saturation).  As all
    three share that form, every position of the per-image op order is one vectorised blend.  On a CPU
    with numba installed the same arithmetic runs compiled (``batch_kernel``); ``compiled=False`` keeps
    torch's ops there.
    """

    def __init__(self, cfg: Config, train: bool, chunk: int = 8, compiled: bool = True) -> None:
        super().__init__()
        self.compiled = compiled  # on a CPU, where numba is installed
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.jitter = train and bool(cfg.color_jitter)
        self.erase = train and cfg.re_prob > 0
        self.erase_value = cfg.re_value
        self.chunk = chunk
        # the per-image pipeline's arithmetic to the bit (ToDtype's * (1/255), Normalize's - mean, / std), so
        # without jitter both give identical batches and identical training runs
        self.register_buffer("mean", torch.tensor([m / 255 for m in cfg.mean]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([s / 255 for s in cfg.std]).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: Tensor, params: Tensor) -> Tensor:
        params = params.to(images.device, non_blocking=True)
        if images.device.type != "cpu":
            x = self._colour(images, params)
            return (self._erase_with_mask(x, params) if self.erase else x).contiguous(memory_format=self.memory_format)
        takes_kernel = self.compiled and images.dtype == torch.uint8 and images.shape[1] == 3
        kernel = compiled_batch_step() if takes_kernel else None
        if kernel is not None:
            out = kernel.colour_batch(images, params, self.mean, self.std, self.jitter, self.memory_format)
        else:
            out = torch.empty(images.shape, dtype=torch.float32, memory_format=self.memory_format)
            for start in range(0, images.shape[0], self.chunk):  # a chunk stays in cache through all the passes
                part = slice(start, start + self.chunk)
                out[part] = self._colour(images[part], params[part])
        if self.erase:  # a slice per image touches only its box: 0.35 ms per 224-px image less than a mask
            for k, (top, left, height, width) in enumerate(params[:, ERASE].long().tolist()):
                out[k, :, top : top + height, left : left + width] = self.erase_value
        return out

    def _colour(self, images: Tensor, params: Tensor) -> Tensor:
        """Conversion to float, jitter and normalisation of a whole (part of a) batch."""
        # one pass converts and puts the channels first (workers hand HWC rows over): the per-image
        # arithmetic below runs several times slower on channels_last data, whose innermost axis has 3 values
        x = images.to(torch.float32, memory_format=torch.contiguous_format).mul_(1.0 / 255)
        if self.jitter:
            for position in range(3):
                op = params[:, ORDER][:, position].long()
                factor = params.gather(1, op[:, None]).view(-1, 1, 1, 1)
                x = self._blend(x, op, factor)
        return x.sub_(self.mean).div_(self.std)

    def _blend(self, x: Tensor, op: Tensor, factor: Tensor) -> Tensor:
        """One jitter op per image (0 brightness, 1 contrast, 2 saturation), all images at once, in place.

        ``x * f + (1 - f) * target`` as one lerp towards each image's target: 0, the image's mean grey or
        each pixel's grey.  One pass instead of a multiply, a multiply-add and an add: 7 % off a CPU batch
        step, and within a few float32 ulps of torchvision's kernel.
        """
        w0, w1, w2 = GRAY_WEIGHTS
        grey = x[:, 0:1] * w0  # (B, 1, H, W), three passes over a third of the data
        grey.add_(x[:, 1:2], alpha=w1).add_(x[:, 2:3], alpha=w2)
        mean = grey.mean((2, 3), keepdim=True)
        target = grey.mul_((op == SATURATION).view(-1, 1, 1, 1)).add_(mean * (op == CONTRAST).view(-1, 1, 1, 1))
        return x.lerp_(target, 1.0 - factor).clamp_(0.0, 1.0)

    def _erase_with_mask(self, x: Tensor, params: Tensor) -> Tensor:
        """Erasing without reading the boxes on the host (a device would wait for that); rows without a
        box have width 0 and so an empty mask."""
        top, left, h, w = (params[:, ERASE][:, k].view(-1, 1, 1, 1) for k in range(4))
        rows = torch.arange(x.shape[-2], device=x.device, dtype=params.dtype).view(1, 1, -1, 1)
        cols = torch.arange(x.shape[-1], device=x.device, dtype=params.dtype).view(1, 1, 1, -1)
        return x.masked_fill_((rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w), self.erase_value)


@functools.cache
def compiled_batch_step() -> ModuleType | None:
    """``batch_kernel``, or None where numba is not installed (the fast-cpu extra).  Imported on first
    use: numba's import takes a quarter of a second, which GPU runs and other commands need not pay."""
    try:
        return importlib.import_module(".batch_kernel", __package__)
    except ImportError:
        return None


def build_batch_transform(cfg: Config, train: bool, compiled: bool = True) -> BatchTransform:
    return BatchTransform(cfg, train, compiled=compiled)


def describe_input(cfg: Config, dataset: object = None, device: torch.device | None = None) -> str:
    """The training log's word on the input path, so that a run says whether JPEGs decode crop boxes only
    and, on a CPU ``device``, whether the batch step is compiled.

    With the dataset at hand it also says what there is to decode: the crop-box path only applies to JPEG
    files, so a folder of PNGs (the digits demo) or in-memory arrays (CIFAR) must not claim it."""
    if not uses_fast_pipeline(cfg):
        return "per-image transforms (data_pipeline classic)"
    words = _describe_decoding(cfg, dataset)
    if device is not None and device.type == "cpu":
        how = "compiled (numba)" if compiled_batch_step() else "in torch ops (compiled with the fast-cpu extra)"
        words += f"; batch step {how}"
    return words


def _describe_decoding(cfg: Config, dataset: object) -> str:
    files = _file_names(dataset)
    if dataset is not None and files is None:
        return "fast pipeline, images from in-memory arrays (nothing to decode)"
    jpegs = None if files is None else sum(name.lower().endswith((".jpg", ".jpeg")) for name in files)
    if jpegs == 0:
        return "fast pipeline, no JPEG files (images decoded whole)"
    share = "" if files is None or jpegs == len(files) else f" ({jpegs:,} of {len(files):,} files are JPEGs by name)"
    if cfg.decode_on_device:
        return f"fast pipeline, JPEGs decoded on the device{share}"
    if jpeg_region.available():
        return f"fast pipeline, JPEG crop boxes decoded alone (libjpeg-turbo 3){share}"
    return f"fast pipeline, whole JPEGs decoded (no libjpeg-turbo 3: pip install 'shufflenetv2[fast-jpeg]'){share}"


def _file_names(dataset: object) -> list[str] | None:
    """The file names a folder dataset (or a subset of one) reads, or None for any other dataset."""
    indices = getattr(dataset, "indices", None)
    samples = getattr(getattr(dataset, "base", dataset), "samples", None)
    if samples is None:
        return None
    picked = samples if indices is None else [samples[i] for i in indices]
    return [str(path) for path, _ in picked]


def uses_fast_pipeline(cfg: Config) -> bool:
    """``data_pipeline auto`` takes the fast path unless an auto-augment policy needs per-image float work."""
    return cfg.data_pipeline == "fast" or (cfg.data_pipeline == "auto" and not cfg.auto_augment)
