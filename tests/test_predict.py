"""shufflenetv2 predict: the evaluation transform, the model's own probabilities, class names, bad files."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from shufflenetv2 import create_model, save_weights
from shufflenetv2.cli import main
from shufflenetv2.config import Config, evaluation_of
from shufflenetv2.data import build_transform, load_image
from shufflenetv2.errors import DataError
from shufflenetv2.predict import _match_reasons, predict

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


def test_predict_through_loader_workers_keeps_each_result_at_its_files_place(tmp_path: Path) -> None:
    """Batches of 3 over 2 workers, unreadable files in the middle: every result lands at its file's
    position, the errors name their files, and the probabilities are those of one image at a time
    through the evaluation model (predict runs the fused one)."""
    g = torch.Generator().manual_seed(5)
    paths = []
    for i in range(9):
        path = tmp_path / "photos" / (f"{i}.png" if i % 3 == 0 else f"{i}.jpg")
        path.parent.mkdir(exist_ok=True)
        if i in (2, 6):
            path.write_bytes(b"\xff\xd8\xff not a whole JPEG" if i == 2 else b"garbage")
        else:
            size = (30 + 7 * i, 50 - 2 * i, 3)
            Image.fromarray(torch.randint(0, 256, size, generator=g, dtype=torch.uint8).numpy()).save(path)
        paths.append(path)
    model = calibrated(create_model("shufflenet_v2_x0_5", num_classes=4), seed=2)
    weights = save_weights(tmp_path / "w.safetensors", model, classes=NAMES)
    cfg = Config(image_resize=32, crop_pct=0.875, batch_size=3, num_parallel_workers=2, device="cpu")
    results = list(predict(weights, paths, cfg, top=4))
    assert [type(r).__name__ for r in results] == ["Prediction"] * 2 + ["DataError"] + ["Prediction"] * 3 + [
        "DataError"
    ] + ["Prediction"] * 2
    for path, result in zip(paths, results, strict=True):
        if isinstance(result, DataError):
            assert str(path) in str(result)
            continue
        assert result.path == str(path)
        expected = expected_probabilities(model, path, cfg)
        assert result.indices == expected.argsort(descending=True).tolist()
        assert result.probabilities == pytest.approx(expected[result.indices].tolist(), abs=1e-5)
    alone = list(predict(weights, paths, dataclasses.replace(cfg, num_parallel_workers=0), top=4))
    assert [getattr(r, "probabilities", str(r)) for r in alone] == [
        getattr(r, "probabilities", str(r)) for r in results
    ]


def test_predict_reasons_go_to_the_files_they_name() -> None:
    reasons = ["cannot read image /d/b.jpg: truncated", "nvjpeg could not decode /d/a.jpg"]
    assert _match_reasons(["/d/a.jpg", "/d/b.jpg"], reasons) == {"/d/a.jpg": reasons[1], "/d/b.jpg": reasons[0]}
    assert _match_reasons(["/d/c.jpg"], ["an error naming no file"]) == {"/d/c.jpg": "an error naming no file"}
    assert _match_reasons(["/d/c.jpg"], []) == {"/d/c.jpg": "cannot read image /d/c.jpg"}


def test_predict_device_cuda_without_a_gpu_is_a_clear_error(
    photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: --device cuda is valid here")
    weights = save_weights(tmp_path / "w.safetensors", create_model("shufflenet_v2_x0_5", num_classes=4))
    assert main(["predict", str(weights), str(photos), "--device", "cuda"]) == 2
    assert "no CUDA device is available" in capsys.readouterr().err


def test_predict_runs_an_exported_onnx_file_with_its_class_names(
    photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    model = calibrated(create_model("shufflenet_v2_x0_5", num_classes=4))
    weights = save_weights(tmp_path / "w.safetensors", model, classes=NAMES)
    exported = tmp_path / "m.onnx"
    assert main(["export", str(weights), str(exported), "--input-size", "32"]) == 0
    config = tmp_path / "eval.yaml"
    config.write_text("image_resize: 32\ncrop_pct: 1.0\n")
    capsys.readouterr()
    assert main(["predict", str(exported), str(photos), "-c", str(config), "--top", "4", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 3
    for row in rows:
        expected = expected_probabilities(model, Path(row["path"]), Config(image_resize=32, crop_pct=1.0))
        assert row["indices"] == expected.argsort(descending=True).tolist()
        assert row["classes"] == [NAMES[i] for i in row["indices"]]  # from the file's metadata
        assert row["probabilities"] == pytest.approx(expected[row["indices"]].tolist(), abs=1e-5)
    # the file takes 32 px: the default 224 px transform is refused before any image is read
    assert main(["predict", str(exported), str(photos)]) == 2
    assert "m.onnx takes 32 x 32 images and the config crops to 224 px" in capsys.readouterr().err
    assert main(["predict", str(exported), str(photos), "-c", str(config), "--device", "cuda"]) == 2
    assert "in ONNX Runtime on the CPU: pass --device cpu" in capsys.readouterr().err
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(exported.read_bytes()[:4000])
    assert main(["predict", str(truncated), str(photos), "-c", str(config)]) == 2
    assert "ONNX Runtime cannot load it" in capsys.readouterr().err


def test_predict_refuses_pt2_programs_which_would_unpickle(
    photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    program = tmp_path / "m.pt2"
    program.write_bytes(b"PK\x03\x04 never opened")
    assert main(["predict", str(program), str(photos)]) == 2
    assert "predict does not load .pt2 files, because torch.export.load unpickles" in capsys.readouterr().err


def test_ctrl_c_stops_predict_quietly_without_talk_of_saving(tmp_path: Path) -> None:
    """A real process interrupted mid-run: exit 130, no traceback, and no "nothing more was saved" (which
    the commands that write files say) from a command that writes none."""
    g = torch.Generator().manual_seed(7)
    for i in range(400):
        path = tmp_path / "photos" / f"{i:03d}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(torch.randint(0, 256, (24, 24, 3), generator=g, dtype=torch.uint8).numpy()).save(path)
    weights = save_weights(tmp_path / "w.safetensors", create_model("shufflenet_v2_x0_5", num_classes=4))
    config = tmp_path / "c.yaml"
    config.write_text("image_resize: 32\nbatch_size: 2\nnum_parallel_workers: 0\ndevice: cpu\n")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    # a terminal's Ctrl-C: SIGINT at its default disposition, which a test run started in the background
    # (`cmd &`) would otherwise pass on as ignored, so that Python never raises KeyboardInterrupt
    process = subprocess.Popen(
        [sys.executable, "-m", "shufflenetv2", "predict", str(weights), str(tmp_path / "photos"), "-c", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    try:
        first = process.stdout.readline()  # a result: the images are being classified
        assert first.startswith(str(tmp_path / "photos" / "000.png")), first + process.stderr.read()
        process.send_signal(signal.SIGINT)
        rest, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130, err
    assert len(rest.splitlines()) < 399  # it stopped before the end
    assert err.strip() == "interrupted", err


def test_weights_carry_their_evaluation_transform_to_predict_export_and_onnx(
    photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Weights trained at 32 px, as a training run records them: predict without -c uses their transform (not
    MindCV's 224 px default), a config that evaluates otherwise is warned about, and export takes their size."""
    model = calibrated(create_model("shufflenet_v2_x0_5", num_classes=4))
    trained = Config(image_resize=32, crop_pct=1.0, interpolation="nearest", mean=(120.0, 110.0, 100.0))
    weights = save_weights(tmp_path / "w.safetensors", model, classes=NAMES, evaluation=evaluation_of(trained))
    assert main(["predict", str(weights), str(photos), "--top", "4", "--json"]) == 0
    out = capsys.readouterr()
    assert out.err == ""
    for row in map(json.loads, out.out.splitlines()):
        expected = expected_probabilities(model, Path(row["path"]), trained)
        assert row["probabilities"] == pytest.approx(expected[row["indices"]].tolist(), abs=1e-6)
        default = expected_probabilities(model, Path(row["path"]), Config())
        assert (expected - default).abs().max() > 1e-3  # so the 224 px default would have given other numbers

    config = tmp_path / "eval.yaml"
    config.write_text("image_resize: 32\ncrop_pct: 0.875\ninterpolation: nearest\nmean: [120, 110, 100]\n")
    assert main(["predict", str(weights), str(photos), "-c", str(config)]) == 0
    assert capsys.readouterr().err == (
        f"warning: the config evaluates {weights} with crop_pct 0.875 (the weights': 1.0): its training run used the "
        "weights' values, so results here may be worse than the run's; leave -c out to use those, or pass that "
        "run's config.yaml\n"
    )

    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    exported = tmp_path / "m.onnx"
    assert main(["export", str(weights), str(exported)]) == 0  # no --input-size: the weights' 32 px
    assert ", 32 x 32 images, dynamic batch" in capsys.readouterr().out
    assert main(["predict", str(exported), str(photos), "--top", "4", "--json"]) == 0  # its recorded transform
    for row in map(json.loads, capsys.readouterr().out.splitlines()):
        expected = expected_probabilities(model, Path(row["path"]), trained)
        assert row["probabilities"] == pytest.approx(expected[row["indices"]].tolist(), abs=1e-5)
    at_64 = tmp_path / "m64.onnx"  # exported at another size, the recorded settings would mislead: left out
    assert main(["export", str(weights), str(at_64), "--input-size", "64"]) == 0
    assert main(["predict", str(at_64), str(photos)]) == 2
    assert "m64.onnx takes 64 x 64 images and the config crops to 224 px" in capsys.readouterr().err
