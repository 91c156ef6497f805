"""``create_model``: MindCV's entry point, building a network and filling it from a file or a release."""

from __future__ import annotations

import os

from torch import nn

from .model import LAYOUTS, build_network
from .weights import Weights, load_weights, read_weights


def _file_architecture(weights: Weights, layout: str) -> dict[str, object]:
    """Stem pool and head bias the network needs so that ``weights`` give their own logits."""
    pool = weights.arch["stem_pool"]
    bias = weights.arch["classifier_bias"]
    if bias and layout == "mindcv":
        head = "classifier.bias" if weights.layout == "mindcv" else "fc.bias"
        bias = bool(weights.tensors[head].any())  # a zero bias is MindCV's bias-free head
    return {"stem_pool": pool, "classifier_bias": bool(bias) if layout == "mindcv" else True}


def create_model(
    name: str,
    num_classes: int = 1000,
    in_channels: int = 3,
    pretrained: bool = False,
    checkpoint_path: str | os.PathLike[str] | None = None,
    *,
    layout: str = "mindcv",
    ema: bool = False,
    drop_classifier: bool | None = None,
    **kwargs: object,
) -> nn.Module:
    """A ShuffleNetV2 (``shufflenet_v2_x0_5`` ... ``_x2_0``), as MindCV's ``create_model`` makes it.

    ``pretrained`` fetches MindCV's release weights (ImageNet, 1000 classes); with another
    ``num_classes`` the classifier is dropped, as in MindCV.  ``checkpoint_path`` loads any file this
    package reads (MindCV ``.ckpt``, torchvision ``.pth``, our ``.safetensors``) and is strict: a class
    count that differs is an error unless ``drop_classifier=True``.  ``ema`` takes the EMA copy of a
    training checkpoint.  ``layout="torchvision"`` builds torchvision's network; weights saved in the other
    layout are converted when that is exact (x0.5) and refused otherwise.  Other keyword arguments
    (``stem_pool``, ``classifier_bias``) go to the network.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if pretrained and checkpoint_path:
        raise ValueError("pass either pretrained=True or checkpoint_path, not both")
    weights = None
    if pretrained:
        from .hub import fetch_pretrained

        weights = read_weights(fetch_pretrained(name), ema=ema)
    elif checkpoint_path:
        weights = read_weights(checkpoint_path, ema=ema)
    if weights is None:
        return build_network(name, num_classes, in_channels, layout, **kwargs)  # type: ignore[arg-type]
    drop = pretrained if drop_classifier is None else drop_classifier
    return model_from_weights(weights, name, num_classes, in_channels, layout=layout, drop_classifier=drop, **kwargs)


def model_from_weights(
    weights: Weights,
    name: str,
    num_classes: int,
    in_channels: int = 3,
    *,
    layout: str = "mindcv",
    drop_classifier: bool = False,
    **kwargs: object,
) -> nn.Module:
    """``create_model`` for weights already read: a caller that also reads the file's metadata (its
    class names, its architecture) need not read the file twice."""
    arch = {**_file_architecture(weights, layout), **kwargs}
    model = build_network(name, num_classes, in_channels, layout, **arch)  # type: ignore[arg-type]
    load_weights(model, weights, drop_classifier=drop_classifier)
    return model
