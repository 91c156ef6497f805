"""shufflenetv2 predict: the evaluation transform, the model's own probabilities, class names, bad files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from shufflenetv2 import create_model, save_weights
from shufflenetv2.cli import main
from shufflenetv2.config import Config
from shufflenetv2.data import build_transform, load_image

from .conftest import calibrated

NAMES = ["ants", "bees", "café ☕", "wasps"]


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """Three images of different sizes in a folder tree, a hidden file and a broken one."""
    g = torch.Generator().manual_seed(3)
    for name, (h, w) in {"a.jpg": (40, 60), "sub/b.png": (64, 48), "sub/c.JPEG": (33, 33)}.items():
        path = tmp_path / "photos" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()).save(path)
    (tmp_path / "photos" / ".hidden.jpg").write_bytes(b"not looked at")
    return tmp_path / "photos"


def expected_probabilities(model: torch.nn.Module, path: Path, cfg: Config) -> torch.Tensor:
    with torch.no_grad():
        return model(build_transform(cfg, train=False)(load_image(path))[None]).softmax(dim=1)[0]


def test_predict_gives_the_models_probabilities_under_the_configs_transform(
    photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = calibrated(create_model("shufflenet_v2_x0_5", num_classes=4))
    weights = save_weights(tmp_path / "w.safetensors", model, classes=NAMES)
    config = tmp_path / "eval.yaml"
    config.write_text("image_resize: 32\ncrop_pct: 1.0\n")
    assert main(["predict", str(weights), str(photos), "-c", str(config), "--top", "9", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [Path(r["path"]).relative_to(photos).as_posix() for r in rows] == ["a.jpg", "sub/b.png", "sub/c.JPEG"]
    cfg = Config(image_resize=32, crop_pct=1.0)
    for row in rows:
        expected = expected_probabilities(model, Path(row["path"]), cfg)
        assert len(row["indices"]) == 4  # --top 9 of 4 classes
        assert row["indices"] == expected.argsort(descending=True).tolist()
        assert row["classes"] == [NAMES[i] for i in row["indices"]]
        assert row["probabilities"] == pytest.approx(expected[row["indices"]].tolist(), abs=1e-6)


def test_predict_names_classes_by_index_without_names_and_reports_unreadable_files(
    photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = calibrated(create_model("shufflenet_v2_x0_5", num_classes=4))
    weights = save_weights(tmp_path / "w.ckpt", model)  # MindCV's format records no names
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff truncated")
    assert main(["predict", str(weights), str(photos), "--top", "2"]) == 2
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert len(lines) == 3  # the readable three, each with its top 2: "PATH: 1 0.998, 3 0.002"
    assert all(re.search(r": [0-3] [01]\.\d{3}, [0-3] [01]\.\d{3}$", line) for line in lines), lines
    top = expected_probabilities(model, photos / "a.jpg", Config()).argmax().item()
    assert lines[0].startswith(f"{photos / 'a.jpg'}: {top} ")
    assert "broken.jpg" in err and "1 of 4 images could not be read" in err
    (tmp_path / "empty").mkdir()
    assert main(["predict", str(weights), str(tmp_path / "empty")]) == 2
    assert "no image files in" in capsys.readouterr().err
    assert main(["predict", str(weights), str(tmp_path / "missing.jpg")]) == 2
    assert "cannot read image" in capsys.readouterr().err
    assert main(["predict", str(weights), str(photos), "--top", "0"]) == 2
    assert "--top must be at least 1, got 0" in capsys.readouterr().err
