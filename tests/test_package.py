"""Ahead-of-time compiled packages (AOTInductor): same logits as the model, one input shape, clear refusals."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch._inductor
from torch import nn

import shufflenetv2 as snv2
from shufflenetv2 import ShuffleNetV2Error, compile_package, create_model, load_package, save_weights
from shufflenetv2.bench import _runner, torchvision_model
from shufflenetv2.cli import main
from shufflenetv2.config import evaluation_of, from_dict
from shufflenetv2.model import build_network

from .conftest import built_once, calibrated, shared_file

pytestmark = pytest.mark.skipif(
    not hasattr(torch._inductor, "aoti_compile_and_package"), reason="AOTInductor packages need torch >= 2.6"
)
SHAPE = (2, 3, 64, 64)
CLASSES = ["café", *(f"class {k}" for k in range(1, 1000))]
EVALUATION = evaluation_of(from_dict({"image_resize": 64, "crop_pct": 1.0, "interpolation": "bicubic"}))


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(3)  # the same weights in every pytest-xdist worker, whichever compiled the package
    return calibrated(build_network("shufflenet_v2_x0_5", 1000, 3, "mindcv"), seed=3)


@pytest.fixture(scope="module")
def exported(model: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The package every test here reads, written as a user would write it: ``shufflenetv2 export --aot``
    from a weights file, once per session (``built_once``: each compile takes 30-60 s on 2 cores; ``model``
    is seeded, so every worker's is the one compiled).  Returns the package and what the command printed."""

    def build(folder: Path) -> None:
        src = save_weights(folder / "x05.safetensors", model, classes=CLASSES, evaluation=EVALUATION)
        argv = ["export", str(src), str(folder / "x05.pt2"), "--aot", "--batch", "2", "--input-size", "64"]
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            assert main(argv) == 0
        (folder / "printed.txt").write_text(printed.getvalue())

    folder = built_once(tmp_path_factory, "aot_package", build)
    return folder / "x05.pt2", (folder / "printed.txt").read_text()


@pytest.fixture(scope="module")
def package(exported: tuple[Path, str]) -> Path:
    return exported[0]


@pytest.mark.slow
def test_package_gives_the_models_logits_in_either_memory_layout(model: nn.Module, package: Path) -> None:
    compiled = load_package(package)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x)
    for layout in (torch.contiguous_format, torch.channels_last):  # the package itself takes NHWC only
        got = compiled(x.contiguous(memory_format=layout))
        assert got.shape == (2, 1000) and (got - expected).abs().max() < 1e-4 * expected.abs().max()
    assert compiled.input_shape == SHAPE and "input_shape=(2, 3, 64, 64)" in repr(compiled)


def test_package_convolutions_run_on_weights_packed_at_compile_time(package: Path) -> None:
    """Where a package's speed comes from: inductor's freezing turns every convolution into a oneDNN call on
    weights packed once (ReLU fused), which it does only when compiling with autograd off; otherwise it
    emits plain convolutions that re-pack on every call (0.7x as fast at x1.0 batch 1)."""
    with zipfile.ZipFile(package) as archive:
        (wrapper,) = [archive.read(n).decode() for n in archive.namelist() if n.endswith("wrapper.cpp")]
    assert wrapper.count("mkldnn__convolution_pointwise(") >= 50  # x0.5: 56 convolutions
    assert "aoti_torch_cpu_convolution(" not in wrapper


def test_package_refuses_inputs_it_was_not_compiled_for(package: Path) -> None:
    """AOTInductor itself would answer a batch of 3 with 2 rows of logits, and a float64 batch with garbage."""
    compiled = load_package(package)
    for x in (torch.randn(3, 3, 64, 64), torch.randn(2, 3, 96, 96), torch.randn(SHAPE, dtype=torch.float64)):
        with pytest.raises(ValueError, match=r"compiled for float32 CPU inputs of shape \(2, 3, 64, 64\)"):
            compiled(x)


def test_load_package_refuses_missing_truncated_foreign_and_other_cpu_files(package: Path, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.pt2"
    truncated.write_bytes(package.read_bytes()[: package.stat().st_size // 2])
    program = snv2.export_program(nn.Conv2d(3, 4, 1), tmp_path / "program.pt2")  # a .pt2, but not a package
    # the same package, its metadata claiming an ISA no CPU has, or with its class names cut short
    other_cpu, cut_names = tmp_path / "other_cpu.pt2", tmp_path / "cut_names.pt2"
    for path, change in ((other_cpu, {"AOTI_CPU_ISA": "AVX1024"}), (cut_names, {"classes": '["class 0", "cl'})):
        with zipfile.ZipFile(package) as src, zipfile.ZipFile(path, "w") as dst:
            for item in src.infolist():
                data = src.read(item)
                if item.filename.endswith("wrapper_metadata.json"):
                    data = json.dumps({**json.loads(data), **change}).encode()
                dst.writestr(item, data)
    refusals = {
        tmp_path / "missing.pt2": "no such file",
        truncated: "not a readable package",
        program: "not a compiled package written by shufflenetv2",
        other_cpu: "compiled for CPUs with AVX1024, which this CPU lacks",
        cut_names: r"its 'classes' metadata is not JSON \('\[\"class 0\", \"cl'\); compile it again",
    }
    for path, message in refusals.items():
        with pytest.raises(ShuffleNetV2Error, match=message):
            load_package(path)


def test_a_failed_compile_leaves_the_existing_package_and_no_scratch_files(package: Path, tmp_path: Path) -> None:
    class Broken(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("cannot be traced")

    target = tmp_path / "model.pt2"
    shutil.copy(package, target)
    before = target.read_bytes()
    with pytest.raises(RuntimeError, match="cannot be traced"):
        compile_package(Broken(), target, batch=2, input_size=64)
    assert target.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["model.pt2"]
    with pytest.raises(ShuffleNetV2Error, match=r"name it \.pt2"):
        compile_package(Broken(), tmp_path / "model.so")


def test_compile_package_says_when_the_machine_has_no_cpp_compiler(model: nn.Module, tmp_path: Path) -> None:
    from torch._inductor import config

    with config.patch({"cpp.cxx": ("no-such-compiler",)}), pytest.raises(ShuffleNetV2Error, match=r"C\+\+ compiler"):
        compile_package(model, tmp_path / "m.pt2", batch=1, input_size=64)
    assert list(tmp_path.iterdir()) == []


def test_export_command_writes_a_package_for_one_batch_size(
    exported: tuple[Path, str], model: nn.Module, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    package, printed = exported
    assert (
        "compiled ahead of time for float32 CPU inputs of 2x3x64x64 on this kind of CPU; the names of its 1000 "
        "classes and its evaluation settings in its metadata; its logits were checked against the weights' before"
    ) in printed
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = model(x)
    loaded = load_package(package)
    assert (loaded(x) - expected).abs().max() < 1e-4 * expected.abs().max()
    # what its logits mean and how the weights' training run prepared images, as the weights recorded them
    assert loaded.classes == CLASSES and loaded.evaluation == EVALUATION
    assert loaded.evaluation["image_resize"] == 64 and loaded.evaluation["interpolation"] == "bicubic"
    # --batch means nothing to a dynamic-batch export, and says so rather than being ignored
    src = package.with_suffix(".safetensors")
    assert main(["export", str(src), str(tmp_path / "m.onnx"), "--batch", "4"]) == 2
    assert "--batch applies to --aot packages only" in capsys.readouterr().err


@pytest.mark.slow
def test_package_of_mindcvs_own_checkpoint_reproduces_mindcvs_logits(tmp_path: Path) -> None:
    ckpt = shared_file("fixtures/mindcv/shufflenet_v2_x0_5_c10.ckpt")
    reference = np.load(shared_file("fixtures/mindcv/shufflenet_v2_x0_5_c10.npz"))
    x = torch.from_numpy(reference["x_224"])
    model = create_model("shufflenet_v2_x0_5", num_classes=10, checkpoint_path=ckpt)
    compiled = load_package(compile_package(model, tmp_path / "mindcv.pt2", batch=x.shape[0], input_size=224))
    assert (compiled(x) - torch.from_numpy(reference["logits_224"])).abs().max() < 1e-4


@pytest.mark.slow
def test_bench_packages_torchvisions_model_too_and_only_in_float32(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The peer gets the same package (frozen, channels_last) in the ``torchvision-aot`` row."""
    theirs = torchvision_model("shufflenet_v2_x0_5")
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = theirs(x)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    run = _runner("torchvision-aot", nn.Identity(), theirs, x, threads=1, scratch=scratch)
    shutil.rmtree(scratch)  # as the bench removes it once the package is loaded
    got = run()
    assert (got - expected).abs().max() < 1e-4 * max(1.0, expected.abs().max().item())
    argv = ["bench", "--models", "shufflenet_v2_x0_5", "--backend", "aot", "--amp", "bfloat16"]
    assert main(argv) == 2
    assert "the aot backends are float32 packages" in capsys.readouterr().err
