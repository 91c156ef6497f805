"""Every kind of bad image file a real dataset holds: decoded to RGB when it is an image, otherwise skipped,
named and counted; training stops above ``max_bad_fraction``; validation reports what it left out."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from shufflenetv2 import create_model, save_weights
from shufflenetv2.config import from_dict
from shufflenetv2.data import ImageFolderDataset, build_dataset, load_image
from shufflenetv2.engine import train
from shufflenetv2.errors import DataError

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")


def _pixels(h: int = 20, w: int = 28, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def _jpeg() -> bytes:
    return _encoded(Image.fromarray(_pixels()), "JPEG")


# Files that are images, however unusual: each must decode to uint8 RGB (3, 20, 28) with PIL's convert("RGB") pixels.
READABLE: dict[str, Callable[[], bytes]] = {
    "cmyk.jpg": lambda: _encoded(Image.fromarray(_pixels()).convert("CMYK"), "JPEG"),
    "grey.jpg": lambda: _encoded(Image.fromarray(_pixels()[..., 0], "L"), "JPEG"),
    "grey.png": lambda: _encoded(Image.fromarray(_pixels()[..., 0], "L"), "PNG"),
    "palette.png": lambda: _encoded(Image.fromarray(_pixels()).convert("P"), "PNG"),
    "palette.gif": lambda: _encoded(Image.fromarray(_pixels()).convert("P"), "GIF"),
    "alpha.png": lambda: _encoded(Image.fromarray(np.dstack([_pixels(), _pixels(seed=1)[..., :1]]), "RGBA"), "PNG"),
    "grey-alpha.png": lambda: _encoded(Image.fromarray(_pixels()[..., :2].copy(), "LA"), "PNG"),
    "deep16.png": lambda: _encoded(Image.fromarray(_pixels()[..., 0].astype(np.uint16) * 257), "PNG"),
    "named-png.jpg": lambda: _encoded(Image.fromarray(_pixels()), "PNG"),  # wrong extension, real image
}

# Files that are not usable images: each must raise DataError naming the file and saying why.
UNREADABLE: dict[str, tuple[Callable[[], bytes], str]] = {
    "truncated.jpg": (lambda: _jpeg()[: len(_jpeg()) // 2], "truncated|decode"),
    "zero-bytes.jpg": (lambda: b"", "empty"),
    "text.jpg": (lambda: b"this is a README, not a JPEG\n" * 20, "no image format.*this is a README"),
    "html.png": (lambda: b"<html><body>403 Forbidden</body></html>", "no image format.*<html>"),
    "bomb.png": (lambda: _encoded(Image.new("L", (10_000, 10_000)), "PNG"), "10000 x 10000 pixels"),
    "huge-bomb.png": (lambda: _encoded(Image.new("1", (20_000, 20_000)), "PNG"), "more pixels than PIL"),
}


@pytest.mark.parametrize("name", list(READABLE))
def test_unusual_images_become_rgb(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(READABLE[name]())
    image = load_image(path)
    assert image.dtype == torch.uint8 and image.shape == (3, 20, 28)
    with Image.open(path) as pil:
        if pil.mode == "I;16":  # PIL cannot convert 16-bit grey to RGB faithfully; the high byte is the image
            reference = np.repeat((np.array(pil) >> 8).astype(np.uint8)[..., None], 3, axis=2)
        else:
            reference = np.array(pil.convert("RGB"))
    difference = (image.permute(1, 2, 0).int() - torch.from_numpy(reference).int()).abs().max().item()
    assert difference <= 2, f"{name}: decoded pixels differ from PIL's convert('RGB') by {difference}"


@pytest.mark.parametrize("name", list(UNREADABLE))
def test_unusable_files_raise_data_error_naming_the_file(tmp_path: Path, name: str) -> None:
    make, words = UNREADABLE[name]
    path = tmp_path / name
    path.write_bytes(make())
    start = time.perf_counter()
    with pytest.raises(DataError, match=words) as info:
        load_image(path)
    assert str(path) in str(info.value)
    assert time.perf_counter() - start < 5, "a bomb must be refused from its header, not decoded"


def test_dangling_symlink_and_symlink_loop_are_unreadable(tmp_path: Path) -> None:
    (tmp_path / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    (tmp_path / "a.jpg").symlink_to(tmp_path / "b.jpg")
    (tmp_path / "b.jpg").symlink_to(tmp_path / "a.jpg")
    for name, words in (("dangling.jpg", "No such file"), ("a.jpg", "symbolic links")):
        with pytest.raises(DataError, match=words) as info:
            load_image(tmp_path / name)
        assert str(tmp_path / name) in str(info.value)


def test_file_without_read_permission() -> None:
    """Root reads any file, so as root the read runs in a child process that drops to user nobody."""
    folder = Path(tempfile.mkdtemp(prefix="locked-"))  # not under pytest's private tmp: nobody must enter it
    try:
        folder.chmod(0o755)
        path = folder / "locked.jpg"
        path.write_bytes(_jpeg())
        path.chmod(0)
        if os.geteuid() != 0:
            with pytest.raises(DataError, match="Permission denied") as info:
                load_image(path)
            message = str(info.value)
        else:
            setpriv = shutil.which("setpriv")
            if setpriv is None:
                pytest.skip("running as root without setpriv: cannot drop privileges to test permissions")
            code = (
                "import sys\nfrom shufflenetv2.data import load_image\nfrom shufflenetv2.errors import DataError\n"
                f"try:\n    load_image({str(path)!r})\nexcept DataError as e:\n    print(e)\n    sys.exit(3)\n"
            )
            done = subprocess.run(
                [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", code],
                capture_output=True, text=True, timeout=120, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
            )  # fmt: skip
            assert done.returncode == 3, done.stdout + done.stderr
            message = done.stdout
        assert "Permission denied" in message and str(path) in message
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_folder_symlink_loop_is_indexed_once(tmp_path: Path) -> None:
    """A link back to an ancestor must neither hang the scan nor list the same images again and again."""
    cls = tmp_path / "train" / "ants"
    cls.mkdir(parents=True)
    for i in range(3):
        (cls / f"{i}.jpg").write_bytes(_jpeg())
    (cls / "loop").symlink_to(cls)
    (cls / "up").symlink_to(tmp_path / "train")
    dataset = ImageFolderDataset(tmp_path / "train")
    assert [Path(p).name for p, _ in dataset.samples] == ["0.jpg", "1.jpg", "2.jpg"]


def test_empty_class_folder_and_missing_split(tmp_path: Path) -> None:
    (tmp_path / "train" / "ants").mkdir(parents=True)
    (tmp_path / "train" / "ants" / "0.jpg").write_bytes(_jpeg())
    (tmp_path / "train" / "bees").mkdir()
    cfg = from_dict({"dataset": "imagefolder", "data_dir": str(tmp_path), "image_resize": 16})
    with pytest.warns(UserWarning, match="1 class folder"):
        dataset = build_dataset(cfg, "train", train=True)
    assert dataset.classes == ["ants", "bees"]
    with pytest.raises(DataError, match=r"has no 'val' split folder.*it has: train"):
        build_dataset(cfg, "val", train=False)


# --- in training and validation ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dataset_with_bad_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """48 training images in 2 classes, 3 of them broken (6 %), and 12 validation images, 2 broken."""
    root = tmp_path_factory.mktemp("bad")
    bad = []
    for split, count in (("train", 24), ("val", 6)):
        for c, name in enumerate(("ants", "bees")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.full((24, 24, 3), 60 + 120 * c, dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:02d}.png")
    for path, data in (
        (root / "train" / "ants" / "03.png", b""),
        (root / "train" / "bees" / "07.png", b"GIF89a nonsense"),
        (root / "train" / "bees" / "11.png", (root / "train" / "ants" / "00.png").read_bytes()[:60]),
        (root / "val" / "ants" / "01.png", b"\x89PNG broken"),
        (root / "val" / "bees" / "02.png", b""),
    ):
        path.write_bytes(data)
        bad.append(path)
    return root, bad


def _config(data: Path, out: Path, **overrides: object):
    values = dict(
        mode=1, dataset="imagefolder", data_dir=str(data), num_classes=2, image_resize=16, batch_size=8,
        num_parallel_workers=0, epoch_size=2, val_while_train=True, ckpt_save_dir=str(out), log_interval=3,
        opt="momentum", lr=0.05, warmup_epochs=0, seed=3, max_bad_fraction=0.1,
    )  # fmt: skip
    values.update(overrides)
    return from_dict(values)


def test_training_skips_names_and_counts_unreadable_images(
    dataset_with_bad_files: tuple[Path, list[Path]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, bad = dataset_with_bad_files
    result = train(_config(data, tmp_path / "run"))
    err = capsys.readouterr().err
    for path in bad[:3]:  # each training file named once, although both epochs read it
        assert err.count(f"cannot decode image {path}") == 1, err
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["unreadable"] for row in rows] == [3, 3]
    assert "3 unreadable image(s) were skipped" in (tmp_path / "run" / "train_rank0.log").read_text()
    assert result.last is not None and result.last.count == 10 and result.last.unreadable == 2
    assert all(np.isfinite(row["train_loss"]) for row in rows)


def test_too_many_unreadable_images_stop_training(
    dataset_with_bad_files: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    data, _ = dataset_with_bad_files
    with pytest.raises(DataError, match=r"could not be read so far in epoch 1, more than max_bad_fraction 0\.05") as e:
        train(_config(data, tmp_path / "run", max_bad_fraction=0.05, val_while_train=False))
    assert "cannot decode image" in str(e.value) and "checkpoints in" in str(e.value)
    assert list((tmp_path / "run").glob("*.safetensors")) == []


def test_validate_reports_what_it_left_out(dataset_with_bad_files: tuple[Path, list[Path]], tmp_path: Path) -> None:
    """The real CLI, with DataLoader workers: warnings name each file, the JSON counts them."""
    data, bad = dataset_with_bad_files
    weights = tmp_path / "w.safetensors"
    save_weights(weights, create_model("shufflenet_v2_x0_5", num_classes=2))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, str(REPO / "validate.py"), "--dataset", "imagefolder", "--data_dir", str(data),
         "--num_classes", "2", "--image_resize", "16", "--batch_size", "4", "--num_parallel_workers", "2",
         "--ckpt_path", str(weights), "--mode", "1"],  # eager: the default mode 0 compiled for a minute
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    for path in bad[3:]:
        assert f"cannot decode image {path}" in run.stderr
    assert "2 file(s) of the validation split could not be read" in run.stderr
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary["images"] == 10 and summary["unreadable"] == 2
    assert "Traceback" not in run.stderr


def test_train_cli_with_workers_stops_with_one_paragraph(
    dataset_with_bad_files: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    """Above the default 1 %, the real train.py (2 loader workers) exits 2 naming a file, no traceback."""
    data, _ = dataset_with_bad_files
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "--dataset", "imagefolder", "--data_dir", str(copy), "--num_classes",
         "2", "--image_resize", "16", "--batch_size", "8", "--epoch_size", "1", "--mode", "1",
         "--num_parallel_workers", "2", "--ckpt_save_dir", str(tmp_path / "run"), "--log_interval", "1"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert run.returncode == 2, run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "max_bad_fraction 0.01" in errors[0] and "cannot decode image" in errors[0]
    assert "Traceback" not in run.stderr


def test_validation_classes_must_match_training_classes(tmp_path: Path) -> None:
    for split, classes in (("train", ("ants", "bees")), ("val", ("ants", "wasps"))):
        for name in classes:
            (tmp_path / split / name).mkdir(parents=True)
            (tmp_path / split / name / "0.jpg").write_bytes(_jpeg())
    cfg = _config(tmp_path, tmp_path / "run")
    with pytest.raises(DataError, match="only in training: bees; only in validation: wasps"):
        train(cfg)
