"""The deploy model: BatchNorm and the channel shuffle folded away, same logits; and its ONNX export."""

from __future__ import annotations

import collections
import copy
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import shufflenetv2 as snv2
from shufflenetv2 import create_model, deploy, onnx_graph, save_weights
from shufflenetv2.bench import ONNX_FILE, OPENVINO_BACKENDS, _runner, expand_backends, torchvision_model
from shufflenetv2.cli import main
from shufflenetv2.config import Config, evaluation_of
from shufflenetv2.deploy import (
    FrozenCompiled,
    FusedShuffleNetV2,
    PointwiseLinear,
    UnrolledDepthwise,
    export_onnx,
    fold_batchnorm,
    fuse,
)
from shufflenetv2.model import LAYOUTS, WIDTHS, build_network
from shufflenetv2.onnx_graph import ONNX_STEM_MULTIPLE, RoutedShuffleNetV2, fuse_for_onnx

from .conftest import assert_depends_on_the_image, calibrated, randomize_bn, shared_file


def _model(name: str, layout: str, seed: int = 0) -> nn.Module:
    return calibrated(build_network(name, 1000, 3, layout), seed)


def test_the_test_models_logits_depend_on_the_image() -> None:
    for layout in LAYOUTS:
        assert_depends_on_the_image(_model("shufflenet_v2_x0_5", layout))


def _inputs(seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, 224, 224, generator=g), torch.randn(1, 3, 97, 131, generator=g)]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", list(WIDTHS))
def test_fused_model_gives_the_same_logits(name: str, layout: str) -> None:
    model = _model(name, layout)
    fused = fuse(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    if layout == "mindcv":
        assert isinstance(fused, FusedShuffleNetV2)
    for x in _inputs():
        with torch.no_grad():
            expected, got = model(x), fused(x)
        assert expected.abs().max() > 1.0
        assert (expected - got).abs().max() < 1e-4
        with torch.no_grad():  # a channels_last input gives the same
            assert torch.allclose(fused(x.contiguous(memory_format=torch.channels_last)), got, atol=1e-5)


def _depthwise_widths(fused: nn.Module) -> set[int]:
    return {m.out_channels for m in fused.modules() if isinstance(m, nn.Conv2d) and m.groups > 1}


@pytest.mark.parametrize("multiple", [1, 3, 4, 16])
@pytest.mark.parametrize("name", list(WIDTHS))
def test_routed_graph_with_zero_channel_padding_keeps_the_logits(name: str, multiple: int) -> None:
    """The ONNX Runtime graph (channels routed by reader, branches padded with zero channels, 58 -> 60 at
    x1.0 for ORT): float64 logits equal to 1e-10."""
    model = _model(name, "mindcv").double()
    routed = RoutedShuffleNetV2(model, multiple).eval()
    stage2 = WIDTHS[name][1] // 2  # the stage-2 branch width: 58 and 122 are multiples of neither 4 nor 16
    assert -(-stage2 // multiple) * multiple in _depthwise_widths(routed)
    if stage2 != WIDTHS[name][0]:  # x0.5's is also the stem's width, which the first projection reads
        assert (stage2 in _depthwise_widths(routed)) == (stage2 % multiple == 0)
    x = torch.randn(2, 3, 64, 80, dtype=torch.float64, generator=torch.Generator().manual_seed(multiple))
    with torch.no_grad():
        expected = model(x)
        got = routed(x)
    assert expected.abs().max() > 1.0
    assert (expected - got).abs().max() < 1e-10


@pytest.mark.parametrize("channels_last", [False, True])
def test_fuse_keeps_the_models_device_and_dtype(channels_last: bool) -> None:
    """A CUDA model fused must stay on CUDA: checked on the meta device, which runs shapes only."""
    model = build_network("shufflenet_v2_x1_0").to(device="meta", dtype=torch.float64)
    x = torch.empty(2, 3, 64, 64, device="meta", dtype=torch.float64)
    for fused in (fuse(model, channels_last=channels_last), fuse_for_onnx(model)):
        assert {(p.device.type, p.dtype) for p in fused.parameters()} == {("meta", torch.float64)}
        assert fused(x).shape == (2, 1000)


def test_padding_multiples_must_be_positive() -> None:
    with pytest.raises(ValueError, match="multiple must be a positive integer"):
        RoutedShuffleNetV2(_model("shufflenet_v2_x0_5", "mindcv"), multiple=0)
    with pytest.raises(ValueError, match="stem_multiple must be a positive integer"):
        RoutedShuffleNetV2(_model("shufflenet_v2_x0_5", "mindcv"), stem_multiple=-16)


def test_fuse_refuses_compile_together_with_freeze() -> None:
    """freeze already compiles; asking for both used to freeze silently and drop ``compile``."""
    with pytest.raises(ValueError, match="pick one; freeze already compiles"):
        fuse(_model("shufflenet_v2_x0_5", "mindcv"), compile=True, freeze=True)


@pytest.mark.parametrize("name", ["shufflenet_v2_x0_5", "shufflenet_v2_x1_0"])
def test_stem_padding_keeps_the_logits(name: str) -> None:
    """The stem's 24 channels padded to 32 for ORT's blocked max-pool: float64 logits equal to 1e-10."""
    model = _model(name, "mindcv").double()
    padded = fuse_for_onnx(model)
    assert padded.first_conv[0].out_channels == 32 == -(-24 // ONNX_STEM_MULTIPLE) * ONNX_STEM_MULTIPLE
    assert padded.stages[0].proj[0].groups == 32  # the first block's depthwise reads them
    x = torch.randn(2, 3, 64, 80, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = model(x)
        assert (expected - padded(x)).abs().max() < 1e-10 < expected.abs().max()


def test_onnxruntime_keeps_the_padded_stem_in_its_blocked_layout(tmp_path: Path) -> None:
    """What the stem padding is for: in ORT's optimized graph the stem convolution feeds a blocked-layout
    (NCHWc) max-pool directly, with no reorder to plain NCHW and back around it."""
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    path = export_onnx(fuse_for_onnx(_model("shufflenet_v2_x0_5", "mindcv")), tmp_path / "m.onnx")
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3  # the notice that the saved graph is specific to this CPU
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    nodes = onnx.load(str(tmp_path / "optimized.onnx")).graph.node
    pool = next(n for n in nodes if n.op_type == "MaxPool")
    producer = next(n for n in nodes if pool.input[0] in n.output)
    assert pool.domain == "com.microsoft.nchwc", [(n.op_type, n.domain) for n in nodes[:6]]
    assert (producer.op_type, producer.domain) == ("Conv", "com.microsoft.nchwc")


def test_fuse_leaves_the_original_untouched() -> None:
    model = _model("shufflenet_v2_x0_5", "mindcv").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fuse(model)
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 56


def test_a_model_with_sync_batchnorm_fuses_to_the_same_logits() -> None:
    """Training with sync_bn on GPUs converts the BatchNorms to nn.SyncBatchNorm (in place), and mode 0's
    evaluation on a CPU and ``predict`` fuse what the run trained; in eval mode it is a plain BatchNorm."""
    model = _model("shufflenet_v2_x0_5", "mindcv")
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model)).eval()
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in synced.modules()) == 56
    fused = fuse(synced)
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm)) for m in fused.modules())
    x = _inputs()[0]
    with torch.no_grad():
        expected = model(x)
        assert (fused(x) - expected).abs().max() < 1e-4 and expected.abs().max() > 1.0


def test_a_batchnorm_that_cannot_be_folded_is_an_error_not_wrong_logits() -> None:
    """The fused blocks permute channels in the convolutions' weights; a BatchNorm left between them would
    scale the wrong channels without any error."""
    model = _model("shufflenet_v2_x0_5", "mindcv")
    branch = model.features[1].branch_main
    branch[0] = nn.Sequential(branch[0])  # the convolution hidden one level down: its BatchNorm no longer follows it
    with pytest.raises(ValueError, match=r"fuse: BatchNorm features\.1\.branch_main\.1 follows no convolution"):
        fuse(model)


def test_fold_batchnorm_of_a_biased_conv() -> None:
    conv, bn = nn.Conv2d(4, 6, 3, padding=1, bias=True), nn.BatchNorm2d(6)
    randomize_bn(nn.Sequential(conv, bn))
    x = torch.randn(2, 4, 9, 9)
    with torch.no_grad():
        assert torch.allclose(fold_batchnorm(conv, bn)(x), bn.eval()(conv(x)), atol=1e-5)


def test_mindcv_release_weights_fused_reproduce_mindcvs_logits() -> None:
    """MindCV's own checkpoint, fused: still MindCV's logits (the eval model is at 1.6e-5)."""
    ckpt = shared_file("fixtures/mindcv/shufflenet_v2_x0_5_c10.ckpt")
    reference = np.load(shared_file("fixtures/mindcv/shufflenet_v2_x0_5_c10.npz"))
    fused = fuse(create_model("shufflenet_v2_x0_5", num_classes=10, checkpoint_path=ckpt))
    for size in ("224", "odd"):
        with torch.no_grad():
            got = fused(torch.from_numpy(reference[f"x_{size}"]))
        assert (got - torch.from_numpy(reference[f"logits_{size}"])).abs().max() < 1e-4


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", list(WIDTHS))
def test_onnx_export_runs_in_onnxruntime_with_the_same_logits(name: str, layout: str, tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    model = _model(name, layout)
    path = export_onnx(fuse_for_onnx(model), tmp_path / "m.onnx")
    graph = onnx.load(str(path))
    assert graph.opset_import[0].version >= 17
    ops = collections.Counter(node.op_type for node in graph.graph.node)
    assert ops["BatchNormalization"] == 0
    if layout == "mindcv":  # routed by reader: no slices, one concatenation per block at most (the halves: two)
        assert ops["Slice"] == 0 and ops["Concat"] <= len(model.features), ops
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 3):  # the batch dimension is dynamic
        x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(batch))
        (got,) = session.run(None, {"images": x.numpy()})
        with torch.no_grad():
            expected = model(x)
        assert got.shape == (batch, 1000)
        assert np.abs(got - expected.numpy()).max() < 1e-4


@pytest.mark.parametrize("size", [224, 225])
def test_onnx_stem_pool_is_one_same_upper_maxpool_at_even_and_odd_sizes(size: int, tmp_path: Path) -> None:
    """MindSpore's "same" pool pads (0, 1) on the even 112-px stem output and (1, 1) on the odd 113."""
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    model = _model("shufflenet_v2_x0_5", "mindcv")
    path = export_onnx(fuse(model, channels_last=False), tmp_path / "m.onnx", input_size=size)
    nodes = onnx.load(str(path)).graph.node
    pools = [n for n in nodes if n.op_type == "MaxPool"]
    assert len(pools) == 1 and not any(n.op_type == "Pad" for n in nodes)
    assert {a.name: a.s for a in pools[0].attribute}["auto_pad"] == b"SAME_UPPER"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
    (got,) = session.run(None, {"images": x.numpy()})
    with torch.no_grad():
        assert np.abs(got - model(x).numpy()).max() < 1e-4


def test_export_command_writes_onnx_and_a_torch_export_program(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ort = pytest.importorskip("onnxruntime")
    model = _model("shufflenet_v2_x0_5", "mindcv")
    names = [f"class {i} ✓" for i in range(1000)]  # what a training run records in its weights
    settings = evaluation_of(Config(crop_pct=0.9))  # at 224 px, the size the exports below take
    src = save_weights(tmp_path / "w.safetensors", model, classes=names, evaluation=settings)
    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = model(x)
    assert main(["export", str(src), str(tmp_path / "m.onnx")]) == 0
    printed = capsys.readouterr().out
    checked = r"; checked: max \|logit difference\| \d\.\de-\d\d \(logits up to \d\.\de\+01\) in ONNX Runtime"
    assert re.search(checked, printed), printed
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert np.abs(session.run(None, {"images": x.numpy()})[0] - expected.numpy()).max() < 1e-4
    assert json.loads(session.get_modelmeta().custom_metadata_map["classes"]) == names
    assert json.loads(session.get_modelmeta().custom_metadata_map["evaluation"]) == settings
    onnx = pytest.importorskip("onnx")  # the Python route writes the same graph as the command
    m, py = tmp_path / "m.onnx", snv2.export_onnx(snv2.fuse_for_onnx(model), tmp_path / "py.onnx")
    command, python = (sorted(list(i.dims) for i in onnx.load(str(p)).graph.initializer) for p in (m, py))
    assert command == python
    assert [32, 3, 3, 3] in command  # the stem, padded for ORT's blocked max-pool
    assert main(["export", str(src), str(tmp_path / "m.pt2")]) == 0
    assert "; checked: max |logit difference| " in capsys.readouterr().out
    extra = {"classes.json": "", "evaluation.json": ""}
    program = torch.export.load(str(tmp_path / "m.pt2"), extra_files=extra).module()
    with torch.no_grad():
        assert (program(x) - expected).abs().max() < 1e-4
    assert json.loads(extra["classes.json"]) == names and json.loads(extra["evaluation.json"]) == settings
    assert main(["export", str(src), str(tmp_path / "m.tflite")]) == 2
    # for OpenVINO: the same routed graph without ONNX Runtime's zero channels
    assert main(["export", str(src), str(tmp_path / "ov.onnx"), "--runtime", "openvino"]) == 0
    dims = [list(i.dims) for i in onnx.load(str(tmp_path / "ov.onnx")).graph.initializer]
    assert [24, 3, 3, 3] in dims and [32, 3, 3, 3] not in dims
    session = ort.InferenceSession(str(tmp_path / "ov.onnx"), providers=["CPUExecutionProvider"])
    assert np.abs(session.run(None, {"images": x.numpy()})[0] - expected.numpy()).max() < 1e-4
    assert main(["export", str(src), str(tmp_path / "ov.pt2"), "--runtime", "openvino"]) == 2


@pytest.mark.parametrize("suffix", [".onnx", ".pt2"])
def test_an_export_whose_logits_differ_is_refused_and_the_earlier_file_kept(
    suffix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The command runs what it built (in ONNX Runtime, or torch.export.load) against the weights before
    writing it. A folding that moved one weight by 0.5, as a bug in an exporter or in our graph would,
    is refused; an earlier export at that path stays as it was."""
    if suffix == ".onnx":
        pytest.importorskip("onnxruntime")
    model = _model("shufflenet_v2_x0_5", "mindcv")
    src = save_weights(tmp_path / "w.safetensors", model)
    out = tmp_path / "out"
    out.mkdir()
    dst = out / f"m{suffix}"
    assert main(["export", str(src), str(dst)]) == 0
    before = dst.read_bytes()

    def nudged(build: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        def build_and_nudge(*args: object, **kwargs: object) -> nn.Module:
            built = build(*args, **kwargs)
            head = [m for m in built.modules() if isinstance(m, nn.Linear)][-1]
            with torch.no_grad():
                head.weight[0, 0] += 0.5
            return built

        return build_and_nudge

    if suffix == ".onnx":
        monkeypatch.setattr(onnx_graph, "fuse_for_onnx", nudged(onnx_graph.fuse_for_onnx))
    else:
        monkeypatch.setattr(deploy, "fuse", nudged(deploy.fuse))
    capsys.readouterr()
    assert main(["export", str(src), str(dst)]) == 2
    error = capsys.readouterr().err
    assert "the export's logits differ from the weights': max |logit difference| " in error
    assert "so it was not written" in error and "Traceback" not in error
    assert dst.read_bytes() == before and sorted(p.name for p in out.iterdir()) == [dst.name]


def test_an_export_onnx_runtime_cannot_load_is_an_error_not_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    pytest.importorskip("onnxruntime")
    src = save_weights(tmp_path / "w.safetensors", _model("shufflenet_v2_x0_5", "mindcv"))
    monkeypatch.setattr(deploy, "onnx_bytes", lambda *args, **kwargs: b"\x08\x07 not a protobuf graph")
    assert main(["export", str(src), str(tmp_path / "m.onnx")]) == 2
    error = capsys.readouterr().err
    assert "ONNX Runtime " in error and "cannot load the export (" in error and "so it was not written" in error
    assert "Traceback" not in error and not (tmp_path / "m.onnx").exists()


def test_bench_command_measures_each_backend(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    args = ["bench", "--models", "shufflenet_v2_x0_5", "--batches", "1", "--backends", "ours-fused",
            "torchvision-eager", "--warmup", "1", "--repeats", "2", "--iterations", "1", "--input-size", "64",
            "--threads", "1", "--json", str(out)]  # fmt: skip
    assert main(args) == 0
    results = json.loads(out.read_text())
    assert [(r["backend"], r["batch"]) for r in results["rows"]] == [("ours-fused", 1), ("torchvision-eager", 1)]
    assert all(r["images_per_second"] > 0 and r["spread"][0] <= r["images_per_second"] for r in results["rows"])
    assert results["models"]["shufflenet_v2_x0_5"]["params"] == 1_365_792


def test_torchvisions_int8_peer_is_its_float_network_quantized(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The bench's int8 row runs torchvision's own float model, weights and all, quantized: int8
    convolutions whose logits follow the float ones (calibrated weights, so the logits depend on the image)."""
    from shufflenetv2.bench import torchvision_int8_model

    float_model = calibrated(torchvision_model("shufflenet_v2_x0_5"))
    x = torch.randn(16, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    int8 = torchvision_int8_model(float_model, x)
    assert type(int8.conv1[0]).__module__.startswith("torch.ao.nn.intrinsic.quantized")
    assert type(int8.stage2[1].branch2[3]).__module__.startswith("torch.ao.nn.quantized")  # the depthwise conv
    with torch.no_grad():
        similarity = torch.nn.functional.cosine_similarity(int8(x), float_model(x), dim=1)
    assert similarity.min() > 0.8, similarity  # 0.92 seen; another network's logits give about 0
    out = tmp_path / "bench.json"
    args = ["bench", "--models", "shufflenet_v2_x0_5", "--batches", "2", "--backends", "int8", "torchvision-eager",
            "--warmup", "1", "--repeats", "2", "--iterations", "1", "--input-size", "64", "--threads", "1",
            "--json", str(out)]  # fmt: skip
    assert main(args) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["backend"] for r in rows] == ["torchvision-int8", "torchvision-eager"]
    assert all(r["images_per_second"] > 0 for r in rows)
    assert main(["bench", "--models", "shufflenet_v2_x0_5", "--backend", "int8", "--amp", "bfloat16"]) == 2
    assert "the int8 one is int8" in capsys.readouterr().err  # its own precision, never autocast
    assert main(["bench", "--models", "shufflenet_v2_x0_5", "--backend", "int8", "--device", "cuda"]) == 2
    assert "int8 backends and --onnx run on the CPU only" in capsys.readouterr().err


def test_bench_backend_kinds_stand_for_ours_and_torchvisions() -> None:
    assert expand_backends(["onnxruntime"]) == ["ours-onnxruntime", "torchvision-onnxruntime"]
    assert expand_backends(["ours-fused", "eager", "torchvision-eager"]) == [
        "ours-fused", "ours-eager", "torchvision-eager"
    ]  # fmt: skip
    assert expand_backends(["fused"]) == ["ours-fused"]  # only ours has it
    assert expand_backends(["openvino"]) == ["ours-openvino", "torchvision-openvino"]  # named, never by default
    assert expand_backends(["compiled", "frozen"]) == [
        "ours-fused-compiled", "torchvision-compiled", "ours-fused-frozen", "torchvision-frozen"
    ]  # fmt: skip
    assert expand_backends(["aot"]) == ["ours-aot", "torchvision-aot"]
    assert expand_backends(["int8"]) == ["torchvision-int8"]  # another precision: named, never by default
    with pytest.raises(ValueError, match=r"unknown backend 'tensorrt'.*a kind: aot, compiled, eager"):
        expand_backends(["tensorrt"])


def test_bench_times_an_exported_onnx_file_beside_torchvisions(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``bench --backend onnxruntime --onnx FILE``: the file `export` wrote, in turn with both ONNX Runtime rows;
    the bench's own exports are gone once it has run."""
    pytest.importorskip("onnxruntime")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where the bench's temporary files go
    src = save_weights(tmp_path / "w.safetensors", _model("shufflenet_v2_x0_5", "mindcv"))
    onnx_path = tmp_path / "m.onnx"
    assert main(["export", str(src), str(onnx_path), "--input-size", "64"]) == 0
    out = tmp_path / "bench.json"
    common = ["bench", "--batches", "2", "--warmup", "1", "--repeats", "2", "--iterations", "1", "--input-size",
              "64", "--threads", "1"]  # fmt: skip
    args = [*common, "--models", "shufflenet_v2_x0_5", "--backend", "onnxruntime", "--onnx", str(onnx_path)]
    assert main([*args, "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    rows = [(r["backend"], r["batch"]) for r in results["rows"]]
    assert rows == [("ours-onnxruntime", 2), ("torchvision-onnxruntime", 2), (ONNX_FILE, 2)]
    assert all(r["images_per_second"] > 0 for r in results["rows"])
    assert results["settings"]["onnx_file"] == str(onnx_path)
    assert torch.backends.cpu.get_cpu_capability() in results["machine"]["cpu"]  # which kernels ran
    assert list(scratch.iterdir()) == []  # two exports were written there, and removed
    capsys.readouterr()

    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a protobuf at all" * 10)
    bad_input = tmp_path / "grey.onnx"
    export_onnx(nn.Conv2d(1, 2, 1), bad_input)  # a (batch, 1, H, W) input: not a colour-image model
    refusals = {
        "name that width alone": [*common, "--onnx", str(onnx_path)],  # the default --models names two widths
        "no such file": [*common, "--models", "shufflenet_v2_x0_5", "--onnx", str(tmp_path / "missing.onnx")],
        "cannot load it": [*common, "--models", "shufflenet_v2_x0_5", "--onnx", str(garbage)],
        "(batch, 3, H, W)": [*common, "--models", "shufflenet_v2_x0_5", "--onnx", str(bad_input)],
        "pass --input-size 64": [*args, "--input-size", "96"],  # the file takes 64-px images
        "unknown backend 'onnx'": [*common, "--backend", "onnx"],
    }
    for message, argv in refusals.items():
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err


def test_openvino_child_that_dies_while_starting_is_an_error_not_a_hang(tmp_path: Path) -> None:
    """A script without a ``__main__`` guard: the spawned child runs it again and dies while starting.  With
    an input over a pipe's 64 KB (2 x 3 x 64 x 64 floats) passed as an argument, the parent waited forever
    writing it to the dead child."""
    script = tmp_path / "no_guard.py"
    script.write_text(
        "import torch\nfrom shufflenetv2.bench import OpenVINOProcess\n"
        "OpenVINOProcess('model.onnx', torch.zeros(2, 3, 64, 64), 1)\n"
    )
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "the OpenVINO process ended without answering" in done.stderr
    assert "if __name__ == '__main__':" in done.stderr


def test_bench_openvino_rows_compute_the_logits(tmp_path: Path) -> None:
    """The OpenVINO peer runs the same functions: our fused export and torchvision's, float32, to 1e-4."""
    if importlib.util.find_spec("openvino") is None:  # found, not imported: this process must stay without it
        pytest.skip("openvino is not installed (the openvino extra, part of dev)")
    model = _model("shufflenet_v2_x0_5", "mindcv").eval()
    theirs = torchvision_model("shufflenet_v2_x0_5")
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    for backend, reference in (("ours-openvino", model), ("torchvision-openvino", theirs)):
        with torch.no_grad():
            expected = reference(x).numpy()
        scratch = tmp_path / backend
        scratch.mkdir()
        run = _runner(backend, model, theirs, x, threads=1, scratch=scratch)
        shutil.rmtree(scratch)  # as the bench removes it: the child has compiled the file already
        got = run()
        assert got.shape == expected.shape and np.abs(got - expected).max() < 1e-4 * max(1.0, np.abs(expected).max())
    out = tmp_path / "bench.json"
    args = ["bench", "--models", "shufflenet_v2_x0_5", "--batches", "1", "--backend", "openvino", "--warmup", "1",
            "--repeats", "2", "--iterations", "1", "--input-size", "64", "--threads", "1",
            "--json", str(out)]  # fmt: skip
    assert main(args) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["backend"] for r in rows] == list(OPENVINO_BACKENDS) and all(r["images_per_second"] > 0 for r in rows)
    assert "openvino" not in sys.modules  # its libraries stay in the child: beside inductor's they crashed


@pytest.mark.parametrize("bias", [True, False])
def test_pointwise_linear_is_the_1x1_convolution_on_strided_channels_last_slices(bias: bool) -> None:
    """The fused model feeds its 1x1 convolutions channel slices of NHWC tensors (the block's odd half)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(12, 20, 1, bias=bias).double()
    x = torch.randn(2, 24, 7, 9, dtype=torch.float64).contiguous(memory_format=torch.channels_last)[:, 12:]
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    got = PointwiseLinear(conv)(x)
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert (got - conv(x)).abs().max() < 1e-12


def test_fused_channels_last_model_runs_its_1x1_convolutions_as_matrix_products() -> None:
    fused = fuse(_model("shufflenet_v2_x0_5", "mindcv"))
    convs = [m for m in fused.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(m.kernel_size != (1, 1) for m in convs)  # only the stem and depthwise 3x3 remain
    assert sum(isinstance(m, PointwiseLinear) for m in fused.modules()) > 30
    nchw = fuse(_model("shufflenet_v2_x0_5", "mindcv"), channels_last=False)  # ONNX export keeps convolutions
    assert not any(isinstance(m, PointwiseLinear) for m in nchw.modules())


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [(7, 7), (8, 11)])
def test_unrolled_depthwise_is_the_depthwise_convolution(stride: int, size: tuple[int, int]) -> None:
    torch.manual_seed(stride)
    conv = nn.Conv2d(6, 6, 3, stride, 1, groups=6).double()
    x = torch.randn(2, 6, *size, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    got = UnrolledDepthwise(conv)(x)
    assert got.shape == conv(x).shape
    assert (got - conv(x)).abs().max() < 1e-12


def test_unrolled_depthwise_keeps_a_bf16_activation_in_bf16() -> None:
    """Under autocast the 1x1 convolutions hand it bf16; float32 weights must not promote the result."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, 1, 1, groups=8)
    x = torch.randn(2, 8, 9, 9).to(torch.bfloat16)
    got = UnrolledDepthwise(conv)(x)
    assert got.dtype == torch.bfloat16
    with torch.no_grad():
        expected = conv(x.float())
    assert (got.float() - expected).abs().max() < 0.05 * expected.abs().max()


@pytest.mark.slow
def test_compiled_fused_model_keeps_the_logits() -> None:
    """fuse(compile=True) unrolls the depthwise convolutions for inductor: same logits (< 1e-4)."""
    model = _model("shufflenet_v2_x0_5", "mindcv")
    compiled = fuse(model, compile=True)
    assert sum(isinstance(m, UnrolledDepthwise) for m in compiled.modules()) > 10
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = compiled(x.contiguous(memory_format=torch.channels_last))
        assert (got - model(x)).abs().max() < 1e-4


@pytest.mark.slow
def test_frozen_fused_model_keeps_the_logits_and_packs_its_weights_once() -> None:
    """fuse(freeze=True): same logits at two batch sizes (the second recompiles, frozen too); the compiled
    code calls oneDNN convolutions on weights packed at compile time, never ``aten.convolution``; and the
    process-wide inductor config is left as it was, so other compiled modules are not frozen."""
    from torch._inductor import config as inductor_config
    from torch._inductor.utils import run_and_get_code

    model = _model("shufflenet_v2_x0_5", "mindcv")
    frozen = fuse(model, freeze=True)
    assert isinstance(frozen, FrozenCompiled)
    assert not any(isinstance(m, (PointwiseLinear, UnrolledDepthwise)) for m in frozen.modules())  # oneDNN convs
    generator = torch.Generator().manual_seed(4)
    for batch in (2, 3):
        x = torch.randn(batch, 3, 96, 96, generator=generator)
        with torch.inference_mode():  # as bench runs it
            got, code = run_and_get_code(frozen, x.contiguous(memory_format=torch.channels_last))
        with torch.no_grad():
            assert (got - model(x)).abs().max() < 1e-4
        source = "\n".join(code)
        assert source.count("mkldnn._convolution_pointwise") >= 50 and "_frozen_param" in source
        assert "torch.ops.aten.convolution" not in source  # no convolution left that re-packs per call
    assert inductor_config.freezing is False


@pytest.mark.slow
def test_frozen_fused_model_runs_under_bfloat16_autocast(tmp_path: Path) -> None:
    """How benchmarks/gpu.sh runs the frozen rows (bf16 autocast), checked on the CPU: the weights are
    cast once inside the frozen graph, and the logits stay those of the float32 model to bf16 precision."""
    model = _model("shufflenet_v2_x0_5", "mindcv")
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    got = _runner("ours-fused-frozen", model, None, x, threads=1, scratch=tmp_path, amp=torch.bfloat16)()
    with torch.no_grad():
        expected = model(x)
    assert got.dtype == torch.bfloat16
    assert (got.float() - expected).abs().max() < 0.05 * expected.abs().max()


@pytest.mark.slow
def test_torchvision_frozen_row_computes_torchvisions_logits(tmp_path: Path) -> None:
    """The peer gets the same freezing as ours (channels_last, oneDNN packing), and must still be itself."""
    theirs = _model("shufflenet_v2_x0_5", "torchvision", seed=1)  # logits that depend on the image
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = theirs(x)
    ours = _model("shufflenet_v2_x0_5", "mindcv")
    got = _runner("torchvision-frozen", ours, theirs, x, threads=1, scratch=tmp_path)()
    assert (got - expected).abs().max() < 1e-4
