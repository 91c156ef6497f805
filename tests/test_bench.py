"""The training-step and data-pipeline benchmarks: equal work (same losses), and their command line."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from shufflenetv2 import bench_train, jpeg_region
from shufflenetv2.batchnorm import compiled_kernels
from shufflenetv2.bench import interleaved_rounds
from shufflenetv2.bench_data import DATA_BACKENDS, TRAIN_ONLY
from shufflenetv2.bench_train import as_delivered, batches, loss_trajectory, prepare, step_function, twin_networks
from shufflenetv2.cli import main
from shufflenetv2.pipeline import compiled_batch_step


@pytest.mark.parametrize("backend", ["ours-eager", "ours-channels-last"])
def test_our_training_steps_are_torchvisions_in_float64(backend: str) -> None:
    """The bench compares equal work: from the same weights, the same SGD steps give the same losses."""
    ours, theirs = twin_networks("shufflenet_v2_x0_5", num_classes=10)
    data = [(x.double(), y) for x, y in batches(3, 4, 48, 10, seed=3)]
    reference = loss_trajectory(step_function(theirs.double(), False), data)
    net, channels_last = prepare(backend, ours.double(), theirs)
    losses = loss_trajectory(step_function(net, channels_last), data)
    assert len(set(reference)) == 3  # the weights really moved between steps
    assert max(abs(a - b) / b for a, b in zip(losses, reference, strict=True)) < 1e-10


def test_channels_last_backends_get_the_batches_as_our_pipeline_writes_them() -> None:
    """Ours trains on channels_last batches as the fast pipeline writes them; torchvision on NCHW ones.
    Same values either way, so the loss trajectories stay comparable."""
    data = batches(2, 4, 32, 10)
    assert as_delivered(data, False) is data
    delivered = as_delivered(data, True)
    for (images, labels), (original, original_labels) in zip(delivered, data, strict=True):
        assert images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous()
        assert torch.equal(images, original) and labels is original_labels


def test_the_timed_steps_receive_the_delivered_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    """No layout conversion inside our timed step: every call of ours gets channels_last images, every call
    of torchvision's NCHW ones."""
    seen: dict[bool, set[bool]] = {True: set(), False: set()}

    def recording(net: torch.nn.Module, channels_last: bool, **kwargs: object) -> Callable:
        step = step_function(net, channels_last, **kwargs)

        def run(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            seen[channels_last].add(
                images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous()
            )
            return step(images, labels)

        return run

    monkeypatch.setattr(bench_train, "step_function", recording)
    rows = bench_train.benchmark_training(
        ["shufflenet_v2_x0_5"], [2], ["ours-channels-last", "torchvision-eager"],
        warmup=1, repeats=1, steps=1, image_size=32, check_steps=2,
    )  # fmt: skip
    assert seen == {True: {True}, False: {False}} and len(rows) == 2


def test_first_float32_step_agrees() -> None:
    ours, theirs = twin_networks("shufflenet_v2_x0_5", num_classes=10)
    data = batches(1, 8, 64, 10)
    first = loss_trajectory(step_function(theirs, False), data)[0]
    net, channels_last = prepare("ours-channels-last", ours, theirs)
    assert loss_trajectory(step_function(net, channels_last), data)[0] == pytest.approx(first, rel=1e-5)


def test_bench_train_and_data_suites(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for k in range(4):
            folder = tmp_path / "data" / split / f"c{k % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)).save(folder / f"{k}.jpg")
    out = tmp_path / "bench.json"
    args = ["bench", "--suites", "train", "data", "--train-backends", "ours-channels-last", "torchvision-eager",
            "--train-batches", "4", "--input-size", "32", "--iterations", "1", "--repeats", "2", "--threads", "1",
            "--data", str(tmp_path / "data"), "--json", str(out)]  # fmt: skip
    assert main(args) == 0
    results = json.loads(out.read_text())
    train = results["train_rows"]
    assert [r["backend"] for r in train] == ["ours-channels-last", "torchvision-eager"]
    assert all(r["images_per_second"] > 0 and r["float32_noise_floor"] >= 0 for r in train)
    assert train[1]["max_relative_loss_difference"] == 0.0  # torchvision against itself
    rows = [(r["split"], r["backend"]) for r in results["data_rows"]]
    assert rows == [(s, b) for s in ("train", "eval") for b in DATA_BACKENDS if s == "train" or b not in TRAIN_ONLY]
    assert results["jpeg_region_library"] == jpeg_region.library_path()  # which decoder the fast rows used
    assert results["batch_step"] == ("numba" if compiled_batch_step() else "torch ops (numba not installed)")
    assert results["batchnorm"] == ("numba" if compiled_kernels() else "torch ops (numba not installed)")
    assert all(r["images_per_second"] > 0 for r in results["data_rows"])
    # the machine is recorded without the inference suite too, down to the kernels torch dispatched to
    assert results["machine"]["cpu"].endswith(f"torch kernels {torch.backends.cpu.get_cpu_capability()}")
    if Path("/proc/cpuinfo").exists():
        assert "family" in results["machine"]["cpu"]  # a VM's "AMD EPYC" alone does not tell generations apart
    assert main(["bench", "--suites", "data"]) == 2  # no --data: a clear error, not a traceback


def test_channels_last_gradients_keep_their_layout() -> None:
    """EvenOddSplit's backward: the same float64 gradients as plain slicing, laid out like the activations."""
    torch.manual_seed(0)
    nchw, _ = twin_networks("shufflenet_v2_x0_5", num_classes=10)
    nchw = nchw.double()
    nhwc = prepare("ours-channels-last", nchw, nchw)[0]
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    y = torch.tensor([1, 7])
    seen = []
    block = nhwc.features[1]  # a stride-1 block
    block.register_full_backward_hook(lambda m, grad_in, grad_out: seen.append(grad_in[0]))
    torch.nn.functional.cross_entropy(nchw(x), y).backward()
    torch.nn.functional.cross_entropy(nhwc(x.contiguous(memory_format=torch.channels_last)), y).backward()
    assert seen and seen[0].is_contiguous(memory_format=torch.channels_last)
    worst = max((p.grad - q.grad).abs().max() for p, q in zip(nchw.parameters(), nhwc.parameters(), strict=True))
    assert worst < 1e-10


def _row(model: str, batch: int, backend: str, rounds: list[float]) -> dict:
    return {"model": model, "batch": batch, "backend": backend, "images_per_second": float(np.median(rounds)),
            "rounds": rounds}  # fmt: skip


def _script(name: str, *args: str) -> str:
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(root / "benchmarks" / name), *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_table_prints_the_ratio_columns_a_file_can_fill(tmp_path: Path) -> None:
    """A file with only the ONNX Runtime rows gets their ratio and no PyTorch columns (it used to crash)."""
    rows = [_row("shufflenet_v2_x0_5", 1, "ours-onnxruntime", [300.0, 200.0, 330.0]),
            _row("shufflenet_v2_x0_5", 1, "torchvision-onnxruntime", [200.0, 200.0, 300.0])]  # fmt: skip
    path = tmp_path / "ort.json"
    path.write_text(json.dumps({"rows": rows}))
    out = _script("table.py", str(path), str(tmp_path / "no_mindcv.json"))
    assert "| x0.5 b1 | 300.0 | 200.0 | 1.10x |" in out  # the median of 1.5, 1.0, 1.1
    assert "tv eager" not in out and "PyTorch" not in out
    rows += [_row("shufflenet_v2_x0_5", 1, "ours-fused", [100.0, 100.0, 100.0]),
             _row("shufflenet_v2_x0_5", 1, "torchvision-eager", [50.0, 40.0, 25.0])]  # fmt: skip
    path.write_text(json.dumps({"rows": rows}))
    out = _script("table.py", str(path), str(tmp_path / "no_mindcv.json"))
    assert "| x0.5 b1 | 100.0 | 300.0 | 40.0 | 200.0 | 2.50x | 2.50x | 1.10x |" in out  # fused, ORT, eager, ORT


def test_ort_by_speed_splits_the_rounds_by_torchvisions_speed(tmp_path: Path) -> None:
    theirs = [100.0, 200.0, 300.0, 400.0, 500.0, 600.0]
    ours = [200.0, 400.0, 330.0, 440.0, 500.0, 600.0]  # 2x in torchvision's slow rounds, 1.1x, then even
    rows = [_row("shufflenet_v2_x0_5", 32, "ours-onnxruntime", ours),
            _row("shufflenet_v2_x0_5", 32, "torchvision-onnxruntime", theirs)]  # fmt: skip
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"rows": rows}))
    out = _script("ort_by_speed.py", str(path))
    assert "| x0_5 b32 | 6 | 2.00x (tv 100-200 img/s) | 1.10x (tv 300-400 img/s) | 1.00x (tv 500-600 img/s) |" in out


def test_rounds_stop_when_the_thread_count_is_not_the_one_asked_for() -> None:
    """Rows are compared at one thread count: a runner that changes it (as numba's start once did, in
    the set-up or in a round) is an error, not a silently unequal comparison."""
    threads = torch.get_num_threads()
    steady = (lambda: None, 1)
    assert [len(r) for r in interleaved_rounds([steady, steady], 4, 3, threads)] == [3, 3]
    try:
        with pytest.raises(RuntimeError, match=f"from {threads + 1} to {threads} while the rows were set up"):
            interleaved_rounds([steady, steady], 4, 3, threads + 1)
        changing = (lambda: torch.set_num_threads(threads + 1), 1)
        with pytest.raises(RuntimeError, match=f"from {threads} to {threads + 1} in a round of runner 1"):
            interleaved_rounds([steady, changing], 4, 3, threads)
    finally:
        torch.set_num_threads(threads)
