from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from shufflenetv2 import create_model, read_weights, save_weights
from shufflenetv2.cli import main
from shufflenetv2.config import Config, evaluation_of
from shufflenetv2.errors import CheckpointError
from shufflenetv2.factory import model_from_weights
from shufflenetv2.model import LAYOUTS
from shufflenetv2.weights import read_evaluation

from .conftest import assert_same_logits, calibrated, logits, shared_file

MACS_M = {"shufflenet_v2_x0_5": 41, "shufflenet_v2_x1_0": 146, "shufflenet_v2_x1_5": 299, "shufflenet_v2_x2_0": 591}
PARAMS_M = {
    "shufflenet_v2_x0_5": 1.37,
    "shufflenet_v2_x1_0": 2.29,
    "shufflenet_v2_x1_5": 3.53,
    "shufflenet_v2_x2_0": 7.44,
}


@pytest.mark.parametrize("name", list(MACS_M))
def test_summary_reports_mindcv_figures(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["summary", name]) == 0
    out = capsys.readouterr().out
    assert f"({PARAMS_M[name]:.2f} M)" in out  # params with BN statistics, MindCV's params(M)
    macs = float(out.split("MACs at 224x224:")[1].split("(")[1].split(" M")[0])
    assert abs(macs - MACS_M[name]) / MACS_M[name] < 0.015  # the paper's MFLOPs
    assert "features.15.branch_main.5" in out  # the layer table


def test_summary_totals_only(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["summary", "shufflenet_v2_x0_5", "--no-layers", "--layout", "torchvision"]) == 0
    out = capsys.readouterr().out
    assert "1,366,792" in out and "branch2" not in out


ROUTES = [
    ("m.ckpt", "m.safetensors", None),
    ("m.ckpt", "m.pth", None),
    ("m.safetensors", "m.ckpt", None),
    ("m.pth", "m2.pt", None),
    ("m.ckpt", "tv.safetensors", "torchvision"),
    ("tv.pth", "back.safetensors", "mindcv"),
    ("tv.pth", "t.pt", None),
]


@pytest.mark.parametrize(("src", "dst", "layout"), ROUTES)
def test_convert_preserves_logits(
    tmp_path: Path, src: str, dst: str, layout: str | None, capsys: pytest.CaptureFixture[str]
) -> None:
    torchvision = pytest.importorskip("torchvision")
    mindcv_model = calibrated(create_model("shufflenet_v2_x0_5", num_classes=10))
    tv_model = calibrated(torchvision.models.shufflenet_v2_x0_5(num_classes=10))
    for name in ("m.ckpt", "m.safetensors", "m.pth"):
        save_weights(tmp_path / name, mindcv_model)
    torch.save(tv_model.state_dict(), tmp_path / "tv.pth")
    source = tv_model if src.startswith("tv") else mindcv_model

    argv = ["convert", str(tmp_path / src), str(tmp_path / dst)] + (["--layout", layout] if layout else [])
    assert main(argv) == 0
    assert "max |logit difference|" in capsys.readouterr().out
    weights = read_weights(tmp_path / dst)
    converted = create_model(
        "shufflenet_v2_x0_5", num_classes=10, checkpoint_path=tmp_path / dst, layout=weights.layout
    )
    x = torch.randn(2, 3, 224, 224)
    assert_same_logits(logits(converted, x), logits(source, x))


def test_convert_refusals_exit_2_without_traceback(tmp_path: Path) -> None:
    save_weights(tmp_path / "wide.ckpt", create_model("shufflenet_v2_x1_0"))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "shufflenetv2",
            "convert",
            str(tmp_path / "wide.ckpt"),
            str(tmp_path / "tv.pth"),
            "--layout",
            "torchvision",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "different networks" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "tv.pth").exists()


def test_convert_to_pth_refuses_mindcv_pool_in_torchvision_layout(tmp_path: Path, capsys) -> None:
    save_weights(tmp_path / "m.ckpt", create_model("shufflenet_v2_x0_5"))
    assert main(["convert", str(tmp_path / "m.ckpt"), str(tmp_path / "tv.pth"), "--layout", "torchvision"]) == 2
    assert "safetensors" in capsys.readouterr().err


def _large_logit_weights(path: Path) -> Path:
    """Weights whose logits on noise reach 1e4: tight BatchNorm statistics, as in a briefly trained network
    (a one-epoch hymenoptera checkpoint of ours gave 6e5 on the same input)."""
    model = create_model("shufflenet_v2_x0_5", num_classes=4)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_var.fill_(0.05)
    save_weights(path, model)
    return path


def test_convert_checks_in_float64_so_large_logits_are_not_refused(tmp_path: Path, capsys) -> None:
    """Float32 rounding alone moves such logits by more than 1e-4 between the layouts, which the absolute
    float32 check took for a broken conversion: `convert` exited 2 on a valid file.  Now it compares in
    float64, relative to the logits."""
    source = read_weights(_large_logit_weights(tmp_path / "m.safetensors"))
    x = torch.randn(2, 3, 97, 131, generator=torch.Generator().manual_seed(0))
    mindcv_layout, tv_layout = (model_from_weights(source, "shufflenet_v2_x0_5", 4, 3, layout=k) for k in LAYOUTS)
    float32 = logits(mindcv_layout, x)
    assert float32.abs().max() > 1e3 and (float32 - logits(tv_layout, x)).abs().max() > 1e-4  # the regime

    src, tv, back = (str(tmp_path / name) for name in ("m.safetensors", "tv.safetensors", "back.ckpt"))
    assert main(["convert", src, tv, "--layout", "torchvision"]) == 0
    assert main(["convert", tv, back, "--layout", "mindcv"]) == 0
    assert capsys.readouterr().out.count("in float64") == 2
    converted = create_model("shufflenet_v2_x0_5", num_classes=4, checkpoint_path=back).double()
    exact = logits(mindcv_layout.double(), x.double())
    assert (logits(converted, x.double()) - exact).abs().max() <= 1e-12 * exact.abs().max()


def test_convert_that_changes_the_logits_keeps_the_earlier_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """A conversion bug, simulated by a save that nudges one weight, is caught before the file reaches dst."""
    import shufflenetv2.cli as cli

    def nudged_save(path: Path, model: torch.nn.Module, **kwargs: object) -> Path:
        with torch.no_grad():
            model.state_dict()["fc.weight"][0, 0] += 1e-3
        return save_weights(path, model, **kwargs)

    monkeypatch.setattr(cli, "save_weights", nudged_save)
    src, dst = _large_logit_weights(tmp_path / "m.safetensors"), tmp_path / "tv.safetensors"
    dst.write_bytes(b"an earlier file")
    assert main(["convert", str(src), str(dst), "--layout", "torchvision"]) == 2
    err = capsys.readouterr().err
    assert "changed its logits by" in err and "was not written" in err
    assert dst.read_bytes() == b"an earlier file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors", "tv.safetensors"]  # no temporary left


def test_weight_commands_import_neither_torchvision_nor_the_compiler(tmp_path: Path) -> None:
    """torchvision imports torch._dynamo (1.5 s here), as does initialising a network on the meta device:
    `--help`, `info`, `convert` and `summary` need neither, and took 3.8-4.5 s instead of 2.1-2.5 with them."""
    save_weights(tmp_path / "m.safetensors", create_model("shufflenet_v2_x0_5", num_classes=3))
    script = (
        "import sys; from shufflenetv2.cli import main; "
        f"main(['info', {str(tmp_path / 'm.safetensors')!r}]); "
        f"main(['convert', {str(tmp_path / 'm.safetensors')!r}, {str(tmp_path / 'tv.safetensors')!r}, "
        "'--layout', 'torchvision']); main(['summary', 'shufflenet_v2_x0_5', '--no-layers']); "
        "print([m for m in ('torchvision', 'torch._dynamo') if m in sys.modules])"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert '"model": "shufflenet_v2_x0_5"' in done.stdout and "wrote " in done.stdout
    assert done.stdout.splitlines()[-1] == "[]", done.stdout


def test_info_describes_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    save_weights(tmp_path / "m.ckpt", create_model("shufflenet_v2_x1_5", num_classes=12))
    assert main(["info", str(tmp_path / "m.ckpt")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "ckpt" and info["model"] == "shufflenet_v2_x1_5" and info["num_classes"] == 12


def test_class_names_and_evaluation_settings_are_kept_by_safetensors_shown_by_info_and_carried_by_convert(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    names = ["ants", "bees", "café ☕"]  # label order; any Unicode
    settings = evaluation_of(Config(image_resize=64, crop_pct=1.0))
    model = create_model("shufflenet_v2_x0_5", num_classes=3)
    path = save_weights(tmp_path / "m.safetensors", model, classes=names, evaluation=settings)
    assert read_weights(path).classes == names
    assert read_weights(path).evaluation == settings == read_evaluation(path)  # the second from the header alone
    assert main(["info", str(path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["classes"] == names and info["evaluation"] == settings
    assert "classes" not in info["metadata"] and "evaluation" not in info["metadata"]
    converted = tmp_path / "tv.safetensors"
    assert main(["convert", str(path), str(converted), "--layout", "torchvision"]) == 0
    assert read_weights(converted).classes == names and read_weights(converted).evaluation == settings
    # none where none were given, where a format cannot hold them, or where the record is not a list of
    # num_classes strings / a JSON object (a file edited by hand): None, never an error
    plain = read_weights(save_weights(tmp_path / "plain.safetensors", model))
    assert plain.classes is None and plain.evaluation is None
    pth = save_weights(tmp_path / "m.pth", model, classes=names, evaluation=settings)
    assert read_weights(pth).classes is None and read_weights(pth).evaluation is None and read_evaluation(pth) is None
    assert read_evaluation(tmp_path / "missing.safetensors") is None  # reading the weights says why
    tensors = read_weights(path).tensors
    for key, bad in [("classes", b) for b in ("not json", '["ants", "bees"]', "[1, 2, 3]", '{"a": 1}')] + [
        ("evaluation", b) for b in ("not json", "[64, 1.0]")
    ]:
        save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={"format": "shufflenetv2", key: bad})
        assert getattr(read_weights(tmp_path / "bad.safetensors"), key) is None, bad


def test_an_export_given_where_weights_are_read_is_named_as_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A .pt2 is a zip like torch.save's, whose reader called it "corrupted"; an .onnx got its first bytes in hex."""
    weights = save_weights(tmp_path / "w.safetensors", create_model("shufflenet_v2_x0_5", num_classes=3))
    for suffix, what in ((".pt2", "is a torch.export program or a compiled package"), (".onnx", "is an ONNX model")):
        if suffix == ".onnx":
            pytest.importorskip("onnx")
        exported = tmp_path / f"m{suffix}"
        assert main(["export", str(weights), str(exported)]) == 0
        for argv in (["info", str(exported)], ["convert", str(exported), str(tmp_path / "x.safetensors")],
                     ["export", str(exported), str(tmp_path / "again.onnx")]):  # fmt: skip
            capsys.readouterr()
            assert main(argv) == 2, argv
            error = capsys.readouterr().err
            assert f"{exported} {what}" in error and "this needs the weights it was exported from" in error, error
            assert "corrupt" not in error and "first bytes" not in error
        with pytest.raises(CheckpointError, match="not a weight file"):
            read_weights(exported)


def test_info_on_the_mindcv_fixture(capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = shared_file("fixtures/mindcv/shufflenet_v2_x0_5_c10.ckpt")
    assert main(["info", str(ckpt)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model"] == "shufflenet_v2_x0_5" and info["tensors"] == 281 and info["layout"] == "mindcv"


def test_missing_file_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(tmp_path / "nope.ckpt")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).with_name("shufflenetv2")
    if not script.exists():
        pytest.skip("the package is not installed in this interpreter's environment (pip install -e .)")
    result = subprocess.run(
        [str(script), "summary", "shufflenet_v2_x0_5", "--no-layers"], capture_output=True, text=True, check=True
    )
    assert "1,365,792" in result.stdout


def test_unknown_train_flags_suggest_the_config_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--optimizer", "sgd", "--learning_rate", "0.1"]) == 2
    err = capsys.readouterr().err
    assert "unknown option '--optimizer'; did you mean 'opt'?" in err
    assert "unknown option '--learning_rate'; did you mean 'lr'?" in err


def test_the_cli_hides_torchs_cuda_home_warning_on_a_machine_without_cuda() -> None:
    """A CUDA build of torch on a CPU-only machine logs "No CUDA runtime is found" when a compile first
    imports cpp_extension (validate.py's first compiled batch): not a fault of the run, so not shown."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: torch does not log the warning here")
    load = "import torch.utils.cpp_extension"
    hidden = "from shufflenetv2.cli import hide_cuda_home_warning; hide_cuda_home_warning(); " + load

    def stderr(code: str) -> str:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr

    if "No CUDA runtime is found" not in stderr(load):
        pytest.skip("this torch finds no CUDA_HOME here, so it logs no warning to hide")
    assert "No CUDA runtime is found" not in stderr(hidden)


def test_output_into_a_closed_pipe_ends_quietly() -> None:
    """`shufflenetv2 ... | head -1`: once the reader is gone, the command stops with 141 (128 + SIGPIPE, as
    a shell tool would) and no traceback."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write now fails with EPIPE
    try:
        done = subprocess.run(
            [sys.executable, "-m", "shufflenetv2", "summary", "shufflenet_v2_x0_5"],
            stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120,
        )  # fmt: skip
    finally:
        os.close(write_end)
    assert done.returncode == 141, done.stderr
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr


def test_every_option_says_what_it_does_and_what_it_is_without_it() -> None:
    """`shufflenetv2 COMMAND --help` is the reference a user reads: each argument has a help line, and each
    option that takes a value and has a default names that default."""
    import argparse

    from shufflenetv2.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    silent = []
    for name, command in commands.items():
        for action in command._actions:
            takes_value = action.nargs != 0
            has_default = action.default not in (None, "", argparse.SUPPRESS)
            if not action.help or (takes_value and has_default and "default" not in action.help):
                silent.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert not silent, silent
