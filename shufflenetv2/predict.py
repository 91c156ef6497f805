"""Classify image files with a weight file: the first thing people run on weights they trained or downloaded,
and on the ``.onnx`` file they export for deployment.

Images go through the evaluation transform of a config (resize to ``image_resize / crop_pct``, centre
crop, MindCV's normalisation), so a prediction sees what ``validate.py`` sees.  Without a config: the
transform the weights were trained with, as our files record it (``config.EVALUATION_KEYS``), else
MindCV's.  Classes are named by the names a training run recorded in the weights (``Weights.classes``) or
an export wrote into its ONNX metadata, or by their index for files that carry none (MindCV's ``.ckpt``,
torchvision's state dicts).  ``.pt2`` programs are refused: ``torch.export.load`` unpickles parts of them.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import Config, ConfigError, evaluation_differences, with_evaluation
from .data import ImageFilesDataset, build_loader, is_image_name, sample_transform, stop_workers
from .deploy import CLASSES_KEY, fuse
from .device_input import DeviceInput
from .distributed import pick_device
from .errors import CheckpointError, DataError
from .factory import model_from_weights
from .weights import EVALUATION_KEY, read_evaluation, read_weights, recorded_classes, recorded_evaluation


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


@dataclass
class Network:
    """What ``predict`` runs: float images (N, 3, H, W) on ``device`` to logits, with the logits' names."""

    run: Callable[[torch.Tensor], torch.Tensor]
    names: list[str]
    device: torch.device
    trained_classes: list[str] | None = None  # the names the file recorded, when it recorded them


def recorded_settings(path: str | os.PathLike[str]) -> dict[str, object] | None:
    """The evaluation settings a weight file of ours or its ``.onnx`` export recorded, or None."""
    if Path(path).suffix.lower() != ".onnx":
        return read_evaluation(path)
    if importlib.util.find_spec("onnx") is None:
        return None
    import onnx

    try:
        props = onnx.load(str(path), load_external_data=False).metadata_props
    except Exception:  # an unreadable file: ONNX Runtime says why when it opens it
        return None
    return recorded_evaluation(next((p.value for p in props if p.key == EVALUATION_KEY), None))


def config_for(path: str | os.PathLike[str], base: Config | None = None) -> Config:
    """``base`` (or MindCV's defaults) with the evaluation settings ``path`` recorded: the transform the
    weights were trained and validated with (64 px for the CIFAR-10 recipe, not the default 224)."""
    base = base or Config()
    recorded = recorded_settings(path)
    return with_evaluation(base, recorded, where=f"the evaluation settings recorded in {path}") if recorded else base


def settings_warning(path: str | os.PathLike[str], cfg: Config, remedy: str) -> str | None:
    """A warning when ``cfg`` evaluates ``path`` otherwise than its training run did, or None."""
    differences = evaluation_differences(cfg, recorded_settings(path))
    if not differences:
        return None
    return (
        f"the config evaluates {path} with {', '.join(differences)}: its training run used the weights' values, "
        f"so results here may be worse than the run's; {remedy}"
    )


def load_network(path: str | os.PathLike[str], cfg: Config) -> Network:
    """A weight file as ``fuse(model)`` on ``cfg.device``, or an exported ``.onnx`` file in ONNX Runtime."""
    suffix = Path(path).suffix.lower()
    if suffix == ".onnx":
        return onnx_network(Path(path), cfg)
    if suffix == ".pt2":
        raise CheckpointError(
            f"{path}: predict does not load .pt2 files, because torch.export.load unpickles parts of them and "
            "unpickling can run code. Predict with the weight file it was exported from, or export that to .onnx"
        )
    weights = read_weights(path)
    name, num_classes = weights.arch["model"], int(weights.arch["num_classes"])
    if name is None:
        raise CheckpointError(f"{path}: its tensors fit no ShuffleNetV2 width")
    if weights.arch["in_channels"] != 3:
        raise CheckpointError(f"{path} takes {weights.arch['in_channels']}-channel inputs; predict reads images as RGB")
    device = pick_device(cfg.device)
    model = model_from_weights(weights, str(name), num_classes, layout=weights.layout).eval()
    network = fuse(model, channels_last=cfg.channels_last).to(device)
    return Network(network, weights.classes or [str(i) for i in range(num_classes)], device, weights.classes)


def onnx_network(path: Path, cfg: Config) -> Network:
    """``shufflenetv2 export``'s ONNX file (or any classifier taking (N, 3, H, W) float32) on the CPU,
    named by the class names that export wrote into its metadata (``predict``, and ``validate.py``)."""
    if cfg.device == "cuda":
        raise ConfigError(f"{path.name} runs in ONNX Runtime on the CPU: pass --device cpu (or auto)")
    if importlib.util.find_spec("onnxruntime") is None:
        raise CheckpointError(f"running {path.name} needs ONNX Runtime: pip install 'shufflenetv2[onnx]'")
    from .bench import open_onnx_classifier

    session = open_onnx_classifier(path, torch.get_num_threads())
    image, output = session.get_inputs()[0], session.get_outputs()[0]
    side = image.shape[2:]
    if any(isinstance(d, int) and d != cfg.image_resize for d in side):
        raise ConfigError(
            f"{path.name} takes {side[0]} x {side[1]} images and the config crops to {cfg.image_resize} px: "
            f"pass a config (-c) whose image_resize is {side[0]}, or export again with --input-size {cfg.image_resize}"
        )
    count = output.shape[1]
    if not isinstance(count, int):
        raise CheckpointError(f"{path}: its output has no fixed number of classes, so they cannot be named")
    names = recorded_classes(session.get_modelmeta().custom_metadata_map.get(CLASSES_KEY), count)

    def run(images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {image.name: images.contiguous().numpy()})[0])

    return Network(run, names or [str(i) for i in range(count)], torch.device("cpu"), names)


def predict(
    weights_path: str | os.PathLike[str],
    images: Sequence[str | os.PathLike[str]],
    cfg: Config | None = None,
    top: int = 5,
) -> Iterator[Prediction | DataError]:
    """One ``Prediction`` per image, in order, or the ``DataError`` saying why an image could not be read.

    ``cfg`` gives the evaluation transform (without one: ``config_for`` the weights), ``batch_size``,
    ``num_parallel_workers`` and the input pipeline: images reach the network exactly as they reach it
    in ``validate.py``, through the same loader and the same decoding.  A weight file runs as
    ``fuse(model)`` (BatchNorm and the channel shuffle folded into the convolutions), float32, on
    ``cfg.device`` (auto: CUDA when there is one): its probabilities are the evaluation model's to float32
    rounding.  An ``.onnx`` file from ``shufflenetv2 export`` runs in ONNX Runtime on the CPU.
    """
    cfg = cfg or config_for(weights_path)
    network = load_network(weights_path, cfg)
    paths = [str(path) for path in images]
    if len(paths) <= cfg.batch_size:  # one batch: starting workers would take longer than reading it
        cfg = dataclasses.replace(cfg, num_parallel_workers=0)
    dataset = ImageFilesDataset(paths, range(len(paths)), sample_transform(cfg, train=False))
    loader = build_loader(cfg, dataset, train=False)
    inputs = DeviceInput(cfg, train=False, device=network.device)
    k = min(top, len(network.names))
    start = 0
    try:
        for batch in loader:
            pixels, positions, reasons = inputs(batch)
            read: dict[int, tuple[list[int], list[float]]] = {}
            if pixels is not None:
                with torch.no_grad():
                    best = network.run(pixels).float().softmax(dim=1).topk(k, dim=1)
                ranked = zip(best.indices.tolist(), best.values.tolist(), strict=True)
                read = dict(zip(positions.tolist(), ranked, strict=True))
            stop = min(start + cfg.batch_size, len(paths))
            unread = _match_reasons([paths[i] for i in range(start, stop) if i not in read], reasons)
            for i in range(start, stop):
                if i in read:
                    indices, probabilities = read[i]
                    yield Prediction(paths[i], [network.names[j] for j in indices], indices, probabilities)
                else:
                    yield DataError(unread[paths[i]])
            start = stop
    finally:
        stop_workers(loader)


def _match_reasons(paths: list[str], reasons: Sequence[str]) -> dict[str, str]:
    """Each unread path's reason: the one that names it, or else the next one left (workers report
    their failures in batch order, a device decoder after them)."""
    left = list(reasons)
    matched: dict[str, str] = {}
    for path in paths:
        naming = next((r for r in left if path in r), left[0] if left else None)
        if naming is None:
            matched[path] = f"cannot read image {path}"
        else:
            left.remove(naming)
            matched[path] = naming
    return matched
