from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from shufflenetv2 import CheckpointError, create_model, detect_format, read_weights, save_weights
from shufflenetv2.layout import convert_layout
from shufflenetv2.mindspore_ckpt import parse_ckpt, read_ckpt, serialize_ckpt
from shufflenetv2.model import WIDTHS

from .conftest import assert_same_logits, calibrated, logits, shared_file

FIXTURE = "fixtures/mindcv/shufflenet_v2_x0_5_c10"


# --- MindCV's own checkpoint and logits -----------------------------------------------------------


@pytest.mark.parametrize("layout", ["mindcv", "torchvision"])
def test_mindcv_fixture_logits(layout: str) -> None:
    ckpt = shared_file(FIXTURE + ".ckpt")
    expected = np.load(shared_file(FIXTURE + ".npz"))
    model = create_model("shufflenet_v2_x0_5", num_classes=10, checkpoint_path=ckpt, layout=layout).eval()
    for inputs, outputs in [("x_224", "logits_224"), ("x_odd", "logits_odd")]:
        ours = logits(model, torch.from_numpy(expected[inputs])).numpy()
        assert np.abs(ours - expected[outputs]).max() < 1e-4, (layout, inputs)


def test_mindcv_fixture_needs_the_same_pool() -> None:
    """The SAME-padded stem pool is what makes the logits match: the symmetric pool moves them."""
    ckpt = shared_file(FIXTURE + ".ckpt")
    expected = np.load(shared_file(FIXTURE + ".npz"))
    weights = read_weights(ckpt)
    model = create_model("shufflenet_v2_x0_5", num_classes=10, stem_pool="symmetric").eval()
    model.load_state_dict(weights.tensors, strict=False)
    diff = np.abs(logits(model, torch.from_numpy(expected["x_224"])).numpy() - expected["logits_224"]).max()
    assert diff > 0.1


def test_model_written_as_ckpt_matches_mindspore_bytes(tmp_path: Path) -> None:
    """Loaded into our model and saved again, the fixture comes out byte for byte as MindSpore wrote it."""
    ckpt = shared_file(FIXTURE + ".ckpt")
    model = create_model("shufflenet_v2_x0_5", num_classes=10, checkpoint_path=ckpt)
    out = save_weights(tmp_path / "again.ckpt", model)
    assert out.read_bytes() == ckpt.read_bytes()


# --- formats --------------------------------------------------------------------------------------


def _model(name: str = "shufflenet_v2_x0_5", layout: str = "mindcv", num_classes: int = 10, **kw) -> torch.nn.Module:
    return calibrated(create_model(name, num_classes=num_classes, layout=layout, **kw))


def _ms_state_of(model: torch.nn.Module) -> dict[str, np.ndarray]:
    from shufflenetv2.weights import _ms_state

    return _ms_state(model.state_dict())


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors", ".pth", ".pt"])
def test_round_trip_every_format(tmp_path: Path, suffix: str) -> None:
    model = _model()
    path = save_weights(tmp_path / f"w{suffix}", model)
    again = create_model("shufflenet_v2_x0_5", num_classes=10, checkpoint_path=path)
    x = torch.randn(2, 3, 64, 80)
    assert torch.equal(logits(model, x), logits(again, x))


@pytest.mark.parametrize("fmt", ["ckpt", "safetensors", "pth"])
def test_format_comes_from_content_not_extension(tmp_path: Path, fmt: str) -> None:
    path = save_weights(tmp_path / "weights.bin", _model(), fmt=fmt)
    assert detect_format(path) == fmt
    misnamed = tmp_path / ("weights.ckpt" if fmt != "ckpt" else "weights.safetensors")
    misnamed.write_bytes(path.read_bytes())
    assert read_weights(misnamed).format == fmt


def test_safetensors_metadata(tmp_path: Path) -> None:
    from safetensors import safe_open

    path = save_weights(tmp_path / "w.safetensors", _model(), source="unit test")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["model"] == "shufflenet_v2_x0_5"
    assert meta["num_classes"] == "10"
    assert meta["layout"] == "mindcv"
    assert meta["source"] == "unit test"
    assert meta["stem_pool"] == "same"


def test_unknown_content_is_refused(tmp_path: Path) -> None:
    junk = tmp_path / "w.safetensors"
    junk.write_bytes(b"GIF89a not weights at all")
    with pytest.raises(CheckpointError, match="not a weight file"):
        read_weights(junk)
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        read_weights(empty)
    with pytest.raises(CheckpointError, match="cannot read"):
        read_weights(tmp_path / "missing.ckpt")


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors", ".pth"])
def test_truncated_files_give_clear_errors(tmp_path: Path, suffix: str) -> None:
    path = save_weights(tmp_path / f"w{suffix}", _model())
    data = path.read_bytes()
    for cut in (len(data) // 3, len(data) - 7):
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError):
            create_model("shufflenet_v2_x0_5", num_classes=10, checkpoint_path=path)


class _Exploit:
    def __reduce__(self):
        return (print, ("this should never run",))


def test_pickles_with_code_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {}, "payload": _Exploit()}, path)
    with pytest.raises(CheckpointError, match=r"it holds a pickled print, and unpickling could run arbitrary"):
        read_weights(path)
    assert "should never run" not in capsys.readouterr().out
    whole = tmp_path / "whole.pth"  # torch.save(model), as many training scripts write: named, with what to do
    torch.save(torchvision.models.shufflenet_v2_x0_5(), whole)
    with pytest.raises(CheckpointError) as refused:
        read_weights(whole)
    assert str(refused.value) == (
        f"refused to load {whole}: it holds a pickled torchvision.models.shufflenetv2.ShuffleNetV2 (a whole model, "
        "as torch.save(model) writes it), and unpickling could run arbitrary code. Where you trust the file, save "
        "its weights alone and pass those: torch.save(model.state_dict(), 'weights.pth'), or "
        "shufflenetv2.save_weights('weights.safetensors', model)"
    )  # before: the first line of torch's text, cut off, with its terminal colour codes
    legacy = tmp_path / "legacy.pth"
    legacy.write_bytes(pickle.dumps(_Exploit(), protocol=2))
    with pytest.raises(CheckpointError):
        read_weights(legacy)
    assert "should never run" not in capsys.readouterr().out


def test_pth_containers_and_wrappers(tmp_path: Path) -> None:
    model = _model(layout="torchvision")
    state = {f"module._orig_mod.{k}": v for k, v in model.state_dict().items()}
    ema = {k: v + 1 for k, v in model.state_dict().items() if v.is_floating_point()}
    path = tmp_path / "train.pth"
    torch.save({"model": state, "model_ema": ema, "epoch": 3}, path)
    weights = read_weights(path)
    assert weights.layout == "torchvision" and weights.arch["model"] == "shufflenet_v2_x0_5"
    assert torch.equal(weights.tensors["fc.weight"], model.fc.weight)
    assert torch.equal(read_weights(path, ema=True).tensors["fc.weight"], model.fc.weight + 1)


def test_training_checkpoint_network_and_ema(tmp_path: Path) -> None:
    """MindCV training checkpoints: moments.*, ema.*, scalars; network weights unless ema=True."""
    model = _model()
    ms = _ms_state_of(model)
    trainable = [k for k in ms if not k.endswith(("moving_mean", "moving_variance"))]
    full = dict(ms)
    full.update({f"moments.{k}": np.zeros_like(ms[k]) for k in trainable})
    full.update({f"ema.{k}": ms[k] * 2 for k in trainable})
    full["learning_rate"] = np.array(0.1, np.float32)
    full["global_step"] = np.array(1234, np.int32)
    path = tmp_path / "train.ckpt"
    path.write_bytes(serialize_ckpt(full, crc=True))
    weights = read_weights(path)
    assert len(weights.tensors) == 281
    assert "global_step" in weights.skipped and "moments.classifier.weight" in weights.skipped
    net = create_model("shufflenet_v2_x0_5", num_classes=10, checkpoint_path=path)
    assert torch.equal(net.classifier.weight, model.classifier.weight)
    averaged = create_model("shufflenet_v2_x0_5", num_classes=10, checkpoint_path=path, ema=True)
    assert torch.equal(averaged.classifier.weight, model.classifier.weight * 2)
    bn = averaged.features[3].branch_main[1]  # BN statistics are the network's, not averaged
    assert torch.equal(bn.running_var, model.features[3].branch_main[1].running_var)
    plain = tmp_path / "plain.ckpt"
    plain.write_bytes(serialize_ckpt(ms))
    with pytest.raises(CheckpointError, match="EMA"):
        read_weights(plain, ema=True)


def test_crc_mismatch_is_an_error(tmp_path: Path) -> None:
    data = bytearray(serialize_ckpt(_ms_state_of(_model()), crc=True))
    data[100] ^= 0xFF
    path = tmp_path / "bad.ckpt"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="CRC"):
        read_weights(path)


def test_encrypted_ckpt_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "enc.ckpt"
    path.write_bytes((0x7F3A5ED8).to_bytes(4, "little") + b"\x00" * 64)
    with pytest.raises(CheckpointError, match="encrypted"):
        create_model("shufflenet_v2_x0_5", checkpoint_path=path)


def test_ckpt_reads_mindspore_bn_names(tmp_path: Path) -> None:
    path = save_weights(tmp_path / "w.ckpt", _model())
    names = list(read_ckpt(path))
    assert names[1:5] == [
        "first_conv.1.moving_mean",
        "first_conv.1.moving_variance",
        "first_conv.1.gamma",
        "first_conv.1.beta",
    ]
    assert not any("num_batches_tracked" in n or "running" in n for n in names)
    assert parse_ckpt(path.read_bytes()).keys() == read_ckpt(path).keys()


# --- mismatches -----------------------------------------------------------------------------------


def test_wrong_width_lists_offending_tensors(tmp_path: Path) -> None:
    path = save_weights(tmp_path / "x05.safetensors", _model())
    with pytest.raises(CheckpointError) as info:
        create_model("shufflenet_v2_x1_0", num_classes=10, checkpoint_path=path)
    message = str(info.value)
    assert "shufflenet_v2_x0_5" in message and "shufflenet_v2_x1_0" in message
    assert "features.0.branch_main.0.weight: file has (24, 24, 1, 1), model expects (58, 24, 1, 1)" in message
    assert "more" in message  # long lists are cut, with a count


def test_wrong_class_count_is_an_error_unless_dropped(tmp_path: Path) -> None:
    model = _model()
    path = save_weights(tmp_path / "c10.ckpt", model)
    with pytest.raises(CheckpointError) as info:
        create_model("shufflenet_v2_x0_5", num_classes=5, checkpoint_path=path)
    assert "classifier.weight: file has (10, 1024), model expects (5, 1024)" in str(info.value)
    assert "drop_classifier=True" in str(info.value)
    torch.manual_seed(1)
    tuned = create_model("shufflenet_v2_x0_5", num_classes=5, checkpoint_path=path, drop_classifier=True)
    assert tuned.classifier.weight.shape == (5, 1024)
    assert torch.equal(tuned.conv_last[0].weight, model.conv_last[0].weight)
    assert tuned.classifier.weight.std().item() == pytest.approx(0.01, rel=0.1)  # freshly initialised


def test_in_channels_one_sums_the_stem(tmp_path: Path) -> None:
    model = _model()
    path = save_weights(tmp_path / "rgb.ckpt", model)
    gray = create_model("shufflenet_v2_x0_5", num_classes=10, in_channels=1, checkpoint_path=path).eval()
    assert torch.allclose(gray.first_conv[0].weight, model.first_conv[0].weight.sum(1, keepdim=True))
    x = torch.randn(1, 1, 64, 64)  # a gray image equals the RGB model seeing it in all three channels
    assert torch.allclose(logits(gray, x), logits(model, x.expand(-1, 3, -1, -1)), atol=1e-5)


def test_unrelated_tensors_are_reported(tmp_path: Path) -> None:
    path = tmp_path / "resnet.safetensors"
    from safetensors.torch import save_file

    save_file({"layer1.0.conv1.weight": torch.zeros(64, 64, 3, 3)}, str(path))
    with pytest.raises(CheckpointError, match="no ShuffleNetV2 weights"):
        read_weights(path)


# --- layouts --------------------------------------------------------------------------------------


def test_mindcv_to_torchvision_is_exact() -> None:
    model = _model()
    converted = convert_layout(model.state_dict(), "shufflenet_v2_x0_5", "mindcv", "torchvision")
    target = create_model("shufflenet_v2_x0_5", num_classes=10, layout="torchvision", stem_pool="same").eval()
    target.load_state_dict({**converted, "fc.bias": torch.zeros(10)})
    for shape in [(2, 3, 224, 224), (1, 3, 97, 131)]:
        x = torch.randn(*shape)
        reference = logits(model, x)
        assert_same_logits(logits(target, x), reference)


def test_torchvision_to_mindcv_is_exact(tmp_path: Path) -> None:
    torchvision = pytest.importorskip("torchvision")
    reference = calibrated(torchvision.models.shufflenet_v2_x0_5(num_classes=10))
    path = tmp_path / "tv.pth"
    torch.save(reference.state_dict(), path)
    ours = create_model("shufflenet_v2_x0_5", num_classes=10, checkpoint_path=path)  # MindCV layout
    assert ours.layout == "mindcv" and ours.max_pool.padding == "symmetric" and ours.classifier.bias is not None
    for shape in [(2, 3, 224, 224), (1, 3, 97, 131)]:
        x = torch.randn(*shape)
        assert_same_logits(logits(ours, x), logits(reference, x))


def test_channels_really_move_in_conversion() -> None:
    """Guard against a conversion that is exact only because it is the identity."""
    model = _model()
    converted = convert_layout(model.state_dict(), "shufflenet_v2_x0_5", "mindcv", "torchvision")
    a = model.state_dict()["features.1.branch_main.0.weight"]
    b = converted["stage2.1.branch2.0.weight"]
    assert not torch.equal(a, b) and torch.equal(a.sort(1).values, b.sort(1).values)


@pytest.mark.parametrize("name", [n for n in WIDTHS if n != "shufflenet_v2_x0_5"])
def test_wider_models_do_not_convert(name: str) -> None:
    state = create_model(name).state_dict()
    with pytest.raises(CheckpointError, match="different networks"):
        convert_layout(state, name, "mindcv", "torchvision")


def test_layout_conversion_refuses_a_different_pool(tmp_path: Path) -> None:
    path = save_weights(tmp_path / "m.ckpt", _model())
    plain_tv = create_model("shufflenet_v2_x0_5", num_classes=10, layout="torchvision")  # symmetric pool
    from shufflenetv2 import load_weights

    with pytest.raises(CheckpointError, match="stem pool"):
        load_weights(plain_tv, read_weights(path))


def test_pth_refuses_an_architecture_it_cannot_record(tmp_path: Path) -> None:
    tv_same_pool = create_model("shufflenet_v2_x0_5", num_classes=10, layout="torchvision", stem_pool="same")
    with pytest.raises(CheckpointError, match="safetensors"):
        save_weights(tmp_path / "x.pth", tv_same_pool)
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_ckpt_refuses_inexact_exports(tmp_path: Path) -> None:
    torchvision_like = create_model("shufflenet_v2_x0_5", num_classes=10, layout="torchvision")
    with pytest.raises(CheckpointError, match="symmetric"):
        save_weights(tmp_path / "tv.ckpt", torchvision_like)
    wide = create_model("shufflenet_v2_x1_0", num_classes=10, layout="torchvision", stem_pool="same")
    with pytest.raises(CheckpointError, match="different networks"):
        save_weights(tmp_path / "wide.ckpt", wide)
    biased = create_model("shufflenet_v2_x0_5", num_classes=10, classifier_bias=True)
    with torch.no_grad():
        biased.classifier.bias.fill_(0.5)
    with pytest.raises(CheckpointError, match="bias"):
        save_weights(tmp_path / "biased.ckpt", biased)
    assert not list(tmp_path.iterdir())


def test_failed_save_keeps_the_previous_file(tmp_path: Path) -> None:
    good = save_weights(tmp_path / "w.ckpt", _model())
    before = good.read_bytes()
    with pytest.raises(CheckpointError):
        save_weights(good, create_model("shufflenet_v2_x0_5", num_classes=10, layout="torchvision"))
    assert good.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["w.ckpt"]


def test_zip_pth_detected(tmp_path: Path) -> None:
    path = save_weights(tmp_path / "w.pth", _model())
    assert zipfile.is_zipfile(path)
    buffer = io.BytesIO(path.read_bytes())
    assert torch.load(buffer, weights_only=True)["classifier.weight"].shape == (10, 1024)
