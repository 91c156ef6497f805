from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SHUFFLENETV2_SHARED", REPO.parent / "shared"))
FIXTURES = SHARED / "fixtures" / "mindcv"


def shared_file(relative: str) -> Path:
    """A file under ../shared, or a skip saying why (users cloning the repo do not have it)."""
    path = SHARED / relative
    if not path.exists():
        pytest.skip(f"{path} not present: ../shared (team data) is only beside CI and developer checkouts")
    return path


def randomize_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial BN statistics and affine terms, so a wrong channel order cannot hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return model.eval()


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
