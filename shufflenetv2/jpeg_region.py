"""Decoding only a JPEG's crop box, through libjpeg-turbo 3's TurboJPEG API.

A RandomResizedCrop box covers about half of a photo on average, yet a whole-image decode runs the
inverse DCT, chroma upsampling and colour conversion on every pixel.  libjpeg-turbo 3.0 decodes a
region instead: rows below the box are never read, rows above it are only entropy-decoded, columns
beside it skip the IDCT.  On the hymenoptera training photos with the recipes' crop draws that takes
decoding from 1.97 to 1.40 ms per image (one core); the evaluation's centre crop needs less of the
image too.  simplejpeg, the whole-image decoder, bundles libjpeg-turbo but offers no region, and
neither do Pillow or torchvision, hence this small ctypes binding.

The pixels are those of a whole-image decode cropped to the box, bit for bit: the region grows by
one pixel on each side, which gives the fancy chroma upsampler the neighbours it reads at the box's
edges, and its left edge moves down to an iMCU boundary as libjpeg-turbo requires.

The library is ``SHUFFLENETV2_LIBTURBOJPEG`` when set, else the copy the ``turbojpeg`` wheel carries
(the ``fast-jpeg`` extra; a pre-3.0 build of August 2023 with the 3.0 API), else the system's
``libturbojpeg`` if it is 3.0 or newer.  Without one, or with ``SHUFFLENETV2_LIBTURBOJPEG=none``,
``available()`` says False and workers decode whole images, slower but with the same pixels.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import glob
import importlib.util
import math
import os
import threading
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

LIBRARY_VARIABLE = "SHUFFLENETV2_LIBTURBOJPEG"
# turbojpeg.h: tj3Init's TJINIT_DECOMPRESS, tj3Get/tj3Set parameters, TJPF_RGB, and each TJSAMP's iMCU width
TJINIT_DECOMPRESS = 1
TJPARAM_SUBSAMP, TJPARAM_JPEGWIDTH, TJPARAM_JPEGHEIGHT, TJPARAM_FASTDCT = 4, 5, 6, 10
TJPF_RGB = 0
IMCU_WIDTH = {0: 8, 1: 16, 2: 16, 3: 8, 4: 8, 5: 32, 6: 8}  # 4:4:4, 4:2:2, 4:2:0, grey, 4:4:0, 4:1:1, 4:4:1
CONTEXT = 1  # pixels of neighbours around the box that the chroma upsampler reads


class _Region(ctypes.Structure):
    _fields_ = [("x", ctypes.c_int), ("y", ctypes.c_int), ("w", ctypes.c_int), ("h", ctypes.c_int)]


class _Scaling(ctypes.Structure):
    _fields_ = [("num", ctypes.c_int), ("denom", ctypes.c_int)]


def _candidates() -> list[str]:
    """Library paths in the order they are tried (see the module's docstring)."""
    chosen = os.environ.get(LIBRARY_VARIABLE)
    if chosen == "none":
        return []
    found = [chosen] if chosen else []
    spec = importlib.util.find_spec("turbojpeg")
    if spec is not None and spec.origin is not None:  # auditwheel puts the wheel's libraries beside it
        found += sorted(glob.glob(str(Path(spec.origin).parent / "turbojpeg.libs" / "libturbojpeg*.so*")))
    system = ctypes.util.find_library("turbojpeg")
    return [*found, system] if system else found


def _bind(library: ctypes.CDLL) -> ctypes.CDLL:
    void_p, c_int = ctypes.c_void_p, ctypes.c_int
    signatures = {
        "tj3Init": ([c_int], void_p),
        "tj3DecompressHeader": ([void_p, ctypes.c_char_p, ctypes.c_size_t], c_int),
        "tj3Get": ([void_p, c_int], c_int),
        "tj3Set": ([void_p, c_int, c_int], c_int),
        "tj3SetScalingFactor": ([void_p, _Scaling], c_int),
        "tj3SetCroppingRegion": ([void_p, _Region], c_int),
        "tj3Decompress8": ([void_p, ctypes.c_char_p, ctypes.c_size_t, void_p, c_int, c_int], c_int),
    }
    for name, (arguments, result) in signatures.items():
        function = getattr(library, name)  # AttributeError: not libjpeg-turbo 3
        function.argtypes, function.restype = arguments, result
    return library


@functools.cache
def _library() -> ctypes.CDLL | None:
    for path in _candidates():
        try:
            return _bind(ctypes.CDLL(path))
        except (OSError, AttributeError):  # missing, not a library, or older than 3.0: try the next one
            continue
    return None


def available() -> bool:
    """Whether a libjpeg-turbo 3 was found, so that ``decode_box`` can be used."""
    return _library() is not None


def library_path() -> str | None:
    """The file the binding loaded, for benchmark reports."""
    library = _library()
    return None if library is None else library._name


_local = threading.local()  # a TurboJPEG handle is not thread-safe: one per thread (worker processes copy it)


def _handle(library: ctypes.CDLL) -> int | None:
    handle = getattr(_local, "handle", None)
    if handle is None:
        handle = _local.handle = library.tj3Init(TJINIT_DECOMPRESS)
    return handle


def decode_box(
    raw: bytes,
    top: int,
    left: int,
    height: int,
    width: int,
    factor: int = 1,
    fast_dct: bool = False,
    out: np.ndarray | None = None,
) -> Tensor | None:
    """The (height, width, 3) uint8 RGB pixels of a box of the image decoded at 1/``factor`` scale.

    The box is in the scaled image's pixels, whose size is the JPEG's divided by ``factor``, rounded
    up.  With ``out``, a C-contiguous uint8 array of the whole scaled image's shape (H, W, 3), the box
    (and the context around it) is decoded in place and all of ``out`` is returned as a tensor; its other
    pixels keep what they held.  That serves a resize that must see the whole image's geometry.

    None when libjpeg-turbo refuses the file or reports a warning (truncated, corrupt, CMYK, an unusual
    subsampling): the caller decodes it some other way or reports what is wrong with it.
    """
    library = _library()
    if library is None:
        raise RuntimeError(f"no libjpeg-turbo 3 found; install the fast-jpeg extra or set {LIBRARY_VARIABLE}")
    handle = _handle(library)
    if handle is None or library.tj3DecompressHeader(handle, raw, len(raw)) != 0:
        return None
    imcu = IMCU_WIDTH.get(library.tj3Get(handle, TJPARAM_SUBSAMP))
    if imcu is None:
        return None
    full_height = math.ceil(library.tj3Get(handle, TJPARAM_JPEGHEIGHT) / factor)
    full_width = math.ceil(library.tj3Get(handle, TJPARAM_JPEGWIDTH) / factor)
    if min(top, left, height, width) < 0 or top + height > full_height or left + width > full_width:
        raise ValueError(f"box {top, left, height, width} is outside the {full_height}x{full_width} image")
    step = max(1, imcu // factor)  # the scaled iMCU width the region's left edge must be a multiple of
    x0, y0 = max(0, left - CONTEXT) // step * step, max(0, top - CONTEXT)
    x1, y1 = min(full_width, left + width + CONTEXT), min(full_height, top + height + CONTEXT)
    if out is None:
        pixels = np.empty((y1 - y0, x1 - x0, 3), dtype=np.uint8)
        address, pitch = pixels.ctypes.data, 0  # pitch 0: rows of exactly the region's width
    elif out.shape != (full_height, full_width, 3) or out.dtype != np.uint8 or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous uint8 ({full_height}, {full_width}, 3) array")
    else:
        pitch = full_width * 3
        address = out.ctypes.data + y0 * pitch + x0 * 3
    library.tj3Set(handle, TJPARAM_FASTDCT, int(fast_dct))
    if (
        library.tj3SetScalingFactor(handle, _Scaling(1, factor)) != 0
        or library.tj3SetCroppingRegion(handle, _Region(x0, y0, x1 - x0, y1 - y0)) != 0
        or library.tj3Decompress8(handle, raw, len(raw), address, pitch, TJPF_RGB) != 0
    ):
        return None
    if out is not None:
        return torch.from_numpy(out)
    return torch.from_numpy(pixels)[top - y0 : top - y0 + height, left - x0 : left - x0 + width]
