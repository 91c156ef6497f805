"""torch.hub entry points: ``torch.hub.load(REPO, "shufflenet_v2_x0_5", pretrained=True)``.

REPO is this repository on GitHub ("owner/name[:ref]") or, with ``source="local"``, a clone of it.  Each
entry point is ``create_model`` for one width, so the keyword arguments are its own: ``num_classes``,
``in_channels``, ``checkpoint_path``, ``layout``, ``ema``, ``drop_classifier``.  ``pretrained=True``
fetches MindCV's ImageNet release of that width, checked against its hash (see shufflenetv2/hub.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from shufflenetv2 import create_model as _create_model

if TYPE_CHECKING:  # torch.hub.list offers every public callable here: these stay out of it
    from collections.abc import Callable

    from torch import nn

dependencies = ["torch", "numpy", "safetensors"]  # what torch.hub checks before importing: create_model needs these


def _entry(name: str) -> Callable[..., nn.Module]:
    def entry(pretrained: bool = False, **kwargs: object) -> nn.Module:
        return _create_model(name, pretrained=pretrained, **kwargs)  # type: ignore[arg-type]

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = (
        f"{name}: ShuffleNetV2 as MindCV builds it (1000 classes unless num_classes says otherwise); "
        "pretrained=True loads MindCV's ImageNet weights.  Keyword arguments go to shufflenetv2.create_model."
    )
    return entry


shufflenet_v2_x0_5 = _entry("shufflenet_v2_x0_5")
shufflenet_v2_x1_0 = _entry("shufflenet_v2_x1_0")
shufflenet_v2_x1_5 = _entry("shufflenet_v2_x1_5")
shufflenet_v2_x2_0 = _entry("shufflenet_v2_x2_0")
