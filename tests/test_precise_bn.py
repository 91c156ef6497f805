"""precise_bn: BatchNorm statistics recomputed from batches under fixed weights (shufflenetv2/precise_bn.py)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from shufflenetv2 import create_model, read_weights, save_weights
from shufflenetv2 import data as data_mod
from shufflenetv2.cli import main
from shufflenetv2.config import evaluation_of, from_dict
from shufflenetv2.device_input import DeviceInput
from shufflenetv2.precise_bn import recompute_batchnorm_statistics, running_batchnorms

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from precise_bn_worker import model_and_batches  # noqa: E402


def _statistics(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k}


def _batches(layout: torch.memory_format = torch.contiguous_format) -> list[torch.Tensor]:
    """Batches of different means and spreads: the mean of their variances is far from the variance of all."""
    g = torch.Generator().manual_seed(3)
    return [
        (torch.randn(6, 3, 32, 32, generator=g) * (1 + k) + 2 * k).contiguous(memory_format=layout) for k in range(3)
    ]


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["contiguous", "channels_last"])
def test_first_layer_gets_the_population_statistics_of_all_images(layout: torch.memory_format) -> None:
    """The stem's BatchNorm sees the convolution's output: its statistics over all 18 images, computed here
    directly, are what precise BN must give (channels_last trains through the stem's own kernels)."""
    torch.manual_seed(0)
    model = create_model("shufflenet_v2_x0_5", num_classes=3).to(memory_format=layout).eval()
    batches = _batches(layout)
    assert recompute_batchnorm_statistics([model], batches) == 3
    conv, bn = model.first_conv[0], model.first_conv[1]
    with torch.no_grad():
        z = torch.cat([conv(b) for b in batches]).double()
    mean, var = z.mean((0, 2, 3)), z.var((0, 2, 3))
    torch.testing.assert_close(bn.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
    # each batch's variance is unbiased over its own 6 x 16 x 16 values (as BatchNorm's running variance
    # is), the whole one over all 3 x 1,536: they differ by at most 1 / 1,536 = 6.5e-4 of the variance
    torch.testing.assert_close(bn.running_var.double(), var, rtol=7e-4, atol=1e-6)
    mean_of_batch_variances = torch.stack([z[6 * k : 6 * k + 6].var((0, 2, 3)) for k in range(3)]).mean(0)
    assert ((mean_of_batch_variances - var).abs() / var).max() > 0.1  # what a plain average would have given


def test_one_batch_gives_each_layer_of_each_model_its_batch_statistics() -> None:
    """With one batch, every layer's statistics are those a training-mode forward of that batch computes
    (here: BatchNorm's own update with momentum 1), for each model separately (the network and its EMA)."""
    torch.manual_seed(0)
    network = create_model("shufflenet_v2_x0_5", num_classes=3)
    averaged = copy.deepcopy(network).eval()
    with torch.no_grad():
        for p in averaged.parameters():
            p.mul_(0.9)
    batch = _batches()[1]
    expected = []
    for model in (network, averaged):
        reference = copy.deepcopy(model).train()
        for bn in running_batchnorms(reference):
            bn.momentum = 1.0
        with torch.no_grad():
            reference(batch)
        expected.append(_statistics(reference))
    assert len(running_batchnorms(network)) == 56
    assert recompute_batchnorm_statistics([network, averaged], [batch]) == 1
    for model, wanted in zip((network, averaged), expected, strict=True):
        got = _statistics(model)
        assert got.keys() == wanted.keys()
        for key in got:
            torch.testing.assert_close(got[key], wanted[key], rtol=1e-5, atol=1e-6, msg=key)
    assert not torch.allclose(network.first_conv[1].running_var, averaged.first_conv[1].running_var)


def test_modes_momenta_counts_and_weights_stay_as_they_were() -> None:
    torch.manual_seed(0)
    model = create_model("shufflenet_v2_x0_5", num_classes=3).eval()
    model.features[3].train()  # a mixed state is given back as it was
    bns = running_batchnorms(model)
    bns[0].momentum = None
    bns[1].num_batches_tracked.fill_(17)
    modes = {name: m.training for name, m in model.named_modules()}
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k}
    before = _statistics(model)
    recompute_batchnorm_statistics([model], _batches())
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert bns[0].momentum is None and all(bn.momentum == 0.1 for bn in bns[1:])
    assert int(bns[1].num_batches_tracked) == 17
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in weights.items())  # num_batches_tracked included
    after = _statistics(model)
    assert all(not torch.equal(after[k], before[k]) for k in after if "running_var" in k)


def test_no_batch_or_an_interrupted_pass_leaves_the_statistics_as_they_were() -> None:
    torch.manual_seed(0)
    model = create_model("shufflenet_v2_x0_5", num_classes=3).eval()
    before = _statistics(model)
    assert recompute_batchnorm_statistics([model], [None, None]) == 0  # nothing readable: nothing to estimate from
    assert all(torch.equal(v, before[k]) for k, v in _statistics(model).items())

    def stopped() -> Iterator[torch.Tensor]:
        yield _batches()[0]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        recompute_batchnorm_statistics([model], stopped())
    assert all(torch.equal(v, before[k]) for k, v in _statistics(model).items())
    assert not model.training and running_batchnorms(model)[0].momentum == 0.1


def test_ranks_end_with_the_statistics_of_all_ranks_batches(tmp_path: Path) -> None:
    """torchrun, 2 gloo processes, each feeding its own two of four batches: both end with the statistics
    one process gets from all four; with sync BN, those of the global batches (rank 0's and rank 1's
    batch of a step together)."""
    torchrun = Path(sys.executable).with_name("torchrun")
    done = subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", "--standalone", str(REPO / "tests" / "precise_bn_worker.py"),
         str(tmp_path)],
        capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    model, batches = model_and_batches()
    plain, synced = copy.deepcopy(model), copy.deepcopy(model)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: the same float32 rounding in every convolution
    try:
        recompute_batchnorm_statistics([plain], batches)
        recompute_batchnorm_statistics([synced], [torch.cat(batches[0:2]), torch.cat(batches[2:4])])  # global batches
    finally:
        torch.set_num_threads(threads)
    # sync BN's statistics come from all-reduced float32 sums: rounded otherwise than one batch's (rtol 1e-5 seen)
    for name, reference, tolerance in (("plain", plain, 1e-6), ("sync", synced, 1e-4)):
        expected = _statistics(reference)
        for rank in (0, 1):
            path = tmp_path / f"{name}_rank{rank}.safetensors"
            with safe_open(str(path), "pt") as f:
                assert f.metadata()["fed"] == "4", name  # batches fed over both ranks
            got = load_file(str(path))
            assert got.keys() == expected.keys()
            for key in got:
                torch.testing.assert_close(got[key], expected[key], rtol=tolerance, atol=tolerance, msg=f"{name} {key}")
    assert not torch.allclose(plain.first_conv[1].running_var, synced.first_conv[1].running_var)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes x 8 training images of 24 x 24 coloured noise."""
    root = tmp_path_factory.mktemp("recalibrate")
    g = torch.Generator().manual_seed(0)
    for c, name in enumerate(("ant", "bee", "wasp")):
        (root / "train" / name).mkdir(parents=True)
        for i in range(8):
            pixels = (torch.randint(0, 120, (24, 24, 3), generator=g) + 60 * c).to(torch.uint8)
            Image.fromarray(pixels.numpy()).save(root / "train" / name / f"{i}.png")
    return root


def test_recalibrate_command_writes_the_training_images_statistics(
    images: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """`shufflenetv2 recalibrate`: weights whose statistics are far off get those of the first training
    batches of epoch 0 under the training transform, at the size the weights record or the config's;
    the weights, class names and format stay."""
    torch.manual_seed(0)
    model = create_model("shufflenet_v2_x0_5", num_classes=3)
    for bn in running_batchnorms(model):  # statistics that fit no data
        bn.running_mean.add_(3.0)
        bn.running_var.mul_(50.0)
    recorded = evaluation_of(from_dict({"image_resize": 16, "crop_pct": 1.0}))
    src = save_weights(tmp_path / "off.safetensors", model, classes=["ant", "bee", "wasp"], evaluation=recorded)
    dst = tmp_path / "recalibrated.safetensors"
    argv = ["recalibrate", str(src), str(dst), "--data_dir", str(images), "--images", "13", "--batch-size", "6"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert (
        f"wrote {dst}: shufflenet_v2_x0_5 from {src} with the statistics of its 56 BatchNorm layers recomputed from "
        f"18 images of 24 images, 3 classes ({images / 'train'}), under the training transform at 16 px; the "
        "running variances moved by "
    ) in printed  # 13 images round up to 3 batches of 6
    written = read_weights(dst)
    assert written.classes == ["ant", "bee", "wasp"] and written.evaluation == recorded

    # what training's precise_bn would compute: the first 3 batches of epoch 0, as the training loader gives them
    cfg = from_dict({"data_dir": str(images), "image_resize": 16, "crop_pct": 1.0, "batch_size": 6})
    loader = data_mod.build_loader(cfg, data_mod.build_dataset(cfg, "train", train=True), train=True)
    loader.sampler.set_epoch(0)
    inputs = DeviceInput(cfg, train=True, device=torch.device("cpu"))
    expected = copy.deepcopy(model).to(memory_format=torch.channels_last)
    fed = recompute_batchnorm_statistics([expected], (inputs(batch)[0] for batch in list(loader)[:3]))
    assert fed == 3
    for key, value in expected.state_dict().items():
        if "running" in key:
            torch.testing.assert_close(written.tensors[key], value, rtol=1e-5, atol=1e-6, msg=key)
            assert not torch.equal(value, model.state_dict()[key]), key
        else:
            assert torch.equal(written.tensors[key], value), key

    # a config's image size: the statistics fit its images, and the file records its transform
    config_file = tmp_path / "at24.yaml"
    config_file.write_text(f"data_dir: {images}\nimage_resize: 24\nbatch_size: 8\nnum_parallel_workers: 0\n")
    assert main(["recalibrate", str(src), str(tmp_path / "at24.safetensors"), "-c", str(config_file)]) == 0
    assert "recomputed from 24 images of 24 images, 3 classes" in capsys.readouterr().out
    assert read_weights(tmp_path / "at24.safetensors").evaluation == evaluation_of(from_dict({"image_resize": 24}))


def test_recalibrate_refusals(images: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = save_weights(tmp_path / "w.safetensors", create_model("shufflenet_v2_x0_5", num_classes=3))
    dst = tmp_path / "out.safetensors"
    refusals = {
        (): "name the training images: --data_dir DIR (its train folder), or -c CONFIG with data_dir",
        ("--data_dir", str(images), "--images", "0"): "--images must be at least 1, got 0",
        ("--data_dir", str(tmp_path / "nowhere")): "nowhere",
        ("--data_dir", str(images), "--batch-size", "100"): "fewer than batch_size 100",
    }
    for extra, message in refusals.items():
        assert main(["recalibrate", str(src), str(dst), *extra]) == 2, extra
        assert message in capsys.readouterr().err, extra
    assert not dst.exists()
