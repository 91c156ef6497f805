"""Classify image files with a weight file: the first thing people run on weights they trained or downloaded.

Images go through the evaluation transform of a config (resize to ``image_resize / crop_pct``, centre
crop, MindCV's normalisation), so a prediction sees what ``validate.py`` sees.  Classes are named by
the names a training run recorded in the weights (``Weights.classes``), or by their index for files
that carry none (MindCV's ``.ckpt``, torchvision's state dicts).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from .config import Config
from .data import build_transform, is_image_name, load_image
from .errors import CheckpointError, DataError
from .factory import model_from_weights
from .weights import read_weights


def image_files(paths: Sequence[str | os.PathLike[str]]) -> list[str]:
    """The files named, with each folder replaced by the image files under it (sorted, hidden ones left out)."""
    found: list[str] = []
    for path in map(str, paths):
        if not os.path.isdir(path):
            found.append(path)
            continue
        for folder, subfolders, files in os.walk(path):
            subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
            found += [os.path.join(folder, f) for f in sorted(files) if is_image_name(f)]
    return found


@dataclass
class Prediction:
    path: str
    classes: list[str]  # the top-k, most probable first
    indices: list[int]
    probabilities: list[float]


def predict(
    weights_path: str | os.PathLike[str],
    images: Sequence[str | os.PathLike[str]],
    cfg: Config | None = None,
    top: int = 5,
    batch_size: int = 32,
) -> Iterator[Prediction | DataError]:
    """One ``Prediction`` per image, in order, or the ``DataError`` saying why an image could not be read;
    ``cfg`` gives the transform (MindCV's defaults: 224 px, crop_pct 0.875)."""
    cfg = cfg or Config()
    weights = read_weights(weights_path)
    name, num_classes = weights.arch["model"], int(weights.arch["num_classes"])
    if name is None:
        raise CheckpointError(f"{weights_path}: its tensors fit no ShuffleNetV2 width")
    if weights.arch["in_channels"] != 3:
        raise CheckpointError(
            f"{weights_path} takes {weights.arch['in_channels']}-channel inputs; predict reads images as RGB"
        )
    model = model_from_weights(weights, str(name), num_classes, layout=weights.layout).eval()
    names = weights.classes or [str(i) for i in range(num_classes)]
    transform = build_transform(cfg, train=False)
    k = min(top, num_classes)
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        loaded: list[torch.Tensor | DataError] = []
        for path in chunk:
            try:
                loaded.append(transform(load_image(path)))
            except DataError as exc:
                loaded.append(exc)
        readable = [t for t in loaded if isinstance(t, torch.Tensor)]
        if readable:
            with torch.no_grad():
                probabilities = model(torch.stack(readable)).float().softmax(dim=1)
            best = probabilities.topk(k, dim=1)
        row = 0
        for path, item in zip(chunk, loaded, strict=True):
            if isinstance(item, DataError):
                yield item
                continue
            indices = best.indices[row].tolist()
            yield Prediction(str(path), [names[i] for i in indices], indices, best.values[row].tolist())
            row += 1
